"""Fixtures for usbd-core's unit tests; the helpers themselves live in core_helpers.py."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The test modules import core_helpers, which sits next to this file. Under
# --import-mode=importlib (as nox runs the tests) this directory is not on sys.path.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (pytest's tmp_path can exceed the 108-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="usbd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["unix", "tcp"])
def where(request: pytest.FixtureRequest, sockdir: Path) -> str | None:
    """Where a test server listens: a unix socket path, or None for TCP on 127.0.0.1:0."""
    return str(sockdir / "nbd.sock") if request.param == "unix" else None
