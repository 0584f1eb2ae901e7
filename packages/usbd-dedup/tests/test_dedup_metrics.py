"""usbd-dedup's figures: what Device.metrics() reports against the work done, and the check's
progress (log lines without a terminal, a bar on one)."""

from __future__ import annotations

import io
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from usbd.core.lockfile import unlock
from usbd.core.settings import CommonSettings
from usbd.dedup import DedupDevice, DedupOptions
from usbd.dedup._check import check
from usbd.dedup._driver import driver
from usbd.dedup._volume import open_closed, volume_dir

KiB = 1 << 10
MiB = 1 << 20


def make(directory: Path, *, compress: str = "zstd") -> DedupDevice:
    settings = CommonSettings(store_dir=directory, store_name="vol", store_size="256MiB")
    device = driver.create(settings, DedupOptions(compress=compress))
    assert isinstance(device, DedupDevice)
    return device


@pytest.fixture
def device(tmp_path: Path) -> Iterator[DedupDevice]:
    found = make(tmp_path)
    try:
        yield found
    finally:
        found.close()


def test_every_declared_metric_is_reported_and_nothing_else(device: DedupDevice) -> None:
    declared = {metric.name for metric in driver.metrics}
    assert set(device.metrics()) == declared
    headline = {metric.name for metric in driver.metrics if metric.headline}
    assert headline == {"dedup_ratio", "compression_ratio"}


def test_64_mib_of_duplicated_data(device: DedupDevice) -> None:
    """32 MiB of random blocks written twice: ratio 2.00, every byte counted exactly."""
    before = device.metrics()
    assert (before["dedup_ratio"], before["logical_bytes"], before["commits"]) == (1.0, 0, 0)
    assert before["last_commit_timestamp_seconds"] == 0
    data = memoryview(os.urandom(32 * MiB))
    for base in (0, 32 * MiB):
        for offset in range(0, 32 * MiB, MiB):
            device.write(base + offset, data[offset : offset + MiB], False)
    written = device.metrics()
    assert written["pending_changes"] > 0  # nothing committed yet (no FLUSH, no timer yet)
    started = time.time()
    device.flush()
    flushed = device.metrics()
    assert flushed["dedup_ratio"] == 2.0
    assert flushed["compression_ratio"] == 1.0  # random blocks do not compress: stored raw
    assert flushed["logical_bytes"] == 64 * MiB
    assert flushed["stored_bytes"] == 32 * MiB
    assert flushed["mapped_blocks"] == 64 * MiB // (4 * KiB)
    assert flushed["unique_blocks"] == 32 * MiB // (4 * KiB)
    assert flushed["written_bytes"] == 64 * MiB
    assert flushed["pending_changes"] == 0
    assert flushed["commits"] >= 1
    assert started <= flushed["last_commit_timestamp_seconds"] <= time.time()
    assert flushed["commit_failed"] == 0
    files = device.volume.directory.glob("blocks.*")
    on_disk = sum(path.stat().st_blocks * 512 for path in files)
    assert flushed["allocated_bytes"] == on_disk
    assert 32 * MiB <= on_disk <= 32 * MiB + 256 * KiB
    # The second copy found every hash in the uncommitted layer; reads through the cache
    # after the commit are hits.
    hits = flushed["index_cache_hits"]
    assert flushed["index_cache_entries"] > 0
    device.write(0, data[: 4 * KiB], False)  # the same content again: a lookup
    assert device.metrics()["index_cache_hits"] > hits

    # Trim it all: nothing mapped, every slot free, and punched at the next commit.
    device.trim(0, 64 * MiB, False)
    device.flush()
    trimmed = device.metrics()
    assert (trimmed["logical_bytes"], trimmed["stored_bytes"], trimmed["dedup_ratio"]) == (0, 0, 1)
    assert trimmed["free_slots"] == 32 * MiB // (4 * KiB)
    assert trimmed["allocated_bytes"] < 256 * KiB
    assert trimmed["written_bytes"] == 64 * MiB + 4 * KiB
    assert trimmed["commits"] > flushed["commits"]


def test_compression_ratio_of_small_blocks(device: DedupDevice) -> None:
    """Blocks that compress to a few bytes take the smallest slot (512 B): ratio 8.00."""
    blocks = b"".join(n.to_bytes(8, "big") + bytes(4 * KiB - 8) for n in range(1, 257))
    device.write(0, memoryview(blocks), False)
    values = device.metrics()
    assert values["compression_ratio"] == 8.0
    assert values["stored_bytes"] == 256 * 512
    assert values["logical_bytes"] == MiB


def test_metrics_after_close_are_none(tmp_path: Path) -> None:
    device = make(tmp_path)
    device.close()
    assert device.metrics() == {}


# -- the check's progress ------------------------------------------------------------------


def stopped_volume(directory: Path) -> int:
    """A volume with 1 MiB written twice and 64 KiB trimmed; the entries the check scans."""
    device = make(directory)
    data = memoryview(os.urandom(MiB))
    device.write(0, data, False)
    device.write(MiB, data, False)
    device.trim(0, 64 * KiB, False)
    values = device.metrics()
    device.close()
    mapped, unique, free = (
        int(values[k]) for k in ("mapped_blocks", "unique_blocks", "free_slots")
    )
    assert (mapped, unique, free) == (512 - 16, 256, 0)  # the trimmed blocks' copies remain
    return mapped + 2 * unique + free


def test_the_check_logs_its_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    total = stopped_volume(tmp_path)
    db, files, params, lock_fd = open_closed(volume_dir(tmp_path, "vol"))
    try:
        with caplog.at_level(logging.INFO, logger="usbd.dedup"):
            report = check(db, files, params, deep=True, every=0, bar=False)
    finally:
        db.close()
        files.close()
        unlock(lock_fd)
        os.close(lock_fd)
    assert report.summary == "check: consistent"
    lines = [r.getMessage() for r in caplog.records if r.name == "usbd.dedup"]
    what = "checking (reading every stored block)"
    progress = [line for line in lines if re.fullmatch(rf"{re.escape(what)}: \d+ of \d+ .*", line)]
    # One line per pass at least (four passes: map, records, hashes, free list).
    assert len(progress) >= 3, lines
    assert all(f" of {total} (" in line for line in progress), progress
    assert lines[-1].startswith(f"{what}: done, {total} in "), lines


def test_the_check_shows_a_bar_on_a_terminal(tmp_path: Path) -> None:
    total = stopped_volume(tmp_path)
    db, files, params, lock_fd = open_closed(volume_dir(tmp_path, "vol"))
    out = io.StringIO()
    try:
        check(db, files, params, deep=False, every=0, bar=True, stream=out)
    finally:
        db.close()
        files.close()
        unlock(lock_fd)
        os.close(lock_fd)
    text = out.getvalue()
    assert "checking:" in text and f"/{total} " in text, text
