"""``usbdsrvd status``'s listing against status files and a fake /sys and /proc tree.

The real daemons, a real client and a non-root reader are in tests/test_status.py; the
kernel's /sys/block/nbdX/pid of a real attached device in tests/kernel/. Here: which files
count (a dead pid's, a reused pid's, a stale one's, garbage), how a device held by a process
without a status file shows, and the text form's formatting of the driver's headline figures.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from core_helpers import MemDevice, ThreadedMemDevice, wait_until

from usbd.core import Export
from usbd.core._monitor import Monitor
from usbd.core._status import reading_dirs, status_dirs, write_status
from usbd.core.cli import Listen, serve, status_main
from usbd.core.cli._status import STALE_AFTER, gather, render
from usbd.core.metrics import gauge

MiB = 1 << 20
BOOT = 1_000_000.0  # the fake tree's btime
TICKS = os.sysconf("SC_CLK_TCK")


class Tree:
    """A fake root: /proc/PID/{stat,cmdline}, /proc/stat's btime, /sys/block/nbdN."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "proc").mkdir(parents=True)
        (root / "proc" / "stat").write_text(f"cpu 1 2 3\nbtime {BOOT:.0f}\n")
        (root / "sys" / "block").mkdir(parents=True)

    def process(
        self, pid: int, argv: list[str], *, started: float = BOOT + 10, state: str = "S"
    ) -> None:
        directory = self.root / "proc" / str(pid)
        directory.mkdir()
        ticks = int((started - BOOT) * TICKS)
        # Fields 3 to 22 of a real line: state, then 16 numbers, then the start time.
        rest = " ".join(["1"] * 18)
        (directory / "stat").write_text(f"{pid} (python3 x) {state} {rest} {ticks} 0 0\n")
        (directory / "status").write_text(f"Name:\tpython3\nTgid:\t{pid}\nPid:\t{pid}\n")
        (directory / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")

    def device(self, index: int, pid: int | None, sectors: int = 2048) -> None:
        block = self.root / "sys" / "block" / f"nbd{index}"
        block.mkdir()
        (block / "size").write_text(f"{sectors}\n")
        if pid is not None:
            (block / "pid").write_text(f"{pid}\n")


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path / "root")


@pytest.fixture
def files(tmp_path: Path) -> Path:
    path = tmp_path / "status"
    path.mkdir()
    path.chmod(0o755)
    return path


def figures(pid: int, **changes: Any) -> dict[str, Any]:
    """A status file's content as Monitor.figures writes it."""
    base: dict[str, Any] = {
        "pid": pid,
        "prog": "usbd-ramdisk",
        "driver": "mem",
        "version": "0.1",
        "started": BOOT + 11,
        "updated": time.time(),
        "export": "disk",
        "size": 64 * MiB,
        "read_only": False,
        "listen": ["nbd+unix:///disk?socket=/tmp/a.sock"],
        "metrics_url": None,
        "device": None,
        "attached": False,
        "reattached": False,
        "connections": 1,
        "network_connections": 1,
        "refused": 0,
        "in_flight": 0,
        "requests": {"read": 3},
        "bytes": {"read": 12288},
        "errors": {},
        "metrics": {},
        "headline": [],
    }
    base.update(changes)
    return base


def put(directory: Path, content: dict[str, Any] | str, name: str | None = None) -> Path:
    if name is None:
        assert isinstance(content, dict)
        name = f"{content['pid']}.json"
    path = directory / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_a_live_daemons_file_is_listed_with_its_command(tree: Tree, files: Path) -> None:
    tree.process(100, ["/usr/bin/python3", "-m", "usbd.ramdisk", "--listen", "/tmp/a.sock"])
    put(files, figures(100))
    listing = gather([files], root=tree.root)
    [entry] = listing.daemons
    assert entry["pid"] == 100
    assert entry["source"] == "status-file"
    assert entry["status_file"] == str(files / "100.json")
    assert entry["stale"] is False
    assert entry["command"][:3] == ["/usr/bin/python3", "-m", "usbd.ramdisk"]
    assert listing.dead == []
    text = render(listing)
    assert text.startswith("usbd-ramdisk pid 100: driver mem, export 'disk', 64 MiB read-write")
    assert "  listen       nbd+unix:///disk?socket=/tmp/a.sock" in text
    assert "  connections  1 (1 network), 0 request(s) in flight, 3 served" in text


def test_a_dead_pids_file_is_not_listed_and_is_removed(tree: Tree, files: Path) -> None:
    dead = put(files, figures(200))
    listing = gather([files], root=tree.root, clean=False)
    assert listing.daemons == []
    assert [(d.pid, d.removed) for d in listing.dead] == [(200, False)]
    assert dead.exists()
    assert "pid 200 is not running (not removed: not writable" in render(listing)
    listing = gather([files], root=tree.root)
    assert [(d.pid, d.removed) for d in listing.dead] == [(200, True)]
    assert not dead.exists()
    assert render(listing).startswith("no usbd daemons running\nstale status file")


def test_a_zombie_or_a_reused_pid_is_not_the_daemon(tree: Tree, files: Path) -> None:
    tree.process(300, ["usbd-ramdisk"], state="Z")
    # pid 301 now belongs to a process that started a minute after the file's daemon did.
    tree.process(301, ["bash"], started=BOOT + 71)
    # pid 302 started a second before its Monitor: the same process.
    tree.process(302, ["usbd-filedisk"], started=BOOT + 10)
    for pid in (300, 301, 302):
        put(files, figures(pid))
    listing = gather([files], root=tree.root, clean=False)
    assert [entry["pid"] for entry in listing.daemons] == [302]
    assert sorted(d.pid for d in listing.dead) == [300, 301]


def test_a_file_not_rewritten_is_marked_stale(tree: Tree, files: Path) -> None:
    tree.process(400, ["usbd-ramdisk"])
    now = time.time()
    put(files, figures(400, updated=now - STALE_AFTER - 30))
    [entry] = gather([files], root=tree.root, now=now).daemons
    assert entry["stale"] is True
    assert entry["age"] == pytest.approx(STALE_AFTER + 30, abs=0.2)
    assert "  STALE: status not rewritten for 40 s" in render(gather([files], root=tree.root))


def test_files_that_are_not_a_daemons_status_are_skipped(tree: Tree, files: Path) -> None:
    for pid in (500, 501, 502, 503):
        tree.process(pid, ["x"])
    put(files, "{not json", name="500.json")
    put(files, figures(999), name="501.json")  # the pid inside is not the file's
    put(files, json.dumps([502]), name="502.json")
    put(files, figures(502), name=".502.abc.tmp")  # a rewrite in progress
    put(files, figures(502), name="notes.json")
    put(files, figures(503, size="64 MiB"))  # not the figures of this usbd

    listing = gather([files, files.parent / "absent"], root=tree.root, clean=False)
    assert listing.daemons == [] and listing.dead == []


def test_the_first_directory_holding_a_pid_wins(tree: Tree, files: Path, tmp_path: Path) -> None:
    tree.process(600, ["usbd-ramdisk"])
    other = tmp_path / "other"
    other.mkdir()
    put(files, figures(600, export="first"))
    put(other, figures(600, export="second"))
    [entry] = gather([files, other], root=tree.root).daemons
    assert entry["export"] == "first"


def test_a_device_whose_holder_has_no_status_file_is_listed(tree: Tree, files: Path) -> None:
    tree.process(700, ["nbd-client", "-unix", "/tmp/x.sock", "/dev/nbd1"])
    tree.device(0, None)  # free
    tree.device(1, 700, sectors=2048)
    tree.device(2, 701)  # its server died; the kernel keeps it
    listing = gather([files], root=tree.root)
    assert listing.daemons == [
        {
            "source": "kernel",
            "pid": 700,
            "running": True,
            "prog": "nbd-client",
            "command": ["nbd-client", "-unix", "/tmp/x.sock", "/dev/nbd1"],
            "device": "/dev/nbd1",
            "size": MiB,
        },
        {
            "source": "kernel",
            "pid": 701,
            "running": False,
            "prog": None,
            "command": None,
            "device": "/dev/nbd2",
            "size": MiB,
        },
    ]
    text = render(listing)
    assert (
        "/dev/nbd1 held by pid 700 (nbd-client -unix /tmp/x.sock /dev/nbd1 from "
        "/proc/700/cmdline), 1.0 MiB, no status file"
    ) in text
    assert "/dev/nbd2 held by pid 701 (not running" in text


def test_a_device_held_by_a_listed_daemon_is_its_device(tree: Tree, files: Path) -> None:
    tree.process(800, ["usbd-ramdisk"])
    tree.device(3, 800)
    put(files, figures(800))  # written before it attached
    [entry] = gather([files], root=tree.root).daemons
    assert entry["device"] == "/dev/nbd3"
    assert "  device       /dev/nbd3" in render(gather([files], root=tree.root))


def test_the_drivers_headline_figures_are_formatted_by_unit(tree: Tree, files: Path) -> None:
    tree.process(900, ["usbd-objstore"])
    values = {"dirty_bytes": 12.5 * MiB, "dedup_ratio": 1.5, "uploads": 7.0}
    put(
        files,
        figures(900, driver="objstore", metrics=values, headline=["dirty_bytes", "dedup_ratio"]),
    )
    text = render(gather([files], root=tree.root))
    assert "  objstore:    dirty bytes 12 MiB, dedup ratio 1.50\n" in text
    assert "uploads" not in text


def test_a_monitors_file_round_trips(tree: Tree, files: Path) -> None:
    """write_status's file (a real Monitor's figures) is what gather reads, for this pid."""

    class Dirty(MemDevice):
        def metrics(self) -> dict[str, float]:
            return {"dirty_bytes": 4096}

    monitor = Monitor(
        Export(Dirty()),
        prog="usbd-test",
        driver="test",
        declared=(gauge("dirty_bytes", "Bytes not yet uploaded.", headline=True),),
    )
    monitor.listen.append("nbd+unix:///?socket=/tmp/t.sock")
    path = write_status(monitor, files)
    assert path == files / f"{os.getpid()}.json"
    assert path.stat().st_mode & 0o777 == 0o644
    [entry] = gather([files]).daemons  # the real /proc: this process
    assert entry["pid"] == os.getpid()
    assert entry["listen"] == ["nbd+unix:///?socket=/tmp/t.sock"]
    assert "  test:        dirty bytes 4.0 KiB" in render(gather([files]))


def monitor() -> Monitor:
    return Monitor(Export(MemDevice()), prog="usbd-test", driver="test")


def test_a_directory_others_may_write_to_is_neither_written_nor_read(
    tree: Tree, tmp_path: Path
) -> None:
    """/tmp/usbd-<uid> may have been made by someone else: a group- or world-writable
    directory, or a symlink, is refused by the writer and ignored (not cleaned) by the reader."""
    open_dir = tmp_path / "usbd-open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    target = tmp_path / "elsewhere"
    target.mkdir()
    target.chmod(0o755)
    link = tmp_path / "usbd-link"
    link.symlink_to(target)
    for directory in (open_dir, link):
        with pytest.raises(PermissionError, match="not a directory of this user's alone"):
            write_status(monitor(), directory)
        dead = put(directory, figures(1000))
        assert gather([directory], root=tree.root).dead == []
        assert dead.exists()
    # Made by the writer: 0755 whatever the umask.
    previous = os.umask(0o002)
    try:
        made = write_status(monitor(), tmp_path / "fresh")
    finally:
        os.umask(previous)
    assert made.parent.stat().st_mode & 0o777 == 0o755


def test_usbd_status_dir_is_where_files_are_written_and_read(
    monkeypatch: pytest.MonkeyPatch, files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("USBD_STATUS_DIR", str(files))
    assert status_dirs() == [files]
    assert status_main([]) == 0
    assert capsys.readouterr().out == "no usbd daemons running\n"
    put(files, figures(os.getpid(), started=time.time() - 1))
    assert status_main(["--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["pid"] == os.getpid()


def test_a_bad_flag_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        status_main(["--jsn"], prog="usbdsrvd status")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "usbdsrvd status: error: unrecognized arguments: --jsn (accepted: --json, --help)\n"
    )


def test_the_reader_looks_in_every_users_directories(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("USBD_STATUS_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for name in ("usbd-1000", "usbd-st-abc", "usbd-12x"):
        (tmp_path / name).mkdir()
    own = tmp_path / f"usbd-{os.getuid()}"
    dirs = reading_dirs()
    assert dirs[: len(status_dirs())] == status_dirs()  # this user's own first
    assert {Path("/run/usbd"), own, tmp_path / "usbd-1000"} <= set(dirs)
    assert tmp_path / "usbd-st-abc" not in dirs and tmp_path / "usbd-12x" not in dirs
    assert len(dirs) == len(set(dirs))


def test_help_names_every_json_key(
    tree: Tree, files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--help documents the JSON form: every key a listing entry has is named there."""
    tree.process(1100, ["nbd-client"])
    tree.device(0, 1100)
    tree.process(1101, ["usbd-test"])
    put(files, monitor().figures() | {"pid": 1101, "started": BOOT + 11})
    entries = gather([files], root=tree.root).daemons
    assert {entry["source"] for entry in entries} == {"status-file", "kernel"}
    with pytest.raises(SystemExit) as exit_:
        status_main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for key in {key for entry in entries for key in entry}:
        assert re.search(rf"\b{key}\b", text), key


class SlowClose(ThreadedMemDevice):
    """A device whose close waits for the test (an objstore uploading what is dirty)."""

    def __init__(self) -> None:
        super().__init__(1 << 20)
        self.closing = threading.Event()
        self.release = threading.Event()

    def close(self) -> None:
        self.closing.set()
        self.release.wait(30)
        super().close()


async def test_a_stopping_daemon_stays_listed_until_its_device_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USBD_STATUS_DIR", str(tmp_path))
    device = SlowClose()
    status = tmp_path / f"{os.getpid()}.json"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(serve, device, [Listen(path=str(tmp_path / "s.sock"))])
            )
            await wait_until(status.exists)
            assert json.loads(status.read_text())["stopping"] is False
            os.kill(os.getpid(), signal.SIGTERM)  # serve() takes it: a stop as a daemon's
            await wait_until(device.closing.is_set)
            await wait_until(lambda: json.loads(status.read_text())["stopping"])
            shown = render(gather())
            assert "STOPPING: flushing and closing the device" in shown
            device.release.set()
    assert device.closed == 1
    assert not status.exists()
