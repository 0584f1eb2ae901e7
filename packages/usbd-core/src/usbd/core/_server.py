"""Listening for NBD clients: accept, negotiate under a deadline, hand over to the engine.

The accept loop is trio's own :func:`trio.serve_listeners` rather than a hand-written one:
it already does everything this server needs (one accept task per listener, riding out
EMFILE/ENFILE/ENOMEM/ENOBUFS with a logged 100 ms pause, closing the listeners on exit,
closing a connection's stream when its handler ends, reporting the listeners through
``task_status``), so there is no copy of it here to keep in step. :meth:`Server.serve` is
started with ``nursery.start`` and reports the listeners it serves, so a caller (or a test)
binding port 0 learns the address. Connections run in serve_listeners' own nursery, so
cancelling :meth:`Server.serve` ends them too. A connection's troubles (bad handshake,
reset, protocol errors) close that connection only: :meth:`Server.handle` never raises for
what the client does, and what clients do wrong is logged through :class:`PeerLog`, rate-limited.

:class:`Limits` says how much clients get. Connections are counted from accept to close over
every listener (the kernel's never pass through here); one over ``max_connections`` gets a
:class:`Refusal` (every option answered ERR_POLICY with the reason) instead of the handshake.
"""

from __future__ import annotations

import errno
import gc
import itertools
import logging
import os
import socket
import stat
import time
from collections.abc import Sequence

import trio

from ._engine import Connection
from ._errors import ProtocolError
from ._export import Export
from ._handshake import Handshake, Negotiated
from ._limits import Limits
from ._peerlog import PeerLog
from ._refusal import Refusal
from ._tls import ServerTLS, TLSTransport
from ._transmission import Session
from ._transport import SocketTransport, TransportClosed

__all__ = ["Server", "open_tcp_listeners", "open_unix_listener", "session_for"]

log = logging.getLogger("usbd.core.server")


def session_for(export: Export, negotiated: Negotiated | None = None) -> Session:
    """The session for a connection on ``export``; without a handshake (the kernel) it is
    simple replies only."""
    info = export.info
    return Session(
        size=info.size,
        flags=info.flags if negotiated is None else negotiated.flags,
        structured_replies=negotiated is not None and negotiated.structured_replies,
        base_allocation=negotiated is not None and negotiated.base_allocation,
        min_block=info.min_block,
        max_payload=info.max_payload,
    )


class _Collector:
    """Full garbage collections, rate-limited for the whole process (see Server._collect)."""

    def __init__(self) -> None:
        self._next = 0.0

    def maybe_collect(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        gc.collect()
        done = time.monotonic()
        self._next = done + max(1.0, 100 * (done - now))


_collector = _Collector()


class Server:
    """Serves exports to NBD clients over any number of listeners."""

    def __init__(
        self,
        exports: Sequence[Export],
        *,
        default_export: str | None = None,
        handshake_timeout: float | None = None,
        limits: Limits | None = None,
        tls: ServerTLS | None = None,
    ) -> None:
        if not exports:
            raise ValueError("a server needs at least one export")
        self.exports = {export.name: export for export in exports}
        if len(self.exports) != len(exports):
            raise ValueError("export names must be unique")
        self.default_export = default_export if default_export is not None else exports[0].name
        self.limits = limits = limits or Limits()
        self.handshake_timeout = (
            handshake_timeout if handshake_timeout is not None else limits.handshake_timeout
        )
        #: Peers' misbehaviour (failed handshakes, refusals, ...): logged rate-limited.
        self.peer_log = PeerLog(log)
        self.active = 0  # connections served now: handshaking or transmitting
        self.served = 0  # connections ever admitted
        self.refused = 0  # connections ever refused for the limit
        self._refusing = 0
        #: NBD_OPT_STARTTLS on offer (or required); the TLS handshake runs under the same
        #: deadline as the rest of the negotiation.
        self.tls = tls
        self._ids = itertools.count(1)

    async def serve(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[Sequence[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on every listener until cancelled; then close the listeners.

        Connections are handled in a nursery inside this call: cancelling it ends them."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.peer_log.run)
            await trio.serve_listeners(
                self._handle_stream, list(listeners), task_status=task_status
            )

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        limit = self.limits.max_connections
        if limit and self.active >= limit:  # over every listener together
            await self._refuse(stream.socket)
            return
        self.active += 1
        self.served += 1
        try:
            await self.handle(stream.socket)
        finally:
            self.active -= 1

    async def _refuse(self, sock: trio.socket.SocketType) -> None:
        """Tell a client over the limit why it is refused (see :mod:`._refusal`), briefly;
        with too many refusals under way already, close at once."""
        self.refused += 1
        limit = self.limits.max_connections
        self.peer_log.event(
            "refused connections",
            logging.WARNING,
            "%s: refused: %d connections already (--max-connections)",
            _peer(sock),
            limit,
        )
        transport = SocketTransport(sock)
        if self._refusing >= self.limits.max_refusing:
            transport.close()
            return
        self._refusing += 1
        refusal = Refusal(f"server busy: too many connections (limit {limit}); try again later")
        try:
            with trio.move_on_after(self.limits.refusal_timeout):
                await transport.send([refusal.start()])
                buffer = memoryview(bytearray(4096))
                while not refusal.finished:
                    received = await transport.recv_into(buffer)
                    if not received:
                        break
                    reply = refusal.receive_data(bytes(buffer[:received]))
                    if reply:
                        await transport.send([reply])
        except TransportClosed:
            pass
        finally:
            self._refusing -= 1
            transport.close()

    async def handle(self, sock: trio.socket.SocketType) -> None:
        """Negotiate with one client and serve it; never raises for what the client does."""
        name = f"client {next(self._ids)}"
        transport = SocketTransport(sock)
        try:
            with trio.move_on_after(self.handshake_timeout) as deadline:
                negotiated, leftover, transport = await self._negotiate(transport, name)
            if deadline.cancelled_caught:
                self.peer_log.event(
                    "handshake timeouts",
                    logging.WARNING,
                    "%s: handshake not finished within %s s",
                    name,
                    self.handshake_timeout,
                )
                return
            if negotiated is None:
                return
            export = self.exports[negotiated.export.name]
            self.peer_log.event(
                "connections", logging.INFO, "%s: serving export %r", name, export.name
            )
            connection = Connection(
                transport,
                export,
                session_for(export, negotiated),
                initial=leftover,
                name=name,
                idle_timeout=self.limits.idle_timeout,
                peer_log=self.peer_log,
            )
            await connection.serve()
        except ProtocolError as exc:
            self.peer_log.event(
                "handshake failures", logging.WARNING, "%s: handshake failed: %s", name, exc
            )
        except TransportClosed as exc:
            self.peer_log.event(
                "clients gone during the handshake",
                logging.INFO,
                "%s: went away during the handshake: %s",
                name,
                exc,
            )
        finally:
            transport.close()
            log.debug("%s: closed", name)
            self._collect()

    def _collect(self) -> None:
        """Collect garbage after a connection ends, taking at most 1% of the time.

        A connection that ended on an error can stay in a reference cycle (the traceback's
        frames hold it, and through it the replies it had queued): a few objects holding
        megabytes each, too few for the collector's own thresholds to notice. Under the
        network fuzzer usbd-filedisk held gigabytes of them. A full collection costs what
        the process's heap holds (milliseconds in a daemon, a second in a test run), so
        the next one waits 100 times as long as the last took, and at least a second: once per
        process (:data:`_collector`), however many servers it runs (a test run makes one per
        case)."""
        _collector.maybe_collect()

    async def _negotiate(
        self, transport: SocketTransport, name: str
    ) -> tuple[Negotiated | None, bytes, SocketTransport]:
        """Negotiate; the transport returned is the one to serve on (TLS after STARTTLS)."""
        tls = self.tls
        handshake = Handshake(
            [e.info for e in self.exports.values()],
            self.default_export,
            tls="off" if tls is None else tls.mode,
        )
        await transport.send([handshake.start()])
        buffer = bytearray(64 * 1024)
        view = memoryview(buffer)
        while not handshake.finished:
            received = await transport.recv_into(view)
            if not received:
                self.peer_log.event(
                    "clients gone during the handshake",
                    logging.INFO,
                    "%s: disconnected during the handshake",
                    name,
                )
                return None, b"", transport
            reply = handshake.receive_data(bytes(view[:received]))
            if reply:
                await transport.send([reply])
            if handshake.starttls:
                assert tls is not None
                # The same socket from here on: a TLS transport over it takes its place.
                secure = TLSTransport(transport.socket, tls.context)
                transport = secure
                await secure.handshake()
                log.debug("%s: TLS started (%s, %s)", name, secure.version, secure.cipher)
                handshake.tls_started()
        return handshake.result, handshake.leftover, transport


def _peer(sock: trio.socket.SocketType) -> str:
    """Who connected, for a log line: host:port, or the unix socket's path."""
    try:
        address = sock.getpeername()
    except OSError:
        return "a client"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return f"a client on {sock.getsockname() or 'a unix socket'}"


async def open_tcp_listeners(host: str | None, port: int) -> list[trio.SocketListener]:
    return await trio.open_tcp_listeners(port, host=host)


async def open_unix_listener(
    path: str | os.PathLike[str], *, mode: int = 0o600
) -> trio.SocketListener:
    """Listen on a unix socket; a stale socket file left by a dead server is replaced.

    The socket gets ``mode`` whatever the umask (connecting takes write permission, so
    0600 lets this user alone in). It is set between bind and listen: until listen, a
    connect is refused, so nobody gets in under the umask's mode meanwhile."""
    path = os.fspath(path)
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            _remove_if_stale(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def _remove_if_stale(path: str) -> None:
    """Remove a socket file nobody answers on; refuse to steal one a live server holds."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another server is listening on {path}")
