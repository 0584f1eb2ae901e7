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
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import trio

from ._constants import (
    DEFAULT_MAX_PAYLOAD,
    EXTENT_FLAGS,
    Command,
    TransmissionFlag,
)
from ._device import BytesLike, Device, Extent, Fua
from ._errors import DeviceError
from ._execution import ContractError, Execution, fast_path, overrides, resolve
from ._handshake import ExportInfo
from ._stats import RequestStats

__all__ = ["Export", "drive", "normalise_extents"]

log = logging.getLogger("usbd.core")
T = TypeVar("T")

#: Writing zeros for a device without ``zero``: this many bytes per write.
_ZERO_CHUNK = 1024 * 1024
_ZEROS = memoryview(bytes(_ZERO_CHUNK))


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that is known never to suspend, and return its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("an inline device operation tried to suspend")


class Export:
    """One device offered under one name, shared by all the connections that select it.

    Building one checks the device's execution model (:func:`usbd.core._execution.resolve`:
    a TypeError says what to change) and fixes how every call is made: :attr:`execution`
    and the request loop's :attr:`fast` path.
    """

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
        #: Where and how the device's calls run, from what it declares.
        self.execution = resolve(cls)
        self.is_async = self.execution.is_async
        #: Calls run on the event loop and never suspend: the engine's batched fast path.
        self.inline = self.execution is Execution.INLINE
        self.can_write = overrides(cls, "write") and not (read_only or device.read_only)
        self.can_flush = overrides(cls, "flush")
        self.can_trim = self.can_write and overrides(cls, "trim")
        self.native_zero = self.can_write and overrides(cls, "zero")
        self.can_extents = overrides(cls, "extents")
        self.can_cache = overrides(cls, "cache")
        self._has_close = overrides(cls, "close")
        #: What the request loop may call on the event loop for a plain READ or WRITE.
        self.fast = fast_path(
            device, self.execution, can_write=self.can_write, max_payload=max_payload
        )
        #: Long structured reads are split into data and hole chunks (from extents).
        self.sparse_reads = self.can_extents and cls.sparse_reads
        self.native_fua = cls.fua is Fua.NATIVE
        self.can_fua = self.can_write and (self.native_fua or self.can_flush)
        self._closed = False
        #: Requests, bytes, errors and latency over every connection (the request loop
        #: keeps them; the monitor and the exit summary read them).
        self.stats = RequestStats()
        #: Requests received per command number (all connections): ``stats.requests``.
        self.counts = self.stats.requests
        #: The connections in the transmission phase now (each adds itself while it serves).
        self.connections: set[Any] = set()
        self._limiter = trio.CapacityLimiter(max_workers if self.execution.parallel else 1)
        self._lock = trio.Lock() if self.execution is Execution.SERIAL_ASYNC else None
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
    def check_read(data: object, length: int) -> BytesLike:
        """What a device's read returned, as bytes the transport can send, or ContractError.

        A read that is short or long would desynchronise the stream, and one that is not a
        contiguous run of bytes (a list, a strided view, ``length`` items of 4 bytes) would
        break the transport's accounting for every reply sent with it: each costs only its
        own request. A contiguous buffer of another format is sent as its bytes."""
        if not isinstance(data, bytes | bytearray):
            try:
                view = memoryview(data)  # type: ignore[arg-type]
            except TypeError:
                raise ContractError(
                    f"device read returned {type(data).__name__}, not bytes"
                ) from None
            if not view.c_contiguous:
                raise ContractError("device read returned a buffer that is not contiguous")
            data = view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")
        if len(data) != length:
            raise ContractError(f"device read returned {len(data)} bytes, not {length}")
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
            if not self._has_close:
                pass  # Device.close does nothing (and is no coroutine to await)
            elif self.is_async:
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
        flags = int(extent.flags) & EXTENT_FLAGS
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
