"""Where a daemon accepts NBD clients: ``--listen`` addresses and the URIs clients use."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import trio

__all__ = ["Listen", "parse_listen", "uri_for"]


@dataclass(frozen=True)
class Listen:
    """Where to accept clients: a unix socket path, or a TCP host and port."""

    path: str | None = None
    host: str | None = None
    port: int = 0


def parse_listen(text: str) -> Listen:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` is TCP; anything with a slash is a unix path."""
    if "/" in text:
        return Listen(path=text)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(
            f"invalid listen address {text!r}: expected HOST:PORT (TCP) or a unix socket path "
            "containing a slash"
        )
    return Listen(host=host.strip("[]") or None, port=int(port))


def uri_for(listener: trio.SocketListener, export_name: str, *, tls: bool = False) -> str:
    """The NBD URI a client would use for this listener (``nbds`` when TLS is required).

    The export name and the socket path are percent-encoded, as the NBD URI spec and nbdkit
    have them: a space, ``?``, ``#`` or ``%`` in either made a URI libnbd refused (captive
    mode hands this URI to a script as ``$uri``)."""
    scheme = "nbds" if tls else "nbd"
    sock = listener.socket
    address = sock.getsockname()
    name = quote(export_name, safe="/")
    if isinstance(address, str):
        return f"{scheme}+unix:///{name}?socket={quote(address, safe='/')}"
    host, port = address[0], address[1]
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/{name}"
