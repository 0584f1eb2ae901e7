"""Dedup is real, measured on the files a real ``usbd-dedup`` process writes: the allocated
bytes (``st_blocks * 512``, what ``du`` shows) of ``<store-dir>/<name>.dedup/blocks.*``.

* the same 64 MiB of random data at two offsets grows them by about 64 MiB, not 128, and
  ``--stats`` says 16384 unique blocks for 32768 mapped, a dedup ratio of 2;
* zero blocks take no space, whether written as zeros, WRITE_ZEROES or TRIM;
* a block shared by two copies survives the overwriting of one; once both are gone (trimmed,
  overwritten by zeros, by other data, or by content already stored) and a FLUSH was answered,
  the allocated bytes fall (punching may come a moment after the FLUSH: polled with a deadline,
  no timing asserted); freed slots are reused (the files do not grow past their high-water
  mark for new data as large as what was freed);
* text is stored in fewer bytes than its size with zstd, and in exactly its size with
  identity.

After each test, a clean stop, ``--stats`` against what was written, and ``--check``:
``check: consistent``.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

# The daemon and client helpers live in test_dedup_crash.py, next to this file; under
# --import-mode=importlib this directory is not on sys.path.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

from test_dedup_crash import CORPUS, Daemon, connected, import_libnbd  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 4 * KiB
#: How long the test waits for freed slots to be punched out once a FLUSH was answered (the
#: contract: at most a few seconds); a ceiling, not an expectation.
PUNCH_DEADLINE = 30.0
#: Slack for what is not data: a partly used last slot page, a file's first block.
SLACK = 1 * MiB


@pytest.fixture
def nbd() -> ModuleType:
    return import_libnbd()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory under /tmp (a unix socket path has 108 bytes at most; /tmp, not
    /dev/shm: a real file system with holes)."""
    path = Path(tempfile.mkdtemp(prefix="usbd-ds-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def allocated(daemon: Daemon) -> int:
    """The data files' allocated bytes (the index, LevelDB, is not counted)."""
    return sum(p.stat().st_blocks * 512 for p in daemon.volume_dir.glob("blocks.*"))


def apparent(daemon: Daemon) -> int:
    """The data files' sizes (their high-water marks)."""
    return sum(p.stat().st_size for p in daemon.volume_dir.glob("blocks.*"))


def wait_for(measure: Callable[[], int], ok: Callable[[int], bool]) -> int:
    """Poll ``measure`` until ``ok`` holds or the deadline passes; the last value."""
    until = time.monotonic() + PUNCH_DEADLINE
    value = measure()
    while not ok(value) and time.monotonic() < until:
        time.sleep(0.05)
        value = measure()
    return value


def mib(n: float) -> str:
    return f"{n / MiB:.2f} MiB"


def write(handle: Any, data: bytes, offset: int, step: int = 4 * MiB) -> None:
    for at in range(0, len(data), step):
        handle.pwrite(data[at : at + step], offset + at)


def read(handle: Any, length: int, offset: int, step: int = 4 * MiB) -> bytes:
    return b"".join(
        bytes(handle.pread(min(step, length - at), offset + at)) for at in range(0, length, step)
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_blocks(count: int, seed: int) -> bytes:
    """``count`` distinct 4 KiB blocks of text (a numbered line, then words)."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        head = f"text block {seed}:{n}\n".encode()
        at = rng.randrange(len(CORPUS) - BLOCK)
        out.append((head + CORPUS[at : at + BLOCK])[:BLOCK])
    return b"".join(out)


def stop_stats_check(daemon: Daemon) -> dict[str, float]:
    """Clean stop, ``--check`` (must be consistent), and the statistics."""
    daemon.stop()
    summary, result = daemon.check()
    assert summary == "check: consistent", f"{result.stdout}\n{result.stderr}"
    return daemon.stats()


def make_daemon(workdir: Path, size: int, *extra: str) -> Daemon:
    return Daemon(workdir, size=size, extra=["--dedup-memcache", "64MiB", *extra])


@pytest.mark.parametrize("compress", ["zstd", "identity"])
def test_the_same_64_mib_at_two_offsets_is_stored_once(
    nbd: ModuleType, workdir: Path, compress: str
) -> None:
    daemon = make_daemon(workdir, 256 * MiB, "--dedup-compress", compress)
    data = os.urandom(64 * MiB)
    try:
        daemon.start()
        base = allocated(daemon)
        with connected(nbd, daemon) as handle:
            write(handle, data, 0)
            handle.flush()
            once = allocated(daemon) - base
            write(handle, data, 128 * MiB)
            handle.flush()
            twice = allocated(daemon) - base
            # Random data does not compress: one copy is its 64 MiB; the second adds nothing.
            assert 64 * MiB <= once <= 64 * MiB + SLACK, f"the first copy took {mib(once)}"
            assert twice - once <= SLACK, (
                f"the same 64 MiB again took {mib(twice - once)} more ({mib(twice)} in all)"
            )
            assert sha(read(handle, 64 * MiB, 128 * MiB)) == sha(data)
            assert sha(read(handle, 64 * MiB, 0)) == sha(data)
        stats = stop_stats_check(daemon)
        assert stats["mapped blocks"] == 2 * 16384, stats
        assert stats["unique blocks"] == 16384, stats
        assert stats["dedup ratio"] == pytest.approx(2.0, abs=0.01), stats
        assert stats["stored bytes"] == 64 * MiB, stats
        assert stats["logical bytes"] >= 128 * MiB, stats
        assert allocated(daemon) - base <= 64 * MiB + SLACK
    finally:
        daemon.close()


def test_zero_blocks_take_no_space(nbd: ModuleType, workdir: Path) -> None:
    """32 MiB of zeros written as data, 32 MiB of WRITE_ZEROES, 16 MiB TRIMmed, and 16 MiB of
    data and zero blocks taking turns: only the data blocks (8 MiB) are stored."""
    daemon = make_daemon(workdir, 128 * MiB)
    rng = random.Random(5)
    alternating = b"".join(
        rng.randbytes(BLOCK) if n % 2 else bytes(BLOCK) for n in range(16 * MiB // BLOCK)
    )
    try:
        daemon.start()
        base = allocated(daemon)
        with connected(nbd, daemon) as handle:
            write(handle, bytes(32 * MiB), 0)
            handle.zero(32 * MiB, 32 * MiB)
            handle.zero(8 * MiB, 64 * MiB, nbd.CMD_FLAG_NO_HOLE)
            handle.trim(16 * MiB, 80 * MiB)
            handle.flush()
            zeros = allocated(daemon) - base
            write(handle, alternating, 96 * MiB)
            handle.flush()
            mixed = allocated(daemon) - base
            assert zeros == 0, f"zero blocks took {mib(zeros)}"
            assert 8 * MiB <= mixed <= 8 * MiB + SLACK, (
                f"8 MiB of data among 8 MiB of zero blocks took {mib(mixed)}"
            )
            assert read(handle, 96 * MiB, 0) == bytes(96 * MiB)
            assert sha(read(handle, 16 * MiB, 96 * MiB)) == sha(alternating)
        stats = stop_stats_check(daemon)
        assert stats["mapped blocks"] == 8 * MiB // BLOCK, stats
        assert stats["unique blocks"] == 8 * MiB // BLOCK, stats
    finally:
        daemon.close()


def test_space_falls_after_overwrite_or_trim_and_flush(nbd: ModuleType, workdir: Path) -> None:
    daemon = make_daemon(workdir, 128 * MiB)
    u = os.urandom(32 * MiB)
    v = os.urandom(16 * MiB)
    w = os.urandom(16 * MiB)
    x = os.urandom(16 * MiB)

    def above_base() -> int:
        return allocated(daemon) - base

    try:
        daemon.start()
        base = allocated(daemon)
        with connected(nbd, daemon) as handle:
            # Two copies of U: stored once.
            write(handle, u, 0)
            write(handle, u, 64 * MiB)
            handle.flush()
            both = above_base()
            assert 32 * MiB <= both <= 32 * MiB + SLACK, f"two copies of U took {mib(both)}"
            # Overwriting one copy (zeros) keeps the other's blocks: they are still referred to.
            write(handle, bytes(32 * MiB), 0)
            handle.flush()
            assert sha(read(handle, 32 * MiB, 64 * MiB)) == sha(u), "the other copy changed"
            # Trimming the other: nothing refers to U's slots any more.
            handle.trim(32 * MiB, 64 * MiB)
            handle.flush()
            after_trim = wait_for(above_base, lambda n: n <= SLACK)
            assert after_trim <= SLACK, (
                f"{mib(after_trim)} still allocated {PUNCH_DEADLINE:.0f} s after U was "
                f"overwritten, trimmed and flushed ({mib(both)} before)"
            )
            assert read(handle, 32 * MiB, 64 * MiB) == bytes(32 * MiB)
            # Overwriting unique data with other unique data: V's slots are freed, W's stored.
            write(handle, v, 0)
            handle.flush()
            write(handle, w, 0)
            handle.flush()
            high = apparent(daemon)
            after_overwrite = wait_for(above_base, lambda n: n <= 16 * MiB + SLACK)
            assert 16 * MiB <= after_overwrite <= 16 * MiB + SLACK, (
                f"V overwritten by W and flushed: {mib(after_overwrite)} allocated, not 16 MiB"
            )
            # Overwriting W with content already stored (a copy of the first 16 MiB of U,
            # written again at 96 MiB first) frees W's slots: only U's part is left.
            write(handle, u[: 16 * MiB], 96 * MiB)
            handle.flush()
            write(handle, u[: 16 * MiB], 0)
            handle.flush()
            after_dup = wait_for(above_base, lambda n: n <= 16 * MiB + SLACK)
            assert after_dup <= 16 * MiB + SLACK, (
                f"W overwritten by data already stored: {mib(after_dup)} allocated, not 16 MiB"
            )
            # New data as large as what was freed goes into the freed slots: the files do not
            # grow past their high-water mark.
            write(handle, x, 32 * MiB)
            handle.flush()
            grown = apparent(daemon) - high
            assert grown <= SLACK, (
                f"16 MiB of new data after 16 MiB was freed grew the files by {mib(grown)}"
            )
            assert sha(read(handle, 16 * MiB, 0)) == sha(u[: 16 * MiB])
            assert sha(read(handle, 16 * MiB, 32 * MiB)) == sha(x)
            assert sha(read(handle, 16 * MiB, 96 * MiB)) == sha(u[: 16 * MiB])
        stats = stop_stats_check(daemon)
        # Blocks 0-16 MiB and 96-112 MiB share U's first half; X at 32 MiB is its own.
        assert stats["mapped blocks"] == 3 * 16 * MiB // BLOCK, stats
        assert stats["unique blocks"] == 2 * 16 * MiB // BLOCK, stats
        assert stats["dedup ratio"] == pytest.approx(1.5, abs=0.01), stats
        final = allocated(daemon) - base
        assert 32 * MiB <= final <= 32 * MiB + SLACK, f"{mib(final)} allocated at the end"
    finally:
        daemon.close()


@pytest.mark.parametrize("compress", ["zstd", "identity"])
def test_text_is_stored_smaller_with_zstd_only(
    nbd: ModuleType, workdir: Path, compress: str
) -> None:
    daemon = make_daemon(workdir, 64 * MiB, "--dedup-compress", compress)
    text = text_blocks(32 * MiB // BLOCK, seed=1)
    try:
        daemon.start()
        base = allocated(daemon)
        with connected(nbd, daemon) as handle:
            write(handle, text, 0)
            handle.flush()
            stored = allocated(daemon) - base
            # zstd makes these 4 KiB blocks about 1.4 KiB: a 2 KiB slot each, half the size.
            if compress == "zstd":
                assert stored <= 0.6 * len(text), f"32 MiB of text took {mib(stored)} with zstd"
            else:
                assert len(text) <= stored <= len(text) + SLACK, (
                    f"32 MiB of text took {mib(stored)} with identity"
                )
            assert sha(read(handle, len(text), 0)) == sha(text)
        stats = stop_stats_check(daemon)
        assert stats["unique blocks"] == len(text) // BLOCK, stats
        if compress == "zstd":
            assert stats["stored bytes"] <= 0.6 * len(text), stats
            assert stats["compression ratio"] >= 1.6, stats
        else:
            assert stats["stored bytes"] == len(text), stats
            assert stats["compression ratio"] == pytest.approx(1.0), stats
    finally:
        daemon.close()
