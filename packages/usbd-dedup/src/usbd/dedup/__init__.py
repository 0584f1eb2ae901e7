"""usbd-dedup: each distinct block stored once, with reference counts, compression and a check."""

from ._check import Report, check
from ._device import DedupDevice
from ._driver import DedupOptions, driver
from ._store import DedupStore, Stats
from ._volume import Mismatch, OpenError, Volume, open_volume, volume_dir

__all__ = [
    "DedupDevice",
    "DedupOptions",
    "DedupStore",
    "Mismatch",
    "OpenError",
    "Report",
    "Stats",
    "Volume",
    "check",
    "driver",
    "open_volume",
    "volume_dir",
]
__version__ = "0.1.0"
