"""What a driver measures, declared once: the figures behind ``--metrics``, status and SIGUSR1.

A driver lists its metrics in :attr:`usbd.core.driver.Driver.metrics`, and its device returns
their current values from :meth:`usbd.core.Device.metrics`. The daemon reads them only when
someone asks: a Prometheus scrape (``--metrics``), the status file that ``usbdsrvd status``
reads (refreshed every few seconds), SIGUSR1. So measuring costs the device nothing but the
figures it keeps anyway, and the declaration, not a running daemon, is what the metrics
reference in docs/operations.md is generated from.

Names follow Prometheus' conventions, with the driver's name in front:
a gauge ``dirty_bytes`` of driver ``objstore`` is exposed as ``usbd_objstore_dirty_bytes``, a
counter ``uploaded_bytes`` as ``usbd_objstore_uploaded_bytes_total`` (the ``_total`` is added;
do not write it). Base units only, and the unit ends the name (``_bytes``, ``_seconds``,
``_ratio``; a point in time is ``_timestamp_seconds``, seconds since the epoch): that suffix is
also how ``usbdsrvd status`` and the SIGUSR1 line format a value (``12.5 MiB``, ``2.00``, ``41 s
ago``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ._sizes import format_size

__all__ = ["Metric", "MetricKind", "counter", "format_value", "gauge"]

MetricKind = Literal["counter", "gauge"]

_NAME = re.compile(r"[a-z][a-z0-9_]*")
#: Suffixes that mean something else to Prometheus (a histogram's or summary's series).
_RESERVED = ("_total", "_count", "_sum", "_bucket", "_created", "_info")


@dataclass(frozen=True)
class Metric:
    """One figure a driver keeps: a counter (only ever grows while the daemon runs) or a
    gauge (a level: bytes dirty now, a ratio, a time).

    ``headline`` figures are the few an operator looks at first: ``usbdsrvd status`` shows
    them beside each daemon, and SIGUSR1 logs them.
    """

    name: str
    kind: MetricKind
    help: str
    headline: bool = False

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"metric name {self.name!r}: expected lower-case letters, digits and _, "
                "starting with a letter"
            )
        if self.name.endswith(_RESERVED):
            raise ValueError(
                f"metric name {self.name!r}: must not end in {', '.join(_RESERVED)} "
                "(a counter's _total is added)"
            )
        if self.kind not in ("counter", "gauge"):
            raise ValueError(f"metric {self.name!r}: kind {self.kind!r}: expected counter or gauge")
        if not self.help.strip():
            raise ValueError(f"metric {self.name!r} needs a help text")

    def exposed_name(self, driver: str) -> str:
        """The name Prometheus sees: ``usbd_<driver>_<name>``, and ``_total`` for a counter."""
        base = f"usbd_{driver.replace('-', '_')}_{self.name}"
        return base + "_total" if self.kind == "counter" else base


def counter(name: str, help: str, *, headline: bool = False) -> Metric:
    """A count that only grows while the daemon runs (requests retried, bytes uploaded)."""
    return Metric(name, "counter", help, headline)


def gauge(name: str, help: str, *, headline: bool = False) -> Metric:
    """A level that goes up and down (bytes not yet uploaded, the dedup ratio)."""
    return Metric(name, "gauge", help, headline)


def format_value(name: str, value: float, now: float | None = None) -> str:
    """A value as a person reads it, by its name's unit suffix (see the module docstring)."""
    if name.endswith("_timestamp_seconds"):
        if value <= 0:
            return "never"
        age = (time.time() if now is None else now) - value
        return f"{age:.0f} s ago" if age >= 0 else "in the future"
    if name.endswith("_bytes"):
        return format_size(int(value))
    if name.endswith("_ratio"):
        return f"{value:.2f}"
    if name.endswith("_seconds"):
        return f"{value:.3g} s"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3g}"


def checked_values(declared: Mapping[str, Metric], values: Mapping[str, float]) -> dict[str, float]:
    """The values of declared metrics only, as floats: an undeclared name or a value that is
    not a number is left out (it is the driver's mistake, not a reason to fail a scrape)."""
    out: dict[str, float] = {}
    for name, value in values.items():
        if name in declared and isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out
