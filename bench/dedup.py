"""The dedup suite of the benchmark: usbd-dedup against usbd-filedisk and usbd-ramdisk.

All three run side by side in ``run.run_suite``'s rotation (the order rotates every round),
each on a device of ``--size`` (1 GiB); usbd-dedup's volume and usbd-filedisk's file are in
the same directory under the run's temporary directory (a disk filesystem, not tmpfs: the
suite refuses tmpfs, see ``missing``), so both go through the same filesystem and page cache.

What fio writes matters here as it does nowhere else. By default fio fills each of its
``iodepth`` buffers once and, before every write, stamps each 512-byte sector with the
offset and the time (``scramble_buffers``): every block it writes is new. That is right for
the prefill and the random writes; ``refill_buffers`` makes each buffer fresh random data,
and with a fixed ``randseed`` the n-th buffer of a job is the same in every run of the same
job shape (bs, iodepth, size; one job), whatever the offset. Not across ``loops`` or a
``time_based`` wrap: those go on with new data (checked with fio 3.33). Hence the layout,
with ``D`` a quarter of the device:

- ``[0, D)`` stream X, ``[D, 2D)`` stream Y (two seeds), written once after the prefill;
- ``[2D, 3D)`` the target: Y after the prefill, then X, Y, X... (``dup-write-1M``);
- ``[3D, size)`` where ``uniq-write-1M`` and ``rand-write-4K`` write (unique data).

Workloads, each against each server:

- ``dup-write-1M``: one-pass fio jobs of stream X or Y over the target, alternating (each
  pass replaces every block with one stored elsewhere: no block added, none freed), back to
  back for ``--runtime`` seconds; MiB/s is bytes over the passes' own fio runtimes, CPU is
  over the whole span. Target: >= 0.5x usbd-ramdisk's (the same passes).
- ``uniq-write-1M``: time based, ``refill_buffers``, ``randrepeat=0`` (fresh random data,
  incompressible, never the same twice). Target: >= 0.5x usbd-filedisk's.
- ``seq-read-1M`` (target >= 0.8x usbd-filedisk's), ``rand-read-4K`` over the whole device,
  ``rand-write-4K`` over ``[3D, size)``: as in the other suites.

So the device always holds ``size - D`` distinct blocks of ``size`` mapped ones. That is
checked three ways: usbd-dedup's statistics (SIGUSR1, logged at INFO) after every one of its
runs, ``usbd-dedup --stats`` (and ``--check``) with the daemon stopped after the last round,
and the blocks of usbd-filedisk's file hashed after the last round (fio's side alone).

Memory: usbd-dedup's resident memory (VmRSS empty and after the writes, VmHWM), and, after
the rotation, ``--dedup-rss-size`` (4 GiB) of unique data written in one pass to a fresh
volume run with ``-dedup-memcache`` ``--dedup-rss-memcache`` (64 MiB), its resident memory
sampled as the stored bytes grow: it must not grow with the volume.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import run
from run import MiB, Server, Suite, SuiteHooks, Workload

SUITE = "dedup"
USBD = "usbd-dedup"
#: Seeds of the two duplicate streams, X and Y (any two values; not fio's default).
SEEDS = {"X": 0x5EED_0001, "Y": 0x5EED_0002}
#: The shape of every pass of a duplicate stream: it must not change between passes, or the
#: buffers differ (fio fills its iodepth buffers once at the start, from the same generator).
PASS_SHAPE = {"rw": "write", "bs": "1M", "iodepth": 8}
FS_BLOCK = 4096  # the granularity of the file check (usbd-dedup's default block size)
STATS_TIMEOUT = 15.0
#: Statistics the checks use, as ``usbd-dedup --stats`` names them.
STAT_KEYS = (
    "logical bytes",
    "mapped blocks",
    "unique blocks",
    "stored bytes",
    "dedup ratio",
    "compression ratio",
    "free slots",
    "block size",
    "size",
)


def size_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else run.parse_size(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dedup suite")
    group.add_argument(
        "--dedup-rss-size",
        type=size_or_zero,
        default=4 << 30,
        help="unique data written to a fresh usbd-dedup volume to measure its resident memory "
        "after the rotation (default 4GiB; 0: skip)",
    )
    group.add_argument(
        "--dedup-rss-memcache",
        default="64MiB",
        help="-dedup-memcache of that volume's daemon (default 64MiB)",
    )
    group.add_argument(
        "--dedup-option",
        action="append",
        default=[],
        metavar="FLAG",
        help="one more flag for the rotation's usbd-dedup, e.g. --dedup-option=-dedup-verify "
        "or --dedup-option=-dedup-compress=identity (repeatable)",
    )


# -- where the files are ---------------------------------------------------------------


def filesystem(path: Path) -> tuple[str, str, str]:
    """(type, source, mount point) of the filesystem holding ``path``."""
    best = ("", "", "")
    target = os.path.realpath(path)
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            point = left.split()[4].replace("\\040", " ")
            fstype, source = [*right.split(), "", ""][:2]
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best[2]):
                best = (fstype, source, point)
    return best


def missing(suite: Suite, args: argparse.Namespace) -> str | None:
    """What the suite cannot do without, or None (its peers alone can run without
    usbd-dedup)."""
    chosen = suite.usbd in args.servers
    if chosen and importlib.util.find_spec(run.USBD_MODULES[suite.usbd]) is None:
        return "usbd-dedup is not installed (pip install -e 'packages/usbd-dedup[test]')"
    where = Path(args.tmpdir or tempfile.gettempdir())
    fstype = filesystem(where)[0]
    if fstype in ("tmpfs", "ramfs"):
        return (
            f"{where} is on {fstype}: usbd-dedup and usbd-filedisk are compared on a disk"
            " filesystem (--tmpdir /var/tmp, say)"
        )
    if args.size < 64 * MiB or args.size % (4 * MiB):
        return f"--size {args.size} is not a multiple of 4 MiB of at least 64 MiB"
    return None


# -- usbd-dedup ----------------------------------------------------------------------------


@dataclass
class DedupServer(Server):
    """usbd-dedup on ``<store-dir>/<store-name>.dedup/``; its allocation is that of its data
    files ``blocks.<N>`` (what ``du`` shows)."""

    store: Path | None = None

    def allocated(self) -> int | None:
        if self.store is None:
            return None
        total = 0
        for path in self.store.glob("blocks.*"):
            with contextlib.suppress(OSError):
                total += path.stat().st_blocks * 512
        return total


def dedup_server(
    base: Path, name: str, size: int, options: Sequence[str] = (), log_level: str = "info"
) -> DedupServer:
    """usbd-dedup on a volume of its own in ``base`` (created at the first start). INFO, so
    that SIGUSR1's statistics line reaches its log."""
    argv = [sys.executable, "-m", run.USBD_MODULES[USBD], "--listen", str(base / f"{name}.sock")]
    argv += ["--store-dir", str(base), "--store-name", name, "--store-size", str(size)]
    argv += ["--log-level", log_level, *options]
    return DedupServer(
        name, argv, base / f"{name}.sock", base / f"{name}.log", store=base / f"{name}.dedup"
    )


def store_flags(server: DedupServer) -> list[str]:
    """The shared storage flags of ``server``'s volume, for ``--stats`` and ``--check``."""
    argv = server.argv
    flags = []
    for flag in ("--store-dir", "--store-name", "--store-size"):
        flags += [flag, argv[argv.index(flag) + 1]]
    return flags


def number(text: str) -> float | None:
    match = re.match(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", text)
    return float(match.group(1)) if match else None


def parse_stats(text: str) -> dict[str, float]:
    """``key: value`` lines (``--stats``), keeping those whose value starts with a number."""
    stats: dict[str, float] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        found = number(value) if sep else None
        if found is not None:
            stats[key.strip().lower()] = found
    return stats


def parse_stats_line(line: str) -> dict[str, float]:
    """The statistics in one log line (``statistics: logical bytes 1, mapped blocks 2, ...``;
    ``key: v`` and ``key=v`` too): in each comma-separated piece, the longest known key
    followed by a number."""
    stats: dict[str, float] = {}
    keys = sorted(STAT_KEYS, key=len, reverse=True)
    for piece in re.split(r"[,;]", line.lower()):
        for key in keys:
            spelled = "[ _-]".join(map(re.escape, key.split()))
            match = re.search(rf"(?:^|[\s:]){spelled}\s*[:=]?\s*(?=[-+.\d])", piece)
            if match is not None:
                value = number(piece[match.end() :])
                if value is not None and key not in stats:
                    stats[key] = value
                break
    return stats


def live_stats(server: Server) -> dict[str, float] | None:
    """SIGUSR1, then the statistics line the daemon logs (None if none within the timeout)."""
    if server.process is None or server.process.poll() is not None:
        return None
    start = server.log_path.stat().st_size
    server.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + STATS_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.05)
        with server.log_path.open("rb") as log:
            log.seek(start)
            new = log.read().decode(errors="replace")
        for line in new.splitlines():
            stats = parse_stats_line(line)
            if "unique blocks" in stats or "dedup ratio" in stats:
                return stats
    return None


def offline(server: DedupServer, what: str) -> dict[str, Any]:
    """``usbd-dedup --stats`` or ``--check`` on the (stopped) volume: exit code, output, the
    statistics it printed."""
    argv = [sys.executable, "-m", run.USBD_MODULES[USBD], f"--{what}", *store_flags(server)]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    output = (done.stdout + done.stderr).strip()
    return {
        "argv": argv,
        "exit": done.returncode,
        "seconds": time.monotonic() - started,
        "output": output[-4000:],
        "stats": parse_stats(done.stdout),
        "summary": next(
            (line for line in reversed(output.splitlines()) if line.startswith("check:")), ""
        ),
    }


# -- the layout ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The regions of a device of ``size`` bytes (see the module's docstring)."""

    size: int

    @property
    def quarter(self) -> int:
        return self.size // 4 // MiB * MiB

    @property
    def source(self) -> dict[str, int]:
        """Where each duplicate stream is kept."""
        return {"X": 0, "Y": self.quarter}

    @property
    def target(self) -> int:
        return 2 * self.quarter

    @property
    def writes(self) -> tuple[int, int]:
        """(offset, size) of the region the unique and random writes go to."""
        return 3 * self.quarter, self.size - 3 * self.quarter

    def expected(self, block: int) -> dict[str, int]:
        """Mapped and distinct blocks of ``block`` bytes: the target is a copy."""
        return {
            "mapped blocks": self.size // block,
            "unique blocks": (self.size - self.quarter) // block,
        }


def stream_pass(server: Server, layout: Layout, stream: str, offset: int) -> dict[str, Any]:
    """One pass of duplicate stream ``stream`` over ``quarter`` bytes at ``offset``."""
    options = {
        **PASS_SHAPE,
        "size": layout.quarter,
        "offset": offset,
        "randseed": SEEDS[stream],
        "refill_buffers": 1,
    }
    return run.fio(server.uri, f"stream-{stream}-{server.name}", options, 900)


def hash_blocks(path: Path, offset: int, length: int) -> list[bytes]:
    digests = []
    with path.open("rb") as file:
        file.seek(offset)
        left = length
        while left > 0:
            chunk = file.read(min(left, 16 * MiB))
            if not chunk:
                break
            left -= len(chunk)
            for at in range(0, len(chunk), FS_BLOCK):
                digests.append(hashlib.blake2b(chunk[at : at + FS_BLOCK], digest_size=16).digest())
    return digests


def check_file(path: Path, layout: Layout, target_stream: str) -> dict[str, Any]:
    """Hash every 4 KiB block of usbd-filedisk's file: fio's side of the layout, without
    usbd-dedup (the streams are what they must be, the target is a copy of one, the rest is
    distinct from everything)."""
    started = time.monotonic()
    q = layout.quarter
    regions = {
        "X": hash_blocks(path, 0, q),
        "Y": hash_blocks(path, q, q),
        "target": hash_blocks(path, 2 * q, q),
        "rest": hash_blocks(path, 3 * q, layout.size - 3 * q),
    }
    everything = [d for blocks in regions.values() for d in blocks]
    zero = hashlib.blake2b(bytes(FS_BLOCK), digest_size=16).digest()
    source = regions[target_stream]
    figures = {
        "blocks": len(everything),
        "distinct": len(set(everything)),
        "zero_blocks": everything.count(zero),
        "target_stream": target_stream,
        "target_equal_blocks": sum(a == b for a, b in zip(regions["target"], source, strict=True)),
        "X_distinct": len(set(regions["X"])),
        "Y_distinct": len(set(regions["Y"])),
        "X_Y_shared": len(set(regions["X"]) & set(regions["Y"])),
        "rest_distinct": len(set(regions["rest"])),
        "rest_shared_with_streams": len(set(regions["rest"]) & set(regions["X"] + regions["Y"])),
        "seconds": time.monotonic() - started,
    }
    blocks_q = q // FS_BLOCK
    figures["ok"] = (
        figures["blocks"] == layout.size // FS_BLOCK
        and figures["distinct"] == layout.expected(FS_BLOCK)["unique blocks"]
        and figures["zero_blocks"] == 0
        and figures["target_equal_blocks"] == blocks_q
        and figures["X_distinct"] == figures["Y_distinct"] == blocks_q
        and figures["X_Y_shared"] == 0
        and figures["rest_shared_with_streams"] == 0
    )
    return figures


# -- the suite's steps ---------------------------------------------------------------------


@dataclass
class Extras:
    """What the dedup suite does besides ``run.run_suite``'s, as its hooks."""

    args: argparse.Namespace
    layout: Layout
    servers: Mapping[str, Server]
    #: The stream each server's target holds now.
    target: dict[str, str] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def dedup(self) -> DedupServer | None:
        server = self.servers.get(USBD)
        return server if isinstance(server, DedupServer) else None

    def hooks(self) -> SuiteHooks:
        return SuiteHooks(
            after_prefill=self.after_prefill, after_rounds=self.after_rounds, measure=self.measure
        )

    def after_prefill(self, result: dict[str, Any]) -> None:
        """The streams into their sources, Y into the target, on every device."""
        for name, server in self.servers.items():
            speeds = []
            for stream, offset in (*self.layout.source.items(), ("Y", self.layout.target)):
                job = stream_pass(server, self.layout, stream, offset)
                speeds.append(f"{stream}@{offset // MiB}M {job['write']['bw_bytes'] / MiB:.0f}")
            self.target[name] = "Y"
            print(f"bench: dedup: {name}: streams written (MiB/s: {', '.join(speeds)})", flush=True)
        os.sync()
        if self.dedup is not None:
            allocated = self.dedup.allocated() or 0
            stats = self.check_stats("after the streams")
            self.result["after_setup"] = {"stats": stats, "allocated_bytes": allocated}

    def check_stats(self, when: str) -> dict[str, Any]:
        """usbd-dedup's live statistics against the layout's expectation; printed."""
        assert self.dedup is not None
        stats = live_stats(self.dedup)
        record: dict[str, Any] = {"when": when, "stats": stats}
        if stats is None:
            record["ok"] = None
            print(f"bench: dedup: {USBD} logged no statistics on SIGUSR1 ({when})", flush=True)
            self.result.setdefault("stats_checks", []).append(record)
            return record
        block = int(stats.get("block size") or FS_BLOCK)
        expected = self.layout.expected(block)
        record["expected"] = expected
        record["ok"] = all(stats.get(key) == value for key, value in expected.items())
        self.result.setdefault("stats_checks", []).append(record)
        found = ", ".join(
            f"{key} {stats.get(key, float('nan')):.0f} (expected {value})"
            for key, value in expected.items()
        )
        ratio = stats.get("dedup ratio")
        verdict = "as expected" if record["ok"] else "NOT as expected"
        print(
            f"bench: dedup: {USBD} {when}: {found}, dedup ratio"
            f" {'-' if ratio is None else f'{ratio:.3f}'}: {verdict}",
            flush=True,
        )
        return record

    def measure(
        self, server: Server, workload: Workload, args: argparse.Namespace
    ) -> dict[str, float | int | str]:
        offset, length = self.layout.writes
        if workload.name == "dup-write-1M":
            sample = self.duplicate_passes(server, args)
        elif workload.name == "uniq-write-1M":
            extra = {"offset": offset, "size": length, "refill_buffers": 1, "randrepeat": 0}
            sample = run.measure(server, workload, args, extra)
        elif workload.name == "rand-write-4K":
            sample = run.measure(server, workload, args, {"offset": offset, "size": length})
        else:
            sample = run.measure(server, workload, args)
        if server is self.dedup:
            self.check_stats(f"after {workload.name}")
        return sample

    def duplicate_passes(
        self, server: Server, args: argparse.Namespace
    ) -> dict[str, float | int | str]:
        """Passes of X, Y, X... over the target, back to back for ``--runtime`` seconds."""
        cpu_before = server.cpu_seconds()
        started = time.monotonic()
        jobs = []
        while not jobs or time.monotonic() - started < args.runtime:
            stream = "X" if self.target[server.name] == "Y" else "Y"
            jobs.append(stream_pass(server, self.layout, stream, self.layout.target))
            self.target[server.name] = stream
        cpu = server.cpu_seconds() - cpu_before
        wall = time.monotonic() - started
        stats = [job["write"] for job in jobs]
        ios = sum(s["total_ios"] for s in stats)
        seconds = sum(s["runtime"] for s in stats) / 1000 or 1e-3
        return {
            "mib_s": sum(s["io_bytes"] for s in stats) / MiB / seconds,
            "iops": ios / seconds,
            "ios": ios,
            "lat_mean_us": sum(s["lat_ns"]["mean"] * s["total_ios"] for s in stats)
            / max(ios, 1)
            / 1000,
            "clat_p99_us": max(
                s["clat_ns"].get("percentile", {}).get("99.000000", 0) for s in stats
            )
            / 1000,
            "server_cpu": cpu / wall,
            "server_cpu_us_per_io": cpu / max(ios, 1) * 1e6,
            "fio_usr_cpu": sum(job["usr_cpu"] for job in jobs) / len(jobs),
            "fio_sys_cpu": sum(job["sys_cpu"] for job in jobs) / len(jobs),
            "passes": len(jobs),
            "busy_share": seconds / wall,  # the rest is fio's start and connection per pass
        }

    def after_rounds(self, result: dict[str, Any]) -> None:
        """fio's side (usbd-filedisk's file hashed), then usbd-dedup stopped for ``--stats``
        and ``--check``, and started again for the verify passes."""
        filedisk = self.servers.get("usbd-filedisk")
        if filedisk is not None and filedisk.backing is not None:
            figures = check_file(filedisk.backing, self.layout, self.target[filedisk.name])
            self.result["file_check"] = figures
            print(
                f"bench: dedup: usbd-filedisk's file: {figures['distinct']} distinct of"
                f" {figures['blocks']} 4 KiB blocks (expected"
                f" {self.layout.expected(FS_BLOCK)['unique blocks']}), the target equal to stream"
                f" {figures['target_stream']} in {figures['target_equal_blocks']} blocks:"
                f" {'as expected' if figures['ok'] else 'NOT as expected'}",
                flush=True,
            )
        server = self.dedup
        if server is None:
            return
        server.record_memory("before_stop")
        self.result["log_first_run"] = server.log().strip()
        stop_started = time.monotonic()
        server.stop()
        self.result["stop_s"] = time.monotonic() - stop_started
        self.result["stop_exit"] = server.process.returncode if server.process else None
        for what in ("stats", "check"):
            done = offline(server, what)
            self.result[what] = done
            line = done["summary"] or " ".join(done["output"].split())[:200]
            print(f"bench: dedup: {USBD} --{what}: exit {done['exit']}: {line}", flush=True)
        stats = self.result["stats"]["stats"]
        block = int(stats.get("block size") or FS_BLOCK)
        self.result["stats"]["expected"] = expected = self.layout.expected(block)
        self.result["stats"]["ok"] = all(stats.get(k) == v for k, v in expected.items())
        restart = time.monotonic()
        server.start()
        self.result["restart_s"] = time.monotonic() - restart


def rss_probe(base: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``--dedup-rss-size`` of unique data in one pass to a fresh volume with a small
    memcache; the daemon's resident memory sampled as its stored bytes grow."""
    size = args.dedup_rss_size
    base.mkdir(parents=True, exist_ok=True)
    server = dedup_server(base, f"{USBD}-rss", size, ["-dedup-memcache", args.dedup_rss_memcache])
    samples: list[tuple[float, int, int, int]] = []  # (seconds, stored bytes, VmRSS, VmHWM)
    stop = threading.Event()
    figures: dict[str, Any] = {"size": size, "memcache": args.dedup_rss_memcache}
    try:
        server.start()
        time.sleep(0.5)
        figures["empty"] = server.record_memory("empty")
        started = time.monotonic()

        def sample() -> None:
            while not stop.wait(0.25):
                memory = run.read_proc_status(server.pid)
                if memory:
                    samples.append(
                        (
                            time.monotonic() - started,
                            server.allocated() or 0,
                            memory.get("VmRSS", 0),
                            memory.get("VmHWM", 0),
                        )
                    )

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        cpu = server.cpu_seconds()
        options = {
            **PASS_SHAPE,
            "size": size,
            "refill_buffers": 1,
            "randrepeat": 0,
            "end_fsync": 1,
        }
        job = run.fio(server.uri, f"rss-{server.name}", options, 3600)
        figures["fio_mib_s"] = job["write"]["bw_bytes"] / MiB
        figures["seconds"] = time.monotonic() - started
        figures["server_cpu"] = (server.cpu_seconds() - cpu) / figures["seconds"]
        time.sleep(1.0)  # the flush's after-effects (punching, the index's compaction)
        stop.set()
        sampler.join()
        figures["after"] = server.record_memory("after_write")
        figures["live_stats"] = live_stats(server)
    finally:
        stop.set()
        server.stop()
    figures["stop_exit"] = server.process.returncode if server.process else None
    figures["samples"] = samples
    figures["stats"] = offline(server, "stats")
    figures["allocated_bytes"] = server.allocated()
    figures["log"] = server.log().strip()
    # Where RSS stood as each GiB (each quarter of the volume, if smaller) was stored.
    step = 1 << 30 if size >= 2 << 30 else max(size // 4, MiB)
    marks = []
    for n in range(1, size // step + 1):
        hit = next((s for s in samples if s[1] >= n * step), None)
        if hit is not None:
            marks.append({"stored": n * step, "seconds": hit[0], "rss": hit[2], "hwm": hit[3]})
    figures["marks"] = marks
    figures["peak_rss"] = max([s[2] for s in samples] + [figures["after"].get("VmRSS", 0)])
    figures["peak_hwm"] = max([s[3] for s in samples] + [figures["after"].get("VmHWM", 0)])
    shutil.rmtree(server.store or base, ignore_errors=True)  # 4 GiB of disk back
    return figures


# -- the suite -----------------------------------------------------------------------------


def run_suite(
    suite: Suite,
    names: Sequence[str],
    workloads: Sequence[Workload],
    args: argparse.Namespace,
    workdir: Path,
) -> dict[str, Any]:
    """The three devices in the rotation with this suite's hooks, then the memory probe."""
    base = workdir / SUITE
    base.mkdir(parents=True, exist_ok=True)
    where = filesystem(base)
    print(f"bench: dedup: files in {base} ({where[0]} on {where[1]})", flush=True)
    layout = Layout(args.size)
    plain = run.make_servers(base, args.size)
    servers: dict[str, Server] = {}
    for name in names:
        if name == USBD:
            servers[name] = dedup_server(base, USBD, args.size, args.dedup_option)
        else:
            servers[name] = plain[name]
    extras = Extras(args, layout, servers)
    result = run.run_suite(suite, servers, names, workloads, args, hooks=extras.hooks())
    if USBD in names and args.dedup_rss_size:
        print(
            f"bench: dedup: {args.dedup_rss_size / (1 << 30):g} GiB of unique data to a fresh"
            f" volume with -dedup-memcache {args.dedup_rss_memcache}",
            flush=True,
        )
        probe = rss_probe(base / "rss", args)
        extras.result["rss_probe"] = probe
        print(
            f"bench: dedup: written at {probe['fio_mib_s']:.0f} MiB/s; peak RSS"
            f" {probe['peak_hwm'] / MiB:.1f} MiB (VmHWM)",
            flush=True,
        )
    offset, length = layout.writes
    result["dedup"] = {
        "filesystem": {"type": where[0], "source": where[1], "mount": where[2]},
        "options": list(args.dedup_option),
        "layout": {
            "size": layout.size,
            "stream_sources": layout.source,
            "target": layout.target,
            "region": layout.quarter,
            "writes": {"offset": offset, "size": length},
            "seeds": SEEDS,
            "pass": PASS_SHAPE,
        },
        **extras.result,
    }
    return result


# -- reporting -----------------------------------------------------------------------------


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MiB:.1f}"


def plain(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:.3f}"


def report(suite: Suite, result: dict[str, Any], args: argparse.Namespace) -> str:
    """run.report's tables, then the dedup checks, the statistics and memory."""
    text = [run.report(suite, result, args.rounds, args.stat, args.size)]
    dedup = result["dedup"]
    layout = dedup["layout"]
    fs = dedup["filesystem"]
    q = layout["region"] // MiB
    text += [
        "",
        f"dedup layout ({layout['size'] // MiB} MiB devices on {fs['type']} {fs['source']}):"
        f" stream X at 0, Y at {q} MiB, the target ({q} MiB at {2 * q} MiB) rewritten with"
        f" X, Y, X... by dup-write-1M; uniq-write-1M and rand-write-4K over the last"
        f" {layout['writes']['size'] // MiB} MiB",
    ]
    if dedup.get("options"):
        text.append(f"usbd-dedup options: {' '.join(dedup['options'])}")
    workloads = result["workloads"]
    ours = workloads.get("dup-write-1M", {}).get(USBD, {})
    if ours:
        passes = [r.get("passes", 0) for r in ours["rounds"]]
        busy = [r.get("busy_share", 0) for r in ours["rounds"]]
        text.append(
            f"dup-write-1M on {USBD}: {min(passes)}-{max(passes)} passes of {q} MiB per run,"
            f" fio busy {min(busy):.0%}-{max(busy):.0%} of the span (the rest: fio starting)"
        )
    # The duplicate writes against the RAM disk's time-based sequential write too (one fio
    # job, no pass boundaries): the stricter reading of the target.
    dup = workloads.get("dup-write-1M", {}).get(USBD, {}).get("summary")
    ramdisk = workloads.get("uniq-write-1M", {}).get("usbd-ramdisk", {}).get("summary")
    if dup and ramdisk:
        found = run.ratio(dup["mib_s"], ramdisk["mib_s"])
        minimum = suite.more_targets[0][1]["dup-write-1M"]
        verdict = "met" if found is not None and found >= minimum else "NOT met"
        text.append(
            f"dup-write-1M {USBD} / uniq-write-1M usbd-ramdisk (its time-based sequential"
            f" write): {run.times(found)}, >= {minimum:.1f}x ({verdict})"
        )
    checks = dedup.get("stats_checks", [])
    if checks:
        failed = [c for c in checks if c.get("ok") is not True]
        last = checks[-1].get("stats") or {}
        expected = checks[-1].get("expected", {})
        text.append(
            f"{USBD} statistics (SIGUSR1) after the setup and each of its {len(checks) - 1}"
            f" runs: unique blocks {last.get('unique blocks', float('nan')):.0f} of"
            f" {last.get('mapped blocks', float('nan')):.0f} mapped (expected"
            f" {expected.get('unique blocks', '?')} of {expected.get('mapped blocks', '?')}):"
            + (" as expected every time" if not failed else f" NOT as expected {len(failed)}x")
        )
        for check in failed[:5]:
            text.append(f"  {check['when']}: {check.get('stats')}")
    file_check = dedup.get("file_check")
    if file_check:
        text.append(
            f"usbd-filedisk's file (fio's side): {file_check['distinct']} distinct of"
            f" {file_check['blocks']} 4 KiB blocks, {file_check['zero_blocks']} zero, the"
            f" target = stream {file_check['target_stream']} in"
            f" {file_check['target_equal_blocks']} blocks, X and Y share"
            f" {file_check['X_Y_shared']}: "
            + ("as expected" if file_check["ok"] else "NOT as expected")
        )
    stats = dedup.get("stats")
    if stats:
        figures = stats["stats"]
        shown = ", ".join(f"{key} {plain(value)}" for key, value in figures.items())
        text.append(f"{USBD} --stats after the rounds (exit {stats['exit']}): {shown or '-'}")
        expected = stats.get("expected", {})
        if expected:
            ratio = expected["mapped blocks"] / expected["unique blocks"]
            text.append(
                f"  expected: {expected['mapped blocks']} mapped, {expected['unique blocks']}"
                f" unique blocks (a ratio of {ratio:.3f}):"
                f" {'as expected' if stats.get('ok') else 'NOT as expected'}"
            )
    check = dedup.get("check")
    if check:
        text.append(
            f"{USBD} --check after a clean stop: exit {check['exit']},"
            f" {check['summary'] or 'no summary line'} ({check['seconds']:.1f} s)"
        )
    memory = result["memory"].get(USBD, {})
    if memory:
        peak = max(values.get("VmHWM", 0) for values in memory.values())
        text.append(
            f"{USBD} resident memory (default -dedup-memcache): empty"
            f" {mib(memory.get('empty', {}).get('VmRSS'))} MiB, after the write runs"
            f" {mib(memory.get('after_writes', {}).get('VmRSS'))} MiB, peak (VmHWM of the"
            f" rotation's run) {mib(memory.get('before_stop', {}).get('VmHWM', peak))} MiB"
        )
    probe = dedup.get("rss_probe")
    if probe:
        marks = ", ".join(
            f"{m['stored'] / (1 << 30):g} GiB {m['rss'] / MiB:.0f}" for m in probe["marks"]
        )
        pstats = probe["stats"]["stats"]
        text += [
            "",
            f"memory: {probe['size'] / (1 << 30):g} GiB of unique data in one pass (1 MiB,"
            f" depth 8, FLUSH at the end) to a fresh volume, -dedup-memcache {probe['memcache']}:"
            f" {probe['fio_mib_s']:.0f} MiB/s, daemon CPU {probe['server_cpu']:.2f}",
            f"  resident memory: empty {mib(probe['empty'].get('VmRSS'))} MiB; as stored data"
            f" grew (MiB): {marks or '-'}; at the end {mib(probe['after'].get('VmRSS'))} MiB;"
            f" peak (VmHWM) {mib(probe['peak_hwm'])} MiB",
            f"  --stats: unique blocks {pstats.get('unique blocks', float('nan')):.0f}"
            f" (expected {probe['size'] // int(pstats.get('block size') or FS_BLOCK)}), stored"
            f" {mib(pstats.get('stored bytes'))} MiB, dedup ratio"
            f" {pstats.get('dedup ratio', float('nan')):.3f}, compression ratio"
            f" {pstats.get('compression ratio', float('nan')):.3f}; data files"
            f" {mib(probe['allocated_bytes'])} MiB allocated",
        ]
    return "\n".join(text)
