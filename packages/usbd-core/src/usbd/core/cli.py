"""Command-line front end shared by every driver's console script.

``usbd-ramdisk --listen /tmp/disk.sock`` and friends are all :func:`main` with a different
:class:`~usbd.core.Driver`. Flags are accepted in the original project's Go style
(``-store-size=20GiB``) as well as GNU style (``--store-size 20GiB``). A bad value gets one
line naming the flag and what is accepted, and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from ._device import Device
from ._export import Export
from ._server import Server, open_tcp_listeners, open_unix_listener
from ._sizes import format_size, parse_size
from .driver import Driver
from .kernel import DEFAULT_MAX_DEVICES, Attached, KernelExport, KernelOptions, parse_device

__all__ = ["Listen", "main", "parse_listen", "uri_for"]

log = logging.getLogger("usbd")


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


def uri_for(listener: trio.SocketListener, export_name: str) -> str:
    """The NBD URI a client would use for this listener."""
    sock = listener.socket
    address = sock.getsockname()
    if isinstance(address, str):
        return f"nbd+unix:///{export_name}?socket={address}"
    host, port = address[0], address[1]
    if ":" in host:
        host = f"[{host}]"
    return f"nbd://{host}:{port}/{export_name}"


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device(text: str) -> int:
    try:
        return parse_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a whole number >= 1")
    return int(text)


def _seconds(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected whole seconds (0 or more)"
        )
    return int(text)


def _listen(text: str) -> Listen:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, no usage block: the flag and what it accepts are in ``message``."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, **kw: object
) -> None:
    """Declare ``--name`` together with the original's Go-style ``-name``."""
    parser.add_argument(f"--{name}", f"-{name}", **kw)  # type: ignore[arg-type]


def build_parser(driver: Driver, prog: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=driver.description, allow_abbrev=False)
    parser.add_argument(
        "device",
        nargs="?",
        type=_device,
        metavar="NBD_DEVICE",
        help="the /dev/nbdX to export to (default: the first free one, unless --listen is "
        "given alone)",
    )
    common = parser.add_argument_group("serving")
    _flag(
        common,
        "listen",
        action="append",
        type=_listen,
        default=[],
        metavar="ADDR",
        help="serve NBD clients on HOST:PORT (TCP) or a unix socket PATH; may be repeated",
    )
    _flag(
        common,
        "export-name",
        default="",
        metavar="NAME",
        help="name clients ask for (default: the empty name)",
    )
    _flag(common, "description", default="", help="export description shown to clients")
    _flag(common, "read-only", action="store_true", help="refuse writes")
    _flag(
        common,
        "store-size",
        type=_size,
        default=None,
        metavar="SIZE",
        help="device size (ex. 100 MiB, 20GiB)",
    )
    kernel = parser.add_argument_group("kernel")
    _flag(
        kernel,
        "attach",
        default="auto",
        choices=["auto", "netlink", "ioctl", "none"],
        help="how to attach to /dev/nbdX: netlink where the kernel has it, else ioctl; none "
        "serves --listen only",
    )
    _flag(
        kernel,
        "nbd-max-devs",
        type=_count,
        default=DEFAULT_MAX_DEVICES,
        metavar="N",
        help="how many NBD devices to create if this daemon loads the nbd module "
        f"(default {DEFAULT_MAX_DEVICES})",
    )
    _flag(
        kernel,
        "connections",
        type=_count,
        default=None,
        metavar="N",
        help="sockets between the kernel and the daemon (default 1; more only for devices safe "
        "for several connections, and then the kernel times requests out: see --timeout)",
    )
    _flag(
        kernel,
        "timeout",
        type=_seconds,
        default=0,
        metavar="SECONDS",
        help="per-request timeout in the kernel (default 0: warn and keep waiting)",
    )
    _flag(
        kernel,
        "dead-timeout",
        type=_seconds,
        default=60,
        metavar="SECONDS",
        help="how long the kernel holds I/O for a daemon that died to be restarted and "
        "re-attach (netlink; default 60)",
    )
    _flag(
        common,
        "log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging threshold",
    )
    group = parser.add_argument_group(driver.name)
    driver.add_arguments(group)  # type: ignore[arg-type]
    return parser


async def serve(
    device: Device,
    listen: Sequence[Listen],
    *,
    export_name: str = "",
    description: str = "",
    read_only: bool = False,
    kernel: KernelOptions | None = None,
    prog: str = "usbd",
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``device`` on ``listen`` and/or to the kernel until SIGINT/SIGTERM, cancellation or
    the kernel letting go; then detach, flush and close it once.

    A device that is mounted or held open is not detached on the first signal (the kernel
    would fail the I/O in flight): the daemon says so and keeps serving; a second signal forces.
    """
    export = Export(device, export_name, description, read_only=read_only)
    try:
        listeners: list[trio.SocketListener] = []
        for where in listen:
            if where.path is not None:
                listeners.append(await open_unix_listener(where.path))
            else:
                listeners.extend(await open_tcp_listeners(where.host, where.port))
        uris = [uri_for(listener, export_name) for listener in listeners]
        async with trio.open_nursery() as nursery:
            if listeners:
                await nursery.start(Server([export]).serve, listeners)
            for uri in uris:
                print(f"{prog} is serving {uri}", flush=True)
            if uris:
                print(f"{prog}: connect with e.g.  nbdinfo '{uris[0]}'", flush=True)
            attachment = None
            if kernel is not None:
                attachment = KernelExport(export, kernel)
                await nursery.start(_run_kernel, attachment, nursery.cancel_scope)
                assert attachment.attached is not None
                attached = attachment.attached
                how = "re-attached" if attached.reattached else "attached"
                log.info(
                    "%s %s via %s with %d connection(s)",
                    attached.path,
                    how,
                    attached.method,
                    attached.connections,
                )
                print(f'{prog} is processing requests for "{attached.path}"', flush=True)
            task_status.started(uris)
            await _wait_for_stop(prog, attachment)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await export.aclose()
        for where in listen:
            if where.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(where.path)
        counts = export.request_counts()
        if counts:
            total = sum(counts.values())
            detail = ", ".join(f"{name} {count}" for name, count in counts.items())
            print(f"{prog} served {total} requests ({detail})", flush=True)


async def _run_kernel(
    attachment: KernelExport,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Attached] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the kernel; when it lets go (detach, or someone else disconnected it), stop."""
    try:
        await attachment.run(task_status=task_status)
    finally:
        scope.cancel()


async def _wait_for_stop(prog: str, attachment: KernelExport | None) -> None:
    forced = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if attachment is None:
                log.info("%s received %s: stopping", prog, name)
                return
            path = attachment.attached.path if attachment.attached else "/dev/nbd?"
            if not forced and await attachment.in_use():
                forced = True
                log.warning(
                    "%s received %s, but %s is in use (mounted or open): not detaching, since "
                    "the kernel would fail its I/O in flight; unmount it and signal again "
                    "(a second signal detaches anyway)",
                    prog,
                    name,
                    path,
                )
                continue
            log.info("%s received %s: detaching %s and stopping", prog, name, path)
            await attachment.detach()
            return


def _kernel_options(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> KernelOptions | None:
    """Whether to attach to the kernel: always with a device named or --attach=netlink|ioctl,
    never with --attach=none, and by default only when nothing is to be served on --listen."""
    if args.attach == "none":
        if args.device is not None:
            parser.error("argument NBD_DEVICE: not allowed with --attach=none")
        if not args.listen:
            parser.error("argument --attach: 'none' needs --listen (HOST:PORT or a unix path)")
        return None
    if args.device is None and args.attach == "auto" and args.listen:
        return None
    return KernelOptions(
        device=args.device,
        method=args.attach,
        connections=args.connections,
        max_devices=args.nbd_max_devs,
        timeout=args.timeout,
        dead_timeout=args.dead_timeout,
    )


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def main(driver: Driver, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run ``driver`` as a daemon; the return value is the exit status."""
    parser = build_parser(driver, prog)
    args = parser.parse_args(argv)
    prog = parser.prog
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    # Libraries' debug logs (pyroute2 dumps every netlink message) would drown ours.
    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))
    kernel = _kernel_options(args, parser)
    try:
        device = driver.create(args)
    except (ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    summary = driver.describe(args)
    if kernel is None:
        target = "on the network"
    elif kernel.device is None:
        target = "as next available NBD device"
    else:
        target = f"as /dev/nbd{kernel.device}"
    print(f"{prog} started.", flush=True)
    print(
        f"{prog} using config: Exporting {format_size(device.size)} volume "
        f'"{args.export_name}" {target} using driver {driver.name}'
        f"{', ' + summary if summary else ''}",
        flush=True,
    )
    failure: BaseException | None = None
    try:
        trio.run(
            lambda: serve(
                device,
                args.listen,
                export_name=args.export_name,
                description=args.description,
                read_only=args.read_only,
                kernel=kernel,
                prog=prog,
            )
        )
    except* OSError as group:
        failure = _leaf(group)
    if failure is not None:
        print(f"{prog}: error: {failure}", file=sys.stderr)
        return 1
    print(f"{prog} terminated normally.", flush=True)
    return 0
