"""The S3 server goes away for a while under a running ``usbd-objstore`` with a persistent
cache of 16 objects, then comes back on the same ports (a real SeaweedFS, killed with SIGKILL):

* during the outage, cached reads are served, writes land in the cache until it holds 16
  dirty objects and then wait (they do not fail), FLUSH succeeds (the cache is durable), and a
  read of an object not in the cache fails with EIO after about -objstore-timeout rather than
  hanging;
* once the server is back, the waiting write completes, the object that could not be read
  reads correctly, and every object dirtied during the outage is committed to the bucket while
  the daemon runs: after kill -9 and with the cache deleted, the bucket alone holds every
  write.

And (slow: the first renewal comes 15 s in) a server that stalls for a few seconds during a
lease renewal must not cost the daemon its lease (it did until c106294: the renewal's retry
failed its own If-Match and the daemon stopped with "lease lost").
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

sys.path.append(str(Path(__file__).resolve().parent))

from objstore_helpers import (
    BLOCK,
    Backend,
    Daemon,
    History,
    KiB,
    MiB,
    Serials,
    connected,
    content,
    import_libnbd,
    inspect_bucket,
    read_image,
)

OBJECT = 64 * KiB
PER_OBJECT = OBJECT // BLOCK
SIZE = 4 * MiB
CACHED_OBJECTS = 16
TIMEOUT = 3.0
#: How long the server stays down (from the moment it is killed).
OUTAGE = 10.0
#: Ceilings for calls that must end on their own (never expectations).
GUARD = 60.0


@pytest.fixture
def nbd() -> ModuleType:
    return import_libnbd()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="usbd-oo-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Disk:
    """A connection and what the test believes the device holds (a serial per block)."""

    def __init__(self, handle: Any, serials: Serials) -> None:
        self.handle = handle
        self.serials = serials
        self.expected = [0] * (SIZE // BLOCK)

    def write(self, first: int, count: int) -> None:
        taken = [self.serials.take() for _ in range(count)]
        data = b"".join(content(first + i, s) for i, s in enumerate(taken))
        self.handle.pwrite(data, first * BLOCK)
        self.expected[first : first + count] = taken

    def write_object(self, chunk: int) -> None:
        self.write(chunk * PER_OBJECT, PER_OBJECT)

    def check_object(self, chunk: int) -> None:
        first = chunk * PER_OBJECT
        data = bytes(self.handle.pread(OBJECT, first * BLOCK))
        for i in range(PER_OBJECT):
            got = data[i * BLOCK : (i + 1) * BLOCK]
            assert got == content(first + i, self.expected[first + i]), (
                f"object {chunk} block {i}: not the last write"
            )


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[Any]]:
    """Run ``call`` in a thread; the list gets ("ok", result) or ("error", exception)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", call()))
        except Exception as exc:
            outcome.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def error_number(error: Any) -> int | None:
    """The errno of a libnbd error (its binding gives the name, e.g. "EIO")."""
    value = error.errno
    return getattr(errno, value, None) if isinstance(value, str) else value


def wait_for(what: str, condition: Callable[[], bool], timeout: float = GUARD) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s", pytrace=False)
        time.sleep(0.2)


def test_an_outage_of_the_store_loses_nothing(nbd: ModuleType, workdir: Path, seaweed: Any) -> None:
    backend = Backend.s3(seaweed.objstore_cfg(seaweed.create_bucket("outage")))
    extra = [
        "--objstore-objsize", "64KiB",
        "--objstore-diskcache", str(CACHED_OBJECTS * OBJECT),
        "--objstore-persistcache",
        "--objstore-timeout", f"{TIMEOUT:g}s",
        "--objstore-flushevery", "0.5",
    ]  # fmt: skip
    daemon = Daemon(workdir, backend, size=SIZE, extra=extra)
    serials = Serials()
    zero = time.monotonic()
    timeline: list[str] = []

    def mark(what: str) -> None:
        timeline.append(f"{time.monotonic() - zero:6.2f} s  {what}")

    try:
        daemon.start()
        with connected(nbd, daemon) as handle:
            disk = Disk(handle, serials)
            # 40 objects through a cache of 16: writes wait for rounds to make room.
            for chunk in range(40):
                disk.write_object(chunk)
            handle.flush()
            wait_for(
                "the first 40 objects committed",
                lambda: (
                    set(inspect_bucket(backend, daemon.store_dir).manifest.chunks) == set(range(40))
                ),
            )
            for chunk in range(40):  # through the fetch path for most of them
                disk.check_object(chunk)
            for chunk in range(32, 40):  # the most recently used: these stay cached
                disk.check_object(chunk)
            mark("40 objects written, committed and read back")
            before = dict(inspect_bucket(backend, daemon.store_dir).manifest.chunks)

            seaweed.kill()
            down = time.monotonic()
            mark("SeaweedFS killed")

            for chunk in range(32, 40):
                disk.check_object(chunk)  # cached: served without the store

            started = time.monotonic()
            thread, outcome = in_thread(lambda: handle.pread(BLOCK, 0))
            thread.join(GUARD)
            took = time.monotonic() - started
            mark(f"the uncached read returned after {took:.1f} s")
            assert not thread.is_alive(), f"an uncached read hung for {GUARD:.0f} s"
            assert outcome and outcome[0][0] == "error", f"an uncached read returned {outcome}"
            error = outcome[0][1]
            assert isinstance(error, nbd.Error) and error_number(error) == errno.EIO, repr(error)
            assert took >= TIMEOUT / 2, f"the uncached read failed after {took:.1f} s, not retried"

            for chunk in range(32, 40):  # cached objects become dirty
                disk.write(chunk * PER_OBJECT + 3, 1)
            # New objects until the cache holds 16 dirty ones: the next write waits.
            with connected(nbd, daemon) as other:
                writer = Disk(other, serials)
                writer.expected = disk.expected
                done: list[int] = []

                def fill() -> None:
                    for chunk in range(40, 64):
                        writer.write_object(chunk)
                        done.append(chunk)

                filler, filled = in_thread(fill)
                last, quiet = -1, time.monotonic()
                while time.monotonic() - quiet < 3.0 and filler.is_alive():
                    if len(done) != last:
                        last, quiet = len(done), time.monotonic()
                    time.sleep(0.1)
                assert filler.is_alive(), f"every write completed during the outage: {filled}"
                assert len(done) == CACHED_OBJECTS - 8, (
                    f"{len(done)} new objects were written with 8 dirty ones cached, before "
                    f"writes waited; a cache of {CACHED_OBJECTS} objects holds "
                    f"{CACHED_OBJECTS - 8} more"
                )
                mark(f"{len(done)} new objects written, the next one waits")
                handle.flush()  # durable in the cache: needs no store
                for chunk in [*range(32, 40), *done]:
                    disk.check_object(chunk)
                assert filler.is_alive() and not filled, filled

                time.sleep(max(0.0, OUTAGE - (time.monotonic() - down)))
                mark("restarting SeaweedFS")
                seaweed.start()
                mark("SeaweedFS answers")

                filler.join(GUARD)
                assert not filler.is_alive(), (
                    f"the waiting write did not complete\n{daemon.report()}"
                )
                assert filled == [("ok", None)], filled
            mark("the waiting write completed")
            disk.check_object(0)  # the object that could not be read during the outage
            handle.flush()
            dirtied = set(range(32, 64))
            wait_for(
                "every object dirtied during the outage committed",
                lambda: all(
                    inspect_bucket(backend, daemon.store_dir).manifest.chunks.get(c, 0)
                    not in (0, before.get(c, 0))
                    for c in dirtied
                ),
            )
            mark("everything dirtied during the outage is committed")
            expected = list(disk.expected)
        daemon.kill()
        daemon.drop_cache()
        daemon.start()
        with connected(nbd, daemon) as handle:
            image = read_image(handle, SIZE)
        History(expected).check_flushed(image).assert_ok(
            "the bucket alone after the outage", daemon.report
        )
        mark("verified from the bucket alone")
        print("\n".join(timeline))
        daemon.stop()
    finally:
        daemon.close()


@pytest.mark.slow
def test_a_stall_of_the_store_during_a_lease_renewal_keeps_the_lease(
    nbd: ModuleType, workdir: Path, seaweed: Any
) -> None:
    """SeaweedFS frozen (SIGSTOP) for 4 s across the first lease renewal (15 s after the start:
    a quarter of the lease's 60 s), with -objstore-timeout 1s so that the renewal's request
    times out while the server holds it, then thawed (SIGCONT): the server applies the held
    request, the retry finds the ETag moved. Nobody else wants the volume: the daemon must go
    on serving."""
    backend = Backend.s3(seaweed.objstore_cfg(seaweed.create_bucket("stall")))
    extra = ["--objstore-objsize", "64KiB", "--objstore-timeout", "1s"]
    daemon = Daemon(workdir, backend, size=1 * MiB, extra=extra)
    try:
        daemon.start()
        serving = time.monotonic()
        with connected(nbd, daemon) as handle:
            disk = Disk(handle, Serials())
            disk.expected = [0] * (1 * MiB // BLOCK)
            disk.write(0, 1)
            handle.flush()
            time.sleep(max(0.0, serving + 13.0 - time.monotonic()))
            pid = seaweed.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(4.0)
            finally:
                os.kill(pid, signal.SIGCONT)
            time.sleep(3.0)  # the renewal's retries and the daemon's reaction
            assert daemon.alive(), f"the daemon stopped after a 4 s stall\n{daemon.report()}"
            try:
                disk.write(1, 1)
                handle.flush()
            except nbd.Error as exc:
                message = f"a write after the stall failed: {exc}\n{daemon.report()}"
                raise AssertionError(message) from None
        daemon.stop()
    finally:
        daemon.close()
