"""try_read: reads on the event loop, from the index's layers and its cache (_index.Cache).

``DedupDevice.try_read`` answers without a thread when every block's ref is in memory (the
uncommitted layers or ``Index.cache``, looked up by ``Index.cached_blocks`` under
``DedupStore.try_reading``) and its slot in the page cache (RWF_NOWAIT). What keeps it right:

* the cache always equals LevelDB: filled by LevelDB reads, and the committed layer written
  through (``Cache.write_through``) at the end of each successful commit, before the layer
  is dropped; until then the layer shadows both;
* the read registers (``DedupStore._enter``) before its lookup, so a commit that frees a slot
  it looked up waits for it before punching or reusing the slot.

First the forced interleavings of a review (its r10), one test each, then its stress (r3):
writers with exact models, readers checking each block against its window of versions, with
commits every millisecond, small cache bounds, raw and zstd, several block sizes; a short
variant by default, a longer one marked slow. Hooks are set with monkeypatch on the instances
(``BlockFiles._nowait`` between the lookup and the read of the slots, ``Index.write`` inside a
commit, ``BlockFiles.sync`` to fail one).
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import pytest

from usbd.core import DeviceError
from usbd.core.lockfile import unlock
from usbd.dedup import DedupDevice, check, open_volume
from usbd.dedup._format import Ref, map_key
from usbd.dedup._index import Cache
from usbd.dedup._volume import open_closed

KiB = 1 << 10
MiB = 1 << 20
B = 4 * KiB
#: Ceiling for anything that must end (a paused reader, a commit): hang detection only.
HANG = 15.0
#: How long a commit that must wait is given to show that it does not.
HOLD = 0.3


def make_device(
    directory: Path,
    *,
    size: int = 16 * MiB,
    block_size: int | None = None,
    compress: bool = False,
    commit_every: float = 0.0,
    pending_limit: int = 1 << 20,
) -> DedupDevice:
    """A device on a new volume; ``commit_every=0``: commits only on flush (or past
    ``pending_limit``), so a test decides when."""
    volume = open_volume(
        directory / "v.dedup", size=size, block_size=block_size, memcache=16 * MiB,
        compress=compress,
    )  # fmt: skip
    return DedupDevice(volume, commit_every=commit_every, pending_limit=pending_limit)


@pytest.fixture
def devices(short_dir: Path) -> Iterator[Callable[..., DedupDevice]]:
    """Devices on volumes of their own under short_dir; those still open are closed after."""
    made: list[DedupDevice] = []

    def make(**kwargs: object) -> DedupDevice:
        directory = short_dir / f"d{len(made)}"
        directory.mkdir()
        device = make_device(directory, **kwargs)  # type: ignore[arg-type]
        made.append(device)
        return device

    yield make
    for device in reversed(made):
        device.close()


def in_thread(call: Callable[[], object], name: str) -> tuple[threading.Thread, list[object]]:
    """``call`` in a daemon thread named ``name``; the list gets its result or exception."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, outcome


def finished(thread: threading.Thread, outcome: list[object]) -> object:
    thread.join(HANG)
    assert not thread.is_alive(), f"{thread.name} hangs"
    assert outcome, f"{thread.name} ended without an outcome"
    return outcome[0]


def try_read(device: DedupDevice, offset: int, length: int) -> bytes:
    """try_read that must answer (every ref in memory, the slots in the page cache)."""
    got = device.try_read(offset, length)
    assert got is not None, f"try_read({offset}, {length}) missed"
    return bytes(got)


def cache_equals_leveldb(device: DedupDevice) -> None:
    """The invariant: every map entry in the index's cache is LevelDB's value."""
    index = device.store.index
    with device.store._lock:
        cached = dict(index.cache.maps)
    for number, ref in cached.items():
        value = index.db.get(map_key(number))
        assert ref == (None if value is None else Ref.unpack(value)), (
            f"the cache's entry for block {number} is not LevelDB's"
        )


@pytest.fixture(autouse=True)
def _nowait_supported(short_dir: Path) -> None:
    """try_read needs RWF_NOWAIT on the file system of short_dir."""
    probe = short_dir / "nowait"
    probe.write_bytes(bytes(B))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(B)], 0, os.RWF_NOWAIT)
    except (BlockingIOError, OSError) as exc:
        # A file system without RWF_NOWAIT cannot have this path at all; CI's has it.
        if os.environ.get("CI") == "true":
            pytest.fail(f"RWF_NOWAIT is required in CI: {exc}", pytrace=False)
        pytest.skip(f"no RWF_NOWAIT here: {exc}")
    finally:
        os.close(fd)
        probe.unlink()


# -- forced interleavings --------------------------------------------------------------------


def test_a_paused_try_read_holds_back_the_commit_that_frees_its_slot(
    devices: Callable[..., DedupDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A try_read that has looked block 0 up (its ref from the cache) and not yet read the
    slot must keep that slot's content: a commit whose layer frees the slot (block 0
    overwritten) waits, before its fdatasync and the punch, until that read has left, and
    the read returns the old content. try_reading registers the read (``_enter``) before
    the lookup; without that the commit would punch the slot, and once committed hand it to
    the next new content, under a read that still means to return the old.

    Afterwards the freed slot is reused by new content at another block, and block 0 still
    reads its new content."""
    device = devices()
    store = device.store
    old, new, other = os.urandom(B), os.urandom(B), os.urandom(B)
    device.write(0, memoryview(old), False)
    device.flush()
    device.read(0, B)  # block 0's ref into the cache
    assert 0 in store.index.cache.maps
    old_slot = store.index.cache.maps[0].slot  # type: ignore[union-attr]

    real_nowait = store.files._nowait
    paused, go = threading.Event(), threading.Event()

    def pause_reader(cls: int, buffers: Sequence[memoryview], offset: int) -> bool:
        if threading.current_thread().name == "reader":
            paused.set()
            go.wait(HANG)
        return real_nowait(cls, buffers, offset)

    real_sync = store.files.sync
    synced = threading.Event()

    def note_sync() -> None:
        synced.set()
        real_sync()

    monkeypatch.setattr(store.files, "_nowait", pause_reader)
    monkeypatch.setattr(store.files, "sync", note_sync)
    reader, read = in_thread(lambda: device.try_read(0, B), "reader")
    assert paused.wait(HANG), "the try_read never reached the read of its slot"
    device.write(0, memoryview(new), False)  # frees old's slot in the pending layer
    flusher, flushed = in_thread(device.flush, "flusher")
    try:
        assert not synced.wait(HOLD), "the commit did not wait for the try_read before it"
        assert flusher.is_alive()
    finally:
        go.set()
    got = finished(reader, read)
    assert got is not None, "the paused try_read missed"
    assert bytes(got) == old, "the paused try_read did not read the old content"  # type: ignore[arg-type]
    assert finished(flusher, flushed) is None
    assert synced.is_set()
    assert try_read(device, 0, B) == new

    # old's slot is free in LevelDB now, punched, and the next new content takes it.
    device.write(B, memoryview(other), False)
    assert store.index.block(1).slot == old_slot, "the freed slot was not reused"  # type: ignore[union-attr]
    assert try_read(device, 0, 2 * B) == new + other
    device.flush()
    assert try_read(device, 0, 2 * B) == new + other
    cache_equals_leveldb(device)


def test_reads_during_index_write_see_the_committing_layer(
    devices: Callable[..., DedupDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a commit is inside ``Index.write`` (before LevelDB has the layer, and after,
    until ``end_commit``), the cache still holds the previous value (x) of block 0: try_read
    must see the committing layer (y) over it, and a pending value (z) over that. At
    ``end_commit`` the committed layer is written through into the cache before the layer
    is dropped, so after it, and after the next commit (z), the cache holds LevelDB's value
    and try_read the newest content: were the write-through missing, the cache would keep
    x's ref, whose slot the first commit freed."""
    device = devices()
    index = device.store.index
    x, y, z = (os.urandom(B) for _ in range(3))
    device.write(0, memoryview(x), False)
    device.flush()
    device.read(0, B)
    x_ref = index.cache.maps[0]  # LevelDB's, from the commit's write-through or the read
    assert x_ref is not None
    device.write(0, memoryview(y), False)

    real_write = index.write
    before, written, go_on, go_out = (threading.Event() for _ in range(4))

    def paused_write(*args: object, **kwargs: object) -> None:
        before.set()
        go_on.wait(HANG)
        real_write(*args, **kwargs)  # type: ignore[arg-type]
        written.set()
        go_out.wait(HANG)

    monkeypatch.setattr(index, "write", paused_write)
    flusher, flushed = in_thread(device.flush, "flusher")
    try:
        assert before.wait(HANG), "the commit never reached Index.write"
        assert index.committing is not None and index.cache.maps[0] == x_ref
        assert try_read(device, 0, B) == y, "the committing layer is not seen over the cache"
        go_on.set()
        assert written.wait(HANG)
        # LevelDB has y now, the cache still x: the committing layer shadows both.
        assert index.cache.maps[0] == x_ref
        assert try_read(device, 0, B) == y, "LevelDB written, the cache not: y must still show"
        device.write(0, memoryview(z), False)
        assert try_read(device, 0, B) == z, "pending is not seen over committing"
        assert bytes(device.read(0, B)) == z  # a thread read meanwhile: z from pending
    finally:
        go_on.set()
        go_out.set()
    assert finished(flusher, flushed) is None
    assert index.committing is None
    assert index.cache.maps[0] != x_ref, "the committed layer was not written through"
    cache_equals_leveldb(device)
    assert try_read(device, 0, B) == z, "after end_commit"
    monkeypatch.setattr(index, "write", real_write)
    device.flush()
    cache_equals_leveldb(device)
    assert not index.pending.maps
    assert try_read(device, 0, B) == z, "after the next commit (from the cache alone)"


def test_a_failed_fdatasync_leaves_the_merged_layers_shadowing_the_cache(
    devices: Callable[..., DedupDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit whose fdatasync fails writes nothing to LevelDB: its layer goes back under
    pending (``_merge``) and is not written through, so the cache keeps LevelDB's value (x)
    and the merged layer, still shadowing it, gives try_read the content written since (y),
    for a block changed before the failure and one changed while it was running. No later
    commit is made; reads still work."""
    device = devices()
    index = device.store.index
    x, y, w = (os.urandom(B) for _ in range(3))
    device.write(0, memoryview(x * 2), False)
    device.flush()
    device.read(0, 2 * B)  # both refs into the cache
    device.write(0, memoryview(y), False)
    device.read(0, B)  # from pending: nothing cached

    def fail() -> None:
        device.write(B, memoryview(w), False)  # while the commit runs: into the new pending
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(device.store.files, "sync", fail)
    with pytest.raises(DeviceError):
        device.flush()
    assert index.committing is None
    cache_equals_leveldb(device)
    assert try_read(device, 0, 2 * B) == y + w, "the merged layers do not shadow the cache"
    assert index.pending.maps.keys() >= {0, 1}, "the failed layer was not merged back"
    assert bytes(device.read(0, 2 * B)) == y + w
    with pytest.raises(DeviceError):
        device.flush()  # never again after a failed fdatasync
    assert try_read(device, 0, 2 * B) == y + w


def test_trimmed_and_zeroed_blocks_read_as_zeros_from_the_cache(
    devices: Callable[..., DedupDevice],
) -> None:
    """Trim and write-zeroes store None map entries; once committed, the cache holds them
    as None (a zero block, not a missing entry), so try_read answers with zeros at once. x
    is written to all four blocks: one slot, still used by blocks 2 and 3 after the trim,
    so a stale entry left in the cache for blocks 0 and 1 would read x, not garbage. A
    rewrite after the None entries shows at once and after its commit."""
    device = devices()
    index = device.store.index
    x, y = os.urandom(B), os.urandom(B)
    device.write(0, memoryview(x * 4), False)
    device.flush()
    device.read(0, 4 * B)  # the four refs into the cache
    assert index.cached_blocks(0, 4) is not None
    device.trim(0, 2 * B, False)
    device.zero(2 * B + 100, B, may_trim=True, fua=False, fast=False)
    expect = bytes(2 * B) + x[:100] + bytes(B - 100) + bytes(100) + x[100:]
    assert try_read(device, 0, 4 * B) == expect
    device.flush()
    assert not index.pending.maps
    assert index.cache.maps[0] is None and index.cache.maps[1] is None
    cache_equals_leveldb(device)
    assert try_read(device, 0, 4 * B) == expect, "after the commit (from the cache)"
    device.write(B, memoryview(y), False)
    expect = expect[:B] + y + expect[2 * B :]
    assert try_read(device, 0, 4 * B) == expect
    device.flush()
    cache_equals_leveldb(device)
    assert try_read(device, 0, 4 * B) == expect
    device.write(B, memoryview(bytes(B)), False)  # zeros written: a None entry as well
    device.flush()
    assert index.cache.maps[1] is None
    assert try_read(device, 0, 2 * B) == bytes(2 * B)


def test_try_read_never_waits_for_the_stores_lock(devices: Callable[..., DedupDevice]) -> None:
    """try_read runs on the event loop: with the store's lock held (a writer publishing, a
    commit swapping layers), it gives up at once (None: the caller reads in a thread)
    rather than wait; with the lock free again it answers from the cache."""
    device = devices()
    data = os.urandom(B)
    device.write(0, memoryview(data), False)
    device.flush()
    device.read(0, B)
    with device.store._lock:
        reader, read = in_thread(lambda: device.try_read(0, B), "reader")
        reader.join(HANG)
        assert not reader.is_alive(), "try_read waited for the lock"
    assert finished(reader, read) is None
    assert try_read(device, 0, B) == data


# -- stress ----------------------------------------------------------------------------------

WRITERS, READERS, PER = 3, 3, 24


class Stress:
    """Writers owning ``PER`` blocks each, with an exact model; readers anywhere.

    ``versions[i]``: every content block ``i`` was given, in order (the first: zeros);
    ``acked[i]``: the index of the last one whose call had returned. A read begun after an
    acknowledged version and ended before the next began must return it; in general each
    block must be one of ``versions[i][acked-at-start:]``."""

    def __init__(
        self, device: DedupDevice, block: int, compress: bool, seconds: float, seed: int
    ) -> None:
        self.device = device
        self.block = block
        self.seconds = seconds
        self.seed = seed
        self.blocks = WRITERS * PER
        self.zero = bytes(block)
        rng = random.Random(seed)
        if compress:  # half of them compress (to smaller slot classes)
            self.pool = [
                rng.randbytes(16) * (block // 16) if k % 2 else rng.randbytes(block)
                for k in range(16)
            ]
        else:
            self.pool = [rng.randbytes(block) for _ in range(16)]
        self.versions = [[self.zero] for _ in range(self.blocks)]
        self.acked = [0] * self.blocks
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.hits = 0
        self.misses = 0
        self.stop = 0.0

    def read_any(self, offset: int, length: int) -> bytes:
        """As the engine reads: try_read, then read in a thread when it misses."""
        got = self.device.try_read(offset, length)
        if got is None:
            self.misses += 1
            return bytes(self.device.read(offset, length))
        self.hits += 1
        return bytes(got)

    def running(self) -> bool:
        return time.monotonic() < self.stop and len(self.errors) < 5

    def writer(self, w: int) -> None:
        r = random.Random(self.seed * 100 + w)
        device, size, zero = self.device, self.block, self.zero
        base = w * PER
        model = [zero] * PER
        try:
            while self.running():
                op = r.random()
                first = r.randrange(PER - 3)
                n = r.randint(1, 3)
                new = list(model)
                call: Callable[[], None]
                if op < 0.45:  # whole blocks from the shared pool: shared slots, freed, reused
                    for k in range(n):
                        new[first + k] = (
                            r.choice(self.pool) if r.random() < 0.8 else os.urandom(size)
                        )
                    data = b"".join(new[first : first + n])
                    at = (base + first) * size
                    call = partial(device.write, at, memoryview(data), False)
                elif op < 0.65 or 0.75 <= op < 0.85:  # unaligned write or zero
                    start = (base + first) * size + r.randrange(size)
                    length = r.randrange(1, n * size)
                    zeroing = op >= 0.75
                    piece = bytes(length) if zeroing or r.random() < 0.3 else os.urandom(length)
                    image = bytearray(b"".join(model))
                    image[start - base * size : start - base * size + length] = piece
                    new = [bytes(image[k * size : (k + 1) * size]) for k in range(PER)]
                    if zeroing:
                        call = partial(
                            device.zero, start, length, may_trim=True, fua=False, fast=False
                        )
                    else:
                        call = partial(device.write, start, memoryview(piece), False)
                elif op < 0.75:
                    for k in range(n):
                        new[first + k] = zero
                    at, length = (base + first) * size, n * size
                    call = partial(device.trim, at, length, False)
                elif op < 0.88:
                    device.flush()
                    continue
                else:  # its own blocks read back
                    got = self.read_any((base + first) * size, n * size)
                    for k in range(n):
                        if got[k * size : (k + 1) * size] != model[first + k]:
                            self.errors.append(f"writer {w}: block {base + first + k} wrong")
                    continue
                changed = [k for k in range(PER) if new[k] != model[k]]
                with self.lock:
                    for k in changed:
                        self.versions[base + k].append(new[k])
                call()
                with self.lock:
                    for k in changed:
                        self.acked[base + k] = len(self.versions[base + k]) - 1
                model = new
                # Acknowledged: a read now must give it.
                lo, hi = (min(changed), max(changed)) if changed else (first, first)
                got = self.read_any((base + lo) * size, (hi - lo + 1) * size)
                for k in range(lo, hi + 1):
                    if got[(k - lo) * size : (k - lo + 1) * size] != model[k]:
                        self.errors.append(f"writer {w}: block {base + k} not what it wrote")
        except Exception:
            self.errors.append(f"writer {w}: {traceback.format_exc()}")

    def reader(self, k: int) -> None:
        r = random.Random(self.seed * 1000 + k)
        size = self.block
        try:
            while self.running():
                first = r.randrange(self.blocks - 8)
                n = r.randint(1, 8)
                with self.lock:
                    lows = [self.acked[first + j] for j in range(n)]
                got = self.read_any(first * size, n * size)
                with self.lock:
                    for j in range(n):
                        window = self.versions[first + j][lows[j] :]
                        if got[j * size : (j + 1) * size] not in window:
                            self.errors.append(
                                f"reader {k}: block {first + j} outside its window (versions "
                                f"{lows[j]}..{len(self.versions[first + j]) - 1})"
                            )
        except Exception:
            self.errors.append(f"reader {k}: {traceback.format_exc()}")

    def run(self) -> None:
        self.stop = time.monotonic() + self.seconds
        threads = [
            threading.Thread(target=self.writer, args=(w,), daemon=True) for w in range(WRITERS)
        ]
        threads += [
            threading.Thread(target=self.reader, args=(k,), daemon=True) for k in range(READERS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.seconds + HANG)
            if thread.is_alive():
                self.errors.append(f"{thread.name} hangs")
        assert not self.errors, "\n".join(self.errors[:5])
        size = self.block
        image = bytes(self.device.read(0, self.blocks * size))
        bad = [
            i
            for i in range(self.blocks)
            if image[i * size : (i + 1) * size] != self.versions[i][self.acked[i]]
        ]
        assert not bad, f"the final image differs from the model at blocks {bad[:8]}"


def stress(
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    block: int,
    compress: bool,
    cache: int,
    seconds: float,
    seed: int,
) -> None:
    """One run: commits every millisecond or past 8 changes, a cache of ``cache`` entries
    (see Cache: half for the map), a sleep before half the RWF_NOWAIT reads (between the
    lookup and the read of the slots), then the model checked, and the volume after a clean
    close by the deep check."""
    device = make_device(
        short_dir, size=WRITERS * PER * block, block_size=block, compress=compress,
        commit_every=0.001, pending_limit=8,
    )  # fmt: skip
    closed = False
    try:
        store = device.store
        assert not store.index.cache.maps
        monkeypatch.setattr(store.index, "cache", Cache(cache))  # before any lookup
        real_nowait = store.files._nowait

        def slow_nowait(cls: int, buffers: Sequence[memoryview], offset: int) -> bool:
            if random.random() < 0.5:
                time.sleep(random.random() * 0.002)
            return real_nowait(cls, buffers, offset)

        monkeypatch.setattr(store.files, "_nowait", slow_nowait)
        run = Stress(device, block, compress, seconds, seed)
        run.run()
        assert run.hits > 50, f"try_read hit only {run.hits} times ({run.misses} misses)"
        assert store.generation > 0, "no commit made a freed slot reusable"
        assert store.failure is None and device.failed() is None
        cache_equals_leveldb(device)
        closed = True
        device.close()
    finally:
        if not closed:
            device.close()
    db, files, params, lock_fd = open_closed(short_dir / "v.dedup")
    try:
        report = check(db, files, params, deep=True)
    finally:
        db.close()
        files.close()
        unlock(lock_fd)
        os.close(lock_fd)
    assert report.summary == "check: consistent", report.lines


#: (block size, zstd, cache entries): each block size, each codec, and caches from none
#: (try_read hits only the layers) to a few map entries evicted all the time.
SHORT = [(4 * KiB, False, 16), (4 * KiB, True, 96), (512, True, 0), (64 * KiB, False, 16)]


@pytest.mark.parametrize(("block", "compress", "cache"), SHORT)
def test_try_read_under_writers_and_commits_reads_only_what_was_written(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, block: int, compress: bool, cache: int
) -> None:
    """Writers overwrite, share, trim and zero blocks (whole and partial) with commits every
    millisecond, so slots are freed, punched and reused all the time under readers that use
    try_read (falling back to read, as the engine does): every block read must be a version
    written to it since the last one acknowledged before the read began (never a reused
    slot's content, never an entry left stale by eviction or by a commit), a writer must read
    at once what it was acknowledged, and the image and the volume must be right at the end."""
    stress(short_dir, monkeypatch, block=block, compress=compress, cache=cache,
           seconds=0.6, seed=1)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("cache", [0, 16, 96, 4096])
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zstd"])
@pytest.mark.parametrize("block", [4 * KiB, 64 * KiB])
def test_try_read_under_writers_and_commits_reads_only_what_was_written_long(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, block: int, compress: bool, cache: int
) -> None:
    """The same, 4 s per case, for each block size, codec and cache bound."""
    stress(short_dir, monkeypatch, block=block, compress=compress, cache=cache,
           seconds=4.0, seed=cache + block)  # fmt: skip
