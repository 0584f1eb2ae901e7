"""The references written from the code: the configuration (docs/configuration.md, from the
settings models) and the metrics (in docs/operations.md, from the engine's series and each
driver's declarations).

Generated rather than written so that they cannot drift from the code: tests regenerate them
and compare.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._monitor import CORE_METRICS
from ..driver import AnyDriver
from ._config import settings_class
from ._main import Command
from ._options import GROUPS, Option, option_table

__all__ = ["config_reference", "metrics_reference"]

_INTRO = """\
# Configuration reference

<!-- Generated from the settings models by docs/gen_configuration.py; do not edit. -->

Every setting has three spellings: a flag, an environment variable and a key of the TOML file
named by `--config` (or `USBD_CONFIG`). When a setting is given in several places, the flag
wins over the environment variable, which wins over the file, which wins over the default.

Flags take one dash or two, with the value after `=` or as the next argument:
`-store-size=20GiB`, `-store-size 20GiB`, `--store-size=20GiB` and `--store-size 20GiB` are
the same. Booleans are set by the bare flag and cleared with `-flag=false` or `--no-flag`.
One positional argument names the kernel device, e.g. `/dev/nbd0`.

In the file, keys are the flag names (`store-size`, or `store_size`); a driver's options are
either prefixed keys (`objstore-kind = "s3"`) or keys of a table named after the driver:

```toml
store-dir = "/var/lib/usbd/vol1"
store-size = "20GiB"
listen = ["/run/usbd/vol1.sock"]

[objstore]
kind = "s3"
```

A list (`listen`) in an environment variable is comma-separated:
`USBD_LISTEN=/run/usbd/a.sock,127.0.0.1:10809`. Sizes take decimal and binary units
(`512`, `4KiB`, `100 MiB`, `1.5GiB`, `2TB`). A bad value anywhere stops the daemon with one
line naming the flag, where the value came from and what is accepted (exit status 2).
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(option: Option) -> str:
    value = "" if option.is_bool else f" {option.metavar}"
    default = "" if option.default is None else f"`{option.default}`"
    if option.secret:
        default = "(secret: never printed)"
    key = (
        option.flag
        if len(option.loc) == 1
        else f"{option.flag} / [{option.loc[0]}] {option.loc[1]}"
    )
    return (
        f"| {_cell(f'`-{option.flag}{value}`')} | `{option.env}` | `{key}` | {default} | "
        f"{_cell(option.help)} |"
    )


def config_reference(command: Command) -> str:
    """Markdown for every setting of ``command``: shared groups first, then each driver's."""
    table = option_table(settings_class(command.settings, command.drivers), command.drivers)
    headings = {**GROUPS, **command.headings}
    lines = [_INTRO]
    header = [
        "| flag | environment | file key | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    notes = {driver.name: driver.description for driver in command.drivers}
    for group, title in headings.items():
        rows = [_row(option) for option in table if option.group == group]
        if group == "general":
            rows.insert(
                0,
                "| `-config FILE` | `USBD_CONFIG` | (not in the file) | | read settings from this "
                "TOML file |",
            )
        if group == "kernel":
            rows.insert(
                0,
                "| `NBD_DEVICE` (positional) | `USBD_DEVICE` | `device` | first free | "
                "the /dev/nbdX to export to (without it and with --listen: none) |",
            )
        if not rows and group not in command.headings:
            continue
        lines += [f"## {title}", ""]
        if group in notes:
            lines += [notes[group], ""]
        lines += [*header, *rows, ""] if rows else ["No options of its own.", ""]
    return "\n".join(lines)


def metrics_reference(drivers: Sequence[AnyDriver]) -> str:
    """Markdown tables of every series ``--metrics`` can expose: the engine's, then each of
    ``drivers``' declared figures (in name order), with the headline ones marked."""
    lines = [
        "### The engine's series",
        "",
        "| series | type | labels | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for core in CORE_METRICS:
        labels = ", ".join(f"`{label}`" for label in core.labels)
        lines.append(f"| `{core.name}` | {core.kind} | {labels} | {_cell(core.help)} |")
    lines += [
        "",
        "Besides these, prometheus-client's process series: `process_resident_memory_bytes`, "
        "`process_cpu_seconds_total`, `process_open_fds` and the others of its "
        "`ProcessCollector`.",
    ]
    for driver in sorted(drivers, key=lambda d: d.name):
        lines += ["", f"### Driver `{driver.name}`", ""]
        if not driver.metrics:
            lines.append("No figures of its own.")
            continue
        lines += [
            "| series | type | in status | meaning |",
            "| --- | --- | --- | --- |",
        ]
        for metric in driver.metrics:
            headline = "yes" if metric.headline else ""
            lines.append(
                f"| `{metric.exposed_name(driver.name)}` | {metric.kind} | {headline} | "
                f"{_cell(metric.help)} |"
            )
    return "\n".join(lines) + "\n"
