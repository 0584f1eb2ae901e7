"""What a driver package offers the command-line tools, found through entry points.

Each driver distribution registers a :class:`Driver` in the entry-point group
``usbd.drivers``; its own console script and the ``usbdsrvd`` meta daemon are both built from
it by :func:`usbd.core.cli.main`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

from ._device import Device

__all__ = ["ENTRY_POINT_GROUP", "Driver"]

ENTRY_POINT_GROUP = "usbd.drivers"


@dataclass(frozen=True)
class Driver:
    """A device type: how to configure it from the command line and how to build it."""

    name: str
    description: str
    create: Callable[[argparse.Namespace], Device]
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    aliases: tuple[str, ...] = field(default=())
    describe: Callable[[argparse.Namespace], str] = lambda args: ""
