"""TLS for NBD clients: the server's context from nbdkit's layout, and a TLS transport.

:class:`TLSTransport` is a :class:`SocketTransport` whose bytes pass through TLS, so the
handshake and the engine's request loop run over it unchanged. It is sans-IO TLS from the
standard library: an :class:`ssl.SSLObject` between two :class:`ssl.MemoryBIO` buffers,
driven over the same non-blocking socket and the same trio waits as the plain transport. No
thread, and no stream wrapper: the engine keeps receiving in place (decrypting straight into
its request buffer) and sending gathered replies (each encrypted into records, the records
leaving in large sends).

:func:`server_context` reads the directory given with ``--tls-certificates`` as nbdkit does:
``server-cert.pem`` and ``server-key.pem``, and with ``--tls-verify-peer`` ``ca-cert.pem``
(client certificates must be signed by it) and, if present, ``ca-crl.pem``. Problems are found
at start-up, before anything is served, as one line naming the flag (:class:`TLSConfigError`);
no message ever holds key material.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import trio

from ._device import BytesLike
from ._errors import ProtocolError
from ._handshake import TLSMode
from ._transmission import new_storage
from ._transport import SocketTransport, TransportClosed

__all__ = [
    "PSK_SUPPORTED",
    "ServerTLS",
    "TLSConfigError",
    "TLSTransport",
    "read_psk_file",
    "server_context",
    "server_tls",
]

#: Ciphertext taken from the socket per receive.
_RAW_CHUNK = 256 * 1024
#: Plaintext encrypted before the records are sent: bounds what a large reply holds twice.
_SEND_SLICE = 1 << 20
_JOIN_BELOW = 64 * 1024
#: Python 3.13 added PSK callbacks to ssl; older versions cannot serve --tls-psk.
PSK_SUPPORTED = hasattr(ssl.SSLContext, "set_psk_server_callback")

CA_CERT, SERVER_CERT, SERVER_KEY, CA_CRL = (
    "ca-cert.pem",
    "server-cert.pem",
    "server-key.pem",
    "ca-crl.pem",
)


class TLSConfigError(ValueError):
    """The TLS settings cannot work: one line, ``-flag: what is wrong``."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"-{flag}: {message}")
        self.flag = flag


@dataclass(frozen=True)
class ServerTLS:
    """How the server offers TLS: ``on`` (the client may upgrade) or ``require``."""

    mode: Literal["on", "require"]
    context: ssl.SSLContext


def _no_passphrase() -> bytes:
    # An encrypted key would otherwise make OpenSSL prompt on the terminal.
    raise TLSConfigError(
        "tls-certificates", f"{SERVER_KEY} is encrypted; use a key without a passphrase"
    )


def _readable(flag: str, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise TLSConfigError(flag, f"cannot read {path}: {exc.strerror or exc}") from None


def server_context(certificates: Path, *, verify_peer: bool = False) -> ssl.SSLContext:
    """The server's context: TLS 1.2 or later, the certificate and key in ``certificates``,
    and with ``verify_peer`` client certificates required and checked against its CA."""
    flag = "tls-certificates"
    if not certificates.is_dir():
        raise TLSConfigError(
            flag,
            f"{certificates} is not a directory (expected one holding "
            f"{SERVER_CERT} and {SERVER_KEY})",
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A TLS 1.2 client could otherwise renegotiate again and again, at the server's cost.
    context.options |= ssl.OP_NO_RENEGOTIATION
    cert, key = certificates / SERVER_CERT, certificates / SERVER_KEY
    for path in (cert, key):
        _readable(flag, path)
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            flag, f"{cert} and {key} are not a PEM certificate and its private key ({_reason(exc)})"
        ) from None
    if verify_peer:
        ca, crl = certificates / CA_CERT, certificates / CA_CRL
        _readable("tls-verify-peer", ca)
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise TLSConfigError(
                "tls-verify-peer", f"{ca} is not a PEM CA certificate ({_reason(exc)})"
            ) from None
        if crl.exists():
            try:
                context.load_verify_locations(cafile=crl)
            except ssl.SSLError as exc:
                raise TLSConfigError(
                    flag, f"{crl} is not a PEM revocation list ({_reason(exc)})"
                ) from None
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_tls(
    mode: TLSMode,
    certificates: Path | None,
    *,
    verify_peer: bool = False,
    psk: Path | None = None,
) -> ServerTLS | None:
    """The TLS the settings ask for (None for ``off``), or :class:`TLSConfigError`."""
    if psk is not None and not PSK_SUPPORTED:
        raise TLSConfigError(
            "tls-psk",
            "pre-shared keys need Python 3.13 or later (ssl has no PSK support here); "
            "use --tls-certificates",
        )
    if mode == "off":
        for name, given in (
            ("tls-certificates", certificates),
            ("tls-verify-peer", verify_peer),
            ("tls-psk", psk),
        ):
            if given:
                raise TLSConfigError(name, "needs --tls=on or --tls=require")
        return None
    if psk is not None:
        return ServerTLS(mode, psk_context(read_psk_file(psk)))
    if certificates is None:
        raise TLSConfigError("tls", f"--tls={mode} needs --tls-certificates DIR")
    return ServerTLS(mode, server_context(certificates, verify_peer=verify_peer))


def read_psk_file(path: Path) -> dict[str, bytes]:
    """nbdkit's (GnuTLS's) PSK file: ``username:hexkey`` lines. Errors name the line, never
    what it holds."""
    flag = "tls-psk"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise TLSConfigError(flag, f"cannot read {path}: {reason or exc}") from None
    keys: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        username, colon, hexkey = line.strip().partition(":")
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            key = b""
        if not colon or not username or not key:
            raise TLSConfigError(flag, f"{path} line {number}: expected username:hexkey")
        keys[username] = key
    if not keys:
        raise TLSConfigError(flag, f"{path} holds no username:hexkey line")
    return keys


def psk_context(keys: dict[str, bytes]) -> ssl.SSLContext:  # pragma: no cover (3.13+)
    """A context that authenticates clients by pre-shared key (Python 3.13+): TLS 1.2 PSK
    ciphers, as the ssl documentation's own example sets it up."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("PSK")

    def lookup(identity: str | None) -> bytes:
        return keys.get(identity or "", b"")  # an unknown user fails the handshake

    context.set_psk_server_callback(lookup)  # type: ignore[attr-defined,unused-ignore]
    return context


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason, readable: "certificate verify failed: certificate revoked"."""
    reason = str(exc.reason or exc.strerror or exc).lower().replace("_", " ")
    detail = getattr(exc, "verify_message", None)  # ssl.SSLCertVerificationError's
    return f"{reason}: {detail}" if detail else reason


class TLSTransport(SocketTransport):
    """TLS over a connected stream socket, server side; call :meth:`handshake` first.

    The socket may have carried plaintext before (STARTTLS): the TLS session starts with the
    next byte the peer sends.
    """

    def __init__(
        self, sock: trio.socket.SocketType | socket.socket, context: ssl.SSLContext
    ) -> None:
        super().__init__(sock)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        # Mapped like the request buffers: resident only once ciphertext arrives in it (a
        # bytearray is zero-filled, 256 KiB per idle connection).
        self._raw = new_storage(_RAW_CHUNK)
        self._raw_view = memoryview(self._raw)
        #: Set while one task sends records; others wait for it (see :meth:`_flush`).
        self._flushing: trio.Event | None = None

    @property
    def version(self) -> str | None:
        return self._tls.version()

    @property
    def cipher(self) -> str | None:
        cipher = self._tls.cipher()
        return cipher[0] if cipher else None

    async def handshake(self) -> None:
        """Run the TLS handshake; a peer that fails it (a certificate refused either way, not
        TLS at all) is a :class:`ProtocolError`, one that leaves :class:`TransportClosed`."""
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                received = await self._fill()
                if not received:
                    raise TransportClosed("closed during the TLS handshake") from None
                continue
            except ssl.SSLError as exc:
                # Tell the peer why (the alert OpenSSL queued), then give up.
                with contextlib.suppress(TransportClosed):
                    self._flush_nowait()
                raise ProtocolError(f"TLS handshake failed: {_reason(exc)}") from None
            await self._flush()
            return

    # -- receiving -------------------------------------------------------------------------

    def _decrypt(self, buffer: memoryview) -> int | None:
        """Plaintext from the records already received: a count, 0 at the end of the
        stream, or None when a whole record has yet to arrive."""
        total, size = 0, len(buffer)
        tls = self._tls
        while total < size:
            try:
                # With a buffer, read() returns a count (typeshed says bytes).
                got = cast(int, tls.read(size - total, buffer[total:]))  # type: ignore[arg-type,unused-ignore]
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # close_notify, or the socket closed without one: either way, the end.
                return total
            except ssl.SSLError as exc:
                raise ProtocolError(f"TLS: {_reason(exc)}") from None
            if not got:
                return total
            total += got
        return total or None

    def _take(self) -> int | None:
        """Ciphertext from the socket into the TLS object, without waiting: its length, 0
        at the end of the stream, or None if nothing is there."""
        try:
            received = self.socket.recv_into(self._raw_view)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise TransportClosed(str(exc) or type(exc).__name__) from exc
        if received:
            self._incoming.write(self._raw_view[:received])
        else:
            self._incoming.write_eof()
        return received

    async def _fill(self) -> int:
        while True:
            received = self._take()
            if received is not None:
                return received
            await trio.lowlevel.wait_readable(self.socket)

    async def recv_into(
        self, buffer: memoryview, before_wait: Callable[[], object] | None = None
    ) -> int:
        # Every wait comes before plaintext is taken, never after: a caller's deadline
        # (--idle-timeout) cancelling one then would drop what was decrypted.
        await self._tick()
        while True:
            # Records a read produced (an alert refusing renegotiation, say) go out here,
            # unless another task is sending: its flush sends them after its own, rather
            # than ours landing in the middle of one of its records.
            if self._outgoing.pending and self._flushing is None:
                await self._flush()
            got = self._decrypt(buffer)
            if got is not None:
                return got
            if self._take() is None:
                if before_wait is not None:
                    before_wait()
                    before_wait = None
                await trio.lowlevel.wait_readable(self.socket)

    def try_recv_into(self, buffer: memoryview) -> int | None:
        got = self._decrypt(buffer)
        if got is not None:
            return got
        if self._take() is None:
            return None
        return self._decrypt(buffer)

    # -- sending ---------------------------------------------------------------------------

    async def send(self, chunks: Sequence[BytesLike]) -> None:
        if len(chunks) > 1 and sum(map(len, chunks)) <= _JOIN_BELOW:
            chunks = [b"".join(chunks)]  # one record rather than one per reply header
        tls, outgoing = self._tls, self._outgoing
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                for start in range(0, len(view), _SEND_SLICE):
                    tls.write(view[start : start + _SEND_SLICE])
                    if outgoing.pending >= _SEND_SLICE:
                        await self._flush()
        except ssl.SSLError as exc:
            raise ProtocolError(f"TLS: {_reason(exc)}") from None
        await self._flush()
        await self._tick()

    async def _flush(self) -> None:
        """Send every record the TLS object has produced.

        One task at a time: a record is sent whole before the next starts, so a second
        caller (the receive loop while a task sends a reply) waits for the first to finish
        rather than putting its bytes in the middle of a record."""
        while self._flushing is not None:
            await self._flushing.wait()
        if not self._outgoing.pending:
            return
        done = self._flushing = trio.Event()
        sock = self.socket
        try:
            while self._outgoing.pending:
                view = memoryview(self._outgoing.read())
                while view:
                    try:
                        sent = sock.send(view)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                        continue
                    view = view[sent:]
        except OSError as exc:
            raise TransportClosed(str(exc) or type(exc).__name__) from exc
        finally:
            self._flushing = None
            done.set()

    def _flush_nowait(self) -> None:
        """Send what fits now (an alert, a close_notify) and drop the rest."""
        data = self._outgoing.read()
        if data:
            try:
                self.socket.send(data)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise TransportClosed(str(exc) or type(exc).__name__) from exc

    def shutdown(self) -> None:
        """Close the TLS session (close_notify, as the spec asks on NBD_CMD_DISC), then the
        socket both ways."""
        with contextlib.suppress(ssl.SSLError, ValueError, TransportClosed):
            with contextlib.suppress(ssl.SSLWantReadError):
                self._tls.unwrap()
            self._flush_nowait()
        super().shutdown()
