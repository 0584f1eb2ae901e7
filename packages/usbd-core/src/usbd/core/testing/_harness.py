"""Making, reopening and cleaning up the devices a test uses, from a driver's two factories."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .._device import Device
from ._calls import DeviceUnderTest, resolve

__all__ = ["DeviceHarness", "MakeDevice", "ReopenDevice"]

#: Given a size in bytes, a fresh device of exactly that size that reads as zeros.
MakeDevice = Callable[[int], Device | Awaitable[Device]]
#: Given a device the suite has flushed and closed, a new device over the same storage.
ReopenDevice = Callable[[Device], Device | Awaitable[Device]]


class DeviceHarness:
    """Hands out devices to a test and closes whatever the test left open.

    Every device is wrapped in a :class:`DeviceUnderTest`, whose close goes through its
    export, so a device is closed once however many paths (the test, a server, this
    harness) try to close it.
    """

    def __init__(self, make_device: MakeDevice, reopen_device: ReopenDevice | None) -> None:
        self._make = make_device
        self._reopen = reopen_device
        self._devices: list[DeviceUnderTest] = []

    @property
    def can_reopen(self) -> bool:
        return self._reopen is not None

    async def new(self, size: int) -> DeviceUnderTest:
        device = await resolve(self._make(size))
        return self._track(device, size)

    async def reopen(self, old: DeviceUnderTest) -> DeviceUnderTest:
        """Flush and close ``old`` (if still open), then open its storage again."""
        if self._reopen is None:
            raise RuntimeError("this driver's tests did not supply reopen_device")
        await old.close()
        device = await resolve(self._reopen(old.device))
        return self._track(device, old.size)

    def _track(self, device: object, size: int) -> DeviceUnderTest:
        assert isinstance(device, Device), f"the device factory returned {device!r}"
        assert device.size == size, f"asked for a device of {size} bytes, got {device.size}"
        dut = DeviceUnderTest(device)
        self._devices.append(dut)
        return dut

    async def aclose(self) -> None:
        """Close every device still open (closing twice is harmless: see the class doc)."""
        devices, self._devices = self._devices, []
        for dut in devices:
            await dut.close()
