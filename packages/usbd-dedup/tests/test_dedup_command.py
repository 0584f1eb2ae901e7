"""usbd-dedup as installed: its entry point, and its console script as a real process: fixed
parameters on reopen, a second daemon on the same volume, --stats and --check, SIGUSR1, and
--metrics scraped over HTTP and checked by Prometheus' promtool."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from usbd.core.driver import ENTRY_POINT_GROUP, Driver
from usbd.core.settings import CommonSettings
from usbd.dedup import DedupDevice, DedupOptions

KiB = 1 << 10
MiB = 1 << 20
COMMAND = str(Path(sys.executable).with_name("usbd-dedup"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COMMAND, *args], capture_output=True, text=True, timeout=60, check=False)


def store(directory: Path, *extra: str) -> list[str]:
    return ["--store-dir", str(directory), "--store-name", "vol", *extra]


def one_error(result: subprocess.CompletedProcess[str], status: int) -> str:
    assert result.returncode == status, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("usbd-dedup: error: "), lines[0]
    return lines[0].removeprefix("usbd-dedup: error: ")


class Daemon:
    """One usbd-dedup process on ``directory/s.sock``; its stderr goes to a file."""

    def __init__(self, nbd: ModuleType, directory: Path, *extra: str) -> None:
        self.nbd = nbd
        self.socket = directory / "s.sock"
        self.log_path = directory / "daemon.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [COMMAND, *store(directory, *extra), "--listen", str(self.socket)],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"usbd-dedup did not start:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text()

    def client(self) -> Any:
        handle = self.nbd.NBD()
        handle.connect_unix(str(self.socket))
        return handle

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0, self.log()


class Daemons:
    def __init__(self, nbd: ModuleType) -> None:
        self.nbd = nbd
        self.started: list[Daemon] = []

    def start(self, directory: Path, *extra: str) -> Daemon:
        daemon = Daemon(self.nbd, directory, *extra)
        self.started.append(daemon)
        return daemon


@pytest.fixture
def daemons(libnbd: ModuleType) -> Iterator[Daemons]:
    started = Daemons(libnbd)
    yield started
    for daemon in started.started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


def stats(directory: Path) -> dict[str, float]:
    result = run("--stats", *store(directory))
    assert result.returncode == 0, result
    values = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(": ")
        values[key] = float(value.split()[0])
    return values


def test_entry_point_dedup_names_the_driver(tmp_path: Path) -> None:
    (point,) = [p for p in entry_points(group=ENTRY_POINT_GROUP) if p.name == "dedup"]
    driver = point.load()
    assert isinstance(driver, Driver)
    assert (driver.name, driver.aliases, driver.stores_data) == (
        "dedup",
        ("dedup-file", "dedup-disk"),
        True,
    )
    assert set(driver.actions) == {"check", "stats"}
    settings = CommonSettings(store_dir=tmp_path, store_name="lun", store_size="3MiB")
    device = driver.create(settings, DedupOptions(blocksize=16 * KiB))
    try:
        assert isinstance(device, DedupDevice)
        assert (device.size, device.unit) == (3 * MiB, 16 * KiB)
        assert (tmp_path / "lun.dedup" / "index").is_dir()
    finally:
        device.close()


def test_fixed_parameters_are_kept_and_others_refused(short_dir: Path, daemons: Daemons) -> None:
    daemon = daemons.start(short_dir, "--store-size", "8MiB", "-dedup-blocksize=16KiB")
    handle = daemon.client()
    handle.pwrite(b"x" * 20000, 5000)
    handle.shutdown()
    daemon.stop()
    line = one_error(
        run(*store(short_dir, "-dedup-blocksize=4KiB", "--listen", str(short_dir / "x.sock"))), 1
    )
    assert line.startswith("-dedup-blocksize 4.0 KiB differs from the volume's 16 KiB"), line
    line = one_error(
        run(*store(short_dir, "--store-size", "16MiB", "--listen", str(short_dir / "x.sock"))), 1
    )
    assert line.startswith("-store-size 16 MiB differs from the volume's 8.0 MiB"), line
    # Left out, the volume's own are used; the same values given are accepted.
    again = daemons.start(short_dir, "--store-size", "8MiB", "-dedup-blocksize=16KiB")
    handle = again.client()
    assert handle.get_size() == 8 * MiB
    assert handle.pread(20000, 5000) == b"x" * 20000
    handle.shutdown()
    again.stop()


def test_a_second_daemon_is_refused_naming_the_holder(short_dir: Path, daemons: Daemons) -> None:
    daemon = daemons.start(short_dir, "--store-size", "8MiB")
    line = one_error(run(*store(short_dir, "--listen", str(short_dir / "t.sock"))), 1)
    assert line == (
        f"{short_dir}/vol.dedup is in use by process {daemon.process.pid} (usbd-dedup)"
    ), line
    for action in ("--stats", "--check"):
        assert f"in use by process {daemon.process.pid}" in one_error(
            run(action, *store(short_dir)), 1
        )
    daemon.stop()


def test_stats_and_check_of_a_stopped_volume(short_dir: Path, daemons: Daemons) -> None:
    daemon = daemons.start(short_dir, "--store-size", "16MiB")
    handle = daemon.client()
    block = os.urandom(4 * KiB)
    unique = os.urandom(64 * KiB)
    for offset in range(0, MiB, 4 * KiB):  # one block's content, 256 times
        handle.pwrite(block, offset)
    handle.pwrite(unique, 2 * MiB)
    handle.pwrite(bytes(64 * KiB), 3 * MiB)  # zeros: nothing stored
    handle.flush()
    # SIGUSR1: the daemon's line carries the driver's headline figures (the device keeps
    # no handler of its own, which the daemon's would replace).
    daemon.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while "statistics:" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    (line,) = [line for line in daemon.log().splitlines() if "statistics:" in line]
    assert line.endswith(
        "usbd-dedup statistics: dedup ratio 16.00, compression ratio 1.00, size 16 MiB, "
        "1 connection(s), 0 request(s) in flight, 259 request(s) served"
    ), line
    handle.shutdown()
    daemon.stop()
    assert "statistics at exit: logical bytes" in daemon.log()
    figures = stats(short_dir)
    assert figures["mapped blocks"] == 256 + 16
    assert figures["unique blocks"] == 1 + 16
    assert figures["stored bytes"] == 17 * 4 * KiB
    assert figures["dedup ratio"] == pytest.approx(272 / 17, abs=0.01)
    assert figures["logical bytes"] == MiB + 128 * KiB
    assert figures["size"] == 16 * MiB
    result = run("--check", *store(short_dir))
    assert result.returncode == 0, result
    assert result.stdout.splitlines()[-1] == "check: consistent", result.stdout


def test_check_finds_a_corrupted_block_and_exits_1(short_dir: Path, daemons: Daemons) -> None:
    daemon = daemons.start(short_dir, "--store-size", "8MiB", "-dedup-compress=identity")
    handle = daemon.client()
    handle.pwrite(os.urandom(8 * KiB), 0)
    handle.shutdown()
    daemon.stop()
    data = short_dir / "vol.dedup" / "blocks.4096"
    with data.open("r+b") as file:
        file.seek(4 * KiB + 100)
        file.write(b"garbage")
    result = run("--check", *store(short_dir))
    assert result.returncode == 1, result
    assert "its content does not match its hash" in result.stdout
    assert result.stdout.splitlines()[-1] == "check: 1 problem(s) not repairable", result.stdout


def test_actions_on_a_missing_volume_are_one_line(short_dir: Path) -> None:
    for action in ("--stats", "--check"):
        line = one_error(run(action, *store(short_dir)), 1)
        assert line == f"{short_dir}/vol.dedup: no such volume", line
    line = one_error(run("--stats", "--check", *store(short_dir)), 2)
    assert line == "-check: not allowed with -stats", line


# -- --metrics -----------------------------------------------------------------------------


def promtool_check(text: str) -> None:
    """``promtool check metrics`` (Debian's prometheus package) must accept the scrape.
    Missing, it skips on a developer's machine and fails in CI."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is required in CI but is not available", pytrace=False)
        pytest.skip("promtool (Debian's prometheus package) is not available")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{text}"


def scrape(daemon: Daemon) -> dict[str, float]:
    """The daemon's metrics (promtool-checked), by series name and labels."""
    found = re.search(r"usbd-dedup publishes metrics at (\S+)", daemon.log())
    assert found, daemon.log()
    with urllib.request.urlopen(found.group(1), timeout=60) as reply:
        text = reply.read().decode()
    promtool_check(text)
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_count_64_mib_of_duplicated_data(
    short_dir: Path, daemons: Daemons, monkeypatch: pytest.MonkeyPatch
) -> None:
    """32 MiB of random blocks written twice over NBD: what a scrape says, exactly, and the
    ratios in the status file that usbdsrvd status reads."""
    status_dir = short_dir / "status"
    monkeypatch.setenv("USBD_STATUS_DIR", str(status_dir))
    daemon = daemons.start(short_dir, "--store-size", "128MiB", "--metrics", "127.0.0.1:0")
    handle = daemon.client()
    data = os.urandom(32 * MiB)
    for base in (0, 32 * MiB):
        for offset in range(0, 32 * MiB, 4 * MiB):
            handle.pwrite(data[offset : offset + 4 * MiB], base + offset)
    handle.flush()
    values = scrape(daemon)
    assert values["usbd_dedup_dedup_ratio"] == 2.0
    assert values["usbd_dedup_compression_ratio"] == 1.0
    assert values["usbd_dedup_logical_bytes"] == 64 * MiB
    assert values["usbd_dedup_stored_bytes"] == 32 * MiB
    assert values["usbd_dedup_mapped_blocks"] == 16384
    assert values["usbd_dedup_unique_blocks"] == 8192
    assert values["usbd_dedup_written_bytes_total"] == 64 * MiB
    assert values["usbd_dedup_pending_changes"] == 0
    assert values["usbd_dedup_commits_total"] >= 1
    assert values["usbd_dedup_last_commit_timestamp_seconds"] <= time.time()
    assert values["usbd_dedup_commit_failed"] == 0
    assert 32 * MiB <= values["usbd_dedup_allocated_bytes"] <= 32 * MiB + 256 * KiB
    assert values["usbd_request_bytes_total{command=write,export=}"] == 64 * MiB
    status = status_dir / f"{daemon.process.pid}.json"
    deadline = time.monotonic() + 30  # rewritten every 2 s
    while True:
        figures = json.loads(status.read_text()) if status.exists() else {}
        if figures.get("metrics", {}).get("dedup_ratio") == 2.0:
            break
        assert time.monotonic() < deadline, figures
        time.sleep(0.1)
    assert figures["headline"] == ["dedup_ratio", "compression_ratio"]
    assert figures["metrics"]["stored_bytes"] == 32 * MiB
    # Trimmed and flushed: nothing mapped, every slot free and punched out.
    handle.trim(64 * MiB, 0)
    handle.flush()
    values = scrape(daemon)
    assert values["usbd_dedup_logical_bytes"] == 0
    assert values["usbd_dedup_stored_bytes"] == 0
    assert values["usbd_dedup_free_slots"] == 8192
    assert values["usbd_dedup_allocated_bytes"] < 256 * KiB
    handle.shutdown()
    daemon.stop()
