"""The model-based test: random operations on a device, checked against a bytearray.

Hypothesis drives a :class:`~hypothesis.stateful.RuleBasedStateMachine` of reads, writes,
trims, zeroes (punching holes or not, fast or not), flushes, extent queries and, for
persistent devices, reopening, at any byte offset and length. The model is a bytearray plus
the ranges whose contents are unspecified: after a trim a device may return anything there
(unless the driver's tests declare that trim zeroes), so the model forgets those bytes rather
than assume zeros.

Hypothesis is synchronous and the device lives on the test's trio loop, so the machine runs
in a worker thread and every operation crosses back with ``trio.from_thread.run``. One loop
therefore owns the device for its whole life, whatever its execution model, including
async devices with background tasks. The same machine drives a device directly
(:class:`DirectTarget`) or through the engine and an NBD client (:class:`EngineTarget`).
"""

from __future__ import annotations

import bisect
import errno
import itertools
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)

from .._constants import ExtentFlag
from ._calls import DeviceUnderTest
from ._client import InProcessServer, NbdClient
from ._data import assert_same_bytes, random_bytes
from ._harness import DeviceHarness

__all__ = [
    "DirectTarget",
    "EngineTarget",
    "Model",
    "Target",
    "block_status_runs",
    "model_settings",
    "run_model",
]

_ZERO = int(ExtentFlag.ZERO)
_READ_CHUNK = 1 << 20


class Model:
    """What a device must hold: bytes, and the ranges whose contents are unspecified."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        # Sorted, disjoint, non-adjacent half-open [start, end) ranges.
        self._unknown: list[tuple[int, int]] = []

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self._remove(offset, offset + len(data))

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def forget(self, offset: int, length: int) -> None:
        """The range may now read as anything (a trim, a failed write)."""
        start, end = offset, offset + length
        keep: list[tuple[int, int]] = []
        for lo, hi in self._unknown:
            if hi < start or lo > end:
                keep.append((lo, hi))
            else:
                start, end = min(start, lo), max(end, hi)
        bisect.insort(keep, (start, end))
        self._unknown = keep

    def _remove(self, start: int, end: int) -> None:
        keep: list[tuple[int, int]] = []
        for lo, hi in self._unknown:
            if hi <= start or lo >= end:
                keep.append((lo, hi))
                continue
            if lo < start:
                keep.append((lo, start))
            if hi > end:
                keep.append((end, hi))
        self._unknown = keep

    def known(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The [start, end) runs inside the range whose contents are specified."""
        runs: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        for lo, hi in self._unknown:
            if hi <= pos:
                continue
            if lo >= end:
                break
            if lo > pos:
                runs.append((pos, lo))
            pos = max(pos, hi)
        if pos < end:
            runs.append((pos, end))
        return runs

    def check(self, offset: int, got: bytes, what: str = "read") -> None:
        """``got`` was read at ``offset``: every specified byte must match."""
        for start, end in self.known(offset, len(got)):
            assert_same_bytes(self.data[start:end], got[start - offset : end - offset], start, what)


class Target(Protocol):
    """What the machine drives: a device, reached one way or another."""

    size: int
    can_write: bool
    can_flush: bool
    can_trim: bool
    can_zero: bool
    can_fast_zero: bool
    can_extents: bool
    can_reopen: bool

    async def read(self, offset: int, length: int) -> bytes: ...
    async def write(self, offset: int, data: bytes) -> None: ...
    async def trim(self, offset: int, length: int) -> None: ...
    async def zero(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None: ...
    async def flush(self) -> None: ...
    async def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(offset, length, flags) runs; the first must contain ``offset``."""
        ...

    async def reopen(self) -> None: ...
    async def aclose(self) -> None: ...


class DirectTarget:
    """The device's own methods, through :class:`DeviceUnderTest`."""

    def __init__(self, harness: DeviceHarness, dut: DeviceUnderTest) -> None:
        self._harness = harness
        self._set(dut)
        self.can_reopen = harness.can_reopen

    def _set(self, dut: DeviceUnderTest) -> None:
        self.dut = dut
        self.size = dut.size
        self.can_write = dut.can_write
        self.can_flush = dut.can_flush
        self.can_trim = dut.can_trim
        self.can_zero = dut.can_zero
        self.can_fast_zero = dut.can_zero
        self.can_extents = dut.can_extents

    @classmethod
    async def open(cls, harness: DeviceHarness, size: int) -> DirectTarget:
        return cls(harness, await harness.new(size))

    async def read(self, offset: int, length: int) -> bytes:
        return await self.dut.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.dut.write(offset, data)

    async def trim(self, offset: int, length: int) -> None:
        await self.dut.trim(offset, length)

    async def zero(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        await self.dut.zero(offset, length, may_trim=may_trim, fast=fast)

    async def flush(self) -> None:
        await self.dut.flush()

    async def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        found = await self.dut.extents(offset, length)
        for extent in found:
            assert extent.length > 0, f"extent of length {extent.length}: {extent}"
            assert not int(extent.flags) & ~int(ExtentFlag.HOLE | ExtentFlag.ZERO), extent
        runs = sorted((e.offset, e.length, int(e.flags)) for e in found)
        for (a, n, _), (b, _, _) in itertools.pairwise(runs):
            assert a + n <= b, f"extents overlap: {runs}"
        assert any(a <= offset < a + n for a, n, _ in runs), (
            f"extents({offset}, {length}) do not cover the first byte: {runs}"
        )
        return runs

    async def reopen(self) -> None:
        self._set(await self._harness.reopen(self.dut))

    async def aclose(self) -> None:
        await self.dut.close()


class EngineTarget:
    """The device served by the engine, driven by an NBD client over a socketpair."""

    def __init__(
        self, harness: DeviceHarness, nursery: trio.Nursery, *, handshake: bool = True
    ) -> None:
        self._harness = harness
        self._nursery = nursery
        self._handshake = handshake
        self.can_reopen = harness.can_reopen

    @classmethod
    async def open(
        cls, harness: DeviceHarness, size: int, nursery: trio.Nursery, *, handshake: bool = True
    ) -> EngineTarget:
        target = cls(harness, nursery, handshake=handshake)
        await target._serve(await harness.new(size))
        return target

    async def _serve(self, dut: DeviceUnderTest) -> None:
        self.dut = dut
        self.server = InProcessServer(self._nursery, [dut.export])
        if self._handshake:
            self.client: NbdClient = await self.server.connect()
        else:
            self.client = await self.server.connect_without_handshake()
        client = self.client
        self.size = client.size
        self.can_write = not client.read_only
        self.can_flush = client.can_flush
        self.can_trim = client.can_trim
        self.can_zero = client.can_zero
        self.can_fast_zero = client.can_fast_zero
        self.can_extents = client.can_block_status

    async def read(self, offset: int, length: int) -> bytes:
        return await self.client.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.client.write(offset, data)

    async def trim(self, offset: int, length: int) -> None:
        await self.client.trim(offset, length)

    async def zero(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        await self.client.write_zeroes(offset, length, no_hole=not may_trim, fast=fast)

    async def flush(self) -> None:
        await self.client.flush()

    async def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        return await block_status_runs(self.client, offset, length)

    async def reopen(self) -> None:
        await self._stop()
        await self._serve(await self._harness.reopen(self.dut))

    async def _stop(self) -> None:
        await self.server.disconnect_all()
        await self.dut.close()

    async def aclose(self) -> None:
        await self._stop()


async def block_status_runs(
    client: NbdClient, offset: int, length: int
) -> list[tuple[int, int, int]]:
    """BLOCK_STATUS as absolute (offset, length, flags) runs, checked to stay in the device."""
    runs: list[tuple[int, int, int]] = []
    pos = offset
    for run_length, flags in await client.block_status(offset, length):
        runs.append((pos, run_length, flags))
        pos += run_length
    assert pos <= client.size, f"block status runs past the end: {runs}"
    return runs


def _spans(size: int, max_length: int) -> st.SearchStrategy[tuple[int, int]]:
    """(offset, length) inside the device, biased towards block and chunk boundaries."""
    boundaries = [b for b in (512, 4096, 65536, 1 << 20) if b < size]
    near = st.builds(
        lambda unit, k, jitter: min(max(unit * k + jitter, 0), size - 1),
        st.sampled_from(boundaries) if boundaries else st.just(1),
        st.integers(0, max(size // (boundaries[0] if boundaries else 1), 1)),
        st.integers(-3, 3),
    )
    offsets = st.one_of(st.integers(0, size - 1), near)

    def with_length(offset: int) -> st.SearchStrategy[tuple[int, int]]:
        room = min(max_length, size - offset)
        lengths = st.one_of(
            st.integers(1, room),
            st.sampled_from([n for n in (1, 2, 4095, 4096, 4097) if n <= room] or [1]),
        )
        return st.tuples(st.just(offset), lengths)

    return st.one_of(offsets.flatmap(with_length), st.just((0, size)))


def _machine(
    open_target: Callable[[], Awaitable[Target]],
    size: int,
    trim_zeroes: bool,
    max_length: int,
) -> type[RuleBasedStateMachine]:
    spans = _spans(size, max_length)

    def run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return trio.from_thread.run(fn, *args)

    class DeviceMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.target: Target = run(open_target)
            self.model = Model(size)

        @rule(span=spans)
        def read(self, span: tuple[int, int]) -> None:
            offset, length = span
            self.model.check(offset, run(self.target.read, offset, length))

        @rule()
        def read_everything(self) -> None:
            for offset in range(0, size, _READ_CHUNK):
                length = min(_READ_CHUNK, size - offset)
                self.model.check(offset, run(self.target.read, offset, length), "full read")

        @precondition(lambda self: self.target.can_write)
        @rule(
            span=spans,
            kind=st.sampled_from(["noise", "zeros", "ones"]),
            seed=st.integers(0, 1 << 16),
        )
        def write(self, span: tuple[int, int], kind: str, seed: int) -> None:
            offset, length = span
            if kind == "noise":
                data = random_bytes(length, seed)
            else:
                data = (b"\0" if kind == "zeros" else b"\xff") * length
            run(self.target.write, offset, data)
            self.model.write(offset, data)

        @precondition(lambda self: self.target.can_trim)
        @rule(span=spans)
        def trim(self, span: tuple[int, int]) -> None:
            offset, length = span
            run(self.target.trim, offset, length)
            if trim_zeroes:
                self.model.zero(offset, length)
            else:
                self.model.forget(offset, length)

        @precondition(lambda self: self.target.can_zero)
        @rule(span=spans, may_trim=st.booleans(), fast=st.booleans())
        def zero(self, span: tuple[int, int], may_trim: bool, fast: bool) -> None:
            offset, length = span
            fast = fast and self.target.can_fast_zero
            try:
                run(self._zero, offset, length, may_trim, fast)
            except OSError as exc:
                # A fast zero may be refused (ENOTSUP), preferably before touching anything.
                if not fast or exc.errno != errno.ENOTSUP:
                    raise
                self.model.forget(offset, length)
            else:
                self.model.zero(offset, length)

        async def _zero(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
            await self.target.zero(offset, length, may_trim=may_trim, fast=fast)

        @precondition(lambda self: self.target.can_flush)
        @rule()
        def flush(self) -> None:
            run(self.target.flush)

        @precondition(lambda self: self.target.can_extents)
        @rule(span=spans)
        def extents(self, span: tuple[int, int]) -> None:
            offset, length = span
            end = offset + length
            for start, run_length, flags in run(self.target.extents, offset, length):
                lo, hi = max(start, offset), min(start + run_length, end)
                if flags & _ZERO and lo < hi:
                    zeros = bytes(hi - lo)
                    got = run(self.target.read, lo, hi - lo)
                    assert_same_bytes(zeros, got, lo, f"range reported ZERO by extents {span}")
                    self.model.check(lo, zeros, f"extents reported ZERO over {span}")

        @precondition(lambda self: self.target.can_reopen)
        @rule()
        def reopen(self) -> None:
            run(self.target.reopen)

        def teardown(self) -> None:
            run(self.target.aclose)

    return DeviceMachine


def model_settings(examples: int, steps: int) -> settings:
    """Settings for the model test: no deadline (the machine is noisy), quiet health checks."""
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


async def run_model(
    open_target: Callable[[], Awaitable[Target]],
    size: int,
    *,
    trim_zeroes: bool,
    settings: settings,
    max_length: int = 3 * 65536 + 5,
) -> None:
    """Run the state machine in a worker thread against targets from ``open_target``."""
    machine = _machine(open_target, size, trim_zeroes, max_length)
    await trio.to_thread.run_sync(
        lambda: run_state_machine_as_test(machine, settings=settings),
        abandon_on_cancel=True,
    )
