"""usbdsrvd: the original project's daemon, serving whichever usbd drivers are installed.

Drivers are not imported by name: every distribution that registers an entry point in
``usbd.drivers`` is one, and its options become flags here (``-dedup-memcache``), so help and
validation always match what is installed. The original's device type names and aliases keep
working, and a type that is not installed is answered with the distribution that provides it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Annotated

from pydantic import Field

from usbd.core.cli import STYLE_NOTE, Command, UsageError, run, status_main
from usbd.core.driver import AnyDriver, Found, discover_drivers
from usbd.core.settings import CommonSettings, Flag

__all__ = ["KNOWN_TYPES", "choose_driver", "main"]

#: The original's device types: their aliases and the distribution that provides each.
KNOWN_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mem": ("usbd-ramdisk", ("memory",)),
    "file": ("usbd-filedisk", ("disk",)),
    "dedup": ("usbd-dedup", ("dedup-file", "dedup-disk")),
    "objstore": ("usbd-objstore", ("osbd",)),
}
_CANONICAL = {alias: name for name, (_, aliases) in KNOWN_TYPES.items() for alias in aliases}


class SrvdSettings(CommonSettings):
    """The shared settings plus the original's -dev-type."""

    dev_type: Annotated[str, Flag("TYPE", group="general")] = Field(
        "mem",
        description="type of device to back the block device with: "
        + ", ".join(f"'{name}'" for name in KNOWN_TYPES)
        + " (or an alias: "
        + ", ".join(sorted(_CANONICAL))
        + ")",
    )


def _offers(found: Found, name: str) -> bool:
    names = {found.name, *(found.driver.names if found.driver else ())}
    return name in names or _CANONICAL.get(name, name) in names


def choose_driver(name: str, found: Sequence[Found]) -> AnyDriver:
    """The installed driver called ``name`` (or by an alias), or a :class:`UsageError` that
    says what is installed, which distribution would provide it, or which one failed."""
    wanted = name.strip().lower()
    matches = [f for f in found if _offers(f, wanted)]
    distributions = sorted({f.distribution for f in matches})
    if len(distributions) > 1:
        offered = " and ".join(
            f"{f.distribution} ({f.value})" for f in sorted(matches, key=lambda f: f.distribution)
        )
        raise UsageError(
            f"-dev-type: {name!r} is offered by {len(distributions)} distributions, {offered}: "
            "uninstall all but one"
        )
    if not matches:
        installed = sorted({f.driver.name for f in found if f.driver is not None})
        canonical = _CANONICAL.get(wanted, wanted)
        hint = ""
        if canonical in KNOWN_TYPES:
            package = KNOWN_TYPES[canonical][0]
            hint = f"; {name!r} is provided by {package} (pip install {package})"
        raise UsageError(
            f"-dev-type: unknown device type {name!r}: installed types are "
            f"{', '.join(installed) or 'none'}{hint}"
        )
    chosen = matches[0]
    if chosen.driver is None:
        raise UsageError(
            f"-dev-type: the {chosen.name!r} driver of {chosen.distribution} failed to load: "
            f"{chosen.error}"
        )
    return chosen.driver


def _epilog(found: Sequence[Found]) -> str:
    lines = ["installed drivers (entry points in usbd.drivers):"]
    for f in found:
        if f.driver is not None:
            aliases = f" (also {', '.join(f.driver.aliases)})" if f.driver.aliases else ""
            lines.append(f"  {f.driver.name}{aliases}: from {f.distribution}")
        else:
            lines.append(f"  {f.name}: from {f.distribution}, FAILED to load: {f.error}")
    missing = [
        f"{name} ({package})"
        for name, (package, _) in KNOWN_TYPES.items()
        if not any(_offers(f, name) for f in found)
    ]
    if missing:
        lines.append(f"not installed: {', '.join(missing)}; pip install usbdsrvd[all]")
    lines.append(STYLE_NOTE)
    return "\n".join(lines)


def command(found: Sequence[Found]) -> Command:
    """usbdsrvd for these discovered drivers; one driver per name takes the flags."""
    drivers: dict[str, AnyDriver] = {}
    for f in found:
        if f.driver is not None:
            drivers.setdefault(f.driver.name, f.driver)
    headings = {
        name: f"{name} driver (-dev-type={'|'.join(driver.names)})"
        for name, driver in drivers.items()
    }
    return Command(
        prog="usbdsrvd",
        description="USBD Server: serves a block device of the chosen -dev-type as the next free "
        "/dev/nbdX (or the NBD_DEVICE given) and/or to NBD clients on -listen. With no "
        "arguments: a 1 GiB RAM disk on the next free /dev/nbdX. 'usbdsrvd status [--json]' "
        "lists the usbd daemons running on this machine (see 'usbdsrvd status --help').",
        drivers=list(drivers.values()),
        settings=SrvdSettings,
        select=lambda settings: choose_driver(
            settings.dev_type if isinstance(settings, SrvdSettings) else "mem", found
        ),
        headings=headings,
        epilog=_epilog(found),
        version=_versions(found),
    )


def _versions(found: Sequence[Found]) -> str:
    """usbdsrvd's version, the core's and each installed driver distribution's."""
    names = ["usbd-core", *sorted({f.distribution for f in found})]
    parts = []
    for name in dict.fromkeys(names):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return f"{metadata.version('usbdsrvd')} ({', '.join(parts)})"


def main(argv: Sequence[str] | None = None) -> int:
    """``usbdsrvd status ...`` lists the daemons (:func:`usbd.core.cli.status_main`); anything
    else is the daemon's flags. The subcommand is the first argument only, and is dispatched
    before the drivers are discovered: listing needs none of them, and a flag's value can never
    be taken for it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["status"]:
        return status_main(args[1:], prog="usbdsrvd status")
    return run(command(discover_drivers()), args)


if __name__ == "__main__":
    sys.exit(main())
