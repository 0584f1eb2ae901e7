"""The index: LevelDB under two layers of changes not yet in it, with a cache of its values.

Writers change the ``pending`` layer only. A commit turns ``pending`` into ``committing``
(a new, empty ``pending`` takes its place), writes it to LevelDB in one synced
``WriteBatch`` together with the counters, and then drops it. A lookup asks ``pending``, then
``committing``, then LevelDB, so it sees the newest state whatever a commit is doing, and a
crash leaves LevelDB exactly as the last commit wrote it: nothing half-applied, ever.

Values in the layers are Python objects (decoded once, encoded at commit): a 1 MiB write
touches a few hundred of them, and packing bytes for each would cost more than the lookups.
Callers serialise access (the device's lock); only :meth:`Index.write` runs outside it.

Under the layers, a :class:`Cache` holds LevelDB's values for keys looked up lately (a get
costs about 3 us, a dict lookup a tenth of that, and only a dict lookup is sure never to
wait for the disk). It always equals LevelDB: it is filled from LevelDB reads, and at the end
of each successful commit the committed layer is written through into it, before the layer
is dropped; LevelDB changes at no other time while the index is open.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import plyvel

from ._format import (
    STATE,
    Ref,
    State,
    free_key,
    hash_key,
    key_number,
    map_key,
    pack_count,
    ref_key,
    slot_id,
    unpack_count,
)

__all__ = ["Changes", "Index", "RefCount"]

#: A used slot's record: how many blocks refer to it, and the hash of its content.
RefCount = tuple[int, bytes]


@dataclass
class Changes:
    """One layer: each dict maps a key to its new value, None meaning deleted."""

    maps: dict[int, Ref | None] = field(default_factory=dict)
    refs: dict[int, RefCount | None] = field(default_factory=dict)
    hashes: dict[bytes, Ref | None] = field(default_factory=dict)
    #: slot -> True (now free) or False (no longer free).
    frees: dict[int, bool] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.maps) + len(self.refs) + len(self.hashes) + len(self.frees)

    def freed(self) -> list[int]:
        """The slots this layer frees, in order (to punch them once it is durable)."""
        return sorted(slot for slot, free in self.frees.items() if free)

    def write(self, batch: plyvel.WriteBatch) -> None:
        for block, ref in self.maps.items():
            if ref is None:
                batch.delete(map_key(block))
            else:
                batch.put(map_key(block), ref.pack())
        for slot, count in self.refs.items():
            if count is None:
                batch.delete(ref_key(slot))
            else:
                batch.put(ref_key(slot), pack_count(*count))
        for digest, ref in self.hashes.items():
            if ref is None:
                batch.delete(hash_key(digest))
            else:
                batch.put(hash_key(digest), ref.pack())
        for slot, free in self.frees.items():
            if free:
                batch.put(free_key(slot), b"")
            else:
                batch.delete(free_key(slot))


_MISSING = object()


class Cache:
    """LevelDB's values for recently used keys: map entries (None: a zero block), slot
    records (None: a free slot) and hash entries (hits only: the misses of new content would
    crowd out everything else). Oldest first out, ``size`` entries in all: half for the map,
    which reads on the event loop need, a quarter each for the others."""

    def __init__(self, size: int) -> None:
        # OrderedDict: dropping the oldest of a plain dict again and again is quadratic
        # (next(iter()) walks past every deleted slot until the dict is rebuilt).
        self.maps: OrderedDict[int, Ref | None] = OrderedDict()
        self.refs: OrderedDict[int, RefCount | None] = OrderedDict()
        self.hashes: OrderedDict[bytes, Ref] = OrderedDict()
        self._bounds = (size // 2, size // 4, size // 4)

    def entries(self) -> int:
        """How many entries it holds now (three len() calls: safe from any thread)."""
        return len(self.maps) + len(self.refs) + len(self.hashes)

    def put_blocks(self, items: Iterable[tuple[int, Ref | None]]) -> None:
        if self._bounds[0]:
            self.maps.update(items)
            _trim(self.maps, self._bounds[0])

    def put_count(self, slot: int, count: RefCount | None) -> None:
        if self._bounds[1]:
            self.refs[slot] = count
            _trim(self.refs, self._bounds[1])

    def put_content(self, digest: bytes, ref: Ref) -> None:
        if self._bounds[2]:
            self.hashes[digest] = ref
            _trim(self.hashes, self._bounds[2])

    def write_through(self, changes: Changes) -> None:
        """A layer LevelDB now holds."""
        self.put_blocks(changes.maps.items())
        if self._bounds[1]:
            self.refs.update(changes.refs)
            _trim(self.refs, self._bounds[1])
        for digest, ref in changes.hashes.items():
            if ref is None:
                self.hashes.pop(digest, None)
            else:
                self.put_content(digest, ref)


def _trim(entries: OrderedDict[Any, Any], bound: int) -> None:
    while len(entries) > bound:
        entries.popitem(last=False)


#: Up to this many blocks are looked up one by one rather than with an iterator (11 us to
#: make one here, 3 us a get).
_GETS = 3


class Index:
    """The block map, the slot records, the hash index and the free list, as one state."""

    def __init__(self, db: plyvel.DB, cache_entries: int = 0) -> None:
        self.db = db
        self.cache = Cache(cache_entries)
        #: Lookups of a single key that the cache answered, and those that asked LevelDB
        #: (under the callers' lock, as every lookup: a plain increment each).
        self.hits = 0
        self.misses = 0
        self._pending = Changes()
        self.committing: Changes | None = None
        #: The layers newest first (kept, not built per lookup: lookups are the hot path).
        self._layers_now: tuple[Changes, ...] = (self._pending,)

    @property
    def pending(self) -> Changes:
        return self._pending

    @pending.setter
    def pending(self, changes: Changes) -> None:
        self._pending = changes
        self._relayer()

    def _relayer(self) -> None:
        if self.committing is None:
            self._layers_now = (self._pending,)
        else:
            self._layers_now = (self._pending, self.committing)

    def layers(self) -> tuple[Changes, ...]:
        """The layers newest first."""
        return self._layers_now

    # -- lookups ---------------------------------------------------------------------------

    def block(self, number: int) -> Ref | None:
        for layer in self.layers():
            found = layer.maps.get(number, _MISSING)
            if found is not _MISSING:
                return found  # type: ignore[return-value]
        found = self.cache.maps.get(number, _MISSING)
        if found is not _MISSING:
            self.hits += 1
            return found  # type: ignore[return-value]
        self.misses += 1
        value = self.db.get(map_key(number))
        ref = None if value is None else Ref.unpack(value)
        self.cache.put_blocks(((number, ref),))
        return ref

    def cached_blocks(self, first: int, count: int) -> list[Ref | None] | None:
        """The refs of ``count`` blocks from ``first`` if all are in memory (the layers or
        the cache), else None: never a LevelDB call, which may read from disk."""
        layers = self.layers()
        cache = self.cache.maps
        found: list[Ref | None] = []
        for number in range(first, first + count):
            for layer in layers:
                if number in layer.maps:
                    found.append(layer.maps[number])
                    break
            else:
                if number not in cache:
                    return None
                found.append(cache[number])
        return found

    def blocks(self, first: int, count: int, *, cache: bool = True) -> list[Ref | None]:
        """The refs of ``count`` blocks from ``first``: one LevelDB range scan (or a few
        gets: making an iterator costs about as much as four), then the layers."""
        if count <= _GETS and cache:
            return [self.block(first + i) for i in range(count)]
        found: list[Ref | None] = [None] * count
        for key, value in self.db.iterator(start=map_key(first), stop=map_key(first + count)):
            found[key_number(key) - first] = Ref.unpack(value)
        if cache:
            self.cache.put_blocks(zip(range(first, first + count), found, strict=True))
        for layer in reversed(self.layers()):
            maps = layer.maps
            if len(maps) < count:
                for number, ref in maps.items():
                    if first <= number < first + count:
                        found[number - first] = ref
            else:
                for i in range(count):
                    if first + i in maps:
                        found[i] = maps[first + i]
        return found

    def count(self, slot: int) -> RefCount | None:
        for layer in self.layers():
            found = layer.refs.get(slot, _MISSING)
            if found is not _MISSING:
                return found  # type: ignore[return-value]
        found = self.cache.refs.get(slot, _MISSING)
        if found is not _MISSING:
            self.hits += 1
            return found  # type: ignore[return-value]
        self.misses += 1
        value = self.db.get(ref_key(slot))
        count = None if value is None else unpack_count(value)
        self.cache.put_count(slot, count)
        return count

    def content(self, digest: bytes) -> Ref | None:
        for layer in self.layers():
            found = layer.hashes.get(digest, _MISSING)
            if found is not _MISSING:
                return found  # type: ignore[return-value]
        cached = self.cache.hashes.get(digest)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        value = self.db.get(hash_key(digest))
        if value is None:
            return None
        ref = Ref.unpack(value)
        self.cache.put_content(digest, ref)
        return ref

    def listed_free(self, cls: int, limit: int, after: int | None = None) -> list[int]:
        """Up to ``limit`` slots of class ``cls`` that are free in LevelDB and that no layer
        has taken or is freeing (a slot freed by a layer is reused only after that layer is
        durable and the slot punched: :meth:`Index.end_commit` comes after both). ``after``:
        only slots past this one (where the last call stopped)."""
        found: list[int] = []
        layers = self.layers()
        start = free_key(slot_id(cls, 0) if after is None else after + 1)
        stop = free_key(slot_id(cls + 1, 0))
        for key in self.db.iterator(start=start, stop=stop, include_value=False):
            slot = key_number(key)
            if any(slot in layer.frees for layer in layers):
                continue
            found.append(slot)
            if len(found) >= limit:
                break
        return found

    # -- changes ---------------------------------------------------------------------------

    def set_block(self, number: int, ref: Ref | None) -> None:
        self._pending.maps[number] = ref

    def set_count(self, slot: int, count: RefCount | None) -> None:
        self._pending.refs[slot] = count

    def set_content(self, digest: bytes, ref: Ref | None) -> None:
        self._pending.hashes[digest] = ref

    def set_free(self, slot: int, free: bool) -> None:
        self._pending.frees[slot] = free

    # -- commits ---------------------------------------------------------------------------

    def begin_commit(self) -> Changes:
        """Turn ``pending`` into ``committing`` (under the caller's lock; one commit at a time)."""
        if self.committing is not None:
            raise RuntimeError("a commit is already in progress")
        changes = self._pending
        self.committing = changes
        self.pending = Changes()
        return changes

    def compact_blocks(self, first: int, last: int) -> None:
        """Compact the map's LevelDB range of blocks ``first`` to ``last``: after a large trim
        its deletion markers would be walked by every range scan that starts there, until
        LevelDB compacts them on its own (reads of a trimmed area were 37x slower)."""
        self.db.compact_range(start=map_key(first), stop=map_key(last + 1))

    def write(self, changes: Changes, state: State, *, sync: bool = True) -> None:
        """The layer and the counters in LevelDB, atomically (no lock needed: LevelDB is
        thread-safe and lookups still find ``committing`` meanwhile)."""
        with self.db.write_batch(sync=sync, transaction=True) as batch:
            changes.write(batch)
            batch.put(STATE, state.pack())

    def end_commit(self, *, written: bool) -> None:
        """Drop the committing layer: ``written`` (into LevelDB), after writing it through
        into the cache; not written (the commit failed), after the caller merged it back."""
        if written and self.committing is not None:
            self.cache.write_through(self.committing)
        self.committing = None
        self._relayer()
