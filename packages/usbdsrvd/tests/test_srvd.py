"""usbdsrvd's choice of driver and its command, from hand-made discovery results.

Discovery itself (entry points of real installed distributions) is exercised end to end in
tests/test_commands.py; here every case of :func:`choose_driver` is a list of
:class:`~usbd.core.driver.Found` records, so that a name offered twice, a plugin that failed
to import, or a type whose package is missing can be staged without installing anything.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from usbd.core import Device
from usbd.core.cli import UsageError, option_table, run, settings_class
from usbd.core.driver import Driver, Found, NoOptions
from usbd.core.settings import AesKeySpec, CommonSettings, Size
from usbd.srvd import KNOWN_TYPES, choose_driver
from usbd.srvd._main import command

#: The original daemon's device types, their aliases and providers, written out independently
#: of KNOWN_TYPES so that a change to that table has to be a deliberate one.
ORIGINAL_TYPES = {
    "mem": ("usbd-ramdisk", ("memory",)),
    "file": ("usbd-filedisk", ("disk",)),
    "dedup": ("usbd-dedup", ("dedup-file", "dedup-disk")),
    "objstore": ("usbd-objstore", ("osbd",)),
}


def _never(settings: CommonSettings, options: BaseModel) -> Device:
    raise AssertionError("choose_driver must not create a device")


def found(name: str, distribution: str, *, aliases: tuple[str, ...] = ()) -> Found:
    made: Driver[Any] = Driver(
        name=name,
        description=f"the {name} test driver",
        options=NoOptions,
        create=_never,
        aliases=aliases,
    )
    return Found(name, distribution, f"{distribution.replace('-', '_')}:driver", made)


def failed(name: str, distribution: str, error: str) -> Found:
    return Found(name, distribution, f"{distribution.replace('-', '_')}:driver", None, error)


def refusal(name: str, records: list[Found]) -> str:
    with pytest.raises(UsageError) as info:
        choose_driver(name, records)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("-dev-type: ")
    return message


def test_known_types_are_the_original_ones() -> None:
    assert KNOWN_TYPES == ORIGINAL_TYPES


@pytest.mark.parametrize("name", list(ORIGINAL_TYPES))
def test_a_canonical_name_picks_its_driver(name: str) -> None:
    package = ORIGINAL_TYPES[name][0]
    records = [found(other, ORIGINAL_TYPES[other][0]) for other in ORIGINAL_TYPES]
    chosen = choose_driver(name, records)
    assert chosen.name == name
    assert chosen is next(r.driver for r in records if r.distribution == package)


@pytest.mark.parametrize(
    ("alias", "name"),
    [(alias, name) for name, (_, aliases) in ORIGINAL_TYPES.items() for alias in aliases],
)
def test_every_original_alias_picks_its_driver(alias: str, name: str) -> None:
    # The drivers here declare no aliases of their own: the original's names must still work.
    records = [found(other, ORIGINAL_TYPES[other][0]) for other in ORIGINAL_TYPES]
    assert choose_driver(alias, records).name == name


def test_a_drivers_own_alias_picks_it() -> None:
    records = [found("mem", "usbd-ramdisk"), found("toy", "usbd-toy", aliases=("plaything",))]
    assert choose_driver("plaything", records).name == "toy"


@pytest.mark.parametrize("typed", ["MEM", "Mem", "MEMORY", "Memory", " mem ", "mem\n"])
def test_case_and_surrounding_space_do_not_matter(typed: str) -> None:
    assert choose_driver(typed, [found("mem", "usbd-ramdisk")]).name == "mem"


def test_an_unknown_type_lists_the_installed_ones() -> None:
    records = [found("toy", "usbd-toy"), found("mem", "usbd-ramdisk")]
    message = refusal("nosuch", records)
    assert message == "-dev-type: unknown device type 'nosuch': installed types are mem, toy"


def test_an_unknown_type_with_nothing_installed_says_none() -> None:
    message = refusal("mem", [])
    assert "installed types are none" in message
    assert "usbd-ramdisk" in message


def test_failed_drivers_are_not_listed_as_installed() -> None:
    records = [found("mem", "usbd-ramdisk"), failed("toy", "usbd-toy", "ImportError: no")]
    message = refusal("nosuch", records)
    assert message.endswith("installed types are mem")


@pytest.mark.parametrize(
    ("typed", "package"),
    [
        (typed, package)
        for name, (package, aliases) in ORIGINAL_TYPES.items()
        if name != "mem"
        for typed in (name, *aliases, name.upper())
    ],
)
def test_a_known_type_not_installed_names_its_package(typed: str, package: str) -> None:
    message = refusal(typed, [found("mem", "usbd-ramdisk")])
    assert f"unknown device type {typed!r}" in message
    assert "installed types are mem" in message
    assert f"{typed!r} is provided by {package} (pip install {package})" in message


def test_an_unknown_name_gets_no_package_hint() -> None:
    message = refusal("floppy", [found("mem", "usbd-ramdisk")])
    assert "provided by" not in message
    assert "pip install" not in message


@pytest.mark.parametrize("typed", ["mem", "memory", "MEM"])
def test_one_name_from_two_distributions_names_both(typed: str) -> None:
    records = [found("mem", "usbd-ramdisk"), found("mem", "usbd-mem-clone")]
    message = refusal(typed, records)
    assert "usbd-ramdisk (usbd_ramdisk:driver)" in message
    assert "usbd-mem-clone (usbd_mem_clone:driver)" in message
    assert "offered by 2 distributions" in message
    assert "uninstall all but one" in message


def test_an_alias_claimed_by_a_second_distribution_names_both() -> None:
    # A third-party driver that calls itself "memory" collides with the ramdisk's alias.
    records = [found("mem", "usbd-ramdisk"), found("memory", "usbd-other")]
    message = refusal("memory", records)
    assert "usbd-ramdisk" in message
    assert "usbd-other" in message


def test_two_entry_points_of_one_distribution_are_not_a_conflict() -> None:
    records = [found("toy", "usbd-toy"), found("toy2", "usbd-toy", aliases=("toy",))]
    assert choose_driver("toy", records).name == "toy"


def test_a_driver_that_failed_to_import_names_its_distribution_and_the_reason() -> None:
    reason = "ModuleNotFoundError: No module named 'boto3'"
    records = [found("mem", "usbd-ramdisk"), failed("objstore", "usbd-objstore", reason)]
    for typed in ("objstore", "osbd"):
        message = refusal(typed, records)
        assert message == (
            f"-dev-type: the 'objstore' driver of usbd-objstore failed to load: {reason}"
        )


def test_a_failed_driver_does_not_affect_the_others() -> None:
    records = [failed("broken", "usbd-broken", "ImportError: x"), found("mem", "usbd-ramdisk")]
    assert choose_driver("mem", records).name == "mem"


# -- the command built from what was found -----------------------------------------------


class ToyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    size: Size = Field(1 << 20, description="how big the toy disk is")
    aeskey: AesKeySpec = Field(None, description="the toy's key")


def _toy_found() -> Found:
    toy: Driver[Any] = Driver(
        name="toy",
        description="A toy disk.",
        options=ToyOptions,
        create=_never,
        aliases=("plaything",),
    )
    return Found("toy", "usbd-toy", "usbd_toy:driver", toy)


def test_command_takes_the_installed_drivers_options_as_flags() -> None:
    records = [found("mem", "usbd-ramdisk"), _toy_found(), failed("bad", "usbd-bad", "E: x")]
    cmd = command(records)
    assert [d.name for d in cmd.drivers] == ["mem", "toy"]
    table = option_table(settings_class(cmd.settings, cmd.drivers), cmd.drivers)
    flags = {option.flag: option for option in table}
    assert "dev-type" in flags
    assert flags["toy-size"].loc == ("toy", "size")
    assert flags["toy-size"].env == "USBD_TOY_SIZE"
    assert flags["toy-aeskey"].secret
    assert not any(flag.startswith("bad-") for flag in flags)


def test_command_help_shows_a_drivers_options_under_its_heading(
    capsys: pytest.CaptureFixture[str],
) -> None:
    records = [found("mem", "usbd-ramdisk"), _toy_found(), failed("bad", "usbd-bad", "E: x")]
    assert run(command(records), ["--help"]) == 0
    out = capsys.readouterr().out
    heading = out.index("toy driver (-dev-type=toy|plaything)")
    assert heading < out.index("A toy disk.", heading) < out.index("--toy-size", heading)
    assert out.index("--toy-size SIZE", heading) < out.index("installed drivers")
    assert out.index("--toy-aeskey SOURCE", heading) < out.index("installed drivers")
    assert "  toy (also plaything): from usbd-toy" in out
    assert "  bad: from usbd-bad, FAILED to load: E: x" in out


def test_command_validates_a_drivers_options(capsys: pytest.CaptureFixture[str]) -> None:
    records = [found("mem", "usbd-ramdisk"), _toy_found()]
    status = run(command(records), ["-dev-type=toy", "-toy-size=huge", "-listen=/nonexistent/s"])
    assert status == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("usbdsrvd: error: -toy-size: invalid size 'huge'")


def test_command_selects_by_dev_type_with_the_first_of_a_duplicated_name() -> None:
    clone = found("mem", "usbd-mem-clone")
    records = [found("mem", "usbd-ramdisk"), clone, _toy_found()]
    cmd = command(records)
    # One driver per name takes the flags: the first found.
    assert [d.name for d in cmd.drivers] == ["mem", "toy"]
    assert cmd.drivers[0] is records[0].driver
    assert cmd.select is not None
    settings = settings_class(cmd.settings, cmd.drivers)
    toy: dict[str, Any] = {"dev_type": "plaything"}
    assert cmd.select(settings(**toy)).name == "toy"
    mem: dict[str, Any] = {"dev_type": "mem"}
    with pytest.raises(UsageError, match="usbd-mem-clone"):
        cmd.select(settings(**mem))
