"""usbd-filedisk: a sparse file as a block device, with real trim, zeroing and block status."""

from usbd.core.lockfile import StoreInUse

from ._device import DirectFileDisk, FileDisk, SizeMismatch, StoreError
from ._driver import FileOptions, driver

__all__ = [
    "DirectFileDisk",
    "FileDisk",
    "FileOptions",
    "SizeMismatch",
    "StoreError",
    "StoreInUse",
    "driver",
]
__version__ = "0.1.0"
