"""The examples in README.md and docs/ are real code: extract them and run them.

The file-backed example of docs/writing-a-device.md goes through the whole shared device
suite as a persistent driver, so the page can only claim what the suite confirms.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from usbd.core import Device, Export, TransmissionFlag
from usbd.core.testing import MakeDevice, PersistentDeviceTests, ReopenDevice

ROOT = Path(__file__).resolve().parent.parent


def python_block(document: str, defines: str) -> dict[str, Any]:
    """Execute the ```python block of ``document`` that defines ``defines``."""
    text = (ROOT / document).read_text()
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL):
        if f"class {defines}" in block:
            namespace: dict[str, Any] = {"__name__": f"docs_example_{defines.lower()}"}
            exec(compile(block, f"{document}:{defines}", "exec"), namespace)
            return namespace
    raise AssertionError(f"{document} has no python block defining {defines}")


SparseFile: Callable[[str, int], Device] = python_block("docs/writing-a-device.md", "SparseFile")[
    "SparseFile"
]


class TestWritingADeviceExample(PersistentDeviceTests):
    model_examples = 8

    @pytest.fixture
    def make_device(self, tmp_path: Path) -> MakeDevice:
        paths = iter(tmp_path / f"disk-{n}.img" for n in range(1_000_000))
        return lambda size: SparseFile(str(next(paths)), size)

    @pytest.fixture
    def reopen_device(self) -> ReopenDevice:
        def reopen(device: Device) -> Device:
            return SparseFile(device.path, device.size)  # type: ignore[attr-defined]

        return reopen


def test_readme_example_is_a_read_only_disk_of_zeros() -> None:
    zeros = python_block("README.md", "Zeros")["Zeros"](1 << 20)
    export = Export(zeros)
    assert export.flags & TransmissionFlag.READ_ONLY
    assert not export.flags & TransmissionFlag.SEND_TRIM
    assert bytes(zeros.read(12345, 100)) == bytes(100)
