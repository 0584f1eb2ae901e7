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
what the client does.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import stat
from collections.abc import Sequence

import trio

from ._engine import Connection
from ._errors import ProtocolError
from ._export import Export
from ._handshake import Handshake, Negotiated
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


class Server:
    """Serves exports to NBD clients over any number of listeners."""

    def __init__(
        self,
        exports: Sequence[Export],
        *,
        default_export: str | None = None,
        handshake_timeout: float = 30.0,
    ) -> None:
        if not exports:
            raise ValueError("a server needs at least one export")
        self.exports = {export.name: export for export in exports}
        if len(self.exports) != len(exports):
            raise ValueError("export names must be unique")
        self.default_export = default_export if default_export is not None else exports[0].name
        self.handshake_timeout = handshake_timeout
        self._ids = itertools.count(1)

    async def serve(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[Sequence[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on every listener until cancelled; then close the listeners.

        Connections are handled in a nursery inside this call: cancelling it ends them."""
        await trio.serve_listeners(self._handle_stream, list(listeners), task_status=task_status)

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        await self.handle(stream.socket)

    async def handle(self, sock: trio.socket.SocketType) -> None:
        """Negotiate with one client and serve it; never raises for what the client does."""
        name = f"client {next(self._ids)}"
        transport = SocketTransport(sock)
        try:
            with trio.move_on_after(self.handshake_timeout) as deadline:
                negotiated, leftover = await self._negotiate(transport, name)
            if deadline.cancelled_caught:
                log.warning("%s: handshake not finished within %s s", name, self.handshake_timeout)
                return
            if negotiated is None:
                return
            export = self.exports[negotiated.export.name]
            log.info("%s: serving export %r", name, export.name)
            connection = Connection(
                transport, export, session_for(export, negotiated), initial=leftover, name=name
            )
            await connection.serve()
        except ProtocolError as exc:
            log.warning("%s: handshake failed: %s", name, exc)
        except TransportClosed as exc:
            log.info("%s: went away during the handshake: %s", name, exc)
        finally:
            transport.close()
            log.debug("%s: closed", name)

    async def _negotiate(
        self, transport: SocketTransport, name: str
    ) -> tuple[Negotiated | None, bytes]:
        handshake = Handshake([e.info for e in self.exports.values()], self.default_export)
        await transport.send([handshake.start()])
        buffer = bytearray(64 * 1024)
        view = memoryview(buffer)
        while not handshake.finished:
            received = await transport.recv_into(view)
            if not received:
                log.info("%s: disconnected during the handshake", name)
                return None, b""
            reply = handshake.receive_data(bytes(view[:received]))
            if reply:
                await transport.send([reply])
        return handshake.result, handshake.leftover


async def open_tcp_listeners(host: str | None, port: int) -> list[trio.SocketListener]:
    return await trio.open_tcp_listeners(port, host=host)


async def open_unix_listener(path: str | os.PathLike[str]) -> trio.SocketListener:
    """Listen on a unix socket; a stale socket file left by a dead server is replaced."""
    path = os.fspath(path)
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            _remove_if_stale(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
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
