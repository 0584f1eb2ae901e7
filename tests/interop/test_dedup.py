"""Real NBD clients against usbd-dedup on a unix socket. nbdcopy and qemu-img copy images in
and out (random data in which whole runs repeat, zero runs, an odd tail) and compare them;
fio writes with crc32c verify over several connections in sizes that are not multiples of the
dedup block; nbdinfo --map shows never-written and zero-written regions as holes and written
ones as data. Every test stops the daemon, requires ``usbd-dedup --check`` to find the volume
consistent and ``--stats`` to count exactly the distinct blocks written, starts the daemon
again on the same volume and checks the data once more."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

KiB = 1024
MiB = 1024 * KiB
SIZE = 32 * MiB
COMMAND = str(Path(sys.executable).with_name("usbd-dedup"))
#: Ceilings, not expectations.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 120.0
#: nbdinfo --map's "type" field: base:allocation flags (HOLE = 1, ZERO = 2).
DATA, HOLE_ZERO = 0, 3

Run = Callable[..., Any]
Start = Callable[..., "Daemon"]


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="usbd-ddi-", dir="/tmp"))  # a short unix socket path
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dedup(workdir: Path) -> Iterator[Start]:
    """``dedup(*flags, size=SIZE)`` starts a :class:`Daemon` on the volume in ``workdir``; a
    test that failed before stopping one leaves it to be killed here."""
    daemons: list[Daemon] = []

    def start(*extra: str, size: int = SIZE) -> Daemon:
        daemons.append(Daemon(workdir, *extra, size=size))
        return daemons[-1]

    try:
        yield start
    finally:
        for daemon in daemons:
            daemon.kill()


class Daemon:
    """One usbd-dedup process serving ``workdir/s.sock`` from the volume ``workdir/<name>``."""

    def __init__(self, workdir: Path, *extra: str, name: str = "vol", size: int = SIZE) -> None:
        self.workdir, self.name = workdir, name
        self.storage = [f"--store-dir={workdir}", f"--store-name={name}", f"--store-size={size}"]
        self.uri = f"nbd+unix:///?socket={workdir}/s.sock"
        self.log = workdir / "daemon.log"
        self.start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [COMMAND, *self.storage, "--attach=none", f"--listen={workdir}/s.sock", *extra],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while " is serving nbd+unix://" not in self.text():
            assert self.process.poll() is None, self.text()
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"usbd-dedup did not start\n{self.text()}", pytrace=False)
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, if it still runs (teardown after a failure)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)

    def text(self) -> str:
        """What this process has logged (stdout and stderr)."""
        return self.log.read_text(errors="replace")[self.start :]

    def stop(self) -> dict[str, float]:
        """SIGTERM; insist on a clean exit; then check the volume and return its statistics."""
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"usbd-dedup ignored SIGTERM\n{self.text()}", pytrace=False)
        text = self.text()
        assert status == 0, text
        assert "terminated normally" in text, text
        assert "Traceback" not in text, text
        assert " ERROR" not in text and " WARNING" not in text, text
        # The statistics are logged at exit, on one line of the usbd.dedup logger.
        assert re.search(r"usbd\.dedup INFO: .*unique blocks", text), text
        check = self.tool("--check")
        assert check.splitlines()[-1] == "check: consistent", check
        return stats(self.tool("--stats"))

    def tool(self, option: str) -> str:
        """``usbd-dedup --check`` or ``--stats`` on this (stopped) volume; its stdout."""
        proc = subprocess.run(
            [COMMAND, option, *self.storage],
            capture_output=True,
            text=True,
            timeout=STOP_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert proc.returncode == 0, f"{option}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def allocated(self) -> int:
        """Bytes allocated to the data files ``blocks.*`` (what du shows)."""
        files = list((self.workdir / f"{self.name}.dedup").glob("blocks.*"))
        return sum(f.stat().st_blocks * 512 for f in files)


def stats(text: str) -> dict[str, float]:
    """``--stats`` output: one ``key: value`` line each, the value starting with a number."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z ]+): ([0-9]+(?:\.[0-9]+)?).*", line.strip())
        assert match is not None, text
        found[match.group(1)] = float(match.group(2))
    for key in ("logical bytes", "mapped blocks", "unique blocks", "stored bytes", "block size"):
        assert key in found, text
    return found


def assert_counts(
    found: dict[str, float], data: bytes, size: int = 4 * KiB, *, compressed: bool = True
) -> None:
    """The statistics count exactly the blocks of ``data`` that are not all zeros, and the
    distinct ones, and store those in about their own size, less what compresses."""
    zero = bytes(size)
    nonzero = [data[i : i + size] for i in range(0, len(data), size)]
    nonzero = [block for block in nonzero if block != zero]
    unique = set(nonzero)
    assert found["block size"] == size, found
    assert found["mapped blocks"] == len(nonzero), (found, len(nonzero), len(unique))
    assert found["unique blocks"] == len(unique), (found, len(nonzero), len(unique))
    # Random data does not compress; the text does (to a quarter with zlib at 4 KiB).
    dense = sum(len(zlib.compress(b)) > size * 0.9 for b in unique) if compressed else len(unique)
    light = len(unique) - dense
    assert dense * size <= found["stored bytes"] <= (dense * 1.1 + light * 0.6) * size, found


def text(size: int) -> bytes:
    """Compressible but never repeating: numbered lines."""
    lines = (f"line {i:09d} of a text that compresses well\n".encode() for i in itertools.count())
    return b"".join(itertools.islice(lines, size // 40))[:size]


def image(path: Path) -> bytes:
    """32 MiB: 8 MiB of random data twice with zeros between, other random data, the first
    4 MiB again shifted by 512 bytes (not a whole 4 KiB block: no match for a 4 KiB dedup),
    text, and an odd-sized tail of data. Written to ``path`` with real holes for the zeros."""
    repeated = os.urandom(8 * MiB)
    parts = [
        repeated,
        bytes(4 * MiB),
        repeated,
        os.urandom(4 * MiB),
        repeated[512 : 4 * MiB + 512],
        text(2 * MiB),
        os.urandom(2 * MiB - 999) + b"\x5a" * 999,
    ]
    data = b"".join(parts)
    assert len(data) == SIZE
    with path.open("wb") as f:
        f.truncate(SIZE)
        for offset, part in zip(
            itertools.accumulate((len(p) for p in parts), initial=0), parts, strict=False
        ):
            if any(part):
                f.seek(offset)
                f.write(part)
    return data


@pytest.mark.parametrize(
    ("options", "size"),
    [
        ([], 4 * KiB),
        (["-dedup-blocksize=512", "-dedup-compress=identity", "-dedup-verify"], 512),
        (["--dedup-blocksize", "64KiB", "--dedup-verify"], 64 * KiB),
    ],
    ids=["defaults", "512-identity-verify", "64k-verify"],
)
def test_nbdcopy_round_trip_and_restart(
    options: list[str], size: int, dedup: Start, tools: Run, tmp_path: Path
) -> None:
    """``size`` is the dedup block size the options give."""
    source = tmp_path / "src.img"
    data = image(source)
    daemon = dedup(*options)
    tools("nbdcopy", "--connections=4", "--requests=16", "--flush", str(source), daemon.uri)
    tools("nbdcopy", "-C", "2", daemon.uri, str(tmp_path / "back.img"))
    assert (tmp_path / "back.img").read_bytes() == data
    found = daemon.stop()
    assert_counts(found, data, size, compressed="-dedup-compress=identity" not in options)
    # The data files hold the distinct blocks once, not the 8 MiB run twice.
    assert daemon.allocated() <= found["stored bytes"] + 2 * MiB, found

    daemon = dedup(*options)
    (tmp_path / "back.img").unlink()
    tools("nbdcopy", daemon.uri, str(tmp_path / "back.img"))
    assert (tmp_path / "back.img").read_bytes() == data
    assert daemon.stop() == found  # reading changed nothing


def test_qemu_img_round_trip_and_a_write_to_a_shared_block(
    dedup: Start, tools: Run, tmp_path: Path
) -> None:
    """A byte written into the first copy of the repeated run changes that copy only: the
    block it shared with the second copy must be left as it was."""
    source = tmp_path / "src.img"
    data = image(source)
    daemon = dedup()
    tools("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), daemon.uri)
    proc = tools("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), daemon.uri)
    assert "Images are identical" in proc.stdout
    back = tmp_path / "back.img"
    tools("qemu-img", "convert", "-f", "raw", "-O", "raw", daemon.uri, str(back))
    assert back.read_bytes() == data
    assert_counts(daemon.stop(), data)

    daemon = dedup()
    proc = tools("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), daemon.uri)
    assert "Images are identical" in proc.stdout
    offset = 3 * MiB + 4321  # in the first copy; the same bytes are at 15 MiB + 4321 too
    assert data[offset] == data[offset + 12 * MiB]
    value = data[offset] ^ 0xFF
    tools("qemu-io", "-f", "raw", "-c", f"write -P {value} {offset} 1", daemon.uri)
    proc = tools(
        "qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), daemon.uri, check=False
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"Content mismatch at offset {offset // 512 * 512}!" in proc.stdout
    changed = data[:offset] + bytes([value]) + data[offset + 1 :]
    back.unlink()
    tools("qemu-img", "convert", "-f", "raw", "-O", "raw", daemon.uri, str(back))
    assert back.read_bytes() == changed
    assert_counts(daemon.stop(), changed)

    daemon = dedup()
    back.unlink()
    tools("qemu-img", "convert", "-f", "raw", "-O", "raw", daemon.uri, str(back))
    assert back.read_bytes() == changed
    daemon.stop()


def _fio(tools: Run, daemon: Daemon, report: Path, *options: str) -> dict[str, Any]:
    tools(
        "fio",
        "--name=dedup",
        "--ioengine=nbd",
        f"--uri={daemon.uri}",
        "--rw=randwrite",
        "--bsrange=512-64k",  # mostly parts of 4 KiB blocks, or several with parts at the ends
        "--numjobs=4",  # one connection each (the device is multi-conn)
        "--size=6M",
        "--offset_increment=8M",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randseed=11",
        "--output-format=json",
        f"--output={report}",
        *options,
        cwd=report.parent,  # fio keeps its verify state files in its working directory
    )
    result: dict[str, Any] = json.loads(report.read_text())
    return result


def test_fio_verify_over_four_connections_and_a_restart(
    dedup: Start, workdir: Path, tools: Run
) -> None:
    daemon = dedup()
    report = _fio(tools, daemon, workdir / "write.json")  # written, then read back and checked
    assert len(report["jobs"]) == 4
    for job in report["jobs"]:
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] == 6 * MiB
        assert job["read"]["io_bytes"] == 6 * MiB
    found = daemon.stop()
    # fio's blocks carry their offset in a header: nothing to share, 4 x 6 MiB to map.
    assert found["mapped blocks"] == found["unique blocks"] == 4 * 6 * MiB // (4 * KiB), found

    daemon = dedup()
    # The same jobs' verify phase alone, after the restart: every block read back checks.
    report = _fio(tools, daemon, workdir / "verify.json", "--verify_only")
    for job in report["jobs"]:
        assert job["error"] == 0, job
        assert job["read"]["io_bytes"] == 6 * MiB
    assert daemon.stop() == found


def _map(tools: Run, uri: str) -> list[tuple[int, int, int]]:
    """nbdinfo --map's extents, with neighbours of the same type merged."""
    extents: list[tuple[int, int, int]] = []
    for e in json.loads(tools("nbdinfo", "--map", "--json", uri).stdout):
        if extents and extents[-1][2] == e["type"] and sum(extents[-1][:2]) == e["offset"]:
            extents[-1] = (extents[-1][0], extents[-1][1] + e["length"], e["type"])
        else:
            extents.append((e["offset"], e["length"], e["type"]))
    return extents


def test_map_shows_never_written_and_zero_written_blocks_as_holes(
    dedup: Start, tools: Run, connect: Run
) -> None:
    size = 16 * MiB
    daemon = dedup(size=size)
    assert _map(tools, daemon.uri) == [(0, size, HOLE_ZERO)]

    h = connect(daemon.uri)
    model = bytearray(size)

    def write(data: bytes, offset: int) -> None:
        h.pwrite(data, offset)
        model[offset : offset + len(data)] = data

    first = os.urandom(64 * KiB)
    write(first, 1 * MiB)
    write(bytes(256 * KiB), 2 * MiB)  # zeros where nothing was written
    write(os.urandom(128 * KiB), 4 * MiB)
    write(bytes(64 * KiB), 4 * MiB + 32 * KiB)  # zeros over data: 16 blocks back to holes
    write(first, 8 * MiB)  # shared with the copy at 1 MiB
    write(os.urandom(100), 12 * MiB + 10)  # unaligned: its 4 KiB block becomes data
    write(os.urandom(32 * KiB), 14 * MiB)
    h.zero(8 * KiB, 14 * MiB + 8 * KiB)  # WRITE_ZEROES and TRIM drop blocks too
    h.trim(8 * KiB, 14 * MiB + 24 * KiB)
    model[14 * MiB + 8 * KiB : 14 * MiB + 16 * KiB] = bytes(8 * KiB)
    model[14 * MiB + 24 * KiB : 14 * MiB + 32 * KiB] = bytes(8 * KiB)
    h.flush()
    expected = [
        (0, 1 * MiB, HOLE_ZERO),
        (1 * MiB, 64 * KiB, DATA),
        (1 * MiB + 64 * KiB, 3 * MiB - 64 * KiB, HOLE_ZERO),
        (4 * MiB, 32 * KiB, DATA),
        (4 * MiB + 32 * KiB, 64 * KiB, HOLE_ZERO),
        (4 * MiB + 96 * KiB, 32 * KiB, DATA),
        (4 * MiB + 128 * KiB, 4 * MiB - 128 * KiB, HOLE_ZERO),
        (8 * MiB, 64 * KiB, DATA),
        (8 * MiB + 64 * KiB, 4 * MiB - 64 * KiB, HOLE_ZERO),
        (12 * MiB, 4 * KiB, DATA),
        (12 * MiB + 4 * KiB, 2 * MiB - 4 * KiB, HOLE_ZERO),
        (14 * MiB, 8 * KiB, DATA),
        (14 * MiB + 8 * KiB, 8 * KiB, HOLE_ZERO),
        (14 * MiB + 16 * KiB, 8 * KiB, DATA),
        (14 * MiB + 24 * KiB, 2 * MiB - 24 * KiB, HOLE_ZERO),
    ]
    assert _map(tools, daemon.uri) == expected
    assert h.pread(size, 0) == model
    h.shutdown()
    found = daemon.stop()
    assert_counts(found, bytes(model))
    assert (found["mapped blocks"], found["unique blocks"]) == (16 + 8 + 8 + 16 + 1 + 2 + 2, 37)

    daemon = dedup(size=size)
    assert _map(tools, daemon.uri) == expected
    h = connect(daemon.uri)
    assert h.pread(size, 0) == model
    h.shutdown()
    assert daemon.stop() == found
