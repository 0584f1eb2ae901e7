"""usbd-objstore's figures (``Device.metrics``) and progress, checked against the work done on
a real S3 server (SeaweedFS): bytes written are dirty until an upload round commits them, the
uploads and fetches counted are the objects the bucket holds and sends, the cache's hits,
misses and evictions are the reads made, retries and failures are those of a real outage, and
the long work of open and close (listing the bucket, the last upload) logs its progress.
At the end a real ``usbd-objstore --metrics`` scraped over HTTP: Prometheus' ``promtool check
metrics`` accepts the text, and its values are the work a python3-libnbd client did.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import usbd.objstore._device as device_module
from usbd.core import DeviceError, format_size
from usbd.objstore import ObjStoreDevice, Params, S3Store, driver, open_volume
from usbd.objstore.testing import SeaweedS3

sys.path.append(str(Path(__file__).resolve().parent))

from objstore_helpers import Backend, Daemon, connected, import_libnbd, missing

KiB = 1 << 10
MiB = 1 << 20
OBJECT = 256 * KiB
SIZE = 32 * OBJECT
KEY = bytes(range(1, 33))
#: A ceiling for what must happen (an upload round, a retry): hang detection, not speed.
HANG = 30.0

Opener = Callable[..., ObjStoreDevice]


@pytest.fixture
def open_device(seaweed: SeaweedS3, tmp_path: Path) -> Iterator[Opener]:
    """Open devices on volume ``name`` (a new one per test) in the server's bucket; close
    what the test left open."""
    name = f"metrics-{uuid.uuid4().hex[:12]}"
    opened: list[ObjStoreDevice] = []

    def open_(
        *, persistent: bool = False, cache_objects: int | None = None, timeout: float = 20
    ) -> ObjStoreDevice:
        volume = open_volume(
            S3Store(seaweed.objstore_cfg(), timeout=5.0),
            name,
            Params(SIZE, OBJECT, "zstd", "aes-gcm"),
            set(),
            lambda mode: None if mode == "identity" else KEY,
            takeover=False,
            timeout=20,
        )
        device = ObjStoreDevice(
            volume,
            tmp_path / f"{name}.cache",
            persistent=persistent,
            cache_objects=cache_objects,
            workers=4,
            flush_every=0,  # rounds only when asked: the figures stay put between steps
            timeout=timeout,
            readahead=0,  # reads fetch what they read, no more
        )
        opened.append(device)
        return device

    yield open_
    for device in opened:
        device.close()


def keys(seaweed: SeaweedS3, prefix: str) -> list[str]:
    """The keys the bucket holds under ``prefix``, as the server lists them."""
    client = seaweed.client()
    found: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=seaweed.bucket, Prefix=prefix
    ):
        found += [item["Key"] for item in page.get("Contents", [])]
    return found


def wait_for(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, f"not within {HANG:.0f} s: {what}"
        time.sleep(0.05)


def test_every_declared_metric_is_reported_and_only_those(open_device: Opener) -> None:
    device = open_device()
    assert set(device.metrics()) == {metric.name for metric in driver.metrics}
    headline = {metric.name for metric in driver.metrics if metric.headline}
    assert headline == {"dirty_bytes", "not_in_bucket_bytes"}
    for metric in driver.metrics:
        assert metric.exposed_name("objstore").startswith("usbd_objstore_")


def test_dirty_bytes_uploads_and_commits_follow_the_writes(
    open_device: Opener, seaweed: SeaweedS3
) -> None:
    device = open_device()
    opened = device.metrics()
    assert opened["manifest_commits"] == 1  # the new epoch
    assert opened["last_manifest_commit_timestamp_seconds"] > 0
    assert opened["dirty_bytes"] == opened["cache_bytes"] == opened["uploaded_bytes"] == 0
    assert opened["cache_limit_bytes"] == SIZE

    data = os.urandom(2 * MiB)  # 8 objects, incompressible
    device.write(OBJECT, memoryview(data), False)
    written = device.metrics()
    assert written["dirty_bytes"] == 2 * MiB
    assert written["dirty_objects"] == 8
    assert written["cache_bytes"] == 2 * MiB
    assert written["not_in_bucket_bytes"] == 0  # nothing was flushed (and FLUSH uploads)
    assert written["uploaded_objects"] == written["uploaded_bytes"] == 0
    assert written["manifest_commits"] == 1

    device.flush()
    flushed = device.metrics()
    assert flushed["dirty_bytes"] == flushed["dirty_objects"] == 0
    assert flushed["uploaded_objects"] == 8
    assert flushed["uploaded_bytes"] == 2 * MiB
    # Random data is stored as it is, with each object's header and tag.
    assert 2 * MiB < flushed["uploaded_stored_bytes"] < 2 * MiB + 8 * KiB
    assert flushed["upload_queue_objects"] == 0
    assert flushed["manifest_commits"] == 2
    assert (
        flushed["last_manifest_commit_timestamp_seconds"]
        > written["last_manifest_commit_timestamp_seconds"]
    )
    assert flushed["cache_bytes"] == 2 * MiB  # uploaded, and still held
    assert len(keys(seaweed, f"{device.name}/data/")) == 8

    assert device.read(OBJECT, 2 * MiB) == data
    read = device.metrics()
    assert read["cache_hits"] == 8  # one per object the read touched
    assert read["cache_misses"] == read["downloaded_objects"] == 0

    device.flush()  # nothing dirty: no round, no commit
    assert device.metrics()["manifest_commits"] == 2


def test_misses_downloads_and_evictions_of_a_small_cache(open_device: Opener) -> None:
    data = os.urandom(2 * MiB)
    first = open_device()
    first.write(0, memoryview(data), False)
    first.flush()
    first.close()  # a clean stop: the temporary cache goes

    device = open_device(cache_objects=4)
    assert device.metrics()["cache_limit_bytes"] == 4 * OBJECT
    assert device.read(0, 2 * MiB) == data
    cold = device.metrics()
    assert cold["cache_misses"] == cold["downloaded_objects"] == 8
    assert cold["downloaded_bytes"] == 2 * MiB
    assert cold["cache_hits"] == 0
    assert cold["cache_evictions"] == 4  # room for 4: each of the last 4 evicted one
    assert cold["cache_bytes"] == 4 * OBJECT

    assert device.read(4 * OBJECT, 4 * OBJECT) == data[4 * OBJECT :]  # the 4 held
    warm = device.metrics()
    assert warm["cache_hits"] == 4
    assert warm["cache_misses"] == 8
    assert warm["cache_evictions"] == 4
    assert device.read(0, 10) == data[:10]  # evicted: fetched again
    assert device.metrics()["cache_misses"] == 9
    assert device.metrics()["cache_evictions"] == 5


def test_with_a_persistent_cache_flushed_bytes_are_not_in_the_bucket_until_uploaded(
    open_device: Opener,
) -> None:
    device = open_device(persistent=True)
    device.write(0, memoryview(os.urandom(MiB)), False)
    assert device.metrics()["not_in_bucket_bytes"] == 0  # not flushed: nothing acknowledged

    device.flush()  # durable on local disk, not uploaded
    flushed = device.metrics()
    assert flushed["dirty_bytes"] == flushed["not_in_bucket_bytes"] == MiB
    assert flushed["uploaded_bytes"] == 0

    device.write(MiB, memoryview(os.urandom(OBJECT)), False)  # not flushed
    more = device.metrics()
    assert more["dirty_bytes"] == MiB + OBJECT
    assert more["not_in_bucket_bytes"] == MiB

    device.uploader.request()
    wait_for("the upload round", lambda: device.metrics()["dirty_bytes"] == 0)
    uploaded = device.metrics()
    assert uploaded["not_in_bucket_bytes"] == 0
    assert uploaded["uploaded_bytes"] == MiB + OBJECT
    assert uploaded["manifest_commits"] == 2

    device.write(0, memoryview(os.urandom(OBJECT)), False)  # written again after its upload
    assert device.metrics()["not_in_bucket_bytes"] == 0
    device.flush()
    assert device.metrics()["not_in_bucket_bytes"] == OBJECT


def test_retries_and_failures_of_an_outage_are_counted(
    open_device: Opener, seaweed: SeaweedS3
) -> None:
    data = os.urandom(OBJECT)
    first = open_device()
    first.write(0, memoryview(data), False)
    first.flush()
    first.close()

    device = open_device(timeout=3)  # a read of an uncached object gives up after 3 s
    device.write(OBJECT, memoryview(os.urandom(OBJECT)), False)
    before = device.metrics()
    assert before["store_retries"] == before["store_failures"] == 0
    seaweed.stop()
    try:
        device.uploader.request()
        wait_for("a retried upload", lambda: device.metrics()["store_retries"] >= 2)
        with pytest.raises(DeviceError) as failed:
            device.read(0, OBJECT)  # not cached: a GET that the outage fails
        assert failed.value.errno == errno.EIO
        during = device.metrics()
        assert during["store_failures"] >= 1
        assert during["dirty_objects"] == 1
        assert during["uploaded_objects"] == 0
    finally:
        seaweed.start()
    device.flush()  # the round under way gets through once the store is back
    after = device.metrics()
    assert after["dirty_objects"] == 0
    assert after["uploaded_objects"] == 1
    assert device.read(0, OBJECT) == data


# -- progress --------------------------------------------------------------------------------


def progress_lines(caplog: pytest.LogCaptureFixture, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if what in r.getMessage()]


def test_the_upload_at_close_logs_its_progress(
    open_device: Opener, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device_module, "PROGRESS_EVERY", 0.0)  # a line at every object
    monkeypatch.setattr(device_module, "PROGRESS_BAR", False)  # no terminal, whatever runs this
    device = open_device()
    device.write(0, memoryview(os.urandom(2 * MiB)), False)
    caplog.set_level(logging.INFO, logger="usbd")
    device.close()
    lines = progress_lines(caplog, "uploading before the stop")
    name = device.name
    # One line per object as it goes, then the last line.
    assert len(lines) == 9, lines
    for count, line in enumerate(lines[:8], 1):
        done = count * OBJECT
        expected = f"{format_size(done)} of 2.0 MiB ({100 * done / (2 * MiB):.0f}%), "
        assert line.startswith(f"{name}: uploading before the stop: {expected}"), line
    assert lines[7].split("(")[1].startswith("100%")
    assert lines[8].startswith(f"{name}: uploading before the stop: done, 2.0 MiB in ")


def test_the_listing_at_open_logs_its_progress(
    open_device: Opener,
    seaweed: SeaweedS3,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = open_device()
    first.write(0, memoryview(os.urandom(5 * OBJECT)), False)
    first.flush()
    first.close()

    monkeypatch.setattr(device_module, "PROGRESS_EVERY", 0.0)
    monkeypatch.setattr(device_module, "PROGRESS_BAR", False)
    caplog.set_level(logging.INFO, logger="usbd")
    device = open_device()
    what = f"{device.name}: listing the bucket for leftovers"
    wait_for(
        "the listing's last line",
        lambda: any("done" in line for line in progress_lines(caplog, what)),
    )
    listed = len(keys(seaweed, f"{device.name}/data/")) + len(keys(seaweed, f"{device.name}/meta/"))
    assert listed >= 5
    lines = progress_lines(caplog, what)
    assert len(lines) == listed + 1, lines
    for count, line in enumerate(lines[:-1], 1):
        assert line.startswith(f"{what}: {count}, "), line
    assert lines[-1].startswith(f"{what}: done, {listed} in ")


def test_a_terminal_gets_a_bar_instead_of_lines(
    open_device: Opener, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(device_module, "PROGRESS_BAR", True)
    monkeypatch.setattr(device_module, "PROGRESS_STREAM", screen)
    monkeypatch.setattr(device_module, "PROGRESS_EVERY", 0.0)
    device = open_device()
    device.write(0, memoryview(os.urandom(MiB)), False)
    caplog.set_level(logging.INFO, logger="usbd")
    device.close()
    drawn = screen.getvalue()
    assert f"{device.name}: uploading before the stop" in drawn
    assert "1.00M" in drawn  # the total, in tqdm's units
    # The bar replaces the lines as it goes (the last line is logged if the work took a second).
    assert not [line for line in progress_lines(caplog, "uploading before the stop") if "%" in line]


# -- the daemon, scraped ---------------------------------------------------------------------


def scrape(url: str) -> tuple[str, dict[str, float]]:
    """The exposition at ``url`` and its unlabelled samples (the driver's figures), by name."""
    with urllib.request.urlopen(url, timeout=HANG) as reply:
        text = reply.read().decode()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }
    return text, values


def test_the_daemon_publishes_its_figures_and_promtool_accepts_them(seaweed: SeaweedS3) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool (Debian's prometheus package)")
    assert promtool is not None
    nbd = import_libnbd()
    workdir = Path(tempfile.mkdtemp(prefix="usbd-om-", dir="/tmp"))  # a short socket path
    backend = Backend.s3(seaweed.objstore_cfg(seaweed.create_bucket("metrics-daemon")))
    extra = ["--metrics", "127.0.0.1:0", "--objstore-objsize", "256KiB"]
    extra += ["--objstore-flushevery", "0", "--attach", "none"]
    daemon = Daemon(workdir, backend, size=8 * MiB, extra=extra)
    try:
        daemon.start()
        found = re.search(r"publishes metrics at (\S+)", "".join(daemon.lines))
        assert found, daemon.report()
        url = found.group(1)
        _text, opened = scrape(url)
        assert opened["usbd_objstore_manifest_commits_total"] == 1
        data = os.urandom(MiB)
        with connected(nbd, daemon) as handle:
            handle.pwrite(data, 0)
            _text, written = scrape(url)
            assert written["usbd_objstore_dirty_bytes"] == MiB
            assert written["usbd_objstore_dirty_objects"] == 4
            assert written["usbd_objstore_uploaded_bytes_total"] == 0
            # SIGUSR1 logs the headline figures first.
            os.kill(daemon.pid, signal.SIGUSR1)
            wait_for("the SIGUSR1 line", lambda: "statistics:" in daemon.stderr_path.read_text())
            line = next(
                line
                for line in daemon.stderr_path.read_text().splitlines()
                if "statistics:" in line
            )
            assert "statistics: dirty bytes 1.0 MiB, not in bucket bytes 0 B, size 8.0 MiB" in line
            handle.flush()
            assert handle.pread(MiB, 0) == data
            text, flushed = scrape(url)
        result = subprocess.run(
            [promtool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=HANG,
            check=False,
        )
        assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{text}"
        assert flushed["usbd_objstore_dirty_bytes"] == 0
        assert flushed["usbd_objstore_not_in_bucket_bytes"] == 0
        assert flushed["usbd_objstore_uploaded_bytes_total"] == MiB
        assert flushed["usbd_objstore_uploaded_objects_total"] == 4
        assert flushed["usbd_objstore_manifest_commits_total"] == 2
        assert (
            flushed["usbd_objstore_last_manifest_commit_timestamp_seconds"]
            > written["usbd_objstore_last_manifest_commit_timestamp_seconds"]
        )
        assert flushed["usbd_objstore_cache_hits_total"] == 4
        assert flushed["usbd_objstore_cache_bytes"] == MiB
        assert flushed["usbd_objstore_cache_limit_bytes"] == 8 * MiB
        assert flushed["usbd_objstore_store_failures_total"] == 0
        # Every declared figure is exposed, under its declared kind.
        for metric in driver.metrics:
            assert metric.exposed_name("objstore") in flushed, metric.name
        daemon.stop()
    finally:
        daemon.close()
        shutil.rmtree(workdir, ignore_errors=True)
