"""Closing: a closed device refuses everything, whichever methods it has.

For every device (read-only or not, with or without trim...): the test calls exactly the
methods the device offers, so it needs no capability of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from .._harness import DeviceHarness
from ._base import BLOCK, DeviceTestBase

__all__ = ["CloseTests"]


class CloseTests(DeviceTestBase):
    """After ``close``, every call the device offers fails with an OSError."""

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
                calls.append(("trim", lambda: dut.trim(0, BLOCK)))
            if dut.can_zero:
                calls.append(("zero", lambda: dut.zero(0, BLOCK, may_trim=False)))
            if dut.can_extents:
                calls.append(("extents", lambda: dut.extents(0, BLOCK)))
            if dut.can_cache:
                calls.append(("cache", lambda: dut.cache(0, BLOCK)))
            for name, fn in calls:
                with pytest.raises(OSError):
                    await fn()
                    pytest.fail(f"{name} after close did not fail")
