"""The issue's guarantees, one by one, on the device itself over a local directory store (the
same code paths as S3 below the store; the S3 edge has its own tests against SeaweedFS).

Integrity (tampered, moved and replayed objects are EIO), the wrong key and other parameters
refused at open, the lease and fencing, a round's point-in-time image under concurrent writes,
zeros never uploaded, and trimmed objects deleted once the manifest that drops them is in.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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
from usbd.objstore._lease import identity
from usbd.objstore._manifest import compression_of, data_key, load, params_of

KiB = 1 << 10
OBJECT = 64 * KiB
SIZE = 16 * OBJECT
KEY = bytes(range(1, 33))
OTHER_KEY = bytes(range(2, 34))


class Rig:
    """A bucket directory and a way to open devices on volume ``vol`` in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bucket = root / "bucket"
        self.bucket.mkdir()
        self.open: list[ObjStoreDevice] = []

    def store(self) -> ObjectStore:
        return LocalStore(self.bucket)

    def device(
        self,
        *,
        key: bytes = KEY,
        params: Params | None = None,
        given: frozenset[str] = frozenset(),
        persistent: bool = False,
        takeover: bool = False,
        cache: str = "vol.cache",
        store: ObjectStore | None = None,
        flush_every: float = 0,
        workers: int = 4,
    ) -> ObjStoreDevice:
        volume = open_volume(
            store or self.store(),
            "vol",
            params or Params(SIZE, OBJECT, "zstd", "aes-gcm"),
            set(given),
            lambda mode: None if mode == "identity" else key,
            takeover=takeover,
            timeout=5,
        )
        device = ObjStoreDevice(
            volume,
            self.root / cache,
            persistent=persistent,
            cache_objects=None,
            workers=workers,
            flush_every=flush_every,
            timeout=5,
        )
        self.open.append(device)
        return device

    def close(self, device: ObjStoreDevice) -> None:
        device.close()
        self.open.remove(device)

    def object_files(self) -> dict[int, Path]:
        """Chunk -> its (only) object's file."""
        found = {}
        for path in (self.bucket / "vol" / "data").iterdir():
            chunk = int(path.name.split(".")[0], 16)
            assert chunk not in found, f"two objects for chunk {chunk}"
            found[chunk] = path
        return found

    def image(self, key: bytes = KEY) -> bytes:
        """The device as the committed manifest says, decoded straight from the bucket."""
        store = self.store()
        codecs: list[Codec] = []

        def codec_for(public: dict[str, object]) -> Codec:
            params = params_of(public)
            codec = Codec(
                bytes.fromhex(str(public["volume"])), compression_of(params.compression), key
            )
            codecs.append(codec)
            return codec

        manifest = load(store, "vol", codec_for)
        assert manifest is not None
        image = bytearray(manifest.params.size)
        for chunk, generation in manifest.chunks.items():
            name = data_key("vol", chunk, generation)
            data = codecs[0].open(store.get(name), Kind.DATA, chunk, generation, name)
            image[chunk * OBJECT : chunk * OBJECT + len(data)] = data
        return bytes(image)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    yield made
    for device in list(made.open):
        made.close(device)


def written(rig: Rig, blocks: dict[int, bytes]) -> None:
    """A fresh volume with ``blocks`` (offset -> bytes) written, flushed into the bucket."""
    device = rig.device()
    for offset, data in blocks.items():
        device.write(offset, memoryview(data), False)
    device.flush()
    rig.close(device)


def test_a_flushed_write_is_in_the_bucket_and_zeros_are_never_uploaded(rig: Rig) -> None:
    device = rig.device()
    device.write(0, memoryview(b"a" * 5000), False)
    device.write(3 * OBJECT, memoryview(bytes(OBJECT)), False)  # a whole chunk of zeros
    device.write(5 * OBJECT + 7, memoryview(bytes(100)), False)  # zeros into a zero chunk
    device.flush()
    assert set(rig.object_files()) == {0}
    assert rig.image()[:5000] == b"a" * 5000
    rig.close(device)


def test_trim_of_whole_objects_deletes_them_after_the_commit(rig: Rig) -> None:
    written(rig, {0: b"x" * OBJECT, OBJECT: b"y" * OBJECT, 2 * OBJECT: b"z" * 10})
    assert set(rig.object_files()) == {0, 1, 2}
    device = rig.device()
    device.trim(0, 2 * OBJECT, False)  # chunks 0 and 1 whole
    device.zero(2 * OBJECT + 5, 2, may_trim=True, fua=False, fast=False)  # part of chunk 2
    device.flush()
    assert set(rig.object_files()) == {2}
    image = rig.image()
    assert image[: 2 * OBJECT] == bytes(2 * OBJECT)
    assert image[2 * OBJECT : 2 * OBJECT + 10] == b"zzzzz\0\0zzz"
    extents = device.extents(0, SIZE)
    assert extents[0].offset == 0 and extents[0].length == 2 * OBJECT and extents[0].flags
    rig.close(device)


@pytest.mark.parametrize("damage", ["flip a bit", "truncate", "swap chunks", "replay"])
def test_a_damaged_object_is_an_io_error_never_wrong_data(
    rig: Rig, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    written(rig, {0: b"A" * OBJECT, OBJECT: b"B" * OBJECT})
    files = rig.object_files()
    old = files[0].read_bytes()
    if damage == "replay":  # an older generation of chunk 0 put back under the current key
        written_again = rig.device()
        written_again.write(0, memoryview(b"C" * OBJECT), False)
        written_again.flush()
        rig.close(written_again)
        rig.object_files()[0].write_bytes(old)
    elif damage == "flip a bit":
        blob = bytearray(old)
        blob[len(blob) // 2] ^= 0x10
        files[0].write_bytes(bytes(blob))
    elif damage == "truncate":
        files[0].write_bytes(old[:-1])
    else:  # chunk 1's object under chunk 0's key
        files[0].write_bytes(files[1].read_bytes())
    device = rig.device()
    with pytest.raises(DeviceError) as raised:
        device.read(10, 100)
    assert raised.value.errno == errno.EIO
    assert "data/00000000." in caplog.text  # the log line names the object
    assert device.read(OBJECT, 10) == b"B" * 10  # the others are fine
    rig.close(device)


def test_the_wrong_key_is_refused_at_open(rig: Rig) -> None:
    written(rig, {0: b"secret"})
    with pytest.raises(OpenError, match=r"AES key .* does not open volume 'vol'"):
        rig.device(key=OTHER_KEY)
    # And the lease the refused open took is gone again.
    assert not (rig.bucket / "vol" / "lease").exists()


@pytest.mark.parametrize(
    ("params", "field", "flag"),
    [
        (Params(2 * SIZE, OBJECT, "zstd", "aes-gcm"), "size", "store-size"),
        (Params(SIZE, 2 * OBJECT, "zstd", "aes-gcm"), "object_size", "objstore-objsize"),
        (Params(SIZE, OBJECT, "gzip", "aes-gcm"), "compression", "objstore-compress"),
        (Params(SIZE, OBJECT, "zstd", "identity"), "encryption", "objstore-aesmode"),
    ],
)
def test_other_parameters_given_for_an_existing_volume_are_refused(
    rig: Rig, params: Params, field: str, flag: str
) -> None:
    written(rig, {0: b"data"})
    with pytest.raises(OpenError, match=f"was created with -{flag}="):
        rig.device(params=params, given=frozenset({field}))
    # Not given: the volume's own parameters are used.
    device = rig.device(params=params)
    assert device.size == SIZE and device.object_size == OBJECT
    assert device.read(0, 4) == b"data"
    rig.close(device)


def test_a_second_daemon_is_refused_naming_the_holder(rig: Rig) -> None:
    first = rig.device()
    with pytest.raises(OpenError, match=rf"vol/lease is held by .* pid {os.getpid()}"):
        rig.device(cache="other.cache")
    rig.close(first)
    rig.close(rig.device())  # released: it opens again


def fake_holder(rig: Rig, **fields: object) -> None:
    lease = rig.bucket / "vol" / "lease"
    lease.parent.mkdir(parents=True, exist_ok=True)
    body = {"host": "elsewhere", "pid": 4242, "token": "t", "renewed": 0.0, "ttl": 60.0}
    lease.write_text(json.dumps({**body, **fields}))


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over(rig: Rig) -> None:
    written(rig, {0: b"data"})
    me = identity()
    fields = {"host": me["host"], "machine": me["machine"], "boot": me["boot"]}
    # Another pid namespace (a container on this machine): its pid means nothing here.
    fake_holder(rig, **fields, pidns="4026531999", pid=2**22 + 12345, renewed=9e99)
    with pytest.raises(OpenError, match="is held by"):
        rig.device()
    # Ours, and no such process: taken over.
    fake_holder(rig, **fields, pidns=me["pidns"], pid=2**22 + 12345, renewed=9e99)
    rig.close(rig.device())


def test_an_expired_lease_needs_takeover_and_fences_the_old_holder(rig: Rig) -> None:
    old = rig.device()
    old.write(0, memoryview(b"old" * 100), False)
    old.flush()
    fake_holder(rig)  # as if the old holder had stopped renewing long ago, on another host
    with pytest.raises(OpenError, match=r"has expired: .* -objstore-takeover"):
        rig.device(cache="new.cache")
    new = rig.device(cache="new.cache", takeover=True)
    new.write(OBJECT, memoryview(b"new" * 100), False)
    new.flush()
    # The old holder's next commit fails (its head is not the bucket's any more): it stops.
    old.write(2 * OBJECT, memoryview(b"late" * 100), False)
    with pytest.raises(DeviceError) as raised:
        old.flush()
    assert raised.value.errno == errno.EIO
    with pytest.raises(DeviceError, match="fenced"):
        old.write(0, memoryview(b"more"), False)
    image = rig.image()
    assert image[:300] == b"old" * 100
    assert image[OBJECT : OBJECT + 300] == b"new" * 100
    assert image[2 * OBJECT : 2 * OBJECT + 400] == bytes(400)
    rig.close(new)


class Gate(LocalStore):
    """A store whose data PUTs wait at a gate, so a test can write during an upload round."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reached = threading.Event()
        self.release = threading.Event()

    def put(self, key: str, data: bytes, **kwargs: object) -> str:  # type: ignore[override]
        if "/data/" in key:
            self.reached.set()
            assert self.release.wait(10)
        return super().put(key, data, **kwargs)  # type: ignore[arg-type]


def test_a_round_uploads_the_device_as_it_was_when_the_round_began(rig: Rig) -> None:
    gate = Gate(rig.bucket)
    # One upload at a time: while the first waits at the gate, the others are still to be read.
    device = rig.device(store=gate, persistent=True, workers=1)
    for chunk in range(4):
        device.write(chunk * OBJECT, memoryview(bytes([chunk + 1]) * OBJECT), False)
    device.write(4 * OBJECT + 3, memoryview(b"partial"), False)
    gate.release.clear()
    round_ = threading.Thread(target=device.uploader.round)
    round_.start()
    assert gate.reached.wait(10)
    # Writes during the round, to chunks it has frozen: each must keep the round's copy.
    for chunk in range(4):
        device.write(chunk * OBJECT + 100, memoryview(b"after" * 10), False)
    device.write(4 * OBJECT, memoryview(b"X" * 20), False)
    gate.release.set()
    round_.join(10)
    image = rig.image()
    for chunk in range(4):
        assert image[chunk * OBJECT : (chunk + 1) * OBJECT] == bytes([chunk + 1]) * OBJECT
    assert image[4 * OBJECT : 4 * OBJECT + 10] == b"\0\0\0partial"
    # The writes after the cut are still dirty and go up with the next round.
    assert device.read(100, 5) == b"after"
    device.uploader.round()
    image = rig.image()
    assert image[100:150] == b"after" * 10
    assert image[4 * OBJECT : 4 * OBJECT + 20] == b"X" * 20
    rig.close(device)


def test_sequential_reads_fetch_ahead_and_random_ones_do_not(rig: Rig) -> None:
    written(rig, {chunk * OBJECT: bytes([chunk + 1]) * OBJECT for chunk in range(16)})
    device = rig.device()
    assert not device.chunks.held  # a cache of nothing: every read fetches
    for chunk in (9, 2, 14):  # scattered: no read-ahead
        device.read(chunk * OBJECT, 4096)
    assert set(device.chunks.held) == {9, 2, 14}
    for chunk in (4, 5):  # two in a row: the next ones come without being asked for
        assert device.read(chunk * OBJECT, OBJECT) == bytes([chunk + 1]) * OBJECT
    deadline = time.monotonic() + 10
    while not {6, 7, 8, 10, 11, 12, 13} <= set(device.chunks.held):
        assert time.monotonic() < deadline, sorted(device.chunks.held)
        time.sleep(0.01)
    assert device.read(13 * OBJECT, 10) == bytes([14]) * 10
    rig.close(device)


def test_concurrent_partial_writes_to_one_object_keep_each_others_bytes(rig: Rig) -> None:
    """nbdkit's S3 plugin once lost bytes here: two writes to parts of one object, each a
    read-modify-write of the whole object. Here both fetch into the cache once, then write."""
    base = bytes(range(256)) * (OBJECT // 256)
    written(rig, {0: base, OBJECT: base})
    device = rig.device(workers=8)
    pieces = {offset: os.urandom(512) for offset in range(0, 2 * OBJECT, 1024)}

    def write(offset: int) -> None:
        device.write(offset, memoryview(pieces[offset]), False)

    for _ in range(3):  # uncached the first time; each later pass races an upload round
        threads = [threading.Thread(target=write, args=(offset,)) for offset in pieces]
        round_ = threading.Thread(target=device.uploader.round)
        for thread in [*threads, round_]:
            thread.start()
        for thread in [*threads, round_]:
            thread.join(10)
    expected = bytearray(base + base)
    for offset, data in pieces.items():
        expected[offset : offset + 512] = data
    assert device.read(0, 2 * OBJECT) == expected
    device.flush()
    assert rig.image()[: 2 * OBJECT] == expected
    rig.close(device)


def test_a_local_store_removes_temporaries_of_puts_that_died(rig: Rig) -> None:
    written(rig, {0: b"x"})
    data = rig.bucket / "vol" / "data"
    dead = data / ".00000000.0000000200000009.4194999.1"  # no such pid (above pid_max)
    live = data / f".00000000.0000000200000008.{os.getpid()}.1"
    dead.write_bytes(b"half a PUT")
    live.write_bytes(b"a PUT under way")
    rig.close(rig.device())
    assert not dead.exists()
    assert live.exists()
