"""Several connections: for devices that set ``multi_conn`` (NBD's CAN_MULTI_CONN).

With the flag a client may spread its requests over several connections and flush only one
of them; the device promises that the flush covers writes done on all of them.
"""

from __future__ import annotations

import trio

from ..._constants import TransmissionFlag
from .._harness import DeviceHarness
from ._base import DeviceTestBase, not_offered

__all__ = ["MultiConnTests"]


class MultiConnTests(DeviceTestBase):
    """Two connections to one export see each other's writes. For writable devices."""

    async def test_engine_multi_conn(self, device_harness: DeviceHarness) -> None:
        """With CAN_MULTI_CONN, a flush on one connection covers writes made on another."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            async with self._served(dut, close=False) as server:
                first = await server.connect()
                if not self._offers(first.can_multi_conn, "multi_conn", "MultiConnTests"):
                    not_offered(dut, TransmissionFlag.CAN_MULTI_CONN)
                    return
                second = await server.connect()
                await first.write(12345, b"seen by both")
                if first.can_flush:
                    await second.flush()
                assert await second.read(12345, 12) == b"seen by both"
                await second.write(0, b"and back")
                assert await first.read(0, 8) == b"and back"
