"""The byte pipe under a connection: receive into a buffer, send a list of buffers.

The engine needs no more than this, and both ways avoid copies: ``recv_into`` fills the
request buffer in place and ``send`` gathers reply headers and data with one ``sendmsg``.

The transport drives a non-blocking standard-library socket itself and waits through
``trio.lowlevel`` only when the socket would block. trio's socket methods yield to the
scheduler after every successful call; on a connection that always has data waiting that is
most of the cost of a small request. Here a checkpoint (cancellation and fairness to other
tasks) comes every :data:`CHECKPOINT_EVERY` calls instead, and at every wait.
OS errors become :class:`TransportClosed` here, at the edge.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Sequence

import trio

from ._device import BytesLike

__all__ = ["CHECKPOINT_EVERY", "SocketTransport", "TransportClosed"]

_IOV_BATCH = 512
_JOIN_BELOW = 256 * 1024  # well under IOV_MAX (1024 on Linux)
#: Successful socket calls between two scheduler checkpoints.
CHECKPOINT_EVERY = 64
#: Send buffer asked for: a 1 MiB read reply then leaves in one call instead of five.
#: The kernel caps it at net.core.wmem_max.
_SNDBUF = 4 << 20


class TransportClosed(Exception):
    """The peer went away (reset, broken pipe, or the socket was closed under us)."""


class SocketTransport:
    """A connected stream socket (TCP, unix, or one end of a socketpair).

    It takes the socket over: a trio socket given to it is detached (and is closed from then
    on), and :meth:`close` closes the descriptor.
    """

    def __init__(self, sock: trio.socket.SocketType | socket.socket) -> None:
        if not isinstance(sock, socket.socket):
            sock = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        sock.setblocking(False)
        self.socket = sock
        self._calls = 0
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def _tick(self) -> None:
        self._calls += 1
        if self._calls >= CHECKPOINT_EVERY:
            self._calls = 0
            await trio.lowlevel.checkpoint()

    async def recv_into(
        self, buffer: memoryview, before_wait: Callable[[], object] | None = None
    ) -> int:
        """Receive what is there, waiting if nothing is; ``before_wait`` is called (once)
        when it has to wait."""
        sock = self.socket
        # The checkpoint comes before anything is taken off the socket, never after: a
        # caller's deadline (--idle-timeout) cancelling it then would drop what was received.
        await self._tick()
        try:
            while True:
                try:
                    return sock.recv_into(buffer)
                except BlockingIOError:
                    if before_wait is not None:
                        before_wait()
                        before_wait = None
                    await trio.lowlevel.wait_readable(sock)
        except OSError as exc:
            raise TransportClosed(str(exc) or type(exc).__name__) from exc

    def try_recv_into(self, buffer: memoryview) -> int | None:
        """Receive what is already there without waiting: None if nothing is.

        End of stream is 0 as with :meth:`recv_into`; the caller sees it on its next wait.
        """
        try:
            return self.socket.recv_into(buffer)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise TransportClosed(str(exc) or type(exc).__name__) from exc

    async def send(self, chunks: Sequence[BytesLike]) -> None:
        sock = self.socket
        if len(chunks) > 2:
            total = sum(map(len, chunks))
            if total <= _JOIN_BELOW:
                chunks = [b"".join(chunks)]
        pending: list[BytesLike] = list(chunks)
        try:
            while pending:
                batch = pending[:_IOV_BATCH]
                try:
                    sent = sock.sendmsg(batch)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    continue
                done = 0
                while done < len(batch) and sent >= len(batch[done]):
                    sent -= len(batch[done])
                    done += 1
                del pending[:done]
                if sent:
                    pending[0] = memoryview(pending[0])[sent:]
            await self._tick()
        except OSError as exc:
            raise TransportClosed(str(exc) or type(exc).__name__) from exc

    def shutdown(self) -> None:
        """Shut both directions down, so that a peer blocked on us (the kernel's DO_IT) returns."""
        # Not connected, already closed or reset: nothing is left to unblock.
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the socket; idempotent. Tasks waiting on it are woken with an error."""
        if self.socket.fileno() >= 0:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
