"""What a driver package offers the daemons, and how the daemons find the installed ones.

Each driver distribution registers a :class:`Driver` in the entry-point group
``usbd.drivers``; its own console script and the ``usbdsrvd`` meta daemon are both built from
it by :mod:`usbd.core.cli`. A driver declares its options as a pydantic model; the command line,
the environment and the config file are all read through it, so a driver never parses a flag.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeAlias, TypeVar

from pydantic import BaseModel

from ._device import Device
from .metrics import Metric
from .settings import CommonSettings, NoOptions

__all__ = [
    "ENTRY_POINT_GROUP",
    "Action",
    "AnyDriver",
    "Driver",
    "Found",
    "NoOptions",
    "discover_drivers",
]

ENTRY_POINT_GROUP = "usbd.drivers"

OptionsT = TypeVar("OptionsT", bound=BaseModel)


@dataclass(frozen=True)
class Action(Generic[OptionsT]):
    """Something a driver's command does instead of serving (``usbd-dedup --check``): it gets
    the same settings and options a daemon would, and returns the exit status.

    It runs where the daemon would have, so a store is found from the same flags, environment
    and config file; a :class:`ValueError` it raises is exit status 2, an :class:`OSError` 1.
    """

    help: str
    run: Callable[[CommonSettings, OptionsT], int]


@dataclass(frozen=True)
class Driver(Generic[OptionsT]):
    """A device type: its options and how to build a device from them.

    ``options`` is a pydantic model whose fields become this driver's flags, prefixed with its
    ``name`` (a field ``memcache`` of driver ``dedup`` is ``-dedup-memcache``).  ``create``
    gets the shared settings and the driver's validated options; a :class:`ValueError` it
    raises is a configuration problem (exit status 2), an :class:`OSError` a failure to start.
    ``describe`` adds the driver's part to the startup line ("with 64 MiB objects, ..."):
    by default every option as ``name=value``, secrets as ``<REDACTED>``.
    ``stores_data`` says the device keeps data under ``--store-dir``. ``actions`` are the
    driver's other commands, by flag name (``check`` is ``--check``). ``metrics`` are the
    figures its devices report through :meth:`Device.metrics` (:mod:`usbd.core.metrics`):
    exposed as ``usbd_<name>_*`` by ``--metrics``, the headline ones in ``usbdsrvd status``.
    """

    name: str
    description: str
    options: type[OptionsT]
    create: Callable[[CommonSettings, OptionsT], Device]
    aliases: tuple[str, ...] = ()
    stores_data: bool = False
    describe: Callable[[CommonSettings, OptionsT], str] | None = None
    actions: Mapping[str, Action[OptionsT]] = field(default_factory=dict)
    metrics: tuple[Metric, ...] = ()

    def __post_init__(self) -> None:
        """Every option needs a default: usbdsrvd builds every installed driver's options
        whichever one is chosen, so one required option would break them all."""
        required = [name for name, info in self.options.model_fields.items() if info.is_required()]
        if required:
            raise TypeError(
                f"driver {self.name!r}: options without a default: {', '.join(required)}"
            )
        names = [metric.name for metric in self.metrics]
        if len(set(names)) != len(names):
            raise TypeError(f"driver {self.name!r}: a metric name is declared twice")

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


#: A driver whatever its options: what discovery finds and commands hold.
AnyDriver: TypeAlias = "Driver[Any]"


@dataclass(frozen=True)
class Found:
    """One entry point of the group: the driver it names, or why it could not be loaded."""

    name: str
    distribution: str
    value: str
    driver: AnyDriver | None
    error: str | None = None


def _load(point: EntryPoint) -> Found:
    distribution = point.dist.name if point.dist is not None else "an unknown distribution"
    try:
        loaded = point.load()
    except Exception as exc:  # a broken plugin must not take the daemon down with it
        reason = f"{type(exc).__name__}: {exc}"
        return Found(point.name, distribution, point.value, None, reason)
    if not isinstance(loaded, Driver):
        reason = f"{point.value} is a {type(loaded).__name__}, not a usbd.core.driver.Driver"
        return Found(point.name, distribution, point.value, None, reason)
    return Found(point.name, distribution, point.value, loaded)


def discover_drivers(group: str = ENTRY_POINT_GROUP) -> list[Found]:
    """Every entry point in ``group``, loaded, in name order; failures are kept, not raised,
    so that one broken distribution is reported by name while the others still work."""
    points = sorted(entry_points(group=group), key=lambda p: (p.name, p.value))
    return [_load(point) for point in points]
