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
    prog: str = "usbd",
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``device`` until SIGINT/SIGTERM or cancellation; then flush and close it once."""
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
            await nursery.start(Server([export]).serve, listeners)
            for uri in uris:
                print(f"{prog} is serving {uri}", flush=True)
            if uris:
                print(f"{prog}: connect with e.g.  nbdinfo '{uris[0]}'", flush=True)
            task_status.started(uris)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("%s received %s: stopping", prog, signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        with trio.CancelScope(shield=True):
            await export.aclose()
        for where in listen:
            if where.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(where.path)


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
    if not args.listen:
        parser.error(
            "argument --listen: required until kernel attach is available "
            "(expected HOST:PORT or a unix socket path)"
        )
    try:
        device = driver.create(args)
    except (ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    summary = driver.describe(args)
    print(f"{prog} started.", flush=True)
    print(
        f"{prog} using config: Exporting {format_size(device.size)} volume "
        f'"{args.export_name}" using driver {driver.name}{", " + summary if summary else ""}',
        flush=True,
    )
    try:
        trio.run(
            lambda: serve(
                device,
                args.listen,
                export_name=args.export_name,
                description=args.description,
                read_only=args.read_only,
                prog=prog,
            )
        )
    except OSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{prog} terminated normally.", flush=True)
    return 0
