"""A sparse file as a block device: positional I/O, holes for trim, durability on request.

The file is created sparse (``ftruncate``, never zero-filled), so an 8 GiB volume costs
nothing until written, and a trim gives the space back by punching a hole. Every request
runs in a worker thread (``blocking``), several at once (``parallel``: ``pread`` and
``pwrite`` on one descriptor are safe from any number of threads and never move a shared
file offset); how many is the engine's bound (:class:`usbd.core.Export`'s ``max_workers``,
16 per export). Reads and writes that the page cache can serve at once are first tried on
the event loop (:meth:`FileDisk.try_read`, :meth:`FileDisk.try_write`), which saves the
thread hop that otherwise dominates small requests.

Durability. FLUSH is ``fdatasync``: one descriptor serves every connection, so it covers
every connection's completed writes (``multi_conn``). FUA is native: a write with FUA is
``pwritev`` with ``RWF_DSYNC``, the per-call form of ``O_DSYNC``, which makes that range
(and the metadata needed to read it back) durable before returning. That is cheaper than
``fdatasync`` after the write, which would also write back every dirty page other requests
left in the file, and needs no second descriptor opened with ``O_DSYNC``. A trim or zeroing
with FUA is followed by ``fdatasync`` (``fallocate`` has no such flag). Closing does not
sync: the engine flushes before it closes (``Export.aclose``), and a library user who
closes without flushing has asked for no durability.

Trim, zeroing and block status use the file system: TRIM punches a hole
(``FALLOC_FL_PUNCH_HOLE``), WRITE_ZEROES punches one too unless the client forbids holes
(NO_HOLE), in which case ``FALLOC_FL_ZERO_RANGE`` zeroes the range and keeps it allocated;
BLOCK_STATUS reports the file's holes as found by ``SEEK_DATA``/``SEEK_HOLE``. A file system
that cannot punch holes or zero ranges is detected on first use and logged once: trim is then
ignored (it is advisory; writing zeros instead would turn ``mkfs``'s discard of the whole
device into a write of the whole device) and zeroing writes zeros, unless the client asked for
a fast zero, which is refused with ENOTSUP as the protocol wants.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO

from usbd.core import BytesLike, Device, DeviceError, Extent, ExtentFlag, Fua, format_size
from usbd.core.fallocate import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
)
from usbd.core.lockfile import lock_exclusive, unlock
from usbd.core.progress import LOG_EVERY, progress

from ._direct import ALIGN, SharedLock, aligned_buffer, round_down, round_up

__all__ = ["DEFAULT_SIZE", "DirectFileDisk", "FileDisk", "SizeMismatch", "StoreError"]

log = logging.getLogger("usbd.filedisk")

#: The size of a new file when none is given (the shared settings' default).
DEFAULT_SIZE = 1 << 30
#: At most this many extents per BLOCK_STATUS answer: a client asks again from where it
#: ended, and a badly fragmented file cannot make one request walk all of it.
MAX_EXTENTS = 1024

_HOLE = ExtentFlag.HOLE | ExtentFlag.ZERO
_ZEROS = memoryview(bytes(1 << 20))
_PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_ZERO_RANGE = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
_PUNCH_HOLES = "punch holes"
_ZERO_RANGES = "zero ranges in place"
#: How often sizing or growing a file logs its progress without a terminal (see _extend).
_GROW_LOG_EVERY = LOG_EVERY


class StoreError(ValueError):
    """The backing file cannot be used as asked: a configuration problem, not a failure.

    ``param`` names the constructor parameter at fault (``size``, ``direct``, ``path``), so
    that a command can name its flag.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class SizeMismatch(StoreError):
    """An existing file's size differs from the size asked for, and it was not to be grown
    (or it would have to shrink, which is never done)."""

    def __init__(self, path: Path, current: int, wanted: int) -> None:
        self.path = path
        self.current = current
        self.wanted = wanted
        have, want = describe_sizes(current, wanted)
        if wanted > current:
            reason = f"{path} is {have}, smaller than the {want} asked for (growing not asked)"
        else:
            reason = f"{path} is {have}, larger than the {want} asked for: shrinking is never done"
        super().__init__("size", reason)


def describe_sizes(first: int, second: int) -> tuple[str, str]:
    """Both sizes in the original's units, with bytes where the units would show them equal."""
    a, b = format_size(first), format_size(second)
    if a == b:
        return f"{a} ({first} bytes)", f"{b} ({second} bytes)"
    return a, b


def _read_into(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill ``buffer`` from ``offset``, however many calls it takes."""
    done, want = 0, len(buffer)
    while done < want:
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise DeviceError(
                errno.EIO, f"end of file at {offset + done}: was the file truncated behind us?"
            )
        done += got


def _write_all(fd: int, data: memoryview, offset: int, flags: int) -> None:
    """Write all of ``data`` at ``offset``, however many calls it takes."""
    done, want = 0, len(data)
    while done < want:
        wrote = os.pwritev(fd, [data[done:]], offset + done, flags)
        if wrote == 0:
            raise DeviceError(errno.EIO, f"write at {offset + done} made no progress")
        done += wrote


def _extend(
    fd: int,
    current: int,
    target: int,
    what: str,
    *,
    bar: bool | None = None,
    stream: IO[str] | None = None,
) -> None:
    """``ftruncate`` from ``current`` to ``target`` bytes, as progress (usbd.core.progress).

    Where files can have holes this is a metadata update, done at once, and says nothing. A
    file system without holes (FAT, exFAT) writes zeros up to the new size within the call
    instead, which takes minutes for a large volume: a bar shows on a terminal meanwhile,
    and the time it took is logged. One call, not a call per gigabyte (which would let the
    bar move): a kill between two calls would leave a size that the next start cannot tell
    from one that was asked for, where one call leaves the old size or the new.
    """
    with progress(
        what, target - current, unit="B", every=_GROW_LOG_EVERY, bar=bar, stream=stream, logger=log
    ) as work:
        os.ftruncate(fd, target)
        work.advance(target - current)


def _sync_directory(path: Path) -> None:
    """Make a new entry in ``path`` durable: a crash must not lose the file the data is in."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileDisk(Device):
    """The file at ``path`` as a device, created sparse if it does not exist.

    A new (or empty) file gets ``size`` bytes, or ``default_size`` when ``size`` is None or
    0. An existing file keeps its size; a ``size`` that differs is a :class:`SizeMismatch`,
    unless it is larger and ``grow`` is set (the file is then extended, sparse). The file is
    locked for as long as the device is open (see :mod:`usbd.core.lockfile`); a second
    device on it fails with :class:`~usbd.core.lockfile.StoreInUse`.
    """

    blocking = True
    parallel = True
    multi_conn = True
    fua = Fua.NATIVE
    # Splitting long reads into data and holes would cost lseeks (in a worker thread) on
    # every read; nbdkit's file plugin does not split either.
    sparse_reads = False

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int | None = None,
        *,
        grow: bool = False,
        default_size: int = DEFAULT_SIZE,
    ) -> None:
        self.path = Path(path)
        self._fd = -1
        #: Whether RWF_NOWAIT reads and writes may work here (ext4 refuses them for
        #: buffered writes); learnt from the first refusal, after which no call is made.
        self._nowait_reads = True
        self._nowait_writes = True
        #: What fallocate cannot do here, learnt from its first refusal.
        self._unsupported: set[str] = set()
        self._learning = threading.Lock()
        if size is not None and size < 0:
            raise StoreError("size", f"size must not be negative, got {size}")
        created = False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            created = True
        except FileExistsError:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        locked = False
        try:
            lock_exclusive(fd, self.path, "another usbd-filedisk?")
            locked = True
            self._prepare(fd)
            self.size = self._settle_size(fd, created, size or None, grow, default_size)
        except BaseException:
            if created and locked:  # nobody else can have used it: leave nothing behind
                with contextlib.suppress(OSError):
                    self.path.unlink()
            os.close(fd)
            raise
        self._fd = fd

    def _prepare(self, fd: int) -> None:
        """Adjust the open file before it is sized (direct I/O switches it to O_DIRECT)."""

    def _check_size(self, size: int) -> None:
        """Refuse a size this kind of device cannot serve (direct I/O needs whole blocks)."""

    def _settle_size(
        self, fd: int, created: bool, size: int | None, grow: bool, default_size: int
    ) -> int:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise StoreError("path", f"{self.path} is not a regular file")
        current = status.st_size
        if created or current == 0:
            # An empty file is one whose creator was interrupted (or raced us to the lock
            # before sizing it), or one made with touch: size it like a new one.
            target = size or default_size
            self._check_size(target)
            _extend(fd, current, target, f"sizing {self.path}")
            # The size needs no sync of its own: the first FLUSH (fdatasync) makes it
            # durable with the data, and a file that lost it comes back empty and is sized
            # again. Its name in the directory is another matter.
            if created:
                _sync_directory(self.path.parent)
            log.info("created %s, a sparse file of %s", self.path, format_size(target))
            return target
        self._check_size(current)
        if size is None or size == current:
            return current
        if size < current or not grow:
            raise SizeMismatch(self.path, current, size)
        self._check_size(size)
        _extend(fd, current, size, f"growing {self.path}")
        log.info("grew %s from %s to %s", self.path, *describe_sizes(current, size))
        return size

    def _file(self) -> int:
        # After close every call fails; the old descriptor number may by then belong to
        # another file, so it is never used again.
        fd = self._fd
        if fd < 0:
            raise DeviceError(errno.ESHUTDOWN, f"{self.path} is closed")
        return fd

    def _changing(self) -> AbstractContextManager[None]:
        """Held around an ``fallocate`` (direct I/O must keep read-modify-writes out)."""
        return contextlib.nullcontext()

    # -- reads and writes ------------------------------------------------------------------

    def read(self, offset: int, length: int) -> BytesLike:
        fd = self._file()
        # pread into fresh bytes: unlike a bytearray for preadv, not zeroed first.
        data = os.pread(fd, length, offset)
        if len(data) == length:
            return data
        # Short (the kernel stops at 2 GiB, or the file was truncated behind us): the rest.
        buffer = bytearray(length)
        buffer[: len(data)] = data
        _read_into(fd, memoryview(buffer)[len(data) :], offset + len(data))
        return buffer

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        _write_all(self._file(), data, offset, os.RWF_DSYNC if fua else 0)

    def try_read(self, offset: int, length: int) -> BytesLike | None:
        """The read from the page cache, or None if any of it would wait for the disk.

        A miss is not wasted: the kernel has started reading ahead by then, so the read
        in the worker thread that follows finds the I/O under way."""
        fd = self._file()
        if not self._nowait_reads:
            return None
        buffer = bytearray(length)
        try:
            got = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            self._nowait_reads = False  # the file system never reads without waiting
            return None
        # A short read stopped at the first page that is not cached: read it all in a thread.
        return buffer if got == length else None

    def try_write(self, offset: int, data: memoryview) -> int:
        """Write what the page cache takes at once; 0 when the write would wait or when the
        file system never writes without waiting (ext4 refuses RWF_NOWAIT for buffered
        writes)."""
        fd = self._file()
        if not self._nowait_writes:
            return 0
        try:
            return os.pwritev(fd, [data], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            self._nowait_writes = False
            return 0

    def flush(self) -> None:
        os.fdatasync(self._file())

    # -- trim, zero, extents, cache --------------------------------------------------------

    def trim(self, offset: int, length: int, fua: bool) -> None:
        fd = self._file()
        learnt: list[str] = []
        punched = self._fallocate(fd, _PUNCH_HOLES, offset, length, learnt)
        self._report(learnt)
        if punched and fua:
            os.fdatasync(fd)

    def zero(self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool) -> None:
        fd = self._file()
        learnt: list[str] = []
        done = may_trim and self._fallocate(fd, _PUNCH_HOLES, offset, length, learnt)
        if not done:
            done = self._fallocate(fd, _ZERO_RANGES, offset, length, learnt)
        self._report(learnt)
        if not done:
            if fast:
                raise DeviceError(
                    errno.ENOTSUP, f"the file system of {self.path} cannot zero a range fast"
                )
            end = offset + length
            while offset < end:
                step = min(len(_ZEROS), end - offset)
                self.write(offset, _ZEROS[:step], False)
                offset += step
        if fua:
            os.fdatasync(fd)

    def _fallocate(self, fd: int, what: str, offset: int, length: int, learnt: list[str]) -> bool:
        """Punch or zero in place; False if the file system cannot. The first refusal of each
        mode is added to ``learnt`` (and no further attempts are made)."""
        if what in self._unsupported:
            return False
        try:
            with self._changing():
                fallocate(fd, _PUNCH if what == _PUNCH_HOLES else _ZERO_RANGE, offset, length)
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            with self._learning:
                if what not in self._unsupported:
                    self._unsupported.add(what)
                    learnt.append(what)
            return False
        return True

    def _report(self, learnt: list[str]) -> None:
        """One log line for what one call found the file system cannot do, and what
        happens instead (so at most two lines in a device's life)."""
        if not learnt:
            return
        cannot = self._unsupported
        instead = []
        if _PUNCH_HOLES in cannot:
            instead.append("TRIM is ignored")
        if cannot == {_PUNCH_HOLES, _ZERO_RANGES}:
            instead.append("zeroing writes zeros")
        elif _ZERO_RANGES in cannot:
            instead.append("zeroing that must keep its blocks (NO_HOLE) writes zeros")
        else:
            instead.append("zeroing keeps the blocks allocated")
        log.warning(
            "%s: the file system cannot %s (fallocate: %s): %s",
            self.path,
            " or ".join(learnt),
            os.strerror(errno.EOPNOTSUPP),
            "; ".join(instead),
        )

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The file's holes and data from ``offset``, as ``SEEK_DATA``/``SEEK_HOLE`` find them,
        up to the end of the request (or :data:`MAX_EXTENTS`)."""
        fd = self._file()
        end = offset + length
        found: list[Extent] = []
        pos = offset
        while pos < end and len(found) < MAX_EXTENTS:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = end  # nothing but a hole from here to the end of the file
            if data > pos:
                stop = min(data, end)
                found.append(Extent(pos, stop - pos, _HOLE))
            else:
                stop = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
                found.append(Extent(pos, stop - pos, ExtentFlag.DATA))
            pos = stop
        return found

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self._file(), offset, length, os.POSIX_FADV_WILLNEED)

    # -- figures ---------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """The figures of :data:`usbd.filedisk._metrics.METRICS`: one ``fstat`` of the file
        (why that is acceptable here: see that module)."""
        fd = self._fd
        if fd < 0:
            return {}
        try:
            status = os.fstat(fd)
        except OSError:  # closed meanwhile
            return {}
        return {
            "allocated_bytes": status.st_blocks * 512,
            "size_bytes": status.st_size,
            "punch_holes": int(_PUNCH_HOLES not in self._unsupported),
        }

    def close(self) -> None:
        """Release the lock and the file; every later call fails with ESHUTDOWN."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            unlock(fd)
        finally:
            os.close(fd)


class DirectFileDisk(FileDisk):
    """:class:`FileDisk` with ``O_DIRECT``: reads and writes bypass the page cache.

    For data that should not crowd the host's page cache, or a host whose memory should
    not hold writes back. Writes are not durable without FLUSH or FUA even so (the disk's
    own cache and the file system's metadata still need the sync). Transfers go through
    page-aligned buffers in whole 4 KiB blocks, so any byte range still works (see
    :mod:`usbd.filedisk._direct`), and the file's size must be a multiple of 4 KiB.
    Nothing is tried on the event loop (``RWF_NOWAIT`` concerns the page cache, which
    direct I/O never uses) and CACHE advice does nothing.

    A file system that refuses ``O_DIRECT`` is a :class:`StoreError` for ``direct``.
    """

    block_size = ALIGN
    # Not offered: the engine then never tries them (Export checks for overrides).
    try_read = Device.try_read
    try_write = Device.try_write

    def _prepare(self, fd: int) -> None:
        # Read-modify-writes of edge blocks against fallocate (see _changing).
        self._lock = SharedLock()
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            raise StoreError(
                "direct", f"direct I/O (O_DIRECT) is not supported on this filesystem ({self.path})"
            ) from None

    def _check_size(self, size: int) -> None:
        if size % ALIGN:
            raise StoreError(
                "direct",
                f"direct I/O needs a size that is a multiple of {ALIGN} bytes, "
                f"not {size} ({self.path})",
            )

    def _changing(self) -> AbstractContextManager[None]:
        return self._lock.shared()

    def read(self, offset: int, length: int) -> BytesLike:
        fd = self._file()
        start, stop = round_down(offset), round_up(offset + length)
        buffer = aligned_buffer(stop - start)
        view = memoryview(buffer)
        _read_into(fd, view, start)
        return view[offset - start : offset - start + length]

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        fd = self._file()
        end = offset + len(data)
        start, stop = round_down(offset), round_up(end)
        view = memoryview(aligned_buffer(stop - start))
        head, tail = offset != start, end != stop
        with self._lock.exclusive() if head or tail else self._lock.shared():
            if head:
                _read_into(fd, view[:ALIGN], start)
            if tail and not (head and stop - start == ALIGN):  # not the block just read
                _read_into(fd, view[-ALIGN:], stop - ALIGN)
            view[offset - start : end - start] = data
            _write_all(fd, view, start, os.RWF_DSYNC if fua else 0)

    def cache(self, offset: int, length: int) -> None:
        self._file()  # read-ahead fills the page cache, which direct reads never look at
