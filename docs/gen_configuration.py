"""Write docs/configuration.md from the settings models of usbdsrvd and the installed drivers.

Run it after changing a setting: ``python docs/gen_configuration.py``. tests/test_docs_config.py
fails while the file and the models disagree.
"""

from __future__ import annotations

from pathlib import Path

from usbd.core.cli import config_reference
from usbd.core.driver import discover_drivers
from usbd.srvd._main import command

TARGET = Path(__file__).with_name("configuration.md")


def generate() -> str:
    return config_reference(command(discover_drivers()))


if __name__ == "__main__":
    TARGET.write_text(generate())
    print(f"wrote {TARGET}")
