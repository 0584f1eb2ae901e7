"""The ramdisk as a command: ``usbd-ramdisk --listen /tmp/ram.sock --store-size 1GiB``."""

from __future__ import annotations

from usbd.core.cli import main as cli_main
from usbd.core.driver import Driver, NoOptions
from usbd.core.settings import CommonSettings

from ._device import RamDisk


def _create(settings: CommonSettings, options: NoOptions) -> RamDisk:
    return RamDisk(settings.store_size)


driver = Driver(
    name="mem",
    aliases=("memory",),
    description="A memory-backed block device (a RAM disk). Memory is taken only as data is "
    "written and given back on trim.",
    options=NoOptions,
    create=_create,
)


def main() -> int:
    return cli_main(driver, prog="usbd-ramdisk")
