"""docs/objstore.md's quick start, run as written: the blocks after its
``<!-- objstore-quick-start: NAME -->`` markers are the commands, and the blocks marked
``NAME output`` what they must print.

The commands run in bash with two substitutions: ``.venv/bin/`` becomes this python's bin
directory, and ``/tmp/`` a fresh directory of the test's (so that runs never share a volume or
a socket). The daemon block is started once, stopped with SIGINT (Ctrl+C), and started again
for the "after a restart" block: the volume must come back from its objects alone (the
"after a stop" block shows that the cache is gone by then).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "objstore.md"
MARKER = re.compile(r"<!-- objstore-quick-start: (.+?) -->\n```\n(.*?)```", re.DOTALL)
TIMEOUT = 60.0
#: A data object's generation (after the dot) depends on the order uploads started in.
GENERATION = re.compile(r"(/data/[0-9a-f]{8})\.[0-9a-f]{16}$")


def blocks() -> dict[str, str]:
    found = dict(MARKER.findall(DOC.read_text()))
    assert set(found) >= {
        "daemon",
        "daemon output",
        "client",
        "client output",
        "after a stop",
        "after a stop output",
        "after a restart",
        "after a restart output",
    }, sorted(found)
    return found


def tools(*names: str) -> None:
    """Skip for a missing client tool on a developer's machine, fail in CI (as conftest's
    require_tool)."""
    for name in names:
        if shutil.which(name) is None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"the {name!r} program is required in CI", pytrace=False)
            pytest.skip(f"the {name!r} program is not installed")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory: the socket's path must stay under the 108-byte limit."""
    path = Path(tempfile.mkdtemp(prefix="usbd-doc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Daemon:
    """The daemon block: its last line exec'd by bash, so that SIGINT reaches the daemon."""

    def __init__(self, block: str, log: Path) -> None:
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
            assert "usbd-objstore terminated normally.\n" in self.stdout, self.report()
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


def test_the_quick_start_of_docs_objstore_md_runs_as_written(workdir: Path) -> None:
    tools("nbdinfo", "nbdcopy", "qemu-img")
    here = blocks()
    bindir = str(Path(sys.executable).parent)

    def local(text: str) -> str:
        # /tmp/ first: the venv may itself live under /tmp (CI's clone does).
        return text.replace("/tmp/", f"{workdir}/").replace(".venv/bin/", f"{bindir}/")

    daemon = Daemon(local(here["daemon"]), workdir / "daemon.log")
    try:
        for line in local(here["daemon output"]).splitlines():
            assert line + "\n" in daemon.stdout, (line, daemon.report())
        printed = shell(local(here["client"]))
    finally:
        daemon.stop()
    # nbdinfo's report, then find's listing: every line the doc shows (generations aside,
    # and "..." standing for the data objects in between), and eight data objects.
    assert "export-size: 1073741824 (1G)" in printed
    listing = [GENERATION.sub(r"\1", line) for line in printed.splitlines()]
    for line in local(here["client output"]).splitlines():
        if line != "...":
            assert GENERATION.sub(r"\1", line) in listing, (line, printed)
    assert len([line for line in listing if "/objects/vol/data/" in line]) == 8, printed

    printed = shell(local(here["after a stop"]))
    assert printed.splitlines() == local(here["after a stop output"]).splitlines(), printed

    daemon = Daemon(local(here["daemon"]), workdir / "daemon-again.log")
    try:
        printed = shell(local(here["after a restart"]))
    finally:
        daemon.stop()
    assert printed.splitlines() == local(here["after a restart output"]).splitlines(), printed
