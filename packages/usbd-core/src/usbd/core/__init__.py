"""usbd.core: serve block devices written in Python over NBD.

The pieces, from the wire up: a sans-IO protocol layer (:class:`Handshake`,
:class:`RequestBuffer`, :func:`check`), the device interface (:class:`Device`), the engine
that joins them (:class:`Export`, :class:`Connection`) and the network server
(:class:`Server`). Drivers need :class:`Device` and :class:`DeviceError`, declare their
options with the types in :mod:`usbd.core.settings` and register a
:class:`usbd.core.driver.Driver`; daemons add :class:`Server` or :func:`usbd.core.cli.main`.
Shared utilities: sizes (:func:`parse_size`, :func:`format_size`) and AES keys
(:func:`load_key`).
"""

from ._constants import (
    DEFAULT_MAX_PAYLOAD,
    Command,
    CommandFlag,
    Errno,
    ExtentFlag,
    Option,
    Reply,
    TransmissionFlag,
)
from ._device import BytesLike, Device, Extent, Fua
from ._engine import Connection
from ._errors import DeviceError, ProtocolError, nbd_errno
from ._execution import ContractError, Execution, FastPath
from ._export import Export
from ._handshake import ExportInfo, Handshake, Negotiated
from ._keys import KeySourceError, check_key_spec, describe_key_spec, load_key
from ._server import Server, open_tcp_listeners, open_unix_listener, session_for
from ._sizes import format_size, parse_size
from ._transmission import RequestBuffer, Session, check
from ._transport import SocketTransport, TransportClosed
from ._version import __version__

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "BytesLike",
    "Command",
    "CommandFlag",
    "Connection",
    "ContractError",
    "Device",
    "DeviceError",
    "Errno",
    "Execution",
    "Export",
    "ExportInfo",
    "Extent",
    "ExtentFlag",
    "FastPath",
    "Fua",
    "Handshake",
    "KeySourceError",
    "Negotiated",
    "Option",
    "ProtocolError",
    "Reply",
    "RequestBuffer",
    "Server",
    "Session",
    "SocketTransport",
    "TransmissionFlag",
    "TransportClosed",
    "__version__",
    "check",
    "check_key_spec",
    "describe_key_spec",
    "format_size",
    "load_key",
    "nbd_errno",
    "open_tcp_listeners",
    "open_unix_listener",
    "parse_size",
    "session_for",
]
