"""The figures an objstore device reports (``--metrics``, ``usbdsrvd status``, SIGUSR1).

Declared here once (:data:`METRICS`, the driver's ``metrics``); :func:`figures` reads their
values from counters the cache, the uploader and the store keep anyway, where the work happens
(plain ints bumped on paths that already run, no lock of their own). It is called from the
metrics server's thread while the device works, so it takes no lock either: it reads single
attributes, the length of a set, and copies of a set made in one step.

Byte figures of the cache count whole objects (the unit of upload and of fetch), except
``uploaded_bytes`` and ``downloaded_bytes``, which count what was moved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from usbd.core.metrics import Metric, counter, gauge

if TYPE_CHECKING:
    from ._device import ObjStoreDevice

__all__ = ["METRICS", "figures"]

METRICS: tuple[Metric, ...] = (
    gauge(
        "dirty_bytes",
        "Bytes of the objects in the cache holding writes the bucket does not have yet (whole "
        "objects: the unit of upload). What losing this machine with its cache would lose now, "
        "flushed or not; it falls as upload rounds commit.",
        headline=True,
    ),
    gauge("dirty_objects", "Objects in the cache holding writes the bucket does not have yet."),
    gauge(
        "not_in_bucket_bytes",
        "Of dirty_bytes, the objects holding writes a FLUSH has acknowledged: what losing this "
        "machine with its cache would lose of what clients were told is safe. With "
        "-objstore-persistcache a FLUSH returns once the cache is synced to local disk and the "
        "upload follows, so this is what waits for its upload after a FLUSH; without it a "
        "FLUSH returns only once its writes are committed to the bucket, and this is always 0 "
        "(dirty data is then data not yet flushed, which a crash of the daemon alone loses).",
        headline=True,
    ),
    gauge(
        "upload_queue_objects",
        "Objects of the upload round under way not yet uploaded (0 between rounds; what is "
        "written meanwhile waits in dirty_objects for the next round).",
    ),
    counter(
        "uploaded_objects",
        "Objects uploaded (all-zero objects are not: the manifest drops them instead).",
    ),
    counter(
        "uploaded_bytes",
        "Device bytes uploaded, before compression and encryption: rate() is the upload rate.",
    ),
    counter(
        "uploaded_stored_bytes",
        "Bytes sent in the uploads, as stored (compressed and encrypted): rate() is the "
        "bandwidth used.",
    ),
    counter("downloaded_objects", "Objects fetched from the bucket (reads, read-ahead, writes)."),
    counter("downloaded_bytes", "Device bytes fetched from the bucket (after decompression)."),
    gauge("cache_bytes", "Bytes of the objects the local cache holds (clean and dirty)."),
    gauge(
        "cache_limit_bytes",
        "How much the cache may hold (-objstore-diskcache, rounded down to whole objects; the "
        "device's size when 0).",
    ),
    counter(
        "cache_hits",
        "Reads answered from the cache, per object a read touches (reads of never-written "
        "objects, zeros, count as neither hit nor miss).",
    ),
    counter("cache_misses", "Reads, per object touched, that waited for a fetch from the bucket."),
    counter("cache_evictions", "Clean objects evicted from the cache to make room."),
    counter(
        "store_retries",
        "Requests to the object store that failed transiently (no answer, a 5xx, throttling) "
        "and were tried again.",
    ),
    counter(
        "store_failures",
        "Requests to the object store that failed for good: refused, or still failing when "
        "their deadline passed (a read then fails with EIO; uploads retry until the store is "
        "back, except while the daemon stops).",
    ),
    counter(
        "manifest_commits",
        "Manifests committed: one per upload round that had something to upload, and the "
        "new epoch at open.",
    ),
    gauge(
        "last_manifest_commit_timestamp_seconds",
        "When the last manifest was committed (the bucket's image of the device dates from then).",
    ),
)


def figures(device: ObjStoreDevice) -> dict[str, float]:
    """The current value of each of :data:`METRICS` for ``device``."""
    chunks = device.chunks
    uploader = device.uploader
    store = device.volume.store
    object_size = device.object_size
    last = device._chunk_count() - 1
    #: The last object may be short of object_size.
    short = object_size - device._span(last)[1]

    def size_of(count: int, has_last: bool) -> int:
        return count * object_size - (short if has_last else 0)

    dirty = chunks.dirty
    dirty_bytes = size_of(len(dirty), last in dirty)
    acknowledged = 0
    if device.persistent and dirty:
        mark = chunks.acknowledged
        held = chunks.held
        for chunk in list(dirty):  # a copy made in one step: the set changes meanwhile
            slot = held.get(chunk)
            if slot is not None and slot.dirty and slot.since < mark:
                acknowledged += device._span(chunk)[1]
    held_count = len(chunks.held)
    limit = chunks.limit
    return {
        "dirty_bytes": dirty_bytes,
        "dirty_objects": len(dirty),
        "not_in_bucket_bytes": acknowledged,
        "upload_queue_objects": uploader.queued,
        "uploaded_objects": uploader.uploaded_objects,
        "uploaded_bytes": uploader.uploaded_bytes,
        "uploaded_stored_bytes": uploader.stored_bytes,
        "downloaded_objects": device.downloaded_objects,
        "downloaded_bytes": device.downloaded_bytes,
        "cache_bytes": size_of(held_count, last in chunks.held),
        "cache_limit_bytes": device.size if limit is None else limit * object_size,
        "cache_hits": device.cache_hits,
        "cache_misses": device.cache_misses,
        "cache_evictions": device.evictions,
        "store_retries": store.retried,
        "store_failures": store.gave_up,
        "manifest_commits": uploader.commits,
        "last_manifest_commit_timestamp_seconds": uploader.last_commit,
    }
