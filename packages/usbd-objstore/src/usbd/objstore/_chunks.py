"""Which chunks the cache holds, in what state, and who is using them: one lock, no I/O inside
except the punch that evicts.

The device is cut into chunks of ``object_size``; chunk ``c`` is object ``c`` in the bucket.
For every chunk the table knows its committed generation (``remote``; absent: the chunk is
zeros) and, for the chunks held in the cache, a :class:`Slot`:

* ``dirty``: the cache holds writes the bucket does not have;
* ``version``: bumped after every change lands in the cache, so that an upload round can tell
  whether what it uploaded is still the chunk's content (the Go original cleared its dirty
  flag before the upload and lost writes that raced it);
* ``pins``: reads and writes under way on the chunk's bytes, which keep it from eviction;
* ``frozen``: the chunk's part in an upload round: PENDING (the round will read it and a write
  must first copy it to staging), STAGED (copied), TAKEN (read), or NONE.

Eviction takes the least recently used clean, unpinned, unfrozen chunk. Dirty chunks are never
evicted: a writer that needs room when every chunk is dirty waits (``changed``) for an upload
round to clean some, and asks for one; it gives up with EIO only when the device has failed
for good (fenced) or is closing. A reader never waits for room: it is served from the fetched
object without caching it.

``dirty`` is the set of dirty chunks, kept alongside the slots so that nothing on the event
loop's path (a FLUSH's "anything to do?", a round's cut) has to walk every held chunk.

With a persistent cache a FLUSH is acknowledged before the upload. To tell which dirty chunks
hold writes a FLUSH has acknowledged (the metrics' ``not_in_bucket_bytes``) without walking
them at each FLUSH, a FLUSH only counts itself (``flushes`` when it begins, ``acknowledged``
once it is done) and a chunk records the count when it turns dirty (``Slot.since``): a dirty
chunk holds acknowledged writes if ``since < acknowledged``.
"""

from __future__ import annotations

import enum
import errno
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from usbd.core import DeviceError

__all__ = ["Chunks", "Frozen", "Slot"]


class Frozen(enum.IntEnum):
    NONE = 0
    PENDING = 1
    STAGED = 2
    TAKEN = 3


@dataclass(eq=False)
class Slot:
    """A chunk held in the cache."""

    dirty: bool = False
    version: int = 0
    pins: int = 0
    frozen: Frozen = Frozen.NONE
    #: ``Chunks.flushes`` when the chunk turned dirty (-1: dirty from a saved cache).
    since: int = 0
    #: Held while a round reads the chunk or a writer copies it to staging.
    lock: threading.Lock = field(default_factory=threading.Lock)


class Chunks:
    """The table. ``limit`` is how many chunks the cache may hold (None: all of them)."""

    def __init__(
        self,
        limit: int | None,
        evict: Callable[[int], None],
        wanted: Callable[[], None],
        failure: Callable[[], str | None],
    ) -> None:
        self.lock = threading.Lock()
        #: Notified when a slot may have become evictable or a fetch ended.
        self.changed = threading.Condition(self.lock)
        self.limit = limit
        self.remote: dict[int, int] = {}
        self.held: OrderedDict[int, Slot] = OrderedDict()
        self.dirty: set[int] = set()
        #: Chunks being fetched, each with the event set when its fetch ends.
        self.fetching: dict[int, threading.Event] = {}
        #: Bumped whenever what the state file records changes (held, dirty, generations).
        self.epoch_of_state = 0
        #: FLUSHes begun, and the count of the last one done (see the module's docstring).
        self.flushes = 0
        self.acknowledged = 0
        self._evict = evict
        self._wanted = wanted
        self._failure = failure

    # Everything below is called with ``lock`` held.

    def touch(self, chunk: int, slot: Slot) -> None:
        if self.limit is not None:
            self.held.move_to_end(chunk)

    def _victim(self) -> int | None:
        for chunk, slot in self.held.items():
            if not slot.dirty and slot.pins == 0 and slot.frozen is Frozen.NONE:
                return chunk
        return None

    def has_room(self) -> bool:
        return self.limit is None or len(self.held) + len(self.fetching) < self.limit

    def make_room(self, *, wait: bool) -> bool:
        """Evict until one more chunk fits; with ``wait``, wait for uploads to clean some if
        every held chunk is dirty or busy (asking for an upload round). False if there is no
        room and ``wait`` is false."""
        while not self.has_room():
            victim = self._victim()
            if victim is not None:
                self.drop(victim)
                self._evict(victim)
                continue
            if not wait:
                return False
            failure = self._failure()
            if failure is not None:
                raise DeviceError(errno.EIO, f"no room in the cache: {failure}")
            self._wanted()
            self.changed.wait(1.0)
        return True

    def add(self, chunk: int, *, dirty: bool = False) -> Slot:
        slot = Slot(dirty=dirty, since=-1 if dirty else 0)
        self.held[chunk] = slot
        if dirty:
            self.dirty.add(chunk)
        self.epoch_of_state += 1
        return slot

    def drop(self, chunk: int) -> None:
        """Forget a held chunk (evicted, or committed as zeros); the caller punches it."""
        del self.held[chunk]
        self.dirty.discard(chunk)
        self.epoch_of_state += 1

    def mark_written(self, chunk: int, slot: Slot) -> None:
        """A change to ``slot``'s chunk has landed in the cache."""
        slot.version += 1
        self.mark_dirty(chunk, slot)

    def mark_dirty(self, chunk: int, slot: Slot) -> None:
        if not slot.dirty:
            slot.dirty = True
            slot.since = self.flushes
            self.dirty.add(chunk)
            self.epoch_of_state += 1

    def mark_clean(self, chunk: int, slot: Slot) -> None:
        slot.dirty = False
        self.dirty.discard(chunk)
        self.epoch_of_state += 1

    def unpin(self, slot: Slot) -> None:
        slot.pins -= 1
        if slot.pins == 0 and self.limit is not None:
            self.changed.notify_all()
