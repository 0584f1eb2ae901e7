"""Test helpers for usbd-core: a raw NBD client and a few small devices.

The client is written from the protocol notes, independently of the engine's own encoders, so
that a test can send anything byte for byte (bad magic, truncated options, half a request) and
check the server's answer without trusting the code under test to describe it.
"""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from usbd.core import (
    Connection,
    Device,
    DeviceError,
    Export,
    Server,
    SocketTransport,
    open_tcp_listeners,
    open_unix_listener,
    session_for,
)

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

# Options and option replies.
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

# Commands, command flags and errors.
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO = 1, 2, 4, 8, 16
EPERM, EIO, EINVAL, ENOSPC, ENOTSUP = 1, 5, 22, 28, 95

# Transmission flags.
T_HAS_FLAGS, T_READ_ONLY, T_SEND_FLUSH, T_SEND_FUA = 1, 2, 4, 8
T_SEND_TRIM, T_SEND_WRITE_ZEROES, T_SEND_DF, T_SEND_FAST_ZERO = 32, 64, 128, 2048

# Structured reply chunk types.
CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS, CHUNK_ERROR = 1, 2, 5, (1 << 15) + 1
DONE = 1


def request(
    command: int, cookie: int = 0, offset: int = 0, length: int = 0, flags: int = 0
) -> bytes:
    """A 28-byte request header (a WRITE's payload goes after it)."""
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length)


def option(opt: int, data: bytes = b"", magic: int = IHAVEOPT) -> bytes:
    return struct.pack(">QII", magic, opt, len(data)) + data


def info_data(name: str | bytes, *requests: int) -> bytes:
    """Option data of INFO and GO: the export name, then the info types asked for."""
    raw = name.encode() if isinstance(name, str) else name
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(f">H{len(requests)}H", len(requests), *requests)
    )


def meta_data(name: str, *queries: str) -> bytes:
    """Option data of LIST_META_CONTEXT and SET_META_CONTEXT."""
    out = struct.pack(">I", len(name.encode())) + name.encode() + struct.pack(">I", len(queries))
    for query in queries:
        out += struct.pack(">I", len(query.encode())) + query.encode()
    return out


@dataclass
class OptionReply:
    option: int
    reply: int
    data: bytes


@dataclass
class Chunk:
    """One structured reply chunk."""

    flags: int
    type: int
    cookie: int
    payload: bytes


class Closed(Exception):
    """The server closed the connection while the client still expected bytes."""


@dataclass
class RawClient:
    """Speaks NBD one byte string at a time; knows nothing the test does not tell it."""

    stream: trio.abc.Stream
    _buf: bytearray = field(default_factory=bytearray)

    @classmethod
    async def unix(cls, path: str) -> RawClient:
        return cls(await trio.open_unix_socket(path))

    @classmethod
    async def tcp(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                more = await self.stream.receive_some(1 << 20)
            except trio.BrokenResourceError as exc:
                raise Closed("connection reset") from exc
            if not more:
                raise Closed(f"EOF with {len(self._buf)} of {n} bytes")
            self._buf += more
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def closed_by_server(self) -> bool:
        """Read until the server closes; True if it closed without sending anything more."""
        extra = bytearray(self._buf)
        self._buf.clear()
        while True:
            try:
                more = await self.stream.receive_some(1 << 16)
            except trio.BrokenResourceError:
                return not extra
            if not more:
                return not extra
            extra += more

    async def aclose(self) -> None:
        await self.stream.aclose()

    # -- handshake -------------------------------------------------------------------------

    async def greeting(self, client_flags: int = 3) -> int:
        """Read the server's greeting, answer with ``client_flags``; return handshake flags."""
        magic, opt, flags = struct.unpack(">QQH", await self.recv_exactly(18))
        assert magic == NBDMAGIC
        assert opt == IHAVEOPT
        await self.send(struct.pack(">I", client_flags))
        return int(flags)

    async def option_reply(self) -> OptionReply:
        magic, opt, reply, length = struct.unpack(">QIII", await self.recv_exactly(20))
        assert magic == OPT_REPLY_MAGIC
        return OptionReply(opt, reply, await self.recv_exactly(length))

    async def replies_until_final(self) -> list[OptionReply]:
        """Option replies up to and including the final one (ACK or an error)."""
        out: list[OptionReply] = []
        while True:
            reply = await self.option_reply()
            out.append(reply)
            if reply.reply not in (REP_SERVER, REP_INFO, REP_META):
                return out

    async def go(
        self,
        name: str = "",
        *,
        structured: bool = False,
        meta: bool = False,
        greet: bool = True,
    ) -> tuple[int, int]:
        """The handshake up to GO (from the greeting unless ``greet`` is false); returns
        (size, transmission flags)."""
        if greet:
            await self.greeting()
        if structured:
            await self.send(option(OPT_STRUCTURED_REPLY))
            assert (await self.option_reply()).reply == REP_ACK
        if meta:
            await self.send(option(OPT_SET_META, meta_data(name, "base:allocation")))
            replies = await self.replies_until_final()
            assert [r.reply for r in replies] == [REP_META, REP_ACK]
        await self.send(option(OPT_GO, info_data(name)))
        replies = await self.replies_until_final()
        assert replies[-1].reply == REP_ACK, replies
        export = next(r for r in replies if struct.unpack_from(">H", r.data)[0] == INFO_EXPORT)
        size, flags = struct.unpack(">QH", export.data[2:])
        return int(size), int(flags)

    # -- transmission ----------------------------------------------------------------------

    async def simple_reply(self) -> tuple[int, int]:
        """(error, cookie) of the next simple reply."""
        magic, error, cookie = struct.unpack(">IIQ", await self.recv_exactly(16))
        assert magic == SIMPLE_MAGIC, hex(magic)
        return int(error), int(cookie)

    async def chunk(self) -> Chunk:
        magic, flags, kind, cookie, length = struct.unpack(">IHHQI", await self.recv_exactly(20))
        assert magic == STRUCTURED_MAGIC, hex(magic)
        return Chunk(flags, kind, cookie, await self.recv_exactly(length))

    async def call(
        self,
        command: int,
        cookie: int = 1,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
    ) -> int:
        """Send one request (simple replies) and return its error; READ data is checked
        separately with :meth:`read`."""
        await self.send(request(command, cookie, offset, length, flags) + payload)
        error, got = await self.simple_reply()
        assert got == cookie
        return error

    async def read(self, offset: int, length: int, cookie: int = 7) -> bytes:
        await self.send(request(READ, cookie, offset, length))
        error, got = await self.simple_reply()
        assert (error, got) == (0, cookie)
        return await self.recv_exactly(length)

    async def write(self, offset: int, data: bytes, cookie: int = 8, flags: int = 0) -> int:
        return await self.call(WRITE, cookie, offset, len(data), flags, data)


# -- devices ---------------------------------------------------------------------------------


class MemDevice(Device):
    """A bytearray that answers at once on the event loop (the engine's inline path)."""

    blocking = False

    def __init__(self, size: int = 1 << 20) -> None:
        self.size = size
        self.data = bytearray(size)
        self.calls: list[str] = []
        self.closed = 0

    def read(self, offset: int, length: int) -> bytes:
        self._live("read")
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._live("write")
        self.data[offset : offset + len(data)] = data

    def flush(self) -> None:
        self._live("flush")

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._live("trim")

    def close(self) -> None:
        self.closed += 1

    def _live(self, what: str) -> None:
        if self.closed:
            raise DeviceError(errno.ESHUTDOWN, "closed")
        self.calls.append(what)


class ThreadedMemDevice(MemDevice):
    """The same, as a blocking device: run in worker threads, several at once."""

    blocking = True
    parallel = True

    def __init__(self, size: int = 1 << 20) -> None:
        super().__init__(size)
        self.lock = threading.Lock()
        self.threads: set[int] = set()

    def _live(self, what: str) -> None:
        with self.lock:
            self.threads.add(threading.get_ident())
            super()._live(what)


class NullDevice(Device):
    """A large device with no storage: reads are zeros, writes vanish. Cheap at any size."""

    blocking = False

    def __init__(self, size: int = 1 << 30) -> None:
        self.size = size
        self.writes: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.writes.append((offset, len(data)))


class GatedDevice(ThreadedMemDevice):
    """A threaded device whose writes wait until the test opens :attr:`gate`.

    :attr:`events` records the order in which calls start and end, across threads.
    """

    def __init__(self, size: int = 1 << 20) -> None:
        super().__init__(size)
        self.gate = threading.Event()
        self.events: list[str] = []
        self.writes_started = 0

    def _note(self, event: str) -> None:
        with self.lock:
            self.events.append(event)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        with self.lock:
            self.events.append("write-start")
            self.writes_started += 1
        if not self.gate.wait(20):
            raise DeviceError(errno.EIO, "the test never opened the gate")
        super().write(offset, data, fua)
        self._note("write-end")

    def flush(self) -> None:
        super().flush()
        self._note("flush")

    def close(self) -> None:
        self._note("close")
        super().close()


class FailingDevice(MemDevice):
    """Reads of the first 4 KiB fail with EIO; everything else works."""

    def read(self, offset: int, length: int) -> bytes:
        if offset < 4096:
            raise DeviceError("bad sector")
        return super().read(offset, length)


class ThreadedFailingDevice(FailingDevice):
    blocking = True


class AsyncMemDevice(Device):
    """An async-native device: every method a coroutine that yields to the event loop."""

    parallel = True

    def __init__(self, size: int = 1 << 20) -> None:
        self.size = size
        self.data = bytearray(size)
        self.calls: list[str] = []
        self.closed = 0
        self.in_trio = True

    async def _enter(self, what: str) -> None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            self.in_trio = False
        if self.closed:
            raise DeviceError(errno.ESHUTDOWN, "closed")
        self.calls.append(what)
        await trio.lowlevel.checkpoint()

    async def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
        await self._enter("read")
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:  # type: ignore[override]
        payload = bytes(data)  # copy before yielding: the view is valid only during the call
        await self._enter("write")
        self.data[offset : offset + len(payload)] = payload

    async def flush(self) -> None:  # type: ignore[override]
        await self._enter("flush")

    async def trim(self, offset: int, length: int, fua: bool) -> None:  # type: ignore[override]
        await self._enter("trim")
        self.data[offset : offset + length] = bytes(length)

    async def zero(  # type: ignore[override]
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        await self._enter("zero")
        self.data[offset : offset + length] = bytes(length)

    async def close(self) -> None:  # type: ignore[override]
        self.closed += 1


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll until ``predicate`` holds; the caller's ``fail_after`` is the ceiling."""
    while not predicate():
        await trio.sleep(0.005)


def connected(device: Device, **connection_kw: Any) -> tuple[Connection, RawClient]:
    """A Connection (not yet serving) on one end of a socketpair, as the kernel would get it
    (no handshake, simple replies only), and a raw client on the other end: for tests that
    run ``serve`` themselves or reach into the connection."""
    server_sock, client_sock = trio.socket.socketpair()
    export = Export(device)
    connection = Connection(
        SocketTransport(server_sock), export, session_for(export), **connection_kw
    )
    return connection, RawClient(trio.SocketStream(client_sock))


@asynccontextmanager
async def seam(
    device: Device, *, max_in_flight: int = 64 << 20, initial: bytes = b"", **export_kw: Any
) -> AsyncIterator[tuple[RawClient, Export]]:
    """A Connection on one end of a socketpair, as the kernel would get it: no handshake,
    simple replies only. Yields the client end and the export."""
    server_sock, client_sock = trio.socket.socketpair()
    export = Export(device, **export_kw)
    connection = Connection(
        SocketTransport(server_sock),
        export,
        session_for(export),
        max_in_flight=max_in_flight,
        initial=initial,
    )

    async def run() -> None:
        try:
            await connection.serve()
        finally:
            server_sock.close()

    client = RawClient(trio.SocketStream(client_sock))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        try:
            yield client, export
        finally:
            await client.aclose()


@asynccontextmanager
async def serving(
    exports: list[Export],
    where: str | None,
    *,
    handshake_timeout: float = 30.0,
    default_export: str | None = None,
) -> AsyncIterator[Callable[[], Awaitable[RawClient]]]:
    """Run a real Server on a unix socket at ``where`` (TCP on 127.0.0.1 port 0 when None);
    yield a function that opens a new raw client to it. Leaving the block stops the server."""
    server = Server(exports, handshake_timeout=handshake_timeout, default_export=default_export)
    if where is None:
        listeners = await open_tcp_listeners("127.0.0.1", 0)
    else:
        listeners = [await open_unix_listener(where)]
    clients: list[RawClient] = []
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve, listeners)
        address = bound[0].socket.getsockname()

        async def connect() -> RawClient:
            if isinstance(address, str):
                client = await RawClient.unix(address)
            else:
                assert address[0] == "127.0.0.1"
                assert address[1] != 0
                client = await RawClient.tcp(address[1])
            clients.append(client)
            return client

        try:
            yield connect
        finally:
            for client in clients:
                await trio.aclose_forcefully(client.stream)
            nursery.cancel_scope.cancel()
