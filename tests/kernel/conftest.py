"""Fixtures for tests inside a real Linux kernel with NBD (see ``vm.py``).

``vm`` is the one entry point: ``vm.run(script, timeout=..., env=..., memory=...)`` boots a
fresh VM, runs the bash script as root in the repository root and returns its
:class:`~vm.GuestResult`. The kernel is prepared once per session (and cached across
sessions). Missing QEMU skips the tests on a developer's machine and fails them in CI
(``CI=true``), as ``tests/conftest.py``'s ``require_tool`` does for client tools; any other
preparation failure is an error everywhere, never a skip.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# pytest's importlib mode does not put test directories on sys.path; the harness module
# sits beside this file, and test modules may import it too (``from vm import ...``).
sys.path.insert(0, str(Path(__file__).parent))

from vm import QEMU, VM, Kernel, prepare_kernel


@pytest.fixture(scope="session")
def kernel() -> Kernel:
    """The prepared guest kernel (downloaded and unpacked on first use)."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{QEMU} is required in CI but is not installed", pytrace=False)
        pytest.skip(f"{QEMU} is not installed (Debian: qemu-system-x86)")
    return prepare_kernel()


@pytest.fixture
def vm(kernel: Kernel) -> VM:
    """Boots one throw-away VM per ``run`` call."""
    return VM(kernel)
