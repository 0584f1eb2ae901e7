"""The kernel's generic netlink family "nbd": CONNECT, RECONFIGURE, DISCONNECT, STATUS.

pyroute2 does the netlink framing, family lookup and error mapping; this module only declares
the family's attributes (``include/uapi/linux/nbd-netlink.h``) and turns its errors into
:class:`KernelAttachError`. Every call is blocking and short: the trio side runs it in a worker
thread, because CONNECT makes the kernel read the partition table through the very sockets this
process must keep serving meanwhile.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

from ._errors import KernelAttachError

__all__ = ["Connect", "NbdNetlink", "netlink_available"]

FAMILY = "nbd"
VERSION = 1

CMD_CONNECT = 1
CMD_DISCONNECT = 2
CMD_RECONFIGURE = 3
CMD_STATUS = 5

#: Client flags: we set neither DESTROY_ON_DISCONNECT nor DISCONNECT_ON_CLOSE, so a device
#: outlives both its daemon's exit and the last close of /dev/nbdX.
CLIENT_FLAGS = 0


class NbdMessage(genlmsg):  # type: ignore[misc]
    """Attributes of the nbd family, numbered as in the uapi header."""

    prefix = "NBD_ATTR_"
    nla_map = (
        ("NBD_ATTR_UNSPEC", "none"),
        ("NBD_ATTR_INDEX", "uint32"),
        ("NBD_ATTR_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_TIMEOUT", "uint64"),
        ("NBD_ATTR_SERVER_FLAGS", "uint64"),
        ("NBD_ATTR_CLIENT_FLAGS", "uint64"),
        ("NBD_ATTR_SOCKETS", "sockets"),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", "uint64"),
        ("NBD_ATTR_DEVICE_LIST", "device_list"),
    )

    class sockets(nla):  # type: ignore[misc]  # pyroute2 finds nested types by these names
        nla_map = (("NBD_SOCK_ITEM_UNSPEC", "none"), ("NBD_SOCK_ITEM", "sock_item"))

        class sock_item(nla):  # type: ignore[misc]
            nla_map = (("NBD_SOCK_UNSPEC", "none"), ("NBD_SOCK_FD", "uint32"))

    class device_list(nla):  # type: ignore[misc]
        nla_map = (("NBD_DEVICE_ITEM_UNSPEC", "none"), ("NBD_DEVICE_ITEM", "device_item"))

        class device_item(nla):  # type: ignore[misc]
            nla_map = (
                ("NBD_DEVICE_UNSPEC", "none"),
                ("NBD_DEVICE_INDEX", "uint32"),
                ("NBD_DEVICE_CONNECTED", "uint8"),
            )


@dataclass(frozen=True)
class Connect:
    """What the kernel is told about a device when it is connected or re-attached.

    ``timeout`` is the per-request timeout in seconds (0: the kernel warns about slow requests
    and keeps waiting); ``dead_timeout`` is how long the kernel holds I/O for a daemon that died
    to come back and RECONFIGURE new sockets in.
    """

    size: int
    block_size: int
    server_flags: int
    timeout: int = 0
    dead_timeout: int = 60


def _sockets(fds: Sequence[int]) -> dict[str, Any]:
    return {"attrs": [("NBD_SOCK_ITEM", {"attrs": [("NBD_SOCK_FD", fd)]}) for fd in fds]}


def build_message(command: int, attrs: Sequence[tuple[str, Any]]) -> NbdMessage:
    msg = NbdMessage()
    msg["cmd"] = command
    msg["version"] = VERSION
    msg["attrs"] = list(attrs)
    return msg


def connect_attrs(
    settings: Connect, fds: Sequence[int], index: int | None
) -> list[tuple[str, Any]]:
    attrs: list[tuple[str, Any]] = []
    if index is not None:
        attrs.append(("NBD_ATTR_INDEX", index))
    attrs += [
        ("NBD_ATTR_SIZE_BYTES", settings.size),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", settings.block_size),
        ("NBD_ATTR_SERVER_FLAGS", settings.server_flags),
        ("NBD_ATTR_CLIENT_FLAGS", CLIENT_FLAGS),
        ("NBD_ATTR_TIMEOUT", settings.timeout),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", settings.dead_timeout),
        ("NBD_ATTR_SOCKETS", _sockets(fds)),
    ]
    return attrs


def reconfigure_attrs(settings: Connect, fds: Sequence[int], index: int) -> list[tuple[str, Any]]:
    """Size and flags stay as the first daemon set them; only sockets and timeouts change."""
    return [
        ("NBD_ATTR_INDEX", index),
        ("NBD_ATTR_CLIENT_FLAGS", CLIENT_FLAGS),
        ("NBD_ATTR_TIMEOUT", settings.timeout),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", settings.dead_timeout),
        ("NBD_ATTR_SOCKETS", _sockets(fds)),
    ]


def netlink_available() -> bool:
    """True when the running kernel knows the "nbd" generic netlink family."""
    try:
        sock = _open()
    except KernelAttachError:
        return False
    sock.close()
    return True


def _open() -> GenericNetlinkSocket:
    sock = GenericNetlinkSocket()
    try:
        sock.bind(FAMILY, NbdMessage)
    except NetlinkError as exc:
        sock.close()
        code = _code(exc)
        raise KernelAttachError(
            code, f"the kernel has no nbd netlink interface ({os.strerror(code)})"
        ) from None
    except OSError as exc:
        sock.close()
        raise KernelAttachError(
            exc.errno or errno.EIO, f"cannot open a netlink socket: {exc.strerror or exc}"
        ) from None
    return sock


def _code(exc: NetlinkError) -> int:
    """pyroute2 carries the kernel's errno as ``code``; anything else counts as EIO."""
    return exc.code if isinstance(exc.code, int) else errno.EIO


class NbdNetlink:
    """One request per call, each on its own netlink socket (they are cheap and rare)."""

    def _request(self, command: int, attrs: Sequence[tuple[str, Any]], what: str) -> list[Any]:
        with _open() as sock:
            try:
                return list(
                    sock.nlm_request(
                        build_message(command, attrs),
                        msg_type=sock.prid,
                        msg_flags=NLM_F_REQUEST | NLM_F_ACK,
                    )
                )
            except NetlinkError as exc:
                code = _code(exc)
                hint = " (run as root)" if code == errno.EPERM else ""
                raise KernelAttachError(code, f"{what} failed: {os.strerror(code)}{hint}") from None

    def connect(self, settings: Connect, fds: Sequence[int], index: int | None = None) -> int:
        """Connect sockets to /dev/nbd``index``, or to a device the kernel picks (and creates
        if none is free); returns the index."""
        device = f"/dev/nbd{index}" if index is not None else "a free NBD device"
        replies = self._request(
            CMD_CONNECT, connect_attrs(settings, fds, index), f"netlink CONNECT of {device}"
        )
        for reply in replies:
            found = reply.get_attr("NBD_ATTR_INDEX")
            if found is not None:
                return int(found)
        if index is not None:
            return index
        raise KernelAttachError(errno.EPROTO, "netlink CONNECT returned no device index")

    def reconfigure(self, settings: Connect, fds: Sequence[int], index: int) -> None:
        """Hand new sockets to a device whose daemon died (its sockets are dead)."""
        self._request(
            CMD_RECONFIGURE,
            reconfigure_attrs(settings, fds, index),
            f"netlink RECONFIGURE of /dev/nbd{index}",
        )

    def disconnect(self, index: int) -> None:
        self._request(
            CMD_DISCONNECT, [("NBD_ATTR_INDEX", index)], f"netlink DISCONNECT of /dev/nbd{index}"
        )

    def status(self, index: int | None = None) -> dict[int, bool]:
        """Index -> connected, for one device or all of them."""
        attrs = [] if index is None else [("NBD_ATTR_INDEX", index)]
        result: dict[int, bool] = {}
        for reply in self._request(CMD_STATUS, attrs, "netlink STATUS"):
            devices = reply.get_attr("NBD_ATTR_DEVICE_LIST")
            if devices is None:
                continue
            for item in devices.get_attrs("NBD_DEVICE_ITEM"):
                result[int(item.get_attr("NBD_DEVICE_INDEX"))] = bool(
                    item.get_attr("NBD_DEVICE_CONNECTED")
                )
        return result
