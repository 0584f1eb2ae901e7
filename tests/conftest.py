"""Fixtures for the cross-package tests: a real ``usbd-ramdisk`` process and real NBD clients.

The server runs as a subprocess exactly as a user would start it (``python -m usbd.ramdisk
--listen ...``), on a unix socket and on 127.0.0.1 port 0; the URI comes from the
"is serving <URI>" line it prints. Teardown stops it with SIGTERM and requires a clean exit
(status 0, "terminated normally", no traceback in its log): a test that left the server
broken fails even when every client call looked fine.

Client tools come from Debian packages. :func:`require_tool` is the one place that decides
what a missing tool means: a skip on a developer's machine, a failure in CI (``CI=true``),
where the point is to prove interoperability.
"""

from __future__ import annotations

import importlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

#: Ceilings, not expectations: generous so that a loaded machine does not fail a test.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
TOOL_TIMEOUT = 120.0

TRANSPORTS = ("unix", "tcp")
EXPORT_NAME = "interop"
DESCRIPTION = "usbd interop tests"
#: Size of the shared servers: small enough to copy quickly, big enough for 32 MiB copies.
SIZE = 64 * 1024 * 1024
#: Where Debian's python3-libnbd installs the ``nbd`` module.
DIST_PACKAGES = "/usr/lib/python3/dist-packages"

# Test modules import helpers that sit next to this file (quickstart.py); under
# --import-mode=importlib (as nox runs the tests) this directory is not on sys.path.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)


def _missing(what: str) -> None:
    """Skip for lack of ``what`` on a developer's machine; fail in CI, where it must exist."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required in CI but is not installed", pytrace=False)
    pytest.skip(f"{what} is not installed")


def require_tool(name: str) -> str:
    """The path of the client program ``name``, or skip/fail the test (see :func:`_missing`)."""
    path = shutil.which(name)
    if path is None:
        _missing(f"the {name!r} program")
    assert path is not None
    return path


def import_libnbd() -> ModuleType:
    """The ``nbd`` module from python3-libnbd, which lives outside any virtualenv.

    Debian's directory is appended, never prepended, and only when a plain import fails, so
    that it cannot shadow what the virtualenv installs.
    """
    try:
        return importlib.import_module("nbd")
    except ImportError:
        if DIST_PACKAGES not in sys.path and os.path.isdir(DIST_PACKAGES):
            sys.path.append(DIST_PACKAGES)
    try:
        return importlib.import_module("nbd")
    except ImportError:
        _missing("python3-libnbd (the 'nbd' module)")
        raise  # unreachable: _missing always raises


def run_tool(
    name: str,
    *args: str,
    timeout: float = TOOL_TIMEOUT,
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client tool with a ceiling; on an unexpected failure show everything it said.

    ``cwd`` is for tools that leave files behind (fio's verify state).
    """
    argv = [require_tool(name), *args]
    proc = subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(argv)} exited with {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}",
            pytrace=False,
        )
    return proc


@dataclass
class UsbdServer:
    """A running ``usbd-ramdisk`` process and what a client needs to reach it."""

    transport: str
    uri: str
    size: int
    export_name: str
    description: str
    read_only: bool
    process: subprocess.Popen[str]
    stderr_path: Path
    stdout_lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None
    socket_path: str | None = None

    @property
    def list_uri(self) -> str:
        """The URI without an export name, for listing exports."""
        return self.uri.replace(f"/{self.export_name}", "/", 1) if self.export_name else self.uri

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        return "".join(self.stdout_lines)

    def stop(self) -> None:
        """SIGTERM, then insist on a clean exit: status 0, "terminated normally", no traceback."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
            pytest.fail(f"usbd-ramdisk ignored SIGTERM\n{self._report()}", pytrace=False)
        if self.reader is not None:
            self.reader.join(timeout=STOP_TIMEOUT)
        assert status == 0, f"usbd-ramdisk exited with {status}\n{self._report()}"
        assert "terminated normally" in self.output(), self._report()
        assert "Traceback" not in self.log(), self._report()

    def _report(self) -> str:
        return f"stdout:\n{self.output()}\nstderr:\n{self.log()}"


def _short_dir() -> Path:
    """A directory for a unix socket: pytest's tmp_path can exceed the 108-byte limit."""
    return Path(tempfile.mkdtemp(prefix="usbd-", dir="/tmp"))


def launch(
    transport: str,
    workdir: Path,
    *,
    size: int = SIZE,
    export_name: str = EXPORT_NAME,
    description: str = DESCRIPTION,
    extra: Sequence[str] = (),
) -> UsbdServer:
    """Start ``python -m usbd.ramdisk`` and wait for the URI it prints."""
    if transport == "unix":
        socket_path: str | None = str(workdir / "usbd.sock")
        listen = socket_path
    elif transport == "tcp":
        socket_path, listen = None, "127.0.0.1:0"
    else:
        raise ValueError(transport)
    argv = [
        sys.executable,
        "-m",
        "usbd.ramdisk",
        "--listen",
        str(listen),
        "--store-size",
        str(size),
        "--export-name",
        export_name,
        "--description",
        description,
        *extra,
    ]
    stderr_path = workdir / "usbd.stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    server = UsbdServer(
        transport=transport,
        uri="",
        size=size,
        export_name=export_name,
        description=description,
        read_only="--read-only" in extra,
        process=process,
        stderr_path=stderr_path,
        socket_path=socket_path,
    )
    uris: queue.Queue[str | None] = queue.Queue()

    def read_stdout() -> None:
        # A thread keeps reading until the process ends, so its stdout pipe never fills.
        assert process.stdout is not None
        with process.stdout:
            for line in process.stdout:
                server.stdout_lines.append(line)
                _, marker, uri = line.partition(" is serving ")
                if marker:
                    uris.put(uri.strip())
        uris.put(None)

    server.reader = threading.Thread(target=read_stdout, daemon=True)
    server.reader.start()
    try:
        uri = uris.get(timeout=START_TIMEOUT)
    except queue.Empty:
        uri = None
    if uri is None:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)
        pytest.fail(f"usbd-ramdisk did not start: {argv}\n{server._report()}", pytrace=False)
    server.uri = uri
    return server


class ServerFactory:
    """Starts servers for one scope and stops (and checks) every one of them at its end."""

    def __init__(self) -> None:
        self._servers: list[UsbdServer] = []
        self._dirs: list[Path] = []

    def __call__(
        self,
        transport: str = "unix",
        *,
        size: int = SIZE,
        export_name: str = EXPORT_NAME,
        description: str = DESCRIPTION,
        read_only: bool = False,
        extra: Sequence[str] = (),
    ) -> UsbdServer:
        """Start one; ``extra`` flags go to the daemon as they are (``--tls require``)."""
        workdir = _short_dir()
        self._dirs.append(workdir)
        server = launch(
            transport,
            workdir,
            size=size,
            export_name=export_name,
            description=description,
            extra=[*(["--read-only"] if read_only else []), *extra],
        )
        self._servers.append(server)
        return server

    def stop_all(self) -> None:
        try:
            for server in self._servers:
                server.stop()
        finally:
            for workdir in self._dirs:
                shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def start_server() -> Iterator[ServerFactory]:
    """Start a server of one's own (size, transport, read-only) for one test."""
    factory = ServerFactory()
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def module_servers() -> Iterator[ServerFactory]:
    factory = ServerFactory()
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="module", params=TRANSPORTS)
def server(request: pytest.FixtureRequest, module_servers: ServerFactory) -> UsbdServer:
    """A 64 MiB ramdisk export named "interop", shared by one module's tests, per transport.

    Sharing it is deliberate: every test's errors and disconnects hit the same process, and
    teardown proves it is still healthy after all of them.
    """
    return module_servers(request.param)


@pytest.fixture(scope="module")
def readonly_server(module_servers: ServerFactory) -> UsbdServer:
    """A 1 MiB ramdisk served with ``--read-only`` on a unix socket."""
    return module_servers("unix", size=1024 * 1024, read_only=True)


@pytest.fixture(scope="session")
def libnbd() -> ModuleType:
    """python3-libnbd's ``nbd`` module (skip or fail per :func:`require_tool`'s rule)."""
    return import_libnbd()


Connect = Callable[..., Any]


@pytest.fixture
def connect(libnbd: ModuleType) -> Iterator[Connect]:
    """``connect(uri, structured=True, meta=True, strict=None, ...)`` -> an nbd handle.

    ``meta`` asks for base:allocation; ``strict`` (libnbd's STRICT_* bits) is applied after
    connecting, so 0 sends requests libnbd would refuse on to the server; with ``opt_mode``
    the handle stops in negotiation. Handles are shut down (NBD_CMD_DISC) at teardown; a
    handle a test already killed is simply dropped.
    """
    handles: list[Any] = []

    def _connect(
        uri: str,
        *,
        structured: bool = True,
        meta: bool = True,
        strict: int | None = None,
        full_info: bool = False,
        opt_mode: bool = False,
    ) -> Any:
        h = libnbd.NBD()
        handles.append(h)
        h.set_opt_mode(opt_mode)
        h.set_request_structured_replies(structured)
        if meta:
            h.add_meta_context(libnbd.CONTEXT_BASE_ALLOCATION)
        if full_info:
            h.set_full_info(True)
        h.connect_uri(uri)
        if strict is not None:
            h.set_strict_mode(strict)
        return h

    try:
        yield _connect
    finally:
        for h in handles:
            if h.aio_is_ready():
                h.shutdown()
        handles.clear()


@pytest.fixture
def require() -> Callable[[str], str]:
    """:func:`require_tool`, for test modules that cannot import this file: with the packages'
    tests in the same run (``nox -s slow``), ``conftest`` names another directory's."""
    return require_tool


@pytest.fixture
def tools() -> Callable[..., subprocess.CompletedProcess[str]]:
    """:func:`run_tool`: run a Debian client tool with a timeout, skipping if it is missing."""
    return run_tool


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory: the socket's path must stay under the 108-byte limit."""
    path = Path(tempfile.mkdtemp(prefix="usbd-doc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
