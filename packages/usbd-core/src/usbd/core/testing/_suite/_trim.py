"""Trim: for devices that implement ``trim`` (and take writes).

Whether trimmed bytes read back as zeros is the driver's to declare (``trim_zeroes``); NBD
lets them read as anything, and then the test takes whatever the device returns there but
still insists that every byte around a trimmed range is untouched.
"""

from __future__ import annotations

import trio

from ..._constants import TransmissionFlag
from .._data import MiB, assert_same_bytes, random_bytes
from .._harness import DeviceHarness
from ._base import DeviceTestBase, not_offered, read_all

__all__ = ["TrimTests"]


class TrimTests(DeviceTestBase):
    """Trims at unaligned offsets leave their neighbours alone; trimming everything works."""

    async def test_trim_keeps_neighbours(self, device_harness: DeviceHarness) -> None:
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            if not self._offers(dut.can_trim, "trim", "TrimTests"):
                not_offered(dut, TransmissionFlag.SEND_TRIM)
                return
            image = bytearray(random_bytes(dut.size, "trim"))
            await dut.write(0, bytes(image[: 4 * MiB]))
            await dut.write(4 * MiB, bytes(image[4 * MiB :]))
            ranges = [(1000, 10_000), (65_535, 65_538), (3 * MiB + 1, 2 * MiB - 2)]
            for offset, length in ranges:
                await dut.trim(offset, length)
            got = await read_all(dut.read, dut.size, MiB)
            for offset, length in ranges:
                if self.trim_zeroes:
                    image[offset : offset + length] = bytes(length)
                else:  # unspecified: take whatever the device says
                    image[offset : offset + length] = got[offset : offset + length]
            assert_same_bytes(image, got, 0, "after trims")
            await dut.trim(0, dut.size)
            if self.trim_zeroes:
                await self._verify(dut, bytes(dut.size), "after trimming everything")
