"""Regressions found by a review of usbd-objstore (fixed in c106294), one test each: the
reviewer's reproduction, asserting the behaviour the device should have had.

Over a local directory store; :class:`Flaky` adds S3Store's retries and switches for outages,
slow PUTs and PUTs whose answer is lost. A crash is a real SIGKILL of a child process (this
file, run as a script: see the bottom) where the page cache must survive it, or a copy of the
cache and the bucket taken while the device runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

import usbd.objstore
import usbd.objstore._device as device_module
import usbd.objstore._lease as lease_module
from usbd.core import DeviceError
from usbd.objstore import (
    Codec,
    LocalStore,
    ObjectStore,
    ObjStoreDevice,
    OpenError,
    Params,
    open_volume,
)
from usbd.objstore._codec import Kind
from usbd.objstore._manifest import Manifest, compression_of, data_key, load, params_of
from usbd.objstore._store import Unavailable, _etag, retrying

KiB = 1 << 10
OBJECT = 64 * KiB
SIZE = 16 * OBJECT
KEY = bytes(range(1, 33))
#: Ceiling for anything that must end (a close, a blocked writer): hang detection, not speed.
HANG = 15.0

T = TypeVar("T")
#: A store call's deadline, as the stores take it (``usbd.objstore._store.Deadline``; spelt
#: out here so that this file also runs against the code before c106294, which had none).
Deadline = float | Callable[[], float | None] | None


class Flaky(LocalStore):
    """A local directory store that retries as :class:`~usbd.objstore.S3Store` does
    (``retrying`` on :class:`Unavailable` until the caller's deadline; none: for ever), with
    switches a test may flip at any time:

    * ``down_keys``: every call on a key containing one of these substrings fails as
      :class:`Unavailable` (an outage of those objects; ``""`` is an outage of everything);
    * ``slow_put``: seconds each data object's PUT takes (a store that answers, slowly);
    * ``lose_answer``: the next PUT of a key containing one of these lands, then its answer is
      lost and the call retried, as after a timeout or a reset (once per substring);
    * ``land_then_raise``: the next PUT of a key containing one of these lands, then fails to
      the caller as :class:`Unavailable`, as when the retries ran out or the directory's fsync
      failed after the rename (once per substring).

    ``refused`` counts the calls failed by ``down_keys``.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.down_keys: set[str] = set()
        self.slow_put = 0.0
        self.lose_answer: set[str] = set()
        self.land_then_raise: set[str] = set()
        self.refused = 0
        self._switches = threading.Lock()

    def _gate(self, what: str, keys: Sequence[str]) -> None:
        for key in keys:
            if any(part in key for part in list(self.down_keys)):
                with self._switches:
                    self.refused += 1
                raise Unavailable(f"{what} {key}: down (test)", key)

    def _take(self, switch: set[str], key: str) -> bool:
        """Whether ``switch`` names ``key``, consuming the entry that does."""
        with self._switches:
            for part in list(switch):
                if part in key:
                    switch.discard(part)
                    return True
        return False

    def _gated(self, what: str, keys: Sequence[str], call: Callable[[], T]) -> Callable[[], T]:
        def attempt() -> T:
            self._gate(what, keys)
            return call()

        return attempt

    def get(self, key: str, deadline: Deadline = None) -> bytes:
        return retrying(self._gated("GET", [key], lambda: LocalStore.get(self, key)), deadline)

    def get_tagged(self, key: str, deadline: Deadline = None) -> tuple[bytes, str]:
        data = self.get(key, deadline)
        return data, _etag(data)

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        deadline: Deadline = None,
    ) -> str:
        def call() -> str:
            if "/data/" in key and self.slow_put:
                time.sleep(self.slow_put)
            etag = LocalStore.put(self, key, data, if_match=if_match, if_none_match=if_none_match)
            if self._take(self.lose_answer, key):
                raise Unavailable(f"PUT {key}: the answer was lost (test)", key)
            return etag

        etag = retrying(self._gated("PUT", [key], call), deadline)
        if self._take(self.land_then_raise, key):
            raise Unavailable(f"PUT {key}: landed, then failed (test)", key)
        return etag

    def delete(self, keys: Sequence[str], deadline: Deadline = None) -> None:
        retrying(self._gated("DELETE", keys, lambda: LocalStore.delete(self, keys)), deadline)

    def list(self, prefix: str, deadline: Deadline = None) -> Iterator[str]:
        keys = retrying(
            self._gated("LIST", [prefix], lambda: [*LocalStore.list(self, prefix)]), deadline
        )
        yield from keys


def open_device(
    store: ObjectStore,
    cache: Path,
    *,
    persistent: bool = False,
    cache_objects: int | None = None,
    takeover: bool = False,
    flush_every: float = 0.0,
    workers: int = 4,
    timeout: float = 5.0,
) -> ObjStoreDevice:
    """A device on volume ``vol`` of ``store`` (created if new), as the driver opens one: the
    lease is released again if the device cannot be made."""
    volume = open_volume(
        store,
        "vol",
        Params(SIZE, OBJECT, "zstd", "aes-gcm"),
        set(),
        lambda mode: None if mode == "identity" else KEY,
        takeover=takeover,
        timeout=5,
    )
    try:
        return ObjStoreDevice(
            volume,
            cache,
            persistent=persistent,
            cache_objects=cache_objects,
            workers=workers,
            flush_every=flush_every,
            timeout=timeout,
        )
    except BaseException:
        volume.lease.release()
        raise


class Rig:
    """A bucket directory under ``root``, and devices on it that the test leaves open closed
    at its end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bucket = root / "bucket"
        self.bucket.mkdir()
        self.open: list[ObjStoreDevice] = []
        self.stores: list[Flaky] = []

    def flaky(self) -> Flaky:
        """A :class:`Flaky` store on the bucket, healed when the test ends (so that a call
        that retries for ever, as some did before c106294, ends too)."""
        store = Flaky(self.bucket)
        self.stores.append(store)
        return store

    def heal(self) -> None:
        for store in self.stores:
            store.down_keys.clear()
            store.slow_put = 0.0

    def device(
        self,
        *,
        store: ObjectStore | None = None,
        bucket: Path | None = None,
        cache: str = "vol.cache",
        persistent: bool = False,
        cache_objects: int | None = None,
        takeover: bool = False,
        workers: int = 4,
        timeout: float = 5.0,
    ) -> ObjStoreDevice:
        device = open_device(
            store or LocalStore(bucket or self.bucket),
            self.root / cache,
            persistent=persistent,
            cache_objects=cache_objects,
            takeover=takeover,
            workers=workers,
            timeout=timeout,
        )
        self.open.append(device)
        return device

    def close(self, device: ObjStoreDevice) -> None:
        device.close()
        self.open.remove(device)

    def head(self, bucket: Path | None = None) -> tuple[Manifest, Codec]:
        """The bucket's committed manifest, and the codec that opens its objects."""
        codecs: list[Codec] = []

        def codec_for(public: dict[str, object]) -> Codec:
            params = params_of(public)
            codecs.append(
                Codec(bytes.fromhex(str(public["volume"])), compression_of(params.compression), KEY)
            )
            return codecs[-1]

        manifest = load(LocalStore(bucket or self.bucket), "vol", codec_for)
        assert manifest is not None
        return manifest, codecs[-1]

    def missing(self, bucket: Path | None = None) -> list[str]:
        """The objects the committed manifest names that are not in the bucket."""
        bucket = bucket or self.bucket
        manifest, _codec = self.head(bucket)
        keys = [data_key("vol", c, g) for c, g in sorted(manifest.chunks.items())]
        return [key for key in keys if not (bucket / key).exists()]

    def image(self, bucket: Path | None = None) -> bytes:
        """The device as the committed manifest says, decoded straight from the bucket."""
        bucket = bucket or self.bucket
        manifest, codec = self.head(bucket)
        store = LocalStore(bucket)
        image = bytearray(manifest.params.size)
        for chunk, generation in manifest.chunks.items():
            key = data_key("vol", chunk, generation)
            data = codec.open(store.get(key), Kind.DATA, chunk, generation, key)
            image[chunk * OBJECT : chunk * OBJECT + len(data)] = data
        return bytes(image)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    yield made
    made.heal()
    for device in reversed(made.open):
        made.close(device)


def wait_for(condition: Callable[[], bool], timeout: float = HANG) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """``call`` started in a daemon thread (one that hangs must not hold the run up); the list
    receives its result or the exception it raised."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@contextlib.contextmanager
def child(
    case: str, root: Path, *, prefix: Sequence[str] = ()
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """This file run as a script for ``case`` (see ``CHILDREN``), with the words of the line
    it printed once ready. The child runs the same ``usbd.objstore`` as this test (checked),
    and ends when its standard input is closed, if it is still running then."""
    command = [*prefix, sys.executable, __file__, case, str(root)]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdin is not None and process.stdout is not None
        try:
            words = process.stdout.readline().split()
            assert len(words) >= 2, f"the child for {case} died before it was ready"
            assert words[1] == usbd.objstore.__file__, "the child runs another usbd.objstore"
            yield process, words
        finally:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
            try:
                process.wait(HANG)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def kill9(process: subprocess.Popen[str]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(HANG) == -signal.SIGKILL


# -- the tests ----------------------------------------------------------------------------------


def test_an_unclean_restart_does_not_bring_back_unflushed_bytes_of_an_unlisted_chunk(
    rig: Rig,
) -> None:
    # The child flushes with no chunk held, then writes part of chunk 5 and is killed: its
    # state file never heard of chunk 5, whose bytes are in the cache file all the same.
    with child("unflushed-partial-write", rig.root) as (process, _words):
        kill9(process)
    device = rig.device(persistent=True)  # the dead pid's lease is taken over
    assert device.read(5 * OBJECT + 8192, 4096) == bytes(4096)
    # A write to another part of the chunk, which has no object: it starts from zeros.
    device.write(5 * OBJECT, memoryview(b"w" * 512), False)
    assert device.read(5 * OBJECT + 8192, 4096) == bytes(4096), "unflushed bytes came back"
    rig.close(device)  # uploads chunk 5
    chunk = rig.image()[5 * OBJECT : 6 * OBJECT]
    assert chunk == b"w" * 512 + bytes(OBJECT - 512)


def test_a_commit_whose_answer_is_lost_is_settled_before_the_next_one(rig: Rig) -> None:
    store = rig.flaky()
    device = rig.device(store=store)
    device.write(0, memoryview(b"A0" * (OBJECT // 2)), False)
    device.write(OBJECT, memoryview(b"B0" * (OBJECT // 2)), False)
    device.flush()
    device.write(0, memoryview(b"A1" * (OBJECT // 2)), False)
    store.land_then_raise.add("vol/manifest")
    assert device.uploader.round() is False  # the head was replaced, the answer said it failed
    assert not store.land_then_raise
    device.write(OBJECT, memoryview(b"B2" * (OBJECT // 2)), False)
    device.flush()  # it succeeds: B2 must be in the bucket, and nothing the head names deleted
    assert rig.missing() == [], "the committed head names deleted objects"
    head, _codec = rig.head()
    assert device.uploader.manifest.seq == head.seq
    assert dict(device.uploader.manifest.chunks) == dict(head.chunks)
    image = rig.image()
    assert image[:OBJECT] == b"A1" * (OBJECT // 2)
    assert image[OBJECT : 2 * OBJECT] == b"B2" * (OBJECT // 2)


def test_flush_without_a_persistent_cache_waits_for_a_slow_store(rig: Rig) -> None:
    store = rig.flaky()
    # 16 objects, 2 at a time, 0.2 s each: the round takes well over the 1 s timeout, but the
    # store takes an object every 0.2 s all along.
    device = rig.device(store=store, workers=2, timeout=1.0)
    for chunk in range(16):
        device.write(chunk * OBJECT, memoryview(bytes([chunk + 1]) * OBJECT), False)
    store.slow_put = 0.2
    device.flush()
    image = rig.image()
    for chunk in range(16):
        assert image[chunk * OBJECT : (chunk + 1) * OBJECT] == bytes([chunk + 1]) * OBJECT


@pytest.mark.parametrize("outage", ["round under way", "commit at close"])
def test_close_during_an_outage_returns_within_its_bound(
    rig: Rig, outage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device_module, "CLOSE_TIMEOUT", 1.0)
    store = rig.flaky()
    device = rig.device(store=store)
    device.write(0, memoryview(b"x" * 100), False)
    if outage == "round under way":
        # The uploader's own round retries its PUT (no deadline) when close begins.
        store.down_keys.add("/data/")
        device.uploader.request()
        assert wait_for(lambda: store.refused > 0)
    else:
        # The data goes up; the manifest does not: close's own round retries its commit.
        store.down_keys.add("vol/manifest")
    closer, _outcome = in_thread(device.close)
    closer.join(HANG)
    assert not closer.is_alive(), f"close() still running after {HANG:.0f} s (bound 1 s)"
    rig.open.remove(device)
    assert (rig.root / "vol.cache").is_dir(), "close dropped the data it could not upload"
    # Once the store is back, the next open uploads it.
    store.down_keys.clear()
    device = rig.device()
    assert device.read(0, 100) == b"x" * 100
    rig.close(device)
    assert rig.image()[:100] == b"x" * 100


def test_a_writer_waiting_for_room_gets_eio_once_the_device_is_fenced(rig: Rig) -> None:
    old = rig.device(cache="old.cache", cache_objects=4)
    for chunk in range(4):  # the cache is full of dirty chunks
        old.write(chunk * OBJECT, memoryview(b"o" * OBJECT), False)
    # As if the old holder had stopped renewing long ago, elsewhere: the volume is taken over.
    lease = {"host": "elsewhere", "pid": 1, "token": "t", "renewed": 0.0, "ttl": 60.0}
    (rig.bucket / "vol" / "lease").write_text(json.dumps(lease))
    rig.device(cache="new.cache", takeover=True)
    # Room for chunk 5 needs a round, whose commit finds the volume fenced.
    writer, outcome = in_thread(lambda: old.write(5 * OBJECT, memoryview(b"z" * 10), False))
    writer.join(HANG)
    assert not writer.is_alive(), f"the writer still waits for room after {HANG:.0f} s"
    assert old.failed() is not None
    [error] = outcome
    assert isinstance(error, DeviceError), error
    assert error.errno == errno.EIO


def test_a_lease_renewal_whose_answer_is_lost_does_not_lose_the_lease(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease_module, "TTL", 0.4)  # a renewal every 0.1 s, same code path
    store = rig.flaky()
    device = rig.device(store=store)
    lease = rig.bucket / "vol" / "lease"
    store.lose_answer.add("vol/lease")  # the next renewal lands, its answer is lost
    assert wait_for(lambda: not store.lose_answer)
    landed = lease.read_bytes()
    # The renewals after it land again, or the device calls the lease lost.
    assert wait_for(lambda: device.failed() is not None or lease.read_bytes() != landed)
    assert device.failed() is None
    assert json.loads(lease.read_bytes())["token"] == device.volume.me["token"]
    device.write(0, memoryview(b"still ours"), False)
    device.flush()
    assert rig.image()[:10] == b"still ours"


def test_recovered_dirty_data_without_a_persistent_cache_survives_a_run_that_dies(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device_module, "CLOSE_TIMEOUT", 1.0)
    store = rig.flaky()
    store.down_keys.add("/data/")
    first = rig.device(store=store)
    first.write(0, memoryview(b"precious" * 8), False)
    rig.close(first)  # it cannot upload: the cache is kept, to go up at the next open
    assert (rig.root / "vol.cache").is_dir()
    # The next run, with the data still refused, is killed (if it opened at all).
    with child("recovery-run", rig.root) as (process, words):
        if words[0] == "READY":
            kill9(process)
    third = rig.device()
    assert third.read(0, 64) == b"precious" * 8
    rig.close(third)
    assert rig.image()[:64] == b"precious" * 8


def test_a_failed_state_save_after_a_commit_keeps_the_chunks_from_eviction(rig: Rig) -> None:
    device = rig.device(persistent=True, cache_objects=4)
    for chunk in range(4):
        device.write(chunk * OBJECT, memoryview(b"B" * OBJECT), False)
    device.flush()  # the durable state: chunks 0-3 dirty
    real = device.files.save_state

    def fail_once(state: object) -> None:
        device.files.save_state = real  # type: ignore[method-assign]
        raise OSError(errno.ENOSPC, "No space left on device (test)")

    device.files.save_state = fail_once  # type: ignore[method-assign]
    # The round commits chunks 0-3; the state save after it fails (raising, before c106294).
    with contextlib.suppress(OSError):
        device.uploader.round()
    assert rig.image()[:OBJECT] == b"B" * OBJECT
    for chunk in range(4, 8):  # writers need room: chunks 0-3 may be evicted only once safe
        device.write(chunk * OBJECT, memoryview(b"C" * OBJECT), False)
    # kill -9 now, simulated by copying the cache and the bucket (the page cache survives it)
    # of a quiet device: no round under way.
    device.uploader.stop()
    shutil.copytree(rig.root / "vol.cache", rig.root / "crash.cache")
    crashed = rig.root / "crash.bucket"
    shutil.copytree(rig.bucket, crashed)
    (crashed / "vol" / "lease").unlink()
    after = rig.device(bucket=crashed, cache="crash.cache", persistent=True, cache_objects=4)
    assert after.read(0, OBJECT) == b"B" * OBJECT, "committed and flushed data lost"
    rig.close(after)
    fresh = rig.device(bucket=crashed, cache="fresh.cache")
    assert fresh.read(0, 4 * OBJECT) == b"B" * (4 * OBJECT)


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False
    )
    return probe.returncode == 0


def test_a_live_holder_in_another_pid_namespace_keeps_its_lease(rig: Rig) -> None:
    if not _unshare_works():
        pytest.skip("unshare --pid --mount-proc is not allowed here (it needs CAP_SYS_ADMIN)")
    namespace = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    with child("lease-holder", rig.root, prefix=namespace) as (process, words):
        assert words[0] == "READY"
        assert words[2] == "1", "the holder is not pid 1 of a namespace of its own"
        # Same host, machine and boot; our pid 1 is not the holder: it is not known dead.
        with pytest.raises(OpenError, match="is held by"):
            rig.device(cache="b.cache")
        assert process.poll() is None
    assert process.returncode == 0


# -- children: this file run as a script ----------------------------------------------------


def _ready(*words: object) -> None:
    print("READY", usbd.objstore.__file__, *words, flush=True)


def _wait_for_the_parent() -> None:
    sys.stdin.read()


def _unflushed_partial_write(root: Path) -> None:
    device = open_device(LocalStore(root / "bucket"), root / "vol.cache", persistent=True)
    device.flush()  # the state is saved: no chunk held
    device.write(5 * OBJECT + 8192, memoryview(b"S" * 4096), False)  # never flushed
    _ready()
    _wait_for_the_parent()
    os._exit(1)  # killed before this


def _recovery_run(root: Path) -> None:
    store = Flaky(root / "bucket")
    store.down_keys.add("/data/")
    try:
        open_device(store, root / "vol.cache", timeout=1.0)
    except OpenError as exc:
        print("REFUSED", usbd.objstore.__file__, exc, flush=True)
        return
    _ready()
    _wait_for_the_parent()
    os._exit(1)  # killed before this


def _lease_holder(root: Path) -> None:
    device = open_device(LocalStore(root / "bucket"), root / "a.cache", persistent=True)
    device.write(0, memoryview(b"first daemon" * 10), False)
    device.flush()
    _ready(json.loads((root / "bucket" / "vol" / "lease").read_text())["pid"])
    _wait_for_the_parent()
    device.close()


CHILDREN: dict[str, Callable[[Path], None]] = {
    "unflushed-partial-write": _unflushed_partial_write,
    "recovery-run": _recovery_run,
    "lease-holder": _lease_holder,
}

if __name__ == "__main__":
    CHILDREN[sys.argv[1]](Path(sys.argv[2]))
