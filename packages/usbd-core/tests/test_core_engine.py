"""The request loop over a socketpair (the kernel seam): commands, capabilities, concurrency.

Every connection here starts in the transmission phase with simple replies only, exactly as
the Linux kernel talks to a daemon that handed it one end of a socketpair.
"""

from __future__ import annotations

import array
import errno
import gc
import socket
import threading
import time
import types
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from core_helpers import (
    CACHE,
    DISC,
    EINVAL,
    ENOSPC,
    ENOTSUP,
    EPERM,
    F_FAST_ZERO,
    F_FUA,
    F_NO_HOLE,
    FLUSH,
    READ,
    T_HAS_FLAGS,
    T_READ_ONLY,
    T_SEND_FAST_ZERO,
    T_SEND_FLUSH,
    T_SEND_FUA,
    T_SEND_TRIM,
    T_SEND_WRITE_ZEROES,
    TRIM,
    WRITE,
    WRITE_ZEROES,
    AsyncMemDevice,
    Closed,
    FailingDevice,
    GatedDevice,
    MemDevice,
    ThreadedFailingDevice,
    ThreadedMemDevice,
    connected,
    request,
    seam,
    serving,
    wait_until,
)

import usbd.core._writer as writer_module
from usbd.core import Device, DeviceError, Export, session_for

ESHUTDOWN = 108


async def test_kernel_seam_round_trip_with_simple_replies() -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with seam(device) as (client, export):
            assert not session_for(export).structured_replies
            assert await client.write(1000, b"hello world") == 0
            assert await client.read(1000, 11) == b"hello world"
            assert await client.read(0, 4) == bytes(4)
            assert await client.call(FLUSH, cookie=3) == 0
            assert await client.call(TRIM, 4, 0, 512) == 0
    assert device.data[1000:1011] == b"hello world"


async def test_bytes_received_during_a_handshake_are_served_first() -> None:
    device = MemDevice()
    device.data[:3] = b"abc"
    with trio.fail_after(10):
        async with seam(device, initial=request(READ, 5, 0, 3)) as (client, _):
            assert await client.simple_reply() == (0, 5)
            assert await client.recv_exactly(3) == b"abc"
            assert await client.read(1, 2) == b"bc"


@pytest.mark.parametrize(
    "make",
    [
        MemDevice,
        ThreadedMemDevice,
        AsyncMemDevice,
        # With a writer thread, and a READ still in a worker thread when DISC arrives: the
        # end of the stream waits for the writer, then for the requests still in tasks.
        lambda: SlowThreadReadsDeclinedWrites(),  # noqa: PLW0108 (defined further down)
    ],
    ids=["inline", "threads", "async", "write-behind"],
)
async def test_disc_drains_then_closes(make: Callable[[], Device]) -> None:
    device = make()
    with trio.fail_after(10):
        async with seam(device) as (client, _):
            await client.send(
                request(WRITE, 1, 0, 3) + b"xyz" + request(READ, 2, 0, 3) + request(DISC, 3)
            )
            replies = {}
            for _ in range(2):
                error, cookie = await client.simple_reply()
                replies[cookie] = error
                if cookie == 2:
                    # Overlapping requests in flight complete in no defined order, so the
                    # data may be old or new; that it is there keeps the stream in step.
                    assert len(await client.recv_exactly(3)) == 3
            assert replies == {1: 0, 2: 0}
            assert await client.closed_by_server()


# -- errors from the device ------------------------------------------------------------------


@pytest.mark.parametrize("device_type", [FailingDevice, ThreadedFailingDevice])
async def test_read_error_with_simple_replies_carries_no_payload(
    device_type: type[Device],
) -> None:
    device = device_type()
    with trio.fail_after(10):
        async with seam(device) as (client, _):
            device.data[8192:8196] = b"good"  # type: ignore[attr-defined]
            # Both requests at once: if the error reply carried data, the second reply's
            # header would be read out of that data.
            await client.send(request(READ, 1, 0, 512) + request(READ, 2, 8192, 4))
            got = {}
            for _ in range(2):
                error, cookie = await client.simple_reply()
                got[cookie] = error
                if not error:
                    assert await client.recv_exactly(4) == b"good"
            assert got == {1: 5, 2: 0}
            assert await client.read(8192, 4) == b"good"  # still in step


class _OSErrorDevice(MemDevice):
    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        raise OSError(errno.EDQUOT, "quota")

    def trim(self, offset: int, length: int, fua: bool) -> None:
        raise ValueError("a bug in the driver")


async def test_device_errors_map_to_nbd_errno_and_the_connection_lives_on() -> None:
    with trio.fail_after(10):
        async with seam(_OSErrorDevice()) as (client, _):
            assert await client.write(0, b"x") == 28  # EDQUOT -> ENOSPC
            assert await client.call(TRIM, 2, 0, 1) == 5  # anything else -> EIO
            assert await client.read(0, 1) == b"\0"


async def test_short_read_from_device_is_an_error_not_a_desync() -> None:
    class Short(MemDevice):
        def read(self, offset: int, length: int) -> bytes:
            return bytes(length - 1)

    with trio.fail_after(10):
        async with seam(Short()) as (client, _):
            await client.send(request(READ, 1, 0, 16) + request(FLUSH, 2))
            assert await client.simple_reply() == (5, 1)
            assert await client.simple_reply() == (0, 2)


# -- ordering and concurrency ----------------------------------------------------------------


async def test_flush_waits_for_earlier_writes() -> None:
    device = GatedDevice()
    with trio.fail_after(15):
        async with seam(device) as (client, _):
            try:
                await client.send(request(WRITE, 1, 0, 4) + b"data" + request(FLUSH, 2))
                await wait_until(lambda: device.writes_started == 1)
                await trio.sleep(0.1)  # room for a wrongly early flush to happen
                assert "flush" not in device.events
            finally:
                device.gate.set()
            got = {await client.simple_reply(), await client.simple_reply()}
            assert got == {(0, 1), (0, 2)}
    assert device.events[:3] == ["write-start", "write-end", "flush"]


async def test_several_flushes_waiting_for_one_write_all_complete() -> None:
    device = GatedDevice()
    with trio.fail_after(15):
        async with seam(device) as (client, _):
            try:
                await client.send(
                    request(WRITE, 1, 0, 4) + b"data" + request(FLUSH, 2) + request(FLUSH, 3)
                )
                await wait_until(lambda: device.writes_started == 1)
                await trio.sleep(0.05)  # let both flushes reach their barrier
            finally:
                device.gate.set()
            with trio.move_on_after(5):
                got = {await client.simple_reply() for _ in range(3)}
                assert got == {(0, 1), (0, 2), (0, 3)}
                return
            pytest.fail(
                "a FLUSH never completed: with two flushes waiting on the same write, "
                "Connection._barrier replaces _write_done and strands the first waiter"
            )


class _OutOfOrder(ThreadedMemDevice):
    """Reads at offset 0 wait until the test says so; other reads answer at once."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def read(self, offset: int, length: int) -> bytes:
        if offset == 0 and not self.release.wait(10):
            raise DeviceError("never released")
        return super().read(offset, length)


async def test_threaded_device_replies_out_of_order() -> None:
    device = _OutOfOrder()
    device.data[4096:4100] = b"fast"
    with trio.fail_after(15):
        async with seam(device) as (client, _):
            try:
                await client.send(request(READ, 1, 0, 4) + request(READ, 2, 4096, 4))
                assert await client.simple_reply() == (0, 2)  # the later request first
                assert await client.recv_exactly(4) == b"fast"
            finally:
                device.release.set()
            assert await client.simple_reply() == (0, 1)
            assert await client.recv_exactly(4) == bytes(4)


class _Rendezvous(ThreadedMemDevice):
    """Every read waits for seven others: only a server with eight in flight can answer."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier = threading.Barrier(8, timeout=10)

    def read(self, offset: int, length: int) -> bytes:
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            raise DeviceError("requests were not in flight together") from None
        return super().read(offset, length)


async def test_many_requests_in_flight_at_once() -> None:
    device = _Rendezvous()
    for i in range(16):
        device.data[i * 512] = i
    with trio.fail_after(15):
        async with seam(device) as (client, _):
            await client.send(b"".join(request(READ, 100 + i, i * 512, 1) for i in range(16)))
            seen = set()
            for _ in range(16):
                error, cookie = await client.simple_reply()
                assert error == 0
                assert await client.recv_exactly(1) == bytes([cookie - 100])
                seen.add(cookie)
            assert seen == set(range(100, 116))
    assert len(device.threads) >= 8


async def test_blocking_device_runs_in_worker_threads() -> None:
    device = ThreadedMemDevice()
    with trio.fail_after(10):
        async with seam(device) as (client, _):
            assert await client.write(0, b"t") == 0
            assert await client.read(0, 1) == b"t"
    assert device.threads
    assert threading.get_ident() not in device.threads


async def test_inline_device_runs_on_the_event_loop_thread() -> None:
    class Recording(MemDevice):
        threads: set[int]

        def read(self, offset: int, length: int) -> bytes:
            self.threads.add(threading.get_ident())
            return super().read(offset, length)

    device = Recording()
    device.threads = set()
    with trio.fail_after(10):
        async with seam(device) as (client, _):
            assert await client.read(0, 1) == b"\0"
    assert device.threads == {threading.get_ident()}


async def test_async_native_device_is_served() -> None:
    device = AsyncMemDevice()
    with trio.fail_after(10):
        async with seam(device) as (client, export):
            assert export.is_async
            await client.send(
                b"".join(request(WRITE, i, i * 100, 10) + bytes([i]) * 10 for i in range(1, 9))
            )
            assert {await client.simple_reply() for _ in range(8)} == {(0, i) for i in range(1, 9)}
            assert await client.read(100, 10) == b"\x01" * 10
            assert await client.read(800, 10) == b"\x08" * 10
            assert await client.call(WRITE_ZEROES, 20, 100, 10) == 0
            assert await client.read(100, 10) == bytes(10)
            assert await client.call(FLUSH, 21) == 0
            assert await client.call(TRIM, 22, 800, 5) == 0
            assert await client.read(800, 10) == bytes(5) + b"\x08" * 5
    assert device.in_trio
    assert {"read", "write", "zero", "flush", "trim"} <= set(device.calls)


class _GatedReads(AsyncMemDevice):
    """Async reads wait on a trio event; counts how many started."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.started = 0

    async def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
        self.started += 1
        await self.gate.wait()
        return await super().read(offset, length)


async def test_backpressure_stops_reading_when_the_budget_is_used() -> None:
    device = _GatedReads()
    with trio.fail_after(10):
        async with seam(device, max_in_flight=8192) as (client, _):
            await client.send(b"".join(request(READ, i, 0, 4096) for i in range(6)))
            await wait_until(lambda: device.started == 2)
            await trio.sleep(0.1)  # room for a third request to be wrongly started
            assert device.started == 2
            device.gate.set()
            cookies = set()
            for _ in range(6):
                error, cookie = await client.simple_reply()
                assert error == 0
                assert await client.recv_exactly(4096) == bytes(4096)
                cookies.add(cookie)
            assert cookies == set(range(6))


async def test_backpressure_with_threaded_writes() -> None:
    device = GatedDevice()
    with trio.fail_after(15):
        async with seam(device, max_in_flight=8192) as (client, _):
            try:
                await client.send(
                    b"".join(request(WRITE, i, i * 4096, 4096) + bytes(4096) for i in range(6))
                )
                await wait_until(lambda: device.writes_started == 2)
                await trio.sleep(0.1)
                assert device.writes_started == 2
            finally:
                device.gate.set()
            assert {await client.simple_reply() for _ in range(6)} == {(0, i) for i in range(6)}


class _InstantAsync(AsyncMemDevice):
    """Async reads that complete without ever yielding to the event loop."""

    async def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
        return bytes(self.data[offset : offset + length])


async def test_backpressure_does_not_stall_when_in_flight_work_finishes_during_a_send() -> None:
    # Each round: a READ that uses the whole budget, an unknown command whose error reply is
    # queued, and a READ that must wait for room. While the engine sends the queued reply, the
    # first READ may finish (trio picks the order); the engine must notice that instead of
    # waiting for a wake-up that already happened. Many rounds make the race near certain.
    rounds = 30
    stream = b"".join(
        request(READ, 3 * i, 0, 4096) + request(99, 3 * i + 1) + request(READ, 3 * i + 2, 0, 4096)
        for i in range(rounds)
    )
    with trio.fail_after(10):
        async with seam(_InstantAsync(), max_in_flight=4096) as (client, _):
            await client.send(stream)
            got = {}
            with trio.move_on_after(5):
                for _ in range(3 * rounds):
                    error, cookie = await client.simple_reply()
                    if error == 0:
                        await client.recv_exactly(4096)
                    got[cookie] = error
            expected = {c: EINVAL if c % 3 == 1 else 0 for c in range(3 * rounds)}
            assert got == expected, f"engine stalled after {len(got)} of {3 * rounds} replies"


# -- capabilities ----------------------------------------------------------------------------


class _ReadOnly(Device):
    blocking = False

    def __init__(self) -> None:
        self.size = 1 << 16

    def read(self, offset: int, length: int) -> bytes:
        return b"r" * length


async def test_device_without_write_is_read_only() -> None:
    with trio.fail_after(10):
        async with seam(_ReadOnly()) as (client, export):
            assert export.flags & T_READ_ONLY
            assert not export.flags & (T_SEND_WRITE_ZEROES | T_SEND_TRIM | T_SEND_FUA)
            assert await client.write(0, b"payload") == EPERM
            assert await client.call(WRITE_ZEROES, 2, 0, 10) == EPERM
            assert await client.call(TRIM, 3, 0, 10) == EPERM
            assert await client.read(0, 3) == b"rrr"  # the payload was consumed


async def test_read_only_export_of_a_writable_device() -> None:
    device = MemDevice()
    with trio.fail_after(10):
        async with seam(device, read_only=True) as (client, export):
            assert export.flags & T_READ_ONLY
            assert await client.write(0, b"payload") == EPERM
            assert await client.read(0, 7) == bytes(7)
    assert "write" not in device.calls


class _NoTrim(Device):
    blocking = False

    def __init__(self) -> None:
        self.size = 1 << 16
        self.data = bytearray(self.size)
        self.calls: list[tuple[str, int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.calls.append(("write", offset, len(data)))
        self.data[offset : offset + len(data)] = data


async def test_device_without_trim_gets_no_trim() -> None:
    device = _NoTrim()
    with trio.fail_after(10):
        async with seam(device) as (client, export):
            assert not export.flags & T_SEND_TRIM
            assert not export.flags & (T_SEND_FLUSH | T_SEND_FUA)  # no flush either
            assert export.flags & T_HAS_FLAGS
            assert await client.call(TRIM, 1, 0, 512) == EINVAL
            assert await client.call(FLUSH, 2) == EINVAL
            assert await client.call(CACHE, 3, 0, 512) == EINVAL
            assert await client.write(0, b"x", flags=F_FUA) == EINVAL
            assert await client.read(0, 1) == b"\0"
    assert device.calls == []


async def test_zero_is_emulated_with_writes_and_fast_zero_is_refused() -> None:
    device = _NoTrim()
    device.data[:] = b"\xff" * device.size
    with trio.fail_after(10):
        async with seam(device) as (client, export):
            assert export.flags & T_SEND_WRITE_ZEROES
            assert export.flags & T_SEND_FAST_ZERO
            assert await client.call(WRITE_ZEROES, 1, 100, 5000, F_NO_HOLE) == 0
            assert await client.read(96, 5008) == b"\xff" * 4 + bytes(5000) + b"\xff" * 4
            calls_before = list(device.calls)
            assert await client.call(WRITE_ZEROES, 2, 0, 10, F_FAST_ZERO) == ENOTSUP
            assert await client.read(0, 10) == b"\xff" * 10
    assert calls_before == [("write", 100, 5000)]
    assert device.calls == calls_before  # the fast request never reached the device


async def test_large_zero_emulation_is_written_in_chunks() -> None:
    class Big(_NoTrim):
        def __init__(self) -> None:
            super().__init__()
            self.size = 3 << 20
            self.data = bytearray(b"\x01") * self.size

    device = Big()
    with trio.fail_after(10):
        async with seam(device) as (client, _):
            assert await client.call(WRITE_ZEROES, 1, 1, (3 << 20) - 2) == 0
    assert device.data[0] == 1
    assert device.data[-1] == 1
    assert device.data[1:-1] == bytes((3 << 20) - 2)
    assert all(length <= 1 << 20 for _, _, length in device.calls)
    assert sum(length for _, _, length in device.calls) == (3 << 20) - 2


@pytest.mark.parametrize("device_type", [MemDevice, ThreadedMemDevice, AsyncMemDevice])
async def test_fua_is_emulated_by_flushing_after_the_write(device_type: type[Device]) -> None:
    device = device_type()
    with trio.fail_after(10):
        async with seam(device) as (client, export):
            assert export.flags & T_SEND_FUA
            assert await client.write(0, b"abc") == 0
            assert device.calls == ["write"]  # type: ignore[attr-defined]
            assert await client.write(0, b"abc", flags=F_FUA) == 0
            assert device.calls == ["write", "write", "flush"]  # type: ignore[attr-defined]
            assert await client.call(TRIM, 3, 0, 1, F_FUA) == 0
            assert device.calls[-2:] == ["trim", "flush"]  # type: ignore[attr-defined]


# -- close -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device_type", [MemDevice, ThreadedMemDevice, AsyncMemDevice])
async def test_aclose_flushes_closes_once_and_later_calls_fail(device_type: type[Device]) -> None:
    device = device_type()
    export = Export(device)
    with trio.fail_after(10):
        await export.write(0, memoryview(b"x"), False)
        await export.aclose()
        await export.aclose()
        assert device.closed == 1  # type: ignore[attr-defined]
        assert device.calls[-1] == "flush"  # type: ignore[attr-defined]
        assert export.closed
        for call in (
            export.read(0, 1),
            export.write(0, memoryview(b"x"), False),
            export.flush(),
            export.trim(0, 1, False),
            export.zero(0, 1, may_trim=True, fua=False, fast=False),
        ):
            with pytest.raises(DeviceError) as info:
                await call
            assert info.value.errno == errno.ESHUTDOWN
    assert device.closed == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("device_type", [MemDevice, ThreadedMemDevice])
async def test_requests_after_close_get_errors_and_stay_in_sync(device_type: type[Device]) -> None:
    device = device_type()
    with trio.fail_after(10):
        async with seam(device) as (client, export):
            assert await client.write(0, b"x") == 0
            await export.aclose()
            await client.send(request(READ, 1, 0, 4) + request(WRITE, 2, 0, 2) + b"zz")
            got = {await client.simple_reply(), await client.simple_reply()}
            assert got == {(ESHUTDOWN, 1), (ESHUTDOWN, 2)}  # no data after the READ error
            await client.send(request(FLUSH, 3))
            assert await client.simple_reply() == (ESHUTDOWN, 3)
    assert device.closed == 1  # type: ignore[attr-defined]


def test_negative_size_is_refused() -> None:
    device = MemDevice()
    device.size = -1
    with pytest.raises(ValueError, match="negative"):
        Export(device)


def test_export_flags_follow_the_device() -> None:
    full = Export(MemDevice()).flags
    assert full & T_SEND_FLUSH
    assert full & T_SEND_FUA
    assert full & T_SEND_TRIM
    assert full & T_SEND_WRITE_ZEROES
    assert not full & T_READ_ONLY
    assert int(full) < 1 << 16  # fits the 16-bit field on the wire


class TryingDevice(ThreadedMemDevice):
    """A blocking device whose non-blocking attempts succeed only for the first 64 KiB (reads)
    and write at most 3 bytes at once, recording which thread did what."""

    def __init__(self) -> None:
        super().__init__()
        self.where: list[tuple[str, bool]] = []

    def _on_loop(self, what: str) -> None:
        self.where.append((what, threading.get_ident() == LOOP_THREAD))

    def read(self, offset: int, length: int) -> bytes:
        self._on_loop("read")
        return super().read(offset, length)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._on_loop("write")
        super().write(offset, data, fua)

    def try_read(self, offset: int, length: int) -> bytes | None:
        self._on_loop("try_read")
        if offset + length > 65536:
            return None
        return bytes(self.data[offset : offset + length])

    def try_write(self, offset: int, data: memoryview) -> int:
        self._on_loop("try_write")
        done = min(3, len(data))
        self.data[offset : offset + done] = data[:done]
        return done


LOOP_THREAD = threading.get_ident()


async def test_a_blocking_device_is_tried_on_the_event_loop_first() -> None:
    """try_read that succeeds answers on the loop; one that declines goes to a thread; a
    partial try_write leaves the rest of the write to a thread; the data is all there."""
    device = TryingDevice()
    with trio.fail_after(10):
        async with seam(device) as (client, _):
            assert await client.write(0, b"abcdefgh") == 0
            assert await client.read(0, 8) == b"abcdefgh"
            assert await client.write(70000, b"xy") == 0
            assert await client.read(70000, 2) == b"xy"
    assert device.where == [
        ("try_write", True),
        ("write", False),
        ("try_read", True),
        ("try_write", True),
        ("try_read", True),
        ("read", False),
    ]
    assert bytes(device.data[:8]) == b"abcdefgh"


class DeclinedWrites(ThreadedMemDevice):
    """try_write never manages anything: every WRITE goes to the connection's writer thread."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[tuple[str, str]] = []

    def try_write(self, offset: int, data: memoryview) -> int:
        return 0

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        super().write(offset, data, fua)
        self.order.append((f"write {offset}", threading.current_thread().name))

    def flush(self) -> None:
        super().flush()
        self.order.append(("flush", threading.current_thread().name))


async def test_declined_writes_go_to_one_writer_thread_in_order_before_a_flush() -> None:
    device = DeclinedWrites()
    pipelined = b"".join(request(WRITE, 100 + i, i * 512, 4) + b"%04d" % i for i in range(16))
    with trio.fail_after(15):
        async with seam(device) as (client, _):
            await client.send(pipelined + request(FLUSH, 200))
            replies = {await client.simple_reply() for _ in range(17)}
            assert replies == {(0, cookie) for cookie in [*range(100, 116), 200]}
            assert await client.read(15 * 512, 4) == b"0015"
    # One thread wrote them all, in the order sent; the FLUSH came after every write (the
    # connection flushes once more as it ends).
    writes = device.order[:16]
    assert [what for what, _ in writes] == [f"write {i * 512}" for i in range(16)]
    assert len({thread for _, thread in writes}) == 1
    assert writes[0][1].endswith("writer")
    assert device.order[16][0] == "flush"


class SlowDeclinedWrites(DeclinedWrites):
    """Writes that take a while, as a disk's can: the writer thread falls behind the loop."""

    def __init__(self, size: int, fail_at: int = -1) -> None:
        super().__init__()
        self.size = size
        self.data = bytearray(size)
        self.fail_at = fail_at

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        time.sleep(0.001)
        if offset == self.fail_at:
            raise OSError(errno.ENOSPC, "full")
        super().write(offset, data, fua)


async def test_payloads_stay_intact_while_the_writer_is_behind_and_buffers_stay_bounded() -> None:
    """Far more pipelined write data than the receive buffers hold, each payload different,
    while the writer thread lags: every byte lands where it was sent (the loop swapped in
    spare buffers instead of overwriting payloads the writer still had to write), the
    connection never held more than its quota of buffers, and the failing write alone got
    its error."""
    size = 24 << 20
    chunk = 200_000  # not a divisor of the buffer: requests straddle buffer ends
    count = size // chunk
    device = SlowDeclinedWrites(size, fail_at=7 * chunk)
    payloads = [bytes([i % 251]) * (chunk - 1) + bytes([i % 7]) for i in range(count)]
    connection, client = connected(device)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve)
            await wait_until(lambda: connection._behind is not None)
            behind = connection._behind
            assert behind is not None

            async def send_all() -> None:
                for i, payload in enumerate(payloads):
                    await client.send(request(WRITE, i, i * chunk, chunk) + payload)

            nursery.start_soon(send_all)
            replies: dict[int, int] = {}
            for _ in range(count):
                error, cookie = await client.simple_reply()
                replies[cookie] = error
            assert replies == {i: ENOSPC if i == 7 else 0 for i in range(count)}
            await client.send(request(DISC))
    await client.aclose()
    assert behind.buffers <= 4
    assert connection._behind is None  # let go at the end, with its buffers
    for i, payload in enumerate(payloads):
        if i != 7:
            assert device.data[i * chunk : (i + 1) * chunk] == payload, i
    assert device.order[-1][0] == "flush"  # the flush at disconnect came after the writes


async def test_a_flush_waiting_for_the_writer_is_answered_while_the_loop_waits_for_room() -> None:
    """Writes queued to the writer, then a FLUSH (which waits for them), then FUA writes that
    fill the connection's budget of bytes in flight: the loop stops to wait for room while
    the FLUSH waits for the writer's batches. Everything is answered."""
    device = SlowDeclinedWrites(1 << 20)
    data = b"".join(request(WRITE, i, i * 4096, 4096) + bytes([i]) * 4096 for i in range(8))
    data += request(FLUSH, 100)
    data += b"".join(
        request(WRITE, 200 + i, i * 4096, 4096, F_FUA) + bytes([i]) * 4096 for i in range(8)
    )
    with trio.fail_after(30):
        async with seam(device, max_in_flight=4096) as (client, _):
            await client.send(data)
            replies = {await client.simple_reply() for _ in range(17)}
    assert replies == {(0, cookie) for cookie in [*range(8), 100, *range(200, 208)]}


async def test_writes_queued_when_the_client_vanishes_are_written_then_flushed() -> None:
    device = SlowDeclinedWrites(1 << 20)
    data = b"".join(request(WRITE, i, i * 4096, 4096) + bytes([i]) * 4096 for i in range(50))
    with trio.fail_after(30):
        async with seam(device) as (client, _):
            await client.send(data)
    # seam waits for the connection to end: the writer had finished and the flush followed.
    assert [what for what, _ in device.order] == [f"write {i * 4096}" for i in range(50)] + [
        "flush"
    ]
    assert all(device.data[i * 4096 : (i + 1) * 4096] == bytes([i]) * 4096 for i in range(50))


# -- defects a review found, each reproduced -----------------------------------------------


class BusyReadsDeclinedWrites(ThreadedMemDevice):
    """Every WRITE goes to the writer thread and takes a few ms there, while a try_read
    keeps the event loop busy for longer: the writer finishes while the loop is busy."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()

    def try_write(self, offset: int, data: memoryview) -> int:
        return 0

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.writing.set()
        time.sleep(0.02)
        super().write(offset, data, fua)

    def try_read(self, offset: int, length: int) -> bytes | None:
        time.sleep(0.1)
        return bytes(self.data[offset : offset + length])


@pytest.mark.parametrize("end", ["disc", "eof"])
async def test_a_connection_ending_while_the_writer_holds_writes_answers_them_and_ends(
    end: str,
) -> None:
    """WRITE, then READ and DISC (or EOF) in one go: the writer finishes the WRITE while the
    loop is busy with the READ, so it does not wake the loop; the end of the connection must
    still collect it, send its reply and return."""
    device = BusyReadsDeclinedWrites()
    connection, client = connected(device)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve)
            await client.send(request(WRITE, 1, 0, 4) + b"abcd")
            await wait_until(device.writing.is_set)  # the READ arrives while it writes
            tail = request(READ, 2, 0, 4) + (request(DISC, 3) if end == "disc" else b"")
            await client.send(tail)
            if end == "eof":
                client.stream.socket.shutdown(trio.socket.SHUT_WR)
            replies = {}
            for _ in range(2):
                error, cookie = await client.simple_reply()
                replies[cookie] = error
                if cookie == 2:  # overlapping the WRITE in flight: either data will do
                    assert await client.recv_exactly(4) in (b"abcd", bytes(4))
            assert replies == {1: 0, 2: 0}
            # serve() returns: the nursery exits within the deadline.
    await client.aclose()
    assert bytes(device.data[:4]) == b"abcd"


class OddReads(MemDevice):
    """Inline reads that return the right number of items in the wrong shape."""

    def read(self, offset: int, length: int) -> Any:
        if offset == 0:  # `length` items of 4 bytes each
            return memoryview(array.array("I", bytes(4 * length)))
        if offset == 4096:  # `length` bytes, but not contiguous
            return memoryview(bytes(2 * length))[::2]
        if offset == 8192:  # not bytes at all
            return [0] * length
        return super().read(offset, length)


@pytest.mark.parametrize("offset", [0, 4096, 8192])
async def test_a_read_of_the_wrong_shape_costs_that_request_only(offset: int) -> None:
    device = OddReads()
    device.data[20000:20004] = b"good"
    with trio.fail_after(10):
        async with seam(device) as (client, _):
            await client.send(request(READ, 1, offset, 16))
            assert await client.simple_reply() == (errno.EIO, 1)
            assert await client.read(20000, 4) == b"good"


async def test_a_read_of_the_wrong_shape_does_not_take_the_server_down(tmp_path: Path) -> None:
    device = OddReads()
    device.data[20000:20004] = b"good"
    with trio.fail_after(10):
        async with serving([Export(device)], str(tmp_path / "s")) as connect:
            bystander = await connect()
            await bystander.go("")
            culprit = await connect()
            await culprit.go("")
            await culprit.send(request(READ, 1, 0, 16))
            assert await culprit.simple_reply() == (errno.EIO, 1)
            assert await bystander.read(20000, 4) == b"good"
            assert await culprit.read(20000, 4) == b"good"


class LyingTryWrite(ThreadedMemDevice):
    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def try_write(self, offset: int, data: memoryview) -> int:
        return self.count


@pytest.mark.parametrize("count", [-1, 5, 1 << 40])
async def test_a_try_write_count_out_of_range_is_an_error_reply(count: int) -> None:
    device = LyingTryWrite(count)
    with trio.fail_after(10):
        async with seam(device) as (client, _):
            assert await client.write(100, b"abcd") == errno.EIO
            assert await client.read(100, 4) == bytes(4)  # nothing written behind the reply
    assert "write" not in device.calls


class MixedDevice(Device):
    def __init__(self) -> None:
        self.size = 4096

    async def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
        return bytes(length)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        pass


class TryOnInline(MemDevice):
    def try_read(self, offset: int, length: int) -> bytes | None:
        return None


class TryOnSerial(ThreadedMemDevice):
    parallel = False

    def try_write(self, offset: int, data: memoryview) -> int:
        return 0


class TryOnAsync(AsyncMemDevice):
    def try_read(self, offset: int, length: int) -> bytes | None:
        return None


class AsyncTry(ThreadedMemDevice):
    async def try_read(self, offset: int, length: int) -> bytes | None:  # type: ignore[override]
        return None


class TryWriteReadOnly(ThreadedMemDevice):
    write = Device.write  # type: ignore[assignment]

    def try_write(self, offset: int, data: memoryview) -> int:
        return 0


@pytest.mark.parametrize(
    ("device_type", "words"),
    [
        (MixedDevice, ["MixedDevice.write", "async def", "MixedDevice.read"]),
        (TryOnInline, ["TryOnInline.try_read", "blocking = True", "parallel = True"]),
        (TryOnSerial, ["TryOnSerial.try_write", "parallel = True"]),
        (TryOnAsync, ["TryOnAsync.try_read", "plain"]),
        (AsyncTry, ["AsyncTry.try_read", "plain function"]),
        (TryWriteReadOnly, ["TryWriteReadOnly.try_write", "write"]),
    ],
)
def test_an_inconsistent_execution_model_is_refused_when_the_export_is_built(
    device_type: type[Device], words: list[str]
) -> None:
    with pytest.raises(TypeError) as refused:
        Export(device_type())
    for word in words:
        assert word in str(refused.value)


class CountingTryRead(ThreadedMemDevice):
    def __init__(self) -> None:
        super().__init__(8 << 20)
        self.tried: list[int] = []

    def try_read(self, offset: int, length: int) -> bytes | None:
        self.tried.append(length)
        return bytes(self.data[offset : offset + length])


async def test_try_read_is_not_asked_for_more_than_the_fast_path_cap() -> None:
    """A try_read copies on the event loop: a 4 MiB read goes to a worker thread at once."""
    device = CountingTryRead()
    with trio.fail_after(10):
        async with seam(device) as (client, _):
            assert await client.read(0, 4 << 20) == bytes(4 << 20)
            assert await client.read(0, 4096) == bytes(4096)
    assert device.tried == [4096]
    assert device.calls == ["read"]


async def test_rounds_of_declined_writes_each_awaiting_its_replies_are_all_answered() -> None:
    """A client that sends 64 writes and waits for their 64 replies, round after round (as
    the suite's pipelined writes do): replies the loop collects just before it waits must
    still be sent, or a round stalls a few replies short."""
    device = DeclinedWrites()
    with trio.fail_after(20):
        async with seam(device) as (client, _):
            for round_ in range(20):
                data = b"".join(
                    request(WRITE, i, i * 4096, 4096) + bytes([round_]) * 4096 for i in range(64)
                )
                await client.send(data)
                assert {await client.simple_reply() for _ in range(64)} == {
                    (0, i) for i in range(64)
                }
    assert bytes(device.data[: 64 * 4096]) == bytes([19]) * (64 * 4096)


class SlowThreadReadsDeclinedWrites(DeclinedWrites):
    """Writes go to the writer thread; reads decline the fast path and take a while in a
    worker thread."""

    def try_read(self, offset: int, length: int) -> bytes | None:
        return None

    def read(self, offset: int, length: int) -> bytes:
        time.sleep(0.05)
        return super().read(offset, length)


async def test_writes_deferred_when_the_stream_breaks_are_still_written_then_flushed() -> None:
    """A bad request right behind declined writes, in the same batch: the connection closes
    before the batch was handed over, and the writes are still written, then flushed."""
    device = DeclinedWrites()
    data = b"".join(request(WRITE, i, i * 512, 4) + b"%04d" % i for i in range(3))
    with trio.fail_after(10):
        async with seam(device) as (client, _):
            await client.send(data + b"\xff" * 28)
            assert await client.closed_by_server()
    assert [what for what, _ in device.order] == ["write 0", "write 512", "write 1024", "flush"]
    assert bytes(device.data[1024:1028]) == b"0002"


async def test_an_unexpected_error_ends_that_connection_only_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug (here: the transport's send raising something that is not a peer's doing) must
    not escape serve(), where it would take the server's nursery and every connection down:
    it is logged and this connection closes."""
    device = MemDevice()
    connection, client = connected(device)

    async def broken_send(chunks: object) -> None:
        raise RuntimeError("a bug in the engine")

    connection.transport.send = broken_send  # type: ignore[method-assign]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve)  # returns instead of raising
            await client.send(request(READ, 1, 0, 4))
            assert await client.closed_by_server()
    await client.aclose()
    assert "closing on an unexpected error" in caplog.text
    assert "a bug in the engine" in caplog.text


# -- found by review of the write-behind object ---------------------------------------


class GatedDeclined(ThreadedMemDevice):
    """Every WRITE goes to the writer thread, which waits for the test's go."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def try_write(self, offset: int, data: memoryview) -> int:
        return 0

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        assert self.go.wait(10)
        super().write(offset, data, fua)


@pytest.mark.parametrize("end", ["disc", "eof"])
async def test_a_reply_the_sender_is_sending_survives_the_end_of_the_stream(end: str) -> None:
    """The writer finishes a WRITE while the loop waits: the sender task sends its reply. The
    peer is slow to read at that moment (its receive window is full: simulated by a send that
    waits), and meanwhile it sends DISC (or half-closes). The sender must not be cancelled in
    the middle of that send: the reply would be lost (or, on a real socket, cut in half)."""
    device = GatedDeclined()
    connection, client = connected(device)
    real_send = connection.transport.send
    stalled = trio.Event()
    release = trio.Event()

    async def slow_peer_send(chunks: object) -> None:
        if not release.is_set():
            stalled.set()
            await release.wait()  # wait_writable on a full socket, in effect
        await real_send(chunks)  # type: ignore[arg-type]

    connection.transport.send = slow_peer_send  # type: ignore[method-assign]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve)
            await client.send(request(WRITE, 1, 0, 4) + b"abcd")
            await trio.sleep(0.05)  # the loop is waiting for the client now
            device.go.set()
            await stalled.wait()  # the sender task is sending the WRITE's reply
            if end == "disc":
                await client.send(request(DISC, 2))
            else:
                client.stream.socket.shutdown(trio.socket.SHUT_WR)
            await trio.sleep(0.1)
            release.set()  # the peer reads again
            try:
                reply = await client.simple_reply()
            except Closed:
                reply = None
    await client.aclose()
    assert bytes(device.data[:4]) == b"abcd"  # written...
    assert reply == (0, 1)  # ...but is it answered?


class Declined(ThreadedMemDevice):
    def try_write(self, offset: int, data: memoryview) -> int:
        return 0


@pytest.mark.parametrize("device_type", [MemDevice, Declined])
async def test_a_finished_connection_is_freed_without_the_cycle_collector(
    device_type: type,
) -> None:
    """A connection lets go of its buffers (4 MiB, up to 32 MiB after a long WRITE) as it
    ends, not when the cycle collector finds them: the connection and its WriteBehind refer
    to each other until the end breaks the cycle."""
    device = device_type()
    connection, client = connected(device)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve)
            await client.send(request(WRITE, 1, 0, 4) + b"abcd")
            await client.simple_reply()
            await client.send(request(DISC, 2))
            assert await client.closed_by_server()
    await client.aclose()
    gc.collect()
    gc.disable()
    try:
        ref = weakref.ref(connection)
        del connection
        alive = ref() is not None
    finally:
        gc.enable()
    assert not alive


class OneAtATime(ThreadedMemDevice):
    """Every WRITE goes to the writer thread, which writes one per release by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.permits = threading.Semaphore(0)

    def try_write(self, offset: int, data: memoryview) -> int:
        return 0

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        assert self.permits.acquire(timeout=10)
        super().write(offset, data, fua)


async def test_every_write_is_answered_when_disc_arrives_while_the_sender_is_blocked() -> None:
    """The same with a real socket and no wrapper: a client that is not reading for a moment
    (its receive window full: here a small SO_SNDBUF on the server side so that a few
    replies fill it), then sends DISC and reads everything. Every WRITE was written, so
    every WRITE must be answered before the server closes."""
    device = OneAtATime()
    connection, client = connected(device)
    connection.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    count = 40
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve)
            for i in range(count):  # a batch and a round each, finished while the loop waits
                await client.send(request(WRITE, i, i * 4, 4) + b"%04d" % i)
                await trio.sleep(0.002)
                device.permits.release()
                await trio.sleep(0.002)
            await trio.sleep(0.1)
            sender_blocked = connection._sending
            await client.send(request(DISC, 999))
            await trio.sleep(0.2)
            cookies = []
            try:
                while True:
                    cookies.append((await client.simple_reply())[1])
            except Closed:
                pass
    await client.aclose()
    assert sender_blocked  # the sender was stuck in a send when DISC came
    assert all(device.data[i * 4 : i * 4 + 4] == b"%04d" % i for i in range(count))
    assert sorted(cookies) == list(range(count)), f"{count - len(cookies)} replies lost"


async def test_a_writer_thread_that_cannot_start_does_not_make_serve_raise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Thread.start failing (RuntimeError: can't start new thread, under a thread limit)
    ends that connection; serve() does not raise (it would take the server down), and
    nothing tries to join a thread that never started."""

    class NoStart(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(writer_module, "threading", types.SimpleNamespace(Thread=NoStart))
    device = Declined()
    connection, client = connected(device)
    raised: list[BaseException] = []

    async def serve() -> None:
        try:
            await connection.serve()
        except BaseException as exc:
            raised.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client.send(request(WRITE, 1, 0, 4) + b"abcd")
            assert await client.closed_by_server()
    await client.aclose()
    assert raised == [], raised


class ExitingWrite(Declined):
    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        raise SystemExit("a device that calls sys.exit in a write")


async def test_a_write_raising_a_base_exception_in_the_writer_thread_is_an_error_reply() -> None:
    """Not only Exception: whatever a write raises is that write's error reply, so that the
    batch is reported and the end of the connection does not wait for it forever."""
    device = ExitingWrite()
    with trio.fail_after(10):
        async with seam(device) as (client, _):
            assert await client.write(0, b"abcd") == errno.EIO
            assert await client.read(0, 4) == bytes(4)
