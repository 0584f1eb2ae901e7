"""One writer per volume: a lease object in the bucket, taken with a conditional PUT.

``<name>/lease`` names its holder (host, pid, the process's start time, the boot it runs in, a
random token) and when it was last renewed. Taking it is ``PUT If-None-Match: *``, which exactly
one daemon wins; the holder renews it every :data:`TTL` / 4 with ``If-Match`` on the ETag it
last wrote and deletes it when it closes. A daemon that finds it taken is refused, naming the
holder, unless the holder is certainly dead, which is known only on the same host: same boot
and no such process (or a pid reused by a younger process), or another boot. A lease not renewed
for :data:`TTL` seconds may be from a host that died, or from one cut off from the store; only
the user can tell, so taking it over needs ``-objstore-takeover``. The lease alone does not
stop a cut-off old holder from writing when it comes back; the manifest does: the new holder
commits a new epoch at once, and every commit is conditional on the head its writer last
committed, so the old holder's next commit fails and it stops (see ``_manifest.commit``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._store import NotFound, ObjectStore, PreconditionFailed, StoreError

__all__ = ["TTL", "Lease", "LeaseHeld", "identity"]

log = logging.getLogger("usbd.objstore")

#: Seconds without renewal after which a lease counts as expired.
TTL = 60.0


class LeaseHeld(Exception):
    """Another daemon holds the volume; the message names it."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _machine_id() -> str:
    try:
        return Path("/etc/machine-id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    """Which pid namespace we are in: a pid means something only inside its own."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if unknown): with the pid, it
    names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def identity() -> dict[str, Any]:
    """This process as a lease or a commit names it."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _start_time(os.getpid()),
        "boot": _boot_id(),
        "machine": _machine_id(),
        "pidns": _pid_namespace(),
        "token": uuid.uuid4().hex,
    }


def _dead(holder: dict[str, Any]) -> bool:
    """Whether ``holder`` is certainly not running: only decidable on its own machine (same
    hostname and machine id: cloned machines share a hostname) and, for its pid, in its own
    pid namespace (a container's pid 1 is not ours)."""
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("machine", "") != _machine_id():
        return False
    if holder.get("boot") and holder.get("boot") != _boot_id():
        return True  # the machine rebooted since
    if not holder.get("pidns") or holder.get("pidns") != _pid_namespace():
        return False
    pid = int(holder.get("pid", 0))
    if pid <= 0:
        return False
    started = _start_time(pid)
    return not started or (bool(holder.get("started")) and started != holder.get("started"))


def describe_holder(holder: dict[str, Any]) -> str:
    renewed = holder.get("renewed")
    when = f", renewed {time.time() - renewed:.0f} s ago" if isinstance(renewed, float) else ""
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')}{when}"


class Lease:
    """This daemon's lease on one volume, from :meth:`take` to :meth:`release`."""

    def __init__(self, store: ObjectStore, name: str, me: dict[str, Any]) -> None:
        self.store = store
        self.key = f"{name}/lease"
        self.me = me
        self._etag = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _body(self) -> bytes:
        body = {**self.me, "renewed": time.time(), "ttl": TTL}
        return json.dumps(body).encode()

    def _still_ours(self) -> bool:
        """After a failed renewal: whether the lease is ours after all (a retried renewal
        whose first attempt had landed fails its own condition); adopts its ETag if so."""
        try:
            blob, etag = self.store.get_tagged(self.key, deadline=time.monotonic() + TTL / 4)
            holder = json.loads(blob)
        except (StoreError, ValueError):
            return True  # cannot tell now: the next renewal asks again
        if holder.get("token") != self.me["token"]:
            return False
        self._etag = etag
        return True

    def take(self, *, takeover: bool, deadline: float | None) -> str | None:
        """Take the lease, or raise :class:`LeaseHeld`. Returns a note when it was taken over
        from a dead or expired holder (for the log), else None."""
        for _attempt in range(3):
            try:
                self._etag = self.store.put(
                    self.key, self._body(), if_none_match=True, deadline=deadline
                )
            except PreconditionFailed:
                pass
            else:
                return None
            try:
                blob, etag = self.store.get_tagged(self.key, deadline=deadline)
                break
            except NotFound:  # released between our PUT and GET: try again
                continue
        else:
            raise LeaseHeld(f"{self.key} keeps changing hands: another daemon is starting")
        try:
            holder = json.loads(blob)
        except ValueError:
            holder = {}
        if holder.get("token") == self.me["token"]:  # our own PUT, whose answer was lost
            self._etag = etag
            return None
        expired = time.time() - float(holder.get("renewed", 0)) > float(holder.get("ttl", TTL))
        if _dead(holder):
            note = f"took over the lease of {describe_holder(holder)}, which is no longer running"
        elif expired and takeover:
            note = f"took over the expired lease of {describe_holder(holder)} (-objstore-takeover)"
        elif expired:
            raise LeaseHeld(
                f"{self.key} is held by {describe_holder(holder)} and has expired: if that daemon "
                "is gone, start with -objstore-takeover to take the volume over"
            )
        else:
            raise LeaseHeld(
                f"{self.key} is held by {describe_holder(holder)}: one writer per volume"
            )
        try:
            self._etag = self.store.put(self.key, self._body(), if_match=etag, deadline=deadline)
        except PreconditionFailed:
            raise LeaseHeld(f"{self.key} was taken by another daemon at the same time") from None
        return note

    def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew in a thread until :meth:`release`; ``on_lost`` is told if someone else
        takes the lease."""

        def renew() -> None:
            while not self._stop.wait(TTL / 4):
                try:
                    self._etag = self.store.put(
                        self.key,
                        self._body(),
                        if_match=self._etag,
                        deadline=time.monotonic() + TTL / 4,
                    )
                except PreconditionFailed:
                    if self._still_ours():
                        continue
                    self.lost = True
                    on_lost(f"{self.key} was taken over by another daemon")
                    return
                except StoreError as exc:
                    log.warning("could not renew %s: %s", self.key, exc)

        self._thread = threading.Thread(target=renew, name="usbd-objstore-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost:
            return
        with contextlib.suppress(StoreError, ValueError):
            blob = self.store.get(self.key, deadline=time.monotonic() + 10)
            if json.loads(blob).get("token") == self.me["token"]:
                self.store.delete([self.key], deadline=time.monotonic() + 10)
