"""Write the metrics reference of docs/operations.md from the code: the engine's series and the
declared figures of every installed driver.

Run it after changing a metric: ``python docs/gen_operations.py``. It replaces what lies between
the ``metrics-reference`` markers and nothing else; tests/test_docs_operations.py fails while
the file and the code disagree.
"""

from __future__ import annotations

from pathlib import Path

from usbd.core.cli import metrics_reference
from usbd.core.driver import discover_drivers

TARGET = Path(__file__).with_name("operations.md")
START = "<!-- metrics-reference:start -->\n"
END = "<!-- metrics-reference:end -->\n"


def generate(text: str) -> str:
    """``text`` (the page) with its reference region written anew."""
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"{TARGET.name} lacks the markers {START.strip()} and {END.strip()}")
    drivers = [found.driver for found in discover_drivers() if found.driver is not None]
    return f"{head}{START}\n{metrics_reference(drivers)}\n{END}{tail}"


if __name__ == "__main__":
    TARGET.write_text(generate(TARGET.read_text()))
    print(f"wrote {TARGET}")
