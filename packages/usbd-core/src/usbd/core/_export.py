"""A device as the engine sees it: capabilities resolved once, every call dispatched by mode.

This is where the device interface's promises are kept: what is advertised follows from what
the device implements, FUA and WRITE_ZEROES are emulated where the device leaves them out,
blocking devices run in a bounded pool of worker threads, and ``close`` runs exactly once.
The command semantics are written once, as coroutines; for devices that answer inline those
coroutines never suspend, and :func:`drive` runs them to completion without an event loop.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import trio

from ._constants import DEFAULT_MAX_PAYLOAD, Command, ExtentFlag, TransmissionFlag
from ._device import BytesLike, Device, Extent, Fua
from ._errors import DeviceError
from ._handshake import ExportInfo

__all__ = ["Export", "drive", "normalise_extents"]

log = logging.getLogger("usbd.core")
T = TypeVar("T")

#: Writing zeros for a device without ``zero``: this many bytes per write.
_ZERO_CHUNK = 1024 * 1024
_ZEROS = memoryview(bytes(_ZERO_CHUNK))
#: The base:allocation bits an extent may carry (a plain int: it is used per extent).
_EXTENT_FLAGS = int(ExtentFlag.HOLE | ExtentFlag.ZERO)


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that is known never to suspend, and return its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("an inline device operation tried to suspend")


def _overrides(cls: type, name: str) -> bool:
    return getattr(cls, name) is not getattr(Device, name)


class Export:
    """One device offered under one name, shared by all the connections that select it."""

    def __init__(
        self,
        device: Device,
        name: str = "",
        description: str = "",
        *,
        read_only: bool = False,
        max_workers: int = 16,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        cls = type(device)
        self.device = device
        self.name = name
        self.description = description
        self.max_payload = max_payload
        self.is_async = inspect.iscoroutinefunction(cls.read)
        #: Calls run on the event loop and never suspend: the engine's batched fast path.
        self.inline = not self.is_async and not cls.blocking
        self.can_write = _overrides(cls, "write") and not (read_only or device.read_only)
        self.can_flush = _overrides(cls, "flush")
        self.can_trim = self.can_write and _overrides(cls, "trim")
        self.native_zero = self.can_write and _overrides(cls, "zero")
        self.can_extents = _overrides(cls, "extents")
        self.can_cache = _overrides(cls, "cache")
        #: A blocking device that can try READ / WRITE on the event loop without blocking.
        #: Only a parallel one: the attempts (and the writer thread that takes over the writes
        #: a try_write leaves) run beside the worker threads.
        plain_blocking = not self.is_async and not self.inline and cls.parallel
        self.can_try_read = plain_blocking and _overrides(cls, "try_read")
        self.can_try_write = plain_blocking and self.can_write and _overrides(cls, "try_write")
        #: Long structured reads are split into data and hole chunks (from extents).
        self.sparse_reads = self.can_extents and cls.sparse_reads
        self.native_fua = cls.fua is Fua.NATIVE
        self.can_fua = self.can_write and (self.native_fua or self.can_flush)
        self._closed = False
        #: Requests received per command number (all connections), for the exit summary.
        self.counts = [0] * 16
        self._limiter = trio.CapacityLimiter(max_workers if cls.parallel else 1)
        self._lock = trio.Lock() if self.is_async and not cls.parallel else None
        self.size = int(device.size)
        if self.size < 0:
            raise ValueError(f"device size must not be negative, got {self.size}")
        #: Transmission flags derived from what the device implements.
        self.flags = self._derive_flags(cls)
        #: What clients are told about this export during the handshake.
        self.info = ExportInfo(
            name=name,
            size=self.size,
            flags=self.flags,
            description=description,
            min_block=cls.min_block_size,
            preferred_block=max(cls.block_size, cls.min_block_size),
            max_payload=max_payload,
        )

    def _derive_flags(self, cls: type[Device]) -> TransmissionFlag:
        flags = TransmissionFlag.HAS_FLAGS
        if not self.can_write:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO
        if self.can_flush:
            flags |= TransmissionFlag.SEND_FLUSH
        if self.can_fua:
            flags |= TransmissionFlag.SEND_FUA
        if self.can_trim:
            flags |= TransmissionFlag.SEND_TRIM
        if self.can_cache:
            flags |= TransmissionFlag.SEND_CACHE
        if cls.multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        if cls.rotational:
            flags |= TransmissionFlag.ROTATIONAL
        return flags

    # -- dispatch --------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise DeviceError(errno.ESHUTDOWN, "device is closed")
        if self.inline:
            return fn(*args, **kwargs)
        if self.is_async:
            if self._lock is None:
                return await fn(*args, **kwargs)
            async with self._lock:
                return await fn(*args, **kwargs)
        call = functools.partial(fn, *args, **kwargs) if kwargs else functools.partial(fn, *args)
        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    # -- commands --------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> BytesLike:
        data: BytesLike = await self._call(self.device.read, offset, length)
        return self.check_read(data, length)

    @staticmethod
    def check_read(data: BytesLike, length: int) -> BytesLike:
        """A short or long read would desynchronise the stream: refuse it as an I/O error."""
        if isinstance(data, memoryview) and data.itemsize != 1:
            data = data.cast("B")
        if len(data) != length:
            raise DeviceError(errno.EIO, f"device read returned {len(data)} bytes, not {length}")
        return data

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._call(self.device.write, offset, data, fua and self.native_fua)
        await self._after(fua)

    async def flush(self) -> None:
        if self.can_flush:
            await self._call(self.device.flush)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._call(self.device.trim, offset, length, fua and self.native_fua)
        await self._after(fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        if self.native_zero:
            await self._call(
                self.device.zero,
                offset,
                length,
                may_trim=may_trim,
                fua=fua and self.native_fua,
                fast=fast,
            )
        elif fast:
            raise DeviceError(errno.ENOTSUP, "device cannot zero faster than writing zeros")
        else:
            end = offset + length
            while offset < end:
                step = min(_ZERO_CHUNK, end - offset)
                await self._call(self.device.write, offset, _ZEROS[:step], False)
                offset += step
        await self._after(fua)

    async def _after(self, fua: bool) -> None:
        if fua and not self.native_fua:
            await self.flush()

    async def cache(self, offset: int, length: int) -> None:
        await self._call(self.device.cache, offset, length)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) runs covering ``offset`` onwards, clipped to the request."""
        if not self.can_extents:
            return [(length, 0)]
        reported: Iterable[Extent] = await self._call(self.device.extents, offset, length)
        return normalise_extents(reported, offset, length)

    async def aclose(self) -> None:
        """Flush and close the device, once; later calls do nothing."""
        if self._closed:
            return
        try:
            if self.can_write:
                await self.flush()
        finally:
            self._closed = True
            close: Callable[[], Any] = self.device.close
            if self.is_async:
                await close()
            elif self.inline:
                close()
            else:
                await trio.to_thread.run_sync(close)

    @property
    def closed(self) -> bool:
        return self._closed

    def request_counts(self) -> dict[str, int]:
        """Requests received so far by command name (``read``, ``flush``...), zeros left out."""
        names = {int(command): command.name.lower() for command in Command}
        return {
            names.get(number, f"command {number}"): count
            for number, count in enumerate(self.counts)
            if count
        }


def normalise_extents(
    reported: Iterable[Extent], offset: int, length: int
) -> list[tuple[int, int]]:
    """Turn a device's extents into contiguous (length, flags) runs from ``offset``.

    Runs are clipped to the request, gaps count as data, neighbours with equal flags merge.
    Only the first byte must be described; a device that says nothing gets "all data".
    """
    end = offset + length
    runs: list[tuple[int, int]] = []
    pos = offset
    for extent in sorted(reported, key=lambda e: e.offset):
        start = max(extent.offset, pos)
        stop = min(extent.offset + extent.length, end)
        if stop <= start:
            continue
        if start > pos:
            runs.append((start - pos, 0))
        flags = int(extent.flags) & _EXTENT_FLAGS
        if runs and runs[-1][1] == flags:
            runs[-1] = (runs[-1][0] + stop - start, flags)
        else:
            runs.append((stop - start, flags))
        pos = stop
        if pos >= end:
            break
    if not runs:
        return [(length, 0)]
    return runs
