"""One daemon per store: an exclusive ``flock``, and the name of whoever holds it (shared by the
drivers that keep data in local files: the file disk and the dedup disk).

Why ``flock`` and not a POSIX record lock (``fcntl``/``lockf``), although only POSIX locks
report their holder through ``F_GETLK``: POSIX locks belong to the process, so a second open
of the same file in the same process (a second export, a test, a library reading the file)
would neither conflict with the lock nor keep it: closing any descriptor of the file drops
it. An ``flock`` belongs to the open file description: it conflicts even within one process,
lives exactly as long as the device's descriptor, and is released explicitly at close (so a
child that inherited the descriptor through ``fork`` cannot keep it). Open file description
locks (``F_OFD_SETLK``) share those properties but never say who holds them.

The holder comes from ``/proc/locks``, which lists every ``flock`` with the pid that took it
and the file's device and inode; it is only used for the message, and when it cannot be
found (another pid namespace, a file system whose ``stat`` device differs from the one the
kernel lists) the message says "another process".
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

__all__ = ["StoreInUse", "holder", "lock_exclusive", "unlock"]

_LOCKS = Path("/proc/locks")


class StoreInUse(OSError):
    """The backing file is locked by another daemon: a failure to start (exit status 1)."""

    def __init__(self, path: Path, pid: int | None, guess: str = "another usbd daemon?") -> None:
        self.path = path
        self.pid = pid
        if pid is None:
            who = f"another process ({guess})"
        else:
            who = f"process {pid} ({_command(pid) or guess})"
        super().__init__(errno.EBUSY, f"{path} is in use by {who}")

    def __str__(self) -> str:
        # One line as the command prints it, without "[Errno 16]".
        return str(self.strerror)


def lock_exclusive(fd: int, path: Path, guess: str = "another usbd daemon?") -> None:
    """Take the file's exclusive lock without waiting; :class:`StoreInUse` if it is held
    (``guess`` names the holder when its command cannot be found)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreInUse(path, holder(fd), guess) from None


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


def holder(fd: int) -> int | None:
    """The pid holding an ``flock`` on the file open as ``fd``, if ``/proc/locks`` says."""
    status = os.fstat(fd)
    major, minor, inode = os.major(status.st_dev), os.minor(status.st_dev), status.st_ino
    try:
        lines = _LOCKS.read_text().splitlines()
    except OSError:
        return None
    exact: list[int] = []
    same_inode: list[int] = []
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146339 0 EOF"; waiters have "->" after the id.
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        where = fields[5].split(":")
        if len(where) != 3 or not fields[4].lstrip("-").isdigit():
            continue
        pid = int(fields[4])
        if pid <= 0 or int(where[2]) != inode:
            continue
        same_inode.append(pid)
        if (int(where[0], 16), int(where[1], 16)) == (major, minor):
            exact.append(pid)
    if exact:
        return exact[0]
    # Some file systems (btrfs subvolumes) show another device in stat than in /proc/locks.
    return same_inode[0] if len(set(same_inode)) == 1 else None


def _command(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or None
    except OSError:
        return None
