"""Serving one device until told to stop: network listeners, the kernel device, signals.

The stop order matters more than anything else here: a device is detached from the kernel
only when nothing has it mounted or open (else the kernel fails the I/O in flight), then the
export flushes and closes the device exactly once, whatever ended the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Sequence

import trio

from .._device import Device
from .._export import Export
from .._limits import Limits, raise_file_limit
from .._listen import Listen, uri_for
from .._monitor import MetricsEndpoint, Monitor
from .._notify import ready, stopping
from .._server import Server, open_tcp_listeners, open_unix_listener
from .._status import publish_status
from .._tls import ServerTLS
from ..kernel import Attached, KernelExport, KernelOptions
from ..metrics import Metric
from ._captive import Captive

__all__ = ["DeviceFailed", "serve"]

log = logging.getLogger("usbd")

#: Seconds between asking the device whether it has failed for good (Device.failed).
FAILURE_POLL = 0.5


class DeviceFailed(OSError):
    """The device reported that it can no longer serve (:meth:`Device.failed`): the daemon
    stopped, and exits with this message."""

    def __str__(self) -> str:
        return str(self.args[0])


async def serve(
    device: Device,
    listen: Sequence[Listen],
    *,
    export_name: str = "",
    description: str = "",
    read_only: bool = False,
    kernel: KernelOptions | None = None,
    prog: str = "usbd",
    limits: Limits | None = None,
    socket_mode: int = 0o600,
    tls: ServerTLS | None = None,
    captive: Captive | None = None,
    driver: str = "",
    driver_metrics: Sequence[Metric] = (),
    metrics: Listen | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``device`` on ``listen`` and/or to the kernel until SIGINT, SIGTERM or SIGHUP,
    cancellation or the kernel letting go; then detach, flush and close it once.

    A device that is mounted or held open is not detached on the first signal (the kernel
    would fail the I/O in flight): the daemon says so and keeps serving; a second signal forces.
    Under systemd (``NOTIFY_SOCKET``) it reports READY=1 once every listener accepts and the
    kernel device is attached, and STOPPING=1 when a stop begins. With ``captive``
    (``--run``) it also serves a private socket, runs the command there and stops when it exits.

    Its figures (a :class:`Monitor` over the export, the server, the kernel device and the
    ``driver``'s declared ``driver_metrics``) go to a status file for ``usbdsrvd status``,
    to the log on SIGUSR1, and to Prometheus at ``metrics`` (``--metrics``) if given.
    """
    if listen:  # room for --max-connections: not the kernel's few sockets
        raise_file_limit(limits or Limits())
    # Signals are taken from the start, so that one arriving while listeners open or the
    # kernel attaches stops the daemon cleanly once it is up (not a KeyboardInterrupt).
    # SIGHUP too: a daemon started from a terminal that is then closed must stop as on
    # SIGTERM (flush, close, upload), not die as the default action would have it.
    # SIGUSR1 (log the figures) from the start as well: its default action would kill.
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals,
        trio.open_signal_receiver(signal.SIGUSR1) as reports,
        contextlib.ExitStack() as stack,
    ):
        stops: AsyncIterator[int] = signals
        if captive is not None:  # its socket is the last listener; it hears every signal
            listen = [*listen, stack.enter_context(captive.private_socket())]
            stops = captive.forward(signals)
        export = Export(device, export_name, description, read_only=read_only)
        monitor = Monitor(export, prog=prog, driver=driver, declared=driver_metrics)
        if metrics is not None:  # a port that cannot be had stops the start (OSError)
            try:
                endpoint = MetricsEndpoint(monitor, metrics.host, metrics.port)
            except OSError:
                with trio.CancelScope(shield=True):  # the device was opened: close it once
                    await export.aclose()
                raise
            stack.callback(endpoint.close)
            print(f"{prog} publishes metrics at {endpoint.url}", flush=True)
        await _serve(
            monitor,
            listen,
            kernel,
            stops,
            reports,
            task_status,
            limits,
            socket_mode,
            tls,
            captive,
        )


async def _serve(
    monitor: Monitor,
    listen: Sequence[Listen],
    kernel: KernelOptions | None,
    signals: AsyncIterator[int],
    reports: AsyncIterator[int],
    task_status: trio.TaskStatus[list[str]],
    limits: Limits | None = None,
    socket_mode: int = 0o600,
    tls: ServerTLS | None = None,
    captive: Captive | None = None,
) -> None:
    export, prog = monitor.export, monitor.prog
    # The status file and SIGUSR1 last until the device is closed: a close may take minutes
    # (usbd-objstore uploads what is dirty), and a daemon still holding data must not vanish
    # from usbdsrvd status meanwhile.
    # (The file appears once the daemon serves: a reader then sees its addresses.)
    async with trio.open_nursery() as watching:
        watching.start_soon(_report, monitor, reports)
        try:
            listeners: list[trio.SocketListener] = []
            for where in listen:
                if where.path is not None:
                    listeners.append(await open_unix_listener(where.path, mode=socket_mode))
                else:
                    listeners.extend(await open_tcp_listeners(where.host, where.port))
            required = tls is not None and tls.mode == "require"
            uris = [uri_for(listener, export.name, tls=required) for listener in listeners]
            async with trio.open_nursery() as nursery:
                if listeners:
                    monitor.server = server = Server([export], limits=limits, tls=tls)
                    await nursery.start(server.serve, listeners)
                monitor.listen = list(uris)
                for uri in uris:
                    print(f"{prog} is serving {uri}", flush=True)
                if uris:
                    print(f"{prog}: connect with e.g.  nbdinfo '{uris[0]}'", flush=True)
                attachment = None
                serving = list(uris)
                if kernel is not None:
                    attachment = KernelExport(export, kernel)
                    await nursery.start(_run_kernel, attachment, monitor, nursery.cancel_scope)
                    assert attachment.attached is not None
                    attached = attachment.attached
                    monitor.kernel, monitor.kernel_live = attached, True
                    how = "re-attached" if attached.reattached else "attached"
                    log.info(
                        "%s %s via %s with %d connection(s)",
                        attached.path,
                        how,
                        attached.method,
                        attached.connections,
                    )
                    print(f'{prog} is processing requests for "{attached.path}"', flush=True)
                    serving.insert(0, attached.path)
                ready(f"serving {', '.join(serving)}")
                task_status.started(uris)
                nursery.start_soon(_watch_for_failure, export.device, attachment)
                watching.start_soon(publish_status, monitor)
                if captive is not None:
                    nursery.start_soon(captive.run, uris[-1], attachment, nursery.cancel_scope)
                await _wait_for_stop(prog, attachment, signals)
                nursery.cancel_scope.cancel()
        finally:
            stopping()
            monitor.stopping = True
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
            watching.cancel_scope.cancel()


async def _run_kernel(
    attachment: KernelExport,
    monitor: Monitor,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Attached] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the kernel; when it lets go (detach, or someone else disconnected it), stop."""
    try:
        await attachment.run(task_status=task_status)
    finally:
        monitor.kernel_live = False
        scope.cancel()


async def _report(monitor: Monitor, reports: AsyncIterator[int]) -> None:
    """SIGUSR1: the figures, one line in the log (as dd and s3backer's stats do). At INFO, or
    at the threshold when --log-level is above it: the line was asked for."""
    async for _ in reports:
        level = max(logging.INFO, log.getEffectiveLevel())
        log.log(level, "%s statistics: %s", monitor.prog, monitor.summary())


async def _watch_for_failure(device: Device, attachment: KernelExport | None) -> None:
    """Stop the daemon with an error once the device says it has failed for good: detach
    the kernel device even if mounted (the device fails its I/O anyway) and raise."""
    while True:
        await trio.sleep(FAILURE_POLL)
        reason = device.failed()
        if reason:
            break
    log.error("the device failed: %s; stopping", reason)
    stopping()
    if attachment is not None:
        await attachment.detach()
    raise DeviceFailed(f"the device failed: {reason}")


async def _wait_for_stop(
    prog: str, attachment: KernelExport | None, signals: AsyncIterator[int]
) -> None:
    forced = False
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
        stopping()
        await attachment.detach()
        return
