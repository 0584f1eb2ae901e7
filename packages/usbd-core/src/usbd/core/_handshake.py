"""The server side of NBD's fixed-newstyle handshake, without any I/O.

Feed it the bytes the client sent (:meth:`Handshake.receive_data`); it answers with the bytes
to send back. When :attr:`Handshake.finished` turns true, :attr:`Handshake.result` holds what
was negotiated (or ``None`` when the client aborted) and :attr:`Handshake.leftover` any bytes
that already belong to the transmission phase. A client that breaks the protocol beyond
repair raises :class:`ProtocolError`; everything it merely got wrong is answered with the
option error the specification names, and the haggling goes on.

TLS (``tls="on"`` or ``"require"``): once NBD_OPT_STARTTLS is acknowledged,
:attr:`Handshake.starttls` turns true and the handshake takes no more bytes until the I/O
layer has run the TLS handshake on the connection and called :meth:`Handshake.tls_started`;
from then on it is fed the decrypted bytes. With ``"require"`` (the spec's FORCEDTLS) every
option before that but ABORT is refused with NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME,
which cannot be refused, closes the connection: a plaintext client never reaches an export.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ._constants import (
    BASE_ALLOCATION,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_PREFERRED_BLOCK,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    HandshakeFlag,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)
from ._errors import ProtocolError, wire_message

__all__ = ["BASE_ALLOCATION_ID", "ExportInfo", "Handshake", "Negotiated", "TLSMode"]

#: off: no TLS (STARTTLS is unsupported); on: the client may upgrade; require: it must.
TLSMode = Literal["off", "on", "require"]

#: The id we give base:allocation when a client selects it; ids are opaque to clients.
BASE_ALLOCATION_ID = 1
#: Longest option payload we accept. Names are at most 4096 bytes; this leaves room for
#: many meta context queries while keeping a hostile client from making us buffer much.
MAX_OPTION_LENGTH = 64 * 1024
MAX_NAME_LENGTH = 4096

_OPTION_HEADER = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QIII")
# A plain int: ``~`` on an IntFlag stays inside the flag's own bits and would be 0 here.
_KNOWN_CLIENT_FLAGS = int(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)


@dataclass(frozen=True)
class ExportInfo:
    """What a client learns about an export during the handshake."""

    name: str
    size: int
    flags: TransmissionFlag
    description: str = ""
    min_block: int = 1
    preferred_block: int = DEFAULT_PREFERRED_BLOCK
    max_payload: int = DEFAULT_MAX_PAYLOAD


@dataclass(frozen=True)
class Negotiated:
    """The outcome of a successful handshake: the export and the connection's options."""

    export: ExportInfo
    structured_replies: bool = False
    base_allocation: bool = False
    no_zeroes: bool = False

    @property
    def flags(self) -> TransmissionFlag:
        """Transmission flags as sent to this client (DF needs structured replies)."""
        if self.structured_replies:
            return self.export.flags | TransmissionFlag.SEND_DF
        return self.export.flags


class _OptionError(Exception):
    """An option the client got wrong: answered with an error reply, negotiation continues."""

    def __init__(self, reply: Reply, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


@dataclass
class _Reader:
    """Parses option data, turning any shortfall into ERR_INVALID."""

    data: bytes
    pos: int = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _OptionError(Reply.ERR_INVALID, "option data is truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        (value,) = struct.unpack(">H", self.take(2))
        return int(value)

    def u32(self) -> int:
        (value,) = struct.unpack(">I", self.take(4))
        return int(value)

    def string(self, what: str) -> str:
        length = self.u32()
        if length > MAX_NAME_LENGTH:
            raise _OptionError(Reply.ERR_INVALID, f"{what} is longer than {MAX_NAME_LENGTH} bytes")
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise _OptionError(Reply.ERR_INVALID, f"{what} is not valid UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _OptionError(Reply.ERR_INVALID, "option data has trailing bytes")


@dataclass
class Handshake:
    """Negotiation state for one connection.

    ``exports`` are the exports on offer; ``default_export`` names the one a client gets when it
    asks for the empty name (nbdkit and qemu-nbd behave the same way). ``tls`` is the TLS mode
    (see the module's docstring); :attr:`tls_active` says whether TLS has been started.
    """

    exports: Sequence[ExportInfo]
    default_export: str | None = None
    tls: TLSMode = "off"
    starttls: bool = field(default=False, init=False)
    tls_active: bool = field(default=False, init=False)
    result: Negotiated | None = field(default=None, init=False)
    finished: bool = field(default=False, init=False)
    leftover: bytes = field(default=b"", init=False)
    _buffer: bytearray = field(default_factory=bytearray, init=False)
    _client_flags: HandshakeFlag | None = field(default=None, init=False)
    _structured: bool = field(default=False, init=False)
    _meta_export: str | None = field(default=None, init=False)

    def start(self) -> bytes:
        """The server's greeting: the first bytes on a new connection."""
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)

    def receive_data(self, data: bytes) -> bytes:
        """Consume client bytes; return the bytes to send back (possibly empty)."""
        self._check_accepting()
        self._buffer += data
        out = bytearray()
        while not self.finished and not self.starttls:
            if self._client_flags is None:
                if len(self._buffer) < 4:
                    break
                (raw,) = struct.unpack_from(">I", self._buffer)
                del self._buffer[:4]
                if raw & ~_KNOWN_CLIENT_FLAGS:
                    raise ProtocolError(f"client sent unknown handshake flags {raw:#x}")
                self._client_flags = HandshakeFlag(raw)
                continue
            if len(self._buffer) < _OPTION_HEADER.size:
                break
            magic, option, length = _OPTION_HEADER.unpack_from(self._buffer)
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise ProtocolError(f"option {option} data of {length} bytes is too long")
            if len(self._buffer) < _OPTION_HEADER.size + length:
                break
            payload = bytes(self._buffer[_OPTION_HEADER.size : _OPTION_HEADER.size + length])
            del self._buffer[: _OPTION_HEADER.size + length]
            out += self._option(option, payload)
        if self.starttls and self._buffer:
            # Plaintext sent after STARTTLS but before the TLS handshake could have been
            # injected by a man in the middle (nbdkit's CVE-2021-3716): never act on it.
            raise ProtocolError(
                f"client sent {len(self._buffer)} bytes after STARTTLS before the TLS handshake"
            )
        self._keep_leftover()
        return bytes(out)

    def tls_started(self) -> None:
        """The TLS handshake succeeded: negotiate on, over TLS, from a clean slate (the spec:
        no negotiation state from before STARTTLS survives it)."""
        if not self.starttls:
            raise RuntimeError("no STARTTLS was acknowledged")
        self.starttls = False
        self.tls_active = True
        self._structured = False
        self._meta_export = None

    def _check_accepting(self) -> None:
        if self.finished:
            raise RuntimeError("handshake already finished")
        if self.starttls:
            raise RuntimeError("the connection must switch to TLS first (tls_started)")

    def _keep_leftover(self) -> None:
        """Bytes after the final option already belong to the transmission phase."""
        if self.finished:
            self.leftover = bytes(self._buffer)
            self._buffer.clear()

    # -- options ---------------------------------------------------------------------------

    def _option(self, option: int, data: bytes) -> bytes:
        tls_missing = self.tls == "require" and not self.tls_active
        if option == Option.EXPORT_NAME:
            if tls_missing:
                raise ProtocolError("EXPORT_NAME before STARTTLS, and TLS is required")
            return self._export_name(data)
        try:
            if option == Option.ABORT:
                self.finished = True
                return _reply(option, Reply.ACK)
            if option == Option.STARTTLS:
                return self._starttls(data)
            if tls_missing:
                raise _OptionError(Reply.ERR_TLS_REQD, "TLS is required: send STARTTLS first")
            if option == Option.LIST:
                return self._list(data)
            if option in (Option.INFO, Option.GO):
                return self._info(option, data)
            if option == Option.STRUCTURED_REPLY:
                if data:
                    raise _OptionError(Reply.ERR_INVALID, "STRUCTURED_REPLY takes no data")
                self._structured = True
                return _reply(option, Reply.ACK)
            if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
                return self._meta_context(option, data)
            raise _OptionError(Reply.ERR_UNSUP, f"option {option} is not supported")
        except _OptionError as exc:
            return _reply(option, exc.reply, wire_message(exc.message))

    def _starttls(self, data: bytes) -> bytes:
        if self.tls == "off":
            # What the spec asks of a server without TLS (NOTLS mode).
            raise _OptionError(Reply.ERR_UNSUP, "TLS is not enabled on this server")
        if self.tls_active:
            raise _OptionError(Reply.ERR_INVALID, "TLS is already active")
        if data:
            raise _OptionError(Reply.ERR_INVALID, "STARTTLS takes no data")
        self.starttls = True
        return _reply(Option.STARTTLS, Reply.ACK)

    def _lookup(self, name: str) -> ExportInfo:
        wanted = self.default_export if name == "" and self.default_export is not None else name
        for export in self.exports:
            if export.name == wanted:
                return export
        raise _OptionError(Reply.ERR_UNKNOWN, f"no export named {name!r}")

    def _negotiated(self, export: ExportInfo) -> Negotiated:
        return Negotiated(
            export=export,
            structured_replies=self._structured,
            base_allocation=self._structured and self._meta_export == export.name,
            no_zeroes=bool(self._client_flags and self._client_flags & HandshakeFlag.NO_ZEROES),
        )

    def _export_name(self, data: bytes) -> bytes:
        # EXPORT_NAME has no way to report an error: the spec says to close the connection.
        try:
            name = data.decode("utf-8")
            export = self._lookup(name)
        except (UnicodeDecodeError, _OptionError) as exc:
            raise ProtocolError(f"EXPORT_NAME: {exc}") from None
        self.result = self._negotiated(export)
        self.finished = True
        reply = struct.pack(">QH", export.size, int(self.result.flags))
        if not self.result.no_zeroes:
            reply += bytes(124)
        return reply

    def _list(self, data: bytes) -> bytes:
        if data:
            raise _OptionError(Reply.ERR_INVALID, "LIST takes no data")
        out = bytearray()
        for export in self.exports:
            name = export.name.encode()
            body = struct.pack(">I", len(name)) + name + export.description.encode()
            out += _reply(Option.LIST, Reply.SERVER, body)
        out += _reply(Option.LIST, Reply.ACK)
        return bytes(out)

    def _info(self, option: int, data: bytes) -> bytes:
        reader = _Reader(data)
        name = reader.string("export name")
        requests = [reader.u16() for _ in range(reader.u16())]
        reader.end()
        export = self._lookup(name)
        negotiated = self._negotiated(export)
        out = bytearray()
        out += _info(option, Info.EXPORT, struct.pack(">QH", export.size, int(negotiated.flags)))
        for info in dict.fromkeys(requests):  # answer each kind once, in the client's order
            if info == Info.NAME:
                out += _info(option, Info.NAME, export.name.encode())
            elif info == Info.DESCRIPTION and export.description:
                out += _info(option, Info.DESCRIPTION, export.description.encode())
            elif info == Info.BLOCK_SIZE:
                sizes = struct.pack(
                    ">III", export.min_block, export.preferred_block, export.max_payload
                )
                out += _info(option, Info.BLOCK_SIZE, sizes)
        out += _reply(option, Reply.ACK)
        if option == Option.GO:
            self.result = negotiated
            self.finished = True
        return bytes(out)

    def _meta_context(self, option: int, data: bytes) -> bytes:
        if option == Option.SET_META_CONTEXT:
            # A SET replaces every earlier selection, even when it fails (spec).
            self._meta_export = None
        if option == Option.SET_META_CONTEXT and not self._structured:
            raise _OptionError(Reply.ERR_INVALID, "SET_META_CONTEXT needs structured replies first")
        reader = _Reader(data)
        name = reader.string("export name")
        queries = [reader.string("query") for _ in range(reader.u32())]
        reader.end()
        export = self._lookup(name)
        listing = option == Option.LIST_META_CONTEXT
        selected = any(_matches(query, listing) for query in queries) or (listing and not queries)
        out = bytearray()
        if selected:
            context_id = 0 if listing else BASE_ALLOCATION_ID
            body = struct.pack(">I", context_id) + BASE_ALLOCATION.encode()
            out += _reply(option, Reply.META_CONTEXT, body)
        if not listing:
            self._meta_export = export.name if selected else None
        out += _reply(option, Reply.ACK)
        return bytes(out)


def _matches(query: str, listing: bool) -> bool:
    """Does a query select base:allocation? Listing also accepts the namespace wildcard."""
    if query == BASE_ALLOCATION:
        return True
    return listing and query == "base:"


def _reply(option: int, reply: Reply, data: bytes = b"") -> bytes:
    return _REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, int(reply), len(data)) + data


def _info(option: int, info: Info, data: bytes) -> bytes:
    return _reply(option, Reply.INFO, struct.pack(">H", int(info)) + data)
