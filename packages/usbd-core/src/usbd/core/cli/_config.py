"""Settings for one run: flags over ``USBD_*`` over the ``--config`` file over defaults.

pydantic-settings merges the sources and validates the result; this module adds what a daemon
needs around it: the settings class with the drivers' options nested in it, a config file that
must exist and parse, and validation errors turned into one line that names the flag, says
where the bad value came from (flag, environment variable or file) and what is accepted.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, ValidationError, create_model
from pydantic_core import ErrorDetails
from pydantic_settings import SettingsError

from ..driver import AnyDriver
from ..settings import ENV_PREFIX, CommonSettings
from ._errors import UsageError
from ._options import Option, base_type

__all__ = ["load_settings", "read_config_file", "settings_class"]


def settings_class(
    base: type[CommonSettings], drivers: Sequence[AnyDriver]
) -> type[CommonSettings]:
    """``base`` with one nested field per driver holding that driver's options."""
    fields: dict[str, Any] = {}
    for driver in drivers:
        if not driver.name.isidentifier() or driver.name in base.model_fields:
            raise ValueError(f"driver name {driver.name!r} cannot name its options")
        options: Any = Annotated[driver.options, BeforeValidator(_literal_numbers(driver.options))]
        fields[driver.name] = (options, Field(default_factory=driver.options))
    return create_model("Settings", __base__=base, **fields)


def _literal_numbers(model: type[BaseModel]) -> Callable[[Any], Any]:
    """Flags and environment variables are strings, and pydantic matches ``Literal[512, 4096]``
    only against numbers: turn "4096" into 4096 for such options before validation."""
    numeric = set()
    for name, info in model.model_fields.items():
        kind = base_type(info.annotation)
        if typing.get_origin(kind) is typing.Literal and all(
            isinstance(choice, int) for choice in typing.get_args(kind)
        ):
            numeric.add(name)

    def convert(values: Any) -> Any:
        if not isinstance(values, Mapping) or not numeric:
            return values
        converted = dict(values)
        for name in numeric & set(converted):
            text = converted[name]
            if isinstance(text, str) and text.strip().isascii() and text.strip().isdigit():
                converted[name] = int(text)
        return converted

    return convert


def read_config_file(path: str, table: Sequence[Option]) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's values nested as the settings are, and each value's key as the file wrote it.

    Keys are the flag names (``store-size``) or field names (``store_size``); a driver's may be
    written ``objstore-kind`` at the top level or ``kind`` in an ``[objstore]`` table.
    """
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise UsageError(f"-config: cannot read {path!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"-config: {path!r} is not valid TOML: {exc}") from None
    by_key = {option.flag.replace("-", "_"): option for option in table}
    drivers = {option.loc[0] for option in table if len(option.loc) == 2}
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}

    def put(loc: tuple[str, ...], key: str, value: Any) -> None:
        target = values
        for part in loc[:-1]:
            target = target.setdefault(part, {})
        target[loc[-1]] = value
        origins[".".join(loc)] = key

    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key in drivers and isinstance(value, Mapping):
            for raw_sub, sub in value.items():
                put((key, raw_sub.replace("-", "_")), f"{raw_key}.{raw_sub}", sub)
        elif key in by_key:
            put(by_key[key].loc, raw_key, value)
        else:
            # Unknown keys go through to the model, which refuses them by name.
            put((key,), raw_key, value)
    return values, origins


def _nested(values: Mapping[str, Any], loc: Sequence[str | int]) -> bool:
    current: Any = values
    for part in loc:
        if not isinstance(current, Mapping) or part not in current:
            return False
        current = current[part]
    return True


def _env_name(loc: Sequence[str | int]) -> str | None:
    name = ENV_PREFIX + "_".join(str(part) for part in loc if isinstance(part, str)).upper()
    return next((key for key in os.environ if key.upper() == name), None)


def _reason(error: ErrorDetails, secret: bool) -> str:
    """pydantic's message as the user should read it; the input only where it is not secret."""
    kind = error["type"]
    given = "" if secret else f" {error['input']!r}"
    if kind == "value_error":
        # Our validators' messages: they say what is accepted and never echo a secret.
        cause = error.get("ctx", {}).get("error")
        return str(cause) if cause is not None else "invalid value"
    if kind == "literal_error":
        return f"invalid value{given}: expected {error.get('ctx', {}).get('expected')}"
    if kind.startswith("bool"):
        return f"invalid value{given}: expected true or false"
    if kind.startswith("int"):
        return f"invalid value{given}: expected a whole number"
    if kind in ("string_type", "list_type"):
        return f"invalid value{given}: {error['msg'].lower()}"
    return f"invalid value{given}: {error['msg']}"


def _translate(
    error: ErrorDetails,
    table: Sequence[Option],
    flags: Mapping[str, Any],
    file_values: Mapping[str, Any],
    origins: Mapping[str, str],
    config: str | None,
) -> UsageError:
    loc = tuple(error["loc"])
    names = tuple(part for part in loc if isinstance(part, str))
    option = next((o for o in table if o.loc == names[: len(o.loc)]), None)
    from_env = _env_name(names)
    if _nested(flags, names):
        where = ""
    elif from_env is not None:
        where = f" (from {from_env})"
    elif _nested(file_values, names):
        where = f" (from {origins.get('.'.join(names), names[-1])!r} in {config})"
    else:
        where = ""
    if error["type"] == "extra_forbidden":
        known = [o.flag for o in table]
        close = difflib.get_close_matches("-".join(names).replace("_", "-"), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        if from_env is not None and not _nested(file_values, names):
            return UsageError(f"unknown setting {from_env} in the environment{hint}")
        key = origins.get(".".join(names), ".".join(names))
        return UsageError(
            f"-config: unknown setting {key!r} in {config} (keys are the flag names, see "
            f"-help){hint}"
        )
    flag = f"-{option.flag}" if option else "NBD_DEVICE" if names == ("device",) else names[-1]
    return UsageError(f"{flag}{where}: {_reason(error, option is not None and option.secret)}")


def load_settings(
    settings: type[CommonSettings],
    table: Sequence[Option],
    flags: Mapping[str, Any],
    config: str | None,
) -> CommonSettings:
    """Validated settings for one run, or a :class:`UsageError` for the first bad value."""
    file_values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if config is not None:
        file_values, origins = read_config_file(config, table)
    run_settings = create_model(settings.__name__, __base__=settings)
    run_settings.file_values = file_values
    try:
        return run_settings(**flags)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise _translate(first, table, flags, file_values, origins, config) from None
    except SettingsError as exc:
        raise UsageError(f"invalid environment setting: {exc}") from None


def config_path(flag: str | None) -> str | None:
    """``--config``, else ``USBD_CONFIG``; a path that must exist."""
    path = flag if flag is not None else os.environ.get(ENV_PREFIX + "CONFIG")
    if path is not None and not Path(path).is_file():
        origin = "-config" if flag is not None else f"-config (from {ENV_PREFIX}CONFIG)"
        raise UsageError(f"{origin}: {path!r} is not a file: expected a TOML settings file")
    return path
