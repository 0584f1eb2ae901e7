"""The examples in README.md and docs/ are real code: extract them and run them.

The file-backed example of docs/writing-a-device.md goes through the whole shared device
suite as a persistent driver, so the page can only claim what the suite confirms.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from usbd.core import Device, Export, TransmissionFlag
from usbd.core._monitor import Monitor
from usbd.core.cli import describe_options, load_settings, option_table, settings_class
from usbd.core.settings import CommonSettings
from usbd.core.testing import MakeDevice, PersistentDeviceTests, ReopenDevice

ROOT = Path(__file__).resolve().parent.parent


def python_block(document: str, defines: str) -> dict[str, Any]:
    """Execute the ```python block of ``document`` that defines ``defines``."""
    text = (ROOT / document).read_text()
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL):
        if f"class {defines}" in block:
            namespace: dict[str, Any] = {"__name__": f"docs_example_{defines.lower()}"}
            # dont_inherit: not this file's "from __future__ import annotations", which would leave
            # pydantic models in the example with unresolvable string annotations.
            code = compile(block, f"{document}:{defines}", "exec", dont_inherit=True)
            exec(code, namespace)
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


def test_the_driver_example_of_cli_md_takes_its_options_from_every_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/cli.md's driver: its options are flags, USBD_* variables and file keys, its key
    comes from load_key (generated 0600 under the store dir) and is never described."""
    for name in list(os.environ):
        if name.startswith("USBD_"):
            monkeypatch.delenv(name)
    example = python_block("docs/cli.md", "ZeroOptions")
    driver = example["driver"]
    settings_cls = settings_class(CommonSettings, [driver])
    table = option_table(settings_cls, [driver])
    assert {o.flag for o in table if o.loc[0] == "zero"} == {"zero-chunk", "zero-aeskey"}
    config = tmp_path / "vol.toml"
    config.write_text('[zero]\nchunk = "2MiB"\n')
    monkeypatch.setenv("USBD_ZERO_CHUNK", "1MiB")
    flags = {"store_dir": str(tmp_path), "store_size": "4MiB"}
    settings = load_settings(settings_cls, table, flags, str(config))
    options = settings.zero  # type: ignore[attr-defined]
    assert options.chunk == 1 << 20  # the environment beats the file
    device = driver.create(settings, options)
    assert device.size == 4 << 20
    assert len(device.key) == 32
    assert (tmp_path / "key.aes").stat().st_mode & 0o777 == 0o600
    hexkey = "ab" * 16
    shown = describe_options(options.model_copy(update={"aeskey": f"key:{hexkey}"}))
    assert "aeskey=<REDACTED>" in shown
    assert hexkey not in shown


def test_the_metrics_example_of_writing_a_device_is_exposed_as_the_page_says() -> None:
    example = python_block("docs/writing-a-device.md", "TallyDisk")
    driver = example["driver"]
    device = example["TallyDisk"](1 << 20)
    device.write(0, memoryview(b"x" * 5000), False)
    device.write(8192, memoryview(b"y"), False)
    assert device.read(4094, 4) == b"xxxx"
    monitor = Monitor(
        Export(device), prog="usbd-tally", driver=driver.name, declared=driver.metrics
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(monitor)
    text = generate_latest(registry).decode()
    assert "usbd_tally_held_bytes 12288.0" in text  # three blocks touched
    assert "usbd_tally_writes_total 2.0" in text
    assert monitor.summary().startswith("held bytes 12 KiB, size 1.0 MiB")
