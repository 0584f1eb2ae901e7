"""Real NBD clients against usbd-objstore on a real S3 server (SeaweedFS): qemu-img copies an
image in, the daemon is stopped, its cache deleted, and it is started again; qemu-img compares
the image it now reads (all from the bucket) byte for byte; nbdinfo --map sees the holes that
were never uploaded; fio writes with verify through a 6-object cache that evicts all along,
and verifies again after a restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from usbd.objstore.testing import SeaweedS3

KiB = 1024
MiB = 1024 * KiB
SIZE = 32 * MiB
COMMAND = str(Path(sys.executable).with_name("usbd-objstore"))

Run = Callable[..., Any]


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"), bucket="interop")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="usbd-osi-", dir="/tmp"))  # a short unix socket path
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Daemon:
    """One usbd-objstore process serving ``workdir/s.sock``."""

    def __init__(
        self, workdir: Path, seaweed: SeaweedS3, *extra: str, name: str = "interop"
    ) -> None:
        self.uri = f"nbd+unix:///?socket={workdir}/s.sock"
        self.log = workdir / "daemon.log"
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [
                    COMMAND,
                    f"--store-dir={workdir}",
                    f"--store-name={name}",
                    f"--store-size={SIZE}",
                    "--attach=none",
                    f"--listen={workdir}/s.sock",
                    f"--objstore-cfg={json.dumps(seaweed.objstore_cfg())}",
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        deadline = time.monotonic() + 60
        while not (workdir / "s.sock").exists():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=120) == 0, self.log.read_text()
        text = self.log.read_text()
        assert "terminated normally" in text and "Traceback" not in text, text
        return text


def test_an_image_copied_in_comes_back_from_the_bucket(
    seaweed: SeaweedS3, workdir: Path, tools: Run, tmp_path: Path
) -> None:
    source = tmp_path / "src.img"
    data = os.urandom(6 * MiB) + bytes(20 * MiB) + os.urandom(6 * MiB - 999) + b"\x5a" * 999
    source.write_bytes(data)
    daemon = Daemon(workdir, seaweed)
    tools("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), daemon.uri)
    daemon.stop()
    # Without a persistent cache the cache is gone anyway; make sure.
    shutil.rmtree(workdir / "interop.cache", ignore_errors=True)
    daemon = Daemon(workdir, seaweed)
    proc = tools("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), daemon.uri)
    assert "Images are identical" in proc.stdout
    # The zeros in the middle were never uploaded: block status says hole there.
    extents = json.loads(tools("nbdinfo", "--map", "--json", daemon.uri).stdout)
    holes = [e for e in extents if e["type"] & 1]
    assert any(e["offset"] <= 7 * MiB and e["offset"] + e["length"] >= 25 * MiB for e in holes)
    objects = [
        key
        for page in seaweed.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket="interop", Prefix="interop/data/")
        for key in (item["Key"] for item in page.get("Contents", []))
    ]
    assert len(objects) == 12  # 6 + 6 MiB of data in 1 MiB objects, nothing for the zeros
    daemon.stop()


def test_fio_verify_through_a_small_cache_and_a_restart(
    seaweed: SeaweedS3, workdir: Path, tools: Run
) -> None:
    extra = ("--objstore-persistcache", "--objstore-diskcache=6MiB", "--objstore-flushevery=1s")

    def fio(*options: str) -> dict[str, Any]:
        report = workdir / "fio.json"
        tools(
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={daemon.uri}",
            "--rw=randwrite",
            "--bs=4k,64k",
            "--size=24M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--randseed=7",
            "--output-format=json",
            f"--output={report}",
            *options,
            cwd=workdir,  # fio keeps its verify state files in its working directory
        )
        result: dict[str, Any] = json.loads(report.read_text())
        return result

    daemon = Daemon(workdir, seaweed, *extra, name="fio")
    assert fio()["jobs"][0]["error"] == 0  # written, then read back and checked
    daemon.stop()
    daemon = Daemon(workdir, seaweed, *extra, name="fio")
    # The same job's verify phase alone, after the restart: every block read back checks.
    assert fio("--verify_only")["jobs"][0]["error"] == 0
    daemon.stop()
