"""Reading the command line in both of the styles people use.

The original daemon was written in Go, whose flags take one dash (``-store-size=20GiB``,
``-store-size 20GiB``, ``-read-only=false``); Python tools take two (``--store-size 20GiB``).
Both work here. argparse does not know the Go style and has its own ideas about values that
start with a dash and about ``--``, so :func:`parse_argv` reads the command line itself against
the option table (an unknown flag or a missing value is reported by the name the user typed);
argparse only formats the grouped ``--help``.

Flags hand over strings; every value is validated by the settings model, wherever it came from.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._errors import UsageError
from ._options import GROUPS, Option

__all__ = ["STYLE_NOTE", "Parsed", "build_parser", "parse_argv"]

#: The last lines of every --help.
STYLE_NOTE = (
    "Flags take one dash or two (-store-size=20GiB, --store-size 20GiB). Each flag is also an "
    "environment variable (USBD_STORE_SIZE) and a key of the --config file (store-size); flags "
    "win over the environment, which wins over the file. See docs/configuration.md."
)

_TRUE = {"1", "t", "true", "y", "yes", "on"}
_FALSE = {"0", "f", "false", "n", "no", "off"}


@dataclass
class Parsed:
    """What the command line said: values by setting location, plus the special flags."""

    values: dict[str, Any] = field(default_factory=dict)
    config: str | None = None
    help: bool = False
    version: bool = False
    action: str | None = None


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean -{close[0]}?" if close else ""


def _bool(option: Option, value: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UsageError(f"-{option.flag}: invalid value {value!r}: expected true or false")


def _put(values: dict[str, Any], option: Option, value: object) -> None:
    *parents, leaf = option.loc
    target = values
    for parent in parents:
        target = target.setdefault(parent, {})
    if option.repeat:
        target.setdefault(leaf, []).append(value)
    else:
        target[leaf] = value


def parse_argv(argv: Sequence[str], table: Sequence[Option], actions: Sequence[str] = ()) -> Parsed:
    """The given flags only (nothing defaulted), nested the way the settings model nests.

    ``-flag value``, ``-flag=value``, ``--flag value`` and ``--flag=value`` are the same; a
    bare boolean flag is true, ``-flag=false`` and ``--no-flag`` false; the token after a flag
    that needs a value is that value whatever it looks like; ``--`` ends the flags. Unknown
    flags are refused with a suggestion. Values stay strings: the settings model validates
    them, whichever source they came from.
    """
    options = {option.flag: option for option in table}
    parsed = Parsed()
    positionals: list[str] = []
    tokens = list(argv)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if token == "--":
            positionals.extend(tokens[index:])
            break
        if not token.startswith("-") or token == "-":
            positionals.append(token)
            continue
        name, eq, value = token.lstrip("-").partition("=")
        if len(token) - len(token.lstrip("-")) > 2 or not name:
            raise UsageError(f"invalid flag {token!r}: flags take one or two dashes")
        if name in ("h", "help"):
            parsed.help = True
            continue
        if name == "version":
            parsed.version = True
            continue
        if name in actions:
            if eq:
                raise UsageError(f"-{name}: takes no value (it is what the command does)")
            if parsed.action not in (None, name):
                raise UsageError(f"-{name}: not allowed with -{parsed.action}")
            parsed.action = name
            continue
        negated = name.removeprefix("no-")
        if negated != name and not eq and negated in options and options[negated].is_bool:
            _put(parsed.values, options[negated], False)
            continue
        option = options.get(name)
        if option is None and name != "config":
            known = [*options, *actions, "config", "help"]
            raise UsageError(f"unknown flag -{name}{_suggest(name, known)} (see -help)")
        if option is not None and option.is_bool:
            _put(parsed.values, option, not eq or _bool(option, value))
            continue
        if not eq:
            if index >= len(tokens):
                metavar = option.metavar if option else "FILE"
                raise UsageError(f"-{name}: a value is needed ({metavar})")
            value = tokens[index]
            index += 1
        if option is None:
            parsed.config = value
        else:
            _put(parsed.values, option, value)
    if len(positionals) > 1:
        raise UsageError(
            f"unexpected argument {positionals[1]!r}: only one NBD_DEVICE may be given"
        )
    if positionals:
        parsed.values["device"] = positionals[0]
    return parsed


def build_parser(
    prog: str,
    description: str,
    table: Sequence[Option],
    headings: Mapping[str, str],
    epilog: str,
    notes: Mapping[str, str] | None = None,
    actions: Mapping[str, str] | None = None,
) -> argparse.ArgumentParser:
    """A parser used for its help only: the shared groups, then one group per driver
    (``headings``, with ``notes`` as the group's description); ``actions`` (flag: help) are
    listed with --help and --version."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [-flag=value ...] [NBD_DEVICE]",
        description=description,
        epilog=epilog,
        allow_abbrev=False,
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "device",
        nargs="?",
        default=argparse.SUPPRESS,
        metavar="NBD_DEVICE",
        help="the /dev/nbdX to export to (default: the first free one, unless --listen is "
        "given alone)",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key in [*GROUPS, *headings]:
        title = headings.get(key) or GROUPS.get(key) or key
        groups[key] = parser.add_argument_group(title, (notes or {}).get(key))
    general = groups["general"]
    general.add_argument("--help", action="store_true", help="show this help and exit")
    general.add_argument("--version", action="store_true", help="show the version and exit")
    for name, text in (actions or {}).items():
        general.add_argument(f"--{name}", action="store_true", help=text.replace("%", "%%"))
    general.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from this TOML file (keys are the flag names: store-size = "
        '"20GiB"); flags win over USBD_* environment variables, which win over the file',
    )
    for option in table:
        text = option.help.replace("%", "%%")
        if option.default is not None:
            text += f" (default {option.default.replace('%', '%%')})"
        if option.choices and option.metavar != "|".join(option.choices):
            text += f" ({', '.join(option.choices)})"
        target = groups.setdefault(option.group, parser.add_argument_group(option.group))
        if option.is_bool:
            target.add_argument(
                f"--{option.flag}",
                dest=option.dest,
                action="store_const",
                const=True,
                default=argparse.SUPPRESS,
                help=text,
            )
            target.add_argument(
                f"--no-{option.flag}",
                dest=option.dest,
                action="store_const",
                const=False,
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
        else:
            target.add_argument(
                f"--{option.flag}",
                dest=option.dest,
                action="append" if option.repeat else "store",
                default=argparse.SUPPRESS,
                metavar=option.metavar,
                help=text,
            )
    return parser
