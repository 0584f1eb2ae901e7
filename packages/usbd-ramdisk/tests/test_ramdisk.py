"""The ramdisk against the shared device suite, plus what only a RAM disk promises.

The suite runs four times: on the ramdisk as shipped (inline on the event loop), and on
three thin variants that reuse its storage to exercise the suite's other paths: worker
threads, ``async def`` methods, and a persistent device that the suite reopens.
"""

from __future__ import annotations

import errno
import itertools
import mmap
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio

from usbd.core import Device, DeviceError, Extent, ExtentFlag
from usbd.core.testing import (
    DeviceTests,
    DeviceUnderTest,
    MakeDevice,
    PersistentDeviceTests,
    ReopenDevice,
    random_bytes,
    serve_in_process,
)
from usbd.ramdisk import RamDisk
from usbd.ramdisk._device import CHUNK

MiB = 1 << 20
GiB = 1 << 30
HOLE = int(ExtentFlag.HOLE | ExtentFlag.ZERO)


class TestRamDisk(DeviceTests):
    """The ramdisk as shipped: inline (non-blocking); trimmed ranges read back as zeros."""

    trim_zeroes = True

    @pytest.fixture
    def make_device(self) -> MakeDevice:
        return RamDisk


# -- the suite's other execution models, on ramdisk storage ----------------------------------


class ThreadedRamDisk(RamDisk):
    """The ramdisk as a blocking device: the engine (and the suite) call it from threads."""

    blocking = True
    parallel = True


class TestThreadedRamDisk(DeviceTests):
    trim_zeroes = True
    model_examples = 8  # the point is the execution model; TestRamDisk explores more

    @pytest.fixture
    def make_device(self) -> MakeDevice:
        return ThreadedRamDisk


class AsyncRamDisk(Device):
    """The ramdisk behind ``async def`` methods that yield to the loop, as a device that
    waits on the network would."""

    parallel = True

    def __init__(self, size: int) -> None:
        self.size = size
        self._disk = RamDisk(size)

    async def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
        await trio.lowlevel.checkpoint()
        return bytes(self._disk.read(offset, length))

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:  # type: ignore[override]
        await trio.lowlevel.checkpoint()
        self._disk.write(offset, data, fua)

    async def flush(self) -> None:  # type: ignore[override]
        await trio.lowlevel.checkpoint()
        self._disk.flush()

    async def trim(self, offset: int, length: int, fua: bool) -> None:  # type: ignore[override]
        await trio.lowlevel.checkpoint()
        self._disk.trim(offset, length, fua)

    async def zero(  # type: ignore[override]
        self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool
    ) -> None:
        await trio.lowlevel.checkpoint()
        self._disk.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def extents(self, offset: int, length: int) -> list[Extent]:  # type: ignore[override]
        await trio.lowlevel.checkpoint()
        return list(self._disk.extents(offset, length))

    async def close(self) -> None:  # type: ignore[override]
        self._disk.close()


class TestAsyncRamDisk(DeviceTests):
    trim_zeroes = True
    model_examples = 8

    @pytest.fixture
    def make_device(self) -> MakeDevice:
        return AsyncRamDisk


class SavedRamDisk(RamDisk):
    """A ramdisk that leaves its contents in ``store`` when it closes and starts from them,
    so that the suite's reopen-and-verify checks run on a ramdisk."""

    def __init__(self, size: int, store: dict[str, bytes], name: str = "disk") -> None:
        super().__init__(size)
        self.store = store
        self.name = name
        self._open = True
        saved = store.get(name, b"")
        for offset in range(0, len(saved), CHUNK):
            chunk = saved[offset : offset + CHUNK]
            if any(chunk):
                self.write(offset, memoryview(chunk), False)

    def close(self) -> None:
        if self._open:
            self.store[self.name] = bytes(self.read(0, self.size))
            self._open = False
        super().close()


class TestSavedRamDisk(PersistentDeviceTests):
    trim_zeroes = True
    model_examples = 8

    @pytest.fixture
    def make_device(self) -> MakeDevice:
        store: dict[str, bytes] = {}
        names = itertools.count()
        return lambda size: SavedRamDisk(size, store, f"disk-{next(names)}")

    @pytest.fixture
    def reopen_device(self) -> ReopenDevice:
        def reopen(device: Device) -> Device:
            assert isinstance(device, SavedRamDisk)
            return SavedRamDisk(device.size, device.store, device.name)

        return reopen


# -- memory: taken only as written, given back on trim ---------------------------------------


def mapping_rss(size: int = 64 * GiB) -> int:
    """Resident bytes of the mapping of exactly ``size`` bytes (the big ramdisk's data:
    nothing else in the test process has that size), from /proc/self/smaps."""
    found = []
    ours = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ours = hi - lo == size
            elif ours and fields[0] == "Rss:":
                found.append(int(fields[1]) * 1024)
    assert len(found) == 1, f"expected one mapping of {size} bytes, found {len(found)}"
    return found[0]


def process_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * mmap.PAGESIZE


@pytest.fixture
def big_disk() -> Iterator[RamDisk]:
    disk = RamDisk(64 * GiB)
    # A flag on the data mapping alone gives it a VMA of its own: a neighbouring mapping with
    # the same flags (a malloc arena is also NORESERVE) would otherwise merge with it, and
    # smaps would count both. It also keeps transparent huge pages out of the figures.
    assert disk._mem is not None
    disk._mem.madvise(mmap.MADV_NOHUGEPAGE)
    try:
        yield disk
    finally:
        disk.close()


#: Pages at the edges of unaligned ranges; far below the tens of MiB the tests move.
SLACK = 256 * 1024


def test_a_64_gib_ramdisk_costs_nothing_until_written(big_disk: RamDisk) -> None:
    before = process_rss()
    assert mapping_rss() <= SLACK
    for i in range(256):  # reads all over the device find the kernel's zero page
        assert big_disk.read(i * 256 * MiB + 12345, MiB) == bytes(MiB)
    assert mapping_rss() <= SLACK
    assert process_rss() - before < 64 * MiB
    assert list(big_disk.extents(0, 64 * GiB)) == [Extent(0, 64 * GiB, ExtentFlag(HOLE))]


def test_memory_is_taken_as_written_and_given_back_on_trim(big_disk: RamDisk) -> None:
    data = random_bytes(32 * MiB, "rss")
    big_disk.write(40 * GiB, memoryview(data), False)
    resident = mapping_rss()
    assert 32 * MiB <= resident <= 32 * MiB + SLACK
    big_disk.trim(40 * GiB, 16 * MiB, False)
    assert mapping_rss() <= 16 * MiB + SLACK
    big_disk.zero(40 * GiB + 16 * MiB, 16 * MiB, may_trim=True, fua=False, fast=False)
    assert mapping_rss() <= SLACK
    assert big_disk.read(40 * GiB, 32 * MiB) == bytes(32 * MiB)


def test_zero_without_may_trim_keeps_memory(big_disk: RamDisk) -> None:
    big_disk.write(GiB, memoryview(random_bytes(8 * MiB, "keep")), False)
    big_disk.zero(GiB, 8 * MiB, may_trim=False, fua=False, fast=False)
    assert mapping_rss() >= 8 * MiB
    assert big_disk.read(GiB, 8 * MiB) == bytes(8 * MiB)


async def test_trim_through_the_engine_gives_memory_back(big_disk: RamDisk) -> None:
    with trio.fail_after(30):
        async with serve_in_process(big_disk, close=False) as server:
            client = await server.connect()
            for i in range(8):
                await client.write(10 * GiB + i * 4 * MiB, random_bytes(4 * MiB, i))
            assert mapping_rss() >= 32 * MiB
            await client.trim(10 * GiB, 32 * MiB)
            assert mapping_rss() <= SLACK
            assert await client.read(10 * GiB, MiB) == bytes(MiB)


# -- extents report holes ----------------------------------------------------------------------


def runs(disk: RamDisk, offset: int, length: int) -> list[tuple[int, int, int]]:
    return [(e.offset, e.length, int(e.flags)) for e in disk.extents(offset, length)]


def test_extents_follow_writes_and_trims() -> None:
    disk = RamDisk(MiB)
    assert runs(disk, 0, MiB) == [(0, MiB, HOLE)]
    disk.write(100 * 1024, memoryview(b"x"), False)
    assert runs(disk, 0, MiB) == [
        (0, CHUNK, HOLE),
        (CHUNK, CHUNK, 0),
        (2 * CHUNK, MiB - 2 * CHUNK, HOLE),
    ]
    # A trim that covers only part of the chunk leaves it allocated...
    disk.trim(CHUNK + 1, CHUNK - 1, False)
    assert runs(disk, CHUNK, CHUNK) == [(CHUNK, CHUNK, 0)]
    assert disk.read(CHUNK, CHUNK) == bytes(CHUNK)
    # ...one that covers all of it makes it a hole again.
    disk.trim(CHUNK, CHUNK, False)
    assert runs(disk, 0, MiB) == [(0, MiB, HOLE)]
    # The last chunk may be partial, and a trim to the end frees it.
    odd = RamDisk(3 * CHUNK + 5)
    odd.write(3 * CHUNK + 1, memoryview(b"ab"), False)
    assert runs(odd, 3 * CHUNK, 5) == [(3 * CHUNK, CHUNK, 0)]
    odd.trim(3 * CHUNK, 5, False)
    assert runs(odd, 3 * CHUNK, 5) == [(3 * CHUNK, CHUNK, HOLE)]
    disk.close()
    odd.close()


async def test_holes_through_the_engine() -> None:
    """BLOCK_STATUS reports holes, and a structured read of a sparse range comes back as
    data and hole chunks."""
    disk = RamDisk(4 * MiB)
    with trio.fail_after(30):
        async with serve_in_process(disk) as server:
            client = await server.connect()
            await client.write(2 * CHUNK + 10, b"data")
            assert await client.block_status(0, 4 * MiB) == [
                (2 * CHUNK, HOLE),
                (CHUNK, 0),
                (4 * MiB - 3 * CHUNK, HOLE),
            ]
            assert await client.block_status(0, 4 * MiB, req_one=True) == [(2 * CHUNK, HOLE)]
            data, chunks = await client.read_chunks(0, 4 * CHUNK)
            assert data[2 * CHUNK + 10 : 2 * CHUNK + 14] == b"data"
            assert data.count(0) == 4 * CHUNK - 4
            assert [(c.offset, c.length, c.hole) for c in chunks] == [
                (0, 2 * CHUNK, True),
                (2 * CHUNK, CHUNK, False),
                (3 * CHUNK, CHUNK, True),
            ]


async def test_closed_ramdisk_refuses_everything() -> None:
    dut = DeviceUnderTest(RamDisk(MiB))
    await dut.close()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: dut.read(0, 1),
        lambda: dut.write(0, b"x"),
        dut.flush,
        lambda: dut.trim(0, 1),
        lambda: dut.zero(0, 1, may_trim=False),
        lambda: dut.extents(0, 1),
    ]
    for call in calls:
        with pytest.raises(DeviceError) as caught:
            await call()
        assert caught.value.errno == errno.ESHUTDOWN
