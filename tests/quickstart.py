"""Running a document's quick start as written: its daemon block as a process that is stopped
with SIGINT (as Ctrl+C would), its other blocks in bash. Shared by the docs tests."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

TIMEOUT = 60.0


def tools(*names: str) -> None:
    """Skip for a missing client tool on a developer's machine, fail in CI (as conftest's
    require_tool)."""
    for name in names:
        if shutil.which(name) is None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"the {name!r} program is required in CI", pytrace=False)
            pytest.skip(f"the {name!r} program is not installed")


class Daemon:
    """The daemon block: its last line exec'd by bash, so that SIGINT reaches the daemon."""

    def __init__(self, block: str, log: Path, prog: str) -> None:
        self.prog = prog
        *setup, command = block.strip().splitlines()
        script = "\n".join(["set -euo pipefail", *setup, f"exec {command}"])
        self.log = log
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                ["bash", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                line = None
            if line is None:
                self.process.kill()
                self.stop(expect_clean=False)
                pytest.fail(f"the quick start's daemon did not start:\n{self.report()}")
            if " is serving " in line:
                return

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def stop(self, *, expect_clean: bool = True) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if expect_clean:
            assert self.process.returncode == 0, self.report()
            assert f"{self.prog} terminated normally.\n" in self.stdout, self.report()
            assert "Traceback" not in self.log.read_text(), self.report()

    def report(self) -> str:
        return f"stdout:\n{''.join(self.stdout)}\nstderr:\n{self.log.read_text()}"


def shell(block: str) -> str:
    """Run a block of commands as a user would type them; what they printed (both streams,
    as a terminal shows them)."""
    proc = subprocess.run(
        ["bash", "-c", "set -eu\n" + block],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, f"{block}\nexited {proc.returncode}\n{proc.stdout}"
    return proc.stdout
