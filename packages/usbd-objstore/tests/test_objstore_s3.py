"""usbd-objstore over a real S3 server (SeaweedFS): the shared device suite through the S3
store, and the S3 edge as a user meets it on the command line (wrong credentials, a missing
bucket, nothing listening, a second daemon, the wrong key: exit 1 with one line naming it).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from usbd.core import Device
from usbd.core.testing import MakeDevice, PersistentDeviceTests, ReopenDevice
from usbd.objstore import ObjStoreDevice, Params, S3Store, open_volume
from usbd.objstore.testing import SeaweedS3

KiB = 1 << 10
KEY = bytes(range(1, 33))
COMMAND = str(Path(sys.executable).with_name("usbd-objstore"))


def s3_opener(
    seaweed: SeaweedS3, directory: Path, *, persistent: bool, cache_objects: int | None = None
) -> tuple[MakeDevice, ReopenDevice]:
    # The bucket outlives the test: every device is a volume of its own name.
    names = (f"suite-{uuid.uuid4().hex[:12]}" for _ in itertools.count())

    def open_device(name: str, size: int) -> ObjStoreDevice:
        volume = open_volume(
            S3Store(seaweed.objstore_cfg()),
            name,
            Params(size, 64 * KiB, "zstd", "aes-gcm"),
            set(),
            lambda mode: None if mode == "identity" else KEY,
            takeover=False,
            timeout=20,
        )
        return ObjStoreDevice(
            volume,
            directory / f"{name}.cache",
            persistent=persistent,
            cache_objects=cache_objects,
            workers=8,
            flush_every=0.5,
            timeout=20,
        )

    def make(size: int) -> Device:
        return open_device(next(names), size)

    def reopen(device: Device) -> Device:
        assert isinstance(device, ObjStoreDevice)
        return open_device(device.name, device.size)

    return make, reopen


class TestS3TemporaryCache(PersistentDeviceTests):
    """No persistent cache: every FLUSH is a commit to SeaweedFS, every reopen reads from it."""

    trim_zeroes = True
    model_examples = 5
    # Each example opens a volume on the server (a lease, a manifest, an epoch commit), about
    # 0.15 s apiece: 40 keep the slow run's four S3 model tests near half a minute, where 300
    # took several; the local-store classes explore the full budget.
    slow_model_examples = 40
    persistent_cache = False
    cache_objects: int | None = None

    @pytest.fixture
    def pair(self, seaweed: SeaweedS3, tmp_path: Path) -> tuple[MakeDevice, ReopenDevice]:
        return s3_opener(
            seaweed, tmp_path, persistent=self.persistent_cache, cache_objects=self.cache_objects
        )

    @pytest.fixture
    def make_device(self, pair: tuple[MakeDevice, ReopenDevice]) -> MakeDevice:
        return pair[0]

    @pytest.fixture
    def reopen_device(self, pair: tuple[MakeDevice, ReopenDevice]) -> ReopenDevice:
        return pair[1]


class TestS3PersistentSmallCache(TestS3TemporaryCache):
    """A persistent cache of 8 objects: evictions and refetches from SeaweedFS all along."""

    persistent_cache = True
    cache_objects = 8


# -- the command line against S3 --------------------------------------------------------------


@pytest.fixture
def store_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="usbd-os-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def objstore(
    store_dir: Path, cfg: dict[str, object], *extra: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run usbd-objstore to the end (it fails at open, or is told to stop by the caller)."""
    return subprocess.run(
        [
            COMMAND,
            f"--store-dir={store_dir}",
            "--store-size=16MiB",
            "--attach=none",
            f"--listen={store_dir}/s.sock",
            f"--objstore-cfg={json.dumps(cfg)}",
            "--objstore-timeout=5s",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a run that failed at open (log lines aside)."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("usbd-objstore:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_wrong_credentials_missing_bucket_and_no_server_are_one_line_each(
    seaweed: SeaweedS3, store_dir: Path
) -> None:
    cfg = seaweed.objstore_cfg()
    wrong = {**cfg, "secret_key": "not-the-secret-at-all"}
    line = one_error_line(objstore(store_dir, wrong))
    assert "refused the credentials" in line and "SignatureDoesNotMatch" in line
    line = one_error_line(objstore(store_dir, {**cfg, "bucket": "no-such-bucket"}))
    assert "bucket 'no-such-bucket' does not exist" in line and "create it first" in line
    with socket_nobody_listens() as port:
        nobody = {**cfg, "endpoint": f"http://127.0.0.1:{port}"}
        line = one_error_line(objstore(store_dir, nobody))
    assert f"does not answer (s3://{cfg['bucket']} at http://127.0.0.1:{port})" in line
    assert str(cfg["secret_key"]) not in line


@contextlib.contextmanager
def socket_nobody_listens() -> Iterator[int]:
    """A loopback port that nothing listens on, held (bound, not listening) meanwhile."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port: int = held.getsockname()[1]
        yield port


def started(store_dir: Path, cfg: dict[str, object], *extra: str) -> subprocess.Popen[str]:
    """A daemon serving on ``store_dir/s.sock``, once it says so."""
    process = subprocess.Popen(
        [
            COMMAND,
            f"--store-dir={store_dir}",
            "--store-size=16MiB",
            "--attach=none",
            f"--listen={store_dir}/s.sock",
            f"--objstore-cfg={json.dumps(cfg)}",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    for line in process.stdout:
        if "is serving" in line:
            return process
        assert time.monotonic() < deadline
    process.wait()
    raise AssertionError(f"did not start: {process.stderr.read() if process.stderr else ''}")


def stopped(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def test_a_second_daemon_on_the_volume_and_the_wrong_key_are_refused(
    seaweed: SeaweedS3, store_dir: Path
) -> None:
    cfg = seaweed.objstore_cfg()
    name = f"--store-name=lease-{os.getpid()}"
    first = started(store_dir, cfg, name)
    try:
        other = store_dir / "other"
        other.mkdir()
        shutil.copy(store_dir / "key.aes", other / "key.aes")
        line = one_error_line(objstore(other, cfg, name))
        assert f"lease-{os.getpid()}/lease is held by" in line
        assert f"pid {first.pid}" in line and "one writer per volume" in line
    finally:
        code, out, err = stopped(first)
    assert code == 0, err
    assert "terminated normally" in out
    assert str(cfg["secret_key"]) not in out + err
    # Another key (a fresh store dir generates its own key.aes): refused before serving.
    elsewhere = store_dir / "elsewhere"
    elsewhere.mkdir()
    line = one_error_line(objstore(elsewhere, cfg, name))
    assert "the AES key (-objstore-aeskey) does not open volume" in line
    # Other parameters given explicitly: refused, naming the flag.
    line = one_error_line(objstore(store_dir, cfg, name, "--objstore-objsize=4MiB"))
    assert "was created with -objstore-objsize=1.0 MiB, not 4.0 MiB" in line


def test_objects_replaced_in_place_carry_their_md5_and_the_server_checks_it(
    seaweed: SeaweedS3,
) -> None:
    """The manifest and the lease are replaced by conditional PUTs that carry Content-MD5,
    which SeaweedFS checks: a body cut short by a kill -9 is refused instead of stored as an
    empty head (tests/crash/seaweed_aborted_put.py), which left the volume unopenable."""
    store = S3Store(seaweed.objstore_cfg())
    sent: dict[str, bytes | None] = {}

    def note(request: Any, **_: Any) -> None:
        sent[request.url.rsplit("/", 1)[-1]] = request.headers.get("Content-MD5")

    store._client.meta.events.register("before-send.s3.PutObject", note)
    key = f"md5-{uuid.uuid4().hex[:8]}"
    first = store.put(f"{key}-head", b"one", if_none_match=True)
    store.put(f"{key}-head", b"two", if_match=first)
    store.put(f"{key}-data", b"immutable")
    assert sent == {
        f"{key}-head": base64.b64encode(hashlib.md5(b"two").digest()),
        f"{key}-data": None,
    }
    wrong = base64.b64encode(hashlib.md5(b"something else").digest()).decode()
    client = seaweed.client()
    with pytest.raises(botocore.exceptions.ClientError, match=r"BadDigest|InvalidDigest"):
        client.put_object(Bucket=seaweed.bucket, Key=f"{key}-head", Body=b"two", ContentMD5=wrong)
    assert client.get_object(Bucket=seaweed.bucket, Key=f"{key}-head")["Body"].read() == b"two"
