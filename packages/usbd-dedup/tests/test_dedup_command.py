"""usbd-dedup as installed: its entry point, and its console script as a real process: fixed
parameters on reopen, a second daemon on the same volume, --stats and --check, SIGUSR1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

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
                stdout=subprocess.DEVNULL,
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
    # SIGUSR1 logs the statistics of the running daemon.
    daemon.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while "statistics:" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    assert re.search(
        r"statistics: logical bytes \d+, mapped blocks 272, unique blocks 17", daemon.log()
    )
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
