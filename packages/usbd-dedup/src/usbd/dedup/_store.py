"""The dedup store: blocks by number in, blocks by number out, one commit at a time.

It owns the whole mechanism of sharing: hashing, the lookups, slot allocation, reference
counts, the data files and the commit that makes a state durable. The device above it only
cuts byte ranges into blocks.

The rules that make kill -9 safe at any moment, and where they are kept:

* Data before index: a block's slot is written before any index entry refers to it
  (:meth:`DedupStore.put` publishes after writing), and a commit fdatasyncs the data files
  before its synced ``WriteBatch`` (:meth:`DedupStore.commit`).
* A slot referred to by the durable index is never written: new content goes only to slots
  that are free in LevelDB or above its high-water mark, and a slot freed by uncommitted
  changes is not reused until those changes are durable and the slot punched
  (:meth:`Index.listed_free` skips it while its layer exists).
* A read never sees a reused slot: a commit waits, before freeing anything for good, until
  reads that looked their blocks up before it have finished (:meth:`DedupStore.reading`),
  the way RCU waits for a grace period.

So after a crash LevelDB holds the last commit whole: every flushed block, and for a block
written since, its old content. What a crash can leave is space: slots taken by writes that
had not been published when a commit ran (used by nothing, free in no list), data past a
high-water mark, and punches not made. The check at open gives it back (``_check``).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from usbd.core import DeviceError

from ._blocks import BlockFiles
from ._format import Codec, Params, Ref, State, content_hash, slot_class, slot_id, slot_index
from ._index import Changes, Index, RefCount

__all__ = ["DedupStore", "Stats"]

log = logging.getLogger("usbd.dedup")

#: Free slots fetched from LevelDB at a time into a size class's pool.
_REFILL = 1024
#: Map entries deleted by one commit past which their range is compacted.
_COMPACT_AFTER = 4096


class _Again:
    """A block whose content must be stored again (it vanished, or collided)."""


_AGAIN = _Again()


class Stats:
    """The figures of a state, for the log and ``--stats``."""

    def __init__(self, state: State, block_size: int, size: int) -> None:
        self.state = state
        self.block_size = block_size
        self.size = size

    @property
    def dedup_ratio(self) -> float:
        """Blocks that are not zeros per stored copy (1.0 for an empty volume)."""
        s = self.state
        return s.mapped / s.unique if s.unique else 1.0

    @property
    def compression_ratio(self) -> float:
        """The stored copies' bytes before compression per byte of their slots."""
        s = self.state
        return s.unique * self.block_size / s.stored if s.stored else 1.0

    def lines(self) -> list[tuple[str, str]]:
        s = self.state
        dedup, compression = self.dedup_ratio, self.compression_ratio
        return [
            ("logical bytes", f"{s.written}"),
            ("mapped blocks", f"{s.mapped} ({s.mapped * self.block_size} bytes not zero)"),
            ("unique blocks", f"{s.unique}"),
            ("stored bytes", f"{s.stored}"),
            ("dedup ratio", f"{dedup:.2f}"),
            ("compression ratio", f"{compression:.2f}"),
            ("free slots", f"{s.free}"),
            ("block size", f"{self.block_size}"),
            ("size", f"{self.size}"),
        ]

    def summary(self) -> str:
        return ", ".join(f"{key} {value.split(' ')[0]}" for key, value in self.lines()[:7])


def _merge(older: Changes, newer: Changes) -> Changes:
    """One layer with ``newer`` over ``older`` (a failed commit's changes go back under
    what was written meanwhile)."""
    merged = Changes(dict(older.maps), dict(older.refs), dict(older.hashes), dict(older.frees))
    merged.maps.update(newer.maps)
    merged.refs.update(newer.refs)
    merged.hashes.update(newer.hashes)
    merged.frees.update(newer.frees)
    return merged


class DedupStore:
    """Blocks of ``params.block_size`` over an :class:`Index` and :class:`BlockFiles`."""

    def __init__(
        self,
        index: Index,
        files: BlockFiles,
        params: Params,
        state: State,
        *,
        compress: bool,
        verify: bool,
    ) -> None:
        self.index = index
        self.files = files
        self.params = params
        self.block_size = params.block_size
        self.sizes = files.sizes
        self.codec = Codec(compress, params.block_size)
        self.verify = verify
        self.state = state
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        #: Reads in progress by the epoch they began in (see reading()), under a lock of
        #: their own that is only ever held for a counter: try_reading takes it on the loop.
        self._readers = threading.Lock()
        self._drained = threading.Condition(self._readers)
        self._epoch = 0
        self._reading: dict[int, int] = {}
        self._pools: list[list[int]] = [[] for _ in self.sizes]
        #: Size classes with no free slot listed in LevelDB (until a commit frees some), and
        #: where the last scan of each class's free list stopped (a long free list is taken
        #: in one pass, not rescanned from its start past every slot already taken).
        self._exhausted = [False] * len(self.sizes)
        self._cursors: list[int | None] = [None] * len(self.sizes)
        #: Blocks whose map entries a commit deleted in bulk: compacted afterwards.
        self._deleted: tuple[int, int] | None = None
        #: Commits that made freed slots reusable, ever: a conditional put whose block was read
        #: under an older count cannot tell its slot from a reused one (see put()).
        self.generation = 0
        #: Why commits are refused from now on (see commit()).
        self.failure: str | None = None
        self._changed = False
        #: Commits that wrote something, since the store was opened, and when the last one
        #: ended (time.time(); 0 for none): figures for the device's metrics.
        self.commits = 0
        self.last_commit = 0.0

    # -- reading ---------------------------------------------------------------------------

    @contextmanager
    def reading(self, first: int, count: int, *, cache: bool = True) -> Iterator[list[Ref | None]]:
        """The refs of ``count`` blocks from ``first``; their slots keep their content until
        the ``with`` ends. ``cache``: keep what LevelDB gave in the index's cache (not for a
        block-status scan of thousands of blocks that nobody is about to read)."""
        epoch = self._enter()
        try:
            with self._lock:
                refs = self.index.blocks(first, count, cache=cache)
            yield refs
        finally:
            self._leave(epoch)

    @contextmanager
    def try_reading(self, first: int, count: int) -> Iterator[list[Ref | None] | None]:
        """As :meth:`reading`, without waiting: None unless the lock is free at once and
        every block is in a layer or the index's cache (LevelDB may read from disk)."""
        epoch = self._enter()
        try:
            refs = None
            if self._lock.acquire(blocking=False):
                try:
                    refs = self.index.cached_blocks(first, count)
                finally:
                    self._lock.release()
            yield refs
        finally:
            self._leave(epoch)

    def _enter(self) -> int:
        """Register a read before it looks anything up: a commit that swaps its layers
        after this waits for it; one that swapped them before is seen by the lookup."""
        with self._readers:
            epoch = self._epoch
            self._reading[epoch] = self._reading.get(epoch, 0) + 1
            return epoch

    def _leave(self, epoch: int) -> None:
        with self._readers:
            left = self._reading[epoch] - 1
            if left:
                self._reading[epoch] = left
            else:
                del self._reading[epoch]
                self._drained.notify_all()

    def fill(self, refs: Sequence[Ref | None], out: memoryview, *, nowait: bool = False) -> bool:
        """The content of ``refs`` into ``out`` (zeroed by the caller: None stays zeros).
        Raw full-size slots that follow each other are read with one call. ``nowait``:
        only from the page cache; False if something was not there."""
        size = self.block_size
        i = 0
        while i < len(refs):
            ref = refs[i]
            if ref is None:
                i += 1
                continue
            if ref.compressed or slot_class(ref.slot):
                stored = self.files.read(ref.slot, ref.length, nowait=nowait)
                if stored is None:
                    return False
                out[i * size : (i + 1) * size] = self.codec.decode(stored, ref.compressed, size)
                i += 1
                continue
            first = slot_index(ref.slot)
            j = i + 1
            while j < len(refs) and j - i < 1024:
                other = refs[j]
                if other is None or other.compressed or other.slot != slot_id(0, first + j - i):
                    break
                j += 1
            views = [out[k * size : (k + 1) * size] for k in range(i, j)]
            if not self.files.read_into(0, first, views, nowait=nowait):
                return False
            i = j
        return True

    def _content(self, ref: Ref) -> bytes:
        stored = self.files.read(ref.slot, ref.length)
        assert stored is not None  # (only a read without waiting gives None)
        return self.codec.decode(stored, ref.compressed, self.block_size)

    # -- writing ---------------------------------------------------------------------------

    def put(
        self,
        first: int,
        contents: Sequence[bytes | memoryview | None],
        expect: dict[int, Ref | None] | None = None,
        *,
        since: int = 0,
        written: int = 0,
    ) -> set[int]:
        """Blocks ``first``, ``first + 1``, ... get ``contents`` (None: zeros, not stored).

        ``expect`` makes some blocks conditional (a partial write's read-modify-write): such
        a block is written only if its ref is still the one given, and the numbers of those
        that were not are returned, for the caller to read and merge again. An equal ref
        means equal content only while its slot has not been freed and reused, so
        ``since`` is :attr:`generation` as it was before the block was read: a block with a
        stored ref is also refused once a later commit has made freed slots reusable.
        ``written`` is added to the count of bytes clients wrote.
        """
        digests = [None if c is None else content_hash(c) for c in contents]
        rejected: set[int] = set()
        todo = list(range(len(contents)))
        collided: set[bytes] = set()
        while todo:
            todo = self._put_round(
                first, contents, digests, todo, expect, since, rejected, collided, written
            )
            written = 0
        return rejected

    def _put_round(
        self,
        first: int,
        contents: Sequence[bytes | memoryview | None],
        digests: Sequence[bytes | None],
        todo: list[int],
        expect: dict[int, Ref | None] | None,
        since: int,
        rejected: set[int],
        collided: set[bytes],
        written: int,
    ) -> list[int]:
        """Store what is new, then publish; the blocks whose content vanished meanwhile
        (freed by another writer between the lookup and the publish) are returned."""
        # Which contents are stored already, and which not (one new slot each, however many
        # blocks have them).
        known: dict[bytes, Ref] = {}
        new: dict[bytes, int] = {}
        with self._lock:
            for i in todo:
                digest = digests[i]
                if digest is None or digest in new or digest in known:
                    continue
                found = None if digest in collided else self.index.content(digest)
                if found is None:
                    new[digest] = i
                else:
                    known[digest] = found
        encoded = {d: self.codec.encode(contents[i]) for d, i in new.items()}  # type: ignore[arg-type]
        with self._lock:
            slots = {d: self._allocate(encoded[d][0]) for d in new}
        try:
            self._write_slots({slots[d]: encoded[d][1] for d in new})
        except BaseException:
            with self._lock:
                self._changed = True  # the releases must be committed too
                for slot in slots.values():
                    self._release(slot)
            raise
        ours = {d: Ref(slots[d], len(encoded[d][1]), encoded[d][2]) for d in new}
        used: set[int] = set()
        again: list[int] = []
        with self._lock:
            self._changed = True
            self.state.written += written
            try:
                self._publish(
                    first, contents, digests, todo, expect, since, rejected, collided,
                    known, new, ours, used, again,
                )  # fmt: skip
            finally:
                for slot in slots.values():
                    if slot not in used:
                        self._release(slot)  # not used: stored by another writer first
        return again

    def _publish(
        self,
        first: int,
        contents: Sequence[bytes | memoryview | None],
        digests: Sequence[bytes | None],
        todo: list[int],
        expect: dict[int, Ref | None] | None,
        since: int,
        rejected: set[int],
        collided: set[bytes],
        known: dict[bytes, Ref],
        new: dict[bytes, int],
        ours: dict[bytes, Ref],
        used: set[int],
        again: list[int],
    ) -> None:
        """Point the blocks at their content (under the lock): the second half of a round."""
        olds = self.index.blocks(first + todo[0], todo[-1] - todo[0] + 1)
        base = todo[0]
        for i in todo:
            number = first + i
            old = olds[i - base]
            if (
                expect is not None
                and number in expect
                and (old != expect[number] or (old is not None and self.generation != since))
            ):
                rejected.add(number)
                continue
            digest = digests[i]
            ref: Ref | None = None
            counted: RefCount | None = None  # the slot's record, when just looked up
            if digest is not None:
                if digest in ours:
                    # New content goes to our slot even if another writer stored the same
                    # meanwhile: two copies, each with its own count, is allowed.
                    if self.verify and contents[i] != contents[new[digest]]:
                        collided.add(digest)  # the same hash in this write, other bytes
                        again.append(i)
                        continue
                    ref = ours[digest]
                else:
                    answer = self._stored(contents[i], digest, known.get(digest), collided)
                    if answer is None:
                        again.append(i)
                        continue
                    ref, counted = answer
            if old is None and ref is None:
                continue  # zeros over zeros: nothing to change (no delete per block)
            if old is not None and ref is not None and old.slot == ref.slot:
                continue
            if ref is not None:
                assert digest is not None
                if digest in ours and ref.slot not in used:
                    used.add(ref.slot)
                    self._first_ref(ref, digest, indexed=digest not in collided)
                else:
                    self._incref(ref, counted)
                if old is None:
                    self.state.mapped += 1
            elif old is not None:
                self.state.mapped -= 1
            self.index.set_block(number, ref)
            if old is not None:
                self._decref(old)

    def _stored(
        self,
        content: bytes | memoryview | None,
        digest: bytes,
        known: Ref | None,
        collided: set[bytes],
    ) -> tuple[Ref, RefCount] | None:
        """The stored ref for content found stored at the lookup, with its slot's record,
        or None to store it (it was freed since, or it collided)."""
        found = known
        if found is None or self.verify:
            found = None if digest in collided else self.index.content(digest)
        if found is None:
            return None
        # The slot must still be used and hold this content: between the lookup and now it
        # may have been freed (even reused, after a commit), its hash entry replaced.
        count = self.index.count(found.slot)
        if count is None or count[1] != digest:
            return None
        if self.verify:
            assert content is not None
            if self._content(found) != content:
                log.warning("hash collision on %s: stored unshared", digest.hex())
                collided.add(digest)
                return None
        return found, count

    def _first_ref(self, ref: Ref, digest: bytes, *, indexed: bool) -> None:
        """The first block to use a new slot: its record, and its hash entry."""
        self.index.set_count(ref.slot, (1, digest))
        self.state.unique += 1
        self.state.stored += self.sizes[slot_class(ref.slot)]
        if indexed:
            self.index.set_content(digest, ref)

    def _incref(self, ref: Ref, count: RefCount | None = None) -> None:
        """One more block uses a used slot (checked by the caller; ``count`` is its record
        if the caller has just looked it up)."""
        if count is None:
            count = self.index.count(ref.slot)
        assert count is not None
        self.index.set_count(ref.slot, (count[0] + 1, count[1]))

    def _decref(self, ref: Ref) -> None:
        count = self.index.count(ref.slot)
        if count is None:
            raise DeviceError(errno.EIO, f"slot {ref.slot:#x} is in the map but has no count")
        if count[0] > 1:
            self.index.set_count(ref.slot, (count[0] - 1, count[1]))
            return
        self.index.set_count(ref.slot, None)
        indexed = self.index.content(count[1])
        if indexed is not None and indexed.slot == ref.slot:
            self.index.set_content(count[1], None)
        self.state.unique -= 1
        self.state.stored -= self.sizes[slot_class(ref.slot)]
        self._release(ref.slot)

    def _allocate(self, cls: int) -> int:
        """A slot of class ``cls`` that nothing durable refers to (under the lock)."""
        pool = self._pools[cls]
        if not pool and not self._exhausted[cls]:
            pool.extend(reversed(self.index.listed_free(cls, _REFILL, self._cursors[cls])))
            self._exhausted[cls] = not pool
            if pool:
                self._cursors[cls] = pool[0]
        if pool:
            slot = pool.pop()
            self.index.set_free(slot, False)
            self.state.free -= 1
            return slot
        index = self.state.high[cls]
        self.state.high[cls] = index + 1
        return slot_id(cls, index)

    def _release(self, slot: int) -> None:
        """A slot no longer used: free once this layer is durable (and only then reused)."""
        self.index.set_free(slot, True)
        self.state.free += 1

    def _write_slots(self, payloads: dict[int, bytes | memoryview]) -> None:
        """Write new slots, one call per run of consecutive slots of a class."""
        order = sorted(payloads)
        i = 0
        while i < len(order):
            cls, start = slot_class(order[i]), slot_index(order[i])
            j = i + 1
            while (
                j < len(order)
                and j - i < 1024
                and slot_class(order[j]) == cls
                and slot_index(order[j]) == start + j - i
            ):
                j += 1
            self.files.write(cls, start, [payloads[s] for s in order[i:j]])
            i = j

    # -- committing ------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Changes not yet committed (the device commits early past a bound)."""
        return len(self.index.pending)

    def commit(self) -> bool:
        """Make everything put so far durable; False if there was nothing to commit."""
        with self._commit_lock:
            if self.failure is not None:
                raise DeviceError(errno.EIO, self.failure)
            with self._lock:
                if not self._changed:
                    return False
                self._changed = False
                changes = self.index.begin_commit()
                state = self.state.copy()
            # After the swap: a read registered later looks the new layers up.
            with self._readers:
                began = self._epoch
                self._epoch += 1
                while any(epoch <= began for epoch in self._reading):
                    self._drained.wait()
            try:
                self.files.sync()
                self.index.write(changes, state)
            except BaseException as exc:
                # Never again: after a failed fdatasync Linux may have dropped the pages it
                # could not write and marked them clean, so a second try would "succeed"
                # and commit an index that points at data that is not on disk.
                self.failure = f"a commit failed: {exc}"
                with self._lock:
                    self.index.pending = _merge(changes, self.index.pending)
                    self.index.end_commit(written=False)
                    self._changed = True
                raise
            try:
                self.files.punch(changes.freed())
            except OSError as exc:
                # The slots are free all the same; the check at open punches them again.
                log.warning("could not punch freed slots: %s", exc)
            with self._lock:
                self.index.end_commit(written=True)
                if any(changes.frees.values()):
                    self._exhausted = [False] * len(self.sizes)
                    self._cursors = [None] * len(self.sizes)
                    self.generation += 1
                deleted = [n for n, ref in changes.maps.items() if ref is None]
                if len(deleted) >= _COMPACT_AFTER:
                    low, high = min(deleted), max(deleted)
                    if self._deleted is not None:
                        low, high = min(low, self._deleted[0]), max(high, self._deleted[1])
                    self._deleted = (low, high)
                self.commits += 1
                self.last_commit = time.time()
            return True

    def compact(self) -> None:
        """Compact the map where commits deleted many entries (see Index.compact_blocks);
        called by the device's committer, outside any lock: it may take a while."""
        with self._lock:
            deleted, self._deleted = self._deleted, None
        if deleted is not None:
            self.index.compact_blocks(*deleted)

    def stats(self) -> Stats:
        with self._lock:
            return Stats(self.state.copy(), self.block_size, self.params.size)
