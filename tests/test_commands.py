"""The installed commands ``usbd-ramdisk`` and ``usbdsrvd`` as a user runs them.

Every case starts the real console script (next to this interpreter, as pip or nox installed
it) in a subprocess with a clean ``USBD_*``-free environment: bad input of every kind and
source, help, precedence of flags over environment over config file, a clean stop on SIGTERM
and SIGINT, systemd notification, and usbdsrvd's discovery of drivers through the entry points
of distributions installed for real (``*.dist-info`` directories on ``PYTHONPATH``, which is
what pip produces; nothing is mocked). Daemons serve on a unix socket and are checked with
nbdinfo (Debian's libnbd-bin).

The short-lived runs of the bad-input table are started all at once (they are independent),
so that the table costs about one interpreter start-up per core rather than one per case.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest

PROGS = ("usbd-ramdisk", "usbdsrvd")
#: Variations on a theme the commands share are checked on one of them.
SRVD = ("usbdsrvd",)
#: Ceilings, not expectations: generous so that a loaded machine does not fail a test.
RUN_TIMEOUT = 60.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
MiB = 1 << 20

Run = Callable[..., subprocess.CompletedProcess[str]]


# -- running the commands ----------------------------------------------------------------


def script(prog: str) -> str:
    """The console script installed next to this interpreter (the dev venv, or nox's)."""
    return str(Path(sys.executable).with_name(prog))


def clean_env(
    extra: Mapping[str, str] | None = None, pythonpath: Path | None = None
) -> dict[str, str]:
    """This environment without any ``USBD_*`` setting or systemd socket, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith("USBD_") and key not in ("NOTIFY_SOCKET", "UNSET_VAR")
    }
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            part for part in (str(pythonpath), os.environ.get("PYTHONPATH")) if part
        )
    env.update(extra or {})
    return env


def run_command(
    prog: str, *args: str, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [script(prog), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=dict(env) if env is not None else clean_env(),
        check=False,
    )


def report(result: subprocess.CompletedProcess[str]) -> str:
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return f"{result.args} exited with {result.returncode}\n{output}"


def usage_error(result: subprocess.CompletedProcess[str], prog: str) -> str:
    """The one error line of a refused start (exit status 2), without the ``PROG: error:``."""
    assert result.returncode == 2, report(result)
    assert result.stdout == "", report(result)
    assert "Traceback" not in result.stderr, report(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, report(result)
    prefix = f"{prog}: error: "
    assert lines[0].startswith(prefix), report(result)
    return lines[0].removeprefix(prefix)


class Daemon:
    """A command started in the background, its stdout read line by line as it comes."""

    def __init__(
        self,
        prog: str,
        args: Sequence[str],
        *,
        workdir: Path,
        env: Mapping[str, str],
        on_line: Callable[[Daemon, str], None] | None = None,
    ) -> None:
        self.prog = prog
        self._on_line = on_line
        self.stderr_path = workdir / f"{prog}-{secrets.token_hex(4)}.stderr"
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [script(prog), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=workdir,
                env=dict(env),
            )
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # Reading until the end keeps the pipe from filling up, whatever the test does.
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                if self._on_line is not None:
                    self._on_line(self, line)
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def report(self) -> str:
        output = f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        return f"{self.prog} (status {self.process.poll()})\n{output}"

    def wait_line(self, marker: str) -> str | None:
        """The first stdout line containing ``marker``; None once stdout ends without one."""

        def first() -> str | None:
            return next((line for line in self.lines if marker in line), None)

        with self._changed:
            self._changed.wait_for(lambda: first() is not None or self._eof, START_TIMEOUT)
            line, ended = first(), self._eof
        if line is None and not ended:
            self.kill()
            pytest.fail(f"no {marker!r} line in time\n{self.report()}", pytrace=False)
        return line

    def wait_serving(self) -> str:
        """The URI from the "PROG is serving URI" line."""
        line = self.wait_line(f"{self.prog} is serving ")
        if line is None:
            self.wait()
            pytest.fail(f"{self.prog} did not start serving\n{self.report()}", pytrace=False)
        return line.partition(" is serving ")[2].strip()

    def wait(self) -> int:
        try:
            status = self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.prog} did not exit\n{self.report()}", pytrace=False)
        self._reader.join(timeout=STOP_TIMEOUT)
        return status

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return self.wait()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)


Start = Callable[..., Daemon]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (pytest's tmp_path can exceed the 108-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="usbd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start(sockdir: Path) -> Iterator[Start]:
    """``start(prog, *args, env=..., on_line=...)``: a :class:`Daemon` in ``sockdir``, killed
    at teardown if the test left it running."""
    daemons: list[Daemon] = []

    def _start(
        prog: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        on_line: Callable[[Daemon, str], None] | None = None,
    ) -> Daemon:
        env = env if env is not None else clean_env()
        daemon = Daemon(prog, args, workdir=sockdir, env=env, on_line=on_line)
        daemons.append(daemon)
        return daemon

    try:
        yield _start
    finally:
        for daemon in daemons:
            daemon.kill()


def nbd_size(tools: Run, uri: str) -> int:
    return int(tools("nbdinfo", "--size", uri).stdout)


def serve_and_measure(tools: Run, daemon: Daemon) -> int:
    """The size a client sees, after which the daemon must stop cleanly on SIGTERM."""
    size = nbd_size(tools, daemon.wait_serving())
    assert daemon.stop() == 0, daemon.report()
    assert daemon.lines[-1] == f"{daemon.prog} terminated normally.", daemon.report()
    return size


# -- 1. bad input: one line, exit status 2 -----------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One refused invocation. ``{dir}`` and ``{config}`` in args, env and the expected text
    stand for the case's directory and its config file (written from ``config``)."""

    id: str
    args: tuple[str, ...]
    error: str
    accepted: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    config: str | None = None
    progs: tuple[str, ...] = PROGS


SIZE_UNITS = ("512, 4KiB, 100 MiB, 1.5GiB or 2TB", "MiB", "GiB")

OBJSTORE = ("usbd-objstore",)
#: usbd-objstore's own refusals (the values the original accepted and this one does not).
OBJSTORE_BAD = [
    Bad(
        "aes-ctr",
        ("-objstore-aesmode=aes-ctr",),
        "-objstore-aesmode: aes-ctr is refused: it does not authenticate",
        ("use aes-gcm",),
        progs=OBJSTORE,
    ),
    Bad(
        "s2",
        ("-objstore-compress=s2",),
        "-objstore-compress: s2 is not",
        ("use zstd",),
        progs=OBJSTORE,
    ),
    Bad(
        "kind-b2",
        ("-objstore-kind=b2",),
        "-objstore-kind: kind 'b2' is not available yet",
        ("s3", "local"),
        progs=OBJSTORE,
    ),
    Bad(
        "objsize",
        ("-objstore-objsize=3KiB",),
        "-objstore-objsize: invalid object size 3.0 KiB",
        ("a multiple of 4 KiB",),
        progs=OBJSTORE,
    ),
    Bad(
        "flushevery",
        ("-objstore-flushevery=soon",),
        "-objstore-flushevery: invalid duration 'soon'",
        ("10s", "500ms"),
        progs=OBJSTORE,
    ),
    Bad(
        "cfg-not-json",
        ("-objstore-cfg={not json, secret_key: hunter2",),
        "-objstore-cfg: not valid JSON",
        progs=OBJSTORE,
    ),
    Bad(
        "cfg-unknown-key",
        ('-objstore-cfg={"bukket": "b", "secret_key": "hunter2"}',),
        "-objstore-cfg: unknown key(s) bukket for kind s3",
        ("endpoint", "secret_key"),
        progs=OBJSTORE,
    ),
    Bad(
        "diskcache-too-small",
        ("-objstore-kind=local", "-store-dir={dir}", "-objstore-diskcache=1MiB"),
        "-objstore-diskcache: 1.0 MiB holds fewer than 4 objects of 1.0 MiB",
        ("give at least 4.0 MiB",),
        progs=OBJSTORE,
    ),
]

DEDUP = ("usbd-dedup", "usbdsrvd")
#: usbd-dedup's refusals, from its own command and from usbdsrvd (which reads every installed
#: driver's options).
DEDUP_BAD = [
    Bad(
        "dedup-blocksize-not-power",
        ("-dedup-blocksize=3000",),
        "-dedup-blocksize: invalid block size 2.9 KiB",
        ("a power of two from 512 B to 64 KiB",),
        progs=DEDUP,
    ),
    Bad(
        "dedup-blocksize-too-big",
        ("--dedup-blocksize", "128KiB"),
        "-dedup-blocksize: invalid block size 128 KiB",
        ("a power of two from 512 B to 64 KiB",),
        progs=DEDUP,
    ),
    Bad(
        "dedup-compress",
        ("-dedup-compress=lz4",),
        "-dedup-compress: invalid compression 'lz4'",
        ("zstd or identity",),
        progs=DEDUP,
    ),
    Bad(
        "dedup-memcache",
        ("-dedup-memcache=lots",),
        "-dedup-memcache: invalid size 'lots'",
        SIZE_UNITS,
        progs=DEDUP,
    ),
    Bad(
        "dedup-verify",
        ("-dedup-verify=maybe",),
        "-dedup-verify: invalid value 'maybe'",
        ("true or false",),
        progs=DEDUP,
    ),
    Bad(
        "action-not-offered",
        ("--check",),
        "-check: not offered by driver mem",
        ("it has: none",),
        progs=("usbdsrvd",),
    ),
]

BAD_INPUTS = [
    Bad("unknown-flag", ("-store-sise=1MiB",), "unknown flag -store-sise", ("-store-size",)),
    Bad("unknown-gnu-flag", ("--bogus", "1"), "unknown flag -bogus", ("see -help",), progs=SRVD),
    Bad("bad-size", ("-store-size=huge",), "-store-size: invalid size 'huge'", SIZE_UNITS),
    Bad(
        "bad-size-gnu",
        ("--store-size", "12 parsecs"),
        "-store-size: invalid size",
        SIZE_UNITS,
        progs=SRVD,
    ),
    Bad("missing-value", ("-store-size",), "-store-size: a value is needed", ("SIZE",), progs=SRVD),
    Bad(
        "bad-count",
        ("-nbd-max-devs=0",),
        "-nbd-max-devs: invalid value 0",
        ("a whole number >= 1",),
    ),
    Bad(
        "bad-count-word",
        ("-connections", "two"),
        "-connections: invalid value 'two'",
        ("a whole number >= 1",),
        progs=SRVD,
    ),
    # A value that starts with a dash is the flag's value, not another flag.
    Bad(
        "bad-seconds",
        ("-timeout", "-1"),
        "-timeout: invalid value '-1'",
        ("0 or more",),
        progs=SRVD,
    ),
    Bad("bad-bool", ("-read-only=maybe",), "-read-only: invalid value 'maybe'", ("true or false",)),
    Bad(
        "bad-attach",
        ("-attach=sometimes",),
        "-attach: invalid value 'sometimes'",
        ("'auto', 'netlink', 'ioctl' or 'none'",),
    ),
    Bad(
        "attach-none-alone",
        ("-attach=none",),
        "-attach: 'none' needs -listen",
        ("HOST:PORT",),
        progs=SRVD,
    ),
    Bad(
        "bad-listen",
        ("-listen=nowhere",),
        "-listen: invalid listen address 'nowhere'",
        ("HOST:PORT", "unix socket path"),
    ),
    Bad(
        "bad-listen-port",
        ("--listen", "127.0.0.1:70000"),
        "-listen: invalid listen address '127.0.0.1:70000'",
        ("HOST:PORT",),
        progs=SRVD,
    ),
    Bad(
        "bad-device",
        ("/dev/sda",),
        "NBD_DEVICE: invalid NBD device '/dev/sda'",
        ("/dev/nbdN",),
    ),
    Bad(
        "device-with-attach-none",
        ("-attach=none", "/dev/nbd0"),
        "NBD_DEVICE: not allowed with -attach=none",
        progs=SRVD,
    ),
    Bad(
        "missing-store-dir",
        ("-store-dir={dir}/missing",),
        "-store-dir: directory '{dir}/missing' does not exist",
        ("expected an existing directory",),
    ),
    Bad(
        "unknown-dev-type",
        ("-dev-type=floppy",),
        "-dev-type: unknown device type 'floppy'",
        ("installed types are ", "mem"),
        progs=("usbdsrvd",),
    ),
    Bad("dev-type-is-usbdsrvds", ("-dev-type=mem",), "unknown flag -dev-type", progs=PROGS[:1]),
    Bad(
        "size-from-env",
        (),
        "-store-size (from USBD_STORE_SIZE): invalid size 'huge'",
        SIZE_UNITS,
        env={"USBD_STORE_SIZE": "huge"},
    ),
    Bad(
        "bool-from-env",
        (),
        "-read-only (from USBD_READ_ONLY): invalid value 'maybe'",
        ("true or false",),
        env={"USBD_READ_ONLY": "maybe"},
        progs=SRVD,
    ),
    Bad(
        "size-from-config",
        ("--config", "{config}"),
        "-store-size (from 'store-size' in {config}): invalid size 'huge'",
        SIZE_UNITS,
        config='store-size = "huge"\n',
    ),
    Bad(
        "count-from-config",
        ("-config={config}",),
        "-nbd-max-devs (from 'nbd_max_devs' in {config}): invalid value",
        ("a whole number >= 1",),
        config="nbd_max_devs = true\n",
        progs=SRVD,
    ),
    Bad(
        "unknown-key-in-config",
        ("--config", "{config}"),
        "-config: unknown setting 'store-sise' in {config}",
        ("keys are the flag names", "did you mean 'store-size'?"),
        config='store-sise = "1MiB"\n',
    ),
    Bad(
        "config-not-toml",
        ("--config", "{config}"),
        "-config: '{config}' is not valid TOML",
        config="store-size 5MiB\n",
        progs=SRVD,
    ),
    Bad(
        "missing-config",
        ("--config", "{dir}/missing.toml"),
        "-config: '{dir}/missing.toml' is not a file",
        ("expected a TOML settings file",),
    ),
    Bad(
        "missing-config-from-env",
        (),
        "-config (from USBD_CONFIG): '{dir}/missing.toml' is not a file",
        ("expected a TOML settings file",),
        env={"USBD_CONFIG": "{dir}/missing.toml"},
        progs=SRVD,
    ),
    Bad(
        "metrics-unix-path",
        ("-metrics=/tmp/metrics.sock",),
        "-metrics: invalid metrics address '/tmp/metrics.sock'",
        ("expected HOST:PORT (TCP",),
    ),
    Bad(
        "metrics-bad-port",
        ("--metrics", "127.0.0.1:99999"),
        "-metrics: invalid metrics address '127.0.0.1:99999'",
        ("port 0 to 65535",),
        progs=SRVD,
    ),
    *OBJSTORE_BAD,
    *DEDUP_BAD,
]


@dataclass(frozen=True)
class Outcome:
    result: subprocess.CompletedProcess[str]
    fill: Callable[[str], str]


@pytest.fixture(scope="module")
def bad_input_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every row of the table for every command it applies to, run concurrently."""
    root = tmp_path_factory.mktemp("bad-input")
    futures: dict[str, Future[subprocess.CompletedProcess[str]]] = {}
    fills: dict[str, Callable[[str], str]] = {}
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        for case in BAD_INPUTS:
            workdir = root / case.id
            workdir.mkdir()
            config = workdir / "settings.toml"
            if case.config is not None:
                config.write_text(case.config)

            def fill(text: str, workdir: Path = workdir, config: Path = config) -> str:
                return text.replace("{dir}", str(workdir)).replace("{config}", str(config))

            args = [fill(arg) for arg in case.args]
            env = clean_env({name: fill(value) for name, value in case.env.items()})
            for prog in case.progs:
                key = f"{prog}-{case.id}"
                futures[key] = pool.submit(run_command, prog, *args, cwd=root, env=env)
                fills[key] = fill
        return {key: Outcome(future.result(), fills[key]) for key, future in futures.items()}


@pytest.mark.parametrize(
    ("prog", "case"),
    [(prog, case) for case in BAD_INPUTS for prog in case.progs],
    ids=[f"{prog}-{case.id}" for case in BAD_INPUTS for prog in case.progs],
)
def test_bad_input_is_one_line_naming_the_flag_and_what_is_accepted(
    prog: str, case: Bad, bad_input_outcomes: dict[str, Outcome]
) -> None:
    outcome = bad_input_outcomes[f"{prog}-{case.id}"]
    line = usage_error(outcome.result, prog)
    assert line.startswith(outcome.fill(case.error)), report(outcome.result)
    for accepted in case.accepted:
        assert accepted in line, report(outcome.result)


# -- 2. help -------------------------------------------------------------------------------

GROUP_TITLES = (
    "general:",
    "storage (the original's -store-* flags):",
    "serving NBD clients:",
    "kernel device (/dev/nbdX):",
)
#: The original's device types other than the ramdisk, and the distributions providing them.
OTHER_TYPES = {"file": "usbd-filedisk", "dedup": "usbd-dedup", "objstore": "usbd-objstore"}


def installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def help_text(
    prog: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    spellings: Sequence[str] = ("--help",),
) -> str:
    """What ``--help`` prints, checked to be exactly what the other ``spellings`` print."""
    with ThreadPoolExecutor(max_workers=len(spellings)) as pool:
        results = list(pool.map(lambda f: run_command(prog, f, cwd=cwd, env=env), spellings))
    for result in results:
        assert result.returncode == 0, report(result)
        assert result.stderr == "", report(result)
        assert result.stdout == results[0].stdout, report(result)
    return results[0].stdout


def flat(text: str) -> str:
    """``text`` with every run of whitespace as one space: help wraps to the terminal width."""
    return " ".join(text.split())


def section(text: str, title: str) -> str:
    """One help group, from its title to the next blank line, flattened."""
    start = text.index(f"\n{title}\n") + 1
    end = text.find("\n\n", start)
    return flat(text[start : end if end >= 0 else len(text)])


@pytest.mark.parametrize("prog", PROGS)
def test_help_shows_the_groups_in_order(prog: str, tmp_path: Path) -> None:
    text = help_text(prog, tmp_path, spellings=("--help", "-help", "-h"))
    assert text.startswith(f"usage: {prog} ")
    driver = (
        "mem driver options:" if prog == "usbd-ramdisk" else "mem driver (-dev-type=mem|memory):"
    )
    positions = [text.index(f"\n{title}\n") for title in (*GROUP_TITLES, driver)]
    assert positions == sorted(positions), text
    assert "A memory-backed block device" in section(text, driver)
    assert "--store-size SIZE" in section(text, GROUP_TITLES[1])
    assert "--listen ADDR" in section(text, GROUP_TITLES[2])
    assert "--attach auto|netlink|ioctl|none" in section(text, GROUP_TITLES[3])
    assert "NBD_DEVICE" in text
    assert ("--dev-type" in text) == (prog == "usbdsrvd")


def test_usbdsrvd_help_lists_dev_type_and_the_drivers(tmp_path: Path) -> None:
    text = help_text("usbdsrvd", tmp_path)
    general = section(text, "general:")
    assert "--dev-type TYPE" in general
    for name in ("'mem'", "'file'", "'dedup'", "'objstore'", "memory", "osbd", "(default mem)"):
        assert name in general, general
    drivers = text[text.index("\ninstalled drivers") :]
    assert "\n  mem (also memory): from usbd-ramdisk\n" in drivers, drivers
    expected = [f"{name} ({pkg})" for name, pkg in OTHER_TYPES.items() if not installed(pkg)]
    if expected:
        (line,) = [line for line in drivers.splitlines() if line.startswith("not installed: ")]
        for item in expected:
            assert item in line, line


# -- 3. drivers discovered from real installed distributions -----------------------------

TOY_DRIVER = '''
"""A third-party driver: a small in-memory disk that needs an AES key."""

from pydantic import BaseModel, ConfigDict, Field

from usbd.core import Device, KeySourceError, load_key
from usbd.core.cli import OptionError
from usbd.core.driver import Driver
from usbd.core.settings import AesKeySpec, Size


class ToyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    size: Size = Field(1 << 20, description="how big the toy disk is")
    aeskey: AesKeySpec = Field(None, description="where the toy's AES key comes from")


class ToyDisk(Device):
    blocking = False

    def __init__(self, size, key):
        self.size = size
        self.key = key
        self.data = bytearray(size)

    def read(self, offset, length):
        return bytes(self.data[offset : offset + length])

    def write(self, offset, data, fua):
        self.data[offset : offset + len(data)] = data


def create(settings, options):
    try:
        key = load_key(options.aeskey, settings.store_dir)
    except KeySourceError as exc:
        raise OptionError("toy-aeskey", str(exc)) from None
    return ToyDisk(options.size, key)


driver = Driver(
    name="toy",
    description="A toy disk kept in memory, for testing driver discovery.",
    options=ToyOptions,
    create=create,
)
'''

BROKEN_DRIVER = """
raise ImportError("needs libbroken, which is not installed")
"""

MEM_CLONE_DRIVER = '''
"""Another distribution's driver that also calls itself mem."""

from usbd.core import Device
from usbd.core.driver import Driver, NoOptions


class Zeros(Device):
    blocking = False

    def __init__(self, size):
        self.size = size

    def read(self, offset, length):
        return bytes(length)


driver = Driver(
    name="mem",
    description="zeros",
    options=NoOptions,
    create=lambda settings, options: Zeros(settings.store_size),
)
'''


def install_fake(root: Path, distribution: str, module: str, source: str, names: list[str]) -> Path:
    """A distribution as pip leaves it in site-packages: ``NAME-VERSION.dist-info`` with
    METADATA and entry_points.txt, and its module beside it. Returns ``root``."""
    info = root / f"{distribution.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
    points = "".join(f"{name} = {module}:driver\n" for name in names)
    (info / "entry_points.txt").write_text(f"[usbd.drivers]\n{points}")
    (info / "INSTALLER").write_text("pip\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    return root


@pytest.fixture
def toy_env(tmp_path: Path) -> dict[str, str]:
    site = install_fake(tmp_path / "site", "usbd-toy", "usbd_toy_driver", TOY_DRIVER, ["toy"])
    return clean_env(pythonpath=site)


@pytest.fixture
def broken_env(tmp_path: Path) -> dict[str, str]:
    site = install_fake(tmp_path / "site", "usbd-broken", "usbd_broken", BROKEN_DRIVER, ["broken"])
    return clean_env(pythonpath=site)


@pytest.fixture
def clone_env(tmp_path: Path) -> dict[str, str]:
    site = install_fake(tmp_path / "site", "usbd-mem-clone", "mem_clone", MEM_CLONE_DRIVER, ["mem"])
    return clean_env(pythonpath=site)


def absent(secret: str, *texts: str) -> bool:
    """Neither the secret nor any 16-character piece of it, in either case, is in ``texts``."""
    pieces = {secret[i : i + 16].lower() for i in range(0, len(secret) - 15, 8)}
    return not any(piece in text.lower() for piece in pieces for text in texts)


def test_a_third_party_driver_is_served_and_its_key_never_shown(
    start: Start, sockdir: Path, toy_env: dict[str, str], tools: Run
) -> None:
    key = secrets.token_hex(32)
    daemon = start(
        "usbdsrvd",
        "-dev-type=toy",
        "-toy-size=3MiB",
        f"-toy-aeskey=key:{key.upper()}",
        "-log-level=debug",  # debug logs are where a secret would most likely slip out
        "--listen",
        str(sockdir / "toy.sock"),
        env=toy_env,
    )
    assert serve_and_measure(tools, daemon) == 3 * MiB
    startup = daemon.wait_line("usbdsrvd using config: ")
    assert startup is not None
    assert startup.endswith("using driver toy, size=3.0 MiB, aeskey=<REDACTED>"), startup
    assert absent(key, daemon.stdout, daemon.stderr), daemon.report()


def test_a_third_party_drivers_options_are_in_the_help(
    tmp_path: Path, toy_env: dict[str, str]
) -> None:
    text = help_text("usbdsrvd", tmp_path, toy_env)
    heading = text.index("\ntoy driver (-dev-type=toy)")
    toy = flat(text[heading : text.index("\ninstalled drivers")])
    assert "A toy disk kept in memory" in toy
    assert "--toy-size SIZE" in toy
    assert "(default 1.0 MiB)" in toy
    assert "--toy-aeskey SOURCE" in toy
    assert "\n  toy: from usbd-toy\n" in text
    assert "\n  mem (also memory): from usbd-ramdisk\n" in text


def test_without_a_key_the_toy_generates_one_in_the_store_dir(
    start: Start, sockdir: Path, toy_env: dict[str, str], tools: Run
) -> None:
    store = sockdir / "store"
    store.mkdir()
    daemon = start(
        "usbdsrvd",
        "-dev-type=toy",
        f"-store-dir={store}",
        "--listen",
        str(sockdir / "toy.sock"),
        env=toy_env,
    )
    assert serve_and_measure(tools, daemon) == MiB
    key_file = store / "key.aes"
    mode = key_file.stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    key = key_file.read_bytes()
    assert len(key) == 32
    assert f'Generated AES-256 key and stored it in "{key_file}"' in daemon.stderr
    assert "aeskey=None" in daemon.stdout
    assert absent(key.hex(), daemon.stdout, daemon.stderr), daemon.report()


BAD_KEY = secrets.token_hex(15)  # 30 hex digits: no AES key is that long


@pytest.mark.parametrize(
    ("args", "env", "error"),
    [
        (
            (f"-toy-aeskey=key:{BAD_KEY}",),
            {},
            "-toy-aeskey: key: expected 32, 48 or 64 hex digits",
        ),
        (
            ("-toy-aeskey=env:UNSET_VAR",),
            {},
            "-toy-aeskey: env:UNSET_VAR: environment variable UNSET_VAR is not set",
        ),
        (
            (),
            {"USBD_TOY_AESKEY": f"key:{BAD_KEY}"},
            "-toy-aeskey (from USBD_TOY_AESKEY): key: expected 32, 48 or 64 hex digits",
        ),
    ],
    ids=["short-key", "unset-env", "from-usbd-env"],
)
def test_a_bad_key_is_one_line_naming_the_flag_without_the_secret(
    args: tuple[str, ...],
    env: dict[str, str],
    error: str,
    tmp_path: Path,
    toy_env: dict[str, str],
) -> None:
    result = run_command("usbdsrvd", "-dev-type=toy", *args, cwd=tmp_path, env={**toy_env, **env})
    line = usage_error(result, "usbdsrvd")
    assert line.startswith(error), report(result)
    assert absent(BAD_KEY, result.stdout, result.stderr), report(result)
    assert not (tmp_path / "key.aes").exists()


def test_a_key_from_the_config_file_is_refused_without_the_secret(
    tmp_path: Path, toy_env: dict[str, str]
) -> None:
    config = tmp_path / "toy.toml"
    config.write_text(f'[toy]\naeskey = "key:{BAD_KEY}"\nsize = "2MiB"\n')
    result = run_command(
        "usbdsrvd", "-dev-type=toy", f"-config={config}", cwd=tmp_path, env=toy_env
    )
    line = usage_error(result, "usbdsrvd")
    assert line.startswith(f"-toy-aeskey (from 'toy.aeskey' in {config}): key: expected")
    assert absent(BAD_KEY, result.stderr), report(result)


def test_a_driver_that_fails_to_import_is_named_with_the_reason(
    tmp_path: Path, broken_env: dict[str, str]
) -> None:
    result = run_command("usbdsrvd", "-dev-type=broken", cwd=tmp_path, env=broken_env)
    assert usage_error(result, "usbdsrvd") == (
        "-dev-type: the 'broken' driver of usbd-broken failed to load: "
        "ImportError: needs libbroken, which is not installed"
    )


def test_a_broken_driver_leaves_the_others_working(
    start: Start, sockdir: Path, broken_env: dict[str, str], tools: Run
) -> None:
    daemon = start(
        "usbdsrvd",
        "-dev-type=mem",
        "-store-size=2MiB",
        f"-listen={sockdir / 'mem.sock'}",
        env=broken_env,
    )
    assert serve_and_measure(tools, daemon) == 2 * MiB
    assert "Traceback" not in daemon.stderr


def test_help_lists_a_broken_driver_as_failed(tmp_path: Path, broken_env: dict[str, str]) -> None:
    text = help_text("usbdsrvd", tmp_path, broken_env)
    assert (
        "\n  broken: from usbd-broken, FAILED to load: ImportError: needs libbroken, which is "
        "not installed\n" in text
    )
    assert "\n  mem (also memory): from usbd-ramdisk\n" in text


@pytest.mark.parametrize("args", [("-dev-type=memory",), ()], ids=["alias", "default"])
def test_mem_from_two_distributions_names_both(
    args: tuple[str, ...], sockdir: Path, clone_env: dict[str, str]
) -> None:
    listen = f"-listen={sockdir / 'never.sock'}"
    result = run_command("usbdsrvd", *args, listen, cwd=sockdir, env=clone_env)
    line = usage_error(result, "usbdsrvd")
    assert line.startswith("-dev-type: "), line
    assert "usbd-ramdisk" in line
    assert "usbd-mem-clone" in line
    assert not (sockdir / "never.sock").exists()


# -- 4. precedence: flags over USBD_* over the config file over defaults -----------------


@pytest.mark.parametrize(
    ("flags", "env", "size"),
    [
        (("--config", "{config}"), {"USBD_STORE_SIZE": "3MiB"}, 3 * MiB),
        (("--config", "{config}", "--store-size", "7MiB"), {"USBD_STORE_SIZE": "3MiB"}, 7 * MiB),
        (("--config", "{config}"), {}, 5 * MiB),
        ((), {"USBD_CONFIG": "{config}"}, 5 * MiB),
    ],
    ids=["env-over-file", "flag-over-env-and-file", "file", "file-from-env"],
)
def test_flags_beat_the_environment_which_beats_the_config_file(
    flags: tuple[str, ...],
    env: dict[str, str],
    size: int,
    start: Start,
    sockdir: Path,
    tools: Run,
) -> None:
    config = sockdir / "usbd.toml"
    config.write_text('store-size = "5MiB"\nexport-name = "from-file"\n')
    args = [arg.replace("{config}", str(config)) for arg in flags]
    extra = {name: value.replace("{config}", str(config)) for name, value in env.items()}
    daemon = start("usbdsrvd", *args, "--listen", str(sockdir / "p.sock"), env=clean_env(extra))
    uri = daemon.wait_serving()
    assert uri.startswith("nbd+unix:///from-file?"), uri  # the file's other setting still holds
    assert serve_and_measure(tools, daemon) == size


@pytest.mark.parametrize("prog", PROGS)
def test_go_style_flags(prog: str, start: Start, sockdir: Path, tools: Run) -> None:
    daemon = start(prog, "-store-size=2MiB", f"-listen={sockdir / 'go.sock'}", "-read-only=true")
    tools("nbdinfo", "--is", "read-only", daemon.wait_serving())  # exit status 0: it is
    assert serve_and_measure(tools, daemon) == 2 * MiB
    assert 'Exporting 2.0 MiB volume "test-lun" on the network using driver mem' in daemon.stdout


@pytest.mark.parametrize("name", ["dedup", "dedup-file", "dedup-disk"])
def test_usbdsrvd_serves_the_dedup_driver_by_its_names(
    name: str, start: Start, sockdir: Path, tools: Run
) -> None:
    """The original's -dev-type names for dedupdisk, with its -dedup-memcache flag; then
    usbd-dedup --stats reads the same volume."""
    daemon = start(
        "usbdsrvd",
        f"-dev-type={name}",
        f"-store-dir={sockdir}",
        "-store-name=dd",
        "-store-size=8MiB",
        "-dedup-memcache=64MiB",
        f"-listen={sockdir / 'dd.sock'}",
    )
    uri = daemon.wait_serving()
    tools("qemu-io", "-f", "raw", uri, "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x5a 1M 1M")
    assert daemon.stop() == 0, daemon.report()
    assert "using driver dedup, 4.0 KiB dedup blocks, 64 MiB index cache" in daemon.stdout
    stats = run_command(
        "usbd-dedup", "--stats", f"-store-dir={sockdir}", "-store-name=dd", cwd=sockdir
    )
    assert stats.returncode == 0, report(stats)
    # 512 blocks of one content: one stored.
    assert "mapped blocks: 512 " in stats.stdout, stats.stdout
    assert "unique blocks: 1\n" in stats.stdout, stats.stdout


# -- 5. a clean stop -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "signum",
    [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
    ids=["SIGTERM", "SIGINT", "SIGHUP"],  # SIGHUP: the terminal it was started from closed
)
@pytest.mark.parametrize("prog", PROGS)
def test_a_signal_stops_cleanly_and_removes_the_socket(
    prog: str, signum: signal.Signals, start: Start, sockdir: Path, tools: Run
) -> None:
    path = sockdir / "stop.sock"
    daemon = start(prog, "--store-size", "1MiB", "--listen", str(path))
    assert nbd_size(tools, daemon.wait_serving()) == MiB
    assert path.exists()
    assert daemon.stop(signum) == 0, daemon.report()
    assert daemon.lines[-1] == f"{prog} terminated normally.", daemon.report()
    assert not path.exists()
    assert f"received {signum.name}" in daemon.stderr, daemon.report()
    assert "Traceback" not in daemon.stderr, daemon.report()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_at_once_after_serving_is_announced_stops_cleanly(
    signum: signal.Signals, start: Start, sockdir: Path
) -> None:
    """systemd may stop a unit the moment it says READY=1, and a user may press Ctrl-C the
    moment the URI appears: that signal must be handled like any later one. Each daemon is
    signalled by the thread that reads its "is serving" line, several at once, so that the
    moment right after the announcement is hit if it is unguarded."""

    def signal_at_once(daemon: Daemon, line: str) -> None:
        if " is serving " in line:
            daemon.process.send_signal(signum)

    paths = [sockdir / f"at-once-{index}.sock" for index in range(4)]
    daemons = [
        start("usbdsrvd", "-store-size=1MiB", f"-listen={path}", on_line=signal_at_once)
        for path in paths
    ]
    for daemon, path in zip(daemons, paths, strict=True):
        status = daemon.wait()
        assert status == 0, daemon.report()
        assert daemon.lines[-1] == "usbdsrvd terminated normally.", daemon.report()
        assert not path.exists(), daemon.report()
        assert "Traceback" not in daemon.stderr, daemon.report()


# -- 6. systemd notification ---------------------------------------------------------------


@pytest.mark.parametrize("prog", PROGS)
def test_systemd_hears_ready_and_stopping(
    prog: str, start: Start, sockdir: Path, tools: Run
) -> None:
    address = sockdir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(address))
        listener.settimeout(START_TIMEOUT)
        daemon = start(
            prog,
            "-store-size=1MiB",
            f"-listen={sockdir / 'sd.sock'}",
            env=clean_env({"NOTIFY_SOCKET": str(address)}),
        )
        daemon.wait_serving()
        ready = listener.recv(4096).decode().splitlines()
        assert "READY=1" in ready, ready
        assert f"MAINPID={daemon.process.pid}" in ready, ready
        # A request served first: a stop in the very moment after READY=1 is the subject of
        # test_a_signal_at_once_after_serving_is_announced_stops_cleanly.
        assert nbd_size(tools, daemon.wait_serving()) == MiB
        assert daemon.stop() == 0, daemon.report()
        stopping = listener.recv(4096).decode().splitlines()
        assert "STOPPING=1" in stopping, stopping


# -- 7. no arguments -----------------------------------------------------------------------


def test_usbdsrvd_without_arguments_exports_a_1_gib_ramdisk_to_the_kernel(start: Start) -> None:
    """On this machine (and CI) the kernel has no nbd, or the tests run as non-root: one error
    line and exit status 1. Where it can attach (root with nbd), it must stop cleanly."""
    daemon = start("usbdsrvd")
    expected = (
        'usbdsrvd using config: Exporting 1.0 GiB volume "test-lun" as next available NBD '
        "device using driver mem"
    )
    attached = daemon.wait_line("usbdsrvd is processing requests for ")
    if attached is not None:
        assert daemon.stop() == 0, daemon.report()
        assert expected in daemon.lines, daemon.report()
        return
    status = daemon.wait()
    assert status == 1, daemon.report()
    assert daemon.lines == ["usbdsrvd started.", expected], daemon.report()
    errors = [line for line in daemon.stderr.splitlines() if line.startswith("usbdsrvd: error: ")]
    assert len(errors) == 1, daemon.report()
    assert "no nbd" in errors[0] or "needs root" in errors[0], daemon.report()
    assert "--listen" in errors[0]
    assert "Traceback" not in daemon.stderr, daemon.report()
