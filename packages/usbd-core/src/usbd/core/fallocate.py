"""``fallocate(2)`` with a mode, which the standard library does not offer (shared by the drivers
that punch holes: the file disk and the object store's cache).

``os.posix_fallocate`` only reserves space; punching a hole or zeroing a range in place
needs the Linux call's mode argument, so it is called from the C library through ctypes
(which releases the GIL for the call, as the worker threads need).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

__all__ = ["FALLOC_FL_KEEP_SIZE", "FALLOC_FL_PUNCH_HOLE", "FALLOC_FL_ZERO_RANGE", "fallocate"]

#: From <linux/falloc.h>; the same on every architecture.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
# fallocate64 takes a 64-bit off_t on every ABI; plain fallocate is the same symbol on 64-bit
# systems but takes a 32-bit off_t on 32-bit ones.
_call: Callable[[int, int, int, int], int] = getattr(_libc, "fallocate64", None) or _libc.fallocate
_call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]  # type: ignore[attr-defined]
_call.restype = ctypes.c_int  # type: ignore[attr-defined]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(fd, mode, offset, length)``; an ``OSError`` carrying its errno on failure."""
    if _call(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
