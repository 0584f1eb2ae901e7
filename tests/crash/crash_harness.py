"""The crash loops shared by every persistent driver: start the real daemon, write stamped
blocks from several connections with several requests in flight, FLUSH now and then, kill -9,
restart, judge the image (crash_stamps.py).

Each cycle ends in one SIGKILL of the serving daemon, at one of two kinds of moment:

* a random one, ``delay`` seconds into the writes;
* the first moment after ``delay`` that a FLUSH is in flight (sent, not answered). The kill is
  sent with the ledger locked, and counts as a kill during FLUSH only if a FLUSH in flight
  then was never answered afterwards: the daemon died before replying to it (a reply sent
  before the kill would still be read from the socket). Whether a thread of the daemon was in
  fsync/fdatasync at that moment (``/proc/<pid>/task/*/syscall``) is counted too.

Every third cycle the restart itself is killed first, part way through its startup: at a
random moment between the daemon opening its store (a descriptor of it under the store
directory, seen in ``/proc/<pid>/fd``) and serving, within the window a normal start took
(up to five tries, each aiming earlier). It counts only if, once the killed process's output
is read to its end, it never said it was serving; and as a kill during the open (recovery) if
it had not yet said "started.", which the daemon prints once its device is open. Then a
normal start, a read of the whole device and the judge. At the end of a loop: writes without
FLUSH, a clean stop, and after a restart every write must be there exactly.

Seeds are random and printed; ``USBD_CRASH_SEED=<n>`` replays one (timing aside).
"""

from __future__ import annotations

import contextlib
import os
import platform
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from crash_drivers import SIZE, Adapter
from crash_stamps import BLOCK, Ledger, Op, Serials, Verdict

#: Ceilings, not expectations: generous so that a loaded 2-core machine does not fail a test.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 90.0
#: A writer still running this long after the kill fails the test.
GUARD = 60.0
#: How long a FLUSH-targeted kill waits for a FLUSH in flight before killing anyway.
PATIENCE = 3.0

#: The system calls that make data durable, by machine (the first field of
#: /proc/<pid>/task/<tid>/syscall): fsync, fdatasync, sync_file_range, syncfs, msync.
SYNC_CALLS = {
    "x86_64": {74, 75, 277, 306, 26},
    "aarch64": {82, 83, 84, 267, 227},
}.get(platform.machine(), set())


def missing(what: str) -> None:
    """Skip for lack of ``what`` on a developer's machine; fail in CI, where it must exist
    (tests/conftest.py's rule; its helper is not importable by name once several packages'
    conftest modules are collected in one run, as in ``nox -s crash``)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required in CI but is not available", pytrace=False)
    pytest.skip(f"{what} is not available")


def keep_if_failed(request: pytest.FixtureRequest, path: Path, what: str) -> None:
    """Delete ``path``, unless the test failed: then keep it (the volume's state for a
    post-mortem) and say where."""
    if getattr(request.node, "crash_failed", False):
        print(f"kept {what} for a post-mortem: {path}", file=sys.stderr)
    else:
        shutil.rmtree(path, ignore_errors=True)


# -- figures ----------------------------------------------------------------------------------


@dataclass
class Figures:
    """What one loop did, for the session's summary (and the failure message)."""

    driver: str
    cycles: int = 0
    random_kills: int = 0
    flush_kills: int = 0
    flush_aimed: int = 0
    flush_kills_in_sync: int = 0
    startup_kills: int = 0
    open_kills: int = 0
    startup_misses: int = 0
    blocks_verified: int = 0
    bound_blocks_verified: int = 0
    writes_acked: int = 0
    flushes_acked: int = 0
    losses: int = 0
    seconds: float = 0.0
    seed: int = 0

    def line(self) -> str:
        return (
            f"{self.driver}: {self.cycles} cycles, {self.flush_kills} kills during FLUSH "
            f"({self.flush_aimed} of {self.flush_aimed + self.random_kills} kills aimed at one, "
            f"{self.flush_kills_in_sync} in a sync call), "
            f"{self.startup_kills} during startup ({self.open_kills} of them in the open, "
            f"{self.startup_misses} restarts that served before their kill), "
            f"{self.blocks_verified} blocks verified ({self.bound_blocks_verified} bound by a "
            f"FLUSH or FUA), {self.writes_acked} writes and {self.flushes_acked} FLUSHes "
            f"answered, losses {self.losses}"
            + (" (meant to: a deliberately broken driver)" if "broken" in self.driver else "")
            + f"; {self.seconds:.0f} s, USBD_CRASH_SEED={self.seed}"
        )


#: Every loop run in this session, for the terminal summary (tests/crash/conftest.py).
FIGURES: list[Figures] = []


# -- daemons ----------------------------------------------------------------------------------


def _under(directory: Path, pid: int) -> bool:
    """Whether process ``pid`` has a descriptor open on something under ``directory``."""
    prefix = str(directory) + os.sep
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in names:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith(prefix):
                return True
    return False


def in_sync_call(pid: int) -> bool:
    """Whether a thread of ``pid`` is inside a system call that makes data durable."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/syscall") as file:
                first = file.read().split(" ", 1)[0]
        except OSError:
            continue
        if first.isdigit() and int(first) in SYNC_CALLS:
            return True
    return False


class Daemon:
    """One driver's volume served by its console script, one process after another, on a
    unix socket in ``workdir`` (which should be short: 108 bytes at most for the path)."""

    def __init__(self, adapter: Adapter, workdir: Path) -> None:
        self.adapter = adapter
        self.workdir = workdir
        self.store_dir = (workdir / "store").resolve()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / "s"
        self.stderr_path = workdir / "daemon.stderr"
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.runs = 0
        self._reader: threading.Thread | None = None
        self._events: queue.Queue[str] = queue.Queue()
        #: Seconds from the store's opening to serving, at the last start that measured it.
        self.open_window = 0.05
        self.opened_at: float | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def report(self) -> str:
        """The last lines of the last run's output and of every run's log, for a failure."""
        log = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        text = "stdout:\n{}\nstderr (last lines):\n{}".format(
            "".join(self.lines[-20:]), "\n".join(log.splitlines()[-60:])
        )
        for secret in self.adapter.secrets:
            if secret:
                text = text.replace(secret, "<secret>")
        return text

    def this_run_log(self) -> str:
        return self.stderr_path.read_text(errors="replace").rsplit("---- run ", 1)[-1]

    def spawn(self) -> None:
        """Start a process, without waiting for it."""
        assert self.process is None or self.process.poll() is not None
        self.runs += 1
        self.lines = []
        self.opened_at = None
        argv = self.adapter.argv(self.workdir, self.socket)
        with self.stderr_path.open("a") as stderr:
            stderr.write(f"---- run {self.runs}\n")
            stderr.flush()
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        self.process = process
        self.spawned_at = time.monotonic()
        events: queue.Queue[str] = queue.Queue()
        self._events = events

        def read_stdout() -> None:
            assert process.stdout is not None
            with process.stdout:
                for line in process.stdout:
                    self.lines.append(line)
                    if " is serving " in line:
                        events.put("serving")
            events.put("exited")

        self._reader = threading.Thread(target=read_stdout, daemon=True)
        self._reader.start()

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def watch_open(self, timeout: float) -> bool:
        """Poll until the process has its store open (True), or serves or exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _under(self.store_dir, self.pid):
                self.opened_at = time.monotonic()
                return True
            if self.said(" is serving ") or self.process is None or self.process.poll() is not None:
                return False
            time.sleep(0.0005)
        return False

    def wait_serving(self, timeout: float) -> bool:
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return False
        return event == "serving"

    def start(self) -> None:
        """Start and wait until it serves; measure the window from its store's opening."""
        self.spawn()
        opened = self.watch_open(START_TIMEOUT)
        if not self.wait_serving(START_TIMEOUT):
            self.kill()
            failed = f"{self.adapter.name} did not start (run {self.runs})\n{self.report()}"
            failed += f"\n{self._diagnose()}\n{self._again()}"
            pytest.fail(failed, pytrace=False)
        if opened and self.opened_at is not None:
            self.open_window = max(0.001, time.monotonic() - self.opened_at)
        assert "Traceback" not in self.this_run_log(), self.report()

    def _diagnose(self) -> str:
        """What the adapter can say about the volume's state (objstore: the bucket's head)."""
        if self.adapter.diagnose is None:
            return ""
        try:
            return self.adapter.diagnose()
        except Exception as exc:
            return f"(the adapter's look at the volume failed: {exc!r})"

    def _again(self) -> str:
        """After a failed start: whether one more start, with nothing changed, serves (a
        transient failure) or fails the same way (the volume cannot be opened)."""
        self.spawn()
        served = self.wait_serving(START_TIMEOUT)
        self.kill()
        said = "".join(self.lines[-5:]) + self.this_run_log()[-2000:]
        verdict = "served" if served else "did not serve either"
        return f"one more start (run {self.runs}), nothing changed: {verdict}\n{said}"

    def kill(self) -> None:
        """SIGKILL, reap, and read its output to the end."""
        assert self.process is not None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT)
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM, then insist on a clean exit."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.adapter.name} ignored SIGTERM\n{self.report()}", pytrace=False)
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT)
        assert status == 0, f"{self.adapter.name} exited with {status}\n{self.report()}"
        assert self.said("terminated normally"), self.report()
        assert "Traceback" not in self.this_run_log(), self.report()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


# -- clients ----------------------------------------------------------------------------------


def close_handle(handle: Any) -> None:
    closer = getattr(handle, "close", None)  # recent in libnbd's binding
    if closer is not None:
        closer()


def read_image(nbd: ModuleType, daemon: Daemon, what: str) -> bytes:
    handle = nbd.NBD()
    try:
        handle.connect_uri(daemon.uri)
        step = 256 * 1024
        image = b"".join(bytes(handle.pread(step, at)) for at in range(0, SIZE, step))
        handle.shutdown()
    except nbd.Error as exc:
        pytest.fail(f"{what}: reading the device failed: {exc}\n{daemon.report()}", pytrace=False)
    finally:
        close_handle(handle)
    return image


class Writer(threading.Thread):
    """One connection: up to ``depth`` requests in flight (WRITEs of 1-8 blocks, now and
    then 32, a few with FUA; a FLUSH with probability ``flush_rate`` per request), until a
    request fails after the kill, or until ``until`` (then it drains and ends)."""

    def __init__(
        self,
        nbd: ModuleType,
        handle: Any,
        connection: int,
        ledger: Ledger,
        rng: random.Random,
        *,
        depth: int,
        flush_rate: float,
        fired: threading.Event,
        until: float | None = None,
    ) -> None:
        super().__init__(daemon=True, name=f"writer-{connection}")
        self.nbd = nbd
        self.handle = handle
        self.connection = connection
        self.ledger = ledger
        self.rng = rng
        self.depth = depth
        self.flush_rate = flush_rate
        self.fired = fired
        self.until = until
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._loop()
        except self.nbd.Error as exc:
            if not self.fired.is_set():
                self.error = f"{self.name}: a request failed before the kill: {exc}"
        except Exception:
            self.error = f"{self.name}:\n{traceback.format_exc()}"

    def _plan(self) -> Op | None:
        rng = self.rng
        if rng.random() < self.flush_rate:
            return self.ledger.plan_flush(self.connection)
        count = rng.randint(1, 8) if rng.random() < 0.95 else 32
        return self.ledger.plan_write(rng, self.connection, count, fua=rng.random() < 0.03)

    def _loop(self) -> None:
        nbd, handle, ledger = self.nbd, self.handle, self.ledger
        in_flight: dict[int, tuple[Op, Any]] = {}
        guard = time.monotonic() + GUARD + 60
        while True:
            now = time.monotonic()
            if now > guard:
                self.error = f"{self.name} still running long after its end"
                return
            stopping = self.until is not None and now >= self.until
            while not stopping and len(in_flight) < self.depth:
                op = self._plan()
                if op is None:
                    break
                if op.kind == "flush":
                    in_flight[handle.aio_flush()] = (op, None)
                else:
                    buf = nbd.Buffer.from_bytearray(bytearray(op.payload))
                    flags = nbd.CMD_FLAG_FUA if op.fua else 0
                    cookie = handle.aio_pwrite(buf, op.first * BLOCK, flags=flags)
                    in_flight[cookie] = (op, buf)
            if not in_flight:
                if stopping:
                    return
                time.sleep(0.001)
                continue
            handle.poll(1000)
            for cookie in list(in_flight):
                if handle.aio_command_completed(cookie):
                    op, _ = in_flight.pop(cookie)
                    ledger.done(op)


class Killer(threading.Thread):
    """SIGKILLs the daemon ``delay`` s in; with ``at_flush``, at the first moment after that
    a FLUSH is in flight (polled; if a daemon thread is in a sync call within a few ms, then;
    at most :data:`PATIENCE` s more)."""

    def __init__(
        self, daemon: Daemon, ledger: Ledger, delay: float, fired: threading.Event, at_flush: bool
    ) -> None:
        super().__init__(daemon=True, name="killer")
        self.pid = daemon.pid
        self.ledger = ledger
        self.delay = delay
        self.fired = fired
        self.at_flush = at_flush
        #: The FLUSHes in flight at the kill, and whether a sync call was seen then.
        self.flushes: list[Op] = []
        self.in_sync = False
        self.at = 0.0

    def run(self) -> None:
        started = time.monotonic()
        time.sleep(self.delay)
        ledger = self.ledger
        if self.at_flush:
            until = time.monotonic() + PATIENCE
            while time.monotonic() < until:
                if ledger.flushes:
                    break
                time.sleep(0.0005)
            sync_until = time.monotonic() + 0.005
            while ledger.flushes and time.monotonic() < sync_until:
                if in_sync_call(self.pid):
                    break
        with ledger.lock:
            self.fired.set()
            self.in_sync = self.at_flush and in_sync_call(self.pid)
            self.flushes = list(ledger.flushes.values())
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.at = time.monotonic() - started


def run_writers(
    nbd: ModuleType,
    daemon: Daemon,
    ledger: Ledger,
    rng: random.Random,
    *,
    flush_rate: float,
    delay: float | None = None,
    at_flush: bool = False,
    until: float | None = None,
) -> Killer | None:
    """Writers on each connection (several where the driver offers multi-conn) until the
    killer has killed the daemon (``delay`` given: each must end with a failed request after
    the kill, none before) or until ``until``."""
    connections = rng.randint(2, 4) if daemon.adapter.multi_conn else 1
    handles = []
    for _ in range(connections):
        handle = nbd.NBD()
        handle.connect_uri(daemon.uri)
        handles.append(handle)
    assert handles[0].can_flush(), f"{daemon.adapter.name} must offer FLUSH"
    if daemon.adapter.multi_conn:
        assert handles[0].can_multi_conn(), f"{daemon.adapter.name} must offer multi-conn"
    fired = threading.Event()
    writers = [
        Writer(
            nbd,
            handle,
            n,
            ledger,
            random.Random(rng.getrandbits(64)),
            depth=rng.randint(1, 8),
            flush_rate=flush_rate,
            fired=fired,
            until=until,
        )
        for n, handle in enumerate(handles)
    ]
    killer = Killer(daemon, ledger, delay, fired, at_flush) if delay is not None else None
    try:
        for writer in writers:
            writer.start()
        if killer is not None:
            killer.start()
            killer.join(timeout=killer.delay + PATIENCE + 30)
            assert not killer.is_alive(), "the killer did not kill"
        for writer in writers:
            writer.join(timeout=GUARD + 90)
        stuck = [w.name for w in writers if w.is_alive()]
        assert not stuck, f"writers {stuck} did not end\n{daemon.report()}"
    finally:
        for handle in handles:
            if killer is None:
                with contextlib.suppress(nbd.Error):
                    handle.shutdown()
            close_handle(handle)
    errors = [w.error for w in writers if w.error]
    if errors:
        pytest.fail("\n".join(errors) + "\n" + daemon.report(), pytrace=False)
    return killer


# -- the loop ---------------------------------------------------------------------------------


def kill_during_startup(daemon: Daemon, rng: random.Random, figures: Figures) -> str:
    """Start the daemon and kill it part way through its startup (see the module's doc);
    up to five tries until one lands, each aiming at a moment earlier in the window than the
    last (a file disk's window is a few milliseconds). Returns a line for the log."""
    said = []
    for attempt in range(5):
        daemon.spawn()
        opened = daemon.watch_open(START_TIMEOUT)
        cut = rng.uniform(0, daemon.open_window) / 2**attempt
        if opened:
            time.sleep(cut)
        daemon.kill()
        serving, started = daemon.said(" is serving "), daemon.said(" started.")
        if opened and not serving:
            figures.startup_kills += 1
            figures.open_kills += not started
            said.append(f"killed {cut * 1000:.1f} ms after its open began")
            said[-1] += "" if started else ", within the open"
            break
        figures.startup_misses += 1
        said.append("served before the kill" if opened else "never opened its store")
    return "restart " + "; again: ".join(said)


def crash_loop(
    nbd: ModuleType, daemon: Daemon, cycles: int, seed: int, *, startup_every: int = 3
) -> Figures:
    """``cycles`` kill -9 cycles against ``daemon`` (see the module's doc). Fails at the
    first loss; the figures go into :data:`FIGURES` either way."""
    rng = random.Random(seed)
    figures = Figures(daemon.adapter.name, seed=seed)
    FIGURES.append(figures)
    began = time.monotonic()
    serials = Serials()
    baseline = [0] * (SIZE // BLOCK)
    log: list[str] = []

    def report() -> str:
        return "\n".join(log[-30:]) + "\n" + figures.line() + "\n" + daemon.report()

    def judge(verdict: Verdict, what: str) -> None:
        figures.blocks_verified += len(verdict.values)
        figures.bound_blocks_verified += verdict.bound
        figures.losses += len(verdict.problems)
        figures.seconds = time.monotonic() - began
        verdict.assert_ok(f"{daemon.adapter.name}: {what} (USBD_CRASH_SEED={seed})", report)

    daemon.start()
    for cycle in range(1, cycles + 1):
        ledger = Ledger(baseline, cycle, serials)
        at_flush = cycle % 2 == 0
        killer = run_writers(
            nbd,
            daemon,
            ledger,
            rng,
            flush_rate=rng.choice([0.02, 0.08, 0.2]),
            delay=rng.uniform(0.05, 1.2),
            at_flush=at_flush,
        )
        assert killer is not None
        daemon.kill()
        unanswered = [op for op in killer.flushes if id(op) in ledger.flushes]
        during_flush = bool(unanswered)
        figures.flush_kills += during_flush
        figures.flush_kills_in_sync += during_flush and killer.in_sync
        figures.random_kills += not at_flush
        figures.flush_aimed += at_flush
        figures.writes_acked += ledger.writes_acked
        figures.flushes_acked += ledger.flushes_acked
        line = (
            f"cycle {cycle}: killed at {killer.at:.2f} s"
            + (" at a FLUSH" if at_flush else " (random)")
            + (
                f": {len(unanswered)} FLUSH(es) in flight never answered"
                + (", a daemon thread in a sync call" if killer.in_sync else "")
                if during_flush
                else ""
            )
            + f"; {ledger.writes_acked}/{ledger.writes_sent} writes, "
            f"{ledger.flushes_acked}/{ledger.flushes_sent} FLUSHes answered"
        )
        if cycle % startup_every == 0:
            line += "; " + kill_during_startup(daemon, rng, figures)
        log.append(line)
        daemon.start()
        image = read_image(nbd, daemon, f"after the kill of cycle {cycle}")
        verdict = ledger.check(image)
        figures.cycles = cycle
        judge(verdict, f"after the kill of cycle {cycle}")
        baseline = verdict.values

    # Writes without FLUSH, a clean stop: every write is there, exactly.
    ledger = Ledger(baseline, cycles + 1, serials)
    run_writers(nbd, daemon, ledger, rng, flush_rate=0.0, until=time.monotonic() + 0.5)
    daemon.stop()
    ledger.floor = list(ledger.completed)
    daemon.start()
    judge(ledger.check(read_image(nbd, daemon, "after a clean stop")), "after a clean stop")
    daemon.stop()
    figures.seconds = time.monotonic() - began
    print("\n".join(log))
    print(figures.line())
    assert figures.flush_kills, "no kill came while a FLUSH was in flight:\n" + report()
    assert figures.startup_kills, "no kill came during a restart's startup:\n" + report()
    assert figures.flushes_acked, "no FLUSH was answered:\n" + report()
    return figures
