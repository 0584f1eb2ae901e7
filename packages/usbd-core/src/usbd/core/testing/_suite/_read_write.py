"""Reading and writing: the first thing every device must get right.

These are the checks the original project's suite made (1-byte I/O at both ends, a
single-byte pattern over the first MiBs, alternating data and zero blocks over the whole
device) plus unaligned writes across block boundaries, all called on the device directly.
"""

from __future__ import annotations

import random

import trio

from .._data import MiB, alternating_image, assert_same_bytes, random_bytes
from .._harness import DeviceHarness
from ._base import BLOCK, DeviceTestBase, read_all

__all__ = ["ReadWriteTests"]


class ReadWriteTests(DeviceTestBase):
    """Reads and writes at any offset, verified byte by byte. For writable devices: every
    test but the first writes (see :meth:`DeviceTestBase._writable`)."""

    async def test_fresh_device_reads_zeros(self, device_harness: DeviceHarness) -> None:
        with trio.fail_after(self.timeout):
            dut = await device_harness.new(self.device_size)
            got = await read_all(dut.read, dut.size, MiB)
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
            for boundary in range(BLOCK, span, 16 * BLOCK):
                offsets |= set(range(boundary - 3, min(boundary + 3, span)))
            expected = bytearray(span)
            for offset in sorted(offsets):
                value = (offset * 131 + 7) % 255 + 1
                expected[offset] = value
                await dut.write(offset, bytes([value]))
            for offset in sorted(offsets):
                got = await dut.read(offset, 1)
                assert got[0] == expected[offset], f"byte at {offset}"
            assert_same_bytes(expected, await read_all(dut.read, span, MiB), 0, "bulk read")

    async def test_alternating_data_and_zero_blocks(self, device_harness: DeviceHarness) -> None:
        """The whole device in 4 KiB blocks, data and zeros alternating; then the other way
        round, so every block is overwritten by zeros or by data once."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            for odd in (False, True):
                image = alternating_image(dut.size, BLOCK, seed=f"alternating-{odd}", odd=odd)
                for offset in range(0, dut.size, BLOCK):
                    await dut.write(offset, image[offset : offset + BLOCK])
                await self._verify(dut, image, f"alternating blocks (odd={odd})")

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
