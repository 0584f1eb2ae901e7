"""What every mixin of the suite shares: the fixtures, the tuning knobs and a few helpers.

:class:`DeviceTestBase` holds the fixture contract a driver's tests fulfil (``make_device``,
and ``reopen_device`` for persistent drivers) and the class attributes that tune the suite;
every mixin subclasses it, so a driver's test class gets it whichever mixins it picks. The
module-level helpers (running calls at once, reading a whole device, walking extents) are
used by more than one mixin, which is why they live here.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, ClassVar

import pytest
import trio

from ..._constants import ExtentFlag, TransmissionFlag
from ..._device import Device
from .._calls import DeviceUnderTest
from .._client import InProcessServer, NbdClient, serve_in_process
from .._data import MiB, assert_same_bytes, sha256
from .._harness import DeviceHarness, MakeDevice, ReopenDevice

__all__ = [
    "BLOCK",
    "DEPTH",
    "ZERO",
    "DeviceTestBase",
    "Runs",
    "check_extents",
    "count_closes",
    "gather",
    "not_offered",
    "read_all",
    "write_pipelined",
]

#: (offset, length, flags) runs describing allocation from an offset on.
Runs = list[tuple[int, int, int]]

ZERO = int(ExtentFlag.ZERO)
#: The block size of the patterns and pipelined writes.
BLOCK = 4096
#: How many requests the engine tests keep in flight at once.
DEPTH = 64


async def gather(*calls: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run every call at once (so their requests are in flight together); results in order."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int, fn: Callable[[], Awaitable[Any]]) -> None:
        results[i] = await fn()

    async with trio.open_nursery() as nursery:
        for i, fn in enumerate(calls):
            nursery.start_soon(one, i, fn)
    return results


async def read_all(read: Callable[[int, int], Awaitable[bytes]], size: int, step: int) -> bytes:
    """``size`` bytes from offset 0, ``step`` bytes per call."""
    out = bytearray()
    for offset in range(0, size, step):
        out += await read(offset, min(step, size - offset))
    return bytes(out)


async def check_extents(
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
            if flags & ZERO and lo < hi:
                for at in range(lo, hi, MiB):
                    n = min(MiB, hi - at)
                    assert_same_bytes(bytes(n), await read(at, n), at, "range reported ZERO")
        covered = max(start + length for start, length, _ in runs if start <= pos)
        assert covered > pos, f"extents from {pos} make no progress: {runs}"
        pos = covered


async def write_pipelined(client: NbdClient, image: bytes, block: int = BLOCK) -> None:
    """Write ``image`` block by block, ``DEPTH`` requests in flight at a time."""
    offsets = list(range(0, len(image), block))
    for i in range(0, len(offsets), DEPTH):
        await gather(
            *(partial(client.write, o, image[o : o + block]) for o in offsets[i : i + DEPTH])
        )


def count_closes(device: Device) -> list[int]:
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


def not_offered(dut: DeviceUnderTest, flag: TransmissionFlag) -> None:
    """A capability the device lacks must not be advertised (the engine then refuses it)."""
    assert not dut.export.flags & flag, flag


class DeviceTestBase:
    """The base of every mixin: the fixtures a driver supplies and the knobs that tune tests.

    Fixture contract (all that a driver's test class must or may provide):

    ``make_device`` (required)
        A fixture returning a factory ``size -> Device``: every call makes a new device of
        exactly ``size`` bytes (sizes used are multiples of 1 MiB) that reads as zeros. The
        factory may be a plain function or ``async def`` (for drivers that must await to
        set up); the fixture may use any other fixture (``tmp_path``, servers, ...) and is
        responsible for cleaning up storage afterwards. The suite closes every device it
        made, exactly once, flushing first as the engine does.

    ``reopen_device`` (persistent drivers, which include :class:`PersistentTests`)
        A fixture returning a function ``Device -> Device`` (plain or ``async def``): given
        a device the suite has flushed and closed, open its storage again and return the
        new device. The suite then checks that everything written survives reopening,
        directly and through the engine, and adds reopening to the model-based test and
        to the check that a stopped daemon kept what it was sent.

    Class attributes to tune the suite (the model-based test has its own, on
    :class:`ModelTests`):

    * ``persistent`` -- set by :class:`PersistentTests`; not to be set by hand.
    * ``trim_zeroes`` -- trimmed ranges read back as zeros. Otherwise the suite treats
      trimmed bytes as unspecified (NBD allows a trimmed range to read as anything).
    * ``device_size`` -- size of the devices most tests use (8 MiB); the full-device
      pattern tests write all of it.
    * ``timeout`` -- the ceiling on each test, in seconds.
    * ``adapt_to_device`` -- set by :class:`DeviceTests` only: see :meth:`_offers`.

    Devices may be of any execution model (plain non-blocking, plain blocking run in
    threads, or ``async def``): tests call them through :class:`DeviceUnderTest`. Tests
    that go through the engine serve the device in-process (:func:`serve_in_process`) and
    talk NBD with :class:`NbdClient`.

    Requirements on the test run: pytest-trio (every test is marked ``trio``, so its
    ``trio_mode`` is not needed) and, under ``--strict-markers``, a registered ``slow``
    marker (the long model-based runs carry it).
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.trio]

    persistent: ClassVar[bool] = False
    trim_zeroes: ClassVar[bool] = False
    device_size: ClassVar[int] = 8 * MiB
    timeout: ClassVar[float] = 60.0
    adapt_to_device: ClassVar[bool] = False

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

    def _offers(self, present: bool, what: str, mixin: str) -> bool:
        """Whether the device has ``what``, the capability the calling test is about.

        A mixin is included only by drivers whose devices have its capability, so there a
        device without it fails the test: the device lost the capability, or the driver
        picked the wrong mixin. Only the all-in-one :class:`DeviceTests` (``adapt_to_device``)
        lets it through: then this returns False and the test checks instead that the
        device does not claim what it lacks, as the suite did before it was split.
        """
        if present:
            return True
        if not self.adapt_to_device:
            pytest.fail(
                f"{type(self).__name__} includes {mixin}, but the device has no {what}: "
                f"a driver whose device lacks {what} leaves {mixin} out"
            )
        return False

    async def _writable(self, harness: DeviceHarness) -> DeviceUnderTest:
        """A new device of ``device_size`` bytes that takes writes (tests that write need one).

        For a read-only device this fails, except in :class:`DeviceTests`, which skips the
        test as the suite always has; a read-only driver includes only mixins that do not
        write.
        """
        dut = await harness.new(self.device_size)
        if not dut.can_write:
            if self.adapt_to_device:
                pytest.skip("the device is read-only")
            pytest.fail(
                f"{type(self).__name__}: the device is read-only and this test writes: "
                "a read-only driver leaves out the mixins that write"
            )
        return dut

    async def _verify(self, dut: DeviceUnderTest, image: bytes, what: str) -> None:
        """Byte by byte, then by SHA-256 of everything read."""
        got = await read_all(dut.read, dut.size, MiB)
        assert_same_bytes(image, got, 0, what)
        assert sha256(got) == sha256(image), what

    @asynccontextmanager
    async def _served(
        self, dut: DeviceUnderTest, *, close: bool = True
    ) -> AsyncIterator[InProcessServer]:
        async with serve_in_process(dut.export, close=close) as server:
            yield server
