"""The conformance suite: :class:`DeviceTests`, which every driver's tests subclass."""

from __future__ import annotations

import errno
import inspect
import random
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

from .._constants import ExtentFlag, TransmissionFlag
from .._device import Device
from .._export import Export
from ..cli import Listen, serve
from ._calls import DeviceUnderTest
from ._client import (
    BLOCK_STATUS,
    CACHE,
    READ,
    TRIM,
    WRITE,
    WRITE_ZEROES,
    InProcessServer,
    NbdClient,
    NbdError,
    serve_in_process,
)
from ._data import MiB, alternating_image, assert_same_bytes, random_bytes, sha256
from ._harness import DeviceHarness, MakeDevice, ReopenDevice
from ._model import (
    DirectTarget,
    EngineTarget,
    Target,
    block_status_runs,
    model_settings,
    run_model,
)

#: (offset, length, flags) runs describing allocation from an offset on.
Runs = list[tuple[int, int, int]]

__all__ = ["DeviceTests"]

_ZERO = int(ExtentFlag.ZERO)
_BLOCK = 4096
#: How many requests the engine tests keep in flight at once.
_DEPTH = 64


async def _gather(*calls: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run every call at once (so their requests are in flight together); results in order."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int, fn: Callable[[], Awaitable[Any]]) -> None:
        results[i] = await fn()

    async with trio.open_nursery() as nursery:
        for i, fn in enumerate(calls):
            nursery.start_soon(one, i, fn)
    return results


async def _read_all(read: Callable[[int, int], Awaitable[bytes]], size: int, step: int) -> bytes:
    out = bytearray()
    for offset in range(0, size, step):
        out += await read(offset, min(step, size - offset))
    return bytes(out)


async def _check_extents(
    extents: Callable[[int, int], Awaitable[Runs]],
    read: Callable[[int, int], Awaitable[bytes]],
    size: int,
) -> None:
    """Walk the whole device by extents; every run reported ZERO must read as zeros."""
    pos = 0
    while pos < size:
        runs = await extents(pos, size - pos)
        for start, length, flags in runs:
            lo, hi = max(start, pos), min(start + length, size)
            if flags & _ZERO and lo < hi:
                for at in range(lo, hi, MiB):
                    n = min(MiB, hi - at)
                    assert_same_bytes(bytes(n), await read(at, n), at, "range reported ZERO")
        covered = max(start + length for start, length, _ in runs if start <= pos)
        assert covered > pos, f"extents from {pos} make no progress: {runs}"
        pos = covered


async def _write_pipelined(client: NbdClient, image: bytes, block: int = _BLOCK) -> None:
    """Write ``image`` block by block, ``_DEPTH`` requests in flight at a time."""
    offsets = list(range(0, len(image), block))
    for i in range(0, len(offsets), _DEPTH):
        await _gather(
            *(partial(client.write, o, image[o : o + block]) for o in offsets[i : i + _DEPTH])
        )


def _count_closes(device: Device) -> list[int]:
    """Count calls of ``device.close`` (a list holding one int), keeping its execution model."""
    count = [0]
    original = device.close
    if inspect.iscoroutinefunction(original):

        async def counted() -> None:
            count[0] += 1
            await original()

        setattr(device, "close", counted)  # noqa: B010 - instance attribute, mypy-proof
    else:

        def counted_sync() -> None:
            count[0] += 1
            original()

        setattr(device, "close", counted_sync)  # noqa: B010
    return count


class DeviceTests:
    """The shared device test suite; a driver's tests subclass it and supply fixtures.

    Fixture contract (all that a subclass must or may provide):

    ``make_device`` (required)
        A fixture returning a factory ``size -> Device``: every call makes a new device of
        exactly ``size`` bytes (sizes used are multiples of 1 MiB) that reads as zeros. The
        factory may be a plain function or ``async def`` (for drivers that must await to
        set up); the fixture may use any other fixture (``tmp_path``, servers, ...) and is
        responsible for cleaning up storage afterwards. The suite closes every device it
        made, exactly once, flushing first as the engine does.

    ``reopen_device`` (persistent drivers, which subclass :class:`PersistentDeviceTests`)
        A fixture returning a function ``Device -> Device`` (plain or ``async def``): given
        a device the suite has flushed and closed, open its storage again and return the
        new device. The suite then checks that everything written survives reopening,
        directly and through the engine, and adds reopening to the model-based test.

    Class attributes to tune the suite:

    * ``persistent`` -- set by :class:`PersistentDeviceTests`; not to be set by hand.
    * ``trim_zeroes`` -- trimmed ranges read back as zeros. Otherwise the suite treats
      trimmed bytes as unspecified (NBD allows a trimmed range to read as anything).
    * ``device_size`` -- size of the devices most tests use (8 MiB); the full-device
      pattern tests write all of it.
    * ``model_size``, ``model_examples``, ``model_steps`` -- the model-based test's device
      size and Hypothesis budget for the default run; ``slow_model_examples`` for the run
      marked ``slow``.
    * ``timeout`` -- the ceiling on each test, in seconds.

    Devices may be of any execution model (plain non-blocking, plain blocking run in
    threads, or ``async def``): tests call them through :class:`DeviceUnderTest`. Tests
    that go through the engine serve the device in-process (:func:`serve_in_process`) and
    talk NBD with :class:`NbdClient`. Tests for capabilities a device lacks (it has no
    ``trim``, it is read-only, ...) are skipped.

    Requirements on the test run: pytest-trio (every test is marked ``trio``, so its
    ``trio_mode`` is not needed) and, under ``--strict-markers``, a registered ``slow``
    marker (the long model-based runs carry it).
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.trio]

    persistent: ClassVar[bool] = False
    trim_zeroes: ClassVar[bool] = False
    device_size: ClassVar[int] = 8 * MiB
    model_size: ClassVar[int] = 1 * MiB
    model_examples: ClassVar[int] = 15
    model_steps: ClassVar[int] = 25
    slow_model_examples: ClassVar[int] = 300
    timeout: ClassVar[float] = 60.0

    # -- fixtures --------------------------------------------------------------------------

    @pytest.fixture
    def make_device(self) -> MakeDevice:
        pytest.fail(f"{type(self).__name__} must define a make_device fixture")

    @pytest.fixture
    def reopen_device(self) -> ReopenDevice | None:
        return None

    @pytest.fixture
    async def device_harness(
        self, make_device: MakeDevice, reopen_device: ReopenDevice | None
    ) -> AsyncIterator[DeviceHarness]:
        if self.persistent and reopen_device is None:
            pytest.fail(f"{type(self).__name__} is persistent but has no reopen_device fixture")
        harness = DeviceHarness(make_device, reopen_device if self.persistent else None)
        try:
            yield harness
        finally:
            with trio.CancelScope(shield=True):
                await harness.aclose()

    # -- helpers ---------------------------------------------------------------------------

    async def _writable(self, harness: DeviceHarness) -> DeviceUnderTest:
        dut = await harness.new(self.device_size)
        if not dut.can_write:
            pytest.skip("the device is read-only")
        return dut

    async def _verify(self, dut: DeviceUnderTest, image: bytes, what: str) -> None:
        """Byte by byte, then by SHA-256 of everything read."""
        got = await _read_all(dut.read, dut.size, MiB)
        assert_same_bytes(image, got, 0, what)
        assert sha256(got) == sha256(image), what

    @asynccontextmanager
    async def _served(
        self, dut: DeviceUnderTest, *, close: bool = True
    ) -> AsyncIterator[InProcessServer]:
        async with serve_in_process(dut.export, close=close) as server:
            yield server

    # -- what the original suite checked ---------------------------------------------------

    async def test_fresh_device_reads_zeros(self, device_harness: DeviceHarness) -> None:
        with trio.fail_after(self.timeout):
            dut = await device_harness.new(self.device_size)
            got = await _read_all(dut.read, dut.size, MiB)
            assert_same_bytes(bytes(dut.size), got, 0, "fresh device")

    async def test_one_byte_write_and_read_at_offset_zero(
        self, device_harness: DeviceHarness
    ) -> None:
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            assert await dut.read(0, 1) == b"\0"
            await dut.write(0, b"\xa5")
            assert await dut.read(0, 1) == b"\xa5"
            assert await dut.read(0, 2) == b"\xa5\0"
            await dut.write(0, b"\x5a")
            assert await dut.read(0, 1) == b"\x5a"
            last = dut.size - 1
            await dut.write(last, b"\x7e")
            assert await dut.read(last, 1) == b"\x7e"
            assert await dut.read(last - 1, 2) == b"\0\x7e"

    async def test_single_byte_pattern(self, device_harness: DeviceHarness) -> None:
        """Single-byte writes over the first few MiB (every byte of the first 512, a few
        around each 64 KiB boundary, then a stride), read back one by one and in bulk."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            span = min(4 * MiB, dut.size)
            offsets = set(range(512)) | set(range(0, span, 4093))
            for boundary in range(_BLOCK, span, 16 * _BLOCK):
                offsets |= set(range(boundary - 3, min(boundary + 3, span)))
            expected = bytearray(span)
            for offset in sorted(offsets):
                value = (offset * 131 + 7) % 255 + 1
                expected[offset] = value
                await dut.write(offset, bytes([value]))
            for offset in sorted(offsets):
                got = await dut.read(offset, 1)
                assert got[0] == expected[offset], f"byte at {offset}"
            assert_same_bytes(expected, await _read_all(dut.read, span, MiB), 0, "bulk read")

    async def test_alternating_data_and_zero_blocks(self, device_harness: DeviceHarness) -> None:
        """The whole device in 4 KiB blocks, data and zeros alternating; then the other way
        round, so every block is overwritten by zeros or by data once."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            for odd in (False, True):
                image = alternating_image(dut.size, _BLOCK, seed=f"alternating-{odd}", odd=odd)
                for offset in range(0, dut.size, _BLOCK):
                    await dut.write(offset, image[offset : offset + _BLOCK])
                await self._verify(dut, image, f"alternating blocks (odd={odd})")

    async def test_every_call_fails_after_close(self, device_harness: DeviceHarness) -> None:
        with trio.fail_after(self.timeout):
            dut = await device_harness.new(self.device_size)
            if dut.can_write:
                await dut.write(0, b"data")
            await dut.close()
            calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("read", lambda: dut.read(0, 1)),
            ]
            if dut.can_write:
                calls.append(("write", lambda: dut.write(0, b"x")))
            if dut.can_flush:
                calls.append(("flush", dut.flush))
            if dut.can_trim:
                calls.append(("trim", lambda: dut.trim(0, _BLOCK)))
            if dut.can_zero:
                calls.append(("zero", lambda: dut.zero(0, _BLOCK, may_trim=False)))
            if dut.can_extents:
                calls.append(("extents", lambda: dut.extents(0, _BLOCK)))
            if dut.can_cache:
                calls.append(("cache", lambda: dut.cache(0, _BLOCK)))
            for name, fn in calls:
                with pytest.raises(OSError):
                    await fn()
                    pytest.fail(f"{name} after close did not fail")

    # -- direct: unaligned I/O, trim, zero, extents, cache ---------------------------------

    async def test_unaligned_writes_across_boundaries(self, device_harness: DeviceHarness) -> None:
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            expected = bytearray(dut.size)
            rng = random.Random("unaligned")
            cases = [(1, 1), (511, 2), (4095, 2), (4090, 4097), (65535, 3), (65530, 65540)]
            cases += [(MiB - 1, 3), (dut.size - 4097, 4097), (dut.size - 70_000, 70_000)]
            cases += [(rng.randrange(dut.size - 9000), rng.randrange(1, 9000)) for _ in range(20)]
            for offset, length in cases:
                data = random_bytes(length, f"{offset}+{length}")
                await dut.write(offset, data)
                expected[offset : offset + length] = data
                assert_same_bytes(data, await dut.read(offset, length), offset, "read back")
            await self._verify(dut, bytes(expected), "after unaligned writes")

    async def test_trim_keeps_neighbours(self, device_harness: DeviceHarness) -> None:
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            if not dut.can_trim:
                _not_offered(dut, TransmissionFlag.SEND_TRIM)
                return
            image = bytearray(random_bytes(dut.size, "trim"))
            await dut.write(0, bytes(image[: 4 * MiB]))
            await dut.write(4 * MiB, bytes(image[4 * MiB :]))
            ranges = [(1000, 10_000), (65_535, 65_538), (3 * MiB + 1, 2 * MiB - 2)]
            for offset, length in ranges:
                await dut.trim(offset, length)
            got = await _read_all(dut.read, dut.size, MiB)
            for offset, length in ranges:
                if self.trim_zeroes:
                    image[offset : offset + length] = bytes(length)
                else:  # unspecified: take whatever the device says
                    image[offset : offset + length] = got[offset : offset + length]
            assert_same_bytes(image, got, 0, "after trims")
            await dut.trim(0, dut.size)
            if self.trim_zeroes:
                await self._verify(dut, bytes(dut.size), "after trimming everything")

    async def test_zero_keeps_neighbours(self, device_harness: DeviceHarness) -> None:
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            if not dut.can_zero:
                # The engine writes zeros instead, and cannot promise a fast zero.
                assert dut.export.flags & TransmissionFlag.SEND_WRITE_ZEROES
                with pytest.raises(OSError) as refused:
                    await dut.export.zero(0, 4096, may_trim=False, fua=False, fast=True)
                assert refused.value.errno == errno.ENOTSUP
                return
            image = bytearray(random_bytes(dut.size, "zero"))
            await dut.write(0, bytes(image))
            cases = [
                (1000, 10_000, False, False),
                (65_535, 65_538, True, False),
                (3 * MiB + 1, 2 * MiB - 2, True, False),
                (6 * MiB - 5, 9, False, False),
                (2 * MiB, MiB, True, True),
            ]
            for offset, length, may_trim, fast in cases:
                try:
                    await dut.zero(offset, length, may_trim=may_trim, fast=fast)
                except OSError as exc:
                    if not fast or exc.errno != errno.ENOTSUP:
                        raise
                    image[offset : offset + length] = await dut.read(offset, length)
                else:
                    image[offset : offset + length] = bytes(length)
            await self._verify(dut, bytes(image), "after zeroing")

    async def test_extents_consistent_with_data(self, device_harness: DeviceHarness) -> None:
        """Ranges reported ZERO read as zeros, before and after writes, trims and zeroes."""
        with trio.fail_after(self.timeout):
            dut = await device_harness.new(self.device_size)
            if not dut.can_extents:
                # Without extents everything is reported as data.
                assert await dut.export.extents(0, dut.size) == [(dut.size, 0)]
                return
            target = DirectTarget(device_harness, dut)
            await _check_extents(target.extents, target.read, dut.size)
            if dut.can_write:
                await dut.write(100, random_bytes(70_000, 1))
                await dut.write(2 * MiB, random_bytes(MiB, 2))
                await dut.write(5 * MiB + 3, bytes(8192))
            if dut.can_trim:
                await dut.trim(2 * MiB + 4096, 300_000)
            if dut.can_zero:
                await dut.zero(2 * MiB + 600_000, 200_000, may_trim=True)
            await _check_extents(target.extents, target.read, dut.size)

    async def test_cache_is_harmless(self, device_harness: DeviceHarness) -> None:
        with trio.fail_after(self.timeout):
            dut = await device_harness.new(self.device_size)
            if not dut.can_cache:
                _not_offered(dut, TransmissionFlag.SEND_CACHE)
                return
            if dut.can_write:
                await dut.write(5, b"cached")
            await dut.cache(0, dut.size)
            await dut.cache(3, 5)
            if dut.can_write:
                assert await dut.read(5, 6) == b"cached"

    # -- the model-based test --------------------------------------------------------------

    async def _model(self, harness: DeviceHarness, examples: int, *, engine: str) -> None:
        size = self.model_size
        async with trio.open_nursery() as nursery:

            async def open_target() -> Target:
                if engine == "direct":
                    return await DirectTarget.open(harness, size)
                return await EngineTarget.open(harness, size, nursery, handshake=engine == "engine")

            await run_model(
                open_target,
                size,
                trim_zeroes=self.trim_zeroes,
                settings=model_settings(examples, self.model_steps),
            )

    @pytest.mark.parametrize("path", ["direct", "engine", "kernel-style"])
    async def test_model(self, device_harness: DeviceHarness, path: str) -> None:
        """Random reads, writes, trims, zeroes and flushes at any offset, against a model;
        directly, through the engine with structured replies, and with simple replies and
        no handshake (as the kernel is served)."""
        # A generous ceiling: a passing run takes seconds, but shrinking a failure may not.
        with trio.fail_after(self.timeout * 5):
            await self._model(device_harness, self.model_examples, engine=path)

    @pytest.mark.slow
    @pytest.mark.parametrize("path", ["direct", "engine"])
    async def test_model_slow(self, device_harness: DeviceHarness, path: str) -> None:
        with trio.fail_after(self.timeout * 20):
            await self._model(device_harness, self.slow_model_examples, engine=path)

    # -- through the engine ----------------------------------------------------------------

    @pytest.mark.parametrize("mode", ["structured", "simple", "kernel-style"])
    async def test_engine_round_trip(self, device_harness: DeviceHarness, mode: str) -> None:
        """The alternating pattern over the whole device, pipelined, through NBD."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            image = alternating_image(dut.size, _BLOCK, seed=f"engine-{mode}")
            async with self._served(dut, close=False) as server:
                if mode == "kernel-style":
                    client = await server.connect_without_handshake()
                else:
                    client = await server.connect(structured=mode == "structured")
                assert client.size == dut.size
                await _write_pipelined(client, image)
                if client.can_flush:
                    await client.flush()
                step = min(256 * 1024, client.max_payload)
                reads = [
                    partial(client.read, o, min(step, dut.size - o))
                    for o in range(0, dut.size, step)
                ]
                got = b"".join(await _gather(*reads))
                assert_same_bytes(image, got, 0, f"{mode} read back")
                assert sha256(got) == sha256(image)
                if client.structured:
                    got = await _read_all(lambda o, n: client.read(o, n, df=True), dut.size, step)
                    assert_same_bytes(image, got, 0, "read back with DF")
            await self._verify(dut, image, "the device itself after serving")

    async def test_engine_overlapping_requests_in_flight(
        self, device_harness: DeviceHarness
    ) -> None:
        """64 overlapping writes at once, then 64 reads at once: every byte ends up as
        written by one of the writes that covered it (NBD leaves their order open)."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            region, base = 64 * 1024, MiB - 1000
            rng = random.Random("overlap")
            writes = []
            for i in range(_DEPTH):
                offset = base + rng.randrange(region - 1)
                length = rng.randrange(1, min(16 * 1024, base + region - offset) + 1)
                data = bytes(((offset + k) * 31 + i * 97) % 255 + 1 for k in range(length))
                writes.append((offset, data))
            reads = [(base, region)]
            reads += [(base + rng.randrange(region - 100), 100) for _ in range(_DEPTH - 1)]
            async with self._served(dut, close=False) as server:
                client = await server.connect()
                await _gather(*(partial(client.write, o, d) for o, d in writes))
                results = await _gather(*(partial(client.read, o, n) for o, n in reads))
            final = results[0]
            allowed: list[set[int]] = [{0} for _ in range(region)]
            for offset, data in writes:
                for k, value in enumerate(data):
                    cell = allowed[offset - base + k]
                    cell.discard(0)
                    cell.add(value)
            for k, value in enumerate(final):
                assert value in allowed[k], (
                    f"byte at {base + k} is {value}, not one of {sorted(allowed[k])}"
                )
            for (offset, length), result in zip(reads[1:], results[1:], strict=True):
                start = offset - base
                assert_same_bytes(final[start : start + length], result, offset, "reads agree")
            assert_same_bytes(final, await dut.read(base, region), base, "device after writes")

    async def test_engine_mixed_requests_in_flight(self, device_harness: DeviceHarness) -> None:
        """Writes, reads, trims, zeroes and flushes to disjoint places, all in flight at once."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            image = bytearray(random_bytes(dut.size, "mixed"))
            await dut.write(0, bytes(image))
            async with self._served(dut, close=False) as server:
                client = await server.connect()
                calls: list[Callable[[], Awaitable[Any]]] = []
                expect_reads: dict[int, tuple[int, int]] = {}
                unspecified: list[tuple[int, int]] = []
                slot = dut.size // (4 * _DEPTH)
                for i in range(4 * _DEPTH):
                    offset, length = i * slot + 3, slot - 7
                    kind = i % 4
                    if kind == 0:
                        data = random_bytes(length, i)
                        image[offset : offset + length] = data
                        calls.append(partial(client.write, offset, data))
                    elif kind == 1:
                        expect_reads[len(calls)] = (offset, length)
                        calls.append(partial(client.read, offset, length))
                    elif kind == 2 and client.can_trim:
                        if self.trim_zeroes:
                            image[offset : offset + length] = bytes(length)
                        else:
                            unspecified.append((offset, length))
                        calls.append(partial(client.trim, offset, length))
                    else:
                        image[offset : offset + length] = bytes(length)
                        calls.append(partial(client.write_zeroes, offset, length))
                    if client.can_flush and i % 16 == 15:
                        calls.append(client.flush)
                results = await _gather(*calls)
                for index, (offset, length) in expect_reads.items():
                    assert_same_bytes(image[offset : offset + length], results[index], offset)
            got = await _read_all(dut.read, dut.size, MiB)
            for offset, length in unspecified:
                image[offset : offset + length] = got[offset : offset + length]
            assert_same_bytes(image, got, 0, "after mixed requests")

    async def test_engine_boundaries(self, device_harness: DeviceHarness) -> None:
        """The last byte, and the whole device in one request, for every command."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            async with self._served(dut, close=False) as server:
                client = await server.connect()
                size = client.size
                await client.write(size - 1, b"\x99")
                assert await client.read(size - 1, 1) == b"\x99"
                assert await client.read(size - 2, 2) == b"\0\x99"
                whole = min(size, client.max_payload)
                image = random_bytes(whole, "whole")
                await client.write(0, image, fua=client.can_fua)
                assert_same_bytes(image, await client.read(0, whole), 0, "whole-device read")
                if client.can_block_status:
                    runs = await client.block_status(0, size)
                    assert sum(length for length, _ in runs) <= size
                    one = await client.block_status(size - 1, 1, req_one=True)
                    assert len(one) == 1 and one[0][0] == 1, one
                if client.can_cache:
                    await client.cache(0, size)
                if client.can_trim:
                    await client.trim(0, size)
                    if self.trim_zeroes:
                        assert await client.read(size - 1, 1) == b"\0"
                await client.write_zeroes(0, size, no_hole=True)
                got = await _read_all(client.read, size, min(MiB, client.max_payload))
                assert_same_bytes(bytes(size), got, 0, "after zeroing the whole device")
                await client.write(0, image)
                await client.write_zeroes(0, size)
                assert await client.read(0, 1) == b"\0"
                if client.can_flush:
                    await client.flush()

    async def test_engine_out_of_range_requests(self, device_harness: DeviceHarness) -> None:
        """Requests past the end, or whose end overflows 64 bits, get EINVAL or ENOSPC and
        leave the device and the connection as they were."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            image = random_bytes(dut.size, "range")
            await dut.write(0, image)
            size = dut.size
            huge = (1 << 64) - 512
            bad: list[tuple[int, int, int, int, bytes]] = [
                (READ, size, 1, errno.EINVAL, b""),
                (READ, size - 1, 2, errno.EINVAL, b""),
                (READ, huge, 1024, errno.EINVAL, b""),
                (WRITE, size, 1, errno.ENOSPC, b"x"),
                (WRITE, size - 3, 4, errno.ENOSPC, b"abcd"),
                (WRITE, huge, 1024, errno.ENOSPC, bytes(1024)),
                (WRITE_ZEROES, size - 10, 20, errno.ENOSPC, b""),
                (WRITE_ZEROES, huge, 1024, errno.ENOSPC, b""),
                (TRIM, size - 1, 2, errno.EINVAL, b""),
                (CACHE, size, 1, errno.EINVAL, b""),
                (BLOCK_STATUS, size, 1, errno.EINVAL, b""),
            ]
            async with self._served(dut, close=False) as server:
                for structured in (True, False):
                    client = await server.connect(structured=structured)
                    for command, offset, length, expected, payload in bad:
                        if command == TRIM and not client.can_trim:
                            continue
                        if command == CACHE and not client.can_cache:
                            continue
                        if command == BLOCK_STATUS and not client.can_block_status:
                            continue
                        with pytest.raises(NbdError) as caught:
                            await client.request(command, offset, length, payload=payload)
                        assert caught.value.errno == expected, (command, offset, length)
                    assert await client.read(size - 4, 4) == image[-4:]
            await self._verify(dut, image, "after refused requests")

    async def test_engine_extents(self, device_harness: DeviceHarness) -> None:
        """Block status through the engine agrees with the data; sparse structured reads
        (data and hole chunks) reassemble to what was written."""
        with trio.fail_after(self.timeout):
            dut = await device_harness.new(self.device_size)
            if not dut.can_extents:
                # Without extents everything is reported as data.
                assert await dut.export.extents(0, dut.size) == [(dut.size, 0)]
                return
            async with self._served(dut, close=False) as server:
                client = await server.connect()
                image = bytearray(dut.size)
                if dut.can_write:
                    for offset, length in [(0, 5000), (MiB + 3, 70_000), (4 * MiB, MiB)]:
                        data = random_bytes(length, offset)
                        await client.write(offset, data)
                        image[offset : offset + length] = data
                    if client.can_trim and self.trim_zeroes:
                        await client.trim(4 * MiB + 65536, 200_000)
                        image[4 * MiB + 65536 : 4 * MiB + 265_536] = bytes(200_000)
                    await client.write_zeroes(4 * MiB + 500_000, 100_000)
                    image[4 * MiB + 500_000 : 4 * MiB + 600_000] = bytes(100_000)
                await _check_extents(partial(block_status_runs, client), client.read, client.size)
                step = min(MiB, client.max_payload)
                for offset in range(0, dut.size, step):
                    data, _ = await client.read_chunks(offset, step)
                    assert_same_bytes(image[offset : offset + step], data, offset, "sparse read")

    async def test_engine_read_only_export(self, device_harness: DeviceHarness) -> None:
        """Served read-only, every write is refused with EPERM and nothing changes."""
        with trio.fail_after(self.timeout):
            dut = await device_harness.new(self.device_size)
            export = Export(dut.device, read_only=True)
            async with serve_in_process(export, close=False) as server:
                client = await server.connect()
                assert client.read_only
                for command, length, payload in [
                    (WRITE, 3, b"abc"),
                    (WRITE_ZEROES, 4096, b""),
                    (TRIM, 4096, b""),
                ]:
                    with pytest.raises(NbdError) as caught:
                        await client.request(command, 0, length, payload=payload)
                    assert caught.value.errno == errno.EPERM
                assert await client.read(0, 4096) == bytes(4096)

    async def test_engine_multi_conn(self, device_harness: DeviceHarness) -> None:
        """With CAN_MULTI_CONN, a flush on one connection covers writes made on another."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            async with self._served(dut, close=False) as server:
                first = await server.connect()
                if not first.can_multi_conn:
                    _not_offered(dut, TransmissionFlag.CAN_MULTI_CONN)
                    return
                second = await server.connect()
                await first.write(12345, b"seen by both")
                if first.can_flush:
                    await second.flush()
                assert await second.read(12345, 12) == b"seen by both"
                await second.write(0, b"and back")
                assert await first.read(0, 8) == b"and back"

    async def test_engine_closes_the_device_once(self, device_harness: DeviceHarness) -> None:
        """Stopping a server leaves closing to the export: once, however often it is
        asked; afterwards every device method fails and so does every request."""
        with trio.fail_after(self.timeout):
            dut = await device_harness.new(self.device_size)
            closes = _count_closes(dut.device)
            async with self._served(dut, close=False) as server:
                client = await server.connect()
                if client.can_write:
                    await client.write(0, b"before close")
            assert closes == [0]
            await dut.export.aclose()
            await dut.export.aclose()
            await dut.close()
            assert closes == [1]
            with pytest.raises(OSError):
                await dut.read(0, 1)
            async with self._served(dut, close=False) as server:
                client = await server.connect()
                with pytest.raises(NbdError):
                    await client.read(0, 1)
            assert closes == [1]

    async def test_engine_serve_stops_cleanly(self, device_harness: DeviceHarness) -> None:
        """:func:`usbd.core.cli.serve` cancelled with a client connected: what the client
        wrote is flushed and the device is closed exactly once."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            closes = _count_closes(dut.device)
            with tempfile.TemporaryDirectory(prefix="usbd-", dir="/tmp") as tmp:
                path = str(Path(tmp) / "nbd.sock")
                client: NbdClient | None = None
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(serve, dut.device, [Listen(path=path)])
                        client = await NbdClient.handshake(await trio.open_unix_socket(path))
                        await client.write(4096, b"written before the stop")
                        nursery.cancel_scope.cancel()  # the client is still connected
                finally:
                    if client is not None:
                        await client.aclose()
            dut.closed_elsewhere()
            assert closes == [1]
            with pytest.raises(OSError):
                await dut.read(0, 1)
            if self.persistent:
                dut = await device_harness.reopen(dut)
                assert await dut.read(4096, 23) == b"written before the stop"


class PersistentDeviceTests(DeviceTests):
    """The suite for devices whose data outlives them: everything in :class:`DeviceTests`
    plus reopen-and-verify, directly and through the engine, and reopening in the model.

    Subclasses supply ``reopen_device`` as well as ``make_device``.
    """

    persistent: ClassVar[bool] = True

    async def test_reopen_and_verify(self, device_harness: DeviceHarness) -> None:
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            image = bytearray(alternating_image(dut.size, _BLOCK, seed="reopen"))
            for offset in range(0, dut.size, _BLOCK):
                await dut.write(offset, image[offset : offset + _BLOCK])
            dut = await device_harness.reopen(dut)
            await self._verify(dut, bytes(image), "after reopening")
            # Change some bytes (unaligned, across a block boundary), reopen once more.
            patch = random_bytes(10_000, "patch")
            await dut.write(_BLOCK - 7, patch)
            image[_BLOCK - 7 : _BLOCK - 7 + len(patch)] = patch
            dut = await device_harness.reopen(dut)
            await self._verify(dut, bytes(image), "after the second reopening")

    async def test_engine_reopen_and_verify(self, device_harness: DeviceHarness) -> None:
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            image = alternating_image(dut.size, _BLOCK, seed="engine-reopen")
            async with self._served(dut) as server:
                await _write_pipelined(await server.connect(), image)
            assert dut.closed
            dut = await device_harness.reopen(dut)
            async with self._served(dut) as server:
                client = await server.connect()
                got = await _read_all(client.read, client.size, min(MiB, client.max_payload))
                assert_same_bytes(image, got, 0, "served again after reopening")
                assert sha256(got) == sha256(image)


def _not_offered(dut: DeviceUnderTest, flag: TransmissionFlag) -> None:
    """A capability the device lacks must not be advertised (the engine then refuses it)."""
    assert not dut.export.flags & flag, flag
