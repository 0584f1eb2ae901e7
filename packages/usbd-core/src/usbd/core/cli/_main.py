"""A daemon's life from ``argv`` to exit status, shared by every driver's command and usbdsrvd.

Exit status 2 is for anything the user can fix by changing what they typed (a flag, an
environment variable, the config file, a driver option); 1 for a failure to start or serve
(no root, no nbd in the kernel, a busy device); 0 after a clean stop.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import trio
from pydantic import BaseModel

from .._limits import Limits
from .._listen import parse_listen
from .._sizes import format_size
from .._tls import server_tls
from .._version import __version__
from ..driver import AnyDriver, Driver
from ..kernel import KernelOptions
from ..settings import CommonSettings
from ._captive import Captive
from ._config import config_path, load_settings, settings_class
from ._errors import UsageError
from ._flags import STYLE_NOTE, build_parser, parse_argv
from ._options import flag_info, option_table
from ._serve import serve

__all__ = ["Command", "describe_options", "kernel_options", "main", "run"]

log = logging.getLogger("usbd")


@dataclass(frozen=True)
class Command:
    """One daemon: its name, the drivers whose options it takes, and how it picks the driver.

    A driver's own command has one driver and no ``select``; usbdsrvd has every installed
    driver, a settings class with ``dev_type`` and a ``select`` that reads it.
    """

    prog: str
    description: str
    drivers: Sequence[AnyDriver]
    settings: type[CommonSettings] = CommonSettings
    select: Callable[[CommonSettings], AnyDriver] | None = None
    headings: Mapping[str, str] = field(default_factory=dict)
    epilog: str = ""
    version: str = __version__


def kernel_options(settings: CommonSettings) -> KernelOptions | None:
    """Whether to attach to the kernel: always with a device named or --attach=netlink|ioctl,
    never with --attach=none, and by default only when nothing is to be served on --listen
    (or to a --run command, which has a socket of its own)."""
    if settings.attach == "none":
        if settings.device is not None:
            raise UsageError("NBD_DEVICE: not allowed with -attach=none")
        if not settings.listen and settings.run is None:
            raise UsageError("-attach: 'none' needs -listen (HOST:PORT or a unix path)")
        return None
    served = settings.listen or settings.run is not None
    if settings.device is None and settings.attach == "auto" and served:
        return None
    return KernelOptions(
        device=settings.device,
        method=settings.attach,
        connections=settings.connections,
        max_devices=settings.nbd_max_devs,
        timeout=settings.timeout,
        dead_timeout=settings.dead_timeout,
    )


def describe_options(options: BaseModel) -> str:
    """Every option as ``name=value``, secrets as ``<REDACTED>``: the default startup summary."""
    parts = []
    for name, info in type(options).model_fields.items():
        value: Any = getattr(options, name)
        flag = flag_info(info)
        if flag.secret and value is not None:
            shown = "<REDACTED>"
        elif flag.show is not None and value is not None:
            shown = str(flag.show(value))
        else:
            shown = repr(value) if isinstance(value, str) else str(value)
        parts.append(f"{name}={shown}")
    return ", ".join(parts)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    # Libraries' debug logs (pyroute2 dumps every netlink message) would drown ours.
    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))


def _warn_unused(settings: CommonSettings, chosen: AnyDriver, command: Command) -> None:
    for driver in command.drivers:
        if driver is not chosen and getattr(settings, driver.name).model_fields_set:
            log.warning(
                "-%s-* settings apply only with -dev-type=%s; ignored", driver.name, driver.name
            )


def _startup_line(
    settings: CommonSettings,
    kernel: KernelOptions | None,
    driver: AnyDriver,
    options: BaseModel,
    size: int,
) -> str:
    targets = []
    if kernel is not None:
        device = kernel.device
        targets.append("as next available NBD device" if device is None else f"as /dev/nbd{device}")
    if settings.listen:
        targets.append("on the network")
    if settings.run is not None:
        targets.append("to the --run command")
    line = f'Exporting {format_size(size)} volume "{settings.store_name}" {" and ".join(targets)}'
    if driver.stores_data:
        line += f' with local storage at "{settings.store_dir}"'
    summary = (driver.describe or (lambda _s, o: describe_options(o)))(settings, options)
    return f"{line} using driver {driver.name}{', ' + summary if summary else ''}"


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


#: Seconds a thread holds the GIL before another that waits for it may take it.
_SWITCH_INTERVAL = 0.0002


def _act(
    prog: str, driver: AnyDriver, name: str, settings: CommonSettings, options: BaseModel
) -> int:
    """Run a driver's action (``--check``) instead of the daemon; errors as the daemon's."""
    action = driver.actions.get(name)
    if action is None:
        offered = ", ".join(f"-{n}" for n in driver.actions) or "none"
        raise UsageError(f"-{name}: not offered by driver {driver.name} (it has: {offered})")
    _configure_logging(settings.log_level)
    try:
        return action.run(settings, options)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1


def run(command: Command, argv: Sequence[str] | None = None) -> int:
    """Run ``command`` as a daemon; the return value is the exit status."""
    with _usr1_while_not_serving(command.prog):
        return _run(command, argv)


@contextlib.contextmanager
def _usr1_while_not_serving(prog: str) -> Iterator[None]:
    """SIGUSR1's default action kills, and a device may take minutes to open (usbd-objstore
    listing its bucket) before serve() takes the signal: until then, and after it, a line
    says there are no figures yet instead. (In a thread other than the main one, as in some
    tests, there is no signal to take.)"""

    def note(signum: int, frame: FrameType | None) -> None:
        log.warning("%s received SIGUSR1 while not serving (opening or closing): no figures", prog)

    try:
        previous = signal.signal(signal.SIGUSR1, note)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _run(command: Command, argv: Sequence[str] | None) -> int:
    prog = command.prog
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings_cls = settings_class(command.settings, command.drivers)
        table = option_table(settings_cls, command.drivers)
        actions = {
            name: action.help
            for driver in command.drivers
            for name, action in driver.actions.items()
        }
        parsed = parse_argv(args, table, list(actions))
        if parsed.help:
            notes = {driver.name: driver.description for driver in command.drivers}
            parser = build_parser(
                prog, command.description, table, command.headings, command.epilog, notes, actions
            )
            print(parser.format_help(), end="")
            return 0
        if parsed.version:
            print(f"{prog} {command.version}")
            return 0
        settings = load_settings(settings_cls, table, parsed.values, config_path(parsed.config))
        driver = command.select(settings) if command.select else command.drivers[0]
        options: BaseModel = getattr(settings, driver.name)
        if parsed.action is not None:
            return _act(prog, driver, parsed.action, settings, options)
        kernel = kernel_options(settings)
        # Certificates are read now: a bad one stops the daemon before it serves anyone.
        tls = server_tls(
            settings.tls,
            settings.tls_certificates,
            verify_peer=settings.tls_verify_peer,
            psk=settings.tls_psk,
        )
        _configure_logging(settings.log_level)
        _warn_unused(settings, driver, command)
        device = driver.create(settings, options)
        captive = None
        if settings.run is not None:
            captive = Captive(settings.run, export_name=settings.export_name, tls=settings.tls)
    except (UsageError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{prog} started.", flush=True)
    print(
        f"{prog} using config: {_startup_line(settings, kernel, driver, options, device.size)}",
        flush=True,
    )
    failure: BaseException | None = None
    # The process is the daemon's. A connection's writer thread needs the GIL back after each
    # write; with the default 5 ms switch interval it can wait that long behind a busy event
    # loop, and random 4 KiB writes to usbd-filedisk were ~10% slower and far less steady
    # for it (fio side by side, 6 runs each). Threads here mostly release the GIL in system
    # calls anyway.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(_SWITCH_INTERVAL)
    try:
        trio.run(
            lambda: serve(
                device,
                [parse_listen(address) for address in settings.listen],
                export_name=settings.export_name,
                description=settings.description,
                read_only=settings.read_only,
                kernel=kernel,
                prog=prog,
                limits=Limits(
                    max_connections=settings.max_connections,
                    handshake_timeout=settings.handshake_timeout,
                    idle_timeout=settings.idle_timeout,
                ),
                socket_mode=settings.socket_mode,
                tls=tls,
                captive=captive,
                driver=driver.name,
                driver_metrics=driver.metrics,
                metrics=parse_listen(settings.metrics) if settings.metrics else None,
            )
        )
    except* OSError as group:
        failure = _leaf(group)
    finally:
        sys.setswitchinterval(previous)
    if failure is not None:
        print(f"{prog}: error: {failure}", file=sys.stderr)
        return 1
    print(f"{prog} terminated normally.", flush=True)
    if captive is not None:
        return captive.exit_code()  # as nbdkit --run: the command's status is the daemon's
    return 0


def main(driver: Driver[Any], argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """A driver's own command (``usbd-ramdisk``): the shared settings plus the driver's."""
    name = prog or f"usbd-{driver.name}"
    heading = f"{driver.name} driver options"
    command = Command(
        name, driver.description, [driver], headings={driver.name: heading}, epilog=STYLE_NOTE
    )
    return run(command, argv)
