"""What an export's requests add up to: counts, bytes, errors and latency, as plain numbers.

The request loop keeps these itself, as list items it increments, because anything more (a
prometheus-client ``Counter``, which takes a lock per increment; a clock read per request)
would cost the fast path as much as some requests do. Nothing reads them until someone asks
(:class:`usbd.core._monitor.Monitor`, at a scrape, a status refresh or SIGUSR1), from
whichever thread: a list item is read whole under the GIL, so a reader sees each figure as
it was at one moment, if not all of them at the same one.

Latency is the time from a request's dispatch to its reply being ready: the device's work,
and for a FLUSH the wait for the writes before it; not the network. The general path times
every request. The fast path times one request in :data:`SAMPLE_EVERY` and counts it that
many times, so the histogram still estimates every request (a clock read costs a fast-path
request about a tenth of its time). Writes left to a connection's writer thread are timed
per round, from hand-over to collection.
"""

from __future__ import annotations

import bisect
from typing import Final

from ._constants import CMD_COUNT

__all__ = ["LATENCY_BOUNDS", "SAMPLE_EVERY", "RequestStats"]

#: Upper bounds (seconds) of the latency histogram's buckets: from a RAM disk's microseconds
#: to an object store's seconds. One more bucket holds everything slower (+Inf).
LATENCY_BOUNDS: Final = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: The fast path times one request in this many.
SAMPLE_EVERY: Final = 16


class RequestStats:
    """One export's figures, over every connection (network clients and the kernel's)."""

    def __init__(self) -> None:
        #: Requests received, by command number (refused ones included).
        self.requests = [0] * CMD_COUNT
        #: Bytes requests covered, by command number: read, written, trimmed, zeroed...
        self.bytes = [0] * CMD_COUNT
        #: Replies with an error, by NBD errno (EIO 5, EINVAL 22...).
        self.errors: dict[int, int] = {}
        #: Per command: a count per bucket of LATENCY_BOUNDS, the last for +Inf.
        self.latency = [[0] * (len(LATENCY_BOUNDS) + 1) for _ in range(CMD_COUNT)]
        #: Per command: the sum of the latencies counted, in seconds.
        self.latency_sum = [0.0] * CMD_COUNT
        #: Connections that ever reached the transmission phase (those open now are the
        #: export's :attr:`~usbd.core.Export.connections`).
        self.connections_total = 0

    def observe(self, command: int, seconds: float, weight: int = 1) -> None:
        """Count ``weight`` requests of ``command`` that each took ``seconds``."""
        if command >= CMD_COUNT:
            return
        self.latency[command][bisect.bisect_left(LATENCY_BOUNDS, seconds)] += weight
        self.latency_sum[command] += seconds * weight

    def error(self, code: int) -> None:
        """A reply carried NBD errno ``code``."""
        self.errors[code] = self.errors.get(code, 0) + 1
