"""The ramdisk as installed: its entry point, its console script, and its answers to bad flags."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from usbd.core.driver import ENTRY_POINT_GROUP, Driver, NoOptions
from usbd.core.settings import CommonSettings
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
    device = driver.create(CommonSettings(store_size="3MiB"), NoOptions())
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
    assert lines[0].startswith("usbd-ramdisk: error: -store-size: invalid size '12 parsecs'")
    assert "KiB" in lines[0]  # says what is accepted
    assert "Traceback" not in result.stderr


def test_without_listen_it_attaches_to_the_kernel_or_says_in_one_line_why_not() -> None:
    # /dev/nbd99999 never exists; what stops the attach depends on the machine: not root, no
    # nbd in the kernel (this machine and CI: their kernel has none; tests/kernel boots one),
    # or the missing device.
    result = run("--store-size", "1MiB", "--attach=ioctl", "/dev/nbd99999")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("usbd-ramdisk: error: ")
    assert (
        ("no nbd support" in error and "--listen" in error)
        or "needs root" in error
        or "/dev/nbd99999 does not exist" in error
    ), error
    assert "as /dev/nbd99999 using driver mem" in result.stdout


def test_attach_none_needs_listen() -> None:
    result = run("--attach=none")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "usbd-ramdisk: error: -attach: 'none' needs -listen (HOST:PORT or a unix path)"
    )


def test_a_device_that_is_not_nbd_is_refused() -> None:
    result = run("/dev/sda")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "usbd-ramdisk: error: NBD_DEVICE: invalid NBD device '/dev/sda': "
        "expected /dev/nbdN, e.g. /dev/nbd0"
    ]
