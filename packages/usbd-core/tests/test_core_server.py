"""The Server over real sockets (unix and TCP on 127.0.0.1): bad input, one test per case of
issue 2 section 4, plus structured replies, deadlines and graceful stop.

Each bad-input test checks three things: the offending client gets the spec's error or a
clean close, the stream stays in step (a following request is answered correctly), and the
server with its other connections keeps working.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from core_helpers import (
    BLOCK_STATUS,
    CHUNK_BLOCK_STATUS,
    CHUNK_ERROR,
    CHUNK_OFFSET_DATA,
    CHUNK_OFFSET_HOLE,
    DONE,
    EINVAL,
    ENOSPC,
    EPERM,
    F_DF,
    F_REQ_ONE,
    FLUSH,
    IHAVEOPT,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_STARTTLS,
    READ,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_SERVER,
    T_READ_ONLY,
    T_SEND_DF,
    WRITE,
    FailingDevice,
    GatedDevice,
    MemDevice,
    NullDevice,
    RawClient,
    ThreadedMemDevice,
    info_data,
    option,
    request,
    serving,
    wait_until,
)

from usbd.core import Export, Extent, ExtentFlag, Server, open_tcp_listeners, open_unix_listener
from usbd.core.cli import Listen, serve
from usbd.core.cli._serve import DeviceFailed

Connect = Callable[[], Awaitable[RawClient]]


async def ready(connect: Connect, name: str = "", **kw: bool) -> RawClient:
    client = await connect()
    await client.go(name, **kw)
    return client


async def still_serving(
    connect: Connect, device: MemDevice, name: str = "", offset: int = 65536
) -> None:
    """A fresh connection can write and read back: the server survived."""
    client = await ready(connect, name)
    marker = os.urandom(16)
    assert await client.write(offset, marker) == 0
    assert await client.read(offset, 16) == marker
    assert bytes(device.data[offset : offset + 16]) == marker
    await client.aclose()


async def test_server_reports_bound_listeners_and_serves(where: str | None) -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device, "disk", "a test disk")], where) as connect:
            client = await connect()
            await client.greeting()
            await client.send(option(OPT_LIST))
            replies = await client.replies_until_final()
            assert [r.reply for r in replies] == [REP_SERVER, REP_ACK]
            assert replies[0].data == struct.pack(">I", 4) + b"disk" + b"a test disk"
            size, _ = await client.go("disk", greet=False)
            assert size == device.size
            await still_serving(connect, device, "disk")


async def test_serve_reports_every_listener_serves_each_and_closes_them_on_cancel(
    sockdir: Path,
) -> None:
    """``nursery.start(server.serve, ...)`` hands back the listeners it serves (port 0 already
    a real port); cancelling it ends the connections and closes every listener."""
    device = MemDevice()
    path = str(sockdir / "both.sock")
    listeners = [await open_unix_listener(path), *await open_tcp_listeners("127.0.0.1", 0)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(Server([Export(device)]).serve, listeners)
            assert list(bound) == listeners
            port = bound[1].socket.getsockname()[1]
            assert port != 0
            unix_client = await RawClient.unix(path)
            await unix_client.go()
            tcp_client = await RawClient.tcp(port)
            await tcp_client.go()
            assert await unix_client.write(0, b"unix") == 0
            assert await tcp_client.read(0, 4) == b"unix"
            nursery.cancel_scope.cancel()
        for client in (unix_client, tcp_client):
            assert await client.closed_by_server()
            await client.aclose()
    assert all(listener.socket.fileno() == -1 for listener in listeners)
    with pytest.raises(OSError):
        await RawClient.tcp(port)


async def test_export_name_option_then_transmission(where: str | None) -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device)], where) as connect:
            client = await connect()
            await client.greeting(client_flags=1)  # no NO_ZEROES: expect the padding
            await client.send(option(OPT_EXPORT_NAME))
            size, flags = struct.unpack(">QH", await client.recv_exactly(10))
            assert size == device.size
            assert not flags & T_READ_ONLY
            assert await client.recv_exactly(124) == bytes(124)
            assert await client.write(0, b"xyz") == 0
            assert await client.read(0, 3) == b"xyz"


async def test_abort_closes_the_connection(where: str | None) -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device)], where) as connect:
            client = await connect()
            await client.greeting()
            await client.send(option(OPT_ABORT))
            assert (await client.option_reply()).reply == REP_ACK
            assert await client.closed_by_server()
            await still_serving(connect, device)


# -- section 4: bad input ---------------------------------------------------------------------


async def test_bad_request_magic_closes_only_that_connection(where: str | None) -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device)], where) as connect:
            bystander = await ready(connect)
            assert await bystander.write(0, b"before") == 0
            bad = await ready(connect)
            await bad.send(b"\xde\xad\xbe\xef" + request(READ, 1, 0, 1)[4:])
            assert await bad.closed_by_server()
            assert await bystander.read(0, 6) == b"before"
            assert await bystander.write(6, b"after") == 0
            await still_serving(connect, device)


async def test_unknown_command_is_einval_and_stream_stays_in_sync(where: str | None) -> None:
    device = MemDevice()
    device.data[:4] = b"data"
    with trio.fail_after(10):
        async with serving([Export(device)], where) as connect:
            client = await ready(connect)
            # Unknown commands, pipelined with a read: the read's reply must follow intact.
            await client.send(
                request(8, 1, 0, 4) + request(0xFFFF, 2, 0, 0) + request(READ, 3, 0, 4)
            )
            assert await client.simple_reply() == (EINVAL, 1)
            assert await client.simple_reply() == (EINVAL, 2)
            assert await client.simple_reply() == (0, 3)
            assert await client.recv_exactly(4) == b"data"


@pytest.mark.parametrize("opt", [OPT_STARTTLS, 4, 11, 1000])
async def test_unknown_option_is_err_unsup_and_haggling_goes_on(opt: int) -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device)], None) as connect:
            client = await connect()
            await client.greeting()
            await client.send(option(opt, b"whatever"))
            reply = await client.option_reply()
            assert (reply.option, reply.reply) == (opt, REP_ERR_UNSUP)
            await client.send(option(OPT_GO, info_data("")))
            assert (await client.replies_until_final())[-1].reply == REP_ACK
            assert await client.write(0, b"ok") == 0


@pytest.mark.parametrize(
    ("command", "offset", "length", "error"),
    [
        (READ, 1 << 20, 1, EINVAL),
        (READ, (1 << 20) - 1, 2, EINVAL),
        (WRITE, (1 << 20) - 1, 2, ENOSPC),
        (WRITE, 1 << 20, 1, ENOSPC),
        (READ, 2**64 - 1, 2, EINVAL),  # offset + length overflows 64 bits
        (WRITE, 2**64 - 2, 4, ENOSPC),
        (READ, 2**63, 2**32 - 1, EINVAL),
    ],
)
async def test_out_of_range_and_overflowing_requests(
    command: int, offset: int, length: int, error: int
) -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device)], None) as connect:
            client = await ready(connect)
            payload = b"\xee" * length if command == WRITE else b""
            await client.send(request(command, 1, offset, length) + payload)
            await client.send(request(READ, 2, 0, 2))
            assert await client.simple_reply() == (error, 1)
            assert await client.simple_reply() == (0, 2)
            assert await client.recv_exactly(2) == bytes(2)
    assert b"\xee" not in device.data


async def test_read_above_max_payload_is_einval() -> None:
    device = NullDevice(1 << 30)
    with trio.fail_after(10):
        async with serving([Export(device)], None) as connect:
            client = await ready(connect)
            await client.send(request(READ, 1, 0, (32 << 20) + 1) + request(READ, 2, 0, 8))
            assert await client.simple_reply() == (EINVAL, 1)  # and no data follows
            assert await client.simple_reply() == (0, 2)
            assert await client.recv_exactly(8) == bytes(8)
            assert len(await client.read(0, 32 << 20)) == 32 << 20  # the limit itself is fine


@pytest.mark.parametrize("max_payload", [None, 4096])
async def test_write_above_max_payload_is_einval_and_payload_is_skipped(
    max_payload: int | None,
) -> None:
    device = NullDevice(1 << 30)
    limit = max_payload or 32 << 20
    export = Export(device, max_payload=limit) if max_payload else Export(device)
    with trio.fail_after(20):
        async with serving([export], None) as connect:
            client = await ready(connect)
            async with trio.open_nursery() as nursery:
                # The payload is big: send it concurrently while reading the replies.
                nursery.start_soon(
                    client.send,
                    request(WRITE, 1, 0, limit + 1)
                    + b"\x01" * (limit + 1)
                    + request(WRITE, 2, 512, 3)
                    + b"abc",
                )
                assert await client.simple_reply() == (EINVAL, 1)
                assert await client.simple_reply() == (0, 2)
            assert device.writes == [(512, 3)]
            assert await client.call(FLUSH, 3) == EINVAL  # not advertised; still in step


async def test_write_to_read_only_export_is_eperm_with_payload_consumed(where: str | None) -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device, read_only=True)], where) as connect:
            client = await connect()
            _, flags = await client.go()
            assert flags & T_READ_ONLY
            await client.send(request(WRITE, 1, 0, 100) + b"\x77" * 100 + request(READ, 2, 0, 4))
            assert await client.simple_reply() == (EPERM, 1)
            assert await client.simple_reply() == (0, 2)
            assert await client.recv_exactly(4) == bytes(4)
    assert b"\x77" not in device.data
    assert "write" not in device.calls


async def test_unknown_export_name_with_go_is_err_unknown() -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device, "disk")], None) as connect:
            client = await connect()
            await client.greeting()
            for opt in (OPT_INFO, OPT_GO):
                await client.send(option(opt, info_data("nonexistent")))
                assert [r.reply for r in await client.replies_until_final()] == [REP_ERR_UNKNOWN]
            await client.send(option(OPT_GO, info_data("disk")))
            replies = await client.replies_until_final()
            assert [r.reply for r in replies] == [REP_INFO, REP_ACK]
            assert await client.write(0, b"in") == 0


async def test_unknown_export_name_with_export_name_closes(where: str | None) -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device, "disk")], where) as connect:
            client = await connect()
            await client.greeting()
            await client.send(option(OPT_EXPORT_NAME, b"nonexistent"))
            assert await client.closed_by_server()
            await still_serving(connect, device, "disk")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        struct.pack(">I", 100) + b"short",
        info_data("") + b"trailing",
        info_data("x" * 4097),
        info_data(b"\xff\xfe"),
    ],
    ids=["empty", "truncated", "trailing", "name too long", "invalid utf-8"],
)
async def test_malformed_option_data_is_err_invalid(data: bytes) -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device)], None) as connect:
            client = await connect()
            await client.greeting()
            await client.send(option(OPT_GO, data))
            reply = await client.option_reply()
            assert (reply.option, reply.reply) == (OPT_GO, REP_ERR_INVALID)
            await client.send(option(OPT_GO, info_data("")))
            assert (await client.replies_until_final())[-1].reply == REP_ACK
            assert await client.write(0, b"fine") == 0


@pytest.mark.parametrize(
    "frame",
    [
        option(OPT_LIST, magic=0x1234),
        struct.pack(">QII", IHAVEOPT, OPT_GO, 1 << 20),  # over-long option data
    ],
    ids=["bad option magic", "over-long option"],
)
async def test_broken_option_framing_closes_the_connection(frame: bytes) -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device)], None) as connect:
            client = await connect()
            await client.greeting()
            await client.send(frame)
            assert await client.closed_by_server()
            await still_serving(connect, device)


async def test_unknown_client_flags_close_the_connection() -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device)], None) as connect:
            client = await connect()
            await client.greeting(client_flags=0x80)
            assert await client.closed_by_server()
            await still_serving(connect, device)


@pytest.mark.parametrize(
    "partial",
    [
        request(READ, 1, 0, 4)[:13],
        request(WRITE, 1, 0, 4)[:27],
        request(WRITE, 1, 0, 1000) + b"\x55" * 600,
        request(WRITE, 1, 0, 1000),
    ],
    ids=["mid header", "mid write header", "mid payload", "before payload"],
)
async def test_client_disconnecting_mid_request(where: str | None, partial: bytes) -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device)], where) as connect:
            bystander = await ready(connect)
            client = await ready(connect)
            await client.send(partial)
            await client.aclose()
            assert await bystander.write(0, b"alive") == 0
            assert await bystander.read(0, 5) == b"alive"
            await still_serving(connect, device)
    assert b"\x55" not in device.data[:1000]  # a half-received write never reaches the device


async def test_client_disconnecting_mid_payload_on_a_threaded_device() -> None:
    device = ThreadedMemDevice()
    with trio.fail_after(10):
        async with serving([Export(device)], None) as connect:
            client = await ready(connect)
            await client.send(request(WRITE, 1, 0, 10) + b"x" * 10 + request(WRITE, 2, 0, 99))
            assert await client.simple_reply() == (0, 1)
            await client.aclose()
            await still_serving(connect, device)


async def test_client_disconnecting_with_a_request_in_flight() -> None:
    device = GatedDevice()
    with trio.fail_after(15):
        async with serving([Export(device)], None) as connect:
            client = await ready(connect)
            try:
                await client.send(request(WRITE, 1, 0, 4) + b"gone" + request(READ, 2, 0, 4))
                await wait_until(lambda: device.writes_started == 1)
                await client.aclose()
            finally:
                device.gate.set()
            await still_serving(connect, device)
    assert device.data[:4] == b"gone"  # the write that was received still completed


async def test_client_disconnecting_during_the_handshake(where: str | None) -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device)], where) as connect:
            for partial in (b"", b"\x00\x00", struct.pack(">I", 3) + option(OPT_GO)[:10]):
                client = await connect()
                await client.recv_exactly(18)
                await client.send(partial)
                await client.aclose()
            await still_serving(connect, device)


@pytest.mark.parametrize(
    "partial",
    [b"", struct.pack(">I", 3), struct.pack(">I", 3) + option(OPT_GO, info_data(""))[:-1]],
    ids=["silent", "after flags", "mid option"],
)
async def test_handshake_deadline_closes_a_client_that_never_finishes(
    where: str | None, partial: bytes
) -> None:
    device = MemDevice()
    with trio.fail_after(10):  # a ceiling, not a timing assertion
        async with serving([Export(device)], where, handshake_timeout=2.0) as connect:
            slow = await connect()
            await slow.recv_exactly(18)
            if partial:
                await slow.send(partial)
            await still_serving(connect, device)  # others are served meanwhile
            assert await slow.closed_by_server()


async def test_handshake_deadline_does_not_apply_to_transmission() -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device)], None, handshake_timeout=2.0) as connect:
            client = await ready(connect)
            await trio.sleep(2.5)
            assert await client.write(0, b"late") == 0


# -- structured replies ----------------------------------------------------------------------


async def test_structured_read_is_an_offset_data_chunk() -> None:
    device = MemDevice()
    device.data[100:104] = b"abcd"
    with trio.fail_after(10):
        async with serving([Export(device)], None) as connect:
            client = await connect()
            _, flags = await client.go(structured=True)
            assert flags & T_SEND_DF
            await client.send(request(READ, 9, 100, 4, F_DF))
            chunk = await client.chunk()
            assert (chunk.flags, chunk.type, chunk.cookie) == (DONE, CHUNK_OFFSET_DATA, 9)
            assert chunk.payload == struct.pack(">Q", 100) + b"abcd"
            assert await client.call(FLUSH, 10) == 0  # non-read replies stay simple


@pytest.mark.parametrize("device_type", [FailingDevice])
async def test_structured_read_error_is_an_error_chunk(device_type: type[MemDevice]) -> None:
    device = device_type()
    with trio.fail_after(10):
        async with serving([Export(device)], None) as connect:
            client = await connect()
            await client.go(structured=True)
            await client.send(request(READ, 5, 0, 512) + request(READ, 6, 8192, 2))
            chunk = await client.chunk()
            assert (chunk.flags, chunk.type, chunk.cookie) == (DONE, CHUNK_ERROR, 5)
            error, length = struct.unpack_from(">IH", chunk.payload)
            assert error == 5
            assert len(chunk.payload) == 6 + length
            assert b"bad sector" in chunk.payload[6:]
            chunk = await client.chunk()
            assert (chunk.type, chunk.cookie) == (CHUNK_OFFSET_DATA, 6)
            # Refused requests are error chunks too.
            await client.send(request(READ, 7, 1 << 20, 1))
            chunk = await client.chunk()
            assert (chunk.type, chunk.cookie) == (CHUNK_ERROR, 7)
            assert struct.unpack_from(">I", chunk.payload)[0] == EINVAL


async def test_block_status_with_base_allocation() -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device)], None) as connect:
            client = await connect()
            await client.go(structured=True, meta=True)
            await client.send(request(BLOCK_STATUS, 3, 0, 4096, F_REQ_ONE))
            chunk = await client.chunk()
            assert (chunk.flags, chunk.type, chunk.cookie) == (DONE, CHUNK_BLOCK_STATUS, 3)
            context_id, length, flags = struct.unpack(">III", chunk.payload)
            assert context_id != 0
            assert (length, flags) == (4096, 0)  # no extents: all data


async def test_block_status_without_meta_context_is_refused() -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with serving([Export(device)], None) as connect:
            client = await connect()
            await client.go(structured=True)
            await client.send(request(BLOCK_STATUS, 3, 0, 4096))
            chunk = await client.chunk()
            assert (chunk.type, chunk.cookie) == (CHUNK_ERROR, 3)
            assert struct.unpack_from(">I", chunk.payload)[0] == EINVAL


class _Sparse(MemDevice):
    """The first 64 KiB hold data, the next 64 KiB are a hole that reads as zeros."""

    def __init__(self) -> None:
        super().__init__(1 << 17)
        self.data[: 1 << 16] = b"\x42" * (1 << 16)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return [
            Extent(0, 1 << 16, ExtentFlag.DATA),
            Extent(1 << 16, 1 << 16, ExtentFlag.HOLE | ExtentFlag.ZERO),
        ]


async def test_structured_read_of_a_sparse_device_sends_data_and_hole_chunks() -> None:
    with trio.fail_after(10):
        async with serving([Export(_Sparse())], None) as connect:
            client = await connect()
            await client.go(structured=True)
            await client.send(request(READ, 1, 0, 1 << 17))
            data = await client.chunk()
            hole = await client.chunk()
            assert (data.type, data.flags, data.cookie) == (CHUNK_OFFSET_DATA, 0, 1)
            assert data.payload == struct.pack(">Q", 0) + b"\x42" * (1 << 16)
            assert (hole.type, hole.flags, hole.cookie) == (CHUNK_OFFSET_HOLE, DONE, 1)
            assert hole.payload == struct.pack(">QI", 1 << 16, 1 << 16)
            # Don't fragment: one data chunk with the zeros present.
            await client.send(request(READ, 2, 0, 1 << 17, F_DF))
            whole = await client.chunk()
            assert (whole.type, whole.flags, whole.cookie) == (CHUNK_OFFSET_DATA, DONE, 2)
            assert whole.payload[8:] == b"\x42" * (1 << 16) + bytes(1 << 16)


class _DescribesAPrefix(MemDevice):
    """Extents that stop after the first 64 KiB of a 128 KiB read (allowed by the contract)."""

    def __init__(self) -> None:
        super().__init__(1 << 17)
        self.data[(1 << 16) + 5] = 7

    def extents(self, offset: int, length: int) -> list[Extent]:
        return [Extent(0, 1 << 16, ExtentFlag.HOLE | ExtentFlag.ZERO)]


async def test_structured_read_covers_what_the_extents_leave_out_with_one_done() -> None:
    with trio.fail_after(10):
        async with serving([Export(_DescribesAPrefix())], None) as connect:
            client = await connect()
            await client.go(structured=True)
            await client.send(request(READ, 1, 0, 1 << 17))
            hole = await client.chunk()
            assert (hole.type, hole.flags, hole.cookie) == (CHUNK_OFFSET_HOLE, 0, 1)
            assert hole.payload == struct.pack(">QI", 0, 1 << 16)
            rest = await client.chunk()
            assert (rest.type, rest.flags, rest.cookie) == (CHUNK_OFFSET_DATA, DONE, 1)
            assert rest.payload[:8] == struct.pack(">Q", 1 << 16)
            assert rest.payload[8:] == bytes(5) + b"\x07" + bytes((1 << 16) - 6)


async def test_block_status_reports_the_device_extents() -> None:
    with trio.fail_after(10):
        async with serving([Export(_Sparse())], None) as connect:
            client = await connect()
            await client.go(structured=True, meta=True)
            await client.send(request(BLOCK_STATUS, 1, 4096, (1 << 17) - 4096))
            chunk = await client.chunk()
            assert (chunk.type, chunk.flags) == (CHUNK_BLOCK_STATUS, DONE)
            _, *pairs = struct.unpack(f">{len(chunk.payload) // 4}I", chunk.payload)
            assert pairs == [(1 << 16) - 4096, 0, 1 << 16, 3]
            await client.send(request(BLOCK_STATUS, 2, 4096, (1 << 17) - 4096, F_REQ_ONE))
            chunk = await client.chunk()
            _, *pairs = struct.unpack(f">{len(chunk.payload) // 4}I", chunk.payload)
            assert pairs == [(1 << 16) - 4096, 0]


# -- graceful stop ---------------------------------------------------------------------------


async def test_graceful_stop_flushes_and_closes_once(sockdir: Path) -> None:
    device = GatedDevice()
    path = str(sockdir / "stop.sock")
    with trio.fail_after(15):
        async with trio.open_nursery() as outer:
            stop = trio.CancelScope()

            async def run() -> None:
                with stop:
                    await serve(device, [Listen(path=path)])

            outer.start_soon(run)
            await wait_until(lambda: os.path.exists(path))
            client = await RawClient.unix(path)
            try:
                await client.go()
                device.gate.set()
                assert await client.write(0, b"first") == 0
                device.gate.clear()
                await client.send(request(WRITE, 2, 5, 6) + b"second")
                await wait_until(lambda: device.writes_started == 2)
                stop.cancel()  # stop with a write still in flight
                await trio.sleep(0.05)
                assert "close" not in device.events  # never while a call is running
            finally:
                device.gate.set()
                await client.aclose()
    assert device.events.count("close") == 1
    assert device.events[-1] == "close"
    assert device.events[-2] == "flush"
    assert device.closed == 1
    assert device.data[:11] == b"firstsecond"  # the in-flight write finished
    assert not os.path.exists(path)  # the socket file is removed
    with pytest.raises(Exception, match="closed"):
        device.read(0, 1)


class _FailingDevice(MemDevice):
    """Fails for good (Device.failed) once it has taken a write, as a fenced device does."""

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        super().write(offset, data, fua)
        self.reason = "fenced by another writer"

    def failed(self) -> str | None:
        return getattr(self, "reason", None)


async def test_a_device_that_fails_for_good_stops_the_daemon_with_its_error(
    sockdir: Path,
) -> None:
    device = _FailingDevice()
    path = str(sockdir / "failing.sock")
    with trio.fail_after(10):
        with pytest.raises(BaseExceptionGroup) as raised:
            async with trio.open_nursery() as outer:
                outer.start_soon(serve, device, [Listen(path=path)])
                await wait_until(lambda: os.path.exists(path))
                client = await RawClient.unix(path)
                await client.go()
                assert await client.write(0, b"data") == 0
                await trio.sleep(10)  # serve() must end by itself
        assert raised.group_contains(
            DeviceFailed, match="^the device failed: fenced by another writer$", depth=None
        )
        await client.aclose()
    assert device.closed == 1  # flushed and closed as on any stop
    assert not os.path.exists(path)


async def test_graceful_stop_of_an_idle_server(sockdir: Path) -> None:
    device = MemDevice()
    path = str(sockdir / "idle.sock")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            uris = await nursery.start(functools.partial(serve, device, [Listen(path=path)]))
            assert uris == [f"nbd+unix:///?socket={path}"]
            client = await RawClient.unix(path)
            await client.go()
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert device.closed == 1
