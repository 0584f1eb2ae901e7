"""Everything a running daemon can tell about itself, gathered when someone asks.

One :class:`Monitor` per daemon holds what the figures come from: the export (whose
:class:`~usbd.core._stats.RequestStats` the request loop keeps), the network server, the
kernel device, and the driver's declared metrics (:mod:`usbd.core.metrics`). It reads them
only on demand, in three forms: :meth:`Monitor.figures` (a JSON-able snapshot, for the
status file that ``usbdsrvd status`` reads and for SIGUSR1), :meth:`Monitor.collect` (the
Prometheus collector behind ``--metrics``), and :meth:`Monitor.summary` (one log line).

Collection runs in prometheus-client's HTTP thread as well as on the event loop; everything
read here is a plain number or a copy taken in one step, so it needs no lock.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.core import (
    Metric as PromMetric,
)

from ._constants import Command, Errno
from ._export import Export
from ._sizes import format_size
from ._stats import LATENCY_BOUNDS
from ._version import __version__
from .metrics import Metric, checked_values, format_value

if TYPE_CHECKING:
    from ._server import Server
    from .kernel import Attached

__all__ = ["CORE_METRICS", "MetricsEndpoint", "Monitor", "summarise"]

log = logging.getLogger("usbd")

_COMMANDS = {int(command): command.name.lower() for command in Command}
_ERRNOS = {int(code): code.name for code in Errno}


@dataclass(frozen=True)
class CoreMetric:
    """One of the engine's own series, for the reference in docs/operations.md."""

    name: str
    kind: str
    labels: tuple[str, ...]
    help: str


#: The engine's series (the driver's follow from its Driver.metrics).
CORE_METRICS: tuple[CoreMetric, ...] = (
    CoreMetric(
        "usbd_info",
        "gauge",
        ("prog", "driver", "version", "export"),
        "Always 1: what this daemon is (command, driver, usbd version, export name).",
    ),
    CoreMetric("usbd_export_size_bytes", "gauge", ("export",), "Size of the export."),
    CoreMetric(
        "usbd_requests_total",
        "counter",
        ("export", "command"),
        "Requests received, by command (refused ones included).",
    ),
    CoreMetric(
        "usbd_request_bytes_total",
        "counter",
        ("export", "command"),
        "Bytes the requests covered, by command: read, written, trimmed, zeroed, cached.",
    ),
    CoreMetric(
        "usbd_request_errors_total",
        "counter",
        ("export", "errno"),
        "Replies that carried an error, by NBD errno name (EIO, EINVAL, ENOSPC...).",
    ),
    CoreMetric(
        "usbd_request_duration_seconds",
        "histogram",
        ("export", "command"),
        "Time from a request's dispatch to its reply being ready (device work; a FLUSH's "
        "wait for earlier writes; not the network). The fast path times one request in 16 "
        "and counts it 16 times.",
    ),
    CoreMetric(
        "usbd_connections_open",
        "gauge",
        ("export",),
        "Connections in the transmission phase now, network clients and the kernel's.",
    ),
    CoreMetric(
        "usbd_connections_total",
        "counter",
        ("export",),
        "Connections that reached the transmission phase.",
    ),
    CoreMetric(
        "usbd_requests_in_flight",
        "gauge",
        ("export",),
        "Requests received and not yet answered (in tasks or left to a writer thread).",
    ),
    CoreMetric(
        "usbd_network_connections_refused_total",
        "counter",
        (),
        "Network connections refused for --max-connections.",
    ),
    CoreMetric(
        "usbd_kernel_attached",
        "gauge",
        ("device",),
        "1 while the kernel device is attached to this daemon, 0 once it let go.",
    ),
    CoreMetric(
        "usbd_kernel_reattached",
        "gauge",
        ("device",),
        "1 if this daemon took over a device the kernel kept for it after a restart.",
    ),
    CoreMetric(
        "usbd_kernel_connections",
        "gauge",
        ("device",),
        "Sockets between the kernel and this daemon.",
    ),
    CoreMetric(
        "usbd_start_time_seconds",
        "gauge",
        (),
        "When the daemon started, in seconds since the epoch.",
    ),
)


@dataclass(eq=False)  # identity: prometheus-client keys its collectors by them
class Monitor:
    """The daemon's figures: built when the device is, filled in as serving begins."""

    export: Export
    prog: str = "usbd"
    driver: str = ""
    declared: Sequence[Metric] = ()
    #: NBD URIs of the listeners, once they accept.
    listen: list[str] = field(default_factory=list)
    #: The network server, once it serves.
    server: Server | None = None
    #: The kernel device, once attached; ``kernel_live`` false once the kernel let go.
    kernel: Attached | None = None
    kernel_live: bool = False
    #: Address of the --metrics endpoint, once it serves.
    metrics_url: str | None = None
    #: The daemon is stopping: flushing and closing the device (objstore uploads meanwhile).
    stopping: bool = False
    started: float = field(default_factory=time.time)
    _failing: bool = False

    # -- the driver's figures --------------------------------------------------------------

    def driver_values(self) -> dict[str, float]:
        """The device's current values of its declared metrics; its mistakes cost nothing
        but the values (logged once, not again until it answers again)."""
        if not self.declared:
            return {}
        try:
            values = self.export.device.metrics()
        except Exception:
            if not self._failing:
                log.exception("%s: the device's metrics() failed", self.prog)
            self._failing = True
            return {}
        self._failing = False
        return checked_values({m.name: m for m in self.declared}, values)

    # -- a snapshot ------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        """Everything, as JSON-able values: the status file's content."""
        export, stats = self.export, self.export.stats
        connections = list(export.connections)  # a copy in one step (see the docstring)
        values = self.driver_values()
        server = self.server
        return {
            "pid": os.getpid(),
            "prog": self.prog,
            "driver": self.driver,
            "version": __version__,
            "started": self.started,
            "updated": time.time(),
            "export": export.name,
            "size": export.size,
            "read_only": not export.can_write,
            "listen": list(self.listen),
            "metrics_url": self.metrics_url,
            "device": self.kernel.path if self.kernel is not None else None,
            "attached": self.kernel_live,
            "stopping": self.stopping,
            "reattached": self.kernel.reattached if self.kernel is not None else False,
            "connections": len(connections),
            "network_connections": server.active if server is not None else 0,
            "refused": server.refused if server is not None else 0,
            "in_flight": sum(c.in_flight for c in connections),
            "requests": _by_command(stats.requests),
            "bytes": _by_command(stats.bytes),
            "errors": {_ERRNOS.get(code, str(code)): n for code, n in dict(stats.errors).items()},
            "metrics": values,
            "headline": [m.name for m in self.declared if m.headline and m.name in values],
        }

    def summary(self) -> str:
        """One line for the log (SIGUSR1): the headline figures first."""
        figures = self.figures()
        return summarise(figures)

    # -- Prometheus ------------------------------------------------------------------------

    def collect(self) -> Iterator[PromMetric]:
        """prometheus-client's Collector protocol: every series, read now."""
        export, stats = self.export, self.export.stats
        name = export.name
        info = GaugeMetricFamily(
            "usbd_info", _help("usbd_info"), labels=["prog", "driver", "version", "export"]
        )
        info.add_metric([self.prog, self.driver, __version__, name], 1)
        yield info
        size = GaugeMetricFamily(
            "usbd_export_size_bytes", _help("usbd_export_size_bytes"), labels=["export"]
        )
        size.add_metric([name], export.size)
        yield size
        yield _per_command("usbd_requests", stats.requests, name)
        yield _per_command("usbd_request_bytes", stats.bytes, name)
        errors = CounterMetricFamily(
            "usbd_request_errors", _help("usbd_request_errors_total"), labels=["export", "errno"]
        )
        for code, count in sorted(dict(stats.errors).items()):
            errors.add_metric([name, _ERRNOS.get(code, str(code))], count)
        yield errors
        latency = HistogramMetricFamily(
            "usbd_request_duration_seconds",
            _help("usbd_request_duration_seconds"),
            labels=["export", "command"],
        )
        for command, label in _COMMANDS.items():
            counts = list(stats.latency[command])
            total = sum(counts)
            if not total:
                continue
            buckets: list[tuple[str, float]] = []
            running = 0
            for bound, count in zip((*LATENCY_BOUNDS, float("inf")), counts, strict=True):
                running += count
                buckets.append((_bound(bound), running))
            latency.add_metric([name, label], buckets, stats.latency_sum[command])
        yield latency
        connections = list(export.connections)
        open_now = GaugeMetricFamily(
            "usbd_connections_open", _help("usbd_connections_open"), labels=["export"]
        )
        open_now.add_metric([name], len(connections))
        yield open_now
        ever = CounterMetricFamily(
            "usbd_connections", _help("usbd_connections_total"), labels=["export"]
        )
        ever.add_metric([name], stats.connections_total)
        yield ever
        in_flight = GaugeMetricFamily(
            "usbd_requests_in_flight", _help("usbd_requests_in_flight"), labels=["export"]
        )
        in_flight.add_metric([name], sum(c.in_flight for c in connections))
        yield in_flight
        refused = CounterMetricFamily(
            "usbd_network_connections_refused",
            _help("usbd_network_connections_refused_total"),
        )
        refused.add_metric([], self.server.refused if self.server is not None else 0)
        yield refused
        if self.kernel is not None:
            device = [self.kernel.path]
            for metric, value in (
                ("usbd_kernel_attached", int(self.kernel_live)),
                ("usbd_kernel_reattached", int(self.kernel.reattached)),
                ("usbd_kernel_connections", self.kernel.connections),
            ):
                family = GaugeMetricFamily(metric, _help(metric), labels=["device"])
                family.add_metric(device, value)
                yield family
        started = GaugeMetricFamily("usbd_start_time_seconds", _help("usbd_start_time_seconds"))
        started.add_metric([], self.started)
        yield started
        yield from self._driver_families()

    def _driver_families(self) -> Iterator[PromMetric]:
        values = self.driver_values()
        for metric in self.declared:
            if metric.name not in values:
                continue
            exposed = metric.exposed_name(self.driver)
            family: PromMetric
            if metric.kind == "counter":
                family = CounterMetricFamily(exposed.removesuffix("_total"), metric.help)
            else:
                family = GaugeMetricFamily(exposed, metric.help)
            family.add_metric([], values[metric.name])
            yield family


def _help(name: str) -> str:
    return next(metric.help for metric in CORE_METRICS if metric.name == name)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _by_command(counts: Sequence[int]) -> dict[str, int]:
    return {_COMMANDS[n]: count for n, count in enumerate(list(counts)) if count and n in _COMMANDS}


def _per_command(base: str, counts: Sequence[int], export: str) -> CounterMetricFamily:
    family = CounterMetricFamily(base, _help(base + "_total"), labels=["export", "command"])
    values = list(counts)
    for number, label in _COMMANDS.items():
        if number < len(values):
            family.add_metric([export, label], values[number])
    return family


def summarise(figures: dict[str, Any]) -> str:
    """A status snapshot (:meth:`Monitor.figures`, or a status file's) as one line."""
    parts = []
    values: dict[str, float] = figures.get("metrics", {})
    for metric in figures.get("headline", []):
        if metric in values:
            parts.append(f"{metric.replace('_', ' ')} {format_value(metric, values[metric])}")
    parts.append(f"size {format_size(int(figures.get('size', 0)))}")
    parts.append(f"{figures.get('connections', 0)} connection(s)")
    parts.append(f"{figures.get('in_flight', 0)} request(s) in flight")
    requests: dict[str, int] = figures.get("requests", {})
    parts.append(f"{sum(requests.values())} request(s) served")
    errors: dict[str, int] = figures.get("errors", {})
    if errors:
        parts.append("errors " + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())))
    return ", ".join(parts)


class MetricsEndpoint:
    """``--metrics HOST:PORT``: prometheus-client's HTTP server (its own thread) serving the
    monitor's series and the process's (memory, CPU, open files) at ``/metrics``.

    The library's server rather than one on the event loop: a scrape then never waits for a
    busy loop, nor the loop for a slow scraper; the collection it runs reads plain numbers
    (see the module docstring)."""

    def __init__(self, monitor: Monitor, host: str | None, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(monitor)
        ProcessCollector(registry=self.registry)
        # OSError (address in use, not permitted) is the caller's: a failure to start,
        # said with the flag, since --listen fails with the same words.
        try:
            self._server, self._thread = start_http_server(
                port, host or "0.0.0.0", registry=self.registry
            )
        except OSError as exc:
            where = f"[{host}]:{port}" if host and ":" in host else f"{host or ''}:{port}"
            raise OSError(exc.errno, f"--metrics {where}: {exc.strerror or exc}") from exc
        bound_host, bound_port = self._server.server_address[:2]
        text = bound_host.decode() if isinstance(bound_host, bytes) else str(bound_host)
        shown = f"[{text}]" if ":" in text else text
        self.url = f"http://{shown}:{bound_port}/metrics"
        monitor.metrics_url = self.url

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
