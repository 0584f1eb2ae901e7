"""usbd-ramdisk: a memory-backed block device, and the simplest complete usbd driver."""

from ._device import RamDisk
from ._driver import driver

__all__ = ["RamDisk", "driver"]
__version__ = "0.1.0"
