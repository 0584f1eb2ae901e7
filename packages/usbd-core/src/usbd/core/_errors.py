"""Errors at the boundaries of the engine, and how they become NBD error values."""

from __future__ import annotations

import errno as _errno

from ._constants import Errno

__all__ = ["MAX_MESSAGE", "DeviceError", "ProtocolError", "nbd_errno", "wire_message"]

#: The longest string NBD allows on the wire, error messages included (spec: "Conventions").
MAX_MESSAGE = 4096


class DeviceError(OSError):
    """An operation on a device failed; the client gets an error reply, the connection lives on.

    It is an ``OSError`` so that a device can let the operating system's own errors (from
    ``os.pread``, say) pass through unchanged: both carry an ``errno``. Without one, the
    client sees EIO.
    """

    def __init__(self, code: int | str | None = None, message: str | None = None) -> None:
        if isinstance(code, str) and message is None:
            code, message = None, code
        if code is None:
            code = _errno.EIO
        super().__init__(code, message or _errno.errorcode.get(int(code), "device error"))


class ProtocolError(Exception):
    """The peer broke the protocol in a way that leaves no safe way to continue.

    The connection that raised it is closed; the server and every other connection carry on.
    """


_TO_NBD: dict[int, Errno] = {
    _errno.EPERM: Errno.EPERM,
    _errno.EROFS: Errno.EPERM,
    _errno.EACCES: Errno.EPERM,
    _errno.EIO: Errno.EIO,
    _errno.ENOMEM: Errno.ENOMEM,
    _errno.EINVAL: Errno.EINVAL,
    _errno.ENOSPC: Errno.ENOSPC,
    _errno.EDQUOT: Errno.ENOSPC,
    _errno.EFBIG: Errno.ENOSPC,
    _errno.EOVERFLOW: Errno.EOVERFLOW,
    _errno.ENOTSUP: Errno.ENOTSUP,
    _errno.EOPNOTSUPP: Errno.ENOTSUP,
    _errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(exc: BaseException) -> Errno:
    """Map an exception from a device to the closest value NBD allows; anything else is EIO."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return _TO_NBD.get(code, Errno.EIO)
    return Errno.EIO


def wire_message(message: str) -> bytes:
    """An error message as the bytes NBD allows for a string: UTF-8 without NUL, at most
    :data:`MAX_MESSAGE` bytes. The cut falls on a character boundary (a byte cut can split a
    character and leave invalid UTF-8), and NULs become spaces; messages quote what clients
    and devices said, so any text can reach here."""
    data = message.replace("\0", " ").encode()
    if len(data) <= MAX_MESSAGE:
        return data
    return data[:MAX_MESSAGE].decode("utf-8", "ignore").encode()
