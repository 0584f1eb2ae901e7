"""The shared device suite (persistent variant: write, close, reopen, verify) on usbd-objstore,
over a local directory store, with and without a persistent cache.

Without a persistent cache, reopening finds no cache at all: everything read back comes from the
store, so the suite proves the upload, the manifest and the fetch path, not only the cache.
The same suite over a real S3 server (SeaweedFS) is in test_objstore_s3.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from usbd.core import Device
from usbd.core.testing import MakeDevice, PersistentDeviceTests, ReopenDevice
from usbd.objstore import LocalStore, ObjectStore, ObjStoreDevice, Params, open_volume

KiB = 1 << 10
KEY = bytes(range(1, 33))


def opener(
    store: Callable[[], ObjectStore],
    directory: Path,
    *,
    persistent: bool,
    object_size: int = 64 * KiB,
    encryption: str = "aes-gcm",
    compression: str = "zstd",
    cache_objects: int | None = None,
) -> tuple[MakeDevice, ReopenDevice]:
    """make_device and reopen_device for the suite: each device a new volume in ``store``."""
    names = (f"vol{n}" for n in itertools.count())

    def open_device(name: str, size: int) -> ObjStoreDevice:
        volume = open_volume(
            store(),
            name,
            Params(size, object_size, compression, encryption),
            set(),
            lambda mode: None if mode == "identity" else KEY,
            takeover=False,
            timeout=10,
        )
        return ObjStoreDevice(
            volume,
            directory / f"{name}.cache",
            persistent=persistent,
            cache_objects=cache_objects,
            workers=4,
            flush_every=0.2,
            timeout=10,
        )

    def make(size: int) -> Device:
        return open_device(next(names), size)

    def reopen(device: Device) -> Device:
        assert isinstance(device, ObjStoreDevice)
        return open_device(device.name, device.size)

    return make, reopen


class TestLocalPersistentCache(PersistentDeviceTests):
    """A persistent cache: flushes are durable locally, uploads follow in rounds."""

    trim_zeroes = True
    model_examples = 10

    @pytest.fixture
    def pair(self, tmp_path: Path) -> tuple[MakeDevice, ReopenDevice]:
        (tmp_path / "bucket").mkdir()
        return opener(lambda: LocalStore(tmp_path / "bucket"), tmp_path, persistent=True)

    @pytest.fixture
    def make_device(self, pair: tuple[MakeDevice, ReopenDevice]) -> MakeDevice:
        return pair[0]

    @pytest.fixture
    def reopen_device(self, pair: tuple[MakeDevice, ReopenDevice]) -> ReopenDevice:
        return pair[1]


class TestLocalTemporaryCache(TestLocalPersistentCache):
    """No persistent cache: FLUSH waits for the store, and a reopen reads everything from it."""

    @pytest.fixture
    def pair(self, tmp_path: Path) -> tuple[MakeDevice, ReopenDevice]:
        (tmp_path / "bucket").mkdir()
        return opener(lambda: LocalStore(tmp_path / "bucket"), tmp_path, persistent=False)


class TestLocalSmallCache(TestLocalPersistentCache):
    """A cache of 4 objects (of 64 KiB) under an 8 MiB device: every pass evicts, refetches,
    and waits for uploads to make room; no compression, no encryption (checksums instead)."""

    @pytest.fixture
    def pair(self, tmp_path: Path) -> tuple[MakeDevice, ReopenDevice]:
        (tmp_path / "bucket").mkdir()
        return opener(
            lambda: LocalStore(tmp_path / "bucket"),
            tmp_path,
            persistent=False,
            cache_objects=4,
            encryption="identity",
            compression="identity",
        )
