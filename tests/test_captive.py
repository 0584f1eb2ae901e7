"""Captive mode (``--run 'COMMAND'``) as a user runs it: real daemons under real NBD clients.

Each case starts the installed console script with ``--run`` and lets the command (nbdinfo,
qemu-img, nbdcopy, or a shell snippet) talk to the daemon through ``$uri``; the daemon must stop
by itself when the command exits, with the command's status. An image written through one
usbd-filedisk daemon is read back through a second one, which proves the first flushed and
closed its device on the way out.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from usbd.core.testing.certs import make_certificates

# The client tools come through conftest's ``tools`` fixture (a missing one skips on a
# developer's machine and fails in CI), not ``from conftest import``: with the packages'
# tests in the same run (nox -s slow), that name is another directory's conftest.
Tools = Callable[..., subprocess.CompletedProcess[str]]

#: Ceilings, not expectations: generous so that a loaded machine does not fail a test.
RUN_TIMEOUT = 120.0
MiB = 1 << 20
SIZE = 16 * MiB

SERVING = re.compile(r" is serving (nbds?\+unix:///\S*\?socket=(\S+))$", re.MULTILINE)


def script(prog: str) -> str:
    """The console script installed next to this interpreter (the dev venv, or nox's)."""
    return str(Path(sys.executable).with_name(prog))


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without any ``USBD_*`` setting or systemd socket, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith("USBD_") and key != "NOTIFY_SOCKET"
    }
    env.update(extra or {})
    return env


def captive(
    prog: str,
    command: str,
    *args: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``prog --run COMMAND ARGS`` to its end (the command's stdout is the daemon's)."""
    return subprocess.run(
        [script(prog), "--run", command, *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=dict(env) if env is not None else clean_env(),
        check=False,
    )


def report(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{result.args} exited with {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def private_socket(result: subprocess.CompletedProcess[str]) -> str:
    """The private socket from the (last) "is serving" line: --run's is served last."""
    found = SERVING.findall(result.stdout)
    assert found, report(result)
    return str(found[-1][1])


def stopped_cleanly(result: subprocess.CompletedProcess[str], prog: str, status: int) -> None:
    """The command's status, the daemon's clean stop, and its private directory gone."""
    assert result.returncode == status, report(result)
    assert f"{prog} terminated normally." in result.stdout.splitlines(), report(result)
    assert "Traceback" not in result.stderr, report(result)
    assert not os.path.exists(os.path.dirname(private_socket(result))), report(result)


def values(output: str) -> dict[str, str]:
    """``name=value`` lines the command printed."""
    return dict(line.split("=", 1) for line in output.splitlines() if re.match(r"^\w+=", line))


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (pytest's tmp_path can exceed the 108-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="usbd-", dir="/tmp"))
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@pytest.mark.parametrize("prog", ["usbd-ramdisk", "usbdsrvd"])
def test_nbdinfo_reads_the_size_through_the_private_socket(
    prog: str, tmp_path: Path, tools: Tools
) -> None:
    tools("nbdinfo", "--version")
    result = captive(prog, 'nbdinfo --json "$uri"', "--store-size", "16MiB", cwd=tmp_path)
    stopped_cleanly(result, prog, 0)
    lines = result.stdout.splitlines()
    document = "\n".join(lines[lines.index("{") : lines.index("}") + 1])
    (export,) = json.loads(document)["exports"]
    assert export["export-size"] == SIZE, report(result)
    assert export["uri"] == f"nbd+unix:///?socket={private_socket(result)}", report(result)
    # Run as root with no --listen, a daemon would take /dev/nbdX; under --run it does not.
    assert "to the --run command using driver" in result.stdout, report(result)
    assert "NBD device" not in result.stdout, report(result)
    assert "is processing requests" not in result.stdout, report(result)


def test_the_command_gets_nbdkits_variables_and_any_listen_is_served_too(
    tmp_path: Path, sockdir: Path, tools: Tools
) -> None:
    tools("nbdinfo", "--version")
    extra = sockdir / "extra.sock"
    command = (
        'printf "%s\\n" "uri=$uri" "nbd=$nbd" "unixsocket=$unixsocket" '
        '"exportname=$exportname" "port=${port-unset}" "tls=${tls-unset}"; '
        'stat -c "mode=%a" "$(dirname "$unixsocket")"; '
        "sh -c 'echo child=$uri'; "  # exported, not only the shell's own variables
        'echo "size=$(nbdinfo --size "$uri")"; '
        f'echo "listen_size=$(nbdinfo --size "nbd+unix:///disk1?socket={extra}")"'
    )
    result = captive(
        "usbd-ramdisk",
        command,
        "--store-size",
        "16MiB",
        "--export-name",
        "disk1",
        "--listen",
        str(extra),
        cwd=tmp_path,
        env=clean_env({"tls": "stale", "port": "10809"}),
    )
    stopped_cleanly(result, "usbd-ramdisk", 0)
    seen = values(result.stdout)
    socket_path = private_socket(result)
    assert seen["unixsocket"] == socket_path, report(result)
    assert seen["uri"] == f"nbd+unix:///disk1?socket={socket_path}", report(result)
    assert seen["nbd"] == seen["uri"] == seen["child"], report(result)
    assert seen["exportname"] == "disk1", report(result)
    assert seen["port"] == "", report(result)
    assert seen["tls"] == "unset", report(result)
    assert seen["mode"] == "700", report(result)
    assert seen["size"] == seen["listen_size"] == str(SIZE), report(result)
    assert not extra.exists(), report(result)


def test_with_tls_required_the_uri_is_nbds_and_tls_is_2(tmp_path: Path, tools: Tools) -> None:
    tools("nbdinfo", "--version")
    certs = make_certificates(tmp_path / "certs")
    command = (
        'echo "uri=$uri"; echo "tls=$tls"; '
        f'echo "size=$(nbdinfo --size "$uri&tls-certificates={certs.client}")"'
    )
    result = captive(
        "usbd-ramdisk",
        command,
        "--store-size",
        "16MiB",
        "--tls=require",
        "--tls-certificates",
        str(certs.server),
        cwd=tmp_path,
    )
    stopped_cleanly(result, "usbd-ramdisk", 0)
    seen = values(result.stdout)
    assert seen["uri"] == f"nbds+unix:///?socket={private_socket(result)}", report(result)
    assert seen["tls"] == "2", report(result)
    assert seen["size"] == str(SIZE), report(result)


@pytest.mark.parametrize(
    ("prog", "command", "status"),
    [
        ("usbd-ramdisk", "exit 7", 7),
        ("usbdsrvd", "exit 7", 7),
        ("usbd-ramdisk", "kill -KILL $$", 128 + signal.SIGKILL),
        ("usbd-ramdisk", "true", 0),
    ],
    ids=["exit-7", "usbdsrvd-exit-7", "killed", "true"],
)
def test_the_daemon_exits_with_the_commands_status(
    prog: str, command: str, status: int, tmp_path: Path
) -> None:
    result = captive(prog, command, "--store-size", "1MiB", cwd=tmp_path)
    stopped_cleanly(result, prog, status)


def test_an_image_written_by_qemu_img_is_read_back_by_nbdcopy_from_a_new_daemon(
    tmp_path: Path, tools: Tools
) -> None:
    """Two usbd-filedisk runs on one store: the first daemon's writes are in the file once it
    exited (flushed and closed), and the second serves them to nbdcopy."""
    tools("nbdcopy", "--version")
    source, expected = tmp_path / "source.qcow2", tmp_path / "expected.raw"
    tools("qemu-img", "create", "-q", "-f", "qcow2", str(source), "8M")
    tools(
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -q -P 0x5a 0 1M",
        "-c",
        "write -q -P 0xa5 5M 512k",
        str(source),
    )
    tools("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(source), str(expected))
    store = tmp_path / "store"
    store.mkdir()
    disk = ["--store-dir", str(store), "--store-size", "8MiB"]

    written = captive(
        "usbd-filedisk",
        f'qemu-img convert -n -f qcow2 -O raw {source} "$uri"',
        *disk,
        cwd=tmp_path,
    )
    stopped_cleanly(written, "usbd-filedisk", 0)
    assert (store / "test-lun.bin").read_bytes() == expected.read_bytes(), report(written)

    copy = tmp_path / "copy.raw"
    read = captive("usbd-filedisk", f'nbdcopy "$uri" {copy}', *disk, cwd=tmp_path)
    stopped_cleanly(read, "usbd-filedisk", 0)
    assert copy.read_bytes() == expected.read_bytes(), report(read)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_daemon_reaches_the_command(signum: int, tmp_path: Path) -> None:
    """The daemon passes the signal on, stops as usual and exits with the command's status
    (the trap's 3 or 4: proof that the command got it, not only a SIGKILL)."""
    command = (
        "trap 'echo got=TERM; exit 3' TERM; trap 'echo got=INT; exit 4' INT; "
        "echo ready=yes; while :; do sleep 0.1; done"
    )
    daemon = subprocess.Popen(
        [script("usbd-ramdisk"), "--store-size", "1MiB", "--run", command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
    )
    try:
        assert daemon.stdout is not None
        seen = []
        for line in daemon.stdout:
            seen.append(line)
            if line == "ready=yes\n":
                break
        daemon.send_signal(signum)
        out, err = daemon.communicate(timeout=RUN_TIMEOUT)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    result = subprocess.CompletedProcess(daemon.args, daemon.returncode, "".join(seen) + out, err)
    name = signal.Signals(signum).name
    stopped_cleanly(result, "usbd-ramdisk", 3 if signum == signal.SIGTERM else 4)
    assert values(result.stdout)["got"] == name.removeprefix("SIG"), report(result)
    assert f"usbd-ramdisk received {name}: stopping" in result.stderr, report(result)


@pytest.mark.parametrize("source", ["flag", "environment", "file"])
def test_an_empty_command_is_one_line_naming_run(source: str, tmp_path: Path) -> None:
    args, env = [script("usbd-ramdisk")], clean_env()
    if source == "flag":
        args += ["--run", ""]
    elif source == "environment":
        env["USBD_RUN"] = " "
    else:
        config = tmp_path / "settings.toml"
        config.write_text('run = ""\n')
        args += ["--config", str(config)]
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert result.returncode == 2, report(result)
    assert result.stdout == "", report(result)
    (line,) = result.stderr.splitlines()
    assert line.startswith("usbd-ramdisk: error: -run"), report(result)
    assert "an empty command: expected a shell command" in line, report(result)


def test_an_export_name_and_a_tmpdir_needing_percent_encoding_make_a_uri_libnbd_takes(
    tmp_path: Path, tools: Tools
) -> None:
    """$uri is percent-encoded, as nbdkit's: a space or ? in the export name or the socket's
    directory made a URI libnbd refused."""
    tools("nbdinfo", "--version")
    odd = tmp_path / "a dir?x"
    odd.mkdir()
    result = captive(
        "usbd-ramdisk",
        'nbdinfo --size "$uri" && echo "uri=$uri"',
        "--store-size",
        "16MiB",
        "--export-name",
        "vol 1?x",
        cwd=tmp_path,
        env=clean_env({"TMPDIR": str(odd)}),
    )
    stopped_cleanly(result, "usbd-ramdisk", 0)
    assert str(SIZE) in result.stdout.splitlines(), report(result)
    uri = values(result.stdout)["uri"]
    assert uri.startswith("nbd+unix:///vol%201%3Fx?socket="), report(result)
    assert "a%20dir%3Fx/" in uri, report(result)
