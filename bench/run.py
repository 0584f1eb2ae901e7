"""Benchmark usbd-ramdisk against nbdkit with fio over NBD on unix sockets (not a test).

Three servers, each a 1 GiB RAM disk: ``usbd-ramdisk``, ``nbdkit memory`` (C) and nbdkit's
Python plugin with ``bench/nbdkit_ramdisk.py``. They run side by side for the whole run; every
device is filled by one sequential write pass first, so that reads read data, not holes.
Then, round after round, each workload runs against each server in turn (the order rotates
every round), so that noise from the machine falls on all of them alike. The result is a
table of MiB/s, IOPS, server CPU per I/O and usbd's ratio to each server, a JSON file with
every number, the daemon's resident memory when empty and after the writes, and fio
``verify=crc32c`` passes against usbd to show that speed did not cost correctness.

Targets (from the issue; reported, not asserted): usbd >= 1.0x nbdkit memory on 1 MiB
sequential, >= 1.3x on 4 KiB random, and under 80 MiB resident with an empty 1 GiB disk.

Usage: ``python bench/run.py [--runtime 10] [--rounds 3] [--output bench-results/bench.json]``
(``nox -s bench -- ARGS`` passes ARGS through). Uses only the standard library and the
installed usbd packages; needs ``fio`` (with ``ioengine=nbd``) and ``nbdkit`` (with its
python plugin) on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
SERVERS = ("usbd", "nbdkit-memory", "nbdkit-python")
RSS_TARGET_MIB = 80
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class Workload:
    """One fio job shape: direction and pattern, block size, queue depth."""

    name: str
    rw: str
    bs: str
    iodepth: int
    direction: str  # the key of fio's JSON result: "read" or "write"
    target: float | None  # usbd / nbdkit-memory ratio the issue asks for


WORKLOADS = (
    Workload("seq-read-1M", "read", "1M", 8, "read", 1.0),
    Workload("seq-write-1M", "write", "1M", 8, "write", 1.0),
    Workload("rand-read-4K", "randread", "4k", 32, "read", 1.3),
    Workload("rand-write-4K", "randwrite", "4k", 32, "write", 1.3),
)


def parse_size(text: str) -> int:
    """``1GiB``, ``512M``, ``4096``: binary units whatever the spelling (as nbdkit and fio)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in units else ""
    try:
        number = int(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return number * units[unit]


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


# -- processes ---------------------------------------------------------------------------


def read_proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes (Linux only; empty elsewhere)."""
    result: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return result
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            result[key] = int(rest.split()[0]) * 1024
    return result


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process (all its threads) has used so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies, so no server outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Server:
    """One NBD server process listening on a unix socket in the run's temporary directory."""

    name: str
    argv: list[str]
    socket_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    memory: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket_path}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C reaches us, and we stop it in order
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads here
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode} at start:\n{self.log()}"
                )
            if self._accepts():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen within {START_TIMEOUT}s:\n{self.log()}")

    def _accepts(self) -> bool:
        """True once the socket accepts connections (the file appears before listen())."""
        if not self.socket_path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket_path))
            except OSError:
                return False
            # Read the server's greeting so that it sees a client, not a reset.
            probe.settimeout(2.0)
            with contextlib.suppress(OSError):
                probe.recv(64)
        return True

    def record_memory(self, label: str) -> dict[str, int]:
        self.memory[label] = read_proc_status(self.pid)
        return self.memory[label]

    def stop(self) -> None:
        """SIGTERM (usbd flushes and closes the device), then SIGKILL if it hangs."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def make_servers(workdir: Path, size: int) -> dict[str, Server]:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        sys.exit("bench: nbdkit not found on PATH (Debian: apt-get install nbdkit)")

    def sock(name: str) -> Path:
        return workdir / f"{name}.sock"

    common = [nbdkit, "-f", "--exit-with-parent"]
    return {
        "usbd": Server(
            "usbd",
            [
                *[sys.executable, "-m", "usbd.ramdisk"],
                *["--listen", str(sock("usbd")), "--store-size", str(size)],
                *["--log-level", "warning"],
            ],
            sock("usbd"),
            workdir / "usbd.log",
        ),
        "nbdkit-memory": Server(
            "nbdkit-memory",
            [*common, "-U", str(sock("memory")), "memory", f"size={size}"],
            sock("memory"),
            workdir / "nbdkit-memory.log",
        ),
        "nbdkit-python": Server(
            "nbdkit-python",
            [
                *[*common, "-U", str(sock("python")), "python"],
                *[str(HERE / "nbdkit_ramdisk.py"), f"size={size}"],
            ],
            sock("python"),
            workdir / "nbdkit-python.log",
        ),
    }


@contextlib.contextmanager
def running(servers: Sequence[Server]) -> Iterator[None]:
    """Start every server; stop every one that started, whatever happens."""
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in servers:
            server.stop()


# -- fio ---------------------------------------------------------------------------------


def fio(
    uri: str, name: str, options: dict[str, Any], timeout: float, cwd: Path | None = None
) -> dict[str, Any]:
    """Run one fio job against ``uri``; return its JSON job record (raises on failure).

    ``cwd`` is where fio may leave files (verify state), so that none land in the caller's.
    """
    argv = ["fio", "--output-format=json", f"--name={name}", "--ioengine=nbd", f"--uri={uri}"]
    argv += [f"--{key}={value}" for key, value in options.items()]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"fio {name} did not finish within {timeout:.0f}s") from None
    # fio may print warnings before the JSON document.
    text = done.stdout
    start = text.find("{")
    try:
        report = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        report = None
    if report is None or not report.get("jobs"):
        raise RuntimeError(
            f"fio {name} failed (exit {done.returncode}):\n{done.stderr.strip()}\n{text[:2000]}"
        )
    job: dict[str, Any] = report["jobs"][0]
    job["_exit"] = done.returncode
    job["_stderr"] = done.stderr.strip()
    if done.returncode != 0 or job.get("error"):
        raise RuntimeError(
            f"fio {name} failed (exit {done.returncode}, error {job.get('error')}):\n"
            f"{done.stderr.strip()}"
        )
    return job


def measure(
    server: Server, workload: Workload, args: argparse.Namespace
) -> dict[str, float | int | str]:
    """One timed run of ``workload`` against ``server``; throughput, latency and CPU."""
    options: dict[str, Any] = {
        "rw": workload.rw,
        "bs": workload.bs,
        "iodepth": workload.iodepth,
        "numjobs": 1,
        "size": args.size,
        "runtime": args.runtime,
        "ramp_time": args.ramp_time,
        "time_based": 1,
    }
    if workload.rw.startswith("rand"):
        options.update(norandommap=1, randrepeat=0)
    cpu_before = cpu_seconds(server.pid)
    wall_before = time.monotonic()
    job = fio(
        server.uri, f"{workload.name}-{server.name}", options, args.runtime + args.ramp_time + 120
    )
    cpu = cpu_seconds(server.pid) - cpu_before
    wall = time.monotonic() - wall_before
    stats = job[workload.direction]
    # fio counts no I/O during the ramp, the CPU clock does: estimate the I/Os over the
    # whole run from the rate. CPU per I/O says how hard a server works for its result
    # and is far less sensitive than IOPS to other load on the machine.
    ios_in_wall = max(stats["iops"] * (args.runtime + args.ramp_time), 1)
    return {
        "mib_s": stats["bw_bytes"] / MiB,
        "iops": stats["iops"],
        "ios": stats["total_ios"],
        "lat_mean_us": stats["lat_ns"]["mean"] / 1000,
        "clat_p99_us": stats["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000,
        "server_cpu": cpu / wall,  # cores' worth, ramp time included
        "server_cpu_us_per_io": cpu / ios_in_wall * 1e6,
        "fio_usr_cpu": job["usr_cpu"],
        "fio_sys_cpu": job["sys_cpu"],
    }


def prefill(server: Server, args: argparse.Namespace) -> float:
    """Write the whole device once (1 MiB sequential); returns MiB/s of the pass."""
    job = fio(
        server.uri,
        f"prefill-{server.name}",
        {"rw": "write", "bs": "1M", "iodepth": 8, "size": args.size},
        600,
    )
    return float(job["write"]["bw_bytes"]) / MiB


def verify(server: Server, args: argparse.Namespace) -> list[dict[str, Any]]:
    """fio writes with crc32c checksums, then reads every block back and checks it."""
    passes = [
        ("verify-rand-4K", {"rw": "randwrite", "bs": "4k", "iodepth": 32}),
        ("verify-seq-1M", {"rw": "write", "bs": "1M", "iodepth": 8}),
        ("verify-mixed-sizes", {"rw": "randwrite", "bsrange": "512-256k", "iodepth": 16}),
    ]
    results = []
    for name, shape in passes:
        options = {
            **shape,
            "size": args.verify_size,
            "verify": "crc32c",
            "do_verify": 1,
            "verify_fatal": 1,
            "verify_dump": 0,
            "verify_state_save": 0,
        }
        try:
            job = fio(server.uri, name, options, 600, cwd=server.socket_path.parent)
        except RuntimeError as exc:
            results.append({"name": name, "passed": False, "error": str(exc)[:2000]})
            continue
        checked = job["read"]["total_ios"]
        results.append(
            {
                "name": name,
                "passed": checked > 0,
                "written_ios": job["write"]["total_ios"],
                "verified_ios": checked,
            }
        )
    return results


# -- reporting ---------------------------------------------------------------------------


def summarise(values: list[float], how: str) -> float:
    return max(values) if how == "best" else statistics.median(values)


def render(table: list[list[str]], left: frozenset[int] = frozenset({0, 1})) -> str:
    """A plain-text table; columns in ``left`` are text, the others numbers (right-aligned)."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for n, row in enumerate(table):
        cells = [
            cell.ljust(width) if i in left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(results: dict[str, Any], servers: Sequence[str], how: str) -> str:
    rows = [["workload", "server", "MiB/s", "IOPS", "srv CPU", "CPU us/IO", "usbd/this"]]
    ratios = [["workload", "usbd/nbdkit-memory", "usbd/nbdkit-python", "target vs memory"]]
    for workload in WORKLOADS:
        per_server = results["workloads"].get(workload.name)
        if not per_server:
            continue
        usbd = per_server.get("usbd", {}).get("summary")
        for name in servers:
            summary = per_server[name]["summary"]
            ratio = ""
            if usbd and name != "usbd":
                ratio = f"{usbd['iops'] / summary['iops']:.2f}x"
            rows.append(
                [
                    workload.name,
                    name,
                    f"{summary['mib_s']:.1f}",
                    f"{summary['iops']:.0f}",
                    f"{summary['server_cpu']:.2f}",
                    f"{summary['server_cpu_us_per_io']:.1f}",
                    ratio,
                ]
            )
        ratio_row = [workload.name]
        for other in ("nbdkit-memory", "nbdkit-python"):
            value = per_server.get("ratios", {}).get(f"usbd/{other}")
            ratio_row.append("-" if value is None else f"{value:.2f}x")
        target = workload.target
        memory_ratio = per_server.get("ratios", {}).get("usbd/nbdkit-memory")
        if target is None or memory_ratio is None:
            ratio_row.append("")
        else:
            verdict = "met" if memory_ratio >= target else "NOT met"
            ratio_row.append(f">= {target:.1f}x ({verdict})")
        ratios.append(ratio_row)
    text = [f"fio over NBD, unix sockets ({how} of {results['config']['rounds']} round(s)):"]
    text += [render(rows), "", render(ratios, frozenset({0, 3}))]
    memory = results.get("memory", {})
    if "usbd" in memory:
        usbd_mem = memory["usbd"]
        empty = usbd_mem.get("empty", {}).get("VmRSS")
        after = usbd_mem.get("after_writes", {}).get("VmRSS")
        text.append("")
        if empty is not None:
            verdict = "met" if empty < RSS_TARGET_MIB * MiB else "NOT met"
            text.append(
                f"usbd resident memory, empty {results['config']['size'] // MiB} MiB ramdisk: "
                f"{empty / MiB:.1f} MiB (target < {RSS_TARGET_MIB} MiB: {verdict})"
            )
        if after is not None:
            text.append(f"usbd resident memory after the write runs: {after / MiB:.1f} MiB")
        others = [
            f"{name} {values.get('empty', {}).get('VmRSS', 0) / MiB:.1f} -> "
            f"{values.get('after_writes', {}).get('VmRSS', 0) / MiB:.1f} MiB"
            for name, values in memory.items()
            if name != "usbd"
        ]
        if others:
            text.append("for comparison (empty -> after writes): " + ", ".join(others))
    for check in results.get("verify", []):
        if check["passed"]:
            status = f"PASS ({check['verified_ios']} blocks checked)"
        else:
            first = (check.get("error") or "").strip().splitlines()
            status = "FAIL" + (f": {first[0]}" if first else "")
        text.append(f"fio verify=crc32c against usbd, {check['name']}: {status}")
    return "\n".join(text)


# -- main --------------------------------------------------------------------------------


def version(program: str) -> str:
    done = subprocess.run([program, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None, allow_abbrev=False
    )
    parser.add_argument("--runtime", type=positive, default=10, help="seconds per run (default 10)")
    parser.add_argument(
        "--ramp-time", type=int, default=1, help="seconds of warm-up not counted (default 1)"
    )
    parser.add_argument(
        "--rounds", type=positive, default=3, help="rounds over all runs (default 3)"
    )
    parser.add_argument(
        "--stat",
        choices=("median", "best"),
        default="median",
        help="how rounds are combined (default median)",
    )
    parser.add_argument(
        "--size", type=parse_size, default=1 << 30, help="device size (default 1GiB)"
    )
    parser.add_argument(
        "--verify-size",
        type=parse_size,
        default=256 * MiB,
        help="bytes written and checked by each verify pass (default 256MiB)",
    )
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=SERVERS,
        default=list(SERVERS),
        help="servers to run (default all; ratios need usbd)",
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=[w.name for w in WORKLOADS],
        default=[w.name for w in WORKLOADS],
        help="workloads to run (default all)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the verify passes")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("bench-results/bench.json"),
        help="JSON results file (default bench-results/bench.json)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if shutil.which("fio") is None:
        sys.exit("bench: fio not found on PATH (Debian: apt-get install fio)")
    workloads = [w for w in WORKLOADS if w.name in args.workloads]
    names = [name for name in SERVERS if name in args.servers]
    results: dict[str, Any] = {
        "config": {
            "runtime": args.runtime,
            "ramp_time": args.ramp_time,
            "rounds": args.rounds,
            "stat": args.stat,
            "size": args.size,
            "verify_size": args.verify_size,
            "servers": names,
            "workloads": {
                w.name: {"rw": w.rw, "bs": w.bs, "iodepth": w.iodepth} for w in workloads
            },
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "fio": version("fio"),
            "nbdkit": version("nbdkit"),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "memory": {},
        "prefill_mib_s": {},
        "workloads": {},
    }
    with tempfile.TemporaryDirectory(prefix="usbd-bench-") as tmp:
        servers = make_servers(Path(tmp), args.size)
        chosen = [servers[name] for name in names]
        try:
            with running(chosen):
                time.sleep(0.5)  # let start-up allocations settle before reading VmRSS
                for server in chosen:
                    server.record_memory("empty")
                    print(f"bench: {server.name} up (pid {server.pid})", flush=True)
                for server in chosen:
                    speed = prefill(server, args)
                    results["prefill_mib_s"][server.name] = speed
                    print(f"bench: prefilled {server.name} at {speed:.0f} MiB/s", flush=True)
                for round_ in range(args.rounds):
                    order = names[round_ % len(names) :] + names[: round_ % len(names)]
                    for workload in workloads:
                        for name in order:
                            sample = measure(servers[name], workload, args)
                            entry = results["workloads"].setdefault(workload.name, {})
                            entry.setdefault(name, {"rounds": []})["rounds"].append(sample)
                            print(
                                f"bench: round {round_ + 1}/{args.rounds} {workload.name:<14}"
                                f" {name:<14} {sample['mib_s']:9.1f} MiB/s"
                                f" {sample['iops']:9.0f} IOPS"
                                f" (server CPU {sample['server_cpu']:.2f},"
                                f" {sample['server_cpu_us_per_io']:.1f} us/IO)",
                                flush=True,
                            )
                for server in chosen:
                    server.record_memory("after_writes")
                if "usbd" in servers and "usbd" in names and not args.no_verify:
                    results["verify"] = verify(servers["usbd"], args)
                    servers["usbd"].record_memory("after_verify")
        except (RuntimeError, KeyboardInterrupt) as exc:
            for server in chosen:
                if server.process is not None and server.process.poll() is not None:
                    print(f"bench: {server.name} log:\n{server.log()}", file=sys.stderr)
            print(f"bench: aborted: {exc}", file=sys.stderr)
            return 1
        for server in chosen:
            results["memory"][server.name] = server.memory
            if server.process is not None and server.process.returncode not in (0, None):
                results.setdefault("exit_codes", {})[server.name] = server.process.returncode
    for per_server in results["workloads"].values():
        for values in per_server.values():
            rounds = values["rounds"]
            values["summary"] = {
                key: summarise([r[key] for r in rounds], args.stat)
                for key in rounds[0]
                if isinstance(rounds[0][key], int | float)
            }
        usbd = per_server.get("usbd", {}).get("summary")
        if usbd:
            per_server["ratios"] = {
                f"usbd/{name}": usbd["iops"] / per_server[name]["summary"]["iops"]
                for name in names
                if name != "usbd" and name in per_server
            }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(report(results, names, args.stat))
    print(f"\nbench: results written to {args.output}")
    failed = [check for check in results.get("verify", []) if not check["passed"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
