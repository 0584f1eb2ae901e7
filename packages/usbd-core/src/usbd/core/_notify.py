"""Tell systemd how a daemon is doing: the sd_notify protocol, without python-systemd.

Why: a ``Type=notify`` unit is "started" only when the daemon says ``READY=1``, so a usbd
daemon says it once /dev/nbdX is really attached (and its listeners accept). A mount unit
ordered ``After=`` the daemon's unit then finds a device that answers, instead of racing the
attach. ``STOPPING=1`` makes ``systemctl status`` show that a stop has begun (flushing to an
object store can take a while).

The protocol is one datagram of ``VAR=VALUE`` lines sent to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Outside systemd the
variable is unset and every call here is a no-op returning False. Failing to notify must never
stop a daemon, so nothing here raises: errors are logged (a warning once per address) and
reported as False.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify", "ready", "stopping"]

log = logging.getLogger("usbd")

# Addresses already warned about: a daemon notifies at start and at stop, and one warning
# about a broken NOTIFY_SOCKET is enough.
_warned: set[str] = set()


def _warn_once(address: str, message: str, *args: object) -> None:
    if address in _warned:
        log.debug(message, *args)
    else:
        _warned.add(address)
        log.warning(message, *args)


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. ``"READY=1"``, ``"STATUS=serving /dev/nbd0"``) as one notification.

    Returns True when the datagram was sent; False when not under a notifying service manager
    (``NOTIFY_SOCKET`` unset or empty), for an unsupported address (vsock), or when sending
    failed (logged).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("vsock:"):
        log.debug("NOTIFY_SOCKET=%s: only unix sockets are supported, not notifying", address)
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        _warn_once(address, "NOTIFY_SOCKET=%r is not an absolute path or @name", address)
        return False
    data = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(data, target)
    except (OSError, ValueError) as exc:
        _warn_once(address, "could not notify systemd at %s: %s", address, exc)
        return False
    log.debug("notified systemd: %s", ", ".join(fields))
    return True


def _one_line(text: str) -> str:
    """A value fit for a ``VAR=VALUE`` line: a newline would start a field of its own."""
    return " ".join(text.splitlines())


def ready(status: str) -> bool:
    """Say the service is up: ``READY=1`` with ``STATUS=status`` and ``MAINPID`` (this process)."""
    return notify("READY=1", f"STATUS={_one_line(status)}", f"MAINPID={os.getpid()}")


def stopping(status: str = "") -> bool:
    """Say a stop has begun: ``STOPPING=1``, with ``STATUS=status`` when one is given."""
    if status:
        return notify("STOPPING=1", f"STATUS={_one_line(status)}")
    return notify("STOPPING=1")
