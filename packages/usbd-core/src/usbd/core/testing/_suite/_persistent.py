"""Persistence: for devices whose data outlives them (a file, a remote store).

Including :class:`PersistentTests` sets ``persistent``, which makes the ``reopen_device``
fixture required and also turns on reopening in the tests of other mixins that can use it:
the model-based test reopens between operations, and the test of a stopped daemon checks
that what it was sent survived.
"""

from __future__ import annotations

from typing import ClassVar

import trio

from .._data import MiB, alternating_image, assert_same_bytes, random_bytes, sha256
from .._harness import DeviceHarness
from ._base import BLOCK, DeviceTestBase, read_all, write_pipelined

__all__ = ["PersistentTests"]


class PersistentTests(DeviceTestBase):
    """Everything written survives flushing, closing and reopening, directly and through
    the engine. The driver supplies ``reopen_device`` as well as ``make_device``."""

    persistent: ClassVar[bool] = True

    async def test_reopen_and_verify(self, device_harness: DeviceHarness) -> None:
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            image = bytearray(alternating_image(dut.size, BLOCK, seed="reopen"))
            for offset in range(0, dut.size, BLOCK):
                await dut.write(offset, image[offset : offset + BLOCK])
            dut = await device_harness.reopen(dut)
            await self._verify(dut, bytes(image), "after reopening")
            # Change some bytes (unaligned, across a block boundary), reopen once more.
            patch = random_bytes(10_000, "patch")
            await dut.write(BLOCK - 7, patch)
            image[BLOCK - 7 : BLOCK - 7 + len(patch)] = patch
            dut = await device_harness.reopen(dut)
            await self._verify(dut, bytes(image), "after the second reopening")

    async def test_engine_reopen_and_verify(self, device_harness: DeviceHarness) -> None:
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            image = alternating_image(dut.size, BLOCK, seed="engine-reopen")
            async with self._served(dut) as server:
                await write_pipelined(await server.connect(), image)
            assert dut.closed
            dut = await device_harness.reopen(dut)
            async with self._served(dut) as server:
                client = await server.connect()
                got = await read_all(client.read, client.size, min(MiB, client.max_payload))
                assert_same_bytes(image, got, 0, "served again after reopening")
                assert sha256(got) == sha256(image)
