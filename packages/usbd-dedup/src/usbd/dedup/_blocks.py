"""The data files: one per slot size, slot ``i`` of size ``s`` at offset ``i * s``.

Fixed slots, so a freed slot is reused in place and its space punched out of the file, with
no compaction ever. Contiguous slots are read and written with one ``preadv``/``pwritev``
(sequential unique writes take consecutive new slots, so a sequential read of them is one
call), and every call here releases the GIL.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

from usbd.core import DeviceError
from usbd.core.fallocate import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

from ._format import slot_class, slot_index

__all__ = ["BlockFiles", "file_name"]


def file_name(size: int) -> str:
    return f"blocks.{size}"


class BlockFiles:
    """The open data files of a volume, by slot class."""

    def __init__(self, directory: Path, sizes: Sequence[int]) -> None:
        self.sizes = tuple(sizes)
        self.paths = [directory / file_name(size) for size in sizes]
        self._fds: list[int] = []
        self._dirty = [False] * len(sizes)
        #: Whether reads without waiting (RWF_NOWAIT) work here; learnt from a refusal.
        self.nowait = True
        try:
            for path in self.paths:
                self._fds.append(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except BaseException:
            self.close()
            raise

    def _fd(self, cls: int) -> int:
        if not self._fds:
            raise DeviceError(errno.EBADF, "the device is closed")
        return self._fds[cls]

    def read(self, slot: int, length: int, *, nowait: bool = False) -> bytes | None:
        """A slot's first ``length`` bytes; ``nowait``: None unless all are in the page cache."""
        cls = slot_class(slot)
        offset = slot_index(slot) * self.sizes[cls]
        if nowait:
            buffer = bytearray(length)
            if not self._nowait(cls, [memoryview(buffer)], offset):
                return None
            return bytes(buffer)
        data = os.pread(self._fd(cls), length, offset)
        if len(data) != length:
            # Below the high-water mark a slot is always inside the file: a short read means
            # the file was cut by something else.
            raise DeviceError(errno.EIO, f"{self.paths[cls]}: slot {slot_index(slot)} is short")
        return data

    def read_into(
        self, cls: int, first: int, buffers: Sequence[memoryview], *, nowait: bool = False
    ) -> bool:
        """Consecutive slots of class ``cls`` from ``first`` into ``buffers`` (one each);
        ``nowait``: False unless all were in the page cache."""
        if nowait:
            return self._nowait(cls, buffers, first * self.sizes[cls])
        want = sum(len(b) for b in buffers)
        got = os.preadv(self._fd(cls), buffers, first * self.sizes[cls])
        if got != want:
            raise DeviceError(errno.EIO, f"{self.paths[cls]}: slots from {first} are short")
        return True

    def _nowait(self, cls: int, buffers: Sequence[memoryview], offset: int) -> bool:
        """preadv with RWF_NOWAIT: all of it from the page cache, or False (a short read
        stops at the first page not there; a file system without it never tries again)."""
        if not self.nowait:
            return False
        try:
            got = os.preadv(self._fd(cls), buffers, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            self.nowait = False
            return False
        return got == sum(len(b) for b in buffers)

    def write(self, cls: int, first: int, buffers: Sequence[bytes | memoryview]) -> None:
        """Consecutive slots of class ``cls`` from ``first``, one buffer each (a compressed
        block's buffer is shorter than its slot: the rest of the slot is never read)."""
        fd = self._fd(cls)
        size = self.sizes[cls]
        if all(len(b) == size for b in buffers):
            want = size * len(buffers)
            if os.pwritev(fd, buffers, first * size) != want:
                raise DeviceError(errno.EIO, f"{self.paths[cls]}: short write")
        else:
            for i, buffer in enumerate(buffers):
                if os.pwrite(fd, buffer, (first + i) * size) != len(buffer):
                    raise DeviceError(errno.EIO, f"{self.paths[cls]}: short write")
        self._dirty[cls] = True

    def sync(self) -> None:
        """fdatasync every file written since the last sync: data before the index."""
        for cls, dirty in enumerate(self._dirty):
            if dirty:
                self._dirty[cls] = False
                try:
                    os.fdatasync(self._fd(cls))
                except BaseException:
                    self._dirty[cls] = True
                    raise

    def punch(self, slots: Sequence[int]) -> None:
        """Give the space of free slots back to the file system, a run of them per call."""
        runs: list[tuple[int, int, int]] = []
        for slot in sorted(slots):
            cls, index = slot_class(slot), slot_index(slot)
            if runs and runs[-1][0] == cls and runs[-1][1] + runs[-1][2] == index:
                runs[-1] = (cls, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((cls, index, 1))
        for cls, first, count in runs:
            size = self.sizes[cls]
            # Only whole file-system blocks: punching part of one frees nothing, the kernel
            # writes zeros there instead.
            unit = self._unit(cls)
            start = -(-first * size // unit) * unit
            end = (first + count) * size // unit * unit
            if end <= start:
                continue
            try:
                fallocate(
                    self._fd(cls), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, end - start
                )
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                return  # a file system without holes: the slots are still reused

    def _unit(self, cls: int) -> int:
        return max(os.fstat(self._fd(cls)).st_blksize, 512)

    def cut(self, high: Sequence[int]) -> int:
        """Cut each file at its high-water mark (what lies beyond was never committed);
        the number of bytes cut off."""
        cut = 0
        for cls, fd in enumerate(self._fds):
            end = high[cls] * self.sizes[cls]
            length = os.fstat(fd).st_size
            if length > end:
                os.ftruncate(fd, end)
                cut += length - end
        return cut

    def allocated(self) -> int:
        """Bytes the files take on disk (what ``du`` shows)."""
        return sum(os.fstat(fd).st_blocks * 512 for fd in self._fds)

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
