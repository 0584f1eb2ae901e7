"""``usbdsrvd status`` against real daemons: usbd-ramdisk, usbd-filedisk and usbdsrvd itself.

The daemons and the command run as a user runs them (the console scripts), with
``USBD_STATUS_DIR`` pointing both at a directory of this module's own, so nothing here
touches /run/usbd or sees another test's daemons. A python3-libnbd client connects; the
figures are polled until the daemon's next rewrite shows it (a ceiling, never a timed
assertion). A daemon killed with SIGKILL leaves its file behind: it must not be listed, and
it is removed by a user who may (root here) and left, but still not listed, by one who may not
(``nobody``, through setpriv), who otherwise sees every daemon. The kernel's
/sys/block/nbdX/pid is tested in tests/kernel/ (a VM) and against a fake tree in
packages/usbd-core/tests/test_core_status.py.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from usbd.core.cli._status import gather
from usbd.core.metrics import format_value

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
#: How long a daemon may take to rewrite its file (every 2 s when well): a ceiling.
REFRESH_CEILING = 30.0
MiB = 1 << 20


def script(prog: str) -> str:
    return str(Path(sys.executable).with_name(prog))


@dataclass
class Daemon:
    prog: str
    process: subprocess.Popen[str]
    uri: str = ""
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM and a clean exit (a killed one is only reaped)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            status = self.process.wait(timeout=STOP_TIMEOUT)
            assert status == 0, f"{self.prog} exited with {status}: {''.join(self.lines)}"
        self.reap()

    def reap(self) -> None:
        self.process.wait(timeout=STOP_TIMEOUT)
        if self.reader is not None:
            self.reader.join(timeout=STOP_TIMEOUT)


class Daemons:
    """Starts daemons that write their status files into ``status_dir``."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="usbd-st-", dir="/tmp"))
        self.status_dir = self.workdir / "status"
        self.status_dir.mkdir()
        self.status_dir.chmod(0o755)  # a daemon refuses one that others may write to
        # mkdtemp's 0700 would hide everything from another user.
        self.workdir.chmod(0o755)
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.upper().startswith("USBD_") and key != "NOTIFY_SOCKET"
        }
        self.env["USBD_STATUS_DIR"] = str(self.status_dir)
        self.started: list[Daemon] = []

    def start(self, prog: str, name: str, *args: str) -> Daemon:
        socket = self.workdir / f"{name}.sock"
        process = subprocess.Popen(
            [script(prog), "--listen", str(socket), "--export-name", name, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            cwd=self.workdir,
        )
        daemon = Daemon(prog, process)
        self.started.append(daemon)
        uris: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert process.stdout is not None
            with process.stdout:
                for line in process.stdout:
                    daemon.lines.append(line)
                    _, marker, uri = line.partition(" is serving ")
                    if marker:
                        uris.put(uri.strip())
            uris.put(None)

        daemon.reader = threading.Thread(target=read, daemon=True)
        daemon.reader.start()
        try:
            uri = uris.get(timeout=START_TIMEOUT)
        except queue.Empty:
            uri = None
        if uri is None:
            process.kill()
            pytest.fail(f"{prog} did not start: {''.join(daemon.lines)}", pytrace=False)
        daemon.uri = uri
        return daemon

    def status(self, *args: str, user: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*user, script("usbdsrvd"), "status", *args],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            env=self.env,
            cwd="/",
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return proc

    def listing(self, user: Sequence[str] = ()) -> dict[int, dict[str, Any]]:
        entries = json.loads(self.status("--json", user=user).stdout)
        return {entry["pid"]: entry for entry in entries}

    def until(
        self, what: str, check: Callable[[dict[int, dict[str, Any]]], bool]
    ) -> dict[int, dict[str, Any]]:
        """Wait until ``check`` holds for the listing (the daemons rewrite every 2 s), then
        return the command's own. The waiting reads the files in this process (what the
        command does, without an interpreter's start per poll)."""
        deadline = time.monotonic() + REFRESH_CEILING
        while True:
            found = {entry["pid"]: entry for entry in gather([self.status_dir]).daemons}
            if check(found):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"status never showed {what}: {found}", pytrace=False)
            time.sleep(0.2)
        listing = self.listing()
        assert check(listing), listing
        return listing

    def close(self) -> None:
        try:
            for daemon in self.started:
                daemon.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def daemons() -> Iterator[Daemons]:
    running = Daemons()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def three(daemons: Daemons) -> dict[str, Daemon]:
    """One daemon of each kind, serving on unix sockets (started at once: the start-up is
    most of their cost)."""
    flags = {
        "ram": ("usbd-ramdisk", "--store-size", "64MiB"),
        "file": ("usbd-filedisk", "--store-dir", str(daemons.workdir), "--store-size", "96MiB"),
        "srvd": ("usbdsrvd", "-dev-type", "mem", "--store-size", "32MiB"),
    }
    with ThreadPoolExecutor(len(flags)) as pool:
        started = {
            name: pool.submit(daemons.start, prog, name, *args)
            for name, (prog, *args) in flags.items()
        }
    return {name: future.result() for name, future in started.items()}


def as_nobody() -> list[str]:
    """The prefix that runs a command as ``nobody`` (these tests run as root in CI)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to run the command as nobody")
    return [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def test_json_lists_every_daemon_with_its_figures(
    daemons: Daemons, three: dict[str, Daemon]
) -> None:
    pids = {daemon.pid for daemon in three.values()}
    listing = daemons.until("all three daemons", lambda found: pids <= set(found))
    expected = {
        "ram": ("usbd-ramdisk", "mem", 64 * MiB),
        "file": ("usbd-filedisk", "file", 96 * MiB),
        "srvd": ("usbdsrvd", "mem", 32 * MiB),
    }
    for name, (prog, driver, size) in expected.items():
        entry = listing[three[name].pid]
        assert entry["source"] == "status-file"
        assert (entry["prog"], entry["driver"], entry["size"]) == (prog, driver, size)
        assert entry["export"] == name
        assert entry["listen"] == [three[name].uri]
        assert entry["device"] is None
        assert entry["stale"] is False
        assert entry["status_file"] == str(daemons.status_dir / f"{three[name].pid}.json")
        assert entry["command"][0].endswith(("python", "python3", "python3.11", prog))


def test_a_connected_client_is_counted(
    daemons: Daemons, three: dict[str, Daemon], libnbd: ModuleType
) -> None:
    ram = three["ram"]
    daemons.until("the ramdisk idle", lambda found: found.get(ram.pid, {}).get("connections") == 0)
    h = libnbd.NBD()
    h.connect_uri(ram.uri)
    try:
        h.pread(4096, 0)
        listing = daemons.until(
            "the client's connection",
            lambda found: found[ram.pid]["connections"] == 1,
        )
        entry = listing[ram.pid]
        assert entry["network_connections"] == 1
        assert entry["requests"]["read"] >= 1
        assert listing[three["file"].pid]["connections"] == 0
        text = daemons.status().stdout
        assert "  connections  1 (1 network)" in text
    finally:
        h.shutdown()
    daemons.until("the connection's end", lambda found: found[ram.pid]["connections"] == 0)


def test_the_text_form_shows_each_daemon_and_its_headline(
    daemons: Daemons, three: dict[str, Daemon], libnbd: ModuleType
) -> None:
    """Each daemon's block, with the file disk's headline figure (allocated bytes) after 4 MiB
    written, formatted by its unit as the status file has it."""
    file = three["file"]
    h = libnbd.NBD()
    h.connect_uri(file.uri)
    try:
        h.pwrite(os.urandom(4 * MiB), 0)
        h.flush()
    finally:
        h.shutdown()
    listing = daemons.until(
        "the file disk's allocated bytes",
        lambda found: (
            found[file.pid]["metrics"].get("allocated_bytes", 0) >= 4 * MiB
            and all(daemon.pid in found for daemon in three.values())
        ),
    )
    entry = listing[file.pid]
    assert entry["headline"] == ["allocated_bytes"]
    text = daemons.status().stdout
    assert f"usbd-ramdisk pid {three['ram'].pid}: driver mem, export 'ram', 64 MiB" in text
    assert f"usbd-filedisk pid {file.pid}: driver file, export 'file', 96 MiB" in text
    assert f"usbdsrvd pid {three['srvd'].pid}: driver mem, export 'srvd', 32 MiB" in text
    for daemon in three.values():
        assert f"  listen       {daemon.uri}\n" in text
    allocated = format_value("allocated_bytes", entry["metrics"]["allocated_bytes"])
    assert f"  file:        allocated bytes {allocated}\n" in text
    assert "no usbd daemons running" not in text


def test_a_killed_daemons_file_is_not_listed(daemons: Daemons, three: dict[str, Daemon]) -> None:
    doomed = daemons.start("usbd-ramdisk", "doomed", "--store-size", "1MiB")
    path = daemons.status_dir / f"{doomed.pid}.json"
    daemons.until("the doomed daemon", lambda found: doomed.pid in found)
    doomed.process.kill()
    doomed.reap()
    assert path.exists()  # SIGKILL: nobody removed it
    # Another user sees it is dead but may not remove it.
    text = daemons.status(user=as_nobody()).stdout
    if os.geteuid() == 0:
        assert f"stale status file {path}: pid {doomed.pid} is not running (not removed" in text
        assert path.exists()
    assert f"pid {doomed.pid}:" not in text
    listing = daemons.listing()
    assert doomed.pid not in listing
    assert {daemon.pid for daemon in three.values()} <= set(listing)
    assert not path.exists()  # removed by its owner's listing


def test_another_user_lists_what_it_can_read(daemons: Daemons, three: dict[str, Daemon]) -> None:
    user = as_nobody()
    pids = {daemon.pid for daemon in three.values()}
    daemons.until("all three daemons", lambda found: pids <= set(found))
    listing = daemons.listing(user=user)
    assert pids <= set(listing)
    assert listing[three["file"].pid]["driver"] == "file"
    # A directory it cannot read is skipped, not an error.
    if user:
        daemons.status_dir.chmod(0o700)
        try:
            proc = daemons.status(user=user)
        finally:
            daemons.status_dir.chmod(0o755)
        assert proc.stdout == "no usbd daemons running\n"
        assert proc.stderr == ""


def test_another_user_under_hidepid_still_lists_them(
    daemons: Daemons, three: dict[str, Daemon]
) -> None:
    """With /proc mounted hidepid=2 (as hardened systems do) another user has no /proc/PID
    for root's daemons: they are still running, not dead files, only their command unknown.
    The hidepid /proc is a fresh one in a private mount namespace (unshare), not the host's."""
    user = as_nobody()
    if not user:
        pytest.skip("needs root, to mount a hidepid /proc and run the command as nobody")
    pids = {daemon.pid for daemon in three.values()}
    daemons.until("all three daemons", lambda found: pids <= set(found))
    mount = 'mount -t proc -o hidepid=2 proc /proc && exec "$@"'
    unshare = ["unshare", "--mount", "sh", "-c", mount, "sh", *user]
    probe = subprocess.run(
        [*unshare, "test", "!", "-e", f"/proc/{three['ram'].pid}"], check=False, timeout=60
    )
    if probe.returncode != 0:
        pytest.fail("could not mount a hidepid=2 /proc in a private mount namespace")
    listing = daemons.listing(user=unshare)
    assert pids <= set(listing)
    assert all(listing[pid]["command"] is None for pid in pids)
    assert "is not running" not in daemons.status(user=unshare).stdout


def test_a_bad_flag_is_one_line_and_status_2(daemons: Daemons) -> None:
    proc = subprocess.run(
        [script("usbdsrvd"), "status", "--jsn"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        env=daemons.env,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "usbdsrvd status: error: unrecognized arguments: --jsn (accepted: --json, --help)"
    ]


def test_daemons_remove_their_files_when_they_stop(daemons: Daemons) -> None:
    brief = daemons.start("usbd-ramdisk", "brief", "--store-size", "1MiB")
    daemons.until("the brief daemon", lambda found: brief.pid in found)
    brief.stop()
    assert not (daemons.status_dir / f"{brief.pid}.json").exists()
    assert brief.pid not in daemons.listing()
