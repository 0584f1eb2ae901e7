"""The ramdisk as installed: its entry point, its console script, and its answers to bad flags."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from usbd.core.driver import ENTRY_POINT_GROUP, Driver
from usbd.ramdisk import RamDisk


def run(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("usbd-ramdisk")
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_entry_point_mem_names_the_ramdisk_driver() -> None:
    (point,) = [p for p in entry_points(group=ENTRY_POINT_GROUP) if p.name == "mem"]
    driver = point.load()
    assert isinstance(driver, Driver)
    assert driver.name == "mem"
    assert "memory" in driver.aliases
    device = driver.create(argparse.Namespace(store_size=3 << 20))
    try:
        assert isinstance(device, RamDisk)
        assert device.size == 3 << 20
    finally:
        device.close()


def test_help_lists_the_flags() -> None:
    result = run("--help")
    assert result.returncode == 0
    for flag in ("--listen", "--store-size", "--export-name", "--read-only", "--log-level"):
        assert flag in result.stdout


def test_a_bad_size_is_one_line_naming_the_flag() -> None:
    result = run("--listen", "/tmp/never-used.sock", "-store-size=12 parsecs")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--store-size" in lines[0]
    assert "KiB" in lines[0]  # says what is accepted
    assert "Traceback" not in result.stderr


def test_listen_is_required_until_kernel_attach() -> None:
    result = run()
    assert result.returncode == 2
    assert "--listen" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
