"""kill -9 at random moments, against real ``usbd-dedup`` processes: what a crash may and may
not lose, and that no crash leaves the index and the slots disagreeing.

Each cycle: several connections (multi-conn) write at once, each with several aio requests in
flight, a mix of unique blocks (random, text, half random and half text, all zero but a byte or
two), duplicates (a few hot contents written all over the device, recently written contents,
another block's current content, often at the same moment from several connections), all-zero
WRITEs, WRITE_ZEROES (aligned and not), TRIMs, writes of a part of a dedup block (the driver
reads, modifies and writes the block), FUA writes, FLUSHes, and reads that must return what the
block holds at that moment. A "burst" writes one new content to several blocks at once; a
"race" request pair writes a block's content to another block while overwriting (or trimming)
the block that held it: the last reference of a slot dropped while a new one is added. The
daemon is SIGKILLed at a random moment (every other cycle the first moment after a random delay
that a FLUSH is in flight, which each test insists happened at least once; now and then during
a clean stop instead), then, some cycles, ``usbd-dedup --check`` repairs the crashed volume
offline, and some cycles the restart is itself killed part way through its open (the quick
check after an unclean stop). After the restart:

* every block holds, exactly, what it held when the last FLUSH that covered it was acknowledged
  (a FLUSH covers the writes on every connection answered before it was sent: multi-conn), or
  the whole content of a request sent to it after that (:meth:`Ledger.check`): never a torn
  dedup block, never another block's content, never an older content;
* the restart's log says it checked the volume (not stopped cleanly) unless an offline check
  already had; every other cycle a clean stop, then ``usbd-dedup --check`` must print
  ``check: consistent`` and nothing but the statistics: the daemon's own check at open
  repaired whatever the crash left; now and then ``--stats`` maps exactly the non-zero
  blocks and counts at least one slot per distinct content, at most one per mapped block.

At the end, writes without FLUSH and a clean stop: after a restart the device is exactly what
was written. Writers never send two requests touching the same dedup block at once (a file
system does not either), so each block's writes are ordered and the judge is exact.

Seeds are random and printed; USBD_CRASH_SEED=<n> replays one (timing aside).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

KiB = 1 << 10
MiB = 1 << 20

#: Ceilings, not expectations: generous so that a loaded 2-core machine does not fail a test.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
TOOL_TIMEOUT = 120.0
#: A writer still running this long after the kill fails the test.
GUARD = 60.0

COMMAND = str(Path(sys.executable).with_name("usbd-dedup"))
#: Where Debian's python3-libnbd installs the ``nbd`` module (outside any virtualenv).
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
VOLUME = "vol"
#: What the daemon logs when it opens a volume that was not stopped cleanly (and checks it),
#: and the summary of that check.
UNCLEAN = re.compile(r"not stopped cleanly")
OPEN_CHECK = re.compile(r"WARNING: (check: .*)")


def missing(what: str) -> None:
    """Skip for lack of ``what`` on a developer's machine; fail in CI, where it must exist."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required in CI but is not available", pytrace=False)
    pytest.skip(f"{what} is not available")


def import_libnbd() -> ModuleType:
    """The ``nbd`` module of python3-libnbd; Debian's directory is appended (never prepended,
    so it cannot shadow the virtualenv) only when a plain import fails."""
    try:
        return importlib.import_module("nbd")
    except ImportError:
        if DIST_PACKAGES not in sys.path and os.path.isdir(DIST_PACKAGES):
            sys.path.append(DIST_PACKAGES)
    try:
        return importlib.import_module("nbd")
    except ImportError:
        missing("python3-libnbd (the 'nbd' module)")
        raise  # unreachable: missing() raises


# -- daemons ---------------------------------------------------------------------------------


class Daemon:
    """One volume served by ``usbd-dedup`` processes, one after another, on a unix socket
    (``workdir`` should be short: a socket path has 108 bytes at most)."""

    def __init__(self, workdir: Path, *, size: int, extra: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.size = size
        self.extra = list(extra)
        self.store_dir = workdir / "store"
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / "s"
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.runs = 0
        self.stderr_path = workdir / "daemon.stderr"
        self.started_in = 1.0
        self._reader: threading.Thread | None = None
        self._serving: queue.Queue[bool] = queue.Queue()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    @property
    def volume_dir(self) -> Path:
        return self.store_dir / f"{VOLUME}.dedup"

    def store_args(self) -> list[str]:
        return ["--store-dir", str(self.store_dir), "--store-name", VOLUME]

    def argv(self) -> list[str]:
        return [
            COMMAND,
            "--listen", str(self.socket),
            *self.store_args(),
            "--store-size", str(self.size),
            *self.extra,
        ]  # fmt: skip

    def report(self) -> str:
        """The last lines of the last run's output and of every run's log, for a failure."""
        log = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        tail = "\n".join(log.splitlines()[-80:])
        return f"stdout:\n{''.join(self.lines[-20:])}\nstderr (last lines):\n{tail}"

    def this_run_log(self) -> str:
        return self.stderr_path.read_text(errors="replace").rsplit("---- run ", 1)[-1]

    def spawn(self) -> None:
        """Start a process, without waiting for it to serve."""
        assert self.process is None or self.process.poll() is not None
        self.runs += 1
        self.lines = []
        with self.stderr_path.open("a") as stderr:
            stderr.write(f"---- run {self.runs}: {' '.join(self.argv()[1:])}\n")
            stderr.flush()
            process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.process = process
        self._spawned_at = time.monotonic()
        serving: queue.Queue[bool] = queue.Queue()
        self._serving = serving

        def read_stdout() -> None:
            assert process.stdout is not None
            with process.stdout:
                for line in process.stdout:
                    self.lines.append(line)
                    if " is serving " in line:
                        serving.put(True)
            serving.put(False)

        self._reader = threading.Thread(target=read_stdout, daemon=True)
        self._reader.start()

    def wait_serving(self, timeout: float) -> bool:
        try:
            up = self._serving.get(timeout=timeout)
        except queue.Empty:
            return False
        if up:
            self.started_in = time.monotonic() - self._spawned_at
        return up

    def start(self) -> None:
        self.spawn()
        if not self.wait_serving(START_TIMEOUT):
            self.kill()
            pytest.fail(f"usbd-dedup did not start (run {self.runs})\n{self.report()}")
        assert "Traceback" not in self.this_run_log(), self.report()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT)
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM, then insist on a clean exit: status 0, "terminated normally", no
        traceback in this run's log."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"usbd-dedup ignored SIGTERM\n{self.report()}")
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT)
        assert status == 0, f"usbd-dedup exited with {status}\n{self.report()}"
        assert "terminated normally" in "".join(self.lines), self.report()
        assert "Traceback" not in self.this_run_log(), self.report()

    def close(self) -> None:
        if self.alive():
            self.kill()

    def tool(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``usbd-dedup ARGS --store-dir ... --store-name ...`` (the volume not in use)."""
        assert not self.alive()
        return subprocess.run(
            [COMMAND, *args, *self.store_args()],
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def check(self) -> tuple[str, subprocess.CompletedProcess[str]]:
        """``usbd-dedup --check``: its summary line (the last ``check: ...`` line) and all it
        said; exit 0 required (1: in use, missing, or damage it cannot repair)."""
        result = self.tool("--check")
        said = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        summaries = [
            line.strip()
            for line in (result.stdout + "\n" + result.stderr).splitlines()
            if line.strip().startswith("check: ")
        ]
        assert result.returncode == 0 and summaries, (
            f"usbd-dedup --check exited with {result.returncode}\n{said}\n{self.report()}"
        )
        assert "Traceback" not in result.stderr, said
        return summaries[-1], result

    def stats(self) -> dict[str, float]:
        """``usbd-dedup --stats``: each ``key: value`` line's leading number."""
        result = self.tool("--stats")
        assert result.returncode == 0, (
            f"usbd-dedup --stats exited with {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        return parse_stats(result.stdout)


_STAT = re.compile(r"^\s*([a-z][a-z ]*[a-z]):\s*([-+]?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)")
#: The check's progress (usbd.core.progress; its last line when it took a second or more):
#: neither a statistic nor a repair.
_PROGRESS = re.compile(r".* usbd\.dedup INFO: checking( \(reading every stored block\))?: ")


def parse_stats(text: str) -> dict[str, float]:
    stats: dict[str, float] = {}
    for line in text.splitlines():
        found = _STAT.match(line)
        if found:
            stats[found.group(1)] = float(found.group(2))
    for key in ("mapped blocks", "unique blocks", "block size", "size"):
        assert key in stats, f"--stats says no {key!r}:\n{text}"
    return stats


def close(handle: Any) -> None:
    """Drop a libnbd handle's connection (``close`` is recent in libnbd's binding)."""
    closer = getattr(handle, "close", None)
    if closer is not None:
        closer()


@contextlib.contextmanager
def connected(nbd: ModuleType, daemon: Daemon) -> Iterator[Any]:
    handle = nbd.NBD()
    handle.connect_uri(daemon.uri)
    try:
        yield handle
    finally:
        with contextlib.suppress(nbd.Error):
            handle.shutdown()
        close(handle)


def read_image(handle: Any, size: int, step: int = 256 * KiB) -> bytes:
    return b"".join(bytes(handle.pread(min(step, size - o), o)) for o in range(0, size, step))


# -- contents ---------------------------------------------------------------------------------


_WORDS = (
    "the block map refers to a slot whose count says how many blocks share its content "
    "and a flush makes data durable before the index batch commits with sync so that "
    "nothing flushed is ever lost when the daemon is killed at any moment"
)


def _corpus() -> bytes:
    """Text-like bytes (words of a small vocabulary): zstd makes them several times smaller."""
    rng = random.Random(13)
    words = _WORDS.split()
    out: list[str] = []
    size = 0
    while size < 512 * KiB:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))
        line = f"{line} {rng.randrange(10_000)}.\n"
        out.append(line)
        size += len(line)
    return "".join(out).encode()


CORPUS = _corpus()


def digest(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=20).digest()


class Registry:
    """Every content of one dedup block written in a test: its digest gives its number (0:
    zeros), so a block read back names the content it holds (``None``: nothing ever
    written). Holds the few hot contents written all over the device and a pool of recent
    ones."""

    def __init__(self, block_size: int, rng: random.Random) -> None:
        self.block_size = block_size
        self.zero = bytes(block_size)
        self.ids: dict[bytes, int] = {digest(self.zero): 0}
        self.kinds: dict[int, str] = {0: "zeros"}
        self.serial = 0
        self.recent: deque[tuple[int, bytes]] = deque(maxlen=48)
        self.hot: list[tuple[int, bytes]] = []
        for n in range(4):
            data = self.fresh(rng, "text" if n % 2 else "random")
            self.hot.append((self.register(data, "hot"), data))

    def register(self, data: bytes, kind: str) -> int:
        key = digest(data)
        number = self.ids.get(key)
        if number is None:
            self.serial += 1
            number = self.ids[key] = self.serial
            self.kinds[number] = kind
        return number

    def identify(self, data: bytes | memoryview) -> int | None:
        return self.ids.get(digest(data))

    def fresh(self, rng: random.Random, kind: str) -> bytes:
        """New content of one of the kinds: random, text, mixed (part random, part text),
        sparse (zeros but for a byte or two, one of them maybe the last)."""
        size = self.block_size
        if kind == "random":
            return rng.randbytes(size)
        if kind == "sparse":
            data = bytearray(size)
            for _ in range(rng.randint(1, 2)):
                data[rng.choice([rng.randrange(size), size - 1, 0])] = rng.randrange(1, 256)
            return bytes(data)
        header = f"content {rng.getrandbits(64):016x}\n".encode()
        if kind == "mixed":
            header += rng.randbytes(rng.choice([size // 8, size // 4, size // 2, 3 * size // 4]))
        start = rng.randrange(len(CORPUS) - size)
        return (header + CORPUS[start : start + size])[:size]

    def describe(self, number: int | None) -> str:
        if number is None:
            return "garbage"
        if number == 0:
            return "zeros"
        return f"content #{number} ({self.kinds.get(number, '?')})"


# -- what was written -------------------------------------------------------------------------


@dataclass
class Op:
    """One request: what it is, where, and the (block, entry index) it put in the ledger."""

    kind: str  # write, zero, trim, read, flush
    offset: int = 0
    length: int = 0
    payload: bytes = b""
    flags: int = 0
    fua: bool = False
    entries: list[tuple[int, int]] = field(default_factory=list)
    snapshot: list[int] | None = None
    #: read: the blocks' expected digests
    expected: list[bytes] = field(default_factory=list)


@dataclass
class Verdict:
    problems: list[str]
    numbers: list[int | None]

    def assert_ok(self, what: str, report: Callable[[], str] = str) -> None:
        if not self.problems:
            return
        shown = "\n  ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        pytest.fail(f"{what}:\n  {shown}{more}\n{report()}", pytrace=False)


class Ledger:
    """Every request sent since the device was (re)opened on a known image, per dedup block.

    For block ``b``: ``values[b]`` is the content numbers it was given, in order (index 0: what
    it held at the open); ``completed[b]`` the index of the last write answered;
    ``floor[b]`` the index of the last one a FLUSH (or FUA) made durable. A block in a request
    in flight is reserved: no other request touches it until the answer, so each block's
    writes are ordered. A request is recorded before it is sent (in flight at the kill: maybe
    done)."""

    def __init__(
        self,
        registry: Registry,
        image: bytes,
        *,
        can_fua: bool = True,
        can_trim: bool = True,
        can_zero: bool = True,
    ) -> None:
        self.registry = registry
        self.block_size = bs = registry.block_size
        self.blocks = len(image) // bs
        self.size = self.blocks * bs
        self.bytes = [image[b * bs : (b + 1) * bs] for b in range(self.blocks)]
        self.contents: dict[int, bytes] = {}
        initial = []
        for data in self.bytes:
            number = registry.identify(data)
            assert number is not None, "the image must be known"
            self.contents[number] = data
            initial.append(number)
        self.values = [[n] for n in initial]
        self.completed = [0] * self.blocks
        self.floor = [0] * self.blocks
        self.reserved: set[int] = set()
        self.where: dict[int, list[int]] = {}
        self.lock = threading.Lock()
        self.can_fua, self.can_trim, self.can_zero = can_fua, can_trim, can_zero
        self.requests = 0
        self.flushes_sent = 0
        self.flushes_acked = 0
        self.flushes_in_flight = 0
        self.reads = 0
        self.read_problems: list[str] = []

    # -- recording

    def _record(self, block: int, data: bytes, kind: str) -> tuple[int, int]:
        number = self.registry.register(data, kind)
        self.values[block].append(number)
        self.bytes[block] = data
        self.contents[number] = data
        places = self.where.setdefault(number, [])
        if len(places) < 6:
            places.append(block)
        self.reserved.add(block)
        return block, len(self.values[block]) - 1

    def _free_run(self, rng: random.Random, count: int) -> int | None:
        count = min(count, self.blocks)
        for _ in range(8):
            first = rng.randrange(self.blocks - count + 1)
            if not any(b in self.reserved for b in range(first, first + count)):
                return first
        return None

    def _content(self, rng: random.Random) -> tuple[bytes, str]:
        registry = self.registry
        roll = rng.random()
        if roll < 0.30:
            kind = "random"
        elif roll < 0.42:
            kind = "text"
        elif roll < 0.50:
            kind = "mixed"
        elif roll < 0.53:
            kind = "sparse"
        elif roll < 0.60:
            return registry.zero, "zeros"
        elif roll < 0.75 and registry.recent:
            return rng.choice(registry.recent)[1], "recent"
        elif roll < 0.87:
            return rng.choice(registry.hot)[1], "hot"
        else:
            return self.bytes[rng.randrange(self.blocks)], "copy"
        data = registry.fresh(rng, kind)
        registry.recent.append((registry.register(data, kind), data))
        return data, kind

    def plan(self, rng: random.Random, *, flush_rate: float) -> list[Op]:
        """The next request(s), recorded and their blocks reserved (an empty list: no free
        blocks just now)."""
        with self.lock:
            if rng.random() < flush_rate:
                self.flushes_sent += 1
                self.flushes_in_flight += 1
                return [Op("flush", snapshot=list(self.completed))]
            roll = rng.random()
            if roll < 0.05:
                ops = self._race(rng)
            elif roll < 0.10 and self.can_trim:
                ops = self._trim(rng)
            elif roll < 0.16 and self.can_zero:
                ops = self._zero(rng)
            elif roll < 0.26:
                ops = self._partial(rng, zero=False)
            elif roll < 0.34:
                ops = self._read(rng)
            elif roll < 0.38:
                ops = self._burst(rng)
            else:
                ops = self._write(rng)
            self.requests += sum(op.kind != "read" for op in ops)
            return ops

    def _count(self, rng: random.Random) -> int:
        roll = rng.random()
        if roll < 0.5:
            return 1
        if roll < 0.9:
            return rng.randint(2, 4)
        return rng.randint(5, 32)

    def _write(self, rng: random.Random, first: int | None = None, count: int = 0) -> list[Op]:
        if first is None:
            count = self._count(rng)
            first = self._free_run(rng, count)
            if first is None:
                return []
            count = min(count, self.blocks)
        chunks, entries = [], []
        for block in range(first, first + count):
            data, kind = self._content(rng)
            chunks.append(data)
            entries.append(self._record(block, data, kind))
        fua = self.can_fua and rng.random() < 0.03
        bs = self.block_size
        return [Op("write", first * bs, count * bs, b"".join(chunks), fua=fua, entries=entries)]

    def _trim(self, rng: random.Random) -> list[Op]:
        count = self._count(rng) if rng.random() < 0.9 else 128
        count = min(count, self.blocks)
        first = self._free_run(rng, count)
        if first is None:
            return []
        zero = self.registry.zero
        entries = [self._record(b, zero, "zeros") for b in range(first, first + count)]
        bs = self.block_size
        return [Op("trim", first * bs, count * bs, entries=entries)]

    def _zero(self, rng: random.Random) -> list[Op]:
        if rng.random() < 0.4:
            return self._partial(rng, zero=True)
        count = self._count(rng)
        first = self._free_run(rng, count)
        if first is None:
            return []
        count = min(count, self.blocks)
        zero = self.registry.zero
        entries = [self._record(b, zero, "zeros") for b in range(first, first + count)]
        bs = self.block_size
        flags = 0 if rng.random() < 0.7 else 1  # 1: NO_HOLE, set by the writer
        fua = self.can_fua and rng.random() < 0.05
        return [Op("zero", first * bs, count * bs, flags=flags, fua=fua, entries=entries)]

    def _partial(self, rng: random.Random, *, zero: bool) -> list[Op]:
        """A write (or WRITE_ZEROES) of part of a dedup block, or across the end of one and
        the start of the next: the driver must read, modify and write whole blocks."""
        bs = self.block_size
        if rng.random() < 0.5:  # whole sectors
            length = 512 * rng.randint(1, max(1, 2 * bs // 512 - 1))
            start = 512 * rng.randrange((self.size - length) // 512 + 1)
        else:
            length = rng.randint(1, 2 * bs - 1)
            start = rng.randrange(self.size - length + 1)
        end = start + length
        first, last = start // bs, (end - 1) // bs
        if any(b in self.reserved for b in range(first, last + 1)):
            return []
        if zero:
            payload = bytes(length)
        elif rng.random() < 0.5:
            payload = rng.randbytes(length)
        else:
            at = rng.randrange(len(CORPUS) - length)
            payload = CORPUS[at : at + length]
        entries = []
        for block in range(first, last + 1):
            lo, hi = max(start, block * bs), min(end, (block + 1) * bs)
            base = self.bytes[block]
            data = (
                base[: lo - block * bs] + payload[lo - start : hi - start] + base[hi - block * bs :]
            )
            entries.append(self._record(block, data, "partial"))
        if zero:
            return [Op("zero", start, length, entries=entries)]
        return [Op("write", start, length, payload, entries=entries)]

    def _race(self, rng: random.Random) -> list[Op]:
        """Write block A's content to block B while A is overwritten or trimmed: A's slot
        loses its last reference (often) as B takes a new one."""
        for _ in range(8):
            a = rng.randrange(self.blocks)
            if a not in self.reserved and self.values[a][-1] != 0:
                break
        else:
            return []
        b = self._free_run(rng, 1)
        if b is None or b == a:
            return []
        bs = self.block_size
        shared = self.bytes[a]
        to_b = Op("write", b * bs, bs, shared, entries=[self._record(b, shared, "race")])
        if rng.random() < 0.3 and self.can_trim:
            off_a = Op("trim", a * bs, bs, entries=[self._record(a, self.registry.zero, "zeros")])
        else:
            off_a = self._write(rng, a, 1)[0]
        return [to_b, off_a] if rng.random() < 0.5 else [off_a, to_b]

    def _burst(self, rng: random.Random) -> list[Op]:
        """One new content to several blocks, one request each, all in flight together: the
        first stores it while the others find its hash (or store a copy of their own)."""
        kind = rng.choice(["random", "text", "mixed"])
        data = self.registry.fresh(rng, kind)
        self.registry.recent.append((self.registry.register(data, kind), data))
        ops = []
        bs = self.block_size
        for _ in range(rng.randint(2, 6)):
            block = self._free_run(rng, 1)
            if block is None:
                break
            ops.append(Op("write", block * bs, bs, data, entries=[self._record(block, data, kind)]))
        return ops

    def _read(self, rng: random.Random) -> list[Op]:
        count = rng.randint(1, 4)
        first = self._free_run(rng, count)
        if first is None:
            return []
        count = min(count, self.blocks)
        blocks = range(first, first + count)
        self.reserved.update(blocks)
        bs = self.block_size
        expected = [digest(self.bytes[b]) for b in blocks]
        return [Op("read", first * bs, count * bs, expected=expected)]

    def done(self, op: Op, data: bytes | None = None) -> None:
        """``op`` was answered (successfully)."""
        with self.lock:
            if op.kind == "flush":
                assert op.snapshot is not None
                self.floor = [max(f, s) for f, s in zip(self.floor, op.snapshot, strict=True)]
                self.flushes_acked += 1
                self.flushes_in_flight -= 1
                return
            if op.kind == "read":
                assert data is not None
                bs = self.block_size
                first = op.offset // bs
                for n, want in enumerate(op.expected):
                    got = data[n * bs : (n + 1) * bs]
                    if digest(got) != want:
                        number = self.registry.identify(got)
                        steps = self.values[first + n]
                        if number in steps[:-1]:
                            at = max(i for i, v in enumerate(steps[:-1]) if v == number)
                            how = f"an older content of the block (write {at} of {len(steps) - 1})"
                        elif number is None:
                            how = self._garbage(got, steps[-1:])
                        else:
                            how = f"never written to this block (to {self.where.get(number)})"
                        self.read_problems.append(
                            f"a read of block {first + n} during the writes returned "
                            f"{self.registry.describe(number)}, not what it held "
                            f"({self.registry.describe(steps[-1])}): {how}"
                        )
                    self.reserved.discard(first + n)
                self.reads += 1
                return
            for block, index in op.entries:
                self.completed[block] = index
                if op.fua:
                    self.floor[block] = max(self.floor[block], index)
                self.reserved.discard(block)

    # -- judging

    def current(self) -> list[int]:
        return [v[-1] for v in self.values]

    def check(self, image: bytes, *, exact: bool = False) -> Verdict:
        """Every block holds the content its last durable write gave it or one sent to it
        after that (``exact``: its last write's, as after a clean stop)."""
        bs = self.block_size
        problems: list[str] = []
        numbers: list[int | None] = []
        describe = self.registry.describe
        for block in range(self.blocks):
            data = image[block * bs : (block + 1) * bs]
            number = self.registry.identify(data)
            numbers.append(number)
            steps = self.values[block]
            allowed = steps[-1:] if exact else steps[self.floor[block] :]
            if number in allowed:
                continue
            durable = steps[self.floor[block]]
            head = f"block {block}: {describe(number)}"
            if number is None:
                why = self._garbage(data, allowed)
            elif number in steps:
                at = max(i for i, n in enumerate(steps) if n == number)
                then = f"write {at} of {len(steps) - 1} to it" if at else "what it held at the open"
                why = (
                    f"older than the durable write ({then}; "
                    f"the last acknowledged FLUSH or FUA covered {self.floor[block]}, "
                    f"{describe(durable)})"
                )
            elif number == 0:
                why = f"the durable {describe(durable)} is lost"
            else:
                places = self.where.get(number)
                elsewhere = f" (written this run to blocks {places})" if places else ""
                why = (
                    "never written to this block since the open, nor what it held then: "
                    f"another block's data{elsewhere}"
                )
            problems.append(
                f"{head}, {why}; allowed: {', '.join(describe(n) for n in allowed)} "
                f"({self.flushes_acked} FLUSHes acknowledged)"
            )
        return Verdict(problems, numbers)

    def _garbage(self, data: bytes, allowed: list[int]) -> str:
        """Say which sectors of a block match which allowed content (a torn block)."""
        step = min(512, self.block_size)
        sectors = []
        for at in range(0, self.block_size, step):
            part = data[at : at + step]
            which = [n for n in allowed if self.contents[n][at : at + step] == part]
            sectors.append(str(which[0]) if which else "?")
        return (
            f"torn or invented (each {step} B: the allowed content it matches, ? none: "
            f"{' '.join(sectors)}; starts {data[:16].hex()})"
        )


# -- the writers ------------------------------------------------------------------------------


class Writer(threading.Thread):
    """One connection: up to ``depth`` requests in flight, planned by the ledger, until one
    fails (after the kill), or, with ``until``, until that moment (then it drains)."""

    def __init__(
        self,
        nbd: ModuleType,
        handle: Any,
        ledger: Ledger,
        rng: random.Random,
        *,
        depth: int,
        flush_rate: float,
        fired: threading.Event,
        until: float | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.nbd = nbd
        self.handle = handle
        self.ledger = ledger
        self.rng = rng
        self.depth = depth
        self.flush_rate = flush_rate
        self.fired = fired
        self.until = until
        self.error: str | None = None
        self.guard = time.monotonic() + GUARD + 30
        self.sent = 0

    def run(self) -> None:
        try:
            self._loop()
        except self.nbd.Error as exc:
            if not self.fired.is_set():
                self.error = f"{self.name}: a request failed before the kill: {exc}"
        except Exception:
            self.error = f"{self.name}:\n{traceback.format_exc()}"

    def _issue(self, op: Op) -> tuple[int, Any]:
        nbd, h = self.nbd, self.handle
        flags = nbd.CMD_FLAG_FUA if op.fua else 0
        if op.kind == "flush":
            return h.aio_flush(), None
        if op.kind == "read":
            buf = nbd.Buffer(op.length)
            return h.aio_pread(buf, op.offset), buf
        if op.kind == "trim":
            return h.aio_trim(op.length, op.offset, flags=flags), None
        if op.kind == "zero":
            if op.flags:
                flags |= nbd.CMD_FLAG_NO_HOLE
            return h.aio_zero(op.length, op.offset, flags=flags), None
        buf = nbd.Buffer.from_bytearray(op.payload)
        return h.aio_pwrite(buf, op.offset, flags=flags), buf

    def _loop(self) -> None:
        rng, ledger = self.rng, self.ledger
        in_flight: dict[int, tuple[Op, Any]] = {}
        while True:
            now = time.monotonic()
            if now > self.guard:
                self.error = f"{self.name} still running {GUARD:.0f} s past its end"
                return
            stopping = self.until is not None and now >= self.until
            if not stopping:
                while len(in_flight) < self.depth:
                    ops = ledger.plan(rng, flush_rate=self.flush_rate)
                    if not ops:
                        break
                    for op in ops:
                        cookie, buf = self._issue(op)
                        in_flight[cookie] = (op, buf)
                        self.sent += 1
            if not in_flight:
                if stopping:
                    return
                time.sleep(0.001)
                continue
            self.handle.poll(1000)
            for cookie in list(in_flight):
                if self.handle.aio_command_completed(cookie):
                    op, buf = in_flight.pop(cookie)
                    data = bytes(buf.to_bytearray()) if op.kind == "read" else None
                    ledger.done(op, data)
            if rng.random() < 0.01:
                time.sleep(rng.uniform(0, 0.03))


class Killer(threading.Thread):
    """SIGKILLs the daemon ``delay`` seconds in; with ``when``, at the first moment after
    that ``when()`` holds (polled, at most ``patience`` s more); with ``during_stop``, sends
    SIGTERM first and SIGKILL a moment later (the clean stop under way)."""

    def __init__(
        self,
        daemon: Daemon,
        delay: float,
        fired: threading.Event,
        *,
        when: Callable[[], bool] | None = None,
        during_stop: float | None = None,
        patience: float = 3.0,
    ) -> None:
        super().__init__(daemon=True)
        self.pid = daemon.pid
        self.delay = delay
        self.fired = fired
        self.when = when
        self.during_stop = during_stop
        self.patience = patience
        self.targeted = False
        self.at = 0.0

    def run(self) -> None:
        started = time.monotonic()
        time.sleep(self.delay)
        if self.when is not None:
            until = time.monotonic() + self.patience
            while time.monotonic() < until:
                if self.when():
                    self.targeted = True
                    break
                time.sleep(0.0005)
        self.fired.set()
        self.at = time.monotonic() - started
        with contextlib.suppress(ProcessLookupError):
            if self.during_stop is not None:
                os.kill(self.pid, signal.SIGTERM)
                time.sleep(self.during_stop)
            os.kill(self.pid, signal.SIGKILL)


def connect_all(nbd: ModuleType, daemon: Daemon, count: int) -> list[Any]:
    handles = []
    for _ in range(count):
        handle = nbd.NBD()
        handle.connect_uri(daemon.uri)
        handles.append(handle)
    first = handles[0]
    assert first.can_multi_conn(), "usbd-dedup must offer multi-conn (the contract)"
    assert first.can_flush(), "usbd-dedup must offer FLUSH"
    return handles


def run_writers(
    nbd: ModuleType,
    daemon: Daemon,
    ledger: Ledger,
    rng: random.Random,
    *,
    connections: int,
    flush_rate: float,
    killer: Callable[[threading.Event], Killer] | None = None,
    until: float | None = None,
) -> Killer | None:
    """Run a writer per connection; either until the killer has killed the daemon (every
    writer must end with a failed request after the kill, none before) or until ``until``."""
    handles = connect_all(nbd, daemon, connections)
    fired = threading.Event()
    writers = [
        Writer(
            nbd,
            handle,
            ledger,
            random.Random(rng.getrandbits(64)),
            depth=rng.randint(1, 8),
            flush_rate=flush_rate,
            fired=fired,
            until=until,
        )
        for handle in handles
    ]
    kill = killer(fired) if killer is not None else None
    try:
        for writer in writers:
            writer.start()
        if kill is not None:
            kill.start()
            kill.join(timeout=kill.delay + kill.patience + 30)
        for writer in writers:
            writer.join(timeout=GUARD + 60)
        stuck = [w.name for w in writers if w.is_alive()]
        assert not stuck, f"writers {stuck} did not end\n{daemon.report()}"
    finally:
        for handle in handles:
            if kill is None:
                with contextlib.suppress(nbd.Error):
                    handle.shutdown()
            close(handle)
    errors = [w.error for w in writers if w.error]
    if errors:
        pytest.fail("\n".join(errors) + "\n" + daemon.report(), pytrace=False)
    if ledger.read_problems:
        shown = "\n  ".join(ledger.read_problems[:20])
        pytest.fail(f"reads during the writes:\n  {shown}\n{daemon.report()}", pytrace=False)
    return kill


# -- the loop ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    cycles: int
    block_size: int = 4 * KiB
    compress: str = "zstd"
    verify: bool = False
    size: int = 8 * MiB
    memcache: str | None = None
    connections: int = 3
    delays: tuple[float, float] = (0.05, 1.5)
    #: FLUSHes per request, one drawn per cycle.
    flush_rates: tuple[float, ...] = (0.03, 0.1, 0.2)

    def flags(self) -> list[str]:
        flags = []
        if self.block_size != 4 * KiB:
            flags += ["--dedup-blocksize", str(self.block_size)]
        if self.compress != "zstd":
            flags += ["--dedup-compress", self.compress]
        if self.verify:
            flags.append("--dedup-verify")
        if self.memcache:
            flags += ["--dedup-memcache", self.memcache]
        return flags


def case(cycles: int, *, slow: bool = False, **kwargs: Any) -> Any:
    c = Case(cycles, **kwargs)
    bs = f"{c.block_size // KiB}k" if c.block_size >= KiB else str(c.block_size)
    name = f"{bs}-{c.compress}{'-verify' if c.verify else ''}-{cycles}x"
    # The long loops have a session of their own (nox -s crash): CI runs the short ones.
    return pytest.param(c, id=name, marks=[pytest.mark.crash] if slow else [])


@pytest.fixture
def nbd() -> ModuleType:
    return import_libnbd()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory under /tmp (a unix socket path has 108 bytes at most; /tmp, not
    /dev/shm: a real file system with holes)."""
    path = Path(tempfile.mkdtemp(prefix="usbd-dc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("USBD_CRASH_SEED") or random.randrange(1 << 32))
    print(f"USBD_CRASH_SEED={seed}")
    return random.Random(seed)


def verify_stats(daemon: Daemon, numbers: Sequence[int | None], block_size: int) -> str:
    stats = daemon.stats()
    mapped = sum(1 for n in numbers if n)
    distinct = len({n for n in numbers if n})
    said = f"--stats: {stats}"
    assert stats["block size"] == block_size, said
    assert stats["size"] == daemon.size, said
    assert stats["mapped blocks"] == mapped, f"{mapped} non-zero blocks on the device; {said}"
    assert distinct <= stats["unique blocks"] <= mapped, (
        f"{distinct} distinct contents in {mapped} non-zero blocks; {said}"
    )
    return f"{mapped} mapped, {distinct} distinct, {stats['unique blocks']:.0f} unique slots"


def stop_and_check(daemon: Daemon, what: str) -> str:
    """A clean stop, then ``--check``: ``check: consistent``, and nothing said but the
    statistics (a line that tells of something repaired, e.g. data past the last committed
    slot cut off, is something the stop or the check at open left behind)."""
    daemon.stop()
    summary, result = daemon.check()
    said = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{daemon.report()}"
    assert summary == "check: consistent", (
        f"{what}: after a clean stop, usbd-dedup --check says {summary!r}\n{said}"
    )
    other = [
        line
        for line in (result.stdout + "\n" + result.stderr).splitlines()
        if line.strip()
        and line.strip() != summary
        and not _STAT.match(line)
        and not _PROGRESS.match(line)
    ]
    assert not other, f"{what}: after a clean stop, usbd-dedup --check repaired: {other}\n{said}"
    return summary


def read_back(nbd: ModuleType, daemon: Daemon, size: int, what: str) -> bytes:
    try:
        with connected(nbd, daemon) as handle:
            return read_image(handle, size)
    except nbd.Error as exc:
        pytest.fail(f"{what}: reading the device failed: {exc}\n{daemon.report()}", pytrace=False)


def crash_loop(nbd: ModuleType, daemon: Daemon, case: Case, rng: random.Random) -> None:
    registry = Registry(case.block_size, rng)
    ledger = Ledger(registry, bytes(case.size))
    log: list[str] = []
    flush_kills = 0
    acked = 0

    def fail_report() -> str:
        return "\n".join(log) + "\n" + daemon.report()

    daemon.start()
    for cycle in range(case.cycles):
        delay = rng.uniform(*case.delays)
        targeted = cycle % 2 == 1
        during_stop = rng.uniform(0, 0.2) if cycle % 5 == 4 else None

        def killer(
            fired: threading.Event,
            delay: float = delay,
            targeted: bool = targeted,
            during_stop: float | None = during_stop,
            ledger: Ledger = ledger,
        ) -> Killer:
            when = (lambda: ledger.flushes_in_flight > 0) if targeted else None
            return Killer(daemon, delay, fired, when=when, during_stop=during_stop)

        kill = run_writers(
            nbd,
            daemon,
            ledger,
            rng,
            connections=case.connections,
            flush_rate=rng.choice(case.flush_rates),
            killer=killer,
        )
        assert kill is not None
        in_flight_flush = ledger.flushes_in_flight > 0
        flush_kills += kill.targeted
        daemon.kill()
        acked += ledger.flushes_acked
        how = "during a clean stop " if during_stop is not None else ""
        line = (
            f"cycle {cycle}: killed {how}at {kill.at:.2f} s"
            f"{' with a FLUSH in flight' if in_flight_flush else ''}: "
            f"{ledger.requests} requests ({ledger.reads} reads), "
            f"{ledger.flushes_acked}/{ledger.flushes_sent} FLUSHes answered"
        )
        if cycle % 3 == 1:
            # The offline check repairs the crashed volume; a second finds nothing to do.
            summary, result = daemon.check()
            assert summary == "check: consistent" or re.fullmatch(
                r"check: repaired \d+ problems?(\(s\))?", summary
            ), f"--check of the crashed volume: {summary!r}\n{result.stdout}\n{result.stderr}"
            said = [
                t.strip()
                for t in (result.stdout + "\n" + result.stderr).splitlines()
                if t.strip()
                and t.strip() != summary
                and not _STAT.match(t)
                and not _PROGRESS.match(t)
            ]
            again, result = daemon.check()
            assert again == "check: consistent", (
                f"--check after --check repaired ({summary!r}): {again!r}\n{result.stdout}"
                f"\n{result.stderr}"
            )
            line += f"; offline {summary}{f' ({said})' if said else ''}"
        if cycle % 4 == 2:
            daemon.spawn()
            cut = rng.uniform(0.2, 1.0) * daemon.started_in
            served = daemon.wait_serving(cut)
            daemon.kill()
            line += f"; restart killed at {cut:.2f} s ({'serving' if served else 'opening'})"
        daemon.start()
        opened = daemon.this_run_log()
        found = OPEN_CHECK.findall(opened)
        # (Not after an offline check, which leaves the volume clean, nor after a kill during a
        # clean stop, which may have finished first.)
        if cycle % 3 != 1 and during_stop is None:
            assert UNCLEAN.search(opened) and found, (
                f"cycle {cycle}: the restart after kill -9 did not check the volume\n{opened}"
            )
        if found:
            line += f"; open: {found[-1]}"
        log.append(line)
        image = read_back(nbd, daemon, case.size, f"after the kill of cycle {cycle}")
        verdict = ledger.check(image)
        verdict.assert_ok(f"after the kill of cycle {cycle}", fail_report)
        ledger = Ledger(registry, image)
        if cycle % 2 == 1 or cycle == case.cycles - 1:
            # Every other cycle (each process start costs a second or two): a clean stop,
            # then the volume must need no repair; the next cycle starts it again.
            stop_and_check(daemon, f"cycle {cycle}")
            log[-1] += "; then check: consistent"
            if cycle % 4 == 3:
                log[-1] += "; " + verify_stats(daemon, verdict.numbers, case.block_size)
            daemon.start()
            assert not UNCLEAN.search(daemon.this_run_log()), (
                f"a start after a clean stop took the volume for not stopped cleanly\n"
                f"{daemon.report()}"
            )
    print("\n".join(log))
    assert flush_kills, "no kill found a FLUSH in flight:\n" + "\n".join(log)
    assert acked, "no FLUSH was answered in any cycle:\n" + "\n".join(log)

    # Writes without FLUSH, a clean stop: all there, exactly.
    run_writers(
        nbd,
        daemon,
        ledger,
        rng,
        connections=case.connections,
        flush_rate=0.0,
        until=time.monotonic() + 0.5,
    )
    daemon.stop()
    daemon.start()
    image = read_back(nbd, daemon, case.size, "after a clean stop")
    verdict = ledger.check(image, exact=True)
    verdict.assert_ok("after unflushed writes and a clean stop", fail_report)
    stop_and_check(daemon, "at the end")
    verify_stats(daemon, verdict.numbers, case.block_size)


@pytest.mark.parametrize(
    "case",
    [
        case(4),
        case(3, block_size=512, compress="identity", verify=True, size=4 * MiB),
        case(30, slow=True, memcache="16MiB", delays=(0.05, 3.0)),
        case(30, slow=True, block_size=16 * KiB, verify=True),
        case(30, slow=True, block_size=512, compress="identity", verify=True, size=4 * MiB),
        # Long cycles with few FLUSHes: the daemon's own commits (every 5 s) come mid-write.
        case(
            15,
            slow=True,
            block_size=64 * KiB,
            compress="identity",
            size=16 * MiB,
            delays=(0.5, 8.0),
            flush_rates=(0.0, 0.01, 0.03),
        ),
    ],
)
def test_kill_9_loses_nothing_flushed_and_leaves_nothing_to_repair(
    nbd: ModuleType, workdir: Path, rng: random.Random, case: Case
) -> None:
    daemon = Daemon(workdir, size=case.size, extra=case.flags())
    try:
        crash_loop(nbd, daemon, case, rng)
    finally:
        daemon.close()


# -- the judge itself -------------------------------------------------------------------------


def test_the_judge_refuses_what_no_crash_explains() -> None:
    """Ledger.check on images made by hand: it accepts the durable content and later ones,
    and refuses a lost flushed write, an older content, another block's content, a torn block;
    reads during the writes are compared too."""
    bs = 1024
    registry = Registry(bs, random.Random(1))
    ledger = Ledger(registry, bytes(4 * bs))
    rng = random.Random(2)

    def write(block: int, data: bytes) -> Op:
        with ledger.lock:
            return Op("write", block * bs, bs, data, entries=[ledger._record(block, data, "t")])

    def flush() -> None:
        with ledger.lock:
            op = Op("flush", snapshot=list(ledger.completed))
        ledger.done(op)

    a, b, c, d = (registry.fresh(rng, "random") for _ in range(4))
    for block, data in enumerate([a, b, c, d]):
        ledger.done(write(block, data))
    flush()
    image = [a, b, c, d]

    def ok(**kwargs: bool) -> bool:
        return not ledger.check(b"".join(image), **kwargs).problems

    assert ok()
    new = registry.fresh(rng, "text")
    pending = write(1, new)  # sent, not answered: b or new
    assert ok()
    image[1] = new
    assert ok()
    ledger.done(pending)  # answered, not flushed: b or new still
    image[1] = b
    assert ok()
    assert not ok(exact=True)  # after a clean stop only the last write will do
    flush()
    assert not ok()  # now the write is durable: b is older
    image[1] = new
    assert ok()
    image[2] = bytes(bs)  # flushed c lost
    assert not ok()
    image[2] = a  # another block's content
    assert "another block's data" in ledger.check(b"".join(image)).problems[0]
    image[2] = c[: bs // 2] + a[bs // 2 :]  # torn
    assert "torn" in ledger.check(b"".join(image)).problems[0]
    image[2] = c
    assert ok()
    # A FUA write is durable once answered.
    fua = write(3, a)
    fua.fua = True
    ledger.done(fua)
    image[3] = d
    assert not ok()
    image[3] = a
    assert ok(exact=True)
    # A read that returns what the block does not hold is a problem.
    with ledger.lock:
        (read,) = ledger._read(random.Random(0))
    ledger.done(read, bytes(read.length))
    assert ledger.read_problems
