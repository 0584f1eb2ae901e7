"""Status files: how ``usbdsrvd status`` finds every usbd daemon on the machine and its figures.

Each serving daemon keeps one JSON file, ``<pid>.json``, in a status directory
(:func:`status_dirs`; ``$USBD_STATUS_DIR`` names the only one): the
:meth:`~usbd.core._monitor.Monitor.figures` snapshot, rewritten every :data:`REFRESH` seconds
(atomically: a reader never sees half a file) and removed when the daemon stops. A file whose
pid is gone is a daemon killed before it could remove it; ``usbdsrvd status``
(:mod:`usbd.core.cli._status`) reads every user's directories (:func:`reading_dirs`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat
import tempfile
from collections.abc import Collection
from pathlib import Path

import trio

from ._monitor import Monitor

__all__ = [
    "REFRESH",
    "STATUS_DIR_ENV",
    "private_dir",
    "publish_status",
    "reading_dirs",
    "status_dirs",
    "write_status",
]

log = logging.getLogger("usbd")

#: Seconds between rewrites of a daemon's status file.
REFRESH = 2.0


#: Names one directory where daemons write their status files and ``usbdsrvd status``
#: reads them, instead of the usual ones: for tests and for separate groups of daemons.
STATUS_DIR_ENV = "USBD_STATUS_DIR"


def status_dirs() -> list[Path]:
    """Where this process writes its status file, the first writable of: /run/usbd for root,
    else $XDG_RUNTIME_DIR/usbd, then /tmp/usbd-<uid>; only $USBD_STATUS_DIR when it is set."""
    chosen = os.environ.get(STATUS_DIR_ENV)
    if chosen:
        return [Path(chosen)]
    dirs = [Path("/run/usbd")]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        dirs.append(Path(runtime) / "usbd")
    dirs.append(Path(tempfile.gettempdir()) / f"usbd-{os.getuid()}")
    if os.geteuid() != 0:
        dirs.append(dirs.pop(0))
    return dirs


def reading_dirs() -> list[Path]:
    """Where ``usbdsrvd status`` looks: every user's status directories, not only the ones
    this user would write to (root lists a user's daemons, a user sees root's), this user's
    first; only $USBD_STATUS_DIR when it is set. Some may not exist or not be readable."""
    dirs = status_dirs()
    if os.environ.get(STATUS_DIR_ENV):
        return dirs
    dirs += [Path("/run/usbd"), *_matching(Path("/run/user"), r"\d+", "usbd")]
    dirs += _matching(Path(tempfile.gettempdir()), r"usbd-\d+")
    return list(dict.fromkeys(dirs))


def _matching(parent: Path, pattern: str, below: str = "") -> list[Path]:
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    return [
        parent / name / below if below else parent / name
        for name in names
        if re.fullmatch(pattern, name)
    ]


def private_dir(directory: Path, owners: Collection[int]) -> bool:
    """Whether ``directory`` is a real directory (not a symlink) owned by one of ``owners``
    that no one else may write to. /tmp is everyone's: another user may have made
    /tmp/usbd-<uid> first, to read a daemon's files, swap them, or, through a symlink, have
    ``usbdsrvd status`` remove a file of the same name elsewhere."""
    try:
        info = os.lstat(directory)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid in owners and not info.st_mode & 0o022


def write_status(monitor: Monitor, directory: Path) -> Path:
    """Write the monitor's figures to ``directory/<pid>.json`` atomically; return the path.
    The directory is made 0755 if missing, and must be this user's alone (:func:`private_dir`):
    anything else is a ``PermissionError``."""
    try:
        directory.mkdir(mode=0o755, parents=True)
        directory.chmod(0o755)  # whatever the umask
    except FileExistsError:
        pass
    if not private_dir(directory, {os.geteuid()}):
        raise PermissionError(
            errno.EPERM,
            "not a directory of this user's alone (owner, group or other write, a symlink)",
            str(directory),
        )
    path = directory / f"{os.getpid()}.json"
    text = json.dumps(monitor.figures(), sort_keys=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


async def publish_status(monitor: Monitor, *, every: float = REFRESH) -> None:
    """Keep this daemon's status file until cancelled, then remove it. A directory that
    cannot be written is skipped for the next; none at all is logged once, not fatal."""
    path: Path | None = None
    try:
        while True:
            # A rewrite that fails keeps the last file's path: to retry there, and remove it.
            # In a thread: the figures may stat a file (filedisk's allocated bytes), which on
            # a network file system can wait, and the write is disk I/O; the event loop
            # serves requests meanwhile. The figures are read as a scrape reads them.
            written = await trio.to_thread.run_sync(_write_somewhere, monitor, path)
            path = written or path
            await trio.sleep(every)
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


def _write_somewhere(monitor: Monitor, previous: Path | None) -> Path | None:
    candidates = [previous.parent] if previous is not None else status_dirs()
    for directory in candidates:
        try:
            return write_status(monitor, directory)
        except OSError as exc:
            last = exc
    if previous is None:
        log.warning("no status file (usbdsrvd status will not list this daemon): %s", last)
    return None
