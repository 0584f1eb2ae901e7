"""A network fuzzer against a running daemon: ``python fuzz/netfuzz.py --driver ramdisk``.

It starts a real ``usbd-ramdisk`` (or ``usbd-filedisk``, ``usbd-dedup``, or ``usbd-objstore``
on a local store) process listening on a unix socket and on TCP, and opens many connections
at once, each one of:

* a mutated handshake (a seed from ``corpus/handshake``, bit flips, splices, interesting
  integers, truncation), sent in random pieces;
* a valid handshake, then a mutated request stream (``corpus/transmission``), truncated at a
  random point or whole, then a half-close and a read to the end, or an abrupt close;
* garbage; an abrupt close (RST) right after connecting or after the flags; a half-open
  socket that sends part of a header and waits without reading; a client that sends many
  READs and never reads the replies.

After every batch it waits until the daemon holds no client socket (a connection whose
client has gone must be closed by the server), then a clean python3-libnbd client (simple
and structured replies) writes, flushes, reads back and verifies data: any error or wrong
byte there is a **desync**. The daemon must never die; its RSS (``/proc/PID/status``) is
sampled after every batch, and its log is searched for ERROR lines and tracebacks (the
engine logs its own bugs at ERROR). ``--json`` prints the figures as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import nbdspec  # noqa: E402

DIST_PACKAGES = "/usr/lib/python3/dist-packages"
EXPORT = "fuzz"
DISK_SIZE = 16 * 1024 * 1024
GREETING = struct.pack(">QQ", nbdspec.NBDMAGIC, nbdspec.IHAVEOPT)
#: How long a batch's connections may take to be closed by the server after their clients
#: closed; past it the batch is reported as leaving connections behind.
IDLE_TIMEOUT = 60.0
#: What a driver needs beyond the shared flags: objstore's store is a local directory here.
DRIVER_FLAGS = {"objstore": ["--objstore-kind", "local"]}
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 25)


def _option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbdspec.IHAVEOPT, opt, len(data)) + data


def _go(name: str = EXPORT) -> bytes:
    raw = name.encode()
    return _option(nbdspec.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))


def valid_handshake(structured: bool, base_allocation: bool, rng: random.Random) -> bytes:
    """A client's handshake that reaches the transmission phase with what is asked for."""
    out = struct.pack(">I", nbdspec.FIXED_NEWSTYLE | nbdspec.NO_ZEROES)
    if rng.random() < 0.15 and not structured:
        return out + _option(nbdspec.OPT_EXPORT_NAME, EXPORT.encode())
    if structured:
        out += _option(nbdspec.OPT_STRUCTURED_REPLY)
        if base_allocation:
            name, query = EXPORT.encode(), nbdspec.BASE_ALLOCATION.encode()
            data = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(query)) + query
            out += _option(nbdspec.OPT_SET_META, data)
    return out + _go()


#: The clean client's region while fuzzing runs: no fuzz connection may change it.
CLEAN_START = DISK_SIZE // 2
_CHANGES = (nbdspec.WRITE, nbdspec.TRIM, nbdspec.WRITE_ZEROES)


def _touches_clean_region(stream: bytes) -> bool:
    """Would the server, framing ``stream`` as it does, change the clean client's region?"""
    return any(
        r.command in _CHANGES and r.offset + r.length > CLEAN_START and r.offset < DISK_SIZE
        for r in nbdspec.iter_requests(stream, 32 * 1024 * 1024)
    )


class Mutator:
    """Byte-level mutations in the style of libFuzzer's, over the committed seeds."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.handshakes = self._load("handshake", 0)
        self.streams = self._load("transmission", 4)
        # The transmission seeds' configuration: structured replies, base:allocation.
        self.configs = [
            (bool(raw[0] & 1), bool(raw[0] & 2))
            for raw in (
                p.read_bytes() for p in sorted((HERE / "corpus" / "transmission").iterdir())
            )
        ]

    @staticmethod
    def _load(kind: str, skip: int) -> list[bytes]:
        paths = sorted((HERE / "corpus" / kind).iterdir())
        return [p.read_bytes()[skip:] for p in paths] or [b""]

    def mutate(self, data: bytes, rounds: int | None = None) -> bytes:
        rng = self.rng
        out = bytearray(data)
        for _ in range(rounds if rounds is not None else rng.randrange(1, 6)):
            choice = rng.randrange(8)
            pos = rng.randrange(len(out) + 1)
            if choice == 0 and out:  # flip a bit
                i = rng.randrange(len(out))
                out[i] ^= 1 << rng.randrange(8)
            elif choice == 1 and out:  # random byte
                out[rng.randrange(len(out))] = rng.randrange(256)
            elif choice == 2:  # insert random bytes
                out[pos:pos] = rng.randbytes(rng.randrange(1, 32))
            elif choice == 3 and out:  # delete a run
                del out[pos : pos + rng.randrange(1, 64)]
            elif choice == 4 and len(out) >= 4:  # an interesting 32-bit value, big-endian
                i = rng.randrange(len(out) - 3)
                out[i : i + 4] = struct.pack(">I", rng.choice(INTERESTING))
            elif choice == 5 and len(out) >= 8:  # an interesting 64-bit value
                i = rng.randrange(len(out) - 7)
                value = rng.choice((*INTERESTING, 1 << 63, (1 << 64) - 1, DISK_SIZE - 1))
                out[i : i + 8] = struct.pack(">Q", value)
            elif choice == 6:  # splice in a piece of another seed
                other = rng.choice(self.handshakes + self.streams)
                if other:
                    a = rng.randrange(len(other))
                    out[pos:pos] = other[a : a + rng.randrange(1, 256)]
            elif out:  # duplicate a run
                a = rng.randrange(len(out))
                out[pos:pos] = out[a : a + rng.randrange(1, 128)]
        return bytes(out)


@dataclass
class Figures:
    driver: str
    connections: int = 0
    batches: int = 0
    checks: int = 0
    clean_operations: int = 0  # verified writes by the client running alongside the fuzzing
    desyncs: int = 0
    deaths: int = 0
    server_errors: int = 0
    stuck_batches: int = 0
    bad_greetings: int = 0
    first_rss_mib: float = 0.0
    last_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    log_lines: int = 0
    seconds: float = 0.0
    scenarios: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class Daemon:
    """A usbd driver process listening on a unix socket and on 127.0.0.1."""

    def __init__(self, driver: str, workdir: Path) -> None:
        self.driver = driver
        self.workdir = workdir
        # A short directory of its own: a unix socket's path is limited to 108 bytes.
        self.sock_path = os.path.join(tempfile.mkdtemp(prefix="usbd-nf-", dir="/tmp"), "s")
        self.log_path = workdir / f"{driver}.log"
        self.process: subprocess.Popen[str] | None = None
        self.tcp: tuple[str, int] = ("127.0.0.1", 0)
        self.baseline = 0

    def start(self) -> None:
        argv = [sys.executable, "-m", f"usbd.{self.driver}", "--listen", self.sock_path]
        argv += ["--listen", "127.0.0.1:0", "--store-size", str(DISK_SIZE)]
        argv += ["--export-name", EXPORT, "--store-dir", str(self.workdir)]
        argv += DRIVER_FLAGS.get(self.driver, [])
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True
            )
        assert self.process.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.driver} did not start: {self.log_path.read_text()}")
            _, marker, uri = line.partition(" is serving nbd://")
            if marker:
                host, _, rest = uri.partition(":")
                self.tcp = (host, int(rest.split("/")[0]))
                break
        # Keep reading stdout so that the pipe never fills.
        threading.Thread(target=self._drain, daemon=True).start()
        time.sleep(0.2)
        self.baseline = self.sockets()

    def _drain(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for _ in self.process.stdout:
            pass

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{EXPORT}?socket={self.sock_path}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def sockets(self) -> int:
        """Sockets the daemon holds open (listeners included)."""
        count = 0
        fd_dir = f"/proc/{self.pid}/fd"
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{fd}").startswith("socket:"):
                    count += 1
        return count

    def rss(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MiB."""
        values = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) / 1024
        return values["VmRSS"], values["VmHWM"]

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return None
        return self.process.returncode


# -- the connections ------------------------------------------------------------------------


class Fuzzer:
    def __init__(self, daemon: Daemon, rng: random.Random, figures: Figures) -> None:
        self.daemon = daemon
        self.rng = rng
        self.mutator = Mutator(rng)
        self.figures = figures
        self.scenarios: list[tuple[str, float, Callable[[trio.socket.SocketType], Any]]] = [
            ("handshake", 0.25, self.mutated_handshake),
            ("transmission", 0.35, self.mutated_requests),
            ("garbage", 0.08, self.garbage),
            ("abrupt", 0.12, self.abrupt),
            ("half-open", 0.1, self.half_open),
            ("no-read", 0.05, self.no_read),
            ("slow", 0.05, self.slow),
        ]

    async def connect(self) -> trio.socket.SocketType:
        if self.rng.random() < 0.7:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.connect(self.daemon.sock_path)
        else:
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            await sock.connect(self.daemon.tcp)
        return sock

    async def one(self) -> None:
        weights = [weight for _, weight, _ in self.scenarios]
        name, _, scenario = self.rng.choices(self.scenarios, weights)[0]
        self.figures.scenarios[name] = self.figures.scenarios.get(name, 0) + 1
        try:
            sock = await self.connect()
        except OSError as exc:
            self.figures.problems.append(f"connect failed: {exc!r}")
            return
        try:
            with trio.move_on_after(20):
                await scenario(sock)
        except OSError:
            pass  # reset, broken pipe: the server closed on us, as it may
        finally:
            if self.rng.random() < 0.3:
                with contextlib.suppress(OSError):  # RST instead of FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            self.figures.connections += 1

    async def send_pieces(self, sock: trio.socket.SocketType, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            n = self.rng.choice((1, 3, 16, 28, 100, 4096, 65536, 1 << 20))
            pos += await sock.send(data[pos : pos + n])
            if self.rng.random() < 0.2:
                await trio.sleep(0)

    async def read_greeting(self, sock: trio.socket.SocketType) -> bool:
        got = b""
        with trio.move_on_after(10):
            while len(got) < 18:
                chunk = await sock.recv(18 - len(got))
                if not chunk:
                    break
                got += chunk
        if got[:16] != GREETING:
            self.figures.bad_greetings += 1
            self.figures.problems.append(f"bad greeting {got!r}")
            return False
        return True

    async def drain(self, sock: trio.socket.SocketType, seconds: float) -> int:
        """Read and drop what the server sends, until the end, a reset or ``seconds``."""
        total = 0
        with trio.move_on_after(seconds), contextlib.suppress(OSError):
            while True:
                chunk = await sock.recv(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
        return total

    async def mutated_handshake(self, sock: trio.socket.SocketType) -> None:
        await self.read_greeting(sock)
        data = self.mutator.mutate(self.rng.choice(self.mutator.handshakes))
        await self.send_pieces(sock, data)
        if self.rng.random() < 0.5:
            sock.shutdown(socket.SHUT_WR)
        await self.drain(sock, self.rng.choice((0.0, 0.05, 0.5)))

    async def mutated_requests(self, sock: trio.socket.SocketType) -> None:
        await self.read_greeting(sock)
        i = self.rng.randrange(len(self.mutator.streams))
        structured, base_allocation = self.mutator.configs[i]
        stream = self.mutator.streams[i]
        if self.rng.random() < 0.8:
            stream = self.mutator.mutate(stream, self.rng.randrange(0, 6))
        if self.rng.random() < 0.4:
            stream = stream[: self.rng.randrange(len(stream) + 1)]
        if _touches_clean_region(stream):
            return  # it could overwrite what the clean client verifies (rare: seeds stay low)
        data = valid_handshake(structured, base_allocation, self.rng) + stream
        ending = self.rng.random()
        if ending < 0.5:  # all of it, half-close, read every reply
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.drain, sock, 10.0)
                with contextlib.suppress(OSError):  # here, not around the nursery's group
                    await self.send_pieces(sock, data)
                    sock.shutdown(socket.SHUT_WR)
        else:  # an abrupt close somewhere in the middle
            await self.send_pieces(sock, data[: self.rng.randrange(len(data) + 1)])
            await self.drain(sock, self.rng.choice((0.0, 0.01, 0.1)))

    async def garbage(self, sock: trio.socket.SocketType) -> None:
        data = self.rng.randbytes(self.rng.randrange(1, 4096))
        if self.rng.random() < 0.5:
            data = struct.pack(">I", nbdspec.FIXED_NEWSTYLE) + data
        await self.send_pieces(sock, data)
        await self.drain(sock, 0.05)

    async def abrupt(self, sock: trio.socket.SocketType) -> None:
        if self.rng.random() < 0.5:
            await sock.send(struct.pack(">I", nbdspec.FIXED_NEWSTYLE | nbdspec.NO_ZEROES))

    async def half_open(self, sock: trio.socket.SocketType) -> None:
        rng = self.rng
        data = valid_handshake(rng.random() < 0.5, False, rng)
        if rng.random() < 0.5:  # in the middle of a request header, or of a WRITE's payload
            header = struct.pack(">IHHQQI", nbdspec.REQUEST_MAGIC, 0, nbdspec.WRITE, 1, 0, 1 << 20)
            data += header + rng.randbytes(rng.randrange(0, 4096))
        await sock.send(data[: rng.randrange(len(data) + 1)])
        await trio.sleep(rng.uniform(0.2, 2.0))

    async def no_read(self, sock: trio.socket.SocketType) -> None:
        """Many big READs whose replies are never read: the server must not buffer them all."""
        data = valid_handshake(False, False, self.rng)
        for cookie in range(64):
            offset = self.rng.randrange(0, DISK_SIZE - (1 << 20))
            data += struct.pack(">IHHQQI", nbdspec.REQUEST_MAGIC, 0, 0, cookie, offset, 1 << 20)
        with trio.move_on_after(1.0):
            await self.send_pieces(sock, data)
        await trio.sleep(self.rng.uniform(0.1, 1.0))

    async def slow(self, sock: trio.socket.SocketType) -> None:
        """A valid session sent a few bytes at a time."""
        data = valid_handshake(True, True, self.rng)
        data += struct.pack(">IHHQQI", nbdspec.REQUEST_MAGIC, 0, 0, 7, 4096, 4096)
        for i in range(0, len(data), 7):
            await sock.send(data[i : i + 7])
            await trio.sleep(0.005)
        await self.drain(sock, 0.2)

    async def batch(self, n: int, concurrency: int) -> None:
        limiter = trio.CapacityLimiter(concurrency)

        async def run() -> None:
            async with limiter:
                await self.one()

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(run)


# -- the clean client ------------------------------------------------------------------------


def _libnbd() -> Any:
    """python3-libnbd's ``nbd`` module, which Debian installs outside any virtualenv."""
    try:
        return importlib.import_module("nbd")
    except ImportError:
        if DIST_PACKAGES not in sys.path:
            sys.path.append(DIST_PACKAGES)
        return importlib.import_module("nbd")


def clean_check(uri: str, rng: random.Random) -> list[str]:
    """Write, flush, read back and verify through python3-libnbd; the problems seen."""
    nbd = _libnbd()
    problems = []
    for structured in (True, False):
        h = nbd.NBD()
        try:
            h.set_request_structured_replies(structured)
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            h.connect_uri(uri)
            blocks = []
            for length in (512, 4096, 65536, 1 << 20):
                offset = rng.randrange(0, (DISK_SIZE - length) // 512) * 512
                data = rng.randbytes(length)
                h.pwrite(data, offset)
                blocks.append((offset, data))
            h.flush()
            cookies = [h.aio_pread(nbd.Buffer(len(d)), o) for o, d in blocks]
            h.zero(4096, DISK_SIZE - 4096)
            pending = set(cookies)
            while pending:
                pending = {c for c in pending if not h.aio_command_completed(c)}
                if pending:
                    h.poll(-1)
            for offset, data in blocks:
                # Later blocks may overlap earlier ones: compare with what was written last.
                got = h.pread(len(data), offset)
                want = bytearray(data)
                for o2, d2 in blocks[blocks.index((offset, data)) + 1 :]:
                    lo, hi = max(o2, offset), min(o2 + len(d2), offset + len(data))
                    if lo < hi:
                        want[lo - offset : hi - offset] = d2[lo - o2 : hi - o2]
                if offset + len(data) > DISK_SIZE - 4096:
                    cut = max(DISK_SIZE - 4096 - offset, 0)
                    want[cut:] = bytes(len(want) - cut)
                if got != want:
                    problems.append(f"read back at {offset} differs (structured={structured})")
            if h.pread(4096, DISK_SIZE - 4096) != bytes(4096):
                problems.append(f"zeroed tail reads non-zero (structured={structured})")
            if structured and h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
                h.block_status(DISK_SIZE, 0, lambda *args: 0)
            h.shutdown()
        except nbd.Error as exc:
            problems.append(f"libnbd error (structured={structured}): {exc}")
        finally:
            with contextlib.suppress(Exception):
                h.close()
    return problems


class CleanClient(threading.Thread):
    """Verified I/O in the clean region, through python3-libnbd, while a batch runs: a
    write, a read back, now and then a FLUSH; any error or wrong byte is a desync."""

    def __init__(self, uri: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.problems: list[str] = []
        self.operations = 0

    def run(self) -> None:
        nbd = _libnbd()
        h = nbd.NBD()
        try:
            h.set_request_structured_replies(self.rng.random() < 0.5)
            h.connect_uri(self.uri)
            while not self.stop.is_set():
                length = self.rng.choice((512, 4096, 65536, 1 << 20))
                offset = self.rng.randrange(CLEAN_START, DISK_SIZE - length + 1)
                data = self.rng.randbytes(length)
                h.pwrite(data, offset)
                if h.pread(length, offset) != data:
                    self.problems.append(f"clean read at {offset}+{length} differs")
                if self.rng.random() < 0.1:
                    h.flush()
                self.operations += 1
                time.sleep(0.001)  # leave the server to the fuzzing too
            h.shutdown()
        except nbd.Error as exc:
            self.problems.append(f"libnbd error in the clean client: {exc}")
        finally:
            with contextlib.suppress(Exception):
                h.close()


# -- the campaign ----------------------------------------------------------------------------


def wait_idle(daemon: Daemon) -> bool:
    deadline = time.monotonic() + IDLE_TIMEOUT
    while time.monotonic() < deadline:
        if not daemon.alive():
            return False
        if daemon.sockets() <= daemon.baseline:
            return True
        time.sleep(0.05)
    return False


def server_errors(log: Path) -> list[str]:
    lines = log.read_text(errors="replace").splitlines()
    return [line for line in lines if " ERROR" in line or "Traceback" in line]


def run(
    driver: str, connections: int, batch: int, concurrency: int, workdir: Path, seed: int
) -> Figures:
    figures = Figures(driver)
    rng = random.Random(seed)
    daemon = Daemon(driver, workdir)
    daemon.start()
    fuzzer = Fuzzer(daemon, rng, figures)
    started = time.monotonic()
    try:
        while figures.connections < connections:
            n = min(batch, connections - figures.connections)
            clean = CleanClient(daemon.uri, rng.randrange(1 << 32))
            clean.start()
            trio.run(fuzzer.batch, n, concurrency)
            clean.stop.set()
            clean.join(timeout=IDLE_TIMEOUT)
            figures.clean_operations += clean.operations
            if clean.problems or clean.is_alive():
                figures.desyncs += 1
                figures.problems += clean.problems or ["the clean client hung"]
            figures.batches += 1
            if not wait_idle(daemon):
                if not daemon.alive():
                    figures.deaths += 1
                    figures.problems.append(f"daemon died: status {daemon.process.returncode}")  # type: ignore[union-attr]
                    daemon.start()
                    continue
                figures.stuck_batches += 1
                figures.problems.append(
                    f"batch {figures.batches}: {daemon.sockets() - daemon.baseline} "
                    f"connections still open {IDLE_TIMEOUT} s after their clients closed"
                )
            problems = clean_check(daemon.uri, rng)
            figures.checks += 1
            if problems:
                figures.desyncs += 1
                figures.problems += problems
            rss, hwm = daemon.rss()
            print(
                f"batch {figures.batches}: {figures.connections} connections, "
                f"desyncs {figures.desyncs}, RSS {rss:.1f} MiB (peak {hwm:.1f})",
                file=sys.stderr,
                flush=True,
            )
            if figures.batches == 1:
                figures.first_rss_mib = round(rss, 1)
            figures.last_rss_mib = round(rss, 1)
            figures.peak_rss_mib = round(hwm, 1)
    finally:
        figures.seconds = round(time.monotonic() - started, 1)
        status = daemon.stop()
        if status != 0:
            figures.problems.append(f"the daemon's exit status on SIGTERM: {status}")
            figures.deaths += 0 if status is None else 1
        errors = server_errors(daemon.log_path)
        figures.server_errors = len(errors)
        figures.problems += errors[:20]
        figures.log_lines = len(daemon.log_path.read_text(errors="replace").splitlines())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--driver", choices=("ramdisk", "filedisk", "dedup", "objstore"), default="ramdisk"
    )
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000, help="connections between checks")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true", help="figures as one JSON line")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="usbd-netfuzz-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    batch = min(args.batch, max(args.connections, 1))
    figures = run(args.driver, args.connections, batch, args.concurrency, workdir, seed)
    report = {**figures.__dict__, "seed": seed, "workdir": str(workdir)}
    report["problems"] = figures.problems[:50]  # the first ones; the count says how many
    report["problem_count"] = len(figures.problems)
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))
    bad = figures.desyncs or figures.deaths or figures.server_errors or figures.stuck_batches
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
