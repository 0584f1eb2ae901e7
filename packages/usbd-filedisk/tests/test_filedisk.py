"""The file disk against the shared device suite, and what only a file promises: sizes and
the lock, holes that really free blocks, block status from the file's holes, the fallback
for a file system that cannot punch holes, and direct I/O."""

from __future__ import annotations

import errno
import fcntl
import io
import itertools
import logging
import os
import random
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from filedisk_helpers import missing

from usbd.core import (
    Device,
    DeviceError,
    Execution,
    Export,
    Extent,
    ExtentFlag,
    TransmissionFlag,
)
from usbd.core.fallocate import FALLOC_FL_ZERO_RANGE, fallocate
from usbd.core.testing import (
    DeviceHarness,
    MakeDevice,
    PersistentDeviceTests,
    ReopenDevice,
    random_bytes,
)
from usbd.filedisk import (
    DirectFileDisk,
    FileDisk,
    SizeMismatch,
    StoreError,
    StoreInUse,
    _device,
)
from usbd.filedisk._driver import driver

KiB = 1 << 10
MiB = 1 << 20
HOLE = ExtentFlag.HOLE | ExtentFlag.ZERO
DATA = ExtentFlag.DATA


def allocated(path: Path) -> int:
    """Bytes the file system has allocated to the file."""
    return os.stat(path).st_blocks * 512


def files(tmp_path: Path) -> Iterator[Path]:
    return (tmp_path / f"disk-{n}.bin" for n in itertools.count())


# -- the shared suite ----------------------------------------------------------------------


class TestFileDisk(PersistentDeviceTests):
    """Buffered: punched holes read back as zeros, so trimmed ranges are zeros."""

    trim_zeroes = True
    model_examples = 10  # the slow run explores 300

    @pytest.fixture
    def make_device(self, tmp_path: Path) -> MakeDevice:
        paths = files(tmp_path)
        return lambda size: FileDisk(next(paths), size)

    @pytest.fixture
    def reopen_device(self) -> ReopenDevice:
        def reopen(device: Device) -> Device:
            assert isinstance(device, FileDisk)
            return FileDisk(device.path)

        return reopen


def direct_disk(path: Path, size: int | None = None) -> DirectFileDisk:
    """A direct-I/O disk, or a skip (a failure in CI) where the file system refuses O_DIRECT."""
    try:
        return DirectFileDisk(path, size)
    except StoreError as exc:
        if exc.param != "direct":
            raise
        missing(f"direct I/O on {path.parent} ({exc})")
        raise


class TestDirectFileDisk(PersistentDeviceTests):
    """O_DIRECT: every request goes through aligned buffers, unaligned ones read-modify-write.

    Every write waits for the disk, so the suite's whole-device patterns (thousands of
    synchronous 4 KiB writes) run only with the slow cases; the unaligned, overlapping, mixed
    and model-based tests, which are what read-modify-write could get wrong, run always.
    """

    trim_zeroes = True
    model_examples = 6

    @pytest.mark.slow
    async def test_alternating_data_and_zero_blocks(self, device_harness: DeviceHarness) -> None:
        await super().test_alternating_data_and_zero_blocks(device_harness)

    @pytest.mark.slow
    async def test_single_byte_pattern(self, device_harness: DeviceHarness) -> None:
        await super().test_single_byte_pattern(device_harness)

    @pytest.mark.slow
    @pytest.mark.parametrize("mode", ["structured", "simple", "kernel-style"])
    async def test_engine_round_trip(self, device_harness: DeviceHarness, mode: str) -> None:
        await super().test_engine_round_trip(device_harness, mode)

    @pytest.fixture
    def make_device(self, tmp_path: Path) -> MakeDevice:
        paths = files(tmp_path)
        return lambda size: direct_disk(next(paths), size)

    @pytest.fixture
    def reopen_device(self) -> ReopenDevice:
        def reopen(device: Device) -> Device:
            assert isinstance(device, DirectFileDisk)
            return direct_disk(device.path)

        return reopen


def refuse_fallocate(modes: int | None = None) -> Callable[[int, int, int, int], None]:
    """A stand-in for fallocate on a file system that refuses every mode (or those in
    ``modes``) with EOPNOTSUPP, as FAT or NFSv3 do."""
    real = fallocate

    def refusing(fd: int, mode: int, offset: int, length: int) -> None:
        if modes is None or mode & modes:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        real(fd, mode, offset, length)

    return refusing


@pytest.mark.slow
class TestFileDiskWithoutFallocate(PersistentDeviceTests):
    """A file system without punch-hole or zero-range: zeroing writes zeros, trim is ignored.
    Slow cases only: the unit tests of the fallback below run always."""

    trim_zeroes = False
    model_examples = 8

    @pytest.fixture(autouse=True)
    def no_fallocate(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(_device, "fallocate", refuse_fallocate())

    @pytest.fixture
    def make_device(self, tmp_path: Path) -> MakeDevice:
        paths = files(tmp_path)
        return lambda size: FileDisk(next(paths), size)

    @pytest.fixture
    def reopen_device(self) -> ReopenDevice:
        def reopen(device: Device) -> Device:
            assert isinstance(device, FileDisk)
            return FileDisk(device.path)

        return reopen


# -- sizes, creation and the lock ----------------------------------------------------------


def test_a_new_file_is_sparse_and_private(tmp_path: Path) -> None:
    path = tmp_path / "new.bin"
    disk = FileDisk(path, 64 * MiB)
    try:
        status = os.stat(path)
        assert status.st_size == disk.size == 64 * MiB
        assert stat.S_IMODE(status.st_mode) == 0o600
        assert allocated(path) == 0  # nothing written, nothing allocated: never zero-filled
        assert list(disk.extents(0, disk.size)) == [Extent(0, 64 * MiB, HOLE)]
    finally:
        disk.close()


def test_without_a_size_a_new_file_gets_the_default(tmp_path: Path) -> None:
    for size in (None, 0):
        path = tmp_path / f"default-{size}.bin"
        disk = FileDisk(path, size, default_size=3 * MiB)
        disk.close()
        assert os.stat(path).st_size == 3 * MiB


def test_an_existing_file_keeps_its_size(tmp_path: Path) -> None:
    path = tmp_path / "old.bin"
    path.write_bytes(b"x" * 5000)
    disk = FileDisk(path)
    try:
        assert disk.size == 5000
        assert bytes(disk.read(4990, 10)) == b"x" * 10
    finally:
        disk.close()
    FileDisk(path, 5000).close()  # the same size, given explicitly, is fine
    assert os.stat(path).st_size == 5000


def test_an_empty_existing_file_is_sized_like_a_new_one(tmp_path: Path) -> None:
    path = tmp_path / "touched.bin"
    path.touch()
    FileDisk(path, 2 * MiB).close()
    assert os.stat(path).st_size == 2 * MiB


def test_a_different_size_is_refused_unless_growing(tmp_path: Path) -> None:
    path = tmp_path / "vol.bin"
    disk = FileDisk(path, 4 * MiB)
    disk.write(4 * MiB - 3, memoryview(b"end"), False)
    disk.close()
    with pytest.raises(SizeMismatch) as bigger:
        FileDisk(path, 8 * MiB)
    assert (bigger.value.current, bigger.value.wanted, bigger.value.param) == (
        4 * MiB,
        8 * MiB,
        "size",
    )
    for grow in (False, True):  # shrinking is never done
        with pytest.raises(SizeMismatch) as smaller:
            FileDisk(path, 2 * MiB, grow=grow)
        assert "shrinking is never done" in str(smaller.value)
    assert os.stat(path).st_size == 4 * MiB
    before = allocated(path)
    disk = FileDisk(path, 8 * MiB, grow=True)
    try:
        assert disk.size == os.stat(path).st_size == 8 * MiB
        assert allocated(path) == before  # grown sparse
        assert bytes(disk.read(4 * MiB - 3, 3)) == b"end"
        assert bytes(disk.read(4 * MiB, 4 * MiB)) == bytes(4 * MiB)
    finally:
        disk.close()


def test_sizes_that_print_alike_are_told_apart() -> None:
    error = SizeMismatch(Path("/x.bin"), 1 << 30, (1 << 30) + 512)
    assert "1.0 GiB (1073741824 bytes)" in str(error)
    assert "1.0 GiB (1073742336 bytes)" in str(error)


def test_a_directory_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "dir.bin").mkdir()
    with pytest.raises(IsADirectoryError):
        FileDisk(tmp_path / "dir.bin")


def test_the_lock_keeps_a_second_device_off_the_file(tmp_path: Path) -> None:
    """flock conflicts even inside one process (a POSIX lock would not), and opening and
    closing the file elsewhere in the process does not drop it (a POSIX lock would)."""
    path = tmp_path / "locked.bin"
    first = FileDisk(path, MiB)
    try:
        os.close(os.open(path, os.O_RDONLY))
        with pytest.raises(StoreInUse) as caught:
            FileDisk(path)
        assert caught.value.pid == os.getpid()
        assert str(caught.value).startswith(f"{path} is in use by process {os.getpid()} (")
        assert caught.value.errno == errno.EBUSY
    finally:
        first.close()
    FileDisk(path).close()  # released at close


def test_a_refused_device_leaves_no_new_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses O_DIRECT (tmpfs before Linux 6.6): a StoreError naming
    ``direct``, and the file just created is removed again."""
    real = fcntl.fcntl

    def no_direct(fd: int, command: int, arg: int = 0) -> Any:
        if command == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, command, arg)

    monkeypatch.setattr(fcntl, "fcntl", no_direct)
    path = tmp_path / "direct.bin"
    with pytest.raises(StoreError) as caught:
        DirectFileDisk(path, MiB)
    assert caught.value.param == "direct"
    assert "not supported on this filesystem" in str(caught.value)
    assert not path.exists()
    path.write_bytes(b"keep")  # an existing file is never removed
    with pytest.raises(StoreError):
        DirectFileDisk(path)
    assert path.read_bytes() == b"keep"


def test_direct_io_needs_whole_blocks(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as caught:
        DirectFileDisk(tmp_path / "odd.bin", MiB + 512)
    assert caught.value.param == "direct"
    assert not (tmp_path / "odd.bin").exists()


def test_every_call_fails_after_close(tmp_path: Path) -> None:
    disk = FileDisk(tmp_path / "closed.bin", MiB)
    disk.close()
    disk.close()  # harmless
    calls: list[Callable[[], object]] = [
        lambda: disk.read(0, 1),
        lambda: disk.write(0, memoryview(b"x"), False),
        lambda: disk.try_read(0, 1),
        lambda: disk.try_write(0, memoryview(b"x")),
        disk.flush,
        lambda: disk.trim(0, 1, False),
        lambda: disk.zero(0, 1, may_trim=False, fua=False, fast=False),
        lambda: disk.extents(0, 1),
        lambda: disk.cache(0, 1),
    ]
    for call in calls:
        with pytest.raises(DeviceError) as caught:
            call()
        assert caught.value.errno == errno.ESHUTDOWN


def test_what_the_engine_advertises(tmp_path: Path) -> None:
    disk = FileDisk(tmp_path / "flags.bin", MiB)
    try:
        export = Export(disk)
        for flag in ("SEND_FLUSH", "SEND_FUA", "SEND_TRIM", "SEND_CACHE", "CAN_MULTI_CONN"):
            assert export.flags & TransmissionFlag[flag], flag
        assert export.native_fua and export.native_zero and export.can_extents
        assert export.execution is Execution.PARALLEL_THREADS
        assert export.fast.read == disk.try_read and export.fast.write_behind
        assert export.info.min_block == 1
    finally:
        disk.close()
    direct = direct_disk(tmp_path / "direct-flags.bin", MiB)
    try:
        export = Export(direct)
        assert export.fast.read is None and export.fast.write is None
        assert export.info.min_block == 1 and export.info.preferred_block == 4096
    finally:
        direct.close()


# -- holes: trim and zero free (or keep) real blocks -----------------------------------------


@pytest.fixture
def written(tmp_path: Path) -> Iterator[FileDisk]:
    """A 16 MiB disk with 8 MiB of random data from 4 MiB on, on disk (fsync)."""
    disk = FileDisk(tmp_path / "holes.bin", 16 * MiB)
    disk.write(4 * MiB, memoryview(random_bytes(8 * MiB, "holes")), False)
    os.fsync(disk._fd)
    try:
        yield disk
    finally:
        disk.close()


def test_trim_frees_the_blocks(written: FileDisk) -> None:
    before = allocated(written.path)
    assert before >= 8 * MiB
    written.trim(6 * MiB, 4 * MiB, True)
    freed = before - allocated(written.path)
    assert 4 * MiB - 64 * KiB <= freed <= 4 * MiB + 64 * KiB, freed
    assert bytes(written.read(6 * MiB, 4 * MiB)) == bytes(4 * MiB)
    assert list(written.extents(4 * MiB, 8 * MiB)) == [
        Extent(4 * MiB, 2 * MiB, DATA),
        Extent(6 * MiB, 4 * MiB, HOLE),
        Extent(10 * MiB, 2 * MiB, DATA),
    ]


def test_zero_may_trim_frees_and_no_hole_keeps_the_blocks(written: FileDisk) -> None:
    before = allocated(written.path)
    written.zero(4 * MiB, 2 * MiB, may_trim=False, fua=False, fast=True)
    assert allocated(written.path) == before  # NO_HOLE: zeroed in place
    assert bytes(written.read(4 * MiB, 2 * MiB)) == bytes(2 * MiB)
    written.zero(8 * MiB, 2 * MiB, may_trim=True, fua=True, fast=True)
    freed = before - allocated(written.path)
    assert 2 * MiB - 64 * KiB <= freed <= 2 * MiB + 64 * KiB, freed
    assert bytes(written.read(8 * MiB, 2 * MiB)) == bytes(2 * MiB)


def test_unaligned_trim_zeroes_the_edges_and_frees_whole_blocks(written: FileDisk) -> None:
    before = allocated(written.path)
    data = bytes(written.read(4 * MiB, 8 * MiB))
    written.trim(5 * MiB + 100, MiB, False)
    after = bytes(written.read(4 * MiB, 8 * MiB))
    start = MiB + 100
    assert after[:start] == data[:start]
    assert after[start : start + MiB] == bytes(MiB)
    assert after[start + MiB :] == data[start + MiB :]
    assert before - allocated(written.path) >= MiB - 8 * KiB


# -- the fallback without fallocate ---------------------------------------------------------


def test_without_fallocate_zeroing_writes_zeros_and_says_so_once(
    written: FileDisk, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_device, "fallocate", refuse_fallocate())
    caplog.set_level(logging.WARNING, logger="usbd.filedisk")
    data = bytes(written.read(4 * MiB, 8 * MiB))
    with pytest.raises(DeviceError) as caught:
        written.zero(4 * MiB, MiB, may_trim=True, fua=False, fast=True)
    assert caught.value.errno == errno.ENOTSUP
    written.zero(4 * MiB, MiB, may_trim=True, fua=False, fast=False)
    written.zero(5 * MiB + 7, 1000, may_trim=False, fua=True, fast=False)
    written.trim(6 * MiB, MiB, False)  # ignored: the data stays
    after = bytes(written.read(4 * MiB, 8 * MiB))
    assert after[:MiB] == bytes(MiB)
    assert after[MiB + 7 : MiB + 1007] == bytes(1000)
    assert after[MiB + 1007 :] == data[MiB + 1007 :]
    lines = [r.getMessage() for r in caplog.records if r.name == "usbd.filedisk"]
    assert lines == [
        f"{written.path}: the file system cannot punch holes or zero ranges in place "
        "(fallocate: Operation not supported): TRIM is ignored; zeroing writes zeros"
    ]


def test_a_file_system_without_zero_range_still_punches(
    written: FileDisk, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """tmpfs punches holes but cannot zero a range in place: NO_HOLE writes zeros."""
    monkeypatch.setattr(_device, "fallocate", refuse_fallocate(FALLOC_FL_ZERO_RANGE))
    caplog.set_level(logging.WARNING, logger="usbd.filedisk")
    before = allocated(written.path)
    written.zero(4 * MiB, MiB, may_trim=False, fua=False, fast=False)
    written.zero(5 * MiB, MiB, may_trim=False, fua=False, fast=False)
    assert allocated(written.path) == before
    written.zero(6 * MiB, MiB, may_trim=True, fua=False, fast=True)
    assert allocated(written.path) <= before - MiB + 64 * KiB
    assert bytes(written.read(4 * MiB, 3 * MiB)) == bytes(3 * MiB)
    lines = [r.getMessage() for r in caplog.records if r.name == "usbd.filedisk"]
    assert lines == [
        f"{written.path}: the file system cannot zero ranges in place "
        "(fallocate: Operation not supported): zeroing that must keep its blocks (NO_HOLE) "
        "writes zeros"
    ]


# -- block status from the file's holes ------------------------------------------------------


def seek_walk(path: Path) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) runs of a whole file, straight from SEEK_DATA/SEEK_HOLE."""
    runs = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data = size
            if data > pos:
                runs.append((pos, data - pos, False))
                pos = data
                continue
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            runs.append((pos, hole - pos, True))
            pos = hole
    finally:
        os.close(fd)
    return runs


def test_extents_are_the_files_holes(tmp_path: Path) -> None:
    disk = FileDisk(tmp_path / "map.bin", 16 * MiB)
    try:
        for offset, length in [(MiB, 64 * KiB), (5 * MiB, 4 * KiB), (16 * MiB - 4 * KiB, 4 * KiB)]:
            disk.write(offset, memoryview(b"\xab" * length), False)
        expected = [
            Extent(0, MiB, HOLE),
            Extent(MiB, 64 * KiB, DATA),
            Extent(MiB + 64 * KiB, 4 * MiB - 64 * KiB, HOLE),
            Extent(5 * MiB, 4 * KiB, DATA),
            Extent(5 * MiB + 4 * KiB, 11 * MiB - 8 * KiB, HOLE),
            Extent(16 * MiB - 4 * KiB, 4 * KiB, DATA),
        ]
        assert list(disk.extents(0, disk.size)) == expected
        walk = [(e.offset, e.length, e.flags == DATA) for e in expected]
        assert seek_walk(disk.path) == walk
        # From inside a run, and stopping at the end of the request.
        assert list(disk.extents(MiB + 4096, 8192)) == [Extent(MiB + 4096, 8192, DATA)]
        assert list(disk.extents(100, MiB)) == [
            Extent(100, MiB - 100, HOLE),
            Extent(MiB, 100, DATA),
        ]
    finally:
        disk.close()


def test_a_fragmented_file_is_described_a_part_at_a_time(tmp_path: Path) -> None:
    disk = FileDisk(tmp_path / "fragments.bin", 16 * MiB)
    try:
        for block in range(0, 4096, 2):  # every other 4 KiB block: 4096 runs
            disk.write(block * 4096, memoryview(b"d" * 4096), False)
        first = list(disk.extents(0, disk.size))
        assert len(first) == _device.MAX_EXTENTS
        assert first[0] == Extent(0, 4096, DATA) and first[1] == Extent(4096, 4096, HOLE)
        pos, count = 0, 0
        while pos < disk.size:
            runs = list(disk.extents(pos, disk.size - pos))
            assert runs[0].offset == pos
            count += len(runs)
            pos = runs[-1].offset + runs[-1].length
        assert count == 4096  # 2048 blocks of data, each followed by a hole
    finally:
        disk.close()


def test_short_reads_are_completed_and_a_truncated_file_is_an_io_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FileDisk(tmp_path / "short.bin", MiB)
    try:
        data = random_bytes(MiB, "short")
        disk.write(0, memoryview(data), False)
        real = os.pread
        monkeypatch.setattr(os, "pread", lambda fd, n, offset: real(fd, n // 3, offset))
        assert bytes(disk.read(1000, 500_000)) == data[1000:501_000]
        monkeypatch.undo()
        os.truncate(disk.path, MiB // 2)  # behind the device's back
        with pytest.raises(DeviceError) as caught:
            disk.read(MiB // 2 - 10, 20)
        assert caught.value.errno == errno.EIO
    finally:
        disk.close()


# -- the page cache fast path -------------------------------------------------------------


def test_try_read_serves_cached_data_and_declines_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FileDisk(tmp_path / "cached.bin", 4 * MiB)
    try:
        disk.write(0, memoryview(b"cached" * 1000), False)
        got = disk.try_read(0, 6000)  # just written, so in the page cache
        assert got is not None and bytes(got) == b"cached" * 1000
        # Evicted data makes the kernel start reading and answer EAGAIN (unless the disk
        # was quicker than the call): either way, never wrong data.
        os.fdatasync(disk._fd)
        os.posix_fadvise(disk._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        got = disk.try_read(0, 6000)
        assert got is None or bytes(got) == b"cached" * 1000
        real = os.preadv
        attempts = 0

        def preadv(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
            nonlocal attempts
            if not flags & os.RWF_NOWAIT:
                return real(fd, buffers, offset, flags)
            attempts += 1
            if attempts == 1:
                raise BlockingIOError(errno.EAGAIN, "would block")
            return 100  # a short read: the rest is not cached

        monkeypatch.setattr(os, "preadv", preadv)
        assert disk.try_read(0, 6000) is None
        assert disk.try_read(0, 6000) is None
        assert bytes(disk.read(0, 6000)) == b"cached" * 1000
    finally:
        disk.close()


def test_a_refusal_of_rwf_nowait_is_learnt_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ext4 refuses RWF_NOWAIT on buffered writes (EOPNOTSUPP): after the first refusal no
    attempt is made, and ordinary I/O goes on (with RWF_DSYNC for FUA)."""
    disk = FileDisk(tmp_path / "nowait.bin", MiB)
    calls: list[tuple[str, int]] = []
    real = {"preadv": os.preadv, "pwritev": os.pwritev}

    def refusing(name: str) -> Callable[..., int]:
        def call(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
            calls.append((name, flags))
            if flags & os.RWF_NOWAIT:
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
            return real[name](fd, buffers, offset, flags)

        return call

    for name in real:
        monkeypatch.setattr(os, name, refusing(name))
    try:
        for _ in range(2):
            assert disk.try_write(0, memoryview(b"abc")) == 0
            assert disk.try_read(0, 3) is None
        assert calls == [("pwritev", os.RWF_NOWAIT), ("preadv", os.RWF_NOWAIT)]
        disk.write(0, memoryview(b"abc"), True)
        assert calls[-1] == ("pwritev", os.RWF_DSYNC)  # FUA: durable before returning
        assert bytes(disk.read(0, 3)) == b"abc"
    finally:
        disk.close()


# -- direct I/O: read-modify-write under concurrency ------------------------------------------


def test_direct_unaligned_writes_into_the_same_blocks_at_once(tmp_path: Path) -> None:
    """Unaligned writes sharing blocks with each other, with aligned writes and with zeroing,
    all at once from many threads: a read-modify-write must never put back old bytes that
    another request has replaced since it read them."""
    disk = direct_disk(tmp_path / "rmw.bin", MiB)
    block = 4096
    try:
        rng = random.Random("rmw")
        # Blocks 144-255 start with data, to be zeroed.
        disk.write(144 * block, memoryview(random_bytes(112 * block, "old")), False)
        exact = bytearray(32 * block)  # blocks 0-31: 32 disjoint pieces of 128 bytes each
        # The requests on one block are submitted together, so that they run at once.
        groups: list[list[Callable[[], None]]] = []

        def write(offset: int, data: bytes) -> Callable[[], None]:
            return lambda: disk.write(offset, memoryview(data), False)

        def zero(offset: int) -> Callable[[], None]:
            return lambda: disk.zero(offset, block, may_trim=True, fua=False, fast=False)

        for n in range(32):
            group = []
            for offset in range(n * block, (n + 1) * block, 128):
                data = bytes([rng.randrange(1, 256)]) * 128
                exact[offset : offset + 128] = data
                group.append(write(offset, data))
            groups.append(group)
        for n in range(32, 144):  # a whole block written, and 100 bytes inside it
            groups.append(
                [write(n * block, bytes([n]) * block), write(n * block + 1000, b"\xee" * 100)]
            )
        for n in range(144, 256):  # a block zeroed, and 100 bytes inside it written
            groups.append([zero(n * block), write(n * block + 2000, b"\xdd" * 100)])
        rng.shuffle(groups)
        for group in groups:
            rng.shuffle(group)
        with ThreadPoolExecutor(16) as pool:
            for future in [pool.submit(job) for group in groups for job in group]:
                future.result()
        got = bytes(disk.read(0, MiB))
        assert got[: 32 * block] == bytes(exact)
        for n in range(32, 256):
            inside = 1000 if n < 144 else 2000
            old, new = (bytes([n]), b"\xee") if n < 144 else (b"\0", b"\xdd")
            data = got[n * block : (n + 1) * block]
            assert data[:inside] + data[inside + 100 :] == old * (block - 100), n
            assert set(data[inside : inside + 100]) <= {old[0], new[0]}, n
    finally:
        disk.close()


# -- figures -------------------------------------------------------------------------------


def test_the_declared_metrics_are_reported(tmp_path: Path) -> None:
    disk = FileDisk(tmp_path / "m.bin", 16 * MiB)
    try:
        assert set(disk.metrics()) == {metric.name for metric in driver.metrics}
        assert [m.name for m in driver.metrics if m.headline] == ["allocated_bytes"]
    finally:
        disk.close()
    assert disk.metrics() == {}


def test_allocated_bytes_grow_with_writes_and_fall_with_trim(tmp_path: Path) -> None:
    """What the device reports is what du sees, and it moves by what was written and
    trimmed (give or take the file system's metadata)."""
    disk = FileDisk(tmp_path / "m.bin", 64 * MiB)
    try:
        first = disk.metrics()
        assert first == {"allocated_bytes": 0, "size_bytes": 64 * MiB, "punch_holes": 1}
        disk.write(8 * MiB, memoryview(os.urandom(24 * MiB)), False)
        grown = disk.metrics()["allocated_bytes"]
        assert grown == allocated(disk.path)
        assert 24 * MiB <= grown <= 24 * MiB + 64 * KiB, grown
        disk.flush()
        assert disk.metrics()["allocated_bytes"] == allocated(disk.path)
        disk.trim(8 * MiB, 16 * MiB, False)
        trimmed = disk.metrics()["allocated_bytes"]
        assert trimmed == allocated(disk.path)
        assert 16 * MiB - 64 * KiB <= grown - trimmed <= 16 * MiB + 64 * KiB, (grown, trimmed)
        assert disk.metrics()["size_bytes"] == 64 * MiB
    finally:
        disk.close()


def test_a_file_system_that_cannot_punch_says_so_in_its_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_device, "fallocate", refuse_fallocate())
    disk = FileDisk(tmp_path / "m.bin", 16 * MiB)
    try:
        disk.write(0, memoryview(random_bytes(MiB, "punch")), False)
        before = disk.metrics()
        disk.trim(0, MiB, False)  # ignored: no hole
        after = disk.metrics()
        assert (before["punch_holes"], after["punch_holes"]) == (1, 0)
        assert after["allocated_bytes"] == before["allocated_bytes"] >= MiB
    finally:
        disk.close()


def test_sizing_and_growing_log_their_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a terminal, progress is log lines (every line, with the interval at 0)."""
    monkeypatch.setattr(_device, "_GROW_LOG_EVERY", 0.0)
    path = tmp_path / "grown.bin"
    with caplog.at_level(logging.INFO, logger="usbd.filedisk"):
        FileDisk(path, 8 * MiB).close()
        FileDisk(path, 24 * MiB, grow=True).close()
    lines = [r.getMessage() for r in caplog.records if r.name == "usbd.filedisk"]
    assert f"sizing {path}: 8.0 MiB of 8.0 MiB (100%)" in "\n".join(lines), lines
    assert any(line.startswith(f"sizing {path}: done, 8.0 MiB in ") for line in lines), lines
    assert any(line.startswith(f"growing {path}: 16 MiB of 16 MiB (100%), ") for line in lines)
    assert any(line.startswith(f"growing {path}: done, 16 MiB in ") for line in lines), lines
    assert os.stat(path).st_size == 24 * MiB


def test_growing_shows_a_bar_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_device, "_GROW_LOG_EVERY", 0)  # no delay before the bar either
    out = io.StringIO()
    fd = os.open(tmp_path / "bar.bin", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _device._extend(fd, 0, 4 * MiB, "growing bar.bin", bar=True, stream=out)
        assert os.fstat(fd).st_size == 4 * MiB
    finally:
        os.close(fd)
    text = out.getvalue()
    assert "growing bar.bin:" in text and "4.00M" in text, repr(text)
