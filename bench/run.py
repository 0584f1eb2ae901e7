"""Benchmark usbd's drivers against nbdkit with fio over NBD on unix sockets (not a test).

Five suites, each one usbd driver against the servers that do the same job:

- ``ramdisk``: ``usbd-ramdisk`` against ``nbdkit memory`` (C) and nbdkit's Python plugin
  with ``bench/nbdkit_ramdisk.py``, each a RAM disk.
- ``file``: ``usbd-filedisk`` against ``nbdkit file``, each serving a file of the same size
  in the run's temporary directory (same filesystem, so the same page cache and disk).
- ``objstore``: ``usbd-objstore`` against usbd-filedisk, nbdkit's S3 plugin and s3backer, all
  on one SeaweedFS, plus cold passes, the raw S3 server and write amplification; it lives in
  ``bench/objstore.py`` and uses this module's machinery through ``SuiteHooks``.
- ``dedup``: ``usbd-dedup`` against usbd-filedisk and usbd-ramdisk, with workloads of its own
  (duplicate and unique 1 MiB writes, data chosen with fio's seeds), checks of the dedup
  ratio, and a memory probe; in ``bench/dedup.py``, through ``SuiteHooks`` too.
- ``tls``: ``usbd-ramdisk --tls require`` against ``nbdkit --tls=require memory`` (the same
  throw-away certificates), with both plain RAM disks beside them.

A suite's servers run side by side; every device is filled by one sequential write pass
first, so that reads read data, not holes (the files start sparse). Then, round after round,
each workload runs against each server in turn (the order rotates every round), so that
noise from the machine falls on all of them alike. Suites run one after the other and are
only compared within themselves. The result is a table per suite of MiB/s, IOPS, server CPU
per I/O and usbd's ratio to each server, a JSON file with every number, resident memory
when empty and after the writes, and fio ``verify=crc32c`` passes against each usbd driver
to show that speed did not cost correctness.

Targets (from the issues; reported, not asserted), as usbd / reference throughput (the
reference is ``Suite.baseline``, an nbdkit server; not to be confused with ``--baseline``):

- ramdisk, against nbdkit memory: >= 1.0x on 1 MiB sequential, >= 1.3x on 4 KiB random,
  and under 80 MiB resident with an empty 1 GiB disk.
- file, against nbdkit file: >= 0.9x on 1 MiB sequential, >= 0.8x on 4 KiB random.
- objstore: warm, >= 0.5x usbd-filedisk and >= 5x nbdkit's S3 plugin on 4 KiB random; cold
  1 MiB sequential, >= 0.8x the raw S3 server (see bench/objstore.py).
- dedup: duplicate 1 MiB writes >= 0.5x usbd-ramdisk; 1 MiB sequential reads >= 0.8x and
  unique 1 MiB writes >= 0.5x usbd-filedisk (see bench/dedup.py).

Before and after: ``--baseline REV`` (any git revision) adds that revision's usbd driver to
each suite as one more server, ``usbd-ramdisk@<hash>`` and ``usbd-filedisk@<hash>``, run side
by side with the current one and nbdkit, in the same rotation and on the same kind of device.
A change to the engine must show, in one run on one machine, that every ratio against nbdkit
stayed within noise or got better and that server CPU per I/O did not go up; measured in
separate runs, the machine's drift between them would be as large as the change. The report
then gives, per workload, current and baseline usbd's ratios to each nbdkit server next to
each other, and current / baseline throughput and CPU per I/O (with the spread of the
per-round pairs, the noise, when there are several rounds). The baseline is installed from
``git archive`` of that commit (no work tree of anyone's is touched, and uncommitted edits do
not leak in), not editable, into a venv of its own cached by commit hash under
``$XDG_CACHE_HOME/usbd-bench/<hash>/`` (default ``~/.cache``), so that later runs reuse it;
it runs with ``python -I``, so that neither ``PYTHONPATH`` nor the current directory can put
the current tree's code in its place.

Usage: ``python bench/run.py [--suite ramdisk|file|objstore|dedup|tls|all] [--runtime 10]
[--rounds 3] [--baseline REV] [--output bench-results/bench.json]`` (``nox -s bench -- ARGS``
passes ARGS through). Uses only the standard library and the installed usbd packages (the tls
suite's certificates: ``usbd-core[testing]``'s cryptography); needs ``fio`` (with
``ioengine=nbd``) and ``nbdkit`` (with its python plugin; the file plugin is built in) on
PATH, and ``git`` and an index that pip can install the usbd packages' dependencies from
for ``--baseline``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import importlib.util
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MiB = 1 << 20
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


WORKLOADS = (
    Workload("seq-read-1M", "read", "1M", 8, "read"),
    Workload("seq-write-1M", "write", "1M", 8, "write"),
    Workload("rand-read-4K", "randread", "4k", 32, "read"),
    Workload("rand-write-4K", "randwrite", "4k", 32, "write"),
)


@dataclass(frozen=True)
class Suite:
    """One usbd driver and the servers it is measured against.

    ``targets`` are minimum usbd / ``baseline`` ratios per workload name; ``rss_target_mib``
    is a ceiling on usbd's resident memory with an empty device, where the issue sets one
    (a file-backed daemon's data lives in the page cache, not in its own memory).
    ``more_targets`` are minimum ratios to servers other than ``baseline`` (reference, then
    ratios per workload), ``extras`` the names of what a suite measures outside the rotation
    of ``servers`` (the objstore suite's cold daemon and raw S3 client; see bench/objstore.py).
    ``workloads`` are what the rotation runs (the dedup suite has its own: see bench/dedup.py).
    """

    name: str
    usbd: str
    others: tuple[str, ...]
    baseline: str
    targets: Mapping[str, float]
    rss_target_mib: int | None = None
    more_targets: tuple[tuple[str, Mapping[str, float]], ...] = ()
    extras: tuple[str, ...] = ()
    workloads: tuple[Workload, ...] = WORKLOADS

    @property
    def servers(self) -> tuple[str, ...]:
        return (self.usbd, *self.others)


SUITES = (
    Suite(
        "ramdisk",
        "usbd-ramdisk",
        ("nbdkit-memory", "nbdkit-python"),
        "nbdkit-memory",
        {"seq-read-1M": 1.0, "seq-write-1M": 1.0, "rand-read-4K": 1.3, "rand-write-4K": 1.3},
        rss_target_mib=80,
    ),
    Suite(
        "file",
        "usbd-filedisk",
        ("nbdkit-file",),
        "nbdkit-file",
        {"seq-read-1M": 0.9, "seq-write-1M": 0.9, "rand-read-4K": 0.8, "rand-write-4K": 0.8},
    ),
    # Warm (the cache holds the whole volume) against usbd-filedisk and the other S3 block
    # devices; the cold targets, against the raw S3 server, are in bench/objstore.py.
    Suite(
        "objstore",
        "usbd-objstore",
        ("usbd-filedisk", "nbdkit-s3", "s3backer"),
        "usbd-filedisk",
        {"rand-read-4K": 0.5, "rand-write-4K": 0.5},
        more_targets=(("nbdkit-s3", {"rand-read-4K": 5.0, "rand-write-4K": 5.0}),),
        extras=("usbd-objstore-cold", "raw-s3"),
    ),
    # Every workload against all three servers; the targets compare different servers per
    # workload (duplicate writes against the RAM disk), see bench/dedup.py.
    Suite(
        "dedup",
        "usbd-dedup",
        ("usbd-filedisk", "usbd-ramdisk"),
        "usbd-filedisk",
        {"uniq-write-1M": 0.5, "seq-read-1M": 0.8},
        more_targets=(("usbd-ramdisk", {"dup-write-1M": 0.5}),),
        workloads=(
            Workload("dup-write-1M", "write", "1M", 8, "write"),
            Workload("uniq-write-1M", "write", "1M", 8, "write"),
            WORKLOADS[0],
            WORKLOADS[2],
            WORKLOADS[3],
        ),
    ),
    # The RAM disks over TLS (--tls require, the same certificates, fio's libnbd client
    # the same way), the plain ones beside them for what TLS costs each. No target is set.
    Suite(
        "tls",
        "usbd-ramdisk-tls",
        ("nbdkit-memory-tls", "usbd-ramdisk", "nbdkit-memory"),
        "nbdkit-memory-tls",
        {},
    ),
)
SERVERS = tuple(dict.fromkeys(n for suite in SUITES for n in (*suite.servers, *suite.extras)))
WORKLOAD_NAMES = tuple(dict.fromkeys(w.name for suite in SUITES for w in suite.workloads))
#: The module each usbd server runs as (``python -m``), checked before anything starts.
USBD_MODULES = {
    "usbd-ramdisk": "usbd.ramdisk",
    "usbd-ramdisk-tls": "usbd.ramdisk",
    "usbd-filedisk": "usbd.filedisk",
    "usbd-objstore": "usbd.objstore",
    "usbd-dedup": "usbd.dedup",
}
#: What a ``--baseline`` venv gets from the revision's tree, in this order (core first, so that
#: the drivers' dependency on it is met by the revision's own core, not by one from an index).
BASELINE_PACKAGES = ("usbd-core", "usbd-ramdisk", "usbd-filedisk")


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


def create_sparse(path: Path, size: int) -> None:
    """A file of ``size`` bytes with no blocks allocated (as usbd-filedisk makes its own)."""
    with path.open("wb") as file:
        file.truncate(size)


@dataclass
class Server:
    """One NBD server process listening on a unix socket in the run's temporary directory.

    ``backing`` is the file a file server serves (its allocation is reported after the
    prefill, to show that reads will read data); ``prepare`` runs just before the start.
    ``companions`` are the pids of processes that do part of its work and are counted in its
    CPU and memory (s3backer's, behind the ``nbdkit file`` that serves its FUSE file).
    """

    name: str
    argv: list[str]
    socket_path: Path
    log_path: Path
    backing: Path | None = None
    prepare: Callable[[], None] | None = None
    process: subprocess.Popen[bytes] | None = None
    memory: dict[str, dict[str, int]] = field(default_factory=dict)
    companions: list[int] = field(default_factory=list)
    tls: bool = False

    @property
    def uri(self) -> str:
        if self.tls:
            # fio's nbd engine lets libnbd read no local file from a URI (tls-certificates=),
            # so it does not check the server's certificate; the traffic is encrypted alike.
            return f"nbds+unix:///?socket={self.socket_path}&tls-verify-peer=false"
        return f"nbd+unix:///?socket={self.socket_path}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        if self.prepare is not None:
            self.prepare()
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
        memory = read_proc_status(self.pid)
        for pid in self.companions:  # summed: the peaks of each, not a peak of the sum
            for key, value in read_proc_status(pid).items():
                memory[key] = memory.get(key, 0) + value
        self.memory[label] = memory
        return memory

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server and its companions."""
        return sum(cpu_seconds(pid) for pid in (self.pid, *self.companions))

    def allocated(self) -> int | None:
        """Bytes of disk (or page cache) the backing file holds; None without one."""
        if self.backing is None:
            return None
        try:
            return self.backing.stat().st_blocks * 512
        except OSError:
            return None

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


def make_servers(workdir: Path, size: int, baseline: Baseline | None = None) -> dict[str, Server]:
    """Every server the benchmark knows, by name; none started, no file created yet.

    With a ``baseline``, also that revision's usbd drivers (those it has), each started the
    same way as the current one, with the same options, but by the baseline venv's python.
    """
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        sys.exit("bench: nbdkit not found on PATH (Debian: apt-get install nbdkit)")

    def stem(name: str) -> str:
        """File names without the ``@`` of a baseline's name (it would go into fio's URI)."""
        return name.replace("@", "-")

    def sock(name: str) -> Path:
        return workdir / f"{stem(name)}.sock"

    def usbd(driver: str, *options: str, name: str = "", python: Sequence[str] = ()) -> Server:
        name = name or driver
        argv = [*(python or [sys.executable]), "-m", USBD_MODULES[driver]]
        argv += ["--listen", str(sock(name)), *options]
        argv += ["--store-size", str(size), "--log-level", "warning"]
        return Server(name, argv, sock(name), workdir / f"{stem(name)}.log")

    def filedisk(name: str = "", python: Sequence[str] = ()) -> Server:
        # usbd-filedisk serves <store-dir>/<store-name>.bin and creates it sparse itself.
        store = stem(name or "usbd-filedisk")
        server = usbd(
            "usbd-filedisk",
            *("--store-dir", str(workdir), "--store-name", store),
            name=name,
            python=python,
        )
        server.backing = workdir / f"{store}.bin"
        return server

    def nbdkit_server(name: str, *plugin: str) -> Server:
        argv = [nbdkit, "-f", "--exit-with-parent", "-U", str(sock(name)), *plugin]
        return Server(name, argv, sock(name), workdir / f"{name}.log")

    pki = workdir / "pki"

    def certificates() -> None:
        """Throw-away certificates for the TLS suite, made once before its first server."""
        if not (pki / "server").exists():
            from usbd.core.testing.certs import make_certificates  # noqa: PLC0415

            make_certificates(pki)

    tls_flags = ("--tls", "require", "--tls-certificates", str(pki / "server"))
    usbd_tls = usbd("usbd-ramdisk", *tls_flags, name="usbd-ramdisk-tls")
    nbdkit_tls = nbdkit_server(
        "nbdkit-memory-tls",
        "--tls=require",
        f"--tls-certificates={pki / 'server'}",
        "memory",
        f"size={size}",
    )
    for server in (usbd_tls, nbdkit_tls):
        server.tls, server.prepare = True, certificates
    nbdkit_file = nbdkit_server("nbdkit-file", "file", str(workdir / "nbdkit-file.bin"))
    nbdkit_file.backing = workdir / "nbdkit-file.bin"
    nbdkit_file.prepare = lambda: create_sparse(workdir / "nbdkit-file.bin", size)
    servers = [
        usbd("usbd-ramdisk"),
        nbdkit_server("nbdkit-memory", "memory", f"size={size}"),
        nbdkit_server("nbdkit-python", "python", str(HERE / "nbdkit_ramdisk.py"), f"size={size}"),
        filedisk(),
        nbdkit_file,
        usbd_tls,
        nbdkit_tls,
    ]
    if baseline is not None:
        # -I: neither PYTHONPATH, the user's site nor the current directory (which python -m
        # puts first on sys.path) can slip the current tree's usbd in front of the baseline's.
        python = [str(baseline.python), "-I"]
        if "usbd-ramdisk" in baseline.drivers:
            servers.append(usbd("usbd-ramdisk", name=baseline.name("usbd-ramdisk"), python=python))
        if "usbd-filedisk" in baseline.drivers:
            servers.append(filedisk(baseline.name("usbd-filedisk"), python))
    return {server.name: server for server in servers}


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


# -- a baseline revision -----------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """A git revision's usbd packages, installed (not editable) in a venv of their own.

    ``drivers`` are the usbd drivers that revision has and that import from its venv: an old
    revision may lack one, and that suite then runs without the baseline.
    """

    rev: str  # as given on the command line
    commit: str
    label: str  # the abbreviated hash, in the server names
    directory: Path
    drivers: tuple[str, ...]

    @property
    def python(self) -> Path:
        return self.directory / "venv" / "bin" / "python"

    def name(self, usbd: str) -> str:
        return f"{usbd}@{self.label}"

    def as_json(self) -> dict[str, Any]:
        return {
            "rev": self.rev,
            "commit": self.commit,
            "label": self.label,
            "venv": str(self.directory / "venv"),
            "drivers": list(self.drivers),
        }


def git(*args: str) -> str:
    """Run git in this repository; its stdout, stripped (exits with git's message on error)."""
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"bench: git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "usbd-bench"


def prepare_baseline(rev: str) -> Baseline:
    """The venv of ``rev``'s usbd packages: reused from the cache, or built there now.

    Cached by the full commit hash, so a branch name that moved builds anew and two spellings
    of one commit share a venv. A lock keeps two benchmarks from building the same one at
    once; ``ready.json``, written last, marks a venv as complete, so that an interrupted or
    failed build is redone rather than used, and so does a change of Python version (the
    venv's interpreter must be the one the current usbd runs on, or the comparison would
    measure Python).
    """
    if shutil.which("git") is None:
        sys.exit("bench: --baseline needs git on PATH")
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not commit:
        sys.exit(f"bench: --baseline {rev}: not a commit in {REPO}")
    label = git("rev-parse", "--short", commit)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    directory = root / commit
    marker = directory / "ready.json"
    with (root / f"{commit}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            ready = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            ready = {}
        python = directory / "venv" / "bin" / "python"
        if ready.get("python") == platform.python_version() and python.exists():
            print(f"bench: baseline {label} ({rev}): reusing {directory / 'venv'}", flush=True)
        else:
            print(f"bench: baseline {label} ({rev}): building {directory / 'venv'}", flush=True)
            started = time.monotonic()
            ready = build_baseline(commit, directory)
            marker.write_text(json.dumps(ready, indent=2) + "\n")
            print(
                f"bench: baseline {label} built in {time.monotonic() - started:.0f}s"
                f" (drivers: {', '.join(ready['drivers']) or 'none'})",
                flush=True,
            )
    return Baseline(rev, commit, label, directory, tuple(ready["drivers"]))


def build_baseline(commit: str, directory: Path) -> dict[str, Any]:
    """Extract ``commit``'s packages/ into ``directory``/src and install them into a venv.

    ``git archive`` reads the commit from the object store: nobody's work tree or index is
    touched (others may be editing this checkout), and uncommitted edits cannot leak into the
    baseline. The packages are installed as wheels, not editable, so that the venv does not
    depend on the extracted tree; the venv's python is the one running this benchmark.
    Returns what ``ready.json`` records; exits with the build log's tail on failure.
    """
    shutil.rmtree(directory, ignore_errors=True)
    source = directory / "src"
    source.mkdir(parents=True)
    log_path = directory / "build.log"
    with log_path.open("w") as log:

        def step(*argv: str | Path) -> None:
            log.write(f"$ {' '.join(map(str, argv))}\n")
            log.flush()
            done = subprocess.run(
                [str(arg) for arg in argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
            if done.returncode != 0:
                log.flush()
                tail = log_path.read_text(errors="replace")[-3000:]
                sys.exit(f"bench: building the baseline failed; {log_path}:\n{tail}")

        archive = directory / "packages.tar"
        step(
            "git", "-C", REPO, "archive", "--format=tar", f"--output={archive}", commit, "packages"
        )
        step("tar", "-x", "-f", archive, "-C", source)
        archive.unlink()
        packages = [
            source / "packages" / name
            for name in BASELINE_PACKAGES
            if (source / "packages" / name / "pyproject.toml").exists()
        ]
        if not packages or packages[0].name != "usbd-core":
            sys.exit(f"bench: {commit} has no packages/usbd-core to build a baseline from")
        venv = directory / "venv"
        step(sys.executable, "-m", "venv", venv)
        step(venv / "bin" / "python", "-m", "pip", "install", "--no-input", *packages)
    # Which drivers import, and from the venv: a sanity check that the baseline really is the
    # revision's code, not something found on a path shared with the current tree.
    probe = (
        "import importlib.util, json, sys; "
        "print(json.dumps({m: getattr(importlib.util.find_spec(m), 'origin', None)"
        " for m in sys.argv[1:]}))"
    )
    modules = ["usbd.core", *USBD_MODULES.values()]
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", probe, *modules],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"bench: the baseline venv does not run: {done.stderr.strip()}")
    origins: dict[str, str | None] = json.loads(done.stdout)
    inside = {
        module: origin is not None and Path(origin).resolve().is_relative_to(venv.resolve())
        for module, origin in origins.items()
    }
    if not inside["usbd.core"]:
        sys.exit(f"bench: the baseline's usbd.core comes from {origins['usbd.core']}, not {venv}")
    return {
        "commit": commit,
        "python": platform.python_version(),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "drivers": [driver for driver, module in USBD_MODULES.items() if inside[module]],
        "origins": origins,
    }


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
    server: Server,
    workload: Workload,
    args: argparse.Namespace,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, float | int | str]:
    """One timed run of ``workload`` against ``server``; throughput, latency and CPU.

    ``extra`` fio options are added last (a suite's region or data options); None drops one.
    """
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
    options.update(extra or {})
    options = {key: value for key, value in options.items() if value is not None}
    cpu_before = server.cpu_seconds()
    wall_before = time.monotonic()
    job = fio(
        server.uri, f"{workload.name}-{server.name}", options, args.runtime + args.ramp_time + 120
    )
    cpu = server.cpu_seconds() - cpu_before
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


# -- running a suite ---------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteHooks:
    """Steps a suite adds to ``run_suite``'s, each given the suite's result to add to.

    ``after_prefill`` runs once every server is filled (and the page cache written back),
    ``each_round`` after each round's workloads (with the round's index), ``after_rounds``
    after the last round, before the verify passes; all while the servers run. ``measure``
    runs one workload against one server in place of ``measure()`` and returns the same
    record (the dedup suite's regions, data and back-to-back passes).
    """

    after_prefill: Callable[[dict[str, Any]], None] | None = None
    each_round: Callable[[int, dict[str, Any]], None] | None = None
    after_rounds: Callable[[dict[str, Any]], None] | None = None
    measure: (
        Callable[[Server, Workload, argparse.Namespace], dict[str, float | int | str]] | None
    ) = None


def run_suite(
    suite: Suite,
    servers: Mapping[str, Server],
    names: Sequence[str],
    workloads: Sequence[Workload],
    args: argparse.Namespace,
    revision: str | None = None,
    hooks: SuiteHooks | None = None,
) -> dict[str, Any]:
    """Start the suite's servers, fill them, run every workload in rotating order, verify.

    ``revision`` is the name of the ``--baseline`` revision's usbd server among ``names``, if
    any: one more server in the rotation, compared with the current usbd in the summary.
    ``hooks`` add a suite's own steps (see ``SuiteHooks``).
    Raises RuntimeError (after printing the servers' logs) if a server or fio fails.
    """
    hooks = hooks or SuiteHooks()
    chosen = [servers[name] for name in names]
    result: dict[str, Any] = {
        "usbd": suite.usbd,
        "revision": revision,
        "baseline": suite.baseline,
        "targets": dict(suite.targets),
        "rss_target_mib": suite.rss_target_mib,
        **({"more_targets": dict(suite.more_targets)} if suite.more_targets else {}),
        "servers": list(names),
        "memory": {},
        "prefill_mib_s": {},
        "allocated_bytes": {},
        "workloads": {},
    }
    try:
        with running(chosen):
            time.sleep(0.5)  # let start-up allocations settle before reading VmRSS
            for server in chosen:
                server.record_memory("empty")
                print(f"bench: {suite.name}: {server.name} up (pid {server.pid})", flush=True)
            for server in chosen:
                speed = prefill(server, args)
                result["prefill_mib_s"][server.name] = speed
                allocated = server.allocated()
                note = ""
                if allocated is not None:
                    result["allocated_bytes"][server.name] = allocated
                    note = f" ({allocated / MiB:.0f} MiB of its file allocated)"
                print(f"bench: prefilled {server.name} at {speed:.0f} MiB/s{note}", flush=True)
            # Write back what the prefill left dirty now, not during the first measurements.
            os.sync()
            if hooks.after_prefill is not None:
                hooks.after_prefill(result)
            width = max(len(name) for name in names)
            run_one = hooks.measure or measure
            for round_ in range(args.rounds):
                shift = round_ % len(names)
                order = [*names[shift:], *names[:shift]]
                for workload in workloads:
                    for name in order:
                        sample = run_one(servers[name], workload, args)
                        entry = result["workloads"].setdefault(workload.name, {})
                        entry.setdefault(name, {"rounds": []})["rounds"].append(sample)
                        print(
                            f"bench: {suite.name} round {round_ + 1}/{args.rounds}"
                            f" {workload.name:<14} {name:<{width}}"
                            f" {sample['mib_s']:9.1f} MiB/s {sample['iops']:9.0f} IOPS"
                            f" (server CPU {sample['server_cpu']:.2f},"
                            f" {sample['server_cpu_us_per_io']:.1f} us/IO)",
                            flush=True,
                        )
                if hooks.each_round is not None:
                    hooks.each_round(round_, result)
            for server in chosen:
                server.record_memory("after_writes")
            if hooks.after_rounds is not None:
                hooks.after_rounds(result)
            if suite.usbd in names and not args.no_verify:
                result["verify"] = verify(servers[suite.usbd], args)
                servers[suite.usbd].record_memory("after_verify")
    except (RuntimeError, KeyboardInterrupt):
        for server in chosen:
            log = server.log().strip()
            if log:
                print(f"bench: {server.name} log:\n{log}", file=sys.stderr)
        raise
    for server in chosen:
        result["memory"][server.name] = server.memory
        log = server.log().strip()
        if log:  # usbd's start and exit lines, warnings and errors; nbdkit's errors
            result.setdefault("logs", {})[server.name] = log
        if server.process is not None and server.process.returncode not in (0, None):
            result.setdefault("exit_codes", {})[server.name] = server.process.returncode
    summarise_suite(result, suite.usbd, args.stat, revision)
    return result


def ratio(ours: float, theirs: float) -> float | None:
    """``ours / theirs``; None where there is nothing to divide by (a server that used less
    CPU than the clock's tick shows zero CPU per I/O)."""
    return ours / theirs if theirs else None


def summarise_suite(
    result: dict[str, Any], usbd: str, how: str, revision: str | None = None
) -> None:
    """Add each server's summary over the rounds and usbd's ratios to every other server.

    ``ratios`` are usbd / the other's throughput (IOPS: one block size per workload, so MiB/s
    alike), ``cpu_ratios`` usbd / the other's server CPU per I/O (below 1 is better). With a
    ``revision`` (the baseline's server), ``revision_ratios`` are its throughput ratios to the
    servers that are neither usbd, to set beside usbd's, and ``vs_revision`` usbd / baseline
    per round as well: the two ran next to each other in every round, so the spread of those
    pairs is the run's noise for this comparison.
    """
    for per_server in result["workloads"].values():
        names = [name for name in result["servers"] if name in per_server]
        for name in names:
            values = per_server[name]
            rounds = values["rounds"]
            values["summary"] = {
                key: summarise([r[key] for r in rounds], how)
                for key in rounds[0]
                if isinstance(rounds[0][key], int | float)
            }
        ours = per_server.get(usbd, {}).get("summary")
        if ours:
            others = [name for name in names if name != usbd]
            per_server["ratios"] = {
                f"{usbd}/{name}": ratio(ours["iops"], per_server[name]["summary"]["iops"])
                for name in others
            }
            per_server["cpu_ratios"] = {
                f"{usbd}/{name}": ratio(
                    ours["server_cpu_us_per_io"],
                    per_server[name]["summary"]["server_cpu_us_per_io"],
                )
                for name in others
            }
        before = per_server.get(revision or "", {})
        if not before:
            continue
        per_server["revision_ratios"] = {
            f"{revision}/{name}": ratio(
                before["summary"]["iops"], per_server[name]["summary"]["iops"]
            )
            for name in names
            if name not in (usbd, revision)
        }
        if ours:
            pairs = list(zip(per_server[usbd]["rounds"], before["rounds"], strict=True))
            per_server["vs_revision"] = {
                "throughput": per_server["ratios"][f"{usbd}/{revision}"],
                "cpu_per_io": per_server["cpu_ratios"][f"{usbd}/{revision}"],
                "throughput_rounds": [ratio(a["iops"], b["iops"]) for a, b in pairs],
                "cpu_per_io_rounds": [
                    ratio(a["server_cpu_us_per_io"], b["server_cpu_us_per_io"]) for a, b in pairs
                ],
            }


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


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def spread(values: Sequence[float | None]) -> str:
    """`` (low-high)`` of per-round ratios, or nothing for a single round."""
    known = [value for value in values if value is not None]
    if len(known) < 2:
        return ""
    return f" ({min(known):.2f}-{max(known):.2f})"


def report(suite: Suite, result: dict[str, Any], rounds: int, how: str, size: int) -> str:
    """The suite's tables (per server, usbd's ratios and targets, before / after against a
    ``--baseline`` revision), memory and verify."""
    names: list[str] = result["servers"]
    revision: str | None = result.get("revision")
    others = [name for name in names if name not in (suite.usbd, revision)]
    rows = [
        [
            "workload",
            "server",
            "MiB/s",
            "IOPS",
            "srv CPU",
            "CPU us/IO",
            "usbd/this",
            "CPU usbd/this",
        ]
    ]
    ratios = [
        [
            "workload",
            *(f"{suite.usbd}/{o}" for o in others),
            f"target vs {suite.baseline}",
            *(f"target vs {reference}" for reference, _ in suite.more_targets),
        ]
    ]
    # Current and baseline usbd's ratio to each nbdkit server side by side, then the two
    # directly: the figures the claim "within noise or better, CPU per I/O no higher" needs.
    before_after = [
        [
            "workload",
            *(f"vs {o}: now / before" for o in others),
            "MiB/s now/before",
            "CPU us/IO now/before",
        ]
    ]
    for workload in suite.workloads:
        per_server = result["workloads"].get(workload.name)
        if not per_server:
            continue
        found = per_server.get("ratios", {})
        cpu = per_server.get("cpu_ratios", {})
        for name in names:
            summary = per_server[name]["summary"]
            rows.append(
                [
                    workload.name,
                    name,
                    f"{summary['mib_s']:.1f}",
                    f"{summary['iops']:.0f}",
                    f"{summary['server_cpu']:.2f}",
                    f"{summary['server_cpu_us_per_io']:.1f}",
                    "" if name == suite.usbd else times(found.get(f"{suite.usbd}/{name}")),
                    "" if name == suite.usbd else times(cpu.get(f"{suite.usbd}/{name}")),
                ]
            )
        ratio_row = [workload.name]
        for other in others:
            ratio_row.append(times(found.get(f"{suite.usbd}/{other}")))
        for reference, targets in ((suite.baseline, suite.targets), *suite.more_targets):
            target = targets.get(workload.name)
            baseline = found.get(f"{suite.usbd}/{reference}")
            if target is None or baseline is None:
                ratio_row.append("")
            else:
                verdict = "met" if baseline >= target else "NOT met"
                ratio_row.append(f">= {target:.1f}x ({verdict})")
        ratios.append(ratio_row)
        versus = per_server.get("vs_revision")
        if versus is not None:
            before = per_server.get("revision_ratios", {})
            before_after.append(
                [
                    workload.name,
                    *(
                        f"{times(found.get(f'{suite.usbd}/{o}'))}"
                        f" / {times(before.get(f'{revision}/{o}'))}"
                        for o in others
                    ),
                    times(versus["throughput"]) + spread(versus["throughput_rounds"]),
                    times(versus["cpu_per_io"]) + spread(versus["cpu_per_io_rounds"]),
                ]
            )
    text = [f"{suite.name} suite: fio over NBD, unix sockets ({how} of {rounds} round(s)):"]
    text.append(render(rows))
    if suite.usbd in names and others:
        targets = range(len(ratios[0]) - 1 - len(suite.more_targets), len(ratios[0]))
        text += ["", render(ratios, frozenset({0, *targets}))]
    if len(before_after) > 1:
        text += [
            "",
            f"{suite.usbd} now against {revision} (before), side by side in the same rounds"
            + (" (low-high of the per-round pairs):" if rounds > 1 else ":"),
            render(before_after, frozenset({0})),
        ]
    text += memory_lines(suite, result["memory"], size)
    for check in result.get("verify", []):
        if check["passed"]:
            status = f"PASS ({check['verified_ios']} blocks checked)"
        else:
            first = (check.get("error") or "").strip().splitlines()
            status = "FAIL" + (f": {first[0]}" if first else "")
        text.append(f"fio verify=crc32c against {suite.usbd}, {check['name']}: {status}")
    return "\n".join(text)


def memory_lines(suite: Suite, memory: Mapping[str, Any], size: int) -> list[str]:
    """usbd's resident memory (against the suite's ceiling, if any), then the others'."""
    text: list[str] = []
    ours = memory.get(suite.usbd, {})
    empty = ours.get("empty", {}).get("VmRSS")
    after = ours.get("after_writes", {}).get("VmRSS")
    if empty is not None:
        line = (
            f"{suite.usbd} resident memory, empty {size // MiB} MiB device: {empty / MiB:.1f} MiB"
        )
        if suite.rss_target_mib is not None:
            verdict = "met" if empty < suite.rss_target_mib * MiB else "NOT met"
            line += f" (target < {suite.rss_target_mib} MiB: {verdict})"
        text.append(line)
    if after is not None:
        text.append(f"{suite.usbd} resident memory after the write runs: {after / MiB:.1f} MiB")
    others = [
        f"{name} {values.get('empty', {}).get('VmRSS', 0) / MiB:.1f} -> "
        f"{values.get('after_writes', {}).get('VmRSS', 0) / MiB:.1f} MiB"
        for name, values in memory.items()
        if name != suite.usbd
    ]
    if others:
        text.append("for comparison (empty -> after writes): " + ", ".join(others))
    return ["", *text] if text else []


# -- main --------------------------------------------------------------------------------


def load_suite_module(name: str) -> Any:
    """bench/<name>.py, a suite with a module of its own (objstore, dedup); it builds on this
    module, which it imports as ``run`` (the same module object, also when this file runs as
    ``__main__``)."""
    sys.modules.setdefault("run", sys.modules[__name__])
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module(name)


def load_objstore() -> Any:
    """bench/objstore.py, the objstore suite."""
    return load_suite_module("objstore")


def load_dedup() -> Any:
    """bench/dedup.py, the dedup suite."""
    return load_suite_module("dedup")


def version(program: str) -> str:
    done = subprocess.run([program, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None, allow_abbrev=False
    )
    parser.add_argument(
        "--suite",
        choices=[*(suite.name for suite in SUITES), "all"],
        default="all",
        help="which usbd driver to measure against its nbdkit counterparts (default all)",
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
        help="servers to run, within the chosen suites (default all; ratios need usbd's; "
        "a --baseline revision's usbd runs in every chosen suite whatever this says)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        default=None,
        help="a git revision (hash, tag, branch) whose usbd drivers run in each suite as one "
        "more server, <driver>@<hash>, for before / after ratios in one run; installed from "
        "git archive into a venv cached under $XDG_CACHE_HOME/usbd-bench/<commit>/",
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=WORKLOAD_NAMES,
        default=list(WORKLOAD_NAMES),
        help="workloads to run, in each suite that has them (default all)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the verify passes")
    parser.add_argument(
        "--tmpdir",
        type=Path,
        default=None,
        help="where the run's temporary directory (sockets, the file suite's files) goes "
        "(default the system's; its filesystem is what the file suite measures)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("bench-results/bench.json"),
        help="JSON results file (default bench-results/bench.json)",
    )
    load_objstore().add_arguments(parser)
    load_dedup().add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if shutil.which("fio") is None:
        sys.exit("bench: fio not found on PATH (Debian: apt-get install fio)")
    workloads = {
        suite.name: [w for w in suite.workloads if w.name in args.workloads] for suite in SUITES
    }
    plan = [
        (suite, [name for name in suite.servers if name in args.servers])
        for suite in SUITES
        if args.suite in (suite.name, "all") and workloads[suite.name]
    ]
    plan = [(suite, names) for suite, names in plan if names]
    if not plan:
        sys.exit(
            f"bench: none of --servers {' '.join(args.servers)} with any of --workloads"
            f" {' '.join(args.workloads)} is in suite {args.suite}"
        )
    objstore = load_objstore()
    dedup = load_dedup()
    own = {objstore.SUITE: objstore, dedup.SUITE: dedup}  # suites with a module of their own
    skipped = set()
    for suite, _ in plan:
        # They need what a venv made for the other suites may not have (usbd-objstore with
        # boto3 and SeaweedFS; usbd-dedup, a disk filesystem): run without them, unless
        # asked for by name.
        problem = own[suite.name].missing(suite, args) if suite.name in own else None
        if problem is not None:
            if args.suite == suite.name:
                sys.exit(f"bench: the {suite.name} suite cannot run: {problem}")
            print(f"bench: the {suite.name} suite is skipped: {problem}")
            skipped.add(suite.name)
    plan = [(suite, names) for suite, names in plan if suite.name not in skipped]
    if not plan:
        sys.exit("bench: no suite left to run")
    for suite, names in plan:
        if suite.usbd in names and importlib.util.find_spec(USBD_MODULES[suite.usbd]) is None:
            sys.exit(
                f"bench: {USBD_MODULES[suite.usbd]} is not installed"
                f" (pip install packages/{suite.usbd}), needed by the {suite.name} suite"
            )
    baseline = None if args.baseline is None else prepare_baseline(args.baseline)
    revisions: dict[str, str | None] = {}
    for suite, names in plan:
        if baseline is None:
            revisions[suite.name] = None
        elif suite.usbd not in baseline.drivers:
            revisions[suite.name] = None
            print(f"bench: {baseline.label} has no {suite.usbd}; {suite.name} runs without it")
        else:
            # Next to the current usbd, so that the rotation puts the two as close together
            # in time as it can.
            name = baseline.name(suite.usbd)
            revisions[suite.name] = name
            at = names.index(suite.usbd) + 1 if suite.usbd in names else 0
            names.insert(at, name)
    results: dict[str, Any] = {
        "config": {
            "suites": [suite.name for suite, _ in plan],
            "runtime": args.runtime,
            "ramp_time": args.ramp_time,
            "rounds": args.rounds,
            "stat": args.stat,
            "size": args.size,
            "verify_size": args.verify_size,
            "baseline": None if baseline is None else baseline.as_json(),
            "workloads": {
                w.name: {"rw": w.rw, "bs": w.bs, "iodepth": w.iodepth}
                for suite, _ in plan
                for w in workloads[suite.name]
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
        "suites": {},
    }
    with tempfile.TemporaryDirectory(prefix="usbd-bench-", dir=args.tmpdir) as tmp:
        results["config"]["tmpdir"] = tmp
        servers = make_servers(Path(tmp), args.size, baseline)
        for suite, names in plan:
            try:
                chosen = workloads[suite.name]
                if suite.name in own:
                    # The objstore suite's servers need an S3 server started first, and its
                    # own device size; the dedup suite's, regions and data of their own.
                    result = own[suite.name].run_suite(suite, names, chosen, args, Path(tmp))
                else:
                    result = run_suite(suite, servers, names, chosen, args, revisions[suite.name])
                results["suites"][suite.name] = result
            except (RuntimeError, KeyboardInterrupt) as exc:
                print(f"bench: aborted in the {suite.name} suite: {exc}", file=sys.stderr)
                return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    for suite, _ in plan:
        print()
        if suite.name in own:
            print(own[suite.name].report(suite, results["suites"][suite.name], args))
        else:
            print(report(suite, results["suites"][suite.name], args.rounds, args.stat, args.size))
    print(f"\nbench: results written to {args.output}")
    failed = [
        check
        for result in results["suites"].values()
        for check in result.get("verify", [])
        if not check["passed"]
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
