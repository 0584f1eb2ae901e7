"""What direct I/O (``O_DIRECT``) needs: aligned buffers, and a lock for read-modify-write.

With ``O_DIRECT`` every transfer's file offset, length and memory address must be multiples
of the storage's logical block size. :data:`ALIGN` (4 KiB) is a multiple of every logical
block size in common use (512 and 4096 bytes), and anonymous ``mmap`` memory is page aligned,
so both hold without asking the file system (Python has no ``statx`` for ``STATX_DIOALIGN``).

Clients may still write any byte range (NBD's minimum block size stays 1, as the device
contract and the original project's suite require): a write that starts or ends inside a
block reads the edge blocks, patches them and writes whole blocks back. Two such writes
into the same block at once would each write back the other's old bytes, and so would one
that raced an aligned write or an ``fallocate`` over that block: :class:`SharedLock` lets
aligned writes and ``fallocate`` calls run together (the kernel orders those) and gives a
read-modify-write the file to itself.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ALIGN", "SharedLock", "aligned_buffer", "round_down", "round_up"]

ALIGN = 4096


def round_down(offset: int) -> int:
    return offset - offset % ALIGN


def round_up(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def aligned_buffer(size: int) -> mmap.mmap:
    """``size`` bytes of page-aligned memory, unmapped when the last reference goes."""
    return mmap.mmap(-1, size)


class SharedLock:
    """A readers-writer lock for threads, in which waiting exclusive holders go first (a
    stream of aligned writes must not starve an unaligned one)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            while self._exclusive or self._waiting:
                self._changed.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._changed:
                self._shared -= 1
                if not self._shared:
                    self._changed.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._changed:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._changed.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._changed:
                self._exclusive = False
                self._changed.notify_all()
