"""The table of flags a command takes, derived from its settings model and its drivers' options.

One row per setting: the flag (``store-size``, ``dedup-memcache``), where its value goes in the
settings (``("store_size",)``, ``("dedup", "memcache")``), and how to show it. The flag
parser, the help, the error messages and the configuration reference all read this table,
so a field added to a model is everywhere at once.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ..driver import AnyDriver
from ..settings import ENV_PREFIX, CommonSettings, Flag

__all__ = ["Option", "base_type", "flag_info", "option_table"]

#: Headings of the shared settings in --help, in order.
GROUPS = {
    "general": "general",
    "storage": "storage (the original's -store-* flags)",
    "serving": "serving NBD clients",
    "tls": "TLS for NBD clients",
    "kernel": "kernel device (/dev/nbdX)",
}


@dataclass(frozen=True)
class Option:
    """One setting as the command line, the environment and the config file spell it."""

    flag: str
    loc: tuple[str, ...]
    help: str
    group: str
    metavar: str
    is_bool: bool = False
    repeat: bool = False
    secret: bool = False
    default: str | None = None
    choices: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        return ".".join(self.loc)

    @property
    def env(self) -> str:
        return ENV_PREFIX + "_".join(self.loc).upper()


def _metadata(annotation: Any) -> list[Flag]:
    """Flag metadata inside an annotation, looking through ``X | None`` and nested lists."""
    found: list[Flag] = []
    if typing.get_origin(annotation) is typing.Annotated:
        found.extend(m for m in annotation.__metadata__ if isinstance(m, Flag))
        return _metadata(typing.get_args(annotation)[0]) + found
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found.extend(_metadata(arg))
    return found


def flag_info(field: FieldInfo) -> Flag:
    """Every :class:`Flag` on a field merged, the outermost winning."""
    merged: dict[str, Any] = {}
    for flag in [*_metadata(field.annotation), *(m for m in field.metadata if isinstance(m, Flag))]:
        merged.update({k: v for k, v in vars(flag).items() if v not in (None, False)})
    return Flag(**merged)


def base_type(annotation: Any) -> Any:
    """``int`` for ``Annotated[int, ...] | None``: what kind of value the flag takes."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0]
        else:
            return annotation


def _default_text(field: FieldInfo, info: Flag) -> str | None:
    if info.secret or field.default is PydanticUndefined or field.default is None:
        return None
    if field.default is False or field.default in ("", []):
        return None
    show = info.show if info.show is not None else str
    return str(show(field.default))


def _option(flag: str, loc: tuple[str, ...], field: FieldInfo, group: str) -> Option:
    info = flag_info(field)
    kind = base_type(field.annotation)
    choices: tuple[str, ...] = ()
    if typing.get_origin(kind) is typing.Literal:
        choices = tuple(str(c) for c in typing.get_args(kind))
    metavar = info.metavar or ("|".join(choices) if choices else loc[-1].upper())
    return Option(
        flag=flag,
        loc=loc,
        help=field.description or "",
        group=info.group or group,
        metavar=metavar,
        is_bool=kind is bool,
        repeat=typing.get_origin(kind) is list,
        secret=info.secret,
        default=_default_text(field, info),
        choices=choices,
    )


def option_table(settings: type[CommonSettings], drivers: Sequence[AnyDriver]) -> list[Option]:
    """The shared settings (but the positional device) in model order, then each driver's."""
    table: list[Option] = []
    driver_fields = {driver.name for driver in drivers}
    for name, field in settings.model_fields.items():
        if name == "device" or name in driver_fields:
            continue
        table.append(_option(name.replace("_", "-"), (name,), field, "general"))
    for driver in drivers:
        for name, field in driver.options.model_fields.items():
            flag = f"{driver.name}-{name.replace('_', '-')}"
            table.append(_option(flag, (driver.name, name), field, driver.name))
    seen: dict[str, Option] = {}
    for option in table:
        other = seen.setdefault(option.flag, option)
        if other is not option:
            raise ValueError(
                f"two settings are both -{option.flag}: {'.'.join(other.loc)} and "
                f"{'.'.join(option.loc)}; a driver's options must not repeat a shared flag"
            )
    return table
