"""A small async NBD client, and a way to serve exports to it inside the test's own trio run.

The client is written from the protocol notes, with its own copy of the wire numbers, so that
tests going through the engine do not trust the engine's encoders to describe what it sends.
It does the fixed-newstyle handshake with GO (structured replies and base:allocation when
asked), or none at all (the kernel's way), then READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE
and BLOCK_STATUS. Requests are pipelined: any number of tasks may call it at once; each sends
its request and then helps read replies until its own has arrived, so no background task (and
no nursery) is needed. Every reply is checked: known cookie, chunks inside the request, a
READ covered exactly once, no payload after a simple error reply.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from .._device import Device
from .._engine import Connection
from .._export import Export
from .._server import Server, session_for
from .._transport import SocketTransport

__all__ = [
    "InProcessServer",
    "NbdClient",
    "NbdError",
    "NbdProtocolError",
    "ReadChunk",
    "Reply",
    "serve_in_process",
]

# -- wire numbers (from the protocol notes) ------------------------------------------------

_NBDMAGIC = 0x4E42444D41474943
_IHAVEOPT = 0x49484156454F5054
_OPTION_REPLY_MAGIC = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_MAGIC = 0x67446698
_STRUCTURED_MAGIC = 0x668E33EF

_FIXED_NEWSTYLE, _NO_ZEROES = 1, 2
_OPT_GO, _OPT_STRUCTURED_REPLY, _OPT_SET_META_CONTEXT = 7, 8, 10
_REP_ACK, _REP_INFO, _REP_META_CONTEXT = 1, 3, 4
_REP_ERROR_BIT = 1 << 31
_INFO_EXPORT, _INFO_BLOCK_SIZE = 0, 3

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16

_T_READ_ONLY, _T_SEND_FLUSH, _T_SEND_FUA, _T_SEND_TRIM = 2, 4, 8, 32
_T_SEND_WRITE_ZEROES, _T_CAN_MULTI_CONN, _T_SEND_CACHE, _T_SEND_FAST_ZERO = 64, 256, 1024, 2048

_CHUNK_NONE, _CHUNK_OFFSET_DATA, _CHUNK_OFFSET_HOLE, _CHUNK_BLOCK_STATUS = 0, 1, 2, 5
_CHUNK_ERROR_BIT = 1 << 15
_CHUNK_ERROR_OFFSET = _CHUNK_ERROR_BIT + 2
_DONE = 1

_BASE_ALLOCATION = b"base:allocation"


class NbdError(OSError):
    """The server answered a request with an error; ``errno`` is the NBD error value."""


class NbdProtocolError(Exception):
    """The server broke the protocol, or the connection died: the client is unusable."""


@dataclass(frozen=True)
class ReadChunk:
    """One piece of a structured READ reply: data, or a hole that reads as zeros."""

    offset: int
    length: int
    hole: bool


@dataclass
class Reply:
    """A request and, once :attr:`done`, everything its reply said."""

    command: int
    offset: int
    length: int
    data: bytearray | None = None
    chunks: list[ReadChunk] = field(default_factory=list)
    extents: list[tuple[int, int]] = field(default_factory=list)
    error: int = 0
    message: str = ""
    done: bool = False


class NbdClient:
    """One NBD connection. Make it with :meth:`handshake` or :meth:`without_handshake`."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._send_lock = trio.StrictFIFOLock()
        self._recv_lock = trio.StrictFIFOLock()
        self._cookies = itertools.count(1)
        self._pending: dict[int, Reply] = {}
        self._broken: BaseException | None = None
        self._closed = False
        #: What was negotiated.
        self.size = 0
        self.flags = 0
        self.structured = False
        self.base_allocation_id: int | None = None
        self.min_block = 1
        self.preferred_block = 4096
        self.max_payload = 32 * 1024 * 1024

    # -- making a connection ---------------------------------------------------------------

    @classmethod
    async def handshake(
        cls,
        stream: trio.abc.Stream,
        export_name: str = "",
        *,
        structured: bool = True,
        base_allocation: bool = True,
    ) -> NbdClient:
        """Negotiate with GO; ask for structured replies and base:allocation if wanted."""
        client = cls(stream)
        try:
            await client._negotiate(export_name, structured, base_allocation)
        except BaseException:
            await client.aclose()
            raise
        return client

    @classmethod
    def without_handshake(cls, stream: trio.abc.Stream, *, size: int, flags: int) -> NbdClient:
        """A connection that starts in the transmission phase, as the kernel's does."""
        client = cls(stream)
        client.size = size
        client.flags = flags
        return client

    async def _negotiate(self, name: str, structured: bool, base_allocation: bool) -> None:
        magic, opt, flags = struct.unpack(">QQH", await self._recv_exactly(18))
        if magic != _NBDMAGIC or opt != _IHAVEOPT:
            raise NbdProtocolError(f"bad greeting {magic:#x} {opt:#x}")
        if not flags & _FIXED_NEWSTYLE:
            raise NbdProtocolError("server does not do fixed newstyle")
        await self._send(struct.pack(">I", _FIXED_NEWSTYLE | (flags & _NO_ZEROES)))
        if structured:
            await self._send_option(_OPT_STRUCTURED_REPLY, b"")
            kind, _ = await self._option_reply(_OPT_STRUCTURED_REPLY)
            self.structured = kind == _REP_ACK
        encoded = name.encode()
        if base_allocation and self.structured:
            data = struct.pack(">I", len(encoded)) + encoded + struct.pack(">I", 1)
            data += struct.pack(">I", len(_BASE_ALLOCATION)) + _BASE_ALLOCATION
            await self._send_option(_OPT_SET_META_CONTEXT, data)
            while True:
                kind, body = await self._option_reply(_OPT_SET_META_CONTEXT)
                if kind == _REP_META_CONTEXT:
                    if body[4:] != _BASE_ALLOCATION:
                        raise NbdProtocolError(f"unasked-for meta context {body[4:]!r}")
                    (self.base_allocation_id,) = struct.unpack_from(">I", body)
                elif kind == _REP_ACK or kind & _REP_ERROR_BIT:
                    break
                else:
                    raise NbdProtocolError(f"unexpected reply {kind} to SET_META_CONTEXT")
        data = struct.pack(">I", len(encoded)) + encoded + struct.pack(">HH", 1, _INFO_BLOCK_SIZE)
        await self._send_option(_OPT_GO, data)
        have_export = False
        while True:
            kind, body = await self._option_reply(_OPT_GO)
            if kind == _REP_ACK:
                break
            if kind & _REP_ERROR_BIT:
                raise NbdProtocolError(f"GO refused ({kind:#x}): {body.decode(errors='replace')}")
            if kind != _REP_INFO or len(body) < 2:
                raise NbdProtocolError(f"unexpected reply {kind} to GO")
            (info,) = struct.unpack_from(">H", body)
            if info == _INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", body[2:])
                have_export = True
            elif info == _INFO_BLOCK_SIZE:
                self.min_block, self.preferred_block, self.max_payload = struct.unpack(
                    ">III", body[2:]
                )
        if not have_export:
            raise NbdProtocolError("GO succeeded without NBD_INFO_EXPORT")

    async def _send_option(self, option: int, data: bytes) -> None:
        await self._send(struct.pack(">QII", _IHAVEOPT, option, len(data)) + data)

    async def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, kind, length = struct.unpack(">QIII", await self._recv_exactly(20))
        if magic != _OPTION_REPLY_MAGIC or opt != option:
            raise NbdProtocolError(f"bad option reply: magic {magic:#x}, option {opt}")
        return kind, await self._recv_exactly(length)

    # -- what was negotiated ---------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        return bool(self.flags & _T_READ_ONLY)

    @property
    def can_write(self) -> bool:
        return not self.read_only

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & _T_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return bool(self.flags & _T_SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return bool(self.flags & _T_SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        return bool(self.flags & _T_SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        return bool(self.flags & _T_SEND_FAST_ZERO)

    @property
    def can_cache(self) -> bool:
        return bool(self.flags & _T_SEND_CACHE)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & _T_CAN_MULTI_CONN)

    @property
    def can_block_status(self) -> bool:
        return self.base_allocation_id is not None

    # -- commands --------------------------------------------------------------------------

    async def read(self, offset: int, length: int, *, df: bool = False) -> bytes:
        data, _ = await self.read_chunks(offset, length, df=df)
        return data

    async def read_chunks(
        self, offset: int, length: int, *, df: bool = False
    ) -> tuple[bytes, list[ReadChunk]]:
        """The data, and how the server sent it (one simple reply counts as one data chunk)."""
        pending = await self.request(READ, offset, length, flags=FLAG_DF if df else 0)
        assert pending.data is not None
        chunks = pending.chunks or [ReadChunk(offset, length, hole=False)]
        return bytes(pending.data), sorted(chunks, key=lambda c: c.offset)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        await self.request(WRITE, offset, len(data), flags=FLAG_FUA if fua else 0, payload=data)

    async def flush(self) -> None:
        await self.request(FLUSH)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.request(TRIM, offset, length, flags=FLAG_FUA if fua else 0)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        no_hole: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        flags = (
            (FLAG_NO_HOLE if no_hole else 0)
            | (FLAG_FAST_ZERO if fast else 0)
            | (FLAG_FUA if fua else 0)
        )
        await self.request(WRITE_ZEROES, offset, length, flags=flags)

    async def cache(self, offset: int, length: int) -> None:
        await self.request(CACHE, offset, length)

    async def block_status(
        self, offset: int, length: int, *, req_one: bool = False
    ) -> list[tuple[int, int]]:
        """base:allocation extents from ``offset``, as (length, flags) pairs."""
        pending = await self.request(
            BLOCK_STATUS, offset, length, flags=FLAG_REQ_ONE if req_one else 0
        )
        return pending.extents

    async def request(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes = b"",
    ) -> Reply:
        """Send any request and wait for its whole reply; raise :class:`NbdError` on error.

        Nothing is checked before sending: tests use this to send what a careful client
        would not (out-of-range offsets, unadvertised commands).
        """
        self._check_usable()
        cookie = next(self._cookies)
        pending = Reply(command, offset, length)
        if command == READ:
            pending.data = bytearray(length)
        self._pending[cookie] = pending
        header = struct.pack(">IHHQQI", _REQUEST_MAGIC, flags, command, cookie, offset, length)
        await self._send(header + payload if payload else header)
        await self._wait(pending)
        if pending.error:
            raise NbdError(pending.error, pending.message or f"NBD error {pending.error}")
        return pending

    async def disconnect(self) -> None:
        """Send DISC and close; the server finishes what is in flight, then hangs up."""
        if self._closed:
            return
        try:
            if self._broken is None:
                header = struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, DISC, 0, 0, 0)
                await self._send(header)
                await self._drain_until_eof()
        except (NbdProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the stream without saying goodbye (like a client that crashed)."""
        self._closed = True
        await trio.aclose_forcefully(self._stream)

    # -- the wire --------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise NbdProtocolError("the client is closed")
        if self._broken is not None:
            raise NbdProtocolError(f"the connection is broken: {self._broken!r}")

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except BaseException as exc:
                self._broken = self._broken or exc
                if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
                    raise NbdProtocolError(f"send failed: {exc!r}") from exc
                raise

    async def _recv_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                more = await self._stream.receive_some(max(n - len(self._buf), 1 << 16))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise NbdProtocolError(f"receive failed: {exc!r}") from exc
            if not more:
                raise NbdProtocolError(
                    f"server closed the connection ({len(self._buf)} of {n} bytes)"
                )
            self._buf += more
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def _drain_until_eof(self) -> None:
        """After DISC the server answers what is still in flight, then hangs up."""
        while await self._stream.receive_some(1 << 16):
            pass

    async def _wait(self, pending: Reply) -> None:
        """Read replies (anyone's) until ``pending`` is complete."""
        while not pending.done:
            self._check_usable()
            async with self._recv_lock:
                if _done(pending):  # completed by whoever held the lock before us
                    break
                self._check_usable()
                try:
                    await self._receive_one()
                except BaseException as exc:
                    # A reply half read leaves the stream unusable, for every waiter.
                    self._broken = self._broken or exc
                    raise

    async def _receive_one(self) -> None:
        (magic,) = struct.unpack(">I", await self._recv_exactly(4))
        if magic == _SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", await self._recv_exactly(12))
            pending = self._take(cookie)
            if self.structured and pending.command in (READ, BLOCK_STATUS) and not error:
                raise NbdProtocolError(f"simple reply to command {pending.command}")
            pending.error = error
            if pending.command == READ and not error:
                assert pending.data is not None
                pending.data[:] = await self._recv_exactly(pending.length)
            pending.done = True
            del self._pending[cookie]
            return
        if magic != _STRUCTURED_MAGIC:
            raise NbdProtocolError(f"bad reply magic {magic:#x}")
        if not self.structured:
            raise NbdProtocolError("structured reply that was not negotiated")
        flags, kind, cookie, length = struct.unpack(">HHQI", await self._recv_exactly(16))
        pending = self._take(cookie)
        payload = await self._recv_exactly(length)
        self._chunk(pending, kind, payload)
        if flags & _DONE:
            self._finish(pending)
            del self._pending[cookie]

    def _take(self, cookie: int) -> Reply:
        pending = self._pending.get(cookie)
        if pending is None:
            raise NbdProtocolError(f"reply for unknown cookie {cookie}")
        return pending

    def _chunk(self, pending: Reply, kind: int, payload: bytes) -> None:
        if kind & _CHUNK_ERROR_BIT:
            if len(payload) < 6:
                raise NbdProtocolError("error chunk too short")
            error, size = struct.unpack_from(">IH", payload)
            if kind == _CHUNK_ERROR_OFFSET and len(payload) != 6 + size + 8:
                raise NbdProtocolError("ERROR_OFFSET chunk of the wrong length")
            if kind != _CHUNK_ERROR_OFFSET and len(payload) != 6 + size:
                raise NbdProtocolError("error chunk of the wrong length")
            if not error:
                raise NbdProtocolError("error chunk with error 0")
            pending.error = error
            pending.message = payload[6 : 6 + size].decode(errors="replace")
            return
        if kind == _CHUNK_NONE:
            if payload:
                raise NbdProtocolError("NONE chunk with a payload")
            return
        if kind in (_CHUNK_OFFSET_DATA, _CHUNK_OFFSET_HOLE):
            if pending.command != READ:
                raise NbdProtocolError(f"read chunk in reply to command {pending.command}")
            if kind == _CHUNK_OFFSET_DATA:
                if len(payload) <= 8:
                    raise NbdProtocolError("OFFSET_DATA chunk without data")
                (offset,) = struct.unpack_from(">Q", payload)
                size = len(payload) - 8
            else:
                if len(payload) != 12:
                    raise NbdProtocolError("OFFSET_HOLE chunk of the wrong length")
                offset, size = struct.unpack(">QI", payload)
                if not size:
                    raise NbdProtocolError("empty OFFSET_HOLE chunk")
            start = offset - pending.offset
            if start < 0 or start + size > pending.length:
                raise NbdProtocolError(
                    f"chunk {offset}+{size} outside the read {pending.offset}+{pending.length}"
                )
            assert pending.data is not None
            if kind == _CHUNK_OFFSET_DATA:
                pending.data[start : start + size] = payload[8:]
            else:
                pending.data[start : start + size] = bytes(size)
            pending.chunks.append(ReadChunk(offset, size, kind == _CHUNK_OFFSET_HOLE))
            return
        if kind == _CHUNK_BLOCK_STATUS:
            if pending.command != BLOCK_STATUS:
                raise NbdProtocolError(f"block status in reply to command {pending.command}")
            if len(payload) < 12 or (len(payload) - 4) % 8:
                raise NbdProtocolError("BLOCK_STATUS chunk of the wrong length")
            (context,) = struct.unpack_from(">I", payload)
            if context != self.base_allocation_id:
                raise NbdProtocolError(f"block status for unknown context {context}")
            if pending.extents:
                raise NbdProtocolError("two BLOCK_STATUS chunks for one context")
            values = struct.unpack_from(f">{(len(payload) - 4) // 4}I", payload, 4)
            pending.extents = list(zip(values[::2], values[1::2], strict=True))
            if any(length == 0 for length, _ in pending.extents):
                raise NbdProtocolError("zero-length extent")
            return
        raise NbdProtocolError(f"unknown chunk type {kind}")

    @staticmethod
    def _finish(pending: Reply) -> None:
        """A reply is complete: without an error, it must say everything it should."""
        pending.done = True
        if pending.error:
            return
        if pending.command == READ:
            pos = pending.offset
            for chunk in sorted(pending.chunks, key=lambda c: c.offset):
                if chunk.offset != pos:
                    raise NbdProtocolError(
                        f"READ {pending.offset}+{pending.length}: chunks overlap or leave a "
                        f"gap at {pos}"
                    )
                pos += chunk.length
            if pos != pending.offset + pending.length:
                raise NbdProtocolError(f"READ reply covers only up to {pos}")
        elif pending.command == BLOCK_STATUS and not pending.extents:
            raise NbdProtocolError("BLOCK_STATUS reply without extents")


def _done(pending: Reply) -> bool:
    return pending.done


# -- serving in-process --------------------------------------------------------------------


class InProcessServer:
    """The engine serving exports over socketpairs, in the caller's nursery.

    :meth:`connect` goes through the real :class:`~usbd.core.Server` (handshake and all);
    :meth:`connect_without_handshake` hands one end straight to a
    :class:`~usbd.core.Connection`, simple replies only, as the kernel would be served.
    """

    def __init__(self, nursery: trio.Nursery, exports: Sequence[Export]) -> None:
        self.exports = list(exports)
        self.server = Server(self.exports)
        self.clients: list[NbdClient] = []
        self._nursery = nursery
        self._live = 0
        self._idle = trio.Event()
        self._idle.set()

    async def connect(
        self, export_name: str = "", *, structured: bool = True, base_allocation: bool = True
    ) -> NbdClient:
        server_end, client_end = trio.socket.socketpair()
        self._spawn(self.server.handle, server_end)
        client = await NbdClient.handshake(
            trio.SocketStream(client_end),
            export_name,
            structured=structured,
            base_allocation=base_allocation,
        )
        self.clients.append(client)
        return client

    async def connect_without_handshake(self, export: Export | None = None) -> NbdClient:
        export = export or self.exports[0]
        server_end, client_end = trio.socket.socketpair()
        connection = Connection(SocketTransport(server_end), export, session_for(export))

        async def serve(sock: trio.socket.SocketType) -> None:
            try:
                await connection.serve()
            finally:
                sock.close()

        self._spawn(serve, server_end)
        client = NbdClient.without_handshake(
            trio.SocketStream(client_end), size=export.size, flags=int(export.flags)
        )
        self.clients.append(client)
        return client

    def _spawn(
        self,
        fn: Callable[[trio.socket.SocketType], Awaitable[None]],
        sock: trio.socket.SocketType,
    ) -> None:
        async def run() -> None:
            try:
                await fn(sock)
            finally:
                self._live -= 1
                if not self._live:
                    self._idle.set()

        self._live += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._nursery.start_soon(run)

    async def disconnect_all(self) -> None:
        """DISC every client, then wait until the server has finished every connection."""
        for client in self.clients:
            await client.disconnect()
        self.clients.clear()
        await self._idle.wait()


@asynccontextmanager
async def serve_in_process(
    *devices: Device | Export, close: bool = True
) -> AsyncIterator[InProcessServer]:
    """Serve devices (or ready-made exports) for the duration of the block.

    On the way out every client disconnects, every connection is left to finish, and (with
    ``close``) every export is closed as a daemon would close it: flushed, then closed once.
    """
    exports = [d if isinstance(d, Export) else Export(d) for d in devices]
    try:
        async with trio.open_nursery() as nursery:
            server = InProcessServer(nursery, exports)
            try:
                yield server
                await server.disconnect_all()
            finally:
                for client in server.clients:
                    await client.aclose()
                nursery.cancel_scope.cancel()
    finally:
        if close:
            with trio.CancelScope(shield=True):
                for export in exports:
                    await export.aclose()
