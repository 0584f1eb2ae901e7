"""Sizes as people write them: "1.0 GiB", "20GiB", "100 MiB", "512", "4k".

Parsing and printing follow the original project, so that its flags keep working: decimal
(kB, MB, ...) and binary (KiB, MiB, ...) units, case-insensitive, an optional decimal point.
"""

from __future__ import annotations

import re

__all__ = ["format_size", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1000**4,
    "tib": 1 << 40,
    "p": 1 << 50,
    "pb": 1000**5,
    "pib": 1 << 50,
    "e": 1 << 60,
    "eb": 1000**6,
    "eib": 1 << 60,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")
_PRINT_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def parse_size(text: str) -> int:
    """Bytes in ``text``; ValueError (saying what is accepted) for anything else.

    Single letters (k, M, G, T) are binary, as with nbdkit and qemu-img.
    """
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: expected a number and a unit such as 512, 4KiB, 100 MiB, "
            "1.5GiB or 2TB (units: B, kB, KiB, MB, MiB, GB, GiB, TB, TiB, PB, PiB, EB, EiB)"
        )
    number = match.group(1)
    whole, _, fraction = number.partition(".")
    scale = _UNITS[unit]
    value = int(whole or "0") * scale
    if fraction:
        value += int(fraction) * scale // 10 ** len(fraction)
    return value


def format_size(size: int) -> str:
    """Binary units as the original printed them: "1.0 GiB" below ten units, "64 MiB" above."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    unit = 0
    while value >= 1024 and unit < len(_PRINT_UNITS) - 1:
        value /= 1024
        unit += 1
    if value < 10:
        return f"{value:.1f} {_PRINT_UNITS[unit]}"
    return f"{value:.0f} {_PRINT_UNITS[unit]}"
