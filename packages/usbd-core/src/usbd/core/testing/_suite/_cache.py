"""Cache: for devices that implement ``cache`` (NBD's prefetch hint).

A hint may do anything or nothing, so the only promise to check is that it changes no data.
"""

from __future__ import annotations

import trio

from ..._constants import TransmissionFlag
from .._harness import DeviceHarness
from ._base import DeviceTestBase, not_offered

__all__ = ["CacheTests"]


class CacheTests(DeviceTestBase):
    """Caching all or part of the device succeeds and leaves the data alone."""

    async def test_cache_is_harmless(self, device_harness: DeviceHarness) -> None:
        with trio.fail_after(self.timeout):
            dut = await device_harness.new(self.device_size)
            if not self._offers(dut.can_cache, "cache", "CacheTests"):
                not_offered(dut, TransmissionFlag.SEND_CACHE)
                return
            if dut.can_write:
                await dut.write(5, b"cached")
            await dut.cache(0, dut.size)
            await dut.cache(3, 5)
            if dut.can_write:
                assert await dut.read(5, 6) == b"cached"
