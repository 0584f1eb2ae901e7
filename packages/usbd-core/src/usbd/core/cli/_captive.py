"""Captive mode (``--run 'COMMAND'``): serve one command, then stop with its exit status.

As nbdkit's ``--run``: the daemon serves on a private unix socket (in a fresh directory only
this user can enter, removed at exit) besides any ``--listen``, runs COMMAND with ``/bin/sh -c``
once it serves, and stops when the command exits, with the command's status. This is how a
script copies an image in or out without managing a daemon's life:
``usbd-ramdisk --run 'qemu-img convert disk.qcow2 "$uri"'``.

The command finds the server through nbdkit's variables, exported so that its children see
them too: ``$uri`` and ``$nbd`` (the same URI, as in nbdkit 1.24 and later), ``$unixsocket``,
``$exportname``, ``$port`` (empty: the private socket is not TCP) and ``$tls`` (1 for
``--tls=on``, 2 for ``--tls=require``, unset when off). Its stdin, stdout and stderr are the
daemon's, so it can be interactive.

Stopping is the daemon's usual clean stop (flush, close, remove sockets) whatever starts it:
the command's exit (a kernel device, if one was asked for, is detached first, once nothing has
it mounted or open), a signal to the daemon (forwarded to the command, which gets a grace
period to exit before SIGKILL), or the device failing (the command is terminated; the daemon
exits 1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping

import trio

from .._handshake import TLSMode
from .._listen import Listen
from ..kernel import KernelExport

__all__ = ["GRACE", "Captive", "exit_status"]

log = logging.getLogger("usbd")

#: Seconds the command has to exit after it was signalled, before it is killed.
GRACE = 10.0
#: Seconds between asking whether a kernel device the command left in use is free.
IN_USE_POLL = 0.5

#: ``$tls`` as nbdkit sets it for each --tls mode (unset when off).
_TLS_VARIABLE: Mapping[TLSMode, str] = {"on": "1", "require": "2"}


def exit_status(returncode: int) -> int:
    """The status a shell reports: a command killed by signal N is 128+N."""
    return 128 - returncode if returncode < 0 else returncode


class Captive:
    """One ``--run`` command: its private socket, its process and, once it ended, its status.

    :meth:`private_socket` makes the socket's directory for the daemon's life;
    :meth:`forward` passes the daemon's stop signals on to the command; :meth:`run` (a task
    in the daemon's nursery) starts the command once the daemon serves and stops the daemon
    when it exits.
    """

    def __init__(
        self, command: str, *, export_name: str = "", tls: TLSMode = "off", grace: float = GRACE
    ) -> None:
        self.command = command
        self.export_name = export_name
        self.tls = tls
        self.grace = grace
        #: The command's exit status (128+N if killed by signal N); None until it ended.
        self.status: int | None = None
        self.socket_path: str | None = None
        self._process: trio.Process | None = None
        self._pending: int | None = None
        self._signalled = False

    def exit_code(self) -> int:
        """The daemon's status after a clean stop: the command's, or 1 if the daemon was
        stopped before the command ran (a script must not take that for success)."""
        if self.status is None:
            log.error("stopped before the --run command ran")
            return 1
        return self.status

    @contextlib.contextmanager
    def private_socket(self) -> Iterator[Listen]:
        """Where the daemon listens for the command: ``socket`` in a new directory of mode
        0700 (as :func:`tempfile.mkdtemp` makes it), removed with whatever is left in it."""
        with tempfile.TemporaryDirectory(prefix="usbd-run-") as directory:
            self.socket_path = os.path.join(directory, "socket")
            try:
                yield Listen(path=self.socket_path)
            finally:
                self.socket_path = None

    def environment(self, uri: str) -> dict[str, str]:
        """The daemon's environment plus nbdkit's ``--run`` variables for ``uri``."""
        assert self.socket_path is not None, "the private socket is not open"
        env = dict(os.environ)
        env.update(
            uri=uri,
            nbd=uri,
            unixsocket=self.socket_path,
            exportname=self.export_name,
            port="",
        )
        env.pop("tls", None)
        if self.tls in _TLS_VARIABLE:
            env["tls"] = _TLS_VARIABLE[self.tls]
        return env

    def forward(self, signals: AsyncIterator[int]) -> AsyncIterator[int]:
        """The daemon's signals, each sent on to the command (if it runs) as it arrives."""
        return _Forwarding(self, signals)

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the command; one that arrives while the command is being
        started is sent as soon as it is. The stop then waits for the command (:meth:`_end`)."""
        self._signalled = True
        process = self._process
        if process is None:
            self._pending = signum
        elif process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    async def run(self, uri: str, attachment: KernelExport | None, scope: trio.CancelScope) -> None:
        """Run the command until it exits, then stop the daemon (cancel ``scope``, after
        detaching the kernel device). Cancelled first, it ends the command (:meth:`_end`).

        trio.lowlevel.open_process rather than run_process: the process must be known here
        from the moment it exists (run_process as a task reports it a scheduling step later,
        and a signal or a cancellation in between found no process to end)."""
        argv = ["/bin/sh", "-c", self.command]
        # Not cancellable while it starts (Popen runs in a thread): it returns the process,
        # and a cancellation is delivered at the next checkpoint, inside the try below.
        process = self._process = await trio.lowlevel.open_process(argv, env=self.environment(uri))
        try:
            if self._pending is not None:
                self.send_signal(self._pending)
            await process.wait()
        finally:
            if process.returncode is None:
                with trio.CancelScope(shield=True):
                    await self._end(process)
            assert process.returncode is not None
            self.status = exit_status(process.returncode)
        if process.returncode < 0:
            name = signal.Signals(-process.returncode).name
            log.info("the --run command was killed by %s: stopping", name)
        else:
            log.info("the --run command exited with status %s: stopping", self.status)
        if attachment is not None and attachment.attached is not None:
            await _when_unused(attachment, attachment.attached.path)
            await attachment.detach()
        scope.cancel()

    async def _end(self, process: trio.Process) -> None:
        """How a cancelled run ends the command: SIGTERM unless the daemon's signal was passed
        on, then ``grace`` seconds to exit, then SIGKILL; it returns once the command exited."""
        if not self._signalled:
            self.send_signal(signal.SIGTERM)
        with trio.move_on_after(self.grace):
            await process.wait()
            return
        log.warning("the --run command did not exit %g s after a signal: killing it", self.grace)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def _when_unused(attachment: KernelExport, path: str) -> None:
    """Return once nothing has the kernel device mounted or open: detaching under a mounted
    filesystem fails its I/O in flight, so a device the command left in use keeps being
    served (a signal to the daemon then stops it as usual, the second one by force)."""
    if not await attachment.in_use():
        return
    log.warning(
        "%s is still in use (mounted or open) after the --run command: serving it until it "
        "is not (unmount it; a second signal detaches it anyway)",
        path,
    )
    while await attachment.in_use():
        await trio.sleep(IN_USE_POLL)


class _Forwarding:
    """An async iterator over the daemon's signals that sends each to the command first.

    A class rather than an async generator: a generator left suspended when the daemon stops
    would be finalized by the garbage collector, outside trio.
    """

    def __init__(self, captive: Captive, signals: AsyncIterator[int]) -> None:
        self._captive = captive
        self._signals = signals

    def __aiter__(self) -> _Forwarding:
        return self

    async def __anext__(self) -> int:
        signum = await self._signals.__anext__()
        self._captive.send_signal(signum)
        return signum
