"""The object-store device: the local cache in front, upload rounds behind, the manifest between.

Reads and writes go to the cache file (``_cache``); a chunk not held there is fetched whole
(objects are small, 1 MiB by default) or, if the bucket has no object for it, read as zeros with
no I/O at all. Uploads happen in rounds (``_uploader``) that commit a consistent set of new
objects with one manifest PUT (``_manifest``). What FLUSH means depends on the cache:

* persistent (``-objstore-persistcache``): FLUSH syncs the cache file and saves the cache state,
  so flushed writes survive kill -9 and a power cut, and are uploaded later;
* not persistent: FLUSH returns once a round that began after it has committed, i.e. every
  write before it is in the bucket. A FLUSH that cannot reach the store within ``timeout``
  fails with EIO (the data stays dirty and goes up when the store is back).

FUA is emulated by the engine (a FLUSH after the write), which means the same in each case.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Literal

from usbd.core import BytesLike, Device, DeviceError, Extent, ExtentFlag, Fua, format_size
from usbd.core.progress import LOG_EVERY, Progress, progress

from ._cache import CacheFiles, SavedState
from ._chunks import Chunks, Frozen, Slot
from ._codec import IntegrityError, Kind
from ._manifest import CommitUncertain, Fenced, commit, data_key, seq_of_base
from ._metrics import figures
from ._store import StoreError
from ._uploader import Uploader
from ._volume import OpenError, Volume

__all__ = ["CacheConflict", "ObjStoreDevice"]

log = logging.getLogger("usbd.objstore")

_HOLE = ExtentFlag.HOLE | ExtentFlag.ZERO
#: How long close keeps trying to upload what is dirty when the store does not answer.
CLOSE_TIMEOUT = 60.0
#: How the long work of open and close (listing the bucket, uploading what is dirty) shows
#: its progress: usbd.core.progress's ``every``, ``bar`` and ``stream`` (tests change them).
PROGRESS_EVERY = LOG_EVERY
PROGRESS_BAR: bool | None = None
PROGRESS_STREAM: IO[str] | None = None


class CacheConflict(OpenError):
    """The persistent cache cannot be reconciled with the bucket (it holds writes of a volume
    that has been written elsewhere since, or the bucket went back in time)."""


class ObjStoreDevice(Device):
    """A device of ``volume.manifest.params.size`` bytes over an open :class:`Volume`."""

    blocking = True
    parallel = True
    multi_conn = True
    fua = Fua.EMULATE

    def __init__(
        self,
        volume: Volume,
        cache_dir: Path,
        *,
        persistent: bool,
        cache_objects: int | None,
        workers: int,
        flush_every: float,
        timeout: float,
        readahead: int = 8,
    ) -> None:
        params = volume.manifest.params
        self.volume = volume
        self.name = volume.name
        self.size = params.size
        self.object_size = params.object_size
        self.persistent = persistent
        self.timeout = timeout
        self.readahead = readahead
        self._closed = False
        self._nowait_reads = True
        self._nowait_writes = True
        self._saving = threading.Lock()
        self._saved = -1
        self._epochs: list[int] = []
        #: Chunks read lately, oldest first (see _sequential).
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._recent_lock = threading.Lock()
        self._ahead: set[int] = set()
        self._trusted = False
        #: Figures for the metrics (see ``metrics``): plain ints bumped where the work is.
        self.cache_hits = 0
        self.cache_misses = 0
        self.evictions = 0
        self.downloaded_objects = 0
        self.downloaded_bytes = 0
        self.chunks = Chunks(cache_objects, self._evict, self._want_round, self._failure)
        self.chunks.remote = dict(volume.manifest.chunks)
        self.files = self._open_cache(cache_dir)
        try:
            self._start(volume, workers, flush_every)
        except BaseException:
            self.files.close(remove=False)
            raise

    def _start(self, volume: Volume, workers: int, flush_every: float) -> None:
        self._fetchers = ThreadPoolExecutor(max(1, workers), thread_name_prefix="usbd-objstore-get")
        self.uploader = Uploader(
            name=self.name,
            store=volume.store,
            codec=volume.codec,
            chunks=self.chunks,
            cache=self.files,
            manifest=volume.manifest,
            object_size=self.object_size,
            size=self.size,
            workers=workers,
            every=flush_every,
            settled=self._settled,
        )
        try:
            self._begin_epoch()
        except BaseException:
            self.uploader.close()
            self._fetchers.shutdown()
            raise
        recovered = len(self.chunks.dirty)
        if recovered:
            log.warning(
                "%s: %d object(s) written before the last stop were not in the bucket: "
                "uploading them now",
                self.name,
                recovered,
            )
        if recovered and not self.persistent:
            self._upload_recovered()
        self.uploader.start()
        volume.lease.keep(self._lost)
        threading.Thread(target=self._collect_garbage, name="usbd-objstore-gc", daemon=True).start()
        if recovered:
            self.uploader.request()

    # -- opening --------------------------------------------------------------------------

    def _open_cache(self, directory: Path) -> CacheFiles:
        """The cache, reconciled with the committed manifest (see ``_cache``)."""
        saved: SavedState | None = None
        if directory.exists():
            probe = CacheFiles(directory, self.size)
            saved = probe.load_state()
            keep = saved is not None and (
                self.persistent or (saved.clean and any(d for _g, d in saved.chunks.values()))
            )
            probe.close(remove=not keep)
            if not keep:
                saved = None
        cache = CacheFiles(directory, self.size)
        if saved is None:
            return cache
        manifest = self.volume.manifest
        dirty = [c for c, (_g, d) in saved.chunks.items() if d]
        problem = None
        if saved.volume != manifest.volume.hex() or saved.object_size != self.object_size:
            problem = "belongs to another volume of this name"
        elif manifest.epoch not in saved.epochs:
            problem = (
                f"is older than the bucket's volume, written by {manifest.writer.get('host', '?')}"
                f" pid {manifest.writer.get('pid', '?')} since"
            )
        elif manifest.seq < saved.seq:
            problem = (
                f"has seen commit {saved.seq}, but the bucket's manifest is commit {manifest.seq}"
                ": the bucket was rolled back or replaced"
            )
        if problem is not None:
            if dirty:
                cache.close(remove=False)
                raise CacheConflict(
                    f"the cache {directory} holds {len(dirty)} object(s) not in the bucket, but it "
                    f"{problem}: remove {directory} to open the bucket's copy (losing them)"
                )
            log.info("the cache %s %s: starting from an empty cache", directory, problem)
            cache.close(remove=True)
            return CacheFiles(directory, self.size)
        self._epochs = list(saved.epochs)
        self._trusted = saved.clean
        dropped = 0
        for chunk, (generation, is_dirty) in sorted(saved.chunks.items()):
            if is_dirty or (saved.clean and generation == manifest.chunks.get(chunk, 0)):
                self.chunks.add(chunk, dirty=is_dirty)
            else:
                dropped += 1
        # Everything else goes, listed or not: after an unclean stop the file can hold writes
        # to chunks the state never heard of (written after its last save), which would come
        # back as the chunk's content once it is next written without a fetch.
        self._punch_all_but(cache, sorted(self.chunks.held))
        if not saved.clean and dropped:
            log.info(
                "%s: not closed cleanly; %d cached object(s) dropped, %d dirty kept",
                directory,
                dropped,
                len(dirty),
            )
        return cache

    def _punch_all_but(self, cache: CacheFiles, kept: list[int]) -> None:
        start = 0
        for chunk in [*kept, self._chunk_count()]:
            end = chunk * self.object_size
            if end > start:
                cache.punch(start, min(end, self.size) - start)
            start = (chunk + 1) * self.object_size

    def _upload_recovered(self) -> None:
        """Without a persistent cache, dirty data found at open (left by a close that could
        not upload it) goes up before anything is served: this run's state is not kept."""
        uploader = self.uploader
        uploader.deadline = time.monotonic() + self.timeout
        try:
            with self._progress("uploading the recovered objects", self._dirty_bytes()) as shown:
                uploader.on_done = shown.advance
                done = uploader.round()
        finally:
            uploader.on_done = None
            uploader.deadline = None
        if not done or self.chunks.dirty:
            uploader.close()
            self._fetchers.shutdown()
            raise OpenError(
                f"the cache {self.files.directory} holds {len(self.chunks.dirty)} object(s) not "
                f"in the bucket and they could not be uploaded ({self.volume.store.where} does "
                "not take them): it is kept; start again once the store answers"
            )
        self._trusted = False
        self._save(sync=False, force=True)

    def _begin_epoch(self) -> None:
        """Commit a new epoch before anything is uploaded (it fences a previous writer and
        makes this run's keys new), recording it in the cache state first, so that a crash
        between the two still finds the cache valid."""
        volume = self.volume
        epoch = volume.manifest.epoch + 1
        self._epochs = [*self._epochs[-7:], volume.manifest.epoch, epoch]
        # Without a persistent cache, a recovered cache stays trusted (its state exact) until
        # its dirty data is committed, which happens before anything is served. With one,
        # writes come next and the state is exact no more.
        self._save(sync=False, force=True, clean=self._trusted and not self.persistent)
        try:
            manifest, _garbage = commit(
                volume.store,
                self.name,
                volume.codec,
                volume.manifest,
                {},
                epoch=epoch,
                writer=volume.me,
                deadline=time.monotonic() + self.timeout,
            )
        except Fenced as exc:
            raise OpenError(f"volume {self.name!r}: {exc}") from None
        except (StoreError, CommitUncertain) as exc:
            raise OpenError(f"volume {self.name!r}: could not commit a new epoch: {exc}") from None
        volume.manifest = manifest
        self.uploader.manifest = manifest
        self.uploader.committed_now()

    # -- chunk arithmetic -------------------------------------------------------------------

    def _span(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.object_size
        return start, min(self.object_size, self.size - start)

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(chunk, offset in chunk, length) for each chunk the range touches."""
        end = offset + length
        while offset < end:
            chunk, inside = divmod(offset, self.object_size)
            step = min(self.object_size - inside, end - offset)
            yield chunk, inside, step
            offset += step

    def _check(self) -> None:
        if self._closed:
            raise DeviceError(errno.ESHUTDOWN, f"volume {self.name!r} is closed")
        failure = self.uploader.failure
        if failure is not None:
            raise DeviceError(errno.EIO, f"volume {self.name!r}: {failure}")

    # -- fetching ---------------------------------------------------------------------------

    def _fetch(self, chunk: int, generation: int, deadline: float) -> bytes:
        key = data_key(self.name, chunk, generation)
        try:
            blob = self.volume.store.get(key, deadline=deadline)
            data = self.volume.codec.open(blob, Kind.DATA, chunk, generation, key)
        except IntegrityError as exc:
            log.error("%s", exc)  # noqa: TRY400 - the message says it all; no traceback
            raise DeviceError(errno.EIO, str(exc)) from None
        except StoreError as exc:
            log.error("cannot fetch %s: %s", key, exc)  # noqa: TRY400 - as above
            raise DeviceError(errno.EIO, f"cannot fetch {key}: {exc}") from None
        if len(data) != self._span(chunk)[1]:
            message = f"{key}: {len(data)} bytes, the chunk has {self._span(chunk)[1]}"
            log.error("%s", message)
            raise DeviceError(errno.EIO, message)
        self.downloaded_objects += 1
        self.downloaded_bytes += len(data)
        return data

    def _load(self, chunk: int, *, for_write: bool) -> bytes | None:
        """Bring ``chunk`` into the cache (or find it there, or being fetched by another).

        Returns the chunk's bytes if this call fetched them (cached or, when a reader found
        no room, not), else None: the chunk is held, or being fetched by another, or zeros,
        and the caller looks again. Called without the lock."""
        chunks = self.chunks
        with chunks.lock:
            while True:
                if chunk in chunks.held:
                    return None
                event = chunks.fetching.get(chunk)
                if event is not None:
                    mine = False
                    break
                generation = chunks.remote.get(chunk, 0)
                if generation == 0:
                    return None
                if chunks.has_room():
                    room = True
                elif for_write:
                    chunks.make_room(wait=True)  # waits for room, then look again
                    continue
                else:
                    room = chunks.make_room(wait=False)
                event = chunks.fetching[chunk] = threading.Event()
                mine = True
                break
        if not mine:
            event.wait(self.timeout + 5)
            return None
        fetched = False
        try:
            data = self._fetch(chunk, generation, time.monotonic() + self.timeout)
            if room:
                self.files.write(self._span(chunk)[0], data)
            fetched = True
        finally:
            with chunks.lock:
                del chunks.fetching[chunk]
                if fetched and room:
                    chunks.add(chunk)
                event.set()
                chunks.changed.notify_all()
        return data  # the reader needs no second read of what it just fetched

    # -- reads ----------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> BytesLike:
        self._check()
        pieces = list(self._pieces(offset, length))
        self._read_ahead(offset, length, pieces[-1][0])
        if len(pieces) == 1:
            return self._read_piece(*pieces[0])
        return b"".join(self._read_piece(*piece) for piece in pieces)

    def _read_piece(self, chunk: int, inside: int, length: int) -> bytes:
        chunks = self.chunks
        start = chunk * self.object_size + inside
        missed = False
        while True:
            with chunks.lock:
                slot = chunks.held.get(chunk)
                if slot is not None:
                    slot.pins += 1
                    chunks.touch(chunk, slot)
                elif chunk not in chunks.fetching and chunks.remote.get(chunk, 0) == 0:
                    return bytes(length)
            if slot is not None:
                if not missed:
                    self.cache_hits += 1
                try:
                    return self.files.read(start, length)
                finally:
                    with chunks.lock:
                        chunks.unpin(slot)
            if not missed:
                missed = True
                self.cache_misses += 1
            data = self._load(chunk, for_write=False)
            if data is not None:
                return (
                    data if inside == 0 and length == len(data) else data[inside : inside + length]
                )
            self._check()

    def try_read(self, offset: int, length: int) -> BytesLike | None:
        self._check()
        chunk, inside = divmod(offset, self.object_size)
        if not self._nowait_reads or inside + length > self.object_size:
            return None
        chunks = self.chunks
        with chunks.lock:
            slot = chunks.held.get(chunk)
            if slot is None:
                return None
            slot.pins += 1
            chunks.touch(chunk, slot)
        try:
            buffer = bytearray(length)
            got = os.preadv(self.files.data, [buffer], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            self._nowait_reads = False
            return None
        finally:
            with chunks.lock:
                chunks.unpin(slot)
        # Read-ahead from here too: once objects read ahead are cached, the stream's reads are
        # answered here, and only asking here keeps the next objects coming.
        self._read_ahead(offset, length, chunk)
        if got != length:
            return None
        self.cache_hits += 1
        return buffer

    def _sequential(self, offset: int, length: int) -> bool:
        """Whether reads look sequential: this one starts in or right after a chunk read
        recently. Chunks, not exact offsets: a client reading ahead with several requests
        in flight (fio's iodepth, the kernel's readahead) has them served by several threads
        in no set order, and an exact "began where the last one ended" test misses them."""
        first = offset // self.object_size
        last = (offset + length - 1) // self.object_size
        recent = self._recent
        with self._recent_lock:  # threads and the event loop both come here
            hit = first in recent or (first - 1) in recent
            for chunk in range(first, last + 1):
                recent[chunk] = None
                recent.move_to_end(chunk)
            while len(recent) > 4 * max(self.readahead, 1):
                recent.popitem(last=False)
        return hit

    def _read_ahead(self, offset: int, length: int, last: int) -> None:
        if not self._sequential(offset, length) or self.readahead <= 0:
            return
        chunks = self.chunks
        wanted = []
        with chunks.lock:
            for chunk in range(last + 1, min(last + 1 + self.readahead, self._chunk_count())):
                if (
                    chunk not in chunks.held
                    and chunk not in chunks.fetching
                    and chunk not in self._ahead
                    and chunks.remote.get(chunk, 0)
                ):
                    self._ahead.add(chunk)
                    wanted.append(chunk)
        for chunk in wanted:
            self._fetchers.submit(self._prefetch, chunk)

    def _chunk_count(self) -> int:
        return -(-self.size // self.object_size)

    def _dirty_bytes(self) -> int:
        with self.chunks.lock:
            return sum(self._span(chunk)[1] for chunk in self.chunks.dirty)

    def _progress(
        self, what: str, total: int | None, unit: Literal["B", "items"] = "B"
    ) -> AbstractContextManager[Progress]:
        return progress(
            f"{self.name}: {what}",
            total,
            unit=unit,
            every=PROGRESS_EVERY,
            bar=PROGRESS_BAR,
            stream=PROGRESS_STREAM,
        )

    def _prefetch(self, chunk: int) -> None:
        try:
            with self.chunks.lock:
                if not self.chunks.has_room() and not self.chunks.make_room(wait=False):
                    return
            self._load(chunk, for_write=False)
        except Exception as exc:
            log.debug("read-ahead of chunk %d: %s", chunk, exc)
        finally:
            with self.chunks.lock:
                self._ahead.discard(chunk)

    # -- writes -----------------------------------------------------------------------------

    def _pin_for_write(self, chunk: int, whole: bool) -> Slot:
        """The chunk's slot, pinned, once the chunk is held and safe to change: fetched first
        unless the write covers all of it, and copied to staging if a round needs it as it
        was."""
        chunks = self.chunks
        while True:
            self._check()
            with chunks.lock:
                slot = chunks.held.get(chunk)
                if slot is not None and slot.frozen is not Frozen.PENDING:
                    slot.pins += 1
                    chunks.touch(chunk, slot)
                    return slot
                if (
                    slot is None
                    and chunk not in chunks.fetching
                    and (whole or chunks.remote.get(chunk, 0) == 0)
                ):
                    if not chunks.has_room():
                        chunks.make_room(wait=True)
                        continue
                    # Its bytes in the cache file should be a hole already; make sure.
                    self.files.punch(*self._span(chunk))
                    slot = chunks.add(chunk)
                    slot.pins += 1
                    return slot
            if slot is not None:  # frozen for a round: keep its content for the round
                with slot.lock:
                    if slot.frozen is Frozen.PENDING:
                        self.files.stage(*self._span(chunk))
                        with chunks.lock:
                            slot.frozen = Frozen.STAGED
                continue
            self._load(chunk, for_write=True)

    def _done_writing(self, chunk: int, slot: Slot) -> None:
        with self.chunks.lock:
            self.chunks.mark_written(chunk, slot)
            self.chunks.unpin(slot)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        done = 0
        for chunk, inside, length in self._pieces(offset, len(data)):
            slot = self._pin_for_write(chunk, inside == 0 and length == self._span(chunk)[1])
            try:
                self.files.write(offset + done, data[done : done + length])
            finally:
                self._done_writing(chunk, slot)
            done += length

    def try_write(self, offset: int, data: memoryview) -> int:
        chunk, inside = divmod(offset, self.object_size)
        if not self._nowait_writes or inside + len(data) > self.object_size:
            return 0
        self._check()
        chunks = self.chunks
        with chunks.lock:
            slot = chunks.held.get(chunk)
            if slot is None or slot.frozen is Frozen.PENDING:
                return 0
            slot.pins += 1
            chunks.touch(chunk, slot)
        wrote = 0
        try:
            wrote = os.pwritev(self.files.data, [data], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            self._nowait_writes = False
        finally:
            with chunks.lock:
                if wrote:
                    chunks.mark_written(chunk, slot)
                chunks.unpin(slot)
        return wrote

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._zero_range(offset, length)

    def zero(self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool) -> None:
        # Zeroing is a hole in the cache and, for whole chunks, no object at all: always fast.
        self._zero_range(offset, length)

    def _zero_range(self, offset: int, length: int) -> None:
        self._check()
        chunks = self.chunks
        for chunk, inside, size in self._pieces(offset, length):
            whole = inside == 0 and size == self._span(chunk)[1]
            if whole:
                with chunks.lock:
                    if (
                        chunk not in chunks.held
                        and chunk not in chunks.fetching
                        and chunks.remote.get(chunk, 0) == 0
                    ):
                        continue  # zeros already, and nothing to delete
            slot = self._pin_for_write(chunk, whole)
            try:
                self.files.punch(chunk * self.object_size + inside, size)
            finally:
                self._done_writing(chunk, slot)

    # -- flush, extents, cache --------------------------------------------------------------

    def flush(self) -> None:
        self._check()
        if self.persistent:
            chunks = self.chunks
            chunks.flushes += 1
            began = chunks.flushes
            self._save(sync=True)
            # Every chunk dirty before this FLUSH began now holds acknowledged writes.
            chunks.acknowledged = max(chunks.acknowledged, began)
            return
        uploader = self.uploader
        start = time.monotonic()
        with self.chunks.lock:
            if not self.chunks.dirty:
                return
            # A round that cuts after this FLUSH arrived has every write before it. Give up
            # only when the store has taken nothing for the timeout: a slow store is waited
            # for (an EIO here would make ext4 abort its journal).
            target = uploader.cut + 1
            while uploader.committed < target and uploader.failure is None and not self._closed:
                stalled = time.monotonic() - max(start, uploader.last_progress)
                if stalled >= self.timeout:
                    break
                uploader.request()
                uploader.ended.wait(min(self.timeout - stalled, 1.0))
            committed = uploader.committed >= target
        self._check()
        if not committed:
            raise DeviceError(
                errno.EIO,
                f"FLUSH: the store took nothing for {self.timeout:.0f} s "
                f"({self.volume.store.where}); they stay in the cache and go up later",
            )

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._check()
        found: list[Extent] = []
        chunks = self.chunks
        with chunks.lock:
            for chunk, inside, size in self._pieces(offset, length):
                data = (
                    chunk in chunks.held
                    or chunk in chunks.fetching
                    or chunks.remote.get(chunk, 0) != 0
                )
                flags = ExtentFlag.DATA if data else _HOLE
                start = chunk * self.object_size + inside
                if found and found[-1].flags == flags:
                    last = found.pop()
                    found.append(Extent(last.offset, last.length + size, flags))
                else:
                    found.append(Extent(start, size, flags))
                if len(found) >= 1024:
                    break
        return found

    def cache(self, offset: int, length: int) -> None:
        self._check()
        for chunk, _inside, _size in self._pieces(offset, length):
            self._fetchers.submit(self._prefetch, chunk)

    # -- state, rounds, failures ------------------------------------------------------------

    def failed(self) -> str | None:
        """Fenced or lost the lease: the daemon stops with this (see ``Device.failed``)."""
        return self.uploader.failure

    def metrics(self) -> Mapping[str, float]:
        """The figures of ``usbd.objstore._metrics`` (read without locks, as asked)."""
        return figures(self)

    def _evict(self, chunk: int) -> None:
        """Called with the lock held: the chunk's bytes go (it is clean: the bucket has them)."""
        self.evictions += 1
        self.files.punch(*self._span(chunk))

    def _want_round(self) -> None:
        self.uploader.request()

    def _failure(self) -> str | None:
        if self._closed:
            return f"volume {self.name!r} is closing"
        uploader = getattr(self, "uploader", None)
        return uploader.failure if uploader is not None else None

    def _settled(self) -> None:
        if self.persistent:
            self._save(sync=True)

    def _lost(self, why: str) -> None:
        self.uploader.failure = f"lease lost: {why}"
        log.error("stopping writes to %s: %s", self.name, why)

    def _save(self, *, sync: bool, force: bool = False, clean: bool = False) -> None:
        """Sync the cache file (``sync``) and then save the state, if it changed."""
        with self._saving:
            chunks = self.chunks
            with chunks.lock:
                unchanged = chunks.epoch_of_state == self._saved
                version = chunks.epoch_of_state
                table = (
                    {}
                    if unchanged and not (force or clean)
                    else {
                        chunk: (chunks.remote.get(chunk, 0), slot.dirty)
                        for chunk, slot in chunks.held.items()
                    }
                )
            # The data after the snapshot: every chunk it lists as dirty then has its bytes
            # on disk before the state that names it is.
            if sync:
                self.files.sync()
            if unchanged and not (force or clean):
                return
            if not (self.persistent or clean or force) and not chunks.dirty:
                self._saved = version
                return
            self.files.save_state(
                SavedState(
                    self.volume.manifest.volume.hex(),
                    self._epochs,
                    self.uploader.manifest.seq,
                    clean,
                    table,
                    self.object_size,
                    self.size,
                )
            )
            self._saved = version

    def _collect_garbage(self) -> None:
        """Delete what a crashed or fenced run left in the bucket: objects of earlier epochs
        that the manifest does not name, and bases it no longer uses."""
        manifest = self.uploader.manifest
        store = self.volume.store
        named = {data_key(self.name, c, g) for c, g in manifest.chunks.items()}
        if manifest.base is not None:
            named.add(manifest.base["key"])
        doomed = []
        try:
            # A bucket of a large volume lists for minutes (1,000 keys a request): say so.
            with self._progress("listing the bucket for leftovers", None, "items") as listed:
                for key in store.list(f"{self.name}/data/", deadline=time.monotonic() + 600):
                    listed.advance()
                    generation = int(key.rsplit(".", 1)[1], 16)
                    if key not in named and generation >> 32 < manifest.epoch:
                        doomed.append(key)
                for key in store.list(f"{self.name}/meta/", deadline=time.monotonic() + 600):
                    listed.advance()
                    if key not in named and seq_of_base(key) <= manifest.seq:
                        doomed.append(key)
            if doomed:
                store.delete(doomed, deadline=time.monotonic() + 600)
                log.info("%s: deleted %d object(s) no commit names", self.name, len(doomed))
        except (StoreError, ValueError, IndexError) as exc:
            log.info("%s: cleanup of leftover objects stopped: %s", self.name, exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        uploader = self.uploader
        # Bounds the round under way too (its retries read the deadline), then close's own.
        uploader.deadline = time.monotonic() + CLOSE_TIMEOUT
        uploader.stop()
        self._fetchers.shutdown(wait=True, cancel_futures=True)
        try:
            total = self._dirty_bytes()
            if total:
                with self._progress("uploading before the stop", total) as shown:
                    uploader.on_done = shown.advance
                    while self.chunks.dirty and uploader.failure is None and uploader.round():
                        pass
        except Exception:
            log.exception("final upload of %s failed", self.name)
        finally:
            uploader.on_done = None
        uploader.close()
        with self.chunks.lock:
            left = len(self.chunks.dirty)
        keep = self.persistent or left > 0
        try:
            if keep:
                self._save(sync=True, clean=True)
        finally:
            self.files.close(remove=not keep)
            self.volume.lease.release()
            self.volume.store.close()
        if left and uploader.failure is not None:
            log.error(
                "%s: %d object(s) (%s) written after %s were not uploaded and never will be: "
                "the volume is another daemon's now (%s keeps them, but cannot be opened "
                "against the bucket's volume any more)",
                self.name,
                left,
                format_size(left * self.object_size),
                uploader.failure,
                self.files.directory,
            )
        elif left:
            log.warning(
                "%s: %d object(s) (%s) could not be uploaded and stay in %s: they go up when "
                "the volume is next opened",
                self.name,
                left,
                format_size(left * self.object_size),
                self.files.directory,
            )
        log.info(
            "%s: uploaded %s in objects this run", self.name, format_size(uploader.stored_bytes)
        )
