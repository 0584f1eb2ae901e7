"""Limits on what network clients can take: connections, deadlines, idle time, memory, logs.

Real sockets and a real :class:`Server` throughout (no mocks); the sans-IO pieces
(:class:`PeerLog`, :class:`Refusal`) are also driven directly. Every deadline here is a
short setting under a generous ``fail_after`` ceiling: the tests assert what happened (who
was served, who was closed, what was logged), never how long it took.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from core_helpers import (
    OPT_GO,
    READ,
    REP_ACK,
    WRITE,
    Closed,
    MemDevice,
    RawClient,
    ThreadedMemDevice,
    info_data,
    option,
    request,
)

from usbd.core import Export, RequestBuffer, Server, open_tcp_listeners, open_unix_listener
from usbd.core._constants import IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, Option, Reply
from usbd.core._limits import FILES_BESIDE, Limits, file_limit, raise_file_limit
from usbd.core._peerlog import PeerLog
from usbd.core._refusal import MAX_OPTIONS, Refusal

REP_ERR_POLICY = int(Reply.ERR_POLICY)
Connect = Callable[[], Awaitable[RawClient]]


@asynccontextmanager
async def limited(
    exports: list[Export], listen: list[str | None], **limits: Any
) -> AsyncIterator[tuple[Server, list[Connect]]]:
    """A Server with ``Limits(**limits)`` on a unix path or TCP (None) per entry of
    ``listen``; yields it and one connect function per listener."""
    server = Server(exports, limits=Limits(**limits))
    listeners = []
    for where in listen:
        if where is None:
            listeners += await open_tcp_listeners("127.0.0.1", 0)
        else:
            listeners.append(await open_unix_listener(where))
    clients: list[RawClient] = []
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve, listeners)

        def connector(address: Any) -> Connect:
            async def connect() -> RawClient:
                if isinstance(address, str):
                    client = await RawClient.unix(address)
                else:
                    client = await RawClient.tcp(address[1])
                clients.append(client)
                return client

            return connect

        try:
            yield server, [connector(b.socket.getsockname()) for b in bound]
        finally:
            for client in clients:
                await trio.aclose_forcefully(client.stream)
            nursery.cancel_scope.cancel()


async def served(connect: Connect) -> RawClient:
    client = await connect()
    await client.go()
    return client


async def refused(connect: Connect) -> str:
    """Connect and ask for the export; the server must refuse with ERR_POLICY and a message,
    then close once the client gives up (ABORT is acknowledged)."""
    client = await connect()
    await client.greeting()
    await client.send(option(OPT_GO, info_data("")))
    reply = await client.option_reply()
    assert (reply.option, reply.reply) == (OPT_GO, REP_ERR_POLICY), reply
    await client.send(option(int(Option.ABORT)))
    abort = await client.option_reply()
    assert (abort.option, abort.reply) == (int(Option.ABORT), REP_ACK)
    assert await client.closed_by_server()
    return reply.data.decode()


async def works(client: RawClient, device: MemDevice, offset: int = 4096) -> None:
    marker = os.urandom(16)
    assert await client.write(offset, marker) == 0
    assert await client.read(offset, 16) == marker
    assert bytes(device.data[offset : offset + 16]) == marker


# -- the connection limit ----------------------------------------------------------------------


async def test_a_client_over_the_limit_is_refused_with_a_reason_and_a_slot_is_reused(
    where: str | None,
) -> None:
    device = MemDevice()
    with trio.fail_after(20):
        async with limited([Export(device)], [where], max_connections=2) as (server, [connect]):
            first, second = await served(connect), await served(connect)
            message = await refused(connect)
            assert "too many connections" in message
            assert "limit 2" in message
            await works(first, device)  # the refusal cost the others nothing
            await works(second, device, 8192)
            assert (server.active, server.served, server.refused) == (2, 2, 1)
            await first.aclose()
            while server.active == 2:  # the server notices the close
                await trio.sleep(0.01)
            third = await served(connect)
            await works(third, device)
            assert server.refused == 1


async def test_the_limit_counts_every_listener_together(sockdir: Path) -> None:
    device = MemDevice()
    with trio.fail_after(20):
        async with limited(
            [Export(device)], [str(sockdir / "a.sock"), None], max_connections=1
        ) as (server, [unix, tcp]):
            held = await served(unix)
            assert "too many connections" in await refused(tcp)
            await works(held, device)
            await held.aclose()
            while server.active:
                await trio.sleep(0.01)
            await works(await served(tcp), device)
            assert "too many connections" in await refused(unix)


async def test_a_connection_still_handshaking_counts() -> None:
    """A slot is taken from accept on: clients that never finish the handshake cannot
    stand outside the limit (until the handshake deadline drops them)."""
    device = MemDevice()
    with trio.fail_after(20):
        async with limited([Export(device)], [None], max_connections=1) as (_, [connect]):
            silent = await connect()
            assert (await silent.recv_exactly(18))[:8] == struct.pack(">Q", NBDMAGIC)
            assert "too many connections" in await refused(connect)


async def test_beyond_the_refusals_under_way_a_connection_is_closed_without_a_word() -> None:
    device = MemDevice()
    with trio.fail_after(20):
        async with limited(
            [Export(device)], [None], max_connections=1, max_refusing=1, refusal_timeout=30.0
        ) as (server, [connect]):
            held = await served(connect)
            lingering = await connect()  # refused: greeted, and it says nothing back
            assert (await lingering.recv_exactly(18))[:8] == struct.pack(">Q", NBDMAGIC)
            dropped = await connect()
            with pytest.raises(Closed):
                await dropped.recv_exactly(1)
            assert server.refused == 2
            await works(held, device)


async def test_a_refused_client_that_says_nothing_is_dropped_at_the_refusal_deadline() -> None:
    device = MemDevice()
    with trio.fail_after(20):
        async with limited([Export(device)], [None], max_connections=1, refusal_timeout=0.5) as (
            _,
            [connect],
        ):
            await served(connect)
            silent = await connect()
            await silent.recv_exactly(18)
            with pytest.raises(Closed):
                await silent.recv_exactly(1)


async def test_no_limit_with_zero() -> None:
    device = MemDevice()
    with trio.fail_after(20):
        async with limited([Export(device)], [None], max_connections=0) as (server, [connect]):
            clients = [await served(connect) for _ in range(40)]
            for client in clients[::13]:
                await works(client, device)
            assert (server.served, server.refused) == (40, 0)


# -- the refusal, sans-IO --------------------------------------------------------------------


def _options(*opts: tuple[int, bytes]) -> bytes:
    return b"".join(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data for opt, data in opts)


def _replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, opt, reply, length = struct.unpack_from(">QIII", data)
        assert magic == OPTION_REPLY_MAGIC
        out.append((opt, reply, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


def test_refusal_refuses_each_option_and_skips_its_data_byte_by_byte() -> None:
    refusal = Refusal("busy")
    magic, opt, flags = struct.unpack(">QQH", refusal.start())
    assert (magic, opt, flags) == (NBDMAGIC, IHAVEOPT, 3)
    stream = struct.pack(">I", 3) + _options(
        (int(Option.STRUCTURED_REPLY), b""),
        (int(Option.GO), info_data("x" * 300)),
        (int(Option.ABORT), b""),
    )
    out = b"".join(refusal.receive_data(stream[i : i + 1]) for i in range(len(stream)))
    assert _replies(out) == [
        (int(Option.STRUCTURED_REPLY), REP_ERR_POLICY, b"busy"),
        (int(Option.GO), REP_ERR_POLICY, b"busy"),
        (int(Option.ABORT), REP_ACK, b""),
    ]
    assert refusal.finished


@pytest.mark.parametrize(
    "bad",
    [
        _options((int(Option.EXPORT_NAME), b"")),  # no error reply exists: close
        struct.pack(">QII", 0x1234, 7, 0),  # bad magic
        struct.pack(">QII", IHAVEOPT, 7, 1 << 30),  # no client sends that much
    ],
    ids=["export-name", "bad-magic", "huge"],
)
def test_refusal_ends_on_what_has_no_answer(bad: bytes) -> None:
    refusal = Refusal("busy")
    assert refusal.receive_data(struct.pack(">I", 3) + bad) == b""
    assert refusal.finished


def test_refusal_answers_a_few_options_at_most() -> None:
    refusal = Refusal("busy")
    out = refusal.receive_data(
        struct.pack(">I", 3) + _options(*[(int(Option.LIST), b"")] * (MAX_OPTIONS + 10))
    )
    assert len(_replies(out)) == MAX_OPTIONS
    assert refusal.finished


# -- rate-limited logging ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_peer_log_logs_a_burst_then_counts_the_rest_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="test.peers")
    clock = Clock()
    peers = PeerLog(logging.getLogger("test.peers"), burst=3, interval=60, clock=clock)
    for i in range(50):
        peers.event("handshake failures", logging.WARNING, "client %d: bad magic", i)
        clock.now += 0.1
    peers.event("refused connections", logging.WARNING, "refused one")
    warnings = _lines(caplog, logging.WARNING)
    assert warnings[:3] == ["client 0: bad magic", "client 1: bad magic", "client 2: bad magic"]
    assert "further handshake failures are logged at debug level" in warnings[3]
    assert warnings[4:] == ["refused one"]  # another kind has its own burst
    debug = _lines(caplog, logging.DEBUG)
    assert debug == [f"client {i}: bad magic" for i in range(3, 50)]  # nothing is lost
    clock.now += 60
    peers.event("handshake failures", logging.WARNING, "client 50: bad magic")
    warnings = _lines(caplog, logging.WARNING)
    assert warnings[-2:] == ["47 more handshake failures in the last 65 s", "client 50: bad magic"]
    assert peers.totals == {"handshake failures": 51, "refused connections": 1}


def test_peer_log_writes_no_summary_when_nothing_was_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="test.peers")
    clock = Clock()
    peers = PeerLog(logging.getLogger("test.peers"), burst=5, interval=60, clock=clock)
    for _ in range(4):
        peers.event("connections", logging.INFO, "one")
    clock.now += 61
    peers.flush()
    assert _lines(caplog, logging.INFO) == ["one"] * 4


async def test_peer_log_run_writes_the_summary_when_the_interval_ends_without_events(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    caplog.set_level(logging.DEBUG, logger="test.peers")
    peers = PeerLog(logging.getLogger("test.peers"), burst=1, interval=60, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peers.run)
        for _ in range(10):
            peers.event("handshake timeouts", logging.WARNING, "slow")
        await trio.sleep(61)
        assert _lines(caplog, logging.WARNING)[-1] == "9 more handshake timeouts in the last 60 s"
        peers.event("handshake timeouts", logging.WARNING, "slow")
        peers.event("handshake timeouts", logging.WARNING, "slow")
        nursery.cancel_scope.cancel()
    # What the unfinished interval held back is counted when the server stops.
    assert _lines(caplog, logging.WARNING)[-1].startswith("1 more handshake timeouts")


async def test_a_flood_of_bad_handshakes_logs_a_few_warnings_and_every_one_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="usbd.core")
    device = MemDevice()
    with trio.fail_after(30):
        async with limited([Export(device)], [None]) as (server, [connect]):
            for _ in range(60):
                client = await connect()
                await client.recv_exactly(18)
                await client.send(b"\xff\xff\xff\xff")  # unknown client flags
                assert await client.closed_by_server()
            await works(await served(connect), device)
    failures = [m for m in _lines(caplog, logging.WARNING) if "handshake failed" in m]
    assert 1 <= len(failures) <= server.peer_log.burst
    detail = [m for m in _lines(caplog, logging.DEBUG) if "handshake failed" in m]
    assert len(failures) + len(detail) == 60
    assert server.peer_log.totals["handshake failures"] == 60
    # The summary comes when the interval ends, or when the server stops (here).
    summaries = [m for m in _lines(caplog, logging.WARNING) if "more handshake failures" in m]
    assert summaries == [f"{len(detail)} more handshake failures in the last 0 s"]


async def test_transmission_protocol_errors_are_rate_limited_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="usbd.core")
    device = MemDevice()
    with trio.fail_after(30):
        async with limited([Export(device)], [None]) as (server, [connect]):
            for _ in range(30):
                client = await served(connect)
                await client.send(b"\x00" * 28)  # bad request magic
                assert await client.closed_by_server()
    warnings = [m for m in _lines(caplog, logging.WARNING) if "bad request magic" in m]
    assert 1 <= len(warnings) <= server.peer_log.burst
    assert server.peer_log.totals["protocol errors"] == 30


async def test_clients_vanishing_mid_request_are_rate_limited_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="usbd.core")
    device = MemDevice()
    with trio.fail_after(30):
        async with limited([Export(device)], [None]) as (server, [connect]):
            for _ in range(30):
                client = await served(connect)
                await client.send(request(WRITE, 1, 0, 4096)[:20])  # half a header, then gone
                await client.aclose()
            while server.active:
                await trio.sleep(0.01)
    lines = [m for m in _lines(caplog, logging.INFO) if "middle of a request" in m]
    assert 1 <= len(lines) <= server.peer_log.burst
    assert server.peer_log.totals["connections lost"] == 30


# -- deadlines -------------------------------------------------------------------------------


async def test_an_idle_connection_is_closed_and_what_it_wrote_is_flushed() -> None:
    device = MemDevice()
    with trio.fail_after(20):
        async with limited([Export(device)], [None], idle_timeout=0.5) as (server, [connect]):
            client = await served(connect)
            await works(client, device)
            assert await client.closed_by_server()
            assert device.calls.count("flush") == 1  # the disconnect's flush
            while server.active:
                await trio.sleep(0.01)


class SlowDevice(ThreadedMemDevice):
    """Writes take ``delay`` seconds: longer than the idle timeout of the test."""

    delay = 1.5

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        time.sleep(self.delay)
        super().write(offset, data, fua)


async def test_a_client_waiting_for_a_slow_request_is_not_idle() -> None:
    device = SlowDevice()
    with trio.fail_after(20):
        async with limited([Export(device)], [None], idle_timeout=0.3) as (_, [connect]):
            client = await served(connect)
            assert await client.write(0, b"slow") == 0  # answered, not cut off
            assert bytes(device.data[:4]) == b"slow"
            assert await client.closed_by_server()  # then idle: closed


async def test_a_client_still_reading_a_long_reply_is_not_idle() -> None:
    """A task's reply is still going out (the client reads it slowly, for longer than the
    timeout) after the task and the queue have let go of it: the connection is busy, and
    the client's next request is answered (review of issue 14: it was closed as idle)."""
    device = ThreadedMemDevice(16 << 20)
    device.data[: 8 << 20] = os.urandom(8 << 20)
    with trio.fail_after(30):
        async with limited([Export(device)], [None], idle_timeout=0.3) as (_, [connect]):
            client = await served(connect)
            assert isinstance(client.stream, trio.SocketStream)
            client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            await client.send(request(READ, 1, 0, 8 << 20))
            assert await client.simple_reply() == (0, 1)
            got = bytearray()
            while len(got) < 8 << 20:  # about 2 s at 256 KiB per 60 ms: never idle
                got += await client.recv_exactly(min(256 * 1024, (8 << 20) - len(got)))
                await trio.sleep(0.06)
            assert got == device.data[: 8 << 20]
            assert await client.read(4096, 512) == bytes(device.data[4096:4608])


async def test_a_request_stalled_mid_payload_is_closed_by_the_idle_timeout() -> None:
    device = MemDevice()
    with trio.fail_after(20):
        async with limited([Export(device)], [None], idle_timeout=0.5) as (_, [connect]):
            client = await served(connect)
            await client.send(request(WRITE, 1, 0, 1 << 20) + b"x" * 1000)
            assert await client.closed_by_server()
            assert bytes(device.data[:4]) == bytes(4)  # never written: never answered


async def test_without_an_idle_timeout_a_quiet_client_stays() -> None:
    device = MemDevice()
    with trio.fail_after(20):
        async with limited([Export(device)], [None], idle_timeout=0) as (_, [connect]):
            client = await served(connect)
            await trio.sleep(1.0)
            await works(client, device)


# -- memory: a stalled client holds what it sent, not what it announced ----------------------


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_receive_buffers_hold_what_arrived_not_what_a_header_announced() -> None:
    """Forty connections' buffers, each 256 KiB into a 32 MiB WRITE: their memory is what
    was received. Zero-filled storage would take 40 x 32 MiB (1.3 GiB) at once."""
    before = _resident()
    buffers = []
    for _ in range(40):
        buffer = RequestBuffer(32 << 20)
        data = request(WRITE, 1, 0, 32 << 20) + b"x" * (256 << 10)
        while data:
            space = buffer.space()
            n = min(len(space), len(data))
            space[:n] = data[:n]
            buffer.commit(n)
            data = data[n:]
        assert buffer.pop() is None
        buffer.space()  # where the rest would be received: room for all of it
        assert buffer.capacity >= 32 << 20
        buffers.append(buffer)
    grown = _resident() - before
    assert grown < 40 * (2 << 20), f"{grown >> 20} MiB for 40 stalled buffers"


# -- unix socket modes -----------------------------------------------------------------------


async def test_unix_sockets_are_created_0600_whatever_the_umask(sockdir: Path) -> None:
    path = sockdir / "private.sock"
    old = os.umask(0)
    try:
        listener = await open_unix_listener(path)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        await listener.aclose()


async def test_unix_socket_mode_can_be_asked_for(sockdir: Path) -> None:
    path = sockdir / "group.sock"
    listener = await open_unix_listener(path, mode=0o660)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
    finally:
        await listener.aclose()


# -- file descriptors ------------------------------------------------------------------------

INF = resource.RLIM_INFINITY


@pytest.mark.parametrize(
    ("limits", "soft", "hard", "new", "warns"),
    [
        (Limits(), 1024, 4096, None, False),  # 256 + 64 + 256 fit in 1024
        (Limits(max_connections=2000), 1024, 4096, 2000 + 64 + FILES_BESIDE, False),
        (Limits(max_connections=2000), 1024, 2048, 2048, True),  # as far as the hard limit
        (Limits(max_connections=2000), 1024, INF, 2000 + 64 + FILES_BESIDE, False),
        (Limits(max_connections=2000), INF, INF, None, False),
        (Limits(max_connections=0), 1024, 524288, 524288, False),  # no limit: all there is
        (Limits(max_connections=50), 8192, 8192, None, False),  # never lowered
    ],
)
def test_file_limit(limits: Limits, soft: int, hard: int, new: int | None, warns: bool) -> None:
    got, warning = file_limit(limits, soft, hard)
    assert got == new
    assert (warning is not None) == warns
    if warning:
        assert f"--max-connections {limits.max_connections}" in warning
        assert str(hard) in warning


def test_raise_file_limit_raises_this_process_soft_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == INF else min(hard, 4096)  # whatever this machine allows
    connections = wanted - 64 - FILES_BESIDE
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        raise_file_limit(Limits(max_connections=connections))
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (wanted, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
