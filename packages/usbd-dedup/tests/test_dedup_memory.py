"""Memory stays bounded: the daemon's resident set does not grow with what is stored.

A real ``usbd-dedup`` with ``-dedup-memcache 64MiB`` gets 1 GiB of unique, incompressible
data (262144 blocks: the index gains about 110 bytes each, 28 MiB in all, more than the
cache's share for changes). The resident set after the first 256 MiB and after the whole
GiB must differ by less than the memcache: what the process holds is the cache and the
changes between commits, whatever the volume holds. (The benchmark measures 4 GiB.)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

from test_dedup_crash import Daemon, connected, import_libnbd  # noqa: E402

MiB = 1 << 20
MEMCACHE = 64 * MiB


def resident(pid: int) -> int:
    """VmRSS of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="usbd-dm-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_resident_memory_does_not_grow_with_the_volume(workdir: Path) -> None:
    nbd: ModuleType = import_libnbd()
    daemon = Daemon(workdir, size=2 << 30, extra=["--dedup-memcache", "64MiB"])
    daemon.start()
    try:
        step = 4 * MiB
        seen: dict[int, int] = {}
        with connected(nbd, daemon) as handle:
            for offset in range(0, 1 << 30, step):
                handle.pwrite(os.urandom(step), offset)
                if offset + step in (256 * MiB, 1 << 30):
                    handle.flush()
                    seen[offset + step] = resident(daemon.pid)
        early, late = seen[256 * MiB], seen[1 << 30]
        print(f"resident: {early / MiB:.1f} MiB -> {late / MiB:.1f} MiB")
        assert late - early < MEMCACHE, (
            f"resident {early / MiB:.0f} MiB after 256 MiB, {late / MiB:.0f} MiB after 1 GiB"
        )
        daemon.stop()
        stats = daemon.stats()
        assert stats["unique blocks"] == 262144, stats
    finally:
        daemon.close()
