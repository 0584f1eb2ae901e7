"""Fixtures of the cross-driver crash loops, and their figures at the end of the session.

The helpers sit next to this file (crash_stamps.py, crash_drivers.py, crash_harness.py);
under --import-mode=importlib this directory is not on sys.path, so it is appended here.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

from crash_harness import FIGURES, keep_if_failed  # noqa: E402


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    """Each phase's report on the item (``item.crash_failed``), for the fixtures below."""
    report = yield
    if report.failed:
        item.crash_failed = True  # type: ignore[attr-defined]
    return report


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A short directory under /tmp (a unix socket path has 108 bytes at most; /tmp, not
    /dev/shm: a real file system, whose fdatasync does something), kept if the test
    fails."""
    path = Path(tempfile.mkdtemp(prefix="usbd-cr-", dir="/tmp"))
    try:
        yield path
    finally:
        keep_if_failed(request, path, "the daemon's directory")


@pytest.fixture
def seed() -> int:
    """USBD_CRASH_SEED, or a random seed (printed: a failure's message names it too)."""
    value = int(os.environ.get("USBD_CRASH_SEED") or random.randrange(1 << 32))
    print(f"USBD_CRASH_SEED={value}")
    return value


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per crash loop run: cycles, kills during FLUSH and startup, blocks verified,
    losses (passed or failed), so that ``nox -s crash`` prints the figures."""
    if not FIGURES:
        return
    terminalreporter.section("crash loops")
    for figures in FIGURES:
        terminalreporter.write_line(figures.line())
