"""The dedup device: byte ranges cut into blocks for the store, and commits on a schedule.

A write of whole blocks goes to :meth:`DedupStore.put` as it is. A write that covers part of
a block is a read-modify-write made safe without a lock per block: it reads the block, merges,
and puts the result on the condition that the block still has the ref it read (another write
to the other half of the same block may have landed meanwhile; then it reads again). Trim
and write-zeroes drop the references of whole blocks; a partial block is zeroed the same way
as a partial write (trim leaves it, as trim may).

FLUSH is a commit (:meth:`DedupStore.commit`): data fdatasynced, then the index in one synced
WriteBatch. A commit also runs every ``commit_every`` seconds and whenever the uncommitted
changes pass a bound set by ``-dedup-memcache``, so that memory stays bounded and freed space
goes back to the file system without waiting for a FLUSH.

Its figures (:meth:`DedupDevice.metrics`, declared in :mod:`usbd.dedup._metrics`) are the
store's running counters, read without a lock; the daemon's SIGUSR1 line and ``usbdsrvd
status`` show the dedup and compression ratios. At close the device logs the statistics of
the state it committed last.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading

from usbd.core import BytesLike, Device, DeviceError, Extent, ExtentFlag, Fua

from ._format import Ref
from ._store import DedupStore, Stats
from ._volume import Volume

__all__ = ["DedupDevice"]

log = logging.getLogger("usbd.dedup")

_HOLE = ExtentFlag.HOLE | ExtentFlag.ZERO
#: Blocks handed to the store per call (a lock is held while they are published).
_BATCH = 256
#: Blocks described per extents call: clients ask again from where an answer ends.
_EXTENTS_MAX = 1 << 16


class DedupDevice(Device):
    """A device of ``volume.params.size`` bytes over an open :class:`Volume`."""

    blocking = True
    parallel = True
    multi_conn = True
    fua = Fua.EMULATE
    # extents() costs a range scan of the map, which read() makes anyway: splitting reads
    # by extents first would scan twice.
    sparse_reads = False

    def __init__(
        self, volume: Volume, *, commit_every: float = 5.0, pending_limit: int = 1 << 16
    ) -> None:
        self.volume = volume
        self.store: DedupStore = volume.store
        self.size = volume.params.size
        #: The dedup block (the advertised preferred block stays 4 KiB, a class attribute).
        self.unit = volume.params.block_size
        self._zero = bytes(self.unit)
        self._pending_limit = pending_limit
        self._commit_every = commit_every
        self._failure: str | None = None
        self._closed = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._committer = threading.Thread(
            target=self._commit_loop, name="usbd-dedup-commit", daemon=True
        )
        self._committer.start()

    # -- reads -----------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> BytesLike:
        self._check_open(reading=True)
        size = self.unit
        first = offset // size
        count = (offset + length - 1) // size - first + 1
        out = bytearray(count * size)
        view = memoryview(out)
        with self.store.reading(first, count) as refs:
            self.store.fill(refs, view)
        start = offset - first * size
        return view[start : start + length]

    def try_read(self, offset: int, length: int) -> BytesLike | None:
        """On the event loop, when every block's ref is in memory (the changes not yet
        committed, or the cache of map entries) and its slot in the page cache: no thread,
        no LevelDB (whose lookups may read from disk). Otherwise None: read() in a thread,
        which fills the cache for the next time."""
        if self._closed:
            return None
        size = self.unit
        first = offset // size
        count = (offset + length - 1) // size - first + 1
        out = bytearray(count * size)
        view = memoryview(out)
        with self.store.try_reading(first, count) as refs:
            if refs is None or not self.store.fill(refs, view, nowait=True):
                return None
        start = offset - first * size
        return view[start : start + length]

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._check_open(reading=True)
        size = self.unit
        first = offset // size
        count = min((offset + length - 1) // size - first + 1, _EXTENTS_MAX)
        with self.store.reading(first, count, cache=False) as refs:
            data = [ref is not None for ref in refs]
        found: list[Extent] = []
        start = offset
        i = 0
        while i < count:
            j = i + 1
            while j < count and data[j] == data[i]:
                j += 1
            end = min((first + j) * size, self.size)
            found.append(Extent(start, end - start, ExtentFlag(0) if data[i] else _HOLE))
            start = end
            i = j
        return found

    # -- writes ----------------------------------------------------------------------------

    def _content(self, data: memoryview) -> memoryview | None:
        # tobytes() and a bytes compare (memcmp): 0.14 us for a zero block here, where
        # comparing the memoryview itself goes element by element (3.7 us).
        return None if data.tobytes() == self._zero else data

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._check_open()
        written = len(data)  # counted once, with the first put
        size = self.unit
        end = offset + len(data)
        head = -offset % size
        if head:
            cut = min(head, len(data))
            self._merge(offset, data[:cut], written)
            written = 0
            offset += cut
            data = data[cut:]
        whole = (end - offset) // size
        for start in range(0, whole, _BATCH):
            n = min(_BATCH, whole - start)
            chunk = data[start * size : (start + n) * size]
            contents = [self._content(chunk[k * size : (k + 1) * size]) for k in range(n)]
            self.store.put(offset // size + start, contents, written=written)
            written = 0
        rest = data[whole * size :]
        if rest:
            self._merge(offset + whole * size, rest, written)
        self._committed_enough()

    def try_write(self, offset: int, data: memoryview) -> int:
        """Nothing at once (hashing and the index do not belong on the event loop): every
        plain WRITE goes to its connection's writer thread, in order, which costs less per
        request than a worker thread each."""
        return 0

    def _merge(self, offset: int, piece: memoryview | bytes, written: int = 0) -> None:
        """Part of one block: read it, merge, put it back if nobody changed it meanwhile
        (``written``: what the client wrote, counted with the first attempt)."""
        size = self.unit
        number = offset // size
        at = offset - number * size
        while True:
            block = bytearray(size)
            since = self.store.generation  # before the read: see DedupStore.put
            with self.store.reading(number, 1) as refs:
                self.store.fill(refs, memoryview(block))
                seen: Ref | None = refs[0]
            block[at : at + len(piece)] = piece
            content = None if block == self._zero else bytes(block)
            expect = {number: seen}
            if not self.store.put(number, [content], expect, since=since, written=written):
                return
            written = 0

    def zero(self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool) -> None:
        # Dropping references is always fast, and a zero block is never stored anyway.
        self._drop(offset, length, partial=True)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._drop(offset, length, partial=False)

    def _drop(self, offset: int, length: int, *, partial: bool) -> None:
        """Whole blocks lose their reference; partial ones are zeroed if ``partial``."""
        self._check_open()
        size = self.unit
        end = offset + length
        first = -(-offset // size)
        last = end // size  # blocks [first, last) are whole
        for start in range(first, last, _BATCH * 4):
            n = min(_BATCH * 4, last - start)
            self.store.put(start, [None] * n)
            self._committed_enough()
        if partial:
            head_end = min(end, first * size)
            if offset < head_end:
                self._merge(offset, bytes(head_end - offset))
            tail = max(last * size, head_end)
            if tail < end:
                self._merge(tail, bytes(end - tail))

    def flush(self) -> None:
        self._check_open()
        self._commit()

    # -- commits ---------------------------------------------------------------------------

    def _commit(self) -> None:
        try:
            self.store.commit()
        except OSError as exc:
            # The store refuses every commit after a failed one (see DedupStore.commit).
            self._failure = self.store.failure or f"a commit failed: {exc}"
            raise DeviceError(exc.errno or errno.EIO, self._failure) from exc

    def _committed_enough(self) -> None:
        """Bound the uncommitted changes: wake the committer past the limit, and commit
        here (holding this writer back) past twice the limit."""
        pending = self.store.pending
        if pending > 2 * self._pending_limit:
            self._commit()
        elif pending > self._pending_limit:
            self._wake.set()

    def _commit_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._commit_every or None)
            self._wake.clear()
            if self._stopping.is_set() or self._failure is not None:
                return
            try:
                self.store.commit()
                self.store.compact()
            except Exception as exc:
                self._failure = self.store.failure or f"a commit failed: {exc}"
                log.exception("%s", self._failure)
                return

    def failed(self) -> str | None:
        return self._failure or self.store.failure

    def _check_open(self, *, reading: bool = False) -> None:
        """Closed: EBADF for everything. Failed: EIO for changes (reads still work)."""
        if self._closed:
            raise DeviceError(errno.EBADF, "the device is closed")
        failure = self._failure or self.store.failure
        if failure is not None and not reading:
            raise DeviceError(errno.EIO, failure)

    # -- statistics and close --------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """The figures of :data:`usbd.dedup._metrics.METRICS`, read as they are (see that
        module: no lock, nothing but an fstat per data file)."""
        if self._closed:
            return {}
        store = self.store
        stats = Stats(store.state, self.unit, self.size)  # the live counters, not a copy
        state = stats.state
        index = store.index
        committing = index.committing
        values: dict[str, float] = {
            "dedup_ratio": stats.dedup_ratio,
            "compression_ratio": stats.compression_ratio,
            "logical_bytes": state.mapped * self.unit,
            "stored_bytes": state.stored,
            "mapped_blocks": state.mapped,
            "unique_blocks": state.unique,
            "free_slots": state.free,
            "pending_changes": len(index.pending) + (len(committing) if committing else 0),
            "commits": store.commits,
            "last_commit_timestamp_seconds": store.last_commit,
            "commit_failed": int(self.failed() is not None),
            "written_bytes": state.written,
            "index_cache_entries": index.cache.entries(),
            "index_cache_hits": index.hits,
            "index_cache_misses": index.misses,
        }
        with contextlib.suppress(OSError):  # closed meanwhile
            values["allocated_bytes"] = store.files.allocated()
        return values

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._wake.set()
        self._committer.join()
        clean = False
        try:
            if self._failure is None and self.store.failure is None:
                self.store.commit()
                clean = True  # only once everything is durable
        finally:
            log.info("statistics at exit: %s", self.store.stats().summary())
            self.volume.close(clean=clean)
