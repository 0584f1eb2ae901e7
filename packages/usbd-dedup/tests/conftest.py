"""Fixtures for usbd-dedup's tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory for the store and the unix socket (pytest's tmp_path can exceed the
    108-byte limit of a socket path). /tmp, not /dev/shm: the tests need a real file system
    with holes."""
    path = Path(tempfile.mkdtemp(prefix="usbd-dd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
