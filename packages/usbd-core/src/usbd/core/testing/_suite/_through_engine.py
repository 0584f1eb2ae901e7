"""Through the engine: the device served in-process and driven by a real NBD client.

What a device must survive once clients talk to it: the whole device pipelined in simple,
structured and kernel-style sessions, many overlapping or mixed requests in flight, the
last byte and whole-device requests, requests out of range, a read-only export, and the
engine's close semantics (the export closes the device once; a cancelled daemon flushes and
closes). For writable devices: all but the read-only export and close-once tests write.
Extents and several connections have mixins of their own (:class:`ExtentsTests`,
:class:`MultiConnTests`); trim and cache are used here only where the device offers them.
"""

from __future__ import annotations

import errno
import random
import tempfile
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from ..._export import Export
from ...cli import Listen, serve
from .._client import (
    BLOCK_STATUS,
    CACHE,
    READ,
    TRIM,
    WRITE,
    WRITE_ZEROES,
    NbdClient,
    NbdError,
    serve_in_process,
)
from .._data import MiB, alternating_image, assert_same_bytes, random_bytes, sha256
from .._harness import DeviceHarness
from ._base import BLOCK, DEPTH, DeviceTestBase, count_closes, gather, read_all, write_pipelined

__all__ = ["EngineTests"]


class EngineTests(DeviceTestBase):
    """NBD requests through :func:`serve_in_process` and :class:`NbdClient`, checked
    against what was written, and the engine's close semantics around the device."""

    @pytest.mark.parametrize("mode", ["structured", "simple", "kernel-style"])
    async def test_engine_round_trip(self, device_harness: DeviceHarness, mode: str) -> None:
        """The alternating pattern over the whole device, pipelined, through NBD."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            image = alternating_image(dut.size, BLOCK, seed=f"engine-{mode}")
            async with self._served(dut, close=False) as server:
                if mode == "kernel-style":
                    client = await server.connect_without_handshake()
                else:
                    client = await server.connect(structured=mode == "structured")
                assert client.size == dut.size
                await write_pipelined(client, image)
                if client.can_flush:
                    await client.flush()
                step = min(256 * 1024, client.max_payload)
                reads = [
                    partial(client.read, o, min(step, dut.size - o))
                    for o in range(0, dut.size, step)
                ]
                got = b"".join(await gather(*reads))
                assert_same_bytes(image, got, 0, f"{mode} read back")
                assert sha256(got) == sha256(image)
                if client.structured:
                    got = await read_all(lambda o, n: client.read(o, n, df=True), dut.size, step)
                    assert_same_bytes(image, got, 0, "read back with DF")
            await self._verify(dut, image, "the device itself after serving")

    async def test_engine_overlapping_requests_in_flight(
        self, device_harness: DeviceHarness
    ) -> None:
        """64 overlapping writes at once, then 64 reads at once: every byte ends up as
        written by one of the writes that covered it (NBD leaves their order open)."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            region, base = 64 * 1024, MiB - 1000
            rng = random.Random("overlap")
            writes = []
            for i in range(DEPTH):
                offset = base + rng.randrange(region - 1)
                length = rng.randrange(1, min(16 * 1024, base + region - offset) + 1)
                data = bytes(((offset + k) * 31 + i * 97) % 255 + 1 for k in range(length))
                writes.append((offset, data))
            reads = [(base, region)]
            reads += [(base + rng.randrange(region - 100), 100) for _ in range(DEPTH - 1)]
            async with self._served(dut, close=False) as server:
                client = await server.connect()
                await gather(*(partial(client.write, o, d) for o, d in writes))
                results = await gather(*(partial(client.read, o, n) for o, n in reads))
            final = results[0]
            allowed: list[set[int]] = [{0} for _ in range(region)]
            for offset, data in writes:
                for k, value in enumerate(data):
                    cell = allowed[offset - base + k]
                    cell.discard(0)
                    cell.add(value)
            for k, value in enumerate(final):
                assert value in allowed[k], (
                    f"byte at {base + k} is {value}, not one of {sorted(allowed[k])}"
                )
            for (offset, length), result in zip(reads[1:], results[1:], strict=True):
                start = offset - base
                assert_same_bytes(final[start : start + length], result, offset, "reads agree")
            assert_same_bytes(final, await dut.read(base, region), base, "device after writes")

    async def test_engine_mixed_requests_in_flight(self, device_harness: DeviceHarness) -> None:
        """Writes, reads, trims, zeroes and flushes to disjoint places, all in flight at once."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            image = bytearray(random_bytes(dut.size, "mixed"))
            await dut.write(0, bytes(image))
            async with self._served(dut, close=False) as server:
                client = await server.connect()
                calls: list[Callable[[], Awaitable[Any]]] = []
                expect_reads: dict[int, tuple[int, int]] = {}
                unspecified: list[tuple[int, int]] = []
                slot = dut.size // (4 * DEPTH)
                for i in range(4 * DEPTH):
                    offset, length = i * slot + 3, slot - 7
                    kind = i % 4
                    if kind == 0:
                        data = random_bytes(length, i)
                        image[offset : offset + length] = data
                        calls.append(partial(client.write, offset, data))
                    elif kind == 1:
                        expect_reads[len(calls)] = (offset, length)
                        calls.append(partial(client.read, offset, length))
                    elif kind == 2 and client.can_trim:
                        if self.trim_zeroes:
                            image[offset : offset + length] = bytes(length)
                        else:
                            unspecified.append((offset, length))
                        calls.append(partial(client.trim, offset, length))
                    else:
                        image[offset : offset + length] = bytes(length)
                        calls.append(partial(client.write_zeroes, offset, length))
                    if client.can_flush and i % 16 == 15:
                        calls.append(client.flush)
                results = await gather(*calls)
                for index, (offset, length) in expect_reads.items():
                    assert_same_bytes(image[offset : offset + length], results[index], offset)
            got = await read_all(dut.read, dut.size, MiB)
            for offset, length in unspecified:
                image[offset : offset + length] = got[offset : offset + length]
            assert_same_bytes(image, got, 0, "after mixed requests")

    async def test_engine_boundaries(self, device_harness: DeviceHarness) -> None:
        """The last byte, and the whole device in one request, for every command."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            async with self._served(dut, close=False) as server:
                client = await server.connect()
                size = client.size
                await client.write(size - 1, b"\x99")
                assert await client.read(size - 1, 1) == b"\x99"
                assert await client.read(size - 2, 2) == b"\0\x99"
                whole = min(size, client.max_payload)
                image = random_bytes(whole, "whole")
                await client.write(0, image, fua=client.can_fua)
                assert_same_bytes(image, await client.read(0, whole), 0, "whole-device read")
                if client.can_block_status:
                    runs = await client.block_status(0, size)
                    assert sum(length for length, _ in runs) <= size
                    one = await client.block_status(size - 1, 1, req_one=True)
                    assert len(one) == 1 and one[0][0] == 1, one
                if client.can_cache:
                    await client.cache(0, size)
                if client.can_trim:
                    await client.trim(0, size)
                    if self.trim_zeroes:
                        assert await client.read(size - 1, 1) == b"\0"
                await client.write_zeroes(0, size, no_hole=True)
                got = await read_all(client.read, size, min(MiB, client.max_payload))
                assert_same_bytes(bytes(size), got, 0, "after zeroing the whole device")
                await client.write(0, image)
                await client.write_zeroes(0, size)
                assert await client.read(0, 1) == b"\0"
                if client.can_flush:
                    await client.flush()

    async def test_engine_out_of_range_requests(self, device_harness: DeviceHarness) -> None:
        """Requests past the end, or whose end overflows 64 bits, get EINVAL or ENOSPC and
        leave the device and the connection as they were."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            image = random_bytes(dut.size, "range")
            await dut.write(0, image)
            size = dut.size
            huge = (1 << 64) - 512
            bad: list[tuple[int, int, int, int, bytes]] = [
                (READ, size, 1, errno.EINVAL, b""),
                (READ, size - 1, 2, errno.EINVAL, b""),
                (READ, huge, 1024, errno.EINVAL, b""),
                (WRITE, size, 1, errno.ENOSPC, b"x"),
                (WRITE, size - 3, 4, errno.ENOSPC, b"abcd"),
                (WRITE, huge, 1024, errno.ENOSPC, bytes(1024)),
                (WRITE_ZEROES, size - 10, 20, errno.ENOSPC, b""),
                (WRITE_ZEROES, huge, 1024, errno.ENOSPC, b""),
                (TRIM, size - 1, 2, errno.EINVAL, b""),
                (CACHE, size, 1, errno.EINVAL, b""),
                (BLOCK_STATUS, size, 1, errno.EINVAL, b""),
            ]
            async with self._served(dut, close=False) as server:
                for structured in (True, False):
                    client = await server.connect(structured=structured)
                    for command, offset, length, expected, payload in bad:
                        if command == TRIM and not client.can_trim:
                            continue
                        if command == CACHE and not client.can_cache:
                            continue
                        if command == BLOCK_STATUS and not client.can_block_status:
                            continue
                        with pytest.raises(NbdError) as caught:
                            await client.request(command, offset, length, payload=payload)
                        assert caught.value.errno == expected, (command, offset, length)
                    assert await client.read(size - 4, 4) == image[-4:]
            await self._verify(dut, image, "after refused requests")

    async def test_engine_read_only_export(self, device_harness: DeviceHarness) -> None:
        """Served read-only, every write is refused with EPERM and nothing changes."""
        with trio.fail_after(self.timeout):
            dut = await device_harness.new(self.device_size)
            export = Export(dut.device, read_only=True)
            async with serve_in_process(export, close=False) as server:
                client = await server.connect()
                assert client.read_only
                for command, length, payload in [
                    (WRITE, 3, b"abc"),
                    (WRITE_ZEROES, 4096, b""),
                    (TRIM, 4096, b""),
                ]:
                    with pytest.raises(NbdError) as caught:
                        await client.request(command, 0, length, payload=payload)
                    assert caught.value.errno == errno.EPERM
                assert await client.read(0, 4096) == bytes(4096)

    async def test_engine_closes_the_device_once(self, device_harness: DeviceHarness) -> None:
        """Stopping a server leaves closing to the export: once, however often it is
        asked; afterwards every device method fails and so does every request."""
        with trio.fail_after(self.timeout):
            dut = await device_harness.new(self.device_size)
            closes = count_closes(dut.device)
            async with self._served(dut, close=False) as server:
                client = await server.connect()
                if client.can_write:
                    await client.write(0, b"before close")
            assert closes == [0]
            await dut.export.aclose()
            await dut.export.aclose()
            await dut.close()
            assert closes == [1]
            with pytest.raises(OSError):
                await dut.read(0, 1)
            async with self._served(dut, close=False) as server:
                client = await server.connect()
                with pytest.raises(NbdError):
                    await client.read(0, 1)
            assert closes == [1]

    async def test_engine_serve_stops_cleanly(self, device_harness: DeviceHarness) -> None:
        """:func:`usbd.core.cli.serve` cancelled with a client connected: what the client
        wrote is flushed and the device is closed exactly once."""
        with trio.fail_after(self.timeout):
            dut = await self._writable(device_harness)
            closes = count_closes(dut.device)
            with tempfile.TemporaryDirectory(prefix="usbd-", dir="/tmp") as tmp:
                path = str(Path(tmp) / "nbd.sock")
                client: NbdClient | None = None
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(serve, dut.device, [Listen(path=path)])
                        client = await NbdClient.handshake(await trio.open_unix_socket(path))
                        await client.write(4096, b"written before the stop")
                        nursery.cancel_scope.cancel()  # the client is still connected
                finally:
                    if client is not None:
                        await client.aclose()
            dut.closed_elsewhere()
            assert closes == [1]
            with pytest.raises(OSError):
                await dut.read(0, 1)
            if self.persistent:
                dut = await device_harness.reopen(dut)
                assert await dut.read(4096, 23) == b"written before the stop"
