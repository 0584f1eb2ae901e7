"""Helpers for usbd-filedisk's tests: real ``usbd-filedisk`` processes and client tools.

A missing client tool (Debian's libnbd-bin, qemu-utils) skips a test on a developer's
machine and fails it in CI (``CI=true``), where the point is to prove interoperability; the
same rule as the repository's tests/conftest.py, repeated here because these tests run with
only usbd-core and usbd-filedisk installed.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: Ceilings, not expectations: generous so that a loaded machine does not fail a test.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
TOOL_TIMEOUT = 120.0

COMMAND = str(Path(sys.executable).with_name("usbd-filedisk"))


def missing(what: str) -> None:
    """Skip for lack of ``what`` on a developer's machine; fail in CI, where it must exist."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required in CI but is not available", pytrace=False)
    pytest.skip(f"{what} is not available")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"the {name!r} program")
    assert path is not None
    return path


def tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a client tool; an unexpected failure shows everything it said."""
    argv = [require_tool(name), *args]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(argv)} exited with {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = START_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``usbd-filedisk ARGS`` (with ``env`` added to the environment) expected to exit by
    itself: a refusal to start."""
    return subprocess.run(
        [COMMAND, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def store_args(store: Path, name: str = "vol", *extra: str) -> list[str]:
    return ["--store-dir", str(store), "--store-name", name, *extra]


def uri(socket: Path) -> str:
    return f"nbd+unix:///?socket={socket}"


@dataclass
class Daemon:
    """A running ``usbd-filedisk`` serving a unix socket."""

    process: subprocess.Popen[str]
    socket: Path
    stderr_path: Path
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return uri(self.socket)

    def output(self) -> str:
        return "".join(self.lines)

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def report(self) -> str:
        return f"stdout:\n{self.output()}\nstderr:\n{self.log()}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal it, then insist on a clean exit: status 0, "terminated normally", no
        traceback."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            status = self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
            pytest.fail(f"usbd-filedisk ignored signal {sig}\n{self.report()}", pytrace=False)
        if self.reader is not None:
            self.reader.join(timeout=STOP_TIMEOUT)
        assert status == 0, f"usbd-filedisk exited with {status}\n{self.report()}"
        assert "terminated normally" in self.output(), self.report()
        assert "Traceback" not in self.log(), self.report()


class Daemons:
    """Starts daemons for one test and stops (and checks) those still running at its end."""

    def __init__(self) -> None:
        self._running: list[Daemon] = []

    def start(self, socket: Path, *args: str) -> Daemon:
        """``usbd-filedisk --listen SOCKET ARGS``, once it says it is serving."""
        stderr_path = socket.with_name(socket.name + ".stderr")
        with stderr_path.open("w") as stderr:
            process = subprocess.Popen(
                [COMMAND, "--listen", str(socket), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        daemon = Daemon(process, socket, stderr_path)
        serving: queue.Queue[bool] = queue.Queue()

        def read_stdout() -> None:
            # Read until the process ends, so that its stdout pipe never fills.
            assert process.stdout is not None
            with process.stdout:
                for line in process.stdout:
                    daemon.lines.append(line)
                    if " is serving " in line:
                        serving.put(True)
            serving.put(False)

        daemon.reader = threading.Thread(target=read_stdout, daemon=True)
        daemon.reader.start()
        try:
            up = serving.get(timeout=START_TIMEOUT)
        except queue.Empty:
            up = False
        if not up:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
            pytest.fail(f"usbd-filedisk did not start: {args}\n{daemon.report()}", pytrace=False)
        self._running.append(daemon)
        return daemon

    def stop_all(self) -> None:
        running, self._running = self._running, []
        for daemon in running:
            if daemon.process.returncode is None:
                daemon.stop()
