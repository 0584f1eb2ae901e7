"""Fixtures for usbd-dedup's tests."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

#: Where Debian's python3-libnbd installs the ``nbd`` module (outside any virtualenv).
DIST_PACKAGES = "/usr/lib/python3/dist-packages"


@pytest.fixture(scope="session")
def libnbd() -> ModuleType:
    """The ``nbd`` module of python3-libnbd; Debian's directory is appended (never prepended,
    so it cannot shadow the virtualenv) only when a plain import fails. Missing, it skips on
    a developer's machine and fails in CI."""
    try:
        return importlib.import_module("nbd")
    except ImportError:
        if DIST_PACKAGES not in sys.path and os.path.isdir(DIST_PACKAGES):
            sys.path.append(DIST_PACKAGES)
    try:
        return importlib.import_module("nbd")
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("python3-libnbd is required in CI but is not available", pytrace=False)
        pytest.skip("python3-libnbd (the 'nbd' module) is not available")


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
