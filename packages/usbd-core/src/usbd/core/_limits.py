"""How much a network server gives its clients: connections, deadlines, refusals.

The defaults follow what the C servers do, scaled for a daemon that serves one device to
a few hosts: nbdkit has no limit unless its limit filter is used (then 1), qemu-nbd allows
one client unless given ``--shared=N``; a few hundred connections is far beyond any real
use (nbdcopy opens 4, qemu a few, fio one per job) and still bounds what a flood of
connections costs: each holds a socket, a task, and its receive buffers (which take memory
only as a client fills them). The kernel's connections are never counted: they are the
device itself, not clients of it.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_CONNECTIONS", "FILES_BESIDE", "Limits", "file_limit", "raise_file_limit"]

log = logging.getLogger("usbd.core.server")

#: Network connections served at once, over every listener.
DEFAULT_MAX_CONNECTIONS = 256


@dataclass(frozen=True)
class Limits:
    """A server's limits; 0 turns ``max_connections`` and ``idle_timeout`` off."""

    #: Connections (handshaking or transmitting) at once; beyond it a client is refused.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: Seconds a client has to finish the handshake.
    handshake_timeout: float = 30.0
    #: Seconds a connection in the transmission phase may go without a request, nothing in
    #: flight, before it is closed; 0: never.
    idle_timeout: float = 0.0
    #: Seconds a refused client has to read its refusal.
    refusal_timeout: float = 5.0
    #: Refusals under way at once; beyond them a connection is closed without a word (a
    #: refusal's few bytes must not become a way of holding sockets).
    max_refusing: int = 64


#: Descriptors a daemon needs beside its connections: listeners, the device's files (LevelDB
#: keeps tables open), the kernel's sockets, trio's own.
FILES_BESIDE = 256
#: What "no limit" becomes when the hard limit is infinite too.
_NO_HARD_LIMIT = 1 << 20


def file_limit(limits: Limits, soft: int, hard: int) -> tuple[int | None, str | None]:
    """The soft RLIMIT_NOFILE that lets ``limits`` be reached (None: keep ``soft``), and a
    warning when the hard limit is too low for it.

    The usual soft limit is 1024: with a larger ``--max-connections`` the accept loop would
    hit EMFILE (and pause, refusing no one cleanly) long before the limit. Raising the soft
    limit up to the hard one is what it is for: the soft limit protects programs that use
    ``select()``, and trio waits with epoll. With no connection limit, the hard limit.
    """
    infinite = resource.RLIM_INFINITY
    ceiling = hard if hard != infinite else _NO_HARD_LIMIT
    if limits.max_connections:
        needed = limits.max_connections + limits.max_refusing + FILES_BESIDE
    else:
        needed = ceiling
    target = min(needed, ceiling)
    new = target if soft != infinite and soft < target else None
    warning = None
    if hard != infinite and hard < needed:
        warning = (
            f"--max-connections {limits.max_connections} needs about {needed} file "
            f"descriptors, but the hard limit (ulimit -Hn, LimitNOFILE=) is {hard}: "
            "connections beyond it fail to be accepted instead of being refused"
        )
    return new, warning


def raise_file_limit(limits: Limits) -> None:
    """Apply :func:`file_limit` to this process; the warning, if any, is logged."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new, warning = file_limit(limits, soft, hard)
    if new is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        log.debug("file descriptor limit raised from %d to %d", soft, new)
    if warning:
        log.warning("%s", warning)
