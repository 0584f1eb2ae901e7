"""Progress of long work (listing a large bucket, uploading at shutdown, a store's check, growing
a file): a bar on a terminal, a log line every few seconds otherwise.

A daemon started by hand shows a tqdm bar on its standard error; under systemd, in a pipe or
a test, a bar would be noise in the journal, so the same calls log one line every
:data:`LOG_EVERY` seconds instead (``uploading: 1.2 GiB of 4 GiB (30%), 85 MiB/s``) and one
at the end, through the ``usbd`` logger. Work that ends within the first interval logs
nothing but that last line, and only when it took a second or more, and a bar appears only
after a second: a quick start stays quiet.

tqdm rather than a hand-written bar: it sizes itself to the terminal, redraws at a bounded
rate whatever the update rate, and formats byte units and rates; rich would bring a whole
rendering stack for one line.

Updates may come from any thread (an uploader pool): :meth:`Progress.advance` takes a lock.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Literal, Never

from tqdm import tqdm

from ._sizes import format_size

__all__ = ["LOG_EVERY", "Progress", "progress"]

log = logging.getLogger("usbd")

#: Seconds between log lines when there is no terminal.
LOG_EVERY = 10.0
#: Work shorter than this logs no final line either.
_QUIET_UNDER = 1.0

Unit = Literal["B", "items"]


class Progress:
    """One piece of long work: ``advance`` as it goes, ``close`` at the end (or use
    :func:`progress`). ``total`` may be None when unknown (objects listed so far); ``every``
    is the seconds between log lines (default :data:`LOG_EVERY`)."""

    def __init__(
        self,
        what: str,
        total: int | None = None,
        *,
        unit: Unit = "items",
        stream: IO[str] | None = None,
        bar: bool | None = None,
        every: float | None = None,
        logger: logging.Logger = log,
    ) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.done = 0
        self._log = logger
        # Read now, not when the function was defined: a test may set LOG_EVERY.
        self._every = every = LOG_EVERY if every is None else every
        self._lock = threading.Lock()
        self._start = self._last = time.monotonic()
        self._logged = False
        out = sys.stderr if stream is None else stream
        if bar is None:
            bar = _is_terminal(out)
        self._bar: tqdm[Never] | None = None
        if bar:
            self._bar = tqdm(
                total=total,
                desc=what,
                unit="B" if unit == "B" else " " + unit,
                unit_scale=unit == "B",
                unit_divisor=1024,
                file=out,
                leave=False,
                dynamic_ncols=True,
                mininterval=min(every, 0.1),  # tqdm's own rate, or faster when asked
                # Quick work stays quiet on a terminal too (no flash of an empty bar); a
                # caller asking for output at every step (every=0) gets it at once.
                delay=min(every, _QUIET_UNDER),
            )

    def advance(self, amount: int = 1) -> None:
        """``amount`` more done (bytes, or items)."""
        with self._lock:
            self.done += amount
            if self._bar is not None:
                self._bar.update(amount)
                return
            now = time.monotonic()
            if now - self._last >= self._every:
                self._last = now
                self._logged = True
                self._log.info("%s: %s", self.what, self._describe(now))

    def set_total(self, total: int | None) -> None:
        """The total, once it is known (or changes)."""
        with self._lock:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def close(self, outcome: str = "done") -> None:
        """End the bar; log the last line (unless the work was short and logged nothing)."""
        with self._lock:
            now = time.monotonic()
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if self._logged or now - self._start >= _QUIET_UNDER:
                self._log.info(
                    "%s: %s, %s in %.1f s", self.what, outcome, self._amount(), now - self._start
                )

    def _amount(self) -> str:
        return format_size(self.done) if self.unit == "B" else str(self.done)

    def _describe(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        if self.unit == "B":
            text = format_size(self.done)
            if self.total:
                text += f" of {format_size(self.total)}"
            speed = f"{format_size(int(rate))}/s"
        else:
            text = str(self.done)
            if self.total:
                text += f" of {self.total}"
            speed = f"{rate:.0f}/s"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        return f"{text}, {speed}"


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream: no bar
        return False


@contextmanager
def progress(
    what: str,
    total: int | None = None,
    *,
    unit: Unit = "items",
    stream: IO[str] | None = None,
    bar: bool | None = None,
    every: float | None = None,
    logger: logging.Logger = log,
) -> Iterator[Progress]:
    """``with progress("uploading", total, unit="B") as p: ... p.advance(n)``: closed
    whatever happens; an exception is logged as the outcome "stopped"."""
    work = Progress(what, total, unit=unit, stream=stream, bar=bar, every=every, logger=logger)
    try:
        yield work
    except BaseException:
        work.close("stopped")
        raise
    work.close()
