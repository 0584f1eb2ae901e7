"""usbd-objstore: a block device cached on local disk and backed by an S3 object store.

The bucket always holds a point-in-time image of the device: objects are never overwritten,
and a manifest commit publishes each upload round whole (see ``_manifest``). One writer per
volume, by a lease in the bucket; objects are compressed and sealed with AES-256-GCM (or
checksummed), so a corrupted, moved or replayed object is an I/O error, never wrong data.
"""

from ._codec import Codec, Compression, IntegrityError
from ._device import CacheConflict, ObjStoreDevice
from ._driver import ObjStoreOptions, driver
from ._manifest import Fenced, Params
from ._store import LocalStore, ObjectStore, S3Store
from ._volume import OpenError, Volume, open_volume

__all__ = [
    "CacheConflict",
    "Codec",
    "Compression",
    "Fenced",
    "IntegrityError",
    "LocalStore",
    "ObjStoreDevice",
    "ObjStoreOptions",
    "ObjectStore",
    "OpenError",
    "Params",
    "S3Store",
    "Volume",
    "driver",
    "open_volume",
]
__version__ = "0.1.0"
