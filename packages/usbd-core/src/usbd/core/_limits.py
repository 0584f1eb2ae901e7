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

from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_CONNECTIONS", "Limits"]

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
