"""usbd-filedisk: a sparse file as a block device, with real trim, zeroing and block status."""

from ._device import DirectFileDisk, FileDisk, SizeMismatch, StoreError
from ._driver import FileOptions, driver
from ._lock import StoreInUse

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
