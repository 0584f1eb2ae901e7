"""docs/configuration.md is generated from the settings models: it must match them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from usbd.core.cli import option_table, settings_class
from usbd.core.driver import discover_drivers
from usbd.srvd._main import command

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _generator() -> object:
    spec = importlib.util.spec_from_file_location(
        "gen_configuration", DOCS / "gen_configuration.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_matches_the_settings_models() -> None:
    expected = _generator().generate()  # type: ignore[attr-defined]
    actual = (DOCS / "configuration.md").read_text()
    assert actual == expected, (
        "docs/configuration.md is out of date: run python docs/gen_configuration.py"
    )


def test_every_flag_of_usbdsrvd_help_is_in_the_reference() -> None:
    """Belt and braces: the help (argparse) and the reference (markdown) come from one table,
    so every --flag the help shows must appear as -flag in the reference."""
    srvd = command(discover_drivers())
    text = (DOCS / "configuration.md").read_text()
    table = option_table(settings_class(srvd.settings, srvd.drivers), srvd.drivers)
    assert len(table) >= 14
    for option in table:
        assert f"`-{option.flag}" in text, option.flag
        assert f"`{option.env}`" in text, option.env
