"""Fixtures for usbd-filedisk's tests; the helpers themselves live in filedisk_helpers.py."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The test modules import filedisk_helpers, which sits next to this file. Under
# --import-mode=importlib (as nox runs the tests) this directory is not on sys.path.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

from filedisk_helpers import Daemons  # noqa: E402


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory for the store and the unix socket (pytest's tmp_path can exceed the
    108-byte limit of a socket path). /tmp, not /dev/shm: the tests need a real file system
    with holes and direct I/O."""
    path = Path(tempfile.mkdtemp(prefix="usbd-fd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    """Start ``usbd-filedisk`` processes; each left running is stopped and checked at the end."""
    started = Daemons()
    try:
        yield started
    finally:
        started.stop_all()
