"""Export a device to the kernel as /dev/nbdX: the trio side of attaching and detaching.

The kernel gets one end of each ``socketpair``; the other end is served by the same
:class:`~usbd.core.Connection` request loop as network clients (simple replies, no handshake).
The order matters everywhere, because the kernel does I/O on the device from inside the calls
that set it up: connections are served *before* CONNECT/DO_IT, and every blocking kernel call
(netlink, ioctl, opening the node) runs in a worker thread so that the loop keeps answering.

Stopping is asked for with :meth:`KernelExport.detach`: the kernel then sends ``NBD_CMD_DISC``
on every socket, each connection drains and flushes, shuts its socket down (which is what lets
``NBD_DO_IT`` return) and :meth:`KernelExport.run` returns. A device that is mounted or held
open is not detached unless forced, since the kernel fails the I/O in flight when it lets go.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass
from typing import Literal

import trio

from .._engine import Connection
from .._export import Export
from .._server import session_for
from .._transport import SocketTransport
from ._errors import KernelAttachError
from ._ioctl import IoctlDevice
from ._netlink import Connect, NbdNetlink, netlink_available
from ._sysfs import DEFAULT_MAX_DEVICES, NbdSystem

__all__ = ["Attached", "KernelExport", "KernelOptions", "Method"]

log = logging.getLogger("usbd.core.kernel")

Method = Literal["auto", "netlink", "ioctl"]

#: How long connections get to finish after the kernel was told to disconnect.
_DETACH_GRACE = 30.0
_MIN_BLOCK = 512
_MAX_BLOCK = 4096


@dataclass(frozen=True)
class KernelOptions:
    """How to attach. ``device`` None means the first free one (netlink: the kernel's pick)."""

    device: int | None = None
    method: Method = "auto"
    connections: int | None = None
    max_devices: int = DEFAULT_MAX_DEVICES
    timeout: int = 0
    dead_timeout: int = 60
    block_size: int | None = None


@dataclass(frozen=True)
class Attached:
    """What :meth:`KernelExport.run` reports once the device is live."""

    index: int
    path: str
    method: Literal["netlink", "ioctl"]
    connections: int
    reattached: bool


def _block_size(export: Export, wanted: int | None) -> int:
    """The kernel takes powers of two from 512 to the page size; the device's minimum rules."""
    size = wanted if wanted is not None else max(_MIN_BLOCK, export.info.min_block)
    if size & (size - 1) or not _MIN_BLOCK <= size <= _MAX_BLOCK:
        raise KernelAttachError(
            errno.EINVAL,
            f"block size {size} cannot be given to the kernel: it takes a power of two "
            f"from {_MIN_BLOCK} to {_MAX_BLOCK}",
        )
    return size


class KernelExport:
    """One export attached to one /dev/nbdX for as long as :meth:`run` runs."""

    def __init__(
        self,
        export: Export,
        options: KernelOptions | None = None,
        *,
        system: NbdSystem | None = None,
        netlink: NbdNetlink | None = None,
    ) -> None:
        self.export = export
        self.options = options or KernelOptions()
        self.system = system or NbdSystem()
        self.netlink = netlink or NbdNetlink()
        self.attached: Attached | None = None
        self._ioctl: IoctlDevice | None = None
        self._detaching = False
        self._done = trio.Event()
        self._cancel: trio.CancelScope | None = None

    # -- preparation (blocking; run in a worker thread) ------------------------------------

    def _prepare(self, settings: Connect) -> tuple[Literal["netlink", "ioctl"], int | None, bool]:
        """Root, module, method and device: every refusal happens here, before any socket."""
        options = self.options
        if os.geteuid() != 0:
            raise KernelAttachError(
                errno.EPERM,
                "attaching to /dev/nbdX needs root (CAP_SYS_ADMIN): run as root, or serve "
                "over the network with --listen",
            )
        self.system.load_module(options.max_devices)
        method: Literal["netlink", "ioctl"]
        if options.method == "auto":
            method = "netlink" if netlink_available() else "ioctl"
        elif options.method == "netlink" and not netlink_available():
            raise KernelAttachError(
                errno.ENOTSUP,
                "the kernel's nbd driver has no netlink interface (kernel 4.12 or newer); "
                "use --attach=ioctl",
            )
        else:
            method = options.method
        index = options.device
        if index is None:
            return method, (None if method == "netlink" else self.system.first_free()), False
        if not self.system.exists(index) and method == "ioctl":
            count = len(self.system.devices())
            raise KernelAttachError(
                errno.ENODEV,
                f"{self.system.device_path(index)} does not exist (the kernel has {count} NBD "
                "devices; load the nbd module with more, see -nbd-max-devs)",
            )
        holder = self.system.holder(index)
        if holder is None:
            return method, index, False
        if holder.alive:
            raise KernelAttachError(errno.EBUSY, self.system.describe_holder(index, holder))
        # Left connected by a daemon that died: take it over if the kernel lets us.
        if method != "netlink":
            raise KernelAttachError(
                errno.EBUSY,
                f"{self.system.device_path(index)} was left connected by process "
                f"{holder.pid}, which has died; re-attaching needs netlink (--attach=netlink)",
            )
        size = self.system.size(index)
        if size is not None and size != settings.size - settings.size % settings.block_size:
            raise KernelAttachError(
                errno.EINVAL,
                f"{self.system.device_path(index)} was left connected with a size of {size} "
                f"bytes, but this device has {self.export.size}; refusing to re-attach",
            )
        return method, index, True

    def _settings(self) -> Connect:
        return Connect(
            size=self.export.size,
            block_size=_block_size(self.export, self.options.block_size),
            server_flags=int(self.export.flags),
            timeout=self.options.timeout,
            dead_timeout=self.options.dead_timeout,
        )

    def _connection_count(self) -> int:
        """One socket unless asked for more, as nbd-client does: with several, the kernel
        applies a request timeout (30 s unless --timeout) and on expiry kills the socket the
        request went out on, where with one and no timeout it only warns and keeps waiting."""
        wanted = self.options.connections
        if wanted is None:
            return 1
        if wanted < 1:
            raise KernelAttachError(errno.EINVAL, "--connections must be at least 1")
        if wanted > 1 and not self.export.device.multi_conn:
            raise KernelAttachError(
                errno.EINVAL,
                f"--connections {wanted}: this device is not safe for several connections "
                "(multi_conn is off); use 1",
            )
        return wanted

    # -- running ---------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Attached] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Attach, report :class:`Attached`, serve until the kernel lets go; then clean up."""
        settings = self._settings()
        count = self._connection_count()
        method, index, reattach = await trio.to_thread.run_sync(self._prepare, settings)
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(count)]
        kernel_ends = [kernel for kernel, _ in pairs]
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                connections = []
                for number, (_, ours) in enumerate(pairs):
                    connection = Connection(
                        SocketTransport(ours),
                        self.export,
                        session_for(self.export),
                        name=f"kernel.{number}",
                    )
                    connections.append(connection)
                fds = [kernel.fileno() for kernel in kernel_ends]
                if reattach:
                    assert index is not None
                    await trio.to_thread.run_sync(self.netlink.reconfigure, settings, fds, index)
                    _close_all(kernel_ends)
                    if not all(_kernel_holds(ours) for _, ours in pairs):
                        raise KernelAttachError(
                            errno.EBUSY,
                            f"{self.system.device_path(index)} is busy: the kernel did not "
                            "take the new connection (another daemon serves it)",
                        )
                    for connection in connections:
                        nursery.start_soon(connection.serve)
                elif method == "netlink":
                    for connection in connections:
                        nursery.start_soon(connection.serve)
                    # From this thread, not a worker: the kernel records the caller's thread
                    # id as the device's pid, and a worker thread may be gone long before the
                    # process (then the device would look abandoned). CONNECT only starts the
                    # kernel's receivers; no I/O waits on us inside it.
                    index = self.netlink.connect(settings, fds, index)
                    _close_all(kernel_ends)
                else:
                    assert index is not None
                    for connection in connections:
                        nursery.start_soon(connection.serve)
                    await self._start_ioctl(nursery, index, settings, fds)
                    _close_all(kernel_ends)
                for connection in connections:
                    connection.name = f"nbd{index}.{connection.name.rpartition('.')[2]}"
                self.attached = Attached(
                    index=index,
                    path=str(self.system.device_path(index)),
                    method=method,
                    connections=count,
                    reattached=reattach,
                )
                task_status.started(self.attached)
        finally:
            _close_all(kernel_ends)
            for _, ours in pairs:
                ours.close()
            if self._ioctl is not None:
                self._ioctl.close()
            self._done.set()
        if not self._detaching and self.attached is not None:
            log.warning("%s: the kernel disconnected the device", self.attached.path)

    async def _start_ioctl(
        self, nursery: trio.Nursery, index: int, settings: Connect, fds: list[int]
    ) -> None:
        device = await trio.to_thread.run_sync(IoctlDevice, self.system.device_path(index))
        self._ioctl = device
        await trio.to_thread.run_sync(
            lambda: device.configure(
                size=settings.size,
                block_size=settings.block_size,
                flags=settings.server_flags,
                timeout=settings.timeout,
                fds=fds,
            )
        )
        nursery.start_soon(self._do_it, device)

    async def _do_it(self, device: IoctlDevice) -> None:
        # Not abandoned on cancel: the thread holds the device until the kernel lets go.
        await trio.to_thread.run_sync(device.run)

    # -- stopping --------------------------------------------------------------------------

    async def in_use(self) -> bool:
        """Mounted, or open exclusively by someone: an exclusive open then fails with EBUSY."""
        if self.attached is None:
            return False
        path = self.attached.path

        def probe() -> bool:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
            except OSError as exc:
                return exc.errno == errno.EBUSY
            os.close(fd)
            return False

        return await trio.to_thread.run_sync(probe)

    async def detach(self) -> None:
        """Ask the kernel to let go and wait (bounded) until :meth:`run` has returned."""
        if self.attached is None or self._done.is_set():
            return
        self._detaching = True
        attached = self.attached
        log.info("%s: detaching (%s)", attached.path, attached.method)
        try:
            if attached.method == "netlink":
                await trio.to_thread.run_sync(self.netlink.disconnect, attached.index)
            elif self._ioctl is not None:
                await trio.to_thread.run_sync(self._ioctl.disconnect)
        except KernelAttachError as exc:
            log.warning("%s: %s", attached.path, exc)
        with trio.move_on_after(_DETACH_GRACE):
            await self._done.wait()
        if not self._done.is_set() and self._cancel is not None:
            log.warning("%s: the kernel did not close its connections in time", attached.path)
            self._cancel.cancel()
            await self._done.wait()


def _kernel_holds(ours: socket.socket) -> bool:
    """After we closed our copy of the kernel's end, EOF here means the kernel has none."""
    try:
        return ours.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
