"""``usbdsrvd status``: every usbd daemon on this machine, from its status file and from /sys.

Two sources, because either alone misses something:

- the status files (:mod:`usbd.core._status`): each serving daemon rewrites ``<pid>.json``
  every few seconds with its figures (driver, size, listen addresses, connections, the
  driver's headline metrics). A file whose pid no longer runs (or now names a process that
  started after the file's daemon did: a reused pid) is a daemon killed before it could remove
  it; it is not listed, and it is removed when this user may. A file of a live pid that has
  not been rewritten for :data:`STALE_AFTER` seconds is listed as stale: that daemon's event
  loop is stuck;
- the kernel: ``/sys/block/nbdX/pid`` names the process serving each connected device, so
  a daemon that could not write a status file, or another NBD server (nbd-client, qemu-nbd),
  still shows, with its command line from /proc.

Everything it reads is world-readable (status files are 0644, /sys and /proc/PID/cmdline
too), so it works as any user for what that user can see; a directory it cannot read is
skipped silently. The listing is a function of the core (:func:`gather`, :func:`status_main`)
so that any daemon's command can offer it; usbdsrvd is the one that does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .._sizes import format_size
from .._status import REFRESH, private_dir, reading_dirs
from ..kernel._sysfs import NbdSystem
from ..metrics import format_value

__all__ = ["STALE_AFTER", "DeadFile", "Listing", "gather", "render", "status_main"]

#: A live daemon's file older than this (seconds) is marked stale: five missed rewrites.
STALE_AFTER = 5 * REFRESH
#: How much later than a file's ``started`` its pid's process may have started and still be
#: that daemon (the Monitor is made after the process starts; /proc/stat's btime is whole
#: seconds). A process that started later reuses a dead daemon's pid.
_START_SLACK = 2.0

_STATUS_FILE = re.compile(r"(\d+)\.json")


@dataclass(frozen=True)
class DeadFile:
    """A status file whose daemon is gone (killed before it could remove it)."""

    path: Path
    pid: int
    removed: bool


@dataclass
class Listing:
    """What :func:`gather` found: JSON-able entries (see :func:`status_main` for their keys)
    in display order, and the files of daemons that no longer run."""

    daemons: list[dict[str, Any]] = field(default_factory=list)
    dead: list[DeadFile] = field(default_factory=list)


# -- /proc -------------------------------------------------------------------------------


class _Proc:
    """The few facts about a process read from ``root``/proc (a fake tree in tests)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._boot: float | None = None

    def alive(self, pid: int) -> bool:
        """Running and not a zombie (which has /proc/PID but will never serve again). On the
        real /proc mounted with hidepid another user's process has no /proc/PID for us: then
        kill(pid, 0) tells, refused (EPERM) for a process that exists."""
        stat = self._stat(pid)
        if stat is not None:
            return stat[0] not in ("Z", "X")
        if self.root != Path("/"):
            return False
        try:
            os.kill(pid, 0)
        except PermissionError:
            return True
        except OSError:
            return False
        return False  # ours, yet no /proc/PID: gone between the two looks

    def started(self, pid: int) -> float | None:
        """When the process started, in seconds since the epoch, if /proc says."""
        stat = self._stat(pid)
        boot = self._boot_time()
        if stat is None or boot is None or len(stat) < 20:
            return None
        try:
            ticks = int(stat[19])  # field 22 of the line; stat[0] is field 3 (the state)
        except ValueError:
            return None
        return boot + ticks / os.sysconf("SC_CLK_TCK")

    def command(self, pid: int) -> list[str] | None:
        """Its argv from /proc/PID/cmdline; None if unreadable (gone, hidepid) or empty."""
        try:
            raw = (self.root / "proc" / str(pid) / "cmdline").read_bytes()
        except OSError:
            return None
        words = [part.decode(errors="replace") for part in raw.split(b"\0")]
        while words and not words[-1]:
            words.pop()
        return words or None

    def _stat(self, pid: int) -> list[str] | None:
        try:
            text = (self.root / "proc" / str(pid) / "stat").read_text()
        except OSError:
            return None
        fields = text.rpartition(")")[2].split()
        return fields or None

    def _boot_time(self) -> float | None:
        if self._boot is None:
            try:
                lines = (self.root / "proc" / "stat").read_text().splitlines()
            except OSError:
                return None
            for line in lines:
                key, _, value = line.partition(" ")
                if key == "btime" and value.strip().isdigit():
                    self._boot = float(value)
        return self._boot


# -- gathering -----------------------------------------------------------------------------


def gather(
    dirs: Sequence[Path] | None = None,
    *,
    root: str | os.PathLike[str] = "/",
    now: float | None = None,
    clean: bool = True,
) -> Listing:
    """Every daemon the status files of ``dirs`` (default :func:`reading_dirs`) and the nbd
    devices of ``root``/sys describe. ``clean`` removes the files of dead pids where allowed."""
    now = time.time() if now is None else now
    proc = _Proc(Path(root))
    listing = Listing()
    seen: set[int] = set()
    for directory in dict.fromkeys(reading_dirs() if dirs is None else dirs):
        if not private_dir(directory, _owners(directory)):
            continue  # absent, or anyone's to plant files in: not to be believed or cleaned
        for pid, path in _status_files(directory):
            if pid in seen:
                continue
            figures = _read_figures(path, pid)
            if figures is None:
                continue
            if not _same_process(proc, pid, figures):
                listing.dead.append(DeadFile(path, pid, clean and _remove(path)))
                continue
            seen.add(pid)
            age = max(0.0, now - figures["updated"])
            figures.update(
                source="status-file",
                status_file=str(path),
                stale=age > STALE_AFTER,
                age=round(age, 1),
                command=proc.command(pid),
            )
            listing.daemons.append(figures)
    listing.daemons.sort(key=lambda entry: int(entry["pid"]))
    by_pid = {int(entry["pid"]): entry for entry in listing.daemons}
    system = NbdSystem(root)
    for index in system.devices():
        holder = system.holder(index)
        if holder is None:
            continue  # a free device
        device = f"/dev/nbd{index}"
        daemon = by_pid.get(holder.pid) if holder.pid is not None else None
        if daemon is not None:
            if not daemon.get("device"):
                daemon["device"] = device  # attached since its last rewrite
            continue
        command = proc.command(holder.pid) if holder.pid is not None else None
        listing.daemons.append(
            {
                "source": "kernel",
                "pid": holder.pid,
                "running": holder.alive,
                "prog": Path(command[0]).name if command else None,
                "command": command,
                "device": device,
                "size": system.size(index),
            }
        )
    return listing


def _owners(directory: Path) -> set[int]:
    """Who may own a status directory: root, this user, and the user its name says
    (/tmp/usbd-<uid>, /run/user/<uid>/usbd)."""
    owners = {0, os.geteuid()}
    for name in (directory.name, directory.parent.name):
        match = re.fullmatch(r"(?:usbd-)?(\d+)", name)
        if match is not None:
            owners.add(int(match.group(1)))
    return owners


def _status_files(directory: Path) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []  # absent, or not ours to read: skipped silently
    found = []
    for name in names:
        match = _STATUS_FILE.fullmatch(name)
        if match is not None:
            found.append((int(match.group(1)), directory / name))
    return sorted(found)


def _read_figures(path: Path, pid: int) -> dict[str, Any] | None:
    """The file's figures; None for one that vanished, cannot be read, or is not a usbd
    status file of this pid (written by something else)."""
    try:
        figures = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(figures, dict) or figures.get("pid") != pid:
        return None
    numbers = (figures.get(key) for key in ("size", "started", "updated"))
    if not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers):
        return None  # what the listing reckons with must be there
    return figures


def _same_process(proc: _Proc, pid: int, figures: dict[str, Any]) -> bool:
    if not proc.alive(pid):
        return False
    started = proc.started(pid)
    recorded = figures.get("started")
    if started is None or not isinstance(recorded, int | float):
        return True
    return started <= recorded + _START_SLACK


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return True
    except OSError:
        return False  # another user's file: theirs to clean
    return True


# -- the text form -------------------------------------------------------------------------


def render(listing: Listing) -> str:
    """The listing as a person reads it: one block per daemon, then the dead files."""
    blocks = []
    for entry in listing.daemons:
        if entry.get("source") == "kernel":
            blocks.append(_render_kernel(entry))
        else:
            blocks.append(_render_daemon(entry))
    if not blocks:
        blocks.append("no usbd daemons running")
    for dead in listing.dead:
        action = "removed" if dead.removed else "not removed: not writable by this user"
        blocks.append(f"stale status file {dead.path}: pid {dead.pid} is not running ({action})")
    return "\n".join(blocks)


def _render_daemon(entry: dict[str, Any]) -> str:
    mode = "read-only" if entry.get("read_only") else "read-write"
    export = f"export {entry['export']!r}" if entry.get("export") else "the default export"
    lines = [
        f"{entry.get('prog')} pid {entry.get('pid')}: driver {entry.get('driver')}, "
        f"{export}, {format_size(int(entry['size']))} {mode}"
    ]
    if entry.get("stopping"):
        lines.append("  STOPPING: flushing and closing the device (it still holds what it holds)")
    if entry.get("stale"):
        lines.append(
            f"  STALE: status not rewritten for {entry.get('age', 0):.0f} s "
            f"(every {REFRESH:g} s when well): the daemon may be stuck"
        )
    device = entry.get("device")
    if device:
        state = "attached" if entry.get("attached") else "not attached"
        again = ", re-attached after a restart" if entry.get("reattached") else ""
        lines.append(f"  device       {device} ({state}{again})")
    for uri in entry.get("listen") or []:
        lines.append(f"  listen       {uri}")
    if entry.get("metrics_url"):
        lines.append(f"  metrics      {entry['metrics_url']}")
    requests = entry.get("requests") or {}
    served = sum(v for v in requests.values() if isinstance(v, int))
    connections, network = entry.get("connections", 0), entry.get("network_connections", 0)
    kernel = f", {connections - network} kernel" if device and connections > network else ""
    activity = (
        f"  connections  {connections} ({network} network{kernel}), "
        f"{entry.get('in_flight', 0)} request(s) in flight, {served} served"
    )
    errors = entry.get("errors") or {}
    if errors:
        activity += ", errors " + ", ".join(f"{k} {v}" for k, v in sorted(errors.items()))
    if entry.get("refused"):
        activity += f", {entry['refused']} refused"
    lines.append(activity)
    values = entry.get("metrics") or {}
    headline = [
        f"{name.replace('_', ' ')} {format_value(name, values[name])}"
        for name in entry.get("headline") or []
        if isinstance(values.get(name), int | float)
    ]
    if headline:
        lines.append(f"  {str(entry.get('driver')) + ':':<12} " + ", ".join(headline))
    started = entry.get("started")
    if isinstance(started, int | float):
        lines.append(
            f"  up           {_duration(time.time() - started)}, usbd {entry.get('version')}, "
            f"status {entry.get('status_file')}"
        )
    return "\n".join(lines)


def _render_kernel(entry: dict[str, Any]) -> str:
    pid = entry.get("pid")
    who = f"pid {pid}" if pid is not None else "an unknown process"
    if not entry.get("running", True):
        what = "not running: the kernel keeps the device for its server's restart"
    elif entry.get("command"):
        what = f"{shlex.join(entry['command'])} from /proc/{pid}/cmdline"
    else:
        what = "command unknown"
    size = entry.get("size")
    shown = f", {format_size(size)}" if isinstance(size, int) else ""
    return f"{entry['device']} held by {who} ({what}){shown}, no status file"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f} {unit}"
    return f"{seconds:.0f} s"


# -- the command -----------------------------------------------------------------------------

_EPILOG = f"""\
sources:
  status files  every serving usbd daemon rewrites <pid>.json every {REFRESH:g} s in the first
                writable of /run/usbd (root), $XDG_RUNTIME_DIR/usbd, /tmp/usbd-<uid>, and
                removes it when it stops; this reads all of those (other users' too, where
                readable). USBD_STATUS_DIR=DIR makes daemons write and this command read DIR
                only. A directory counts only if it is a real one (no symlink), owned by
                root, this user or the user its name says, and writable by its owner alone.
                A file of a pid that no longer runs (kill -9) is not listed and is removed
                where this user may; a live daemon's file older than {STALE_AFTER:g} s is
                marked STALE.
  the kernel    /sys/block/nbdX/pid: a device whose server has no status file is shown as
                "/dev/nbdX held by pid N (COMMAND from /proc/N/cmdline)".

--json prints an array, one object per daemon, in the order shown. From a status file
(source "status-file"): pid, prog, command (argv from /proc, or null), driver, version,
export, size (bytes), read_only, listen (NBD URIs), metrics_url (or null), device (/dev/nbdX
or null), attached, reattached, stopping (flushing and closing), connections (open, kernel's
included), network_connections, refused, in_flight, requests and bytes (by command name),
errors (by errno name), metrics (the driver's figures by name, numbers) and headline (the
names among them shown first), started and updated (seconds since the epoch), age (seconds
since updated), stale, status_file. From the kernel only (source "kernel"): pid (or null),
running, prog, command, device, size.

exit status: 0 (also when none run), 2 for a bad flag."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (accepted: --json, --help)\n")


def status_main(argv: Sequence[str] | None = None, prog: str = "usbdsrvd status") -> int:
    """The ``status`` command: list the daemons as text, or as JSON with ``--json``."""
    parser = _Parser(
        prog=prog,
        description=textwrap.fill(
            "List every usbd daemon on this machine: pid, command, driver, /dev/nbdX, size, "
            "listen addresses, connections, metrics URL and the driver's headline figures "
            "(objstore dirty bytes, dedup ratio). Works as any user for what that user can "
            "read.",
            width=92,
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON array of the daemons' figures"
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    listing = gather()
    if args.json:
        print(json.dumps(listing.daemons, indent=2, sort_keys=True))
    else:
        print(render(listing))
    return 0
