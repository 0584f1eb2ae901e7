"""Write-behind: the WRITEs a ``try_write`` left, written by a thread while the loop receives.

A file's buffered writes are quick but may block (ext4 will not even try ``RWF_NOWAIT``), so
they must leave the event loop. A worker-thread call per request costs more than the write,
and a call per batch that the loop waits for leaves the loop unable to receive while the
thread writes, and the thread idle while the loop receives. A connection's
:class:`WriteBehind` runs one thread for the life of the connection instead: the loop hands
it a batch and goes back to receiving, and each round the thread takes everything handed
over since the last one, so rounds grow when writes are slow and one hand-off back covers
them all.

The object owns the whole mechanism, so the request loop only calls it at a few points:

* :meth:`defer` a write (or the rest of one) and :meth:`submit` the batch before anything
  else is dispatched, so that writes stay in the order received and a FLUSH that follows
  waits for them (:meth:`unfinished_before`);
* :meth:`collect` finished rounds between receives: their replies go to the connection's
  queue of replies;
* :meth:`pause` when the loop is about to wait and :meth:`resume` when it runs again;
* :meth:`make_room` before each receive, and :meth:`drain` / :meth:`aclose` at the end.

**Buffers.** Payloads are not copied: the thread writes from views into the connection's
:class:`~usbd.core.RequestBuffer`, which is pinned while a batch points into it. When the
next receive would overwrite such bytes, a spare buffer takes its place and the old one is
kept until the batches pointing into it are written. At most :data:`MAX_BUFFERS` exist per
connection, so a writer that falls behind stops the reading: backpressure.

**Waking the loop.** Handing a round back through the trio token costs the loop a wake-up,
a task switch and a drain of trio's wake-up socket, as much as a request. While the loop is
running it collects rounds itself before it next waits, so the thread only queues them. The
handshake that makes this safe lives in two places only, each writing its own side first
and reading the other side second, so that one of them always sees a finished round: the
thread (queue the round, then read the loop's flag) and :meth:`pause` (clear the flag, then
collect). Whatever :meth:`collect` takes while the loop waits is sent by this object's own
sender task (:meth:`run_sender`), since the loop is not there to send it.
"""

from __future__ import annotations

import collections
import logging
import mmap
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from ._constants import CMD_WRITE
from ._device import BytesLike
from ._execution import ContractError
from ._transmission import RequestBuffer, new_storage, simple_reply

__all__ = ["MAX_BUFFERS", "WriteBehind"]

log = logging.getLogger("usbd.core.engine")

#: Receive buffers a connection may have at once while the thread still writes from the
#: payloads in them (the one being received into included).
MAX_BUFFERS: Final = 4

#: One deferred WRITE: (cookie, offset, data).
_Write = tuple[int, int, memoryview]
#: A batch handed to the thread: its sequence number and its writes.
_Batch = tuple[int, list[_Write]]
#: A batch written: the batch and each write's exception (None when it succeeded).
_Finished = tuple[int, list[_Write], list[Exception | None]]


class WriteBehind:
    """One connection's writer thread and everything it holds.

    ``write`` is the device's write (called in the thread, one write at a time, in order);
    ``buffer`` the connection's receive buffer; ``out`` its queue of replies, to which each
    write's reply is added when its round is collected (``error_reply(cookie, exc)`` for one
    that failed); ``send``
    sends that queue (whoever is already sending picks up what was added); ``written`` is
    called on the event loop after rounds were collected (a FLUSH may be waiting for them).
    The thread starts with the first batch.
    """

    def __init__(
        self,
        write: Callable[[int, memoryview, bool], object],
        buffer: RequestBuffer,
        *,
        out: list[BytesLike],
        error_reply: Callable[[int, Exception], BytesLike],
        send: Callable[[], Awaitable[None]],
        written: Callable[[], None],
        name: str,
        observe: Callable[[int, float, int], None] | None = None,
    ) -> None:
        self._write = write
        self._buffer = buffer
        self._out = out
        self._error_reply = error_reply
        self._send = send
        self._written = written
        self._name = name
        # Latency, per round: (command, seconds, writes), as RequestStats.observe takes it.
        self._observe = observe
        self._deferred: list[_Write] = []
        #: Writes are deferred or being written: a later WRITE must follow them, in order.
        #: (An attribute, not a property: the fast path reads it for every WRITE.)
        self.active = False
        self._unfinished: collections.deque[int] = collections.deque()  # submitted, in order
        self._submitted: collections.deque[float] = collections.deque()  # when, for each
        self._handed_over = 0  # writes submitted and not yet collected
        self._written_upto = -1  # sequence number of the last batch collected
        self._lent = -1  # the last batch pointing into the buffer's current storage, or -1
        self._retired: collections.deque[tuple[int, mmap.mmap]] = collections.deque()
        self._spares: list[mmap.mmap] = []
        self._buffers = 1
        self._progress = trio.Event()  # set when rounds are collected
        self._wake = trio.Event()  # the sender has replies to send
        self._stopping = False  # the sender sends what is left and returns
        # Shared with the thread: it appends to _finished, then reads _loop_busy.
        self._finished: collections.deque[_Finished] = collections.deque()
        self._loop_busy = True
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token = trio.lowlevel.current_trio_token()

    # -- handing writes over ---------------------------------------------------------------

    @property
    def deferred(self) -> bool:
        """Writes are deferred and not yet handed over (:meth:`submit` has work)."""
        return bool(self._deferred)

    @property
    def pending(self) -> int:
        """Writes deferred or handed over and not yet answered (for the figures)."""
        return self._handed_over + len(self._deferred)

    @property
    def buffers(self) -> int:
        """Receive buffers this connection has had at once (at most :data:`MAX_BUFFERS`)."""
        return self._buffers

    def defer(self, cookie: int, offset: int, data: memoryview) -> None:
        """Leave a write (a view into the receive buffer) to the thread."""
        self._deferred.append((cookie, offset, data))
        self.active = True

    def submit(self, seq: int) -> None:
        """Hand the writes deferred so far to the thread as batch ``seq`` (if there are any);
        until it is written, the receive buffer's bytes stay where they are."""
        if not self._deferred:
            return
        if self._thread is None:
            # A daemon only so that the process can still exit should the event loop die
            # without closing the connection; a connection's end always joins it (aclose).
            thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            thread.start()  # RuntimeError if no thread can be had: this connection ends
            self._thread = thread
        self._queue.put((seq, self._deferred))
        self._handed_over += len(self._deferred)
        self._deferred = []
        self._unfinished.append(seq)
        self._submitted.append(time.perf_counter())
        self._lent = seq
        self._buffer.pin()

    def unfinished_before(self, seq: int) -> bool:
        """True while a batch handed over before request ``seq`` is not written yet."""
        return bool(self._unfinished) and self._unfinished[0] < seq

    # -- the loop's side of the hand-back --------------------------------------------------

    def resume(self) -> None:
        """The loop runs again: it will :meth:`collect` before it next waits."""
        self._loop_busy = True

    def pause(self) -> None:
        """The loop is about to wait: from now on the thread wakes it for finished rounds.
        Clearing the flag first and collecting second is half of the handshake; the sender
        sends what was collected, since the loop will not."""
        self._loop_busy = False
        self._poked()

    def collect(self) -> bool:
        """On the event loop: take in the rounds the thread finished, queue their replies,
        and give back the buffers nothing points into any more. True if there were any."""
        finished = self._finished
        if not finished:
            return False
        out, error_reply, unfinished = self._out, self._error_reply, self._unfinished
        observe, now = self._observe, time.perf_counter()
        last = -1
        for _ in range(len(finished)):
            last, writes, results = finished.popleft()
            for (cookie, _, _), error in zip(writes, results, strict=True):
                out.append(simple_reply(cookie) if error is None else error_reply(cookie, error))
            unfinished.popleft()
            self._handed_over -= len(writes)
            submitted = self._submitted.popleft()
            if observe is not None:
                observe(CMD_WRITE, now - submitted, len(writes))
        self._written_upto = last
        self.active = bool(self._deferred or unfinished)
        while self._retired and self._retired[0][0] <= last:
            self._spares.append(self._retired.popleft()[1])
        self._progress.set()
        self._written()
        return True

    def _poked(self) -> None:
        """On the event loop while the loop waits (called from the thread, or by
        :meth:`pause`): collect, and have the sender send the replies."""
        if self.collect():
            self._wake.set()

    async def run_sender(self) -> None:
        """Send the replies of rounds collected while the loop waits, until :meth:`drain`
        says it is over: it is never cancelled in the middle of a send, which would lose
        (or cut in half) the replies it had taken."""
        while not self._stopping:
            await self._wake.wait()
            self._wake = trio.Event()
            await self._send()

    # -- buffers ---------------------------------------------------------------------------

    async def make_room(self) -> None:
        """Before a receive: make sure it cannot overwrite bytes the thread still needs.

        Once the thread is done with the buffer it is reused in place; before the buffer
        would move or overwrite what it still needs, a spare takes its place (waiting for one
        if the thread holds them all)."""
        buffer = self._buffer
        if self._lent < 0:
            return
        if self._lent > self._written_upto and buffer.better_swapped():
            spare = await self._spare(buffer.capacity)
            if self._lent > self._written_upto:  # still in use: receive into the spare
                self._retired.append((self._lent, buffer.swap(spare)))
                self._lent = -1
                return
            self._spares.append(spare)  # the thread finished with it while we waited
        if self._lent <= self._written_upto:
            buffer.unpin()
            self._lent = -1

    async def _spare(self, size: int) -> mmap.mmap:
        while not self._spares:
            if self._buffers < MAX_BUFFERS:
                self._buffers += 1
                return new_storage(size)
            await self._wait_for_progress()
        return self._spares.pop()

    async def _wait_for_progress(self) -> None:
        """Wait until the thread finishes a round (the loop waits: it must be woken)."""
        self._progress = trio.Event()
        self.pause()
        if not self._progress.is_set():
            await self._send()  # what was collected so far: the client may be waiting for it
            await self._progress.wait()
        self.resume()

    # -- the end ---------------------------------------------------------------------------

    async def drain(self) -> None:
        """At the end of the stream: wait until every batch handed over is written, then
        have the sender send what is left and return (the connection's nursery waits for
        it, so a send it is in the middle of completes)."""
        while self._unfinished:
            await self._wait_for_progress()
        self._stopping = True
        self._wake.set()

    async def aclose(self, seq: int) -> None:
        """Write whatever is still deferred (as batch ``seq``: the connection may have ended
        on an error before it could submit) and everything queued, end the thread and let
        the buffers go. Waits for the thread: a device that hangs in a write keeps the
        connection from ending, as a hung worker thread would."""
        try:
            self.submit(seq)
        except RuntimeError as exc:  # no thread: these writes were never acknowledged
            log.error("%s: %d writes not written: %s", self._name, len(self._deferred), exc)  # noqa: TRY400
        if self._thread is not None:
            self._queue.put(None)
            await trio.to_thread.run_sync(self._thread.join)
            self._thread = None
        self._spares.clear()
        self._retired.clear()

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        get, get_nowait, write = self._queue.get, self._queue.get_nowait, self._write
        while True:
            batches = [get()]
            while True:
                try:
                    batches.append(get_nowait())
                except queue.Empty:
                    break
            finished: list[_Finished] = []
            for batch in batches:
                if batch is None:
                    break
                seq, writes = batch
                results: list[Exception | None] = []
                for _, offset, data in writes:
                    try:
                        write(offset, data, False)
                    except Exception as exc:
                        results.append(exc)
                    except BaseException as exc:  # reported like any failure: never lost
                        results.append(ContractError(f"device write raised {exc!r}"))
                    else:
                        results.append(None)
                finished.append((seq, writes, results))
            if finished:
                # The thread's half of the handshake: queue the round, then read the flag.
                self._finished.extend(finished)
                if not self._loop_busy:
                    self._token.run_sync_soon(self._poked)
            if len(finished) < len(batches):  # the end was queued
                return
