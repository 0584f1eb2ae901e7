"""Helpers for usbd-objstore's crash and outage tests: real ``usbd-objstore`` processes, a
libnbd client, and a record of what was written with the two checks a crash is judged by.

Blocks of 4 KiB carry their own identity: block ``b`` written with serial ``s`` (unique in the
whole test) holds a header naming ``(b, s)`` and bytes derived from it, so a block read back
says which write put it there, and a torn, misplaced or invented block is recognised as such.
Serial 0 is zeros (the initial content, and what WRITE_ZEROES leaves).

:class:`History` is the list of block writes since the device was (re)opened, with how many of
them the last acknowledged FLUSH covered. It judges an image in two ways:

* :meth:`History.check_flushed` (a persistent cache after kill -9): every block holds what it
  held at the last acknowledged FLUSH or something written after it; nothing else;
* :meth:`History.check_point_in_time` (the bucket alone): the image is the device at one moment
  of the write sequence, i.e. there is an index ``t`` such that every write before ``t`` is in
  the image, none after it is, and only write ``t`` itself (the one in flight at the cut) may
  be there for some of its blocks and not for others; ``t`` must not be before the last
  acknowledged FLUSH when FLUSH waits for the bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import queue
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from usbd.core import load_key
from usbd.objstore import Codec, LocalStore, ObjectStore, S3Store
from usbd.objstore._manifest import Manifest, compression_of, load

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 4 * KiB

#: Ceilings, not expectations: generous so that a loaded 2-core machine does not fail a test.
START_TIMEOUT = 60.0
#: A clean stop uploads what is dirty first (for up to a minute when the store is gone).
STOP_TIMEOUT = 90.0

COMMAND = str(Path(sys.executable).with_name("usbd-objstore"))
#: Where Debian's python3-libnbd installs the ``nbd`` module (outside any virtualenv).
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
VOLUME = "vol"


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


# -- the store -------------------------------------------------------------------------------


@dataclass
class Backend:
    """Where the volume lives, as daemon flags, and a way for the test to look at it."""

    kind: str
    config: dict[str, Any]

    @classmethod
    def local(cls, path: Path) -> Backend:
        path.mkdir(parents=True, exist_ok=True)
        return cls("local", {"path": str(path)})

    @classmethod
    def s3(cls, config: dict[str, Any]) -> Backend:
        return cls("s3", dict(config))

    def args(self) -> list[str]:
        return ["--objstore-kind", self.kind, "--objstore-cfg", json.dumps(self.config)]

    def store(self) -> ObjectStore:
        if self.kind == "local":
            return LocalStore(self.config["path"])
        return S3Store(self.config, timeout=10.0)


@dataclass
class Inspection:
    """The bucket as the test sees it: the committed manifest and the data objects there."""

    manifest: Manifest
    data_keys: list[str]

    @property
    def uncommitted(self) -> list[str]:
        """Objects uploaded under the committed epoch after its last commit: a round that was
        under way (uploading, or about to commit) when the daemon died (or, rarely, one whose
        commit dropped them, killed before it deleted them)."""
        epoch = self.manifest.epoch
        ours = [g & 0xFFFFFFFF for g in self.manifest.chunks.values() if g >> 32 == epoch]
        newest = max(ours, default=0)
        found = []
        for key in self.data_keys:
            generation = int(key.rsplit(".", 1)[1], 16)
            if generation >> 32 == epoch and generation & 0xFFFFFFFF > newest:
                found.append(key)
        return found


class BucketView:
    """A look at volume ``name`` in the bucket, with the daemon's own key
    (``<store-dir>/key.aes``), as often as wanted."""

    def __init__(self, backend: Backend, store_dir: Path, name: str = VOLUME) -> None:
        self.name = name
        self.key = load_key(None, store_dir)
        self.store = backend.store()

    def _codec(self, public: dict[str, Any]) -> Codec:
        volume = bytes.fromhex(public["volume"])
        return Codec(volume, compression_of(public["compression"]), self.key)

    def look(self) -> Inspection:
        manifest = load(self.store, self.name, self._codec)
        assert manifest is not None, f"no manifest for volume {self.name!r}"
        prefix = f"{self.name}/data/"
        keys = list(self.store.list(prefix, deadline=time.monotonic() + 30))
        return Inspection(manifest, keys)

    def close(self) -> None:
        self.store.close()


def inspect_bucket(backend: Backend, store_dir: Path, name: str = VOLUME) -> Inspection:
    view = BucketView(backend, store_dir, name)
    try:
        return view.look()
    finally:
        view.close()


# -- daemons ---------------------------------------------------------------------------------


class Daemon:
    """One volume served by ``usbd-objstore`` processes, one after another, on a unix socket
    (so the paths stay under the 108-byte limit: ``workdir`` should be short)."""

    def __init__(
        self, workdir: Path, backend: Backend, *, size: int, extra: Sequence[str] = ()
    ) -> None:
        self.workdir = workdir
        self.backend = backend
        self.size = size
        self.extra = list(extra)
        self.store_dir = workdir / "store"
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / "s"
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.runs = 0
        self.stderr_path = workdir / "daemon.stderr"
        self._reader: threading.Thread | None = None

    @property
    def cache_dir(self) -> Path:
        return self.store_dir / f"{VOLUME}.cache"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def argv(self) -> list[str]:
        return [
            COMMAND,
            "--listen", str(self.socket),
            "--store-dir", str(self.store_dir),
            "--store-name", VOLUME,
            "--store-size", str(self.size),
            *self.backend.args(),
            *self.extra,
        ]  # fmt: skip

    def report(self) -> str:
        """The last lines of every run's output and log, for a failure message."""
        log = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        tail = "\n".join(log.splitlines()[-60:])
        return f"stdout:\n{''.join(self.lines[-20:])}\nstderr (last lines):\n{tail}"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        self.runs += 1
        self.lines = []
        with self.stderr_path.open("a") as stderr:
            shown = " ".join(self.argv()[1:])
            secret = self.backend.config.get("secret_key")
            if secret:
                shown = shown.replace(secret, "<REDACTED>")
            stderr.write(f"---- run {self.runs}: {shown}\n")
            stderr.flush()
            process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.process = process
        serving: queue.Queue[bool] = queue.Queue()

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
        try:
            up = serving.get(timeout=START_TIMEOUT)
        except queue.Empty:
            up = False
        if not up:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
            pytest.fail(f"usbd-objstore did not start (run {self.runs})\n{self.report()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, and reap it (a zombie would still hold the lease in the daemon's eyes)."""
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
            pytest.fail(f"usbd-objstore ignored SIGTERM\n{self.report()}")
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT)
        this_run = self.stderr_path.read_text(errors="replace").rsplit("---- run ", 1)[-1]
        assert status == 0, f"usbd-objstore exited with {status}\n{self.report()}"
        assert "terminated normally" in "".join(self.lines), self.report()
        assert "Traceback" not in this_run, self.report()

    def close(self) -> None:
        """At the end of a test: whatever is still running is killed (the test has already
        checked what it wanted)."""
        if self.alive():
            self.kill()

    def drop_cache(self) -> None:
        """Delete the local cache (absent already after a clean stop without a persistent
        cache)."""
        assert not self.alive()
        if self.cache_dir.exists():
            shutil.rmtree(self.cache_dir)


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


# -- block contents ---------------------------------------------------------------------------

_MAGIC = b"USBDBLK1"
_HEADER = struct.Struct(">8sQQ")
_ZERO = bytes(BLOCK)


def content(block: int, serial: int) -> bytes:
    """What write ``serial`` puts in ``block`` (serial 0: zeros)."""
    if serial == 0:
        return _ZERO
    header = _HEADER.pack(_MAGIC, block, serial)
    digest = hashlib.blake2b(header, digest_size=64).digest()
    body = digest * ((BLOCK - len(header)) // len(digest) + 1)
    return header + body[: BLOCK - len(header)]


#: :func:`identify`'s answer for a block that is neither zeros nor any write's content.
GARBAGE = -1


def identify(block: int, data: bytes | memoryview) -> int:
    """The serial of the write whose content ``data`` is, 0 for zeros, GARBAGE otherwise."""
    data = bytes(data)
    if data == _ZERO:
        return 0
    magic, where, serial = _HEADER.unpack_from(data)
    if magic != _MAGIC or where != block or serial <= 0 or data != content(block, serial):
        return GARBAGE
    return int(serial)


def describe(block: int, data: bytes) -> str:
    """A short account of what a block holds, for messages."""
    serial = identify(block, data)
    if serial != GARBAGE:
        return f"write #{serial}" if serial else "zeros"
    magic, where, claimed = _HEADER.unpack_from(data)
    if magic == _MAGIC:
        torn = sum(1 for a, b in zip(data, content(where, claimed), strict=True) if a != b)
        return f"garbage (header of block {where} write #{claimed}, {torn} bytes differ)"
    return f"garbage (starts {data[:16].hex()})"


def read_image(handle: Any, size: int, step: int = 256 * KiB) -> bytes:
    return b"".join(bytes(handle.pread(min(step, size - o), o)) for o in range(0, size, step))


# -- what was written -------------------------------------------------------------------------


class Serials:
    """Serial numbers unique over a whole test."""

    def __init__(self) -> None:
        self._next = 0

    def take(self) -> int:
        self._next += 1
        return self._next


@dataclass
class Verdict:
    """What a check found: problems (empty if none) and what the image holds now."""

    problems: list[str]
    values: list[int]
    #: check_point_in_time: the moments the image can be from, as inclusive (start, end) runs.
    moments: list[tuple[int, int]] = field(default_factory=list)

    def assert_ok(self, what: str, report: Callable[[], str] = str) -> None:
        if not self.problems:
            return
        shown = "\n  ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        pytest.fail(f"{what}:\n  {shown}{more}\n{report()}", pytrace=False)


class History:
    """The block writes since the device was opened at ``initial`` (a serial per block).

    A WRITE or WRITE_ZEROES is recorded (:meth:`wrote`) before it is sent, so that one in
    flight when the daemon dies counts as possibly done; :meth:`flushed` after a FLUSH was
    acknowledged."""

    def __init__(self, initial: Sequence[int]) -> None:
        self.initial = list(initial)
        self.blocks = len(self.initial)
        #: One entry per request: its first block and a serial per block.
        self.writes: list[tuple[int, list[int]]] = []
        #: How many writes the last acknowledged FLUSH covered.
        self.acked = 0
        self.flushes = 0

    def wrote(self, first: int, serials: list[int]) -> None:
        self.writes.append((first, serials))

    def flushed(self) -> None:
        self.acked = len(self.writes)
        self.flushes += 1

    def current(self) -> list[int]:
        """The device's content as the writer believes it (every write done)."""
        values = list(self.initial)
        for first, serials in self.writes:
            values[first : first + len(serials)] = serials
        return values

    def _per_block(self) -> list[list[tuple[int, int]]]:
        """For each block, (write index, serial) in order, starting with (-1, initial)."""
        sequence = [[(-1, value)] for value in self.initial]
        for index, (first, serials) in enumerate(self.writes):
            for offset, serial in enumerate(serials):
                sequence[first + offset].append((index, serial))
        return sequence

    def _read(self, image: bytes) -> tuple[list[int], list[str]]:
        values, problems = [], []
        for block in range(self.blocks):
            data = image[block * BLOCK : (block + 1) * BLOCK]
            serial = identify(block, data)
            values.append(serial)
            if serial == GARBAGE:
                problems.append(f"block {block}: {describe(block, data)}")
        return values, problems

    def check_flushed(self, image: bytes) -> Verdict:
        """Every block holds its content at the last acknowledged FLUSH or a later write's."""
        values, problems = self._read(image)
        for block, steps in enumerate(self._per_block()):
            value = values[block]
            if value == GARBAGE:
                continue
            at_flush = [s for i, s in steps if i < self.acked][-1]
            later = [s for i, s in steps if i >= self.acked]
            if value == at_flush or value in later:
                continue
            what = f"write #{value}" if value else "zeros"
            older = [i for i, s in steps if s == value and i < self.acked]
            if older:
                why = (
                    f"older than the flushed write #{at_flush} (request {older[-1]} of "
                    f"{len(self.writes)}, FLUSH covered {self.acked})"
                )
            elif value:
                why = (
                    "not written there since the device was opened, nor what the block held "
                    "then: an earlier run's write, lost in a crash, came back"
                )
            else:
                why = f"the flushed write #{at_flush} is lost"
            problems.append(f"block {block}: {what}, {why}")
        return Verdict(problems, values)

    def check_point_in_time(self, image: bytes, *, at_least_flushed: bool) -> Verdict:
        """The image is the device at one moment (see the module's docstring)."""
        values, problems = self._read(image)
        count = len(self.writes)
        low = self.acked if at_least_flushed else 0
        # Allowed moments, as inclusive runs, narrowed block by block.
        moments = [(low, count)]
        narrowed_by: list[str] = []
        for block, steps in enumerate(self._per_block()):
            if values[block] == GARBAGE:
                continue
            allowed = []
            for position, (index, serial) in enumerate(steps):
                if serial != values[block]:
                    continue
                following = steps[position + 1][0] if position + 1 < len(steps) else count
                allowed.append((max(index, 0), following))
            if not allowed:
                what = f"write #{values[block]}" if values[block] else "zeros"
                problems.append(
                    f"block {block}: {what}, not written there since the device was opened, and "
                    "not what the block held then"
                )
                continue
            narrower = [
                (max(a, c), min(b, d))
                for a, b in moments
                for c, d in allowed
                if max(a, c) <= min(b, d)
            ]
            if not narrower:
                problems.append(
                    f"block {block} holds "
                    f"{'zeros' if values[block] == 0 else f'write #{values[block]}'}, "
                    f"possible only at requests {allowed}, but "
                    f"{'; '.join(narrowed_by[-3:]) or 'the last FLUSH'} allow only {moments} "
                    f"(of {count} requests, the last acknowledged FLUSH covered {self.acked})"
                )
                break
            if narrower != moments:
                narrowed_by.append(f"block {block} -> {narrower}")
                moments = narrower
        return Verdict(problems, values, moments if not problems else [])


def random_writer(
    handle: Any,
    history: History,
    serials: Serials,
    rng: random.Random,
    *,
    object_size: int,
    stop: Callable[[], bool],
    zeroes: bool = True,
    pause: float = 0.02,
) -> None:
    """Random WRITEs of 1-4 blocks (sometimes 32, across objects), WRITE_ZEROES of a few blocks
    or a whole object, a FLUSH after about one request in six, and now and then a pause, until
    ``stop()`` or a request fails (the caller tells a kill from a failure)."""
    per_object = object_size // BLOCK
    while not stop():
        roll = rng.random()
        if zeroes and roll < 0.06:
            if rng.random() < 0.5:
                first = rng.randrange(history.blocks // per_object) * per_object
                count = per_object
            else:
                count = rng.randint(1, 8)
                first = rng.randrange(history.blocks - count + 1)
            history.wrote(first, [0] * count)
            handle.zero(count * BLOCK, first * BLOCK)
        else:
            count = rng.randint(1, 4) if roll < 0.95 else 32
            first = rng.randrange(history.blocks - count + 1)
            taken = [serials.take() for _ in range(count)]
            history.wrote(first, taken)
            handle.pwrite(
                b"".join(content(first + i, s) for i, s in enumerate(taken)), first * BLOCK
            )
        if rng.random() < 1 / 6:
            handle.flush()
            history.flushed()
        if rng.random() < 0.02:
            time.sleep(rng.uniform(0, pause))


def generation_writer(
    handle: Any,
    history: History,
    serials: Serials,
    rng: random.Random,
    *,
    stop: Callable[[], bool],
) -> int:
    """Generations: every block of the device written once (one 4 KiB WRITE each, in a random
    order), then a FLUSH; again and again until ``stop()`` or a request fails. Returns how many
    generations were flushed."""
    generations = 0
    order = list(range(history.blocks))
    while not stop():
        rng.shuffle(order)
        for block in order:
            serial = serials.take()
            history.wrote(block, [serial])
            handle.pwrite(content(block, serial), block * BLOCK)
        handle.flush()
        history.flushed()
        generations += 1
    return generations


class Killer:
    """SIGKILLs a daemon from a thread: ``delay`` seconds in, or with ``when``, at the first
    moment after ``delay`` that ``when()`` is true (polled; at most ``patience`` seconds
    more). :attr:`fired` tells a writer's request that failed after the kill from one that
    failed before it; :attr:`targeted` whether ``when()`` was true at the kill."""

    def __init__(
        self,
        daemon: Daemon,
        delay: float,
        when: Callable[[], bool] | None = None,
        patience: float = 5.0,
    ) -> None:
        self.daemon = daemon
        self.delay = delay
        self.when = when
        self.patience = patience
        self.fired = threading.Event()
        self.targeted = False
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _true(self) -> bool:
        assert self.when is not None
        try:
            return self.when()
        except Exception:  # a look at the bucket that raced the daemon: look again
            return False

    def _run(self) -> None:
        if self._cancel.wait(self.delay):
            return
        if self.when is not None:
            until = time.monotonic() + self.patience
            while not self._cancel.is_set() and time.monotonic() < until:
                if self._true():
                    self.targeted = True
                    break
                time.sleep(0.002)
        if self._cancel.is_set():
            return
        self.fired.set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.daemon.pid, signal.SIGKILL)

    def __enter__(self) -> Killer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cancel.set()
        self._thread.join()


def run_until_killed(
    nbd: ModuleType,
    daemon: Daemon,
    delay: float,
    writer: Callable[[Any, Callable[[], bool]], object],
    *,
    when: Callable[[], bool] | None = None,
    guard: float = 60.0,
) -> Killer:
    """Connect, run ``writer(handle, stop)`` and SIGKILL the daemon (see :class:`Killer`).
    The writer must end with a failed request after the kill; one that fails before it, or
    a writer still running ``guard`` seconds after it, fails the test."""
    handle = nbd.NBD()
    handle.connect_uri(daemon.uri)
    started = time.monotonic()
    try:
        with Killer(daemon, delay, when) as killer:
            limit = delay + killer.patience + guard

            def stop() -> bool:
                if time.monotonic() - started > limit:
                    pytest.fail(f"the writer ran {guard:.0f} s past the kill\n{daemon.report()}")
                return False

            try:
                writer(handle, stop)
            except nbd.Error as exc:
                if not killer.fired.is_set():
                    pytest.fail(f"a request failed before the kill: {exc}\n{daemon.report()}")
            else:
                pytest.fail("the writer ended before the kill")
    finally:
        close(handle)
    daemon.kill()
    return killer


def uploading(view: BucketView) -> Callable[[], bool]:
    """For :class:`Killer`: true while the bucket holds objects of a round not yet committed."""
    return lambda: bool(view.look().uncommitted)
