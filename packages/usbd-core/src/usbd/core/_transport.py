"""The byte pipe under a connection: receive into a buffer, send a list of buffers.

The engine needs no more than this, and both ways avoid copies: ``recv_into`` fills the
request buffer in place and ``send`` gathers reply headers and data with one ``sendmsg``.
OS errors become :class:`TransportClosed` here, at the edge.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

import trio

from ._device import BytesLike

__all__ = ["SocketTransport", "TransportClosed"]

_IOV_BATCH = 512  # well under IOV_MAX (1024 on Linux)


class TransportClosed(Exception):
    """The peer went away (reset, broken pipe, or the socket was closed under us)."""


class SocketTransport:
    """A connected trio stream socket (TCP, unix, or one end of a socketpair)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.socket = sock
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def recv_into(self, buffer: memoryview) -> int:
        try:
            return await self.socket.recv_into(buffer)
        except OSError as exc:
            raise TransportClosed(str(exc)) from exc

    async def send(self, chunks: Sequence[BytesLike]) -> None:
        pending: list[BytesLike] = list(chunks)
        try:
            while pending:
                batch = pending[:_IOV_BATCH]
                sent = await self.socket.sendmsg(batch)
                done = 0
                while done < len(batch) and sent >= len(batch[done]):
                    sent -= len(batch[done])
                    done += 1
                del pending[:done]
                if sent:
                    pending[0] = memoryview(pending[0])[sent:]
        except OSError as exc:
            raise TransportClosed(str(exc)) from exc

    def shutdown(self) -> None:
        """Shut both directions down, so that a peer blocked on us (the kernel's DO_IT) returns."""
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise

    def close(self) -> None:
        self.socket.close()
