"""usbd-filedisk as installed: its entry point, and its console script against real clients
(qemu-io, qemu-img, nbdinfo, nbdcopy), a second daemon on the same file, the rules for an
existing file's size, and --metrics (checked by Prometheus' promtool), each through a real
process."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import time
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

from filedisk_helpers import TOOL_TIMEOUT, Daemon, Daemons, require_tool, run, store_args, tool
from prometheus_client.parser import text_string_to_metric_families

from usbd.core import format_size
from usbd.core.driver import ENTRY_POINT_GROUP, Driver
from usbd.core.settings import CommonSettings
from usbd.filedisk import DirectFileDisk, FileDisk, FileOptions

KiB = 1 << 10
MiB = 1 << 20


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error(result: subprocess.CompletedProcess[str], status: int) -> str:
    """The single line a refused start prints (and nothing on stdout)."""
    assert result.returncode == status, result
    assert result.stdout == "", result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("usbd-filedisk: error: "), lines[0]
    return lines[0].removeprefix("usbd-filedisk: error: ")


def test_entry_point_file_names_the_driver(tmp_path: Path) -> None:
    (point,) = [p for p in entry_points(group=ENTRY_POINT_GROUP) if p.name == "file"]
    driver = point.load()
    assert isinstance(driver, Driver)
    assert (driver.name, driver.aliases, driver.stores_data) == ("file", ("disk",), True)
    settings = CommonSettings(store_dir=tmp_path, store_name="lun", store_size="3MiB")
    for options, kind in [(FileOptions(), FileDisk), (FileOptions(direct=True), DirectFileDisk)]:
        device = driver.create(settings, options)
        try:
            assert type(device) is kind
            assert device.size == 3 * MiB
            assert device.path == (tmp_path / "lun.bin").absolute()
        finally:
            device.close()


def test_block_status_is_where_the_data_was_written(short_dir: Path, daemons: Daemons) -> None:
    """qemu-io writes at known offsets; nbdinfo --map shows data exactly there."""
    daemon = daemons.start(short_dir / "s", *store_args(short_dir, "vol", "--store-size", "16MiB"))
    assert 'Exporting 16 MiB volume "vol"' in daemon.output()
    for pattern, offset, length in [("0xab", "1M", "64k"), ("0xcd", "5M", "4k")]:
        tool("qemu-io", "-f", "raw", daemon.uri, "-c", f"write -P {pattern} {offset} {length}")
    mapped = tool("nbdinfo", "--map", daemon.uri).stdout.splitlines()
    runs = [tuple(int(field) for field in line.split()[:3]) for line in mapped]
    assert runs == [
        (0, MiB, 3),
        (MiB, 64 * KiB, 0),
        (MiB + 64 * KiB, 4 * MiB - 64 * KiB, 3),
        (5 * MiB, 4 * KiB, 0),
        (5 * MiB + 4 * KiB, 11 * MiB - 4 * KiB, 3),
    ]
    tool("qemu-io", "-f", "raw", daemon.uri, "-c", "discard 1M 64k")
    mapped = tool("nbdinfo", "--map", daemon.uri).stdout.splitlines()
    assert [line.split()[:3] for line in mapped][:2] == [
        ["0", str(5 * MiB), "3"],
        [str(5 * MiB), str(4 * KiB), "0"],
    ]
    daemon.stop()
    path = short_dir / "vol.bin"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_blocks * 512 == 4 * KiB  # only the 4 KiB still written


def test_a_second_daemon_on_the_same_file_names_the_first(
    short_dir: Path, daemons: Daemons
) -> None:
    first = daemons.start(short_dir / "a", *store_args(short_dir, "vol", "--store-size", "1MiB"))
    result = run("--listen", str(short_dir / "b"), *store_args(short_dir, "vol"))
    line = one_error(result, 1)
    assert line == f"{short_dir / 'vol.bin'} is in use by process {first.process.pid} " + (
        "(usbd-filedisk)"
    )
    first.stop()
    # Once the first has stopped, the file is free again.
    daemons.start(short_dir / "c", *store_args(short_dir, "vol")).stop()


def test_an_existing_files_size_rules(short_dir: Path, daemons: Daemons) -> None:
    path = short_dir / "vol.bin"
    listen = ["--listen", str(short_dir / "s")]
    daemons.start(short_dir / "s", *store_args(short_dir, "vol", "--store-size", "4MiB")).stop()
    # A different size given explicitly (flag or environment) is refused, naming both.
    bigger = f"-store-size: {path} is 4.0 MiB, smaller than 8.0 MiB: add -file-grow to grow it"
    line = one_error(run(*listen, *store_args(short_dir, "vol", "--store-size", "8MiB")), 2)
    assert line == bigger
    line = one_error(
        run(*listen, *store_args(short_dir, "vol"), env={"USBD_STORE_SIZE": "8MiB"}), 2
    )
    assert line == bigger
    # Smaller: never, not even with -file-grow.
    result = run(*listen, *store_args(short_dir, "vol", "-store-size=2MiB", "--file-grow"))
    assert one_error(result, 2) == (
        f"-store-size: {path} is 4.0 MiB, larger than 2.0 MiB: shrinking is never done "
        "(leave out -store-size to use the file's size)"
    )
    assert path.stat().st_size == 4 * MiB
    # Without -store-size the file's own size is used; with -file-grow it grows, sparse.
    daemon = daemons.start(short_dir / "s", *store_args(short_dir, "vol"))
    assert 'Exporting 4.0 MiB volume "vol"' in daemon.output()
    daemon.stop()
    grow = ["--store-size", "8MiB", "--file-grow"]
    daemon = daemons.start(short_dir / "s", *store_args(short_dir, "vol", *grow))
    assert 'Exporting 8.0 MiB volume "vol"' in daemon.output()
    assert "grew" in daemon.log() and "from 4.0 MiB to 8.0 MiB" in daemon.log()
    daemon.stop()
    assert path.stat().st_size == 8 * MiB
    assert path.stat().st_blocks == 0


def test_direct_io_needs_a_size_in_whole_blocks(short_dir: Path) -> None:
    result = run(
        "--listen", str(short_dir / "s"), *store_args(short_dir, "odd", "-store-size=1000"),
        "--file-direct",
    )  # fmt: skip
    assert one_error(result, 2).startswith("-file-direct: direct I/O needs a size that is")
    assert not (short_dir / "odd.bin").exists()


def test_images_copy_in_and_out_and_survive_a_restart(short_dir: Path, daemons: Daemons) -> None:
    """qemu-img convert writes an image in, nbdcopy reads it out, byte for byte; after
    SIGTERM (exit 0) and a restart (direct I/O this time) the data is still there."""
    image = short_dir / "image.raw"
    chunks = [os.urandom(MiB) if n % 3 else bytes(MiB) for n in range(12)]
    image.write_bytes(b"".join(chunks))
    args = store_args(short_dir, "vol", "--store-size", "12MiB")
    daemon = daemons.start(short_dir / "s", *args)
    tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), daemon.uri)
    copy = short_dir / "copy.raw"
    tool("nbdcopy", daemon.uri, str(copy))
    assert sha256(copy) == sha256(image)
    daemon.stop(signal.SIGTERM)
    served = re.search(r"served \d+ requests \((.*)\)", daemon.output())
    assert served is not None and "flush" in served.group(1)
    assert sha256(short_dir / "vol.bin") == sha256(image)
    # qemu-img left the zero chunks as holes (it zeroes rather than writes them).
    assert (short_dir / "vol.bin").stat().st_blocks * 512 < 12 * MiB
    daemon = daemons.start(short_dir / "s", *store_args(short_dir, "vol"), "--file-direct")
    again = short_dir / "again.raw"
    tool("nbdcopy", daemon.uri, str(again))
    assert sha256(again) == sha256(image)
    daemon.stop(signal.SIGINT)


def test_what_clients_are_offered(short_dir: Path, daemons: Daemons) -> None:
    daemon = daemons.start(short_dir / "s", *store_args(short_dir, "vol", "--store-size", "4MiB"))
    info = json.loads(tool("nbdinfo", "--json", daemon.uri).stdout)
    (export,) = info["exports"]
    for flag in ("can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero", "can_cache"):
        assert export[flag] is True, flag
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096


def _fio(daemon_uri: str, *options: str) -> dict[str, object]:
    """One fio job (libnbd underneath) against the daemon; its JSON job record."""
    proc = tool(
        "fio",
        "--name=filedisk",
        "--ioengine=nbd",
        f"--uri={daemon_uri}",
        "--output-format=json",
        "--verify_state_save=0",
        *options,
    )
    # The nbd engine says "fio: connected to NBD server" on stdout before the report.
    (job,) = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"]
    assert job["error"] == 0, job
    return dict(job)


def test_fio_verifies_pipelined_writes_and_again_after_a_restart(
    short_dir: Path, daemons: Daemons
) -> None:
    """fio writes blocks carrying their own checksum, many in flight, and reads them back.
    On ext4 every write goes through the connection's writer thread while the connection
    keeps receiving, and 64 MiB of mixed sizes is four times what its receive buffers hold,
    so payloads are swapped out of the buffer under the writer many times over: a byte lost,
    misplaced or overwritten before it was written fails the run. The sequential pass is
    verified again by a second daemon on the same file."""
    args = store_args(short_dir, "vol", "--store-size", "64MiB")
    daemon = daemons.start(short_dir / "s", *args)
    verify = ["--verify=crc32c", "--verify_fatal=1"]
    job = _fio(daemon.uri, "--rw=randwrite", "--bsrange=512-256k", "--iodepth=32", *verify)
    assert job["write"]["io_bytes"] == 64 * MiB  # type: ignore[index]
    assert job["read"]["io_bytes"] == 64 * MiB  # type: ignore[index]
    sequential = ["--rw=write", "--bs=1M", "--iodepth=8", *verify]
    job = _fio(daemon.uri, *sequential, "--do_verify=0")
    assert job["write"]["io_bytes"] == 64 * MiB  # type: ignore[index]
    daemon.stop(signal.SIGTERM)
    daemon = daemons.start(short_dir / "s", *store_args(short_dir, "vol"))
    job = _fio(daemon.uri, *sequential, "--verify_only")
    assert job["read"]["io_bytes"] == 64 * MiB  # type: ignore[index]
    daemon.stop(signal.SIGTERM)


def scrape(daemon: Daemon) -> dict[str, float]:
    """The daemon's metrics, by series name and labels, once ``promtool check metrics``
    (Debian's prometheus package) has accepted them."""
    found = re.search(r"usbd-filedisk publishes metrics at (\S+)", daemon.output())
    assert found, daemon.report()
    with urllib.request.urlopen(found.group(1), timeout=TOOL_TIMEOUT) as reply:
        text = reply.read().decode()
    checked = subprocess.run(
        [require_tool("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )
    assert checked.returncode == 0, f"{checked.stdout}\n{checked.stderr}\n{text}"
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_follow_what_is_written_and_trimmed(short_dir: Path, daemons: Daemons) -> None:
    """The allocated bytes a scrape reports are the file's (what du sees), and they move by
    what qemu-io wrote and discarded."""
    args = store_args(short_dir, "vol", "--store-size", "64MiB", "--metrics", "127.0.0.1:0")
    daemon = daemons.start(short_dir / "s", *args)
    path = short_dir / "vol.bin"

    def on_disk() -> int:
        return path.stat().st_blocks * 512

    first = scrape(daemon)
    assert first["usbd_file_allocated_bytes"] == on_disk() == 0
    assert first["usbd_file_size_bytes"] == 64 * MiB
    assert first["usbd_file_punch_holes"] == 1
    tool("qemu-io", "-f", "raw", daemon.uri, "-c", "write -P 0x5a 8M 24M", "-c", "flush")
    grown = scrape(daemon)["usbd_file_allocated_bytes"]
    assert grown == on_disk()
    assert 24 * MiB <= grown <= 24 * MiB + 64 * KiB, grown
    tool("qemu-io", "-f", "raw", daemon.uri, "-c", "discard 8M 16M")
    values = scrape(daemon)
    trimmed = values["usbd_file_allocated_bytes"]
    assert trimmed == on_disk()
    assert 16 * MiB - 64 * KiB <= grown - trimmed <= 16 * MiB + 64 * KiB, (grown, trimmed)
    assert values["usbd_request_bytes_total{command=write,export=}"] == 24 * MiB
    assert values["usbd_request_bytes_total{command=trim,export=}"] == 16 * MiB
    # The same figure heads the line SIGUSR1 logs.
    daemon.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while "statistics:" not in daemon.log():
        assert time.monotonic() < deadline, daemon.report()
        time.sleep(0.05)
    (line,) = [line for line in daemon.log().splitlines() if "statistics:" in line]
    expected = f"usbd-filedisk statistics: allocated bytes {format_size(on_disk())}, size 64 MiB"
    assert expected in line, line
    daemon.stop()
