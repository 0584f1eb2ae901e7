"""Extents: for devices that implement ``extents`` (NBD's block status).

Every range a device reports as reading zeros must read as zeros, directly and through the
engine's BLOCK_STATUS, and structured reads split into data and hole chunks by the extents
must reassemble to the data. A read-only device with extents can include this mixin: the
writes, trims and zeroes that make the map interesting are done only where offered.
"""

from __future__ import annotations

from functools import partial

import trio

from .._data import MiB, assert_same_bytes, random_bytes
from .._harness import DeviceHarness
from .._model import DirectTarget, block_status_runs
from ._base import DeviceTestBase, check_extents

__all__ = ["ExtentsTests"]


class ExtentsTests(DeviceTestBase):
    """Extents agree with the data, on the device and through the engine."""

    async def test_extents_consistent_with_data(self, device_harness: DeviceHarness) -> None:
        """Ranges reported ZERO read as zeros, before and after writes, trims and zeroes."""
        with trio.fail_after(self.timeout):
            dut = await device_harness.new(self.device_size)
            if not self._offers(dut.can_extents, "extents", "ExtentsTests"):
                # Without extents everything is reported as data.
                assert await dut.export.extents(0, dut.size) == [(dut.size, 0)]
                return
            target = DirectTarget(device_harness, dut)
            await check_extents(target.extents, target.read, dut.size)
            if dut.can_write:
                await dut.write(100, random_bytes(70_000, 1))
                await dut.write(2 * MiB, random_bytes(MiB, 2))
                await dut.write(5 * MiB + 3, bytes(8192))
            if dut.can_trim:
                await dut.trim(2 * MiB + 4096, 300_000)
            if dut.can_zero:
                await dut.zero(2 * MiB + 600_000, 200_000, may_trim=True)
            await check_extents(target.extents, target.read, dut.size)

    async def test_engine_extents(self, device_harness: DeviceHarness) -> None:
        """Block status through the engine agrees with the data; sparse structured reads
        (data and hole chunks) reassemble to what was written."""
        with trio.fail_after(self.timeout):
            dut = await device_harness.new(self.device_size)
            if not self._offers(dut.can_extents, "extents", "ExtentsTests"):
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
                await check_extents(partial(block_status_runs, client), client.read, client.size)
                step = min(MiB, client.max_payload)
                for offset in range(0, dut.size, step):
                    data, _ = await client.read_chunks(offset, step)
                    assert_same_bytes(image[offset : offset + step], data, offset, "sparse read")
