"""The ramdisk as a command: ``usbd-ramdisk --listen /tmp/ram.sock --store-size 1GiB``."""

from __future__ import annotations

import argparse

from usbd.core.cli import main as cli_main
from usbd.core.driver import Driver

from ._device import RamDisk

DEFAULT_SIZE = 1 << 30


def _create(args: argparse.Namespace) -> RamDisk:
    return RamDisk(args.store_size or DEFAULT_SIZE)


driver = Driver(
    name="mem",
    aliases=("memory",),
    description="A memory-backed block device (a RAM disk). Memory is taken only as data is "
    "written and given back on trim.",
    create=_create,
)


def main() -> int:
    return cli_main(driver, prog="usbd-ramdisk")
