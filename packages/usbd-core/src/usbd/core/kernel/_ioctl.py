"""The nbd driver's ioctl interface (``include/uapi/linux/nbd.h``), for kernels or setups
without its netlink family.

The ioctl way needs a thread of ours to sit in ``NBD_DO_IT`` for as long as the device is
connected; :class:`IoctlDevice` keeps the file descriptor and the calls together.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from ._errors import KernelAttachError

__all__ = ["IoctlDevice"]

NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_CLEAR_QUE = 0xAB05
NBD_SET_SIZE_BLOCKS = 0xAB07
NBD_DISCONNECT = 0xAB08
NBD_SET_TIMEOUT = 0xAB09
NBD_SET_FLAGS = 0xAB0A

#: Signals kept away from the thread in DO_IT: the kernel waits there interruptibly, and a
#: SIGTERM delivered to that thread would tear the device down before we have flushed.
_BLOCKED = set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP}


class IoctlDevice:
    """An open /dev/nbdX configured and run through ioctls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelAttachError(
                exc.errno or errno.EIO, f"cannot open {path}: {exc.strerror}"
            ) from None

    def _ioctl(self, request: int, arg: int, what: str) -> None:
        try:
            fcntl.ioctl(self.fd, request, arg)
        except OSError as exc:
            code = exc.errno or errno.EIO
            if code == errno.EBUSY:
                message = f"{self.path} is busy (already connected)"
            else:
                message = f"{what} on {self.path} failed: {exc.strerror}"
            raise KernelAttachError(code, message) from None

    def configure(
        self, *, size: int, block_size: int, flags: int, timeout: int, fds: Sequence[int]
    ) -> None:
        """Everything before DO_IT. A stale socket from a dead daemon is cleared first."""
        self._ioctl(NBD_SET_BLKSIZE, block_size, "NBD_SET_BLKSIZE")
        self._ioctl(NBD_SET_SIZE_BLOCKS, size // block_size, "NBD_SET_SIZE_BLOCKS")
        self._ioctl(NBD_SET_FLAGS, flags, "NBD_SET_FLAGS")
        self._ioctl(NBD_SET_TIMEOUT, timeout, "NBD_SET_TIMEOUT")
        self._ioctl(NBD_CLEAR_SOCK, 0, "NBD_CLEAR_SOCK")
        for fd in fds:
            self._ioctl(NBD_SET_SOCK, fd, "NBD_SET_SOCK")

    def run(self) -> None:
        """Block in DO_IT until the device is disconnected (call from a worker thread)."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
        try:
            fcntl.ioctl(self.fd, NBD_DO_IT, 0)
        except OSError as exc:
            # After a DISCONNECT we asked for, or a peer that went away, DO_IT reports the
            # socket's end; neither is an error of the run.
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EIO):
                raise KernelAttachError(
                    exc.errno or errno.EIO, f"NBD_DO_IT on {self.path} failed: {exc.strerror}"
                ) from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def disconnect(self) -> None:
        """Ask the kernel to send NBD_CMD_DISC; DO_IT returns once our side shuts down."""
        self._ioctl(NBD_DISCONNECT, 0, "NBD_DISCONNECT")

    def close(self) -> None:
        """Drop the sockets and the queue, then the file descriptor; idempotent."""
        if self.fd < 0:
            return
        for request in (NBD_CLEAR_QUE, NBD_CLEAR_SOCK):
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, request, 0)
        os.close(self.fd)
        self.fd = -1
