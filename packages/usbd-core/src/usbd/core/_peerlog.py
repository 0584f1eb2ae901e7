"""Logging what network peers do wrong without letting a hostile one flood the log.

A fuzzer, a port scanner or a client stuck in a reconnect loop can fail a handshake hundreds
of times a second; one WARNING line each (as the server once wrote) buries everything else
and fills the disk. nbdkit keeps such detail at debug level. Here each kind of event
(handshake failures, refusals, timeouts, protocol errors, ...) is logged in full a few times
per interval (:data:`BURST` per :data:`INTERVAL` seconds); beyond that each one goes to
DEBUG only, and once the interval is over a single line at the kind's level counts what was
held back: "37 more handshake failures in the last 60 s". The limits are per kind and
shared by every peer: a per-peer table would itself be something many peers could grow.

:class:`PeerLog` holds no I/O and reads the time from a clock it is given, so it is tested
by calling it. :meth:`PeerLog.run` is the one trio task it needs: it writes the summary of
an interval that ended with no event after it (else the summary would wait for the next
event, which may never come).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

__all__ = ["BURST", "INTERVAL", "PeerLog"]

#: Events of one kind logged in full per interval before the rest go to DEBUG.
BURST = 5
#: Seconds over which events are counted; also the longest a summary waits.
INTERVAL = 60.0


@dataclass
class _Kind:
    level: int
    seen: int = 0
    held: int = 0  # seen beyond the burst: logged at DEBUG only, to be counted in a summary


class PeerLog:
    """Rate-limited log lines about peers, with counts of what was held back.

    ``kind`` names the event in the plural, as the summary line reads it ("handshake
    failures"); every call for one kind should use the same level.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = BURST,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}
        self._started = clock()
        #: Every event ever reported, per kind (for tests and statistics).
        self.totals: dict[str, int] = {}

    def event(self, kind: str, level: int, message: str, *args: object) -> None:
        """Log one event of ``kind`` at ``level``, or at DEBUG once the burst is spent."""
        self._roll()
        entry = self._kinds.get(kind)
        if entry is None:
            entry = self._kinds[kind] = _Kind(level)
        entry.level = max(entry.level, level)
        entry.seen += 1
        self.totals[kind] = self.totals.get(kind, 0) + 1
        if entry.seen <= self.burst:
            self.logger.log(level, message, *args)
            if entry.seen == self.burst:
                self.logger.log(
                    level,
                    "further %s are logged at debug level for the next %d s (with a count)",
                    kind,
                    self._left(),
                )
        else:
            entry.held += 1
            self.logger.debug(message, *args)

    def flush(self) -> None:
        """End the current interval now: one summary line per kind with events held back."""
        elapsed = self._clock() - self._started
        for kind, entry in self._kinds.items():
            if entry.held:
                self.logger.log(
                    entry.level, "%d more %s in the last %d s", entry.held, kind, round(elapsed)
                )
        self._kinds.clear()
        self._started = self._clock()

    async def run(self) -> None:
        """Write each interval's summary when it ends, event or not; until cancelled."""
        try:
            while True:
                await trio.sleep(max(0.0, self._started + self.interval - self._clock()))
                self._roll()
        finally:
            self.flush()  # what the last, unfinished interval held back is counted too

    def _roll(self) -> None:
        if self._clock() - self._started >= self.interval:
            self.flush()

    def _left(self) -> int:
        return max(0, round(self._started + self.interval - self._clock()))
