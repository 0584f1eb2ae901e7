"""The model-based test as a mixin: :func:`~usbd.core.testing.run_model` against the device.

For every device: the state machine only uses what the device (or the engine, for the
engine paths) offers, so it needs no capability of its own. With :class:`PersistentTests`
included it also reopens the device between operations.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import trio

from .._data import MiB
from .._harness import DeviceHarness
from .._model import DirectTarget, EngineTarget, Target, model_settings, run_model
from ._base import DeviceTestBase

__all__ = ["ModelTests"]


class ModelTests(DeviceTestBase):
    """Random operations at any offset against a bytearray model; directly, through the
    engine, and served as the kernel is served.

    Class attributes: ``model_size`` (the device's size, 1 MiB), ``model_examples`` and
    ``model_steps`` (the Hypothesis budget for the default run), and
    ``slow_model_examples`` (the budget for the runs marked ``slow``).
    """

    model_size: ClassVar[int] = 1 * MiB
    model_examples: ClassVar[int] = 15
    model_steps: ClassVar[int] = 25
    slow_model_examples: ClassVar[int] = 300

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
