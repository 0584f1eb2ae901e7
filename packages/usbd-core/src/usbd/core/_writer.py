"""A connection's writer thread: WRITEs that could not be done on the event loop, in order.

A file's buffered writes are quick but may block (ext4 will not even try ``RWF_NOWAIT``), so
they must leave the event loop. A worker-thread call per request costs more than the write,
and a call per batch that the loop waits for leaves the loop unable to receive while the
thread writes, and the thread idle while the loop receives. This thread runs for the life of
the connection instead: the loop queues a batch and goes back to receiving, and each round
the thread takes everything queued since the last one, so rounds grow when writes are slow
and one hand-off back to the loop covers them all.

Handing a round back through the trio token costs the loop a wake-up, a task switch and a
drain of trio's wake-up socket, as much as a request. While the loop is busy receiving it
looks at :attr:`Writer.finished` itself before it next waits, and says so in
:attr:`Writer.loop_busy`; the thread then only queues the round. Both sides write their own
flag or queue first and read the other's second, so one of them always sees the round.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable

import trio

__all__ = ["Batch", "Finished", "Writer"]

#: One queued batch: its sequence number and (cookie, offset, data) per WRITE.
Batch = tuple[int, list[tuple[int, int, memoryview]]]
#: A batch written: the batch and each write's exception (None when it succeeded).
Finished = tuple[int, list[tuple[int, int, memoryview]], list[Exception | None]]


class Writer:
    """Write batches in a thread of its own, in the order queued.

    Finished batches go to :attr:`finished`, in order; unless :attr:`loop_busy` is set,
    ``poke`` is then called on the event loop's thread (through the trio token) to take them.
    It must not raise.
    """

    def __init__(
        self,
        write: Callable[[int, memoryview, bool], object],
        poke: Callable[[], None],
        name: str,
    ) -> None:
        self._write = write
        self._poke = poke
        #: Batches written, oldest first; the loop takes them (``popleft``).
        self.finished: collections.deque[Finished] = collections.deque()
        #: Set by the loop while it will look at :attr:`finished` before it next waits.
        self.loop_busy = False
        self._token = trio.lowlevel.current_trio_token()
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        # A daemon thread: a device that hangs in a write must not keep the process alive.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, seq: int, writes: list[tuple[int, int, memoryview]]) -> None:
        self._queue.put((seq, writes))

    async def aclose(self) -> None:
        """Let the thread write what is queued, then wait for it to end."""
        self._queue.put(None)
        await trio.to_thread.run_sync(self._thread.join)

    def _run(self) -> None:
        get, get_nowait, write = self._queue.get, self._queue.get_nowait, self._write
        while True:
            batches = [get()]
            while True:
                try:
                    batches.append(get_nowait())
                except queue.Empty:
                    break
            finished: list[Finished] = []
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
                    else:
                        results.append(None)
                finished.append((seq, writes, results))
            if finished:
                self.finished.extend(finished)
                if not self.loop_busy:
                    self._token.run_sync_soon(self._poke)
            if len(finished) < len(batches):  # the end was queued
                return
