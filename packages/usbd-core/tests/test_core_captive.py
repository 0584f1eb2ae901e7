"""Captive mode's own logic: exit statuses, nbdkit's variables, and the two ways a command
is ended by the daemon rather than by itself (the device failing; a command that ignores
SIGTERM). The daemon runs in-process (serve()); the command is a real /bin/sh, and the client
it starts a real qemu-io. tests/test_captive.py runs the installed commands end to end.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import trio
from core_helpers import MemDevice, wait_until

from usbd.core.cli._captive import Captive, exit_status
from usbd.core.cli._serve import DeviceFailed, serve


def _tool(name: str) -> str:
    """A client program; missing: a skip on a developer's machine, a failure in CI."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the {name!r} program is required in CI but is not installed")
        pytest.skip(f"the {name!r} program is not installed")
    return path


@pytest.mark.parametrize(("returncode", "status"), [(0, 0), (7, 7), (-9, 137), (-15, 143)])
def test_a_command_killed_by_a_signal_is_128_plus_its_number(returncode: int, status: int) -> None:
    assert exit_status(returncode) == status


def test_a_daemon_stopped_before_the_command_ran_exits_1() -> None:
    assert Captive("true").exit_code() == 1


@pytest.mark.parametrize(("mode", "variable"), [("off", None), ("on", "1"), ("require", "2")])
def test_the_environment_holds_nbdkits_variables(
    mode: str, variable: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("tls", "inherited")
    captive = Captive("true", export_name="disk", tls=mode)  # type: ignore[arg-type]
    with captive.private_socket() as listen:
        directory = os.path.dirname(str(listen.path))
        assert os.stat(directory).st_mode & 0o777 == 0o700
        uri = f"nbd+unix:///disk?socket={listen.path}"
        env = captive.environment(uri)
        assert (env["uri"], env["nbd"], env["unixsocket"]) == (uri, uri, listen.path)
        assert (env["exportname"], env["port"]) == ("disk", "")
        assert env.get("tls") == variable
        assert env["PATH"] == os.environ["PATH"]  # the daemon's own environment too
    assert not os.path.exists(directory)


class _FailingDevice(MemDevice):
    """Fails for good (Device.failed) once it has taken a write, as a fenced device does."""

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        super().write(offset, data, fua)
        self.reason = "fenced by another writer"

    def failed(self) -> str | None:
        return getattr(self, "reason", None)


async def test_a_device_failing_under_the_command_terminates_it_and_stops_the_daemon() -> None:
    qemu_io = _tool("qemu-io")
    device = _FailingDevice()
    # The write fails the device; the command then waits, to be ended by the daemon.
    captive = Captive(f'{qemu_io} -f raw -c "write -q -P 0x5a 0 4k" "$uri"; exec sleep 60')
    with trio.fail_after(30):
        with pytest.raises(BaseExceptionGroup) as raised:
            await serve(device, [], captive=captive)
    assert raised.group_contains(DeviceFailed, match="fenced by another writer", depth=None)
    assert captive.status == 128 + signal.SIGTERM
    assert device.closed == 1
    assert device.data[:4096] == b"\x5a" * 4096  # qemu-io's write arrived
    assert device.calls.count("write") == 1


async def test_a_command_that_ignores_sigterm_is_killed_after_the_grace(sockdir: Path) -> None:
    marker = sockdir / "trapped"
    captive = Captive(f"trap '' TERM; : > {marker}; exec sleep 60", grace=0.2)
    device = MemDevice()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve(device, [], captive=captive))
            await wait_until(marker.exists)
            nursery.cancel_scope.cancel()  # the daemon stops, as on a signal
    assert captive.status == 128 + signal.SIGKILL
    assert device.closed == 1
