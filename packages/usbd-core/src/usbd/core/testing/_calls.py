"""Calling a device the same way whatever its execution model.

A device's methods are plain and non-blocking (called on the event loop), plain and blocking
(run in a worker thread) or ``async def`` (awaited). Tests should not care which: they go
through :func:`call`, or through :class:`DeviceUnderTest`, which wraps a whole device and also
holds the checks every caller wants (a read returns exactly the bytes asked for; a write's
buffer is scribbled over after the call, so a device that kept it without copying is caught).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import trio

from .._device import Device, Extent
from .._export import Export

__all__ = ["DeviceUnderTest", "call", "resolve"]

T = TypeVar("T")

#: What a write's buffer is overwritten with once the call returns.
_SCRIBBLE = 0xEE


async def resolve(value: T | Awaitable[T]) -> T:
    """``value``, awaited first if it is awaitable (factories may be sync or async)."""
    if inspect.isawaitable(value):
        return await value
    return value


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a device method by its execution model and return its result.

    Coroutine functions are awaited; bound methods of a device whose class says ``blocking``
    run in a worker thread; everything else is called directly on the event loop.
    """
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, Device) and type(owner).blocking:
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
    return fn(*args, **kwargs)


def _listed(extents: Iterable[Extent]) -> list[Extent]:
    return list(extents)


class DeviceUnderTest:
    """A device seen through :func:`call`: every method a coroutine, whatever the device.

    Capabilities are derived exactly as the engine derives them (through :class:`Export`),
    so a test skips what a client could never ask for.
    """

    def __init__(self, device: Device) -> None:
        self.device = device
        #: The export to serve this device through; shared, so the device closes once.
        self.export = export = Export(device)
        self.size = export.size
        self.can_write = export.can_write
        self.can_flush = export.can_flush
        self.can_trim = export.can_trim
        self.can_zero = export.native_zero
        self.can_extents = export.can_extents
        self.can_cache = export.can_cache
        self._closed_elsewhere = False

    async def read(self, offset: int, length: int) -> bytes:
        data = await call(self.device.read, offset, length)
        view = memoryview(data)
        if view.itemsize != 1:
            view = view.cast("B")
        got = bytes(view)
        assert len(got) == length, f"read({offset}, {length}) returned {len(got)} bytes"
        return got

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        buffer = bytearray(data)
        try:
            await call(self.device.write, offset, memoryview(buffer), fua)
        finally:
            # The buffer was only lent for the call: a device that kept it must not see this.
            buffer[:] = bytes([_SCRIBBLE]) * len(buffer)

    async def flush(self) -> None:
        await call(self.device.flush)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await call(self.device.trim, offset, length, fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        await call(self.device.zero, offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """The device's extents, materialised (a lazy generator may only fail when iterated)."""
        fn = self.device.extents
        if inspect.iscoroutinefunction(fn):
            return _listed(await fn(offset, length))
        if type(self.device).blocking:
            return await trio.to_thread.run_sync(lambda: _listed(fn(offset, length)))
        return _listed(fn(offset, length))

    async def cache(self, offset: int, length: int) -> None:
        await call(self.device.cache, offset, length)

    async def close(self) -> None:
        """Flush and close the device the way the engine does: at most once, ever.

        Goes through the device's :class:`Export`, so that closing here and a server that
        served the same export closing it too still close the device only once.
        """
        if not self._closed_elsewhere:
            await self.export.aclose()

    def closed_elsewhere(self) -> None:
        """Someone else closed the device (a daemon with its own export): never close it."""
        self._closed_elsewhere = True

    @property
    def closed(self) -> bool:
        return self._closed_elsewhere or self.export.closed
