"""--metrics against the real tools: a usbd-ramdisk process scraped over HTTP, the text checked
by Prometheus' own ``promtool check metrics``, the values against the work a python3-libnbd
client did; SIGUSR1's line; an address that cannot be had."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from usbd.core import __version__

if TYPE_CHECKING:  # not at run time: see the require fixture in tests/conftest.py
    from conftest import Connect, ServerFactory, UsbdServer

KiB = 1024
#: Ceilings, not expectations.
TIMEOUT = 120.0


def metrics_url(server: UsbdServer) -> str:
    deadline = time.monotonic() + 30
    while True:
        found = re.search(r"publishes metrics at (\S+)", server.output())
        if found:
            return found.group(1)
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return str(reply.read().decode())


def samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def promtool_check(require: Callable[[str], str], text: str) -> None:
    result = subprocess.run(
        [require("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{text}"


@pytest.fixture
def metered(start_server: ServerFactory) -> UsbdServer:
    return start_server("unix", size=8 << 20, extra=["--metrics", "127.0.0.1:0"])


def test_the_scrape_passes_promtool_and_counts_the_clients_work(
    metered: UsbdServer, connect: Connect, libnbd: Any, require: Callable[[str], str]
) -> None:
    url = metrics_url(metered)
    assert url.startswith("http://127.0.0.1:")
    h = connect(metered.uri, strict=0)  # strict 0: the past-the-end read reaches the server
    for n in range(10):
        h.pwrite(bytes([n]) * 64 * KiB, n * 64 * KiB)
    for n in range(5):
        assert h.pread(4 * KiB, n * 64 * KiB) == bytes([n]) * 4 * KiB
    h.flush()
    h.trim(64 * KiB, 0)
    h.zero(64 * KiB, 64 * KiB)
    with pytest.raises(libnbd.Error):
        h.pread(4 * KiB, metered.size)
    text = scrape(url)
    promtool_check(require, text)
    values = samples(text)
    e = "export=interop"

    def series(name: str, **labels: str) -> float:
        parts = sorted([e, *(f"{k}={v}" for k, v in labels.items())])
        return values[f"{name}{{{','.join(parts)}}}"]

    assert series("usbd_requests_total", command="write") == 10
    assert series("usbd_requests_total", command="read") == 6
    assert series("usbd_requests_total", command="flush") == 1
    assert series("usbd_requests_total", command="trim") == 1
    assert series("usbd_requests_total", command="write_zeroes") == 1
    assert series("usbd_request_bytes_total", command="write") == 640 * KiB
    assert series("usbd_request_bytes_total", command="read") == 5 * 4 * KiB  # refused: 0
    assert series("usbd_request_bytes_total", command="trim") == 64 * KiB
    errors = {k: v for k, v in values.items() if k.startswith("usbd_request_errors_total")}
    assert errors == {"usbd_request_errors_total{errno=EINVAL,export=interop}": 1}
    assert series("usbd_request_duration_seconds_count", command="flush") == 1
    assert series("usbd_request_duration_seconds_count", command="trim") == 1
    assert series("usbd_connections_open") == 1
    assert series("usbd_connections_total") == 1
    assert series("usbd_requests_in_flight") == 0
    assert series("usbd_export_size_bytes") == 8 << 20
    assert values["usbd_network_connections_refused_total{}"] == 0
    assert values["process_resident_memory_bytes{}"] > 0
    info = [k for k in values if k.startswith("usbd_info{")]
    assert info == [
        f"usbd_info{{driver=mem,export=interop,prog=usbd-ramdisk,version={__version__}}}"
    ]
    h.shutdown()
    deadline = time.monotonic() + 30
    while samples(scrape(url))[f"usbd_connections_open{{{e}}}"] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_sigusr1_logs_the_figures(metered: UsbdServer, connect: Connect) -> None:
    h = connect(metered.uri)
    h.pwrite(bytes(4 * KiB), 0)
    metered.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while "statistics:" not in metered.log():
        assert time.monotonic() < deadline, metered.log()
        time.sleep(0.05)
    line = next(line for line in metered.log().splitlines() if "statistics:" in line)
    assert "usbd-ramdisk statistics: size 8.0 MiB, 1 connection(s)" in line
    assert "1 request(s) served" in line


def test_a_metrics_port_in_use_stops_the_start_with_status_1(tmp_path: Any) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "usbd.ramdisk",
                "--listen",
                str(tmp_path / "s.sock"),
                "--metrics",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        taken.close()
    assert result.returncode == 1, result
    assert "usbd-ramdisk: error:" in result.stderr
    assert "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigusr1_logs_the_figures_above_the_log_threshold_too(start_server: ServerFactory) -> None:
    server = start_server("unix", size=8 << 20, extra=["--log-level", "warning"])
    server.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while "statistics:" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert "usbd-ramdisk statistics: size 8.0 MiB" in server.log()


def catches_sigusr1(pid: int) -> bool:
    """The process has a handler for SIGUSR1 (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGUSR1 - 1)))
    return False


def test_sigusr1_while_the_device_opens_does_not_kill_the_daemon(tmp_path: Any) -> None:
    """usbd-objstore opening against a store that accepts and never answers: the open takes
    as long as its retries do, and a SIGUSR1 meanwhile (SIGUSR1's default action kills) gets
    a line instead."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    config = (
        f'{{"endpoint": "http://127.0.0.1:{silent.getsockname()[1]}", "bucket": "b", '
        '"region": "us-east-1", "access_key_id": "AKIAEXAMPLE", "secret_key": "EXAMPLE"}'
    )
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "usbd.objstore",
                "--objstore-cfg",
                config,
                "--store-dir",
                str(tmp_path),
                "--store-size",
                "8MiB",
                "--listen",
                str(tmp_path / "s.sock"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not catches_sigusr1(daemon.pid):  # Python starting, importing boto3...
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        while "received SIGUSR1 while not serving" not in log.read_text():
            assert daemon.poll() is None, log.read_text()  # killed by the signal
            assert time.monotonic() < deadline, log.read_text()
            daemon.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
        assert "is serving" not in log.read_text()  # it was still opening
        assert daemon.poll() is None
    finally:
        daemon.kill()
        daemon.wait(timeout=TIMEOUT)
        silent.close()
