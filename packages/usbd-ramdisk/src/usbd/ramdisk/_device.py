"""A RAM disk that takes memory only for what is written and gives it back on trim.

The whole device is one anonymous private mapping reserved with MAP_NORESERVE: pages that
were never written read as the kernel's shared zero page and cost nothing, and
``madvise(MADV_DONTNEED)`` returns trimmed pages to the system (they read as zeros again).
A byte per 64 KiB chunk, itself in a lazily allocated mapping, records which chunks hold
data, so that block status and sparse reads can report holes.

Every call answers at once from memory, so the device runs inline on the event loop
(``blocking = False``): the engine's batched fast path.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import platform
import sys
from collections.abc import Iterator

from usbd.core import Device, DeviceError, Extent, ExtentFlag

__all__ = ["CHUNK", "RamDisk"]

CHUNK_SHIFT = 16
CHUNK = 1 << CHUNK_SHIFT
_PAGE = mmap.PAGESIZE
# Python < 3.13 lacks mmap.MAP_NORESERVE; without it the whole size counts against the
# kernel's overcommit heuristic and a ramdisk larger than RAM cannot even be created.
# 0x4000 is its value on Linux wherever the generic flag values apply.
_GENERIC = {"x86_64", "i686", "aarch64", "riscv64", "s390x"}
_GENERIC_LINUX = sys.platform == "linux" and platform.machine() in _GENERIC
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if _GENERIC_LINUX else 0)
_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE
_HOLE = ExtentFlag.HOLE | ExtentFlag.ZERO
_ZEROS = memoryview(bytes(1 << 20))


def _anonymous(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=_FLAGS, prot=mmap.PROT_READ | mmap.PROT_WRITE)


class RamDisk(Device):
    """Memory-backed device of ``size`` bytes; contents are lost when the process ends."""

    blocking = False
    multi_conn = True

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"ramdisk size must be positive, got {size}")
        self.size = size
        self._mem: mmap.mmap | None = _anonymous(size)
        self._view: memoryview | None = memoryview(self._mem)
        self._map: mmap.mmap | None = _anonymous((size + CHUNK - 1) >> CHUNK_SHIFT)

    def _closed(self) -> DeviceError:
        return DeviceError(errno.ESHUTDOWN, "ramdisk is closed")

    def read(self, offset: int, length: int) -> memoryview:
        # A view, not a copy: copying a 1 MiB read into fresh memory costs more than sending
        # it. A write racing with this read (sent before its reply arrived) may show through,
        # which NBD allows for overlapping requests in flight.
        view = self._view
        if view is None:
            raise self._closed()
        return view[offset : offset + length]

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        mem, used = self._mem, self._map
        if mem is None or used is None:
            raise self._closed()
        end = offset + len(data)
        mem[offset:end] = data
        first = offset >> CHUNK_SHIFT
        last = (end - 1) >> CHUNK_SHIFT
        if first == last:
            used[first] = 1
        else:
            used[first : last + 1] = b"\x01" * (last + 1 - first)

    def flush(self) -> None:
        # Nothing to make durable, but advertising flush lets FUA and the kernel's barriers
        # through instead of refusing them.
        if self._mem is None:
            raise self._closed()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._discard(offset, length)

    def zero(self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool) -> None:
        if may_trim:
            self._discard(offset, length)
            return
        mem = self._mem
        if mem is None:
            raise self._closed()
        self._zero_bytes(mem, offset, offset + length)

    def cache(self, offset: int, length: int) -> None:
        # Everything is already in memory: advertising CACHE and answering at once is what
        # nbdkit's memory plugin does too, and spares clients a refused request.
        if self._mem is None:
            raise self._closed()

    def _discard(self, offset: int, length: int) -> None:
        """Zero the range, returning whole pages to the system and forgetting whole chunks."""
        mem, used = self._mem, self._map
        if mem is None or used is None:
            raise self._closed()
        end = offset + length
        page_start = -(-offset // _PAGE) * _PAGE
        page_end = end // _PAGE * _PAGE
        if page_start < page_end:
            mem.madvise(mmap.MADV_DONTNEED, page_start, page_end - page_start)
            self._zero_bytes(mem, offset, page_start)
            self._zero_bytes(mem, page_end, end)
        else:
            self._zero_bytes(mem, offset, end)
        first = -(-offset >> CHUNK_SHIFT)  # chunks entirely inside the range
        last = end >> CHUNK_SHIFT if end < self.size else -(-end >> CHUNK_SHIFT)
        if first < last:
            used[first:last] = bytes(last - first)

    @staticmethod
    def _zero_bytes(mem: mmap.mmap, start: int, end: int) -> None:
        """Write zeros over [start, end), a bounded buffer at a time."""
        while start < end:
            step = min(len(_ZEROS), end - start)
            mem[start : start + step] = _ZEROS[:step]
            start += step

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        used = self._map
        if used is None:
            raise self._closed()
        end = offset + length
        chunk = offset >> CHUNK_SHIFT
        last = (end - 1) >> CHUNK_SHIFT
        while chunk <= last:
            allocated = used[chunk] != 0
            stop = used.find(b"\x00" if allocated else b"\x01", chunk, last + 1)
            stop = last + 1 if stop < 0 else stop
            start = chunk << CHUNK_SHIFT
            yield Extent(
                start, (stop << CHUNK_SHIFT) - start, ExtentFlag.DATA if allocated else _HOLE
            )
            chunk = stop

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
        for mapping in (self._mem, self._map):
            if mapping is not None:
                # BufferError: a reply still holds a view of the memory; it is unmapped
                # when that view goes.
                with contextlib.suppress(BufferError):
                    mapping.close()
        self._mem = self._map = self._view = None
