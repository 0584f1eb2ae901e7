"""The shared persistent suite on usbd-dedup: every block size class, with and without
compression and verify, reopened from its directory after close."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from usbd.core import Device
from usbd.core.testing import MakeDevice, PersistentDeviceTests, ReopenDevice
from usbd.dedup import DedupDevice, open_volume


def open_device(
    directory: Path,
    size: int | None = None,
    *,
    block_size: int | None = None,
    compress: bool = True,
    verify: bool = False,
) -> DedupDevice:
    volume = open_volume(
        directory,
        size=size,
        block_size=block_size,
        memcache=16 << 20,
        compress=compress,
        verify=verify,
    )
    return DedupDevice(volume, commit_every=0.2, pending_limit=512)


class DedupSuite(PersistentDeviceTests):
    """Trim drops whole blocks' references, so trimmed whole blocks read as zeros; a trimmed
    part of a block keeps its data (trim may leave anything)."""

    model_examples = 10  # the slow run explores 300
    block_size: int | None = None
    compress = True
    verify = False

    @pytest.fixture
    def make_device(self, tmp_path: Path) -> MakeDevice:
        names = (tmp_path / f"vol-{n}.dedup" for n in itertools.count())
        return lambda size: open_device(
            next(names),
            size,
            block_size=self.block_size,
            compress=self.compress,
            verify=self.verify,
        )

    @pytest.fixture
    def reopen_device(self) -> ReopenDevice:
        def reopen(device: Device) -> Device:
            assert isinstance(device, DedupDevice)
            return open_device(device.volume.directory, compress=self.compress, verify=self.verify)

        return reopen


class TestDedup(DedupSuite):
    pass


class TestDedupIdentityVerify(DedupSuite):
    compress = False
    verify = True


class TestDedupSmallBlocks(DedupSuite):
    block_size = 512


class TestDedupLargeBlocksVerify(DedupSuite):
    block_size = 64 << 10
    verify = True
