"""The check: the map, the counts, the hash index, the free list and the files agree.

It recounts every slot's references from the block map (the only root) and compares: a
used slot whose count is wrong is corrected, a slot used by nothing and listed nowhere (a
crash leaves these: slots taken by writes not yet published when a commit ran) goes on the
free list, stale hash entries and wrong free-list entries are dropped, the counters are
recomputed, files are cut at their high-water marks and free slots punched. What it cannot
repair is lost data: a block that refers to a slot the files do not have, or (``deep``, which
reads every used slot) content that no longer matches its hash.

All repairs go in one synced WriteBatch, so a check interrupted by a crash changes nothing.
It runs on a volume not in use: ``usbd-dedup --check``, and at open after an unclean stop
(not ``deep`` then: that reads the whole store).

Its progress (:mod:`usbd.core.progress`: a bar on a terminal, a log line every few seconds
otherwise) counts the index entries scanned against what the last commit's counters say
there are: each map entry once, each slot record twice (its record, its hash entry; the deep
check reads the slot at the second), each free-list entry once. After a crash the counters
may be off by the writes it lost, so the total is an estimate, not a promise.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TypeVar

import plyvel

from usbd.core import DeviceError
from usbd.core.progress import LOG_EVERY, Progress, progress

from ._blocks import BlockFiles
from ._format import (
    STATE,
    Codec,
    Params,
    Ref,
    State,
    content_hash,
    free_key,
    key_number,
    pack_count,
    ref_key,
    slot_class,
    slot_id,
    slot_index,
    unpack_count,
)

__all__ = ["Report", "check"]

log = logging.getLogger("usbd.dedup")

_USED = 1
_FREE = 2
#: Entries scanned between two updates of the progress (each takes its lock).
_STEP = 4096

T = TypeVar("T")


@dataclass
class Report:
    """What the check found and did, line by line."""

    lines: list[str] = field(default_factory=list)
    repaired: int = 0
    unrepairable: int = 0
    state: State = field(default_factory=State)

    def repair(self, count: int, what: str) -> None:
        if count:
            self.repaired += count
            self.lines.append(f"repaired: {count} {what}")

    def damage(self, what: str) -> None:
        self.unrepairable += 1
        self.lines.append(f"not repairable: {what}")

    @property
    def summary(self) -> str:
        if self.unrepairable:
            return f"check: {self.unrepairable} problem(s) not repairable"
        if self.repaired:
            return f"check: repaired {self.repaired} problem(s)"
        return "check: consistent"


def _counted(entries: Iterable[T], work: Progress) -> Iterator[T]:
    """``entries`` as they are, counted into ``work`` every :data:`_STEP` of them."""
    n = 0
    for entry in entries:
        yield entry
        n += 1
        if n == _STEP:
            work.advance(n)
            n = 0
    work.advance(n)


def check(
    db: plyvel.DB,
    files: BlockFiles,
    params: Params,
    *,
    deep: bool,
    every: float = LOG_EVERY,
    bar: bool | None = None,
    stream: IO[str] | None = None,
) -> Report:
    """Check and repair a closed volume's index and files; the report says what was done.
    ``every``, ``bar`` and ``stream`` go to :func:`usbd.core.progress.progress` (the
    seconds between log lines, a bar or not, where the bar goes)."""
    old_raw = db.get(STATE)
    old = State.unpack(old_raw) if old_raw is not None else State()
    what = "checking (reading every stored block)" if deep else "checking"
    total = old.mapped + 2 * old.unique + old.free
    with progress(what, total, every=every, bar=bar, stream=stream, logger=log) as work:
        return _check(db, files, params, old, deep, work)


def _check(
    db: plyvel.DB, files: BlockFiles, params: Params, old: State, deep: bool, work: Progress
) -> Report:
    report = Report()
    sizes = files.sizes
    block_size = params.block_size
    high = list(old.high)
    counts = [array("I", bytes(4 * high[c])) for c in range(len(sizes))]
    marks = [bytearray(high[c]) for c in range(len(sizes))]

    def inside(slot: int) -> bool:
        return slot_class(slot) < len(sizes) and slot_index(slot) < high[slot_class(slot)]

    with db.write_batch(sync=True, transaction=True) as batch:
        # The map: every reference counted.
        mapped = 0
        beyond = 0
        blocks = -(-params.size // block_size)
        for key, value in _counted(db.iterator(prefix=b"m"), work):
            number, ref = key_number(key), Ref.unpack(value)
            if number >= blocks:
                batch.delete(key)
                beyond += 1
                continue
            if not inside(ref.slot):
                # Left as it is, the block would read whatever is stored there next, and
                # overwriting it would drop a reference of another block's slot.
                batch.delete(key)
                report.damage(
                    f"block {number} referred to slot {ref.slot:#x}, which was never "
                    "stored: it now reads as zeros"
                )
                continue
            cls, index = slot_class(ref.slot), slot_index(ref.slot)
            counts[cls][index] = min(counts[cls][index] + 1, 0xFFFFFFFF)
            mapped += 1
        report.repair(beyond, "map entries past the end of the device removed")

        # The slot records against the counts.
        leaked = wrong = outside = 0
        codec = Codec(False, block_size)
        unique = stored = 0
        for key, value in _counted(db.iterator(prefix=b"r"), work):
            slot = key_number(key)
            count, digest = unpack_count(value)
            if not inside(slot):
                batch.delete(key)
                outside += 1
                continue
            cls, index = slot_class(slot), slot_index(slot)
            actual = counts[cls][index]
            if actual == 0:
                batch.delete(key)  # the slot is freed (and counted) as leaked below
                continue
            if actual != count:
                batch.put(key, pack_count(actual, digest))
                wrong += 1
            marks[cls][index] = _USED
            unique += 1
            stored += sizes[cls]
        report.repair(outside, "slot records past the high-water mark removed")
        report.repair(wrong, "reference counts corrected")

        # Used slots without a record: the data is there, the record is rebuilt from it.
        rebuilt: dict[int, bytes] = {}
        lost: set[int] = set()
        for cls in range(len(sizes)):
            for index in range(high[cls]):
                if counts[cls][index] and marks[cls][index] != _USED:
                    slot = slot_id(cls, index)
                    found = _rehash(files, codec, db, slot, block_size)
                    if found is None:
                        lost.add(slot)
                        continue
                    batch.put(ref_key(slot), pack_count(counts[cls][index], found))
                    marks[cls][index] = _USED
                    rebuilt[slot] = found
                    unique += 1
                    stored += sizes[cls]
        report.repair(len(rebuilt), "slot records rebuilt from the data")
        if lost:
            # Their blocks' content is gone: the blocks read as zeros from now on, and the
            # slots (used by nothing then) are freed below.
            for key, value in db.iterator(prefix=b"m"):
                ref = Ref.unpack(value)
                if ref.slot in lost:
                    batch.delete(key)
                    mapped -= 1
                    report.damage(
                        f"block {key_number(key)}: its slot {ref.slot:#x} has no record and "
                        "cannot be read: it now reads as zeros"
                    )

        def recorded(slot: int) -> bytes | None:
            """The content hash a used slot's record gives (None: not a used slot)."""
            if not inside(slot) or marks[slot_class(slot)][slot_index(slot)] != _USED:
                return None
            if slot in rebuilt:
                return rebuilt[slot]
            value = db.get(ref_key(slot))
            return None if value is None else unpack_count(value)[1]

        # The hash index: each entry names a used slot with that content.
        stale = 0
        for key, value in _counted(db.iterator(prefix=b"h"), work):
            ref = Ref.unpack(value)
            if recorded(ref.slot) != key[1:]:
                batch.delete(key)
                stale += 1
            elif deep and _hash_of(files, codec, ref, block_size) != key[1:]:
                # Unshared from now on: a write of the original content must not be
                # deduplicated onto the corrupt copy.
                batch.delete(key)
                report.damage(f"slot {ref.slot:#x}: its content does not match its hash")
        report.repair(stale, "stale hash index entries removed")

        # The free list: only slots nobody uses.
        bad_free = free = 0
        for key in _counted(db.iterator(prefix=b"f", include_value=False), work):
            slot = key_number(key)
            if not inside(slot) or marks[slot_class(slot)][slot_index(slot)] == _USED:
                batch.delete(key)
                bad_free += 1
                continue
            marks[slot_class(slot)][slot_index(slot)] = _FREE
            free += 1
        report.repair(bad_free, "free-list entries for used or missing slots removed")

        # What is left was used by nothing and listed nowhere: leaked, now free.
        free_slots: list[int] = []
        for cls in range(len(sizes)):
            row = marks[cls]
            index = row.find(0)
            while index >= 0:
                batch.put(free_key(slot_id(cls, index)), b"")
                row[index] = _FREE
                leaked += 1
                free += 1
                index = row.find(0, index + 1)
            free_slots.extend(slot_id(cls, i) for i in range(high[cls]) if row[i] == _FREE)
        report.repair(leaked, "leaked slots freed")

        state = State(old.written, mapped, unique, stored, free, high)
        if state != old:
            batch.put(STATE, state.pack())
            report.repair(1, "set of counters recomputed")
        report.state = state
    files.punch(free_slots)
    cut = files.cut(high)
    if cut:
        report.lines.append(f"{cut} bytes past the last committed slot cut off")
    return report


def _rehash(
    files: BlockFiles, codec: Codec, db: plyvel.DB, slot: int, block_size: int
) -> bytes | None:
    """The hash of a slot's content, found through any map entry that refers to it (which
    says its length and whether it is compressed)."""
    ref = _any_ref(db, slot)
    return None if ref is None else _hash_of(files, codec, ref, block_size)


def _hash_of(files: BlockFiles, codec: Codec, ref: Ref, block_size: int) -> bytes | None:
    """The hash of a slot's content; None if it is short or does not decode. A read error
    of the disk itself is raised: the check stops rather than drop blocks for it."""
    try:
        stored = files.read(ref.slot, ref.length)
        assert stored is not None  # (only a read without waiting gives None)
        return content_hash(codec.decode(stored, ref.compressed, block_size))
    except DeviceError:
        return None


def _any_ref(db: plyvel.DB, slot: int) -> Ref | None:
    for _key, value in db.iterator(prefix=b"m"):
        ref = Ref.unpack(value)
        if ref.slot == slot:
            return ref
    return None
