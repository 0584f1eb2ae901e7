"""What a running dedup volume reports to ``--metrics``, ``usbdsrvd status`` and SIGUSR1.

Every figure is one the store keeps anyway, as it works: the counters of its state (updated
under its lock with each change, as they must be for the commit), the index's cache and its
hit and miss counts, the commits. :meth:`DedupDevice.metrics` reads them without a lock, so
a scrape never waits for a writer nor a writer for a scrape; two figures read a moment apart
may disagree by the blocks written in between, which a ratio shrugs off.

The exception is ``allocated_bytes``: one ``fstat`` per data file (a few, one per slot
size), which reads the inode the open file already holds in memory: no disk I/O, and no lock
that a write or a punch holds. On a network file system it may ask the server.
"""

from __future__ import annotations

from usbd.core.metrics import Metric, counter, gauge

__all__ = ["METRICS"]

METRICS: tuple[Metric, ...] = (
    gauge(
        "dedup_ratio",
        "Blocks that read as something other than zeros per stored copy (mapped blocks / "
        "unique blocks; 1 for an empty volume).",
        headline=True,
    ),
    gauge(
        "compression_ratio",
        "Bytes of the stored copies before compression per byte of their slots (unique "
        "blocks x block size / stored bytes; 1 with -dedup-compress=identity or no data).",
        headline=True,
    ),
    gauge(
        "logical_bytes",
        "Bytes of the blocks that are not zeros (mapped blocks x block size): what the "
        "volume holds before deduplication and compression.",
    ),
    gauge(
        "stored_bytes",
        "Bytes of the slots holding the unique blocks (compressed sizes rounded up to their "
        "slot size): what the volume holds after deduplication and compression.",
    ),
    gauge(
        "allocated_bytes",
        "Bytes the data files take on disk (st_blocks, what du shows): the stored bytes, "
        "plus freed slots not yet punched and the file system's own rounding.",
    ),
    gauge("mapped_blocks", "Blocks that read as something other than zeros."),
    gauge("unique_blocks", "Stored copies (used slots), each shared by one or more blocks."),
    gauge(
        "free_slots",
        "Freed slots below the data files' high-water marks, waiting for reuse.",
    ),
    gauge(
        "pending_changes",
        "Index changes not yet committed (the next FLUSH or timed commit writes them; a "
        "bound set by -dedup-memcache commits early).",
    ),
    counter("commits", "Commits of the index that wrote something, since the daemon started."),
    gauge(
        "last_commit_timestamp_seconds",
        "When the last commit ended, in seconds since the epoch (0: none since the daemon "
        "started).",
    ),
    gauge(
        "commit_failed",
        "1 once a commit failed: the volume then refuses every change (EIO) until restarted, "
        "and the check at open repairs it.",
    ),
    counter(
        "written_bytes",
        "Bytes clients have written to the volume, ever (kept across restarts: the "
        "'logical bytes' of --stats).",
    ),
    gauge(
        "index_cache_entries",
        "Index entries held in the daemon's own cache of LevelDB values (a quarter of "
        "-dedup-memcache bounds it).",
    ),
    counter(
        "index_cache_hits",
        "Lookups of one index key that the cache answered without LevelDB.",
    ),
    counter(
        "index_cache_misses",
        "Lookups of one index key that asked LevelDB (new content's hash included: it is "
        "not there to be found).",
    ),
)
