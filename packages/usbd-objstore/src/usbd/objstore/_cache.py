"""The local cache on disk: the device's bytes for the chunks held here, and what it knows of them.

``<store-dir>/<store-name>.cache/`` holds three files:

* ``data``: a sparse file of the device's size; chunk ``c`` lives at ``c * object_size``, so a
  cached read or write is one ``pread``/``pwrite`` and the page cache works as for a plain file.
  A chunk that is not held here is a hole (eviction punches it).
* ``staging``: a sparse file of the same size for copy-on-write during an upload round: when a
  round has promised to upload a chunk as it was when the round began, and a write arrives
  first, the old content is copied here (``copy_file_range``, in the kernel) before the write
  goes ahead. The file is emptied as rounds end; it holds nothing across restarts.
* ``state``: which chunks are held, for each its generation and whether it is dirty, plus the
  volume id, the epochs this cache has written under, the last commit it saw and whether the
  daemon closed cleanly. Replaced atomically (write, fsync, rename, fsync the directory).

Why this is enough for kill -9 at any moment: a FLUSH syncs ``data`` and then saves ``state``
before it is answered, so every chunk a flushed write touched is listed as dirty in a durable
state whose data is durable too. After an unclean stop, chunks listed as clean are dropped (a
write after the last save may have changed them without the state saying so); dirty ones are
kept and uploaded. After a clean stop the state is exact, and clean chunks are reused when their
generation is the one the committed manifest names.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usbd.core import DeviceError
from usbd.core.fallocate import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

from ._store import fsync_dir

__all__ = ["CacheFiles", "SavedState"]

log = logging.getLogger("usbd.objstore")

_DIRTY = 1 << 63
_LENGTH = struct.Struct(">I")
_MAGIC = b"USBDCACHE1"


@dataclass
class SavedState:
    """What ``state`` records."""

    volume: str
    epochs: list[int]
    seq: int
    clean: bool
    #: chunk -> (generation it was fetched at or last uploaded as, dirty)
    chunks: dict[int, tuple[int, bool]] = field(default_factory=dict)
    object_size: int = 0
    size: int = 0


def _punch(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


class CacheFiles:
    """The cache directory's files, open."""

    def __init__(self, directory: Path, size: int) -> None:
        self.directory = directory
        self.size = size
        if not directory.exists():
            directory.mkdir(mode=0o700)
            fsync_dir(directory.parent)  # the directory's own name must survive a crash
        self.data = self._open("data")
        self.staging = self._open("staging")
        os.ftruncate(self.staging, 0)  # nothing in it survives a restart
        os.ftruncate(self.staging, size)

    def _open(self, name: str) -> int:
        fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(fd).st_size != self.size:
            os.ftruncate(fd, self.size)
        return fd

    # -- bytes ------------------------------------------------------------------------------

    def read(self, offset: int, length: int, *, staged: bool = False) -> bytes:
        fd = self.staging if staged else self.data
        data = os.pread(fd, length, offset)
        while len(data) < length:  # short only near 2 GiB per call; never at EOF (sized)
            more = os.pread(fd, length - len(data), offset + len(data))
            if not more:
                raise DeviceError(errno.EIO, f"cache file ended at {offset + len(data)}")
            data += more
        return data

    def write(self, offset: int, data: memoryview | bytes, flags: int = 0) -> None:
        view = memoryview(data)
        while view:
            wrote = os.pwritev(self.data, [view], offset, flags)
            view, offset = view[wrote:], offset + wrote

    def punch(self, offset: int, length: int, *, staged: bool = False) -> None:
        _punch(self.staging if staged else self.data, offset, length)

    def stage(self, offset: int, length: int) -> None:
        """Copy a chunk from ``data`` to the same place in ``staging``."""
        done = 0
        while done < length:
            copied = os.copy_file_range(
                self.data, self.staging, length - done, offset + done, offset + done
            )
            if copied == 0:
                raise DeviceError(errno.EIO, f"copy to staging stopped at {offset + done}")
            done += copied

    def sync(self) -> None:
        os.fdatasync(self.data)

    # -- state ------------------------------------------------------------------------------

    def load_state(self) -> SavedState | None:
        try:
            blob = (self.directory / "state").read_bytes()
        except FileNotFoundError:
            return None
        try:
            if not blob.startswith(_MAGIC):
                raise ValueError("bad magic")
            (length,) = _LENGTH.unpack_from(blob, len(_MAGIC))
            start = len(_MAGIC) + _LENGTH.size
            meta: dict[str, Any] = json.loads(blob[start : start + length])
            pairs = array.array("Q")
            pairs.frombytes(blob[start + length :])
            if pairs.itemsize != 8 or len(pairs) % 2:
                raise ValueError("bad chunk table")
        except (ValueError, struct.error) as exc:
            log.warning("%s/state is unreadable (%s): the cache is discarded", self.directory, exc)
            return None
        chunks = {
            pairs[i]: (pairs[i + 1] & ~_DIRTY, bool(pairs[i + 1] & _DIRTY))
            for i in range(0, len(pairs), 2)
        }
        return SavedState(
            str(meta["volume"]),
            [int(e) for e in meta["epochs"]],
            int(meta["seq"]),
            bool(meta["clean"]),
            chunks,
            int(meta.get("object_size", 0)),
            int(meta.get("size", 0)),
        )

    def save_state(self, state: SavedState) -> None:
        meta = json.dumps(
            {
                "volume": state.volume,
                "epochs": state.epochs,
                "seq": state.seq,
                "clean": state.clean,
                "object_size": state.object_size,
                "size": state.size,
            }
        ).encode()
        pairs = array.array("Q")
        for chunk, (generation, dirty) in sorted(state.chunks.items()):
            pairs.append(chunk)
            pairs.append(generation | (_DIRTY if dirty else 0))
        path = self.directory / "state"
        temporary = self.directory / "state.new"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(_MAGIC + _LENGTH.pack(len(meta)) + meta + pairs.tobytes())
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        fsync_dir(self.directory)

    def close(self, *, remove: bool) -> None:
        for fd in (self.data, self.staging):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.data = self.staging = -1
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)
