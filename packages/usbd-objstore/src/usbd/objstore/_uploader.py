"""Upload rounds: the one mechanism that moves dirty chunks to the bucket and commits them.

A round, in the uploader's thread:

1. **Cut.** Under the table's lock, every dirty chunk is frozen (PENDING) with its version. From
   here on, a write to a frozen chunk first copies the chunk to staging, so the round uploads
   every chunk as it was at the cut: the round's image is the device at one moment, writes in
   flight at the cut aside (as in a crash at that moment).
2. **Upload.** ``concurflush`` at a time: read the chunk (from staging if a write copied it),
   and PUT it under a new key (chunk, generation); an all-zero chunk is not uploaded, the
   manifest drops it instead. Transient errors are retried until the store is back.
3. **Commit.** One conditional PUT of the manifest publishes the whole round.
4. **Settle.** Chunks whose version did not move since the cut are clean; the superseded
   objects are deleted; the cache state is saved (persistent cache).

Rounds run every ``flush_every`` seconds, when a FLUSH without a persistent cache asks (it then
waits for a round that cut after it arrived), when writers wait for room, and at close.

The uploader keeps its figures for the metrics as plain attributes (``uploaded_*``, ``queued``,
``commits``, ``last_commit``), bumped where the work is done; the pool's threads bump theirs
under the lock they already take for the generation counter.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from usbd.core import DeviceError

from ._cache import CacheFiles
from ._chunks import Chunks, Frozen, Slot
from ._codec import Codec, Kind
from ._manifest import CommitUncertain, Fenced, Manifest, commit, data_key, settle_uncertain
from ._store import ObjectStore, StoreError

__all__ = ["Uploader"]

log = logging.getLogger("usbd.objstore")


class Uploader:
    """Owns the upload thread, its pool, the manifest it commits, and the round counters."""

    def __init__(
        self,
        *,
        name: str,
        store: ObjectStore,
        codec: Codec,
        chunks: Chunks,
        cache: CacheFiles,
        manifest: Manifest,
        object_size: int,
        size: int,
        workers: int,
        every: float,
        settled: Callable[[], None],
    ) -> None:
        self.name = name
        self.store = store
        self.codec = codec
        self.chunks = chunks
        self.cache = cache
        self.manifest = manifest
        self.object_size = object_size
        self.size = size
        self.every = every
        self._settled = settled
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="usbd-objstore-put")
        self._wake = threading.Event()
        self._stop = threading.Event()
        #: Rounds cut, and the last round whose commit ended (successfully or not).
        self.cut = 0
        self.done = 0
        self.committed = 0
        self.ended = threading.Condition(chunks.lock)
        #: Set for good when the volume was fenced or a commit failed for a reason that
        #: retrying cannot fix; every write and flush then fails.
        self.failure: str | None = None
        #: Store calls' deadline while closing (None: retry until the store is back); read
        #: before each retry, so setting it also bounds the calls under way.
        self.deadline: float | None = None
        self._counter = 0
        self._counting = threading.Lock()
        #: Objects and device bytes uploaded (zeros are not), and bytes as stored (compressed,
        #: encrypted): what was sent.
        self.uploaded_objects = 0
        self.uploaded_bytes = 0
        self.stored_bytes = 0
        #: Objects of the round under way not yet uploaded (0 between rounds).
        self.queued = 0
        #: Manifests committed this run (the epoch's at open included), and when the last one
        #: was (time.time(); 0: none yet).
        self.commits = 0
        self.last_commit = 0.0
        #: Called with the device bytes of each chunk of a round once it is done (uploaded, or
        #: found to be zeros): close's progress.
        self.on_done: Callable[[int], None] | None = None
        #: A commit that raised without saying whether it landed (see _commit).
        self._uncertain: Manifest | None = None
        #: When a store call last succeeded: a FLUSH gives up only when nothing has moved
        #: for its timeout, not when the store is merely slow.
        self.last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="usbd-objstore-upload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request(self) -> None:
        """Ask for a round soon (called with or without the table's lock)."""
        self._wake.set()

    def _deadline(self) -> float | None:
        return self.deadline

    def _generation(self) -> int:
        with self._counting:  # uploads run in the pool's threads
            self._counter += 1
            counter = self._counter
        if counter >= 1 << 32:
            raise DeviceError(errno.EIO, "this run made 2^32 uploads: restart to take a new epoch")
        return (self.manifest.epoch << 32) | counter

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.every if self.every > 0 else None)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                if not self.round() and self.failure is None:
                    time.sleep(0.5)  # a round that failed fast is not retried in a spin
            except Exception:
                log.exception("upload round failed")

    def round(self) -> bool:
        """One round (cut, upload, commit, settle); True if everything it cut is committed.
        Rounds run one at a time: the thread's, or at close the caller's after the thread
        stopped."""
        chunks = self.chunks
        with chunks.lock:
            cut = [(c, chunks.held[c], chunks.held[c].version) for c in sorted(chunks.dirty)]
            for _chunk, slot, _version in cut:
                slot.frozen = Frozen.PENDING
            self.cut += 1
            self.queued = len(cut)
            number = self.cut
        committed = False
        try:
            if not cut or self.failure is not None:
                committed = not cut
                return committed
            changes = self._upload_all(number, cut)
            if changes is None:
                return False
            garbage = self._commit(number, changes)
            if garbage is None:
                return False
            committed = True
            with chunks.lock:
                for chunk, slot, version in cut:
                    generation = changes[chunk]
                    if generation:
                        chunks.remote[chunk] = generation
                    else:
                        chunks.remote.pop(chunk, None)
                    if slot.version == version:
                        chunks.mark_clean(chunk, slot)
                        if not generation and slot.pins == 0:
                            # All zeros: nothing to keep, and a hole again for block status.
                            chunks.drop(chunk)
                            self.cache.punch(*self._span(chunk))
            self._progress()
            try:
                self._settled()
            except Exception:
                # The state file still calls these chunks dirty: they must not be evicted
                # (a restart would take the hole for their data), so they stay dirty here too
                # and go up again with the next round.
                log.exception("saving the cache state after round %d failed", number)
                with chunks.lock:
                    for chunk, slot, _version in cut:
                        if chunks.held.get(chunk) is slot:
                            chunks.mark_dirty(chunk, slot)
            if garbage:
                try:
                    self.store.delete(garbage, deadline=time.monotonic() + 30)
                except StoreError as exc:
                    log.info("superseded objects left for the next open's cleanup: %s", exc)
            return True
        finally:
            with chunks.lock:
                for chunk, slot, _version in cut:
                    if slot.frozen is Frozen.STAGED:
                        self.cache.punch(*self._span(chunk), staged=True)
                    slot.frozen = Frozen.NONE
                self.done = number
                self.queued = 0
                if committed:
                    self.committed = number
                self.ended.notify_all()
                chunks.changed.notify_all()
            if cut and committed:
                log.debug("round %d committed %d chunk(s)", number, len(cut))

    def _upload_all(self, number: int, cut: list[tuple[int, Slot, int]]) -> dict[int, int] | None:
        """Every chunk of the cut uploaded: chunk -> generation (0: zeros), or None."""
        futures = [self._pool.submit(self._upload, c, slot) for c, slot, _v in cut]
        changes: dict[int, int] = {}
        failed: BaseException | None = None
        for (chunk, _slot, _version), future in zip(cut, futures, strict=True):
            try:
                changes[chunk] = future.result()
            except BaseException as exc:
                failed = failed or exc
        if failed is not None:
            log.warning("upload round %d stopped: %s", number, failed)
            return None
        return changes

    def _commit(self, number: int, changes: dict[int, int]) -> list[str] | None:
        """Publish the round; the keys it supersedes, or None if it is not committed."""
        try:
            if self._uncertain is not None:
                # The last commit may have landed: find out before building on it.
                self.manifest = settle_uncertain(
                    self.store, self.name, self.manifest, self._uncertain, self._deadline
                )
                self._uncertain = None
            self.manifest, garbage = commit(
                self.store, self.name, self.codec, self.manifest, changes, deadline=self._deadline
            )
        except Fenced as exc:
            self.failure = f"fenced: {exc}"
            log.error("stopping writes to %s: %s", self.name, self.failure)  # noqa: TRY400
            return None
        except CommitUncertain as exc:
            self._uncertain = exc.attempt
            log.warning("commit of round %d may not have landed: %s", number, exc)
            return None
        except StoreError as exc:
            log.warning("commit of round %d failed: %s", number, exc)
            return None
        self.committed_now()
        return garbage

    def committed_now(self) -> None:
        """A manifest was committed (a round's, or the device's new epoch)."""
        self.commits += 1
        self.last_commit = time.time()

    def _progress(self) -> None:
        self.last_progress = time.monotonic()

    def _span(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.object_size
        return start, min(self.object_size, self.size - start)

    def _upload(self, chunk: int, slot: Slot) -> int:
        """PUT the chunk as it was at the cut; its new generation (0: it is all zeros)."""
        start, length = self._span(chunk)
        with slot.lock:
            data = self.cache.read(start, length, staged=slot.frozen is Frozen.STAGED)
            with self.chunks.lock:
                slot.frozen = Frozen.TAKEN if slot.frozen is Frozen.PENDING else slot.frozen
        if _zero(data):
            self._done(length)
            return 0
        generation = self._generation()
        blob = self.codec.seal(Kind.DATA, chunk, generation, data)
        self.store.put(data_key(self.name, chunk, generation), blob, deadline=self._deadline)
        self._progress()
        with self._counting:
            self.uploaded_objects += 1
            self.uploaded_bytes += length
            self.stored_bytes += len(blob)
        self._done(length)
        return generation

    def _done(self, length: int) -> None:
        with self._counting:
            self.queued = max(0, self.queued - 1)
        report = self.on_done
        if report is not None:
            report(length)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


_ZERO_PAGE = bytes(1 << 20)


def _zero(data: bytes) -> bool:
    view = memoryview(data)
    for start in range(0, len(view), len(_ZERO_PAGE)):
        piece = view[start : start + len(_ZERO_PAGE)]
        if piece != _ZERO_PAGE[: len(piece)]:
            return False
    return True
