"""Zeroing: for devices that implement ``zero`` themselves (and take writes).

Without a native ``zero`` the engine writes zeros on the device's behalf; that is the
engine's business, so a driver whose device has no ``zero`` leaves these tests out.
"""

from __future__ import annotations

import errno

import pytest
import trio

from ..._constants import TransmissionFlag
from .._data import MiB, random_bytes
from .._harness import DeviceHarness
from ._base import DeviceTestBase

__all__ = ["ZeroTests"]


class ZeroTests(DeviceTestBase):
    """Zeroing unaligned ranges, punching holes or not, fast or not, leaves neighbours
    alone; a fast zero may be refused with ENOTSUP, and then nothing changes."""

    async def test_zero_keeps_neighbours(self, device_harness: DeviceHarness) -> None:
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            if not self._offers(dut.can_zero, "zero", "ZeroTests"):
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
