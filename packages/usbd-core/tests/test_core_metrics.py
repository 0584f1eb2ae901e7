"""The figures: what the request loop counts, what a driver declares, what the monitor shows.

The counts are checked against requests sent byte by byte with the raw client, and the
Prometheus text is parsed back with prometheus-client's own parser (the real promtool checks
it in tests/test_metrics.py, against running daemons)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytest
import trio
from core_helpers import (
    CACHE,
    EINVAL,
    FLUSH,
    READ,
    TRIM,
    WRITE,
    GatedDevice,
    MemDevice,
    request,
    seam,
    wait_until,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from usbd.core import Device, Export
from usbd.core._monitor import CORE_METRICS, Monitor, summarise
from usbd.core._stats import LATENCY_BOUNDS, SAMPLE_EVERY
from usbd.core.driver import Driver
from usbd.core.kernel import Attached
from usbd.core.metrics import Metric, counter, format_value, gauge
from usbd.core.settings import NoOptions

KiB = 1024


def scrape(monitor: Monitor) -> dict[str, float]:
    """Every sample of the monitor's exposition, as ``name{label=value,...}`` -> value."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(monitor)
    text = generate_latest(registry).decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


# -- declarations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "complaint"),
    [
        ("Dirty", "lower-case"),
        ("9lives", "lower-case"),
        ("dirty-bytes", "lower-case"),
        ("uploads_total", "must not end in"),
        ("latency_bucket", "must not end in"),
        ("", "lower-case"),
    ],
)
def test_a_metric_name_that_prometheus_would_misread_is_refused(name: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        counter(name, "help")


def test_a_metric_needs_help_and_a_kind() -> None:
    with pytest.raises(ValueError, match="help"):
        gauge("dirty_bytes", "  ")
    with pytest.raises(ValueError, match="counter or gauge"):
        Metric("dirty_bytes", "summary", "help")  # type: ignore[arg-type]


def test_exposed_names_carry_the_driver_and_a_counters_total() -> None:
    assert gauge("dirty_bytes", "h").exposed_name("objstore") == "usbd_objstore_dirty_bytes"
    assert counter("retries", "h").exposed_name("dedup") == "usbd_dedup_retries_total"
    assert gauge("x", "h").exposed_name("my-driver") == "usbd_my_driver_x"


def test_a_driver_declaring_one_name_twice_is_refused() -> None:
    with pytest.raises(TypeError, match="declared twice"):
        Driver(
            "twice",
            "d",
            NoOptions,
            lambda s, o: MemDevice(),
            metrics=(gauge("a_bytes", "h"), counter("a_bytes", "h")),
        )


def test_values_are_formatted_by_their_unit_suffix() -> None:
    assert format_value("dirty_bytes", 3 * 1024 * 1024) == "3.0 MiB"
    assert format_value("dedup_ratio", 2.0) == "2.00"
    assert format_value("last_commit_timestamp_seconds", 100.0, now=141.0) == "41 s ago"
    assert format_value("last_commit_timestamp_seconds", 0) == "never"
    assert format_value("uploads", 7.0) == "7"
    assert format_value("upload_seconds", 0.25) == "0.25 s"


# -- what the request loop counts -----------------------------------------------------------


async def test_requests_bytes_errors_and_latency_are_counted_as_sent() -> None:
    device = MemDevice(1 << 20)
    writes, reads = 40, 25
    async with seam(device) as (client, export):
        for n in range(writes):
            assert await client.write(n * 4 * KiB, bytes(4 * KiB), cookie=n) == 0
        for n in range(reads):
            await client.read(n * 512, 512, cookie=100 + n)
        await client.send(request(FLUSH, cookie=500))
        assert await client.simple_reply() == (0, 500)
        await client.send(request(TRIM, cookie=501, offset=0, length=64 * KiB))
        assert await client.simple_reply() == (0, 501)
        await client.send(request(READ, cookie=502, offset=1 << 20, length=512))  # past the end
        assert await client.simple_reply() == (EINVAL, 502)
        # Refused requests' bytes do not count: past the end, longer than the device, or
        # in range but not offered (counted at first, by the fast path's test, then taken back).
        await client.send(request(READ, cookie=503, offset=0, length=64 << 20))
        assert await client.simple_reply() == (EINVAL, 503)
        await client.send(request(CACHE, cookie=504, offset=0, length=4 * KiB))  # not offered
        assert await client.simple_reply() == (EINVAL, 504)
        stats = export.stats
        assert stats.requests[WRITE] == writes
        assert stats.requests[READ] == reads + 2
        assert stats.bytes[WRITE] == writes * 4 * KiB
        assert stats.bytes[READ] == reads * 512
        assert stats.bytes[TRIM] == 64 * KiB
        assert stats.errors == {EINVAL: 3}
        assert stats.requests[CACHE] == 1
        assert stats.bytes[CACHE] == 0
        # The fast path timed one in SAMPLE_EVERY (reads and writes share the count) and
        # counted each sample that many times; the general path timed each of its own.
        fast = writes + reads
        timed = sum(stats.latency[READ]) + sum(stats.latency[WRITE])
        assert timed == fast // SAMPLE_EVERY * SAMPLE_EVERY
        assert sum(stats.latency[FLUSH]) == 1
        assert sum(stats.latency[TRIM]) == 1
        assert stats.latency_sum[FLUSH] > 0
        assert stats.connections_total == 1
        assert len(export.connections) == 1
    assert len(export.connections) == 0


async def test_writes_left_to_the_writer_thread_are_timed_when_written() -> None:
    """A blocking device's writes go to the connection's writer (write-behind) when
    try_write leaves them: each is counted once, when its round is collected."""

    class Behind(GatedDevice):
        def try_write(self, offset: int, data: memoryview) -> int:
            return 0  # always left to the thread

    device = Behind(1 << 20)
    device.gate.set()
    async with seam(device) as (client, export):
        for n in range(5):
            assert await client.write(n * 4 * KiB, b"x" * 4 * KiB, cookie=n) == 0
        assert sum(export.stats.latency[WRITE]) == 5


async def test_requests_in_flight_and_open_connections() -> None:
    device = GatedDevice(1 << 20)
    async with seam(device) as (client, export):
        monitor = Monitor(export)
        await client.send(request(WRITE, cookie=1, offset=0, length=512) + bytes(512))
        with trio.fail_after(10):
            await wait_until(lambda: device.writes_started == 1)
        figures = monitor.figures()
        assert figures["connections"] == 1
        assert figures["in_flight"] == 1
        assert scrape(monitor)["usbd_requests_in_flight{export=}"] == 1
        device.gate.set()
        assert await client.simple_reply() == (0, 1)
        with trio.fail_after(10):
            await wait_until(lambda: monitor.figures()["in_flight"] == 0)


# -- the monitor ----------------------------------------------------------------------------


class Figures(MemDevice):
    """A device reporting figures: declared ones, and some mistakes."""

    def __init__(self) -> None:
        super().__init__(1 << 20)
        self.values: dict[str, object] = {"dirty_bytes": 4096, "uploads": 3}
        self.fail = False

    def metrics(self) -> Mapping[str, float]:
        if self.fail:
            raise RuntimeError("the figures are broken")
        return self.values  # type: ignore[return-value]


DECLARED = (
    gauge("dirty_bytes", "Bytes not yet uploaded.", headline=True),
    counter("uploads", "Objects uploaded."),
)


def test_the_drivers_declared_figures_are_exposed_and_mistakes_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = Figures()
    device.values.update({"undeclared": 1, "uploads_per_hour": "many"})
    monitor = Monitor(Export(device), prog="usbd-test", driver="test", declared=DECLARED)
    samples = scrape(monitor)
    assert samples["usbd_test_dirty_bytes{}"] == 4096
    assert samples["usbd_test_uploads_total{}"] == 3
    assert not any("undeclared" in name for name in samples)
    figures = monitor.figures()
    assert figures["metrics"] == {"dirty_bytes": 4096.0, "uploads": 3.0}
    assert figures["headline"] == ["dirty_bytes"]
    assert summarise(figures).startswith("dirty bytes 4.0 KiB, size 1.0 MiB")
    # A device whose figures fail costs a scrape nothing but them, logged once.
    device.fail = True
    with caplog.at_level(logging.ERROR, logger="usbd"):
        samples = scrape(monitor)
        scrape(monitor)
    assert "usbd_test_dirty_bytes{}" not in samples
    assert samples["usbd_export_size_bytes{export=}"] == 1 << 20
    assert sum("metrics() failed" in r.getMessage() for r in caplog.records) == 1


def test_every_core_series_is_in_the_reference() -> None:
    """CORE_METRICS is what docs/operations.md lists: every family collected must be in it."""
    device = MemDevice()
    export = Export(device)
    export.stats.observe(READ, 0.001)
    export.stats.error(5)
    monitor = Monitor(export)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(monitor)
    names = {metric.name for metric in CORE_METRICS}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert exposed in names, exposed


def test_the_histogram_buckets_are_cumulative_and_end_in_inf() -> None:
    export = Export(MemDevice())
    for seconds in (0.000001, 0.003, 0.003, 20.0):
        export.stats.observe(READ, seconds)
    samples = scrape(Monitor(export))
    bucket = "usbd_request_duration_seconds_bucket{command=read,export=,le=%s}"
    assert samples[bucket % "1e-05"] == 1
    assert samples[bucket % "0.005"] == 3
    assert samples[bucket % repr(LATENCY_BOUNDS[-1])] == 3
    assert samples[bucket % "+Inf"] == 4
    assert samples["usbd_request_duration_seconds_count{command=read,export=}"] == 4
    assert samples["usbd_request_duration_seconds_sum{command=read,export=}"] == pytest.approx(
        20.006001
    )


def test_a_device_without_declared_metrics_is_not_asked() -> None:
    class Asked(Device):
        size = 4096
        asked = 0

        def read(self, offset: int, length: int) -> bytes:
            return bytes(length)

        def metrics(self) -> Mapping[str, float]:
            Asked.asked += 1
            return {}

    monitor = Monitor(Export(Asked()))
    monitor.figures()
    scrape(monitor)
    assert Asked.asked == 0


def test_the_kernel_devices_state_is_exposed_while_attached_and_after() -> None:
    monitor = Monitor(Export(MemDevice()))
    assert not any(name.startswith("usbd_kernel") for name in scrape(monitor))
    monitor.kernel = Attached(0, "/dev/nbd0", "netlink", 2, reattached=True)
    monitor.kernel_live = True
    samples = scrape(monitor)
    assert samples["usbd_kernel_attached{device=/dev/nbd0}"] == 1
    assert samples["usbd_kernel_reattached{device=/dev/nbd0}"] == 1
    assert samples["usbd_kernel_connections{device=/dev/nbd0}"] == 2
    figures = monitor.figures()
    assert (figures["device"], figures["attached"], figures["reattached"]) == (
        "/dev/nbd0",
        True,
        True,
    )
    monitor.kernel_live = False  # the kernel let go
    assert scrape(monitor)["usbd_kernel_attached{device=/dev/nbd0}"] == 0
