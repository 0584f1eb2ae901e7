"""The command-line toolkit (usbd.core.cli) in process: flags, environment, config file, errors.

A toy driver with one option of each kind (a size, a bool, a literal, a secret key spec, a
count, a field whose name has an underscore) stands in for a real one, so that what is tested
is the toolkit and not a driver. Nothing here serves: :func:`run` is only driven along the paths
that end before serving (help, version, usage errors, a driver that refuses to start); the
daemons as processes are tested elsewhere.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from usbd.core import Device
from usbd.core.cli import (
    Command,
    Option,
    OptionError,
    UsageError,
    describe_options,
    kernel_options,
    load_settings,
    option_table,
    run,
    settings_class,
)
from usbd.core.cli._config import config_path
from usbd.core.cli._flags import Parsed, build_parser, parse_argv
from usbd.core.driver import Action, Driver
from usbd.core.kernel import DEFAULT_MAX_DEVICES, KernelOptions
from usbd.core.settings import AesKeySpec, CommonSettings, Count, Size

PROG = "toy"
VERSION = "1.2.3"
#: A valid AES-256 key; no message may ever contain any stretch of it.
SECRET_HEX = "3f9a1c0e7b52d84e6a0f1b3c5d7e9f21c4b6a8e0d2f4a6c8e1b3d5f7a9c0e2d4"
SECRET_PIECE = SECRET_HEX[:12]
GiB = 1 << 30
MiB = 1 << 20


class ToyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cache: Size = 1 << 20
    direct: bool = False
    mode: Literal["a", "b"] = "a"
    aeskey: AesKeySpec = None
    workers: Count = 4
    read_ahead: Size = 128 << 10


class ToyDevice(Device):
    blocking = False

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)


def _create_toy(settings: CommonSettings, options: ToyOptions) -> ToyDevice:
    return ToyDevice(settings.store_size)


TOY: Driver[Any] = Driver(
    name="toy",
    description="A toy device for the command-line tests.",
    options=ToyOptions,
    create=_create_toy,
)
HEADINGS = {"toy": "toy driver options"}
TOY_COMMAND = Command(
    PROG, "A toy daemon.", [TOY], headings=HEADINGS, epilog="the epilog", version=VERSION
)


@pytest.fixture(autouse=True)
def _no_usbd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("USBD_"):
            monkeypatch.delenv(key)
    # Help is checked line by line: no wrapping at the terminal's width.
    monkeypatch.setenv("COLUMNS", "250")


def load(argv: Sequence[str], drivers: Sequence[Driver[Any]] = (TOY,)) -> CommonSettings:
    """What run() does with argv up to the validated settings."""
    settings_cls = settings_class(CommonSettings, drivers)
    table = option_table(settings_cls, drivers)
    parsed = parse_argv(argv, table)
    return load_settings(settings_cls, table, parsed.values, config_path(parsed.config))


def fail(argv: Sequence[str], drivers: Sequence[Driver[Any]] = (TOY,)) -> str:
    with pytest.raises(UsageError) as info:
        load(argv, drivers)
    return str(info.value)


def toy(settings: CommonSettings) -> ToyOptions:
    options = getattr(settings, "toy")  # noqa: B009 - the field is added by settings_class
    assert isinstance(options, ToyOptions)
    return options


def parser_for(
    drivers: Sequence[Driver[Any]] = (TOY,),
) -> tuple[argparse.ArgumentParser, list[Option]]:
    settings_cls = settings_class(CommonSettings, drivers)
    table = option_table(settings_cls, drivers)
    return build_parser(PROG, "test", table, HEADINGS, ""), table


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def help_text(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert run(TOY_COMMAND, argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def help_entry(out: str, flag: str) -> str:
    """The help of one flag: its line and the lines argparse continued it on, joined."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [flag])
    entry = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("   ") or line.lstrip().startswith("-"):
            break
        entry.append(line)
    return " ".join(" ".join(entry).split())


# -- the settings class and the option table ---------------------------------------------------


def test_settings_class_nests_the_driver_options_under_the_driver_name() -> None:
    settings_cls = settings_class(CommonSettings, [TOY])
    assert issubclass(settings_cls, CommonSettings)
    assert settings_cls.model_fields["toy"].annotation is ToyOptions
    assert toy(load([])) == ToyOptions()


@pytest.mark.parametrize("name", ["store_size", "listen", "my-driver", "2fast"])
def test_settings_class_refuses_a_driver_name_that_cannot_name_its_options(name: str) -> None:
    bad: Driver[Any] = Driver(name=name, description="", options=ToyOptions, create=_create_toy)
    with pytest.raises(ValueError, match="cannot name its options"):
        settings_class(CommonSettings, [bad])


def test_option_table_spells_each_driver_option_with_the_driver_prefix() -> None:
    table = {o.flag: o for o in option_table(settings_class(CommonSettings, [TOY]), [TOY])}
    toy_flags = [flag for flag in table if flag.startswith("toy-")]
    assert toy_flags == [
        "toy-cache",
        "toy-direct",
        "toy-mode",
        "toy-aeskey",
        "toy-workers",
        "toy-read-ahead",
    ]
    cache = table["toy-cache"]
    assert (cache.loc, cache.env, cache.metavar, cache.default) == (
        ("toy", "cache"),
        "USBD_TOY_CACHE",
        "SIZE",
        "1.0 MiB",
    )
    assert table["toy-read-ahead"].env == "USBD_TOY_READ_AHEAD"
    assert table["toy-direct"].is_bool
    assert table["toy-mode"].choices == ("a", "b")
    assert table["toy-mode"].default == "a"
    assert table["toy-workers"].metavar == "N"
    assert table["toy-workers"].default == "4"
    assert table["toy-aeskey"].secret
    assert table["toy-aeskey"].default is None


def test_option_table_has_the_shared_settings_but_not_the_positional_device() -> None:
    table = {o.flag: o for o in option_table(settings_class(CommonSettings, [TOY]), [TOY])}
    assert "device" not in table
    assert table["store-size"].default == "1.0 GiB"
    assert table["store-size"].env == "USBD_STORE_SIZE"
    assert table["store-size"].group == "storage"
    assert table["listen"].repeat
    assert table["read-only"].is_bool
    assert table["attach"].choices == ("auto", "netlink", "ioctl", "none")


# -- flags: Go and GNU styles ------------------------------------------------------------------


def test_every_style_reads_the_same() -> None:
    _, table = parser_for()
    argv = ["-store-size", "2GiB", "-read-only=false", "-toy-direct=yes", "--export-name", "-x"]
    assert parse_argv(argv, table).values == {
        "store_size": "2GiB",
        "read_only": False,
        "toy": {"direct": True},
        "export_name": "-x",
    }


def test_parse_flags_returns_only_the_given_flags_nested_like_the_settings() -> None:
    _, table = parser_for()
    argv = ["-toy-cache=8MiB", "-listen=/a", "--listen", "/b", "-read-only", "-config=f.toml"]
    parsed = parse_argv([*argv, "/dev/nbd3"], table)
    assert parsed.values == {
        "toy": {"cache": "8MiB"},
        "listen": ["/a", "/b"],
        "read_only": True,
        "device": "/dev/nbd3",
    }
    assert parsed.config == "f.toml"
    assert not parsed.help
    assert not parsed.version


def test_parse_flags_of_nothing_is_empty() -> None:
    _, table = parser_for()
    assert parse_argv([], table) == Parsed()


@pytest.mark.parametrize(
    "argv",
    [
        ["-store-size=2GiB"],
        ["-store-size", "2GiB"],
        ["--store-size=2GiB"],
        ["--store-size", "2GiB"],
    ],
)
def test_go_and_gnu_spellings_give_the_same_settings(argv: list[str]) -> None:
    settings = load(argv)
    assert settings.store_size == 2 * GiB
    assert settings.model_dump() == load(["--store-size=2GiB"]).model_dump()


@pytest.mark.parametrize(
    "argv",
    [
        ["-toy-cache=8MiB"],
        ["-toy-cache", "8MiB"],
        ["--toy-cache=8MiB"],
        ["--toy-cache", "8 MiB"],
    ],
)
def test_driver_flags_take_both_styles(argv: list[str]) -> None:
    assert toy(load(argv)).cache == 8 * MiB


def test_a_driver_field_with_an_underscore_is_a_dashed_flag() -> None:
    assert toy(load(["-toy-read-ahead=1MiB"])).read_ahead == MiB


@pytest.mark.parametrize(
    ("argv", "attribute", "value"),
    [
        (["--export-name", "-x"], "export_name", "-x"),
        (["-export-name", "--help"], "export_name", "--help"),
        (["-store-name", "-y"], "store_name", "-y"),
        (["-description=-read-only"], "description", "-read-only"),
    ],
)
def test_a_value_starting_with_a_dash_is_taken_as_the_value(
    argv: list[str], attribute: str, value: str
) -> None:
    settings = load(argv)
    assert getattr(settings, attribute) == value
    assert settings.read_only is False


def test_a_double_dash_is_taken_as_a_value_where_a_value_is_needed() -> None:
    settings = load(["--description", "--", "/dev/nbd1"])
    assert (settings.description, settings.device) == ("--", 1)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], False),
        (["-read-only"], True),
        (["--read-only"], True),
        (["-read-only=true"], True),
        (["-read-only=yes"], True),
        (["-read-only=false"], False),
        (["--read-only=0"], False),
        (["-read-only=OFF"], False),
        (["--no-read-only"], False),
        (["-no-read-only"], False),
        (["-read-only", "--no-read-only"], False),
        (["--no-read-only", "-read-only"], True),
    ],
)
def test_boolean_flags(argv: list[str], expected: bool) -> None:
    assert load(argv).read_only is expected


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-toy-direct=yes"], True),
        (["-toy-direct"], True),
        (["--toy-direct=on"], True),
        (["-toy-direct=no"], False),
        (["--no-toy-direct"], False),
    ],
)
def test_driver_boolean_flags(argv: list[str], expected: bool) -> None:
    assert toy(load(argv)).direct is expected


def test_a_boolean_flag_does_not_take_the_next_argument_as_its_value() -> None:
    settings = load(["-read-only", "/dev/nbd2"])
    assert settings.read_only is True
    assert settings.device == 2


def test_listen_repeated_accumulates() -> None:
    argv = ["-listen", "/a/s.sock", "--listen=127.0.0.1:10809", "-listen=[::1]:0"]
    assert load(argv).listen == ["/a/s.sock", "127.0.0.1:10809", "[::1]:0"]


@pytest.mark.parametrize(
    ("argv", "device"),
    [
        ([], None),
        (["/dev/nbd3"], 3),
        (["nbd12"], 12),
        (["-read-only", "/dev/nbd3", "-store-size=1MiB"], 3),
        (["--", "/dev/nbd4"], 4),
    ],
)
def test_the_positional_names_the_nbd_device(argv: list[str], device: int | None) -> None:
    assert load(argv).device == device


def test_a_literal_flag_takes_one_of_its_choices() -> None:
    assert toy(load(["-toy-mode=b"])).mode == "b"
    assert load(["--attach", "ioctl"]).attach == "ioctl"


# -- precedence: flag > USBD_* > file > default ------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One setting as each source spells it, and how to read it back."""

    flag: str
    env: str
    file: str

    def read(self, settings: CommonSettings) -> int:
        name = self.flag.replace("-", "_")
        if name.startswith("toy_"):
            value = getattr(toy(settings), name.removeprefix("toy_"))
        else:
            value = getattr(settings, name)
        assert isinstance(value, int)
        return value


SETTINGS = {
    "store-size": Setting("store-size", "USBD_STORE_SIZE", 'store-size = "{}"\n'),
    "store_size": Setting("store-size", "USBD_STORE_SIZE", 'store_size = "{}"\n'),
    "toy-table": Setting("toy-cache", "USBD_TOY_CACHE", '[toy]\ncache = "{}"\n'),
    "toy-cache": Setting("toy-cache", "USBD_TOY_CACHE", 'toy-cache = "{}"\n'),
    "toy_cache": Setting("toy-cache", "USBD_TOY_CACHE", 'toy_cache = "{}"\n'),
    "read-ahead": Setting("toy-read-ahead", "USBD_TOY_READ_AHEAD", '[toy]\nread-ahead = "{}"\n'),
}


@pytest.mark.parametrize("setting", list(SETTINGS.values()), ids=list(SETTINGS))
@pytest.mark.parametrize(
    ("flag", "env", "file", "expected"),
    [
        ("3MiB", "2MiB", "5MiB", 3 * MiB),
        ("3MiB", None, "5MiB", 3 * MiB),
        ("3MiB", "2MiB", None, 3 * MiB),
        (None, "2MiB", "5MiB", 2 * MiB),
        (None, None, "5MiB", 5 * MiB),
        (None, None, None, None),
    ],
    ids=["all", "flag-file", "flag-env", "env-file", "file", "default"],
)
def test_flag_beats_environment_beats_file_beats_default(
    setting: Setting,
    flag: str | None,
    env: str | None,
    file: str | None,
    expected: int | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = [] if flag is None else [f"-{setting.flag}={flag}"]
    if env is not None:
        monkeypatch.setenv(setting.env, env)
    if file is not None:
        config = tmp_path / "usbd.toml"
        config.write_text(setting.file.format(file))
        argv += ["--config", str(config)]
    default = setting.read(load([]))
    assert setting.read(load(argv)) == (default if expected is None else expected)


def test_each_field_takes_its_own_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "usbd.toml"
    config.write_text(
        'store-size = "5GiB"\nstore-name = "from-file"\ntoy-workers = 7\n'
        '[toy]\ncache = "5MiB"\nmode = "b"\n'
    )
    monkeypatch.setenv("USBD_STORE_SIZE", "2GiB")
    monkeypatch.setenv("USBD_TOY_CACHE", "2MiB")
    monkeypatch.setenv("USBD_TOY_WORKERS", "9")
    settings = load(["-store-size=3GiB", f"-config={config}"])
    assert settings.store_size == 3 * GiB  # flag
    assert toy(settings).cache == 2 * MiB  # environment over the file
    assert toy(settings).workers == 9  # environment over the file
    assert settings.store_name == "from-file"  # file only
    assert toy(settings).mode == "b"  # file only, next to a flag-free driver table
    assert toy(settings).read_ahead == 128 << 10  # default
    assert settings.export_name == ""  # default


def test_a_file_setting_survives_a_flag_for_another_field(tmp_path: Path) -> None:
    config = tmp_path / "usbd.toml"
    config.write_text('store-name = "from-file"\n[toy]\nmode = "b"\n')
    settings = load(["--config", str(config), "-store-size=3GiB", "-toy-cache=8MiB"])
    assert settings.store_name == "from-file"
    assert toy(settings).mode == "b"
    assert settings.store_size == 3 * GiB
    assert toy(settings).cache == 8 * MiB


def test_an_environment_setting_survives_a_flag_for_another_driver_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("USBD_TOY_MODE", "b")
    monkeypatch.setenv("USBD_TOY_DIRECT", "yes")
    options = toy(load(["-toy-cache=8MiB"]))
    assert (options.mode, options.direct, options.cache) == ("b", True, 8 * MiB)


def test_a_false_flag_beats_a_true_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USBD_READ_ONLY", "true")
    monkeypatch.setenv("USBD_TOY_DIRECT", "1")
    settings = load(["--no-read-only", "-toy-direct=false"])
    assert settings.read_only is False
    assert toy(settings).direct is False


def test_a_false_environment_variable_beats_a_true_file_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "usbd.toml"
    config.write_text("read-only = true\n")
    monkeypatch.setenv("USBD_READ_ONLY", "false")
    assert load(["--config", str(config)]).read_only is False


def test_listen_flags_replace_the_environment_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USBD_LISTEN", "/env/a.sock")
    assert load(["-listen=/flag/b.sock"]).listen == ["/flag/b.sock"]


def test_usbd_listen_separates_addresses_with_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USBD_LISTEN", "/a/s.sock,127.0.0.1:10809")
    assert load([]).listen == ["/a/s.sock", "127.0.0.1:10809"]


def test_a_listen_flag_separates_addresses_with_commas_too() -> None:
    assert load(["--listen", "/a/s.sock,127.0.0.1:10809", "-listen=:1"]).listen == [
        "/a/s.sock",
        "127.0.0.1:10809",
        ":1",
    ]


def test_listen_in_the_file_is_a_list_or_a_comma_separated_string(tmp_path: Path) -> None:
    config = tmp_path / "usbd.toml"
    config.write_text('listen = ["/a/s.sock", ":10809"]\n')
    assert load(["--config", str(config)]).listen == ["/a/s.sock", ":10809"]
    config.write_text('listen = "/a/s.sock, :10809"\n')
    assert load(["--config", str(config)]).listen == ["/a/s.sock", ":10809"]


def test_usbd_config_names_the_file_when_config_is_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "usbd.toml"
    config.write_text('store-size = "7GiB"\n[toy]\nworkers = 2\n')
    monkeypatch.setenv("USBD_CONFIG", str(config))
    settings = load([])
    assert settings.store_size == 7 * GiB
    assert toy(settings).workers == 2


def test_the_config_flag_beats_usbd_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_env = tmp_path / "env.toml"
    from_env.write_text('store-size = "7GiB"\n')
    from_flag = tmp_path / "flag.toml"
    from_flag.write_text('store-name = "flagged"\n')
    monkeypatch.setenv("USBD_CONFIG", str(from_env))
    settings = load(["-config", str(from_flag)])
    assert settings.store_name == "flagged"
    assert settings.store_size == GiB


def test_config_path_is_the_flag_then_usbd_config_then_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    first.write_text("")
    second.write_text("")
    assert config_path(None) is None
    monkeypatch.setenv("USBD_CONFIG", str(second))
    assert config_path(None) == str(second)
    assert config_path(str(first)) == str(first)


def test_environment_variable_names_are_not_case_sensitive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("usbd_store_size", "3GiB")
    assert load([]).store_size == 3 * GiB


def test_a_count_from_the_file_may_be_a_toml_integer(tmp_path: Path) -> None:
    config = tmp_path / "usbd.toml"
    config.write_text("store-size = 4096\n[toy]\nworkers = 3\ndirect = true\n")
    settings = load(["--config", str(config)])
    assert settings.store_size == 4096
    assert toy(settings).workers == 3
    assert toy(settings).direct is True


# -- errors: one line naming the flag, the source, and what is accepted ------------------------


@dataclass(frozen=True)
class Bad:
    """A bad command line, environment or file, and the start of the one error line.

    ``{config}`` stands for the TOML file written from ``toml`` and ``{tmp}`` for a scratch
    directory, wherever they appear.
    """

    prefix: str
    argv: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    toml: str | None = None
    phrases: tuple[str, ...] = ()


SIZE_UNITS = ("expected a number and a unit", "KiB", "GiB")
WHOLE = ("expected a whole number >= 1",)
IN_FILE = "in {config})"

BAD = {
    # sizes
    "size-flag": Bad("-store-size: invalid size '12 parsecs'", ("-store-size=12 parsecs",),
                     phrases=SIZE_UNITS),
    "size-flag-gnu": Bad("-store-size: invalid size 'lots'", ("--store-size", "lots"),
                         phrases=SIZE_UNITS),
    "size-env": Bad("-store-size (from USBD_STORE_SIZE): invalid size 'huge'",
                    env={"USBD_STORE_SIZE": "huge"}, phrases=SIZE_UNITS),
    "size-file": Bad("-store-size (from 'store-size' in {config}): invalid size 'huge'",
                     toml='store-size = "huge"\n', phrases=SIZE_UNITS),
    "size-file-underscore": Bad("-store-size (from 'store_size' in {config}): invalid size",
                                toml='store_size = "1 parsec"\n', phrases=SIZE_UNITS),
    "size-file-negative": Bad("-store-size (from 'store-size' in {config}): invalid size -1",
                              toml="store-size = -1\n", phrases=("expected 0 or more bytes",)),
    "size-file-float": Bad("-store-size (from 'store-size' in {config}): invalid value 1.5",
                           toml="store-size = 1.5\n", phrases=("whole number",)),
    "size-driver-flag": Bad("-toy-cache: invalid size 'lots'", ("-toy-cache=lots",),
                            phrases=SIZE_UNITS),
    "size-driver-env": Bad("-toy-cache (from USBD_TOY_CACHE): invalid size 'lots'",
                           env={"USBD_TOY_CACHE": "lots"}, phrases=SIZE_UNITS),
    "size-driver-table": Bad("-toy-cache (from 'toy.cache' in {config}): invalid size 'lots'",
                             toml='[toy]\ncache = "lots"\n', phrases=SIZE_UNITS),
    "size-driver-top": Bad("-toy-cache (from 'toy-cache' in {config}): invalid size 'lots'",
                           toml='toy-cache = "lots"\n', phrases=SIZE_UNITS),
    "size-underscore-field": Bad("-toy-read-ahead (from USBD_TOY_READ_AHEAD): invalid size",
                                 env={"USBD_TOY_READ_AHEAD": "x"}, phrases=SIZE_UNITS),
    # counts
    "count-zero": Bad("-toy-workers: invalid value 0", ("-toy-workers=0",), phrases=WHOLE),
    "count-negative": Bad("-toy-workers: invalid value '-1'", ("--toy-workers", "-1"),
                          phrases=WHOLE),
    "count-word": Bad("-toy-workers: invalid value 'x'", ("-toy-workers", "x"), phrases=WHOLE),
    "count-fraction": Bad("-toy-workers: invalid value '1.5'", ("-toy-workers=1.5",),
                          phrases=WHOLE),
    "count-superscript": Bad("-toy-workers: invalid value '²'", ("-toy-workers=²",),
                             phrases=WHOLE),
    "count-env": Bad("-toy-workers (from USBD_TOY_WORKERS): invalid value 0",
                     env={"USBD_TOY_WORKERS": "0"}, phrases=WHOLE),
    "count-toml-true": Bad("-toy-workers (from 'toy-workers' in {config}): invalid value True",
                           toml="toy-workers = true\n", phrases=WHOLE),
    "count-toml-table-true": Bad("-toy-workers (from 'toy.workers' in {config}): invalid value",
                                 toml="[toy]\nworkers = true\n", phrases=WHOLE),
    "count-shared": Bad("-nbd-max-devs: invalid value 0", ("-nbd-max-devs=0",), phrases=WHOLE),
    "seconds-negative": Bad("-timeout: invalid value '-5'", ("-timeout=-5",),
                            phrases=("expected whole seconds (0 or more)",)),
    # literals
    "literal-flag": Bad("-toy-mode: invalid value 'c': expected 'a' or 'b'", ("-toy-mode=c",)),
    "literal-shared": Bad("-attach: invalid value 'sometimes'", ("-attach=sometimes",),
                          phrases=("'auto'", "'netlink'", "'ioctl'", "'none'")),
    "literal-env": Bad("-log-level (from USBD_LOG_LEVEL): invalid value 'loud'",
                       env={"USBD_LOG_LEVEL": "loud"}, phrases=("'debug'", "'error'")),
    "literal-file": Bad("-toy-mode (from 'toy.mode' in {config}): invalid value 'c'",
                        toml='[toy]\nmode = "c"\n', phrases=("'a' or 'b'",)),
    # booleans
    "bool-flag": Bad("-read-only: invalid value 'maybe': expected true or false",
                     ("-read-only=maybe",)),
    "bool-empty": Bad("-read-only: invalid value '': expected true or false", ("-read-only=",)),
    "bool-driver-flag": Bad("-toy-direct: invalid value '2': expected true or false",
                            ("-toy-direct=2",)),
    "bool-env": Bad("-toy-direct (from USBD_TOY_DIRECT): invalid value 'maybe'",
                    env={"USBD_TOY_DIRECT": "maybe"}, phrases=("expected true or false",)),
    "bool-file": Bad("-read-only (from 'read-only' in {config}): invalid value 'maybe'",
                     toml='read-only = "maybe"\n', phrases=("expected true or false",)),
    # listen addresses
    "listen-flag": Bad("-listen: invalid listen address 'nope'", ("-listen=nope",),
                       phrases=("HOST:PORT", "unix socket path")),
    "listen-port": Bad("-listen: invalid listen address '127.0.0.1:70000'",
                       ("-listen", "/ok.sock", "-listen", "127.0.0.1:70000"),
                       phrases=("HOST:PORT",)),
    "listen-env": Bad("-listen (from USBD_LISTEN): invalid listen address 'nope'",
                      env={"USBD_LISTEN": "/a/s.sock,nope"}, phrases=("HOST:PORT",)),
    "listen-file": Bad("-listen (from 'listen' in {config}): invalid listen address 'x'",
                       toml='listen = ["/a/s.sock", "x"]\n', phrases=("HOST:PORT",)),
    # the device and the store
    "device": Bad("NBD_DEVICE: invalid NBD device '/dev/sda': expected /dev/nbdN", ("/dev/sda",)),
    "device-env": Bad("NBD_DEVICE (from USBD_DEVICE): invalid NBD device '/dev/sda'",
                      env={"USBD_DEVICE": "/dev/sda"}),
    "two-devices": Bad("unexpected argument '/dev/nbd2': only one NBD_DEVICE may be given",
                       ("/dev/nbd1", "/dev/nbd2")),
    "store-dir-missing": Bad("-store-dir: directory '{tmp}/missing' does not exist",
                             ("-store-dir={tmp}/missing",),
                             phrases=("expected an existing directory",)),
    "store-dir-file": Bad("-store-dir: '{tmp}/plain' is not a directory", ("-store-dir",
                          "{tmp}/plain"), phrases=("expected an existing directory",)),
    # flags
    "unknown-flag": Bad("unknown flag -store-sise; did you mean -store-size?",
                        ("-store-sise=1GiB",), phrases=("-help",)),
    "unknown-driver-flag": Bad("unknown flag -toy-cahce; did you mean -toy-cache?",
                               ("--toy-cahce", "1MiB")),
    "unknown-flag-no-guess": Bad("unknown flag -zzz", ("-zzz",)),
    "three-dashes": Bad("invalid flag '---store-size=1': flags take one or two dashes",
                        ("---store-size=1",)),
    "missing-value": Bad("-store-size: a value is needed (SIZE)", ("-store-size",)),
    "missing-value-literal": Bad("-toy-mode: a value is needed (a|b)",
                                 ("-read-only", "--toy-mode")),
    "missing-config-value": Bad("-config: a value is needed (FILE)", ("-config",)),
    # the environment
    "unknown-env": Bad("unknown setting USBD_TOY_FOO in the environment",
                       env={"USBD_TOY_FOO": "1"}),
    "unknown-env-guess": Bad("unknown setting USBD_TOY_WORKRS in the environment",
                             env={"USBD_TOY_WORKRS": "1"}, phrases=("did you mean",
                                                                    "toy-workers")),
    "unknown-env-transposed": Bad("unknown setting USBD_TOY_CAHCE in the environment",
                                  env={"USBD_TOY_CAHCE": "1MiB"}, phrases=("; did you mean",)),
    "env-driver-table": Bad("invalid environment setting", env={"USBD_TOY": "garbage"}),
    # the file
    "unknown-key": Bad("-config: unknown setting 'store-sise' in {config}",
                       toml='store-sise = "1GiB"\n', phrases=("did you mean 'store-size'?",)),
    "unknown-driver-key": Bad("-config: unknown setting 'toy-cahce' in {config}",
                              toml='toy-cahce = "1MiB"\n', phrases=("did you mean 'toy-cache'?",)),
    "unknown-table-key": Bad("-config: unknown setting 'toy.cahce' in {config}",
                             toml='[toy]\ncahce = "1MiB"\n', phrases=("; did you mean",)),
    "unknown-table": Bad("-config: unknown setting 'storage' in {config}",
                         toml='[storage]\nsize = "1GiB"\n'),
    "config-missing": Bad("-config: '{tmp}/absent.toml' is not a file",
                          ("--config", "{tmp}/absent.toml"),
                          phrases=("expected a TOML settings file",)),
    "config-missing-env": Bad("-config (from USBD_CONFIG): '{tmp}/absent.toml' is not a file",
                              env={"USBD_CONFIG": "{tmp}/absent.toml"}),
    "config-not-toml": Bad("-config: '{config}' is not valid TOML", toml="store-size = \n",
                           phrases=("line 1",)),
    "config-not-toml-env": Bad("-config: '{config}' is not valid TOML",
                               env={"USBD_CONFIG": "{config}"}, toml="[toy\n"),
    # attaching
    "attach-none-alone": Bad("-attach: 'none' needs -listen", ("-attach=none",)),
    "attach-none-device": Bad("NBD_DEVICE: not allowed with -attach=none",
                              ("-attach=none", "-listen=/a/s.sock", "/dev/nbd2")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD.values()), ids=list(BAD))
def test_a_bad_setting_is_one_line_naming_the_flag_the_source_and_what_is_accepted(
    case: Bad, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "usbd.toml"
    (tmp_path / "plain").write_text("not a directory")

    def fill(text: str) -> str:
        return text.replace("{config}", str(config)).replace("{tmp}", str(tmp_path))

    argv = [fill(arg) for arg in case.argv]
    if case.toml is not None:
        config.write_text(case.toml)
        if "USBD_CONFIG" not in case.env:
            argv += ["--config", str(config)]
    for key, value in case.env.items():
        monkeypatch.setenv(key, fill(value))
    assert run(TOY_COMMAND, argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"{PROG}: error: {fill(case.prefix)}"), line
    for phrase in case.phrases:
        assert fill(phrase) in line, line
    assert "Traceback" not in line


def test_a_flag_overrides_a_bad_value_in_the_file(tmp_path: Path) -> None:
    config = tmp_path / "usbd.toml"
    config.write_text('store-size = "huge"\n')
    assert load(["-store-size=2GiB", "--config", str(config)]).store_size == 2 * GiB
    assert fail(["-store-size=1x", "--config", str(config)]).startswith(
        "-store-size: invalid size '1x'"
    )


def test_an_environment_variable_overrides_a_bad_value_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "usbd.toml"
    config.write_text('[toy]\nmode = "c"\n')
    monkeypatch.setenv("USBD_TOY_MODE", "b")
    assert toy(load(["--config", str(config)])).mode == "b"


def test_help_with_a_value_is_not_called_an_unknown_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    run(TOY_COMMAND, ["-help=true"])
    assert "unknown flag -help" not in capsys.readouterr().err


def test_a_driver_option_without_a_default_is_refused_when_the_driver_is_declared() -> None:
    """usbdsrvd builds every installed driver's options, so one required option would break
    every -dev-type: the Driver refuses it at import, and discovery reports that driver."""

    class Required(BaseModel):
        model_config = ConfigDict(extra="forbid")
        bucket: str

    with pytest.raises(TypeError, match="driver 'req': options without a default: bucket"):
        Driver(name="req", description="", options=Required, create=lambda s, o: ToyDevice(1))


@pytest.mark.parametrize("source", ["flag", "env", "file"])
def test_an_integer_literal_option_accepts_its_choices_from_every_source(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Blocks(BaseModel):
        model_config = ConfigDict(extra="forbid")
        block: Literal[512, 4096] = 512

    driver: Driver[Any] = Driver(
        name="blk", description="", options=Blocks, create=lambda s, o: ToyDevice(1)
    )
    argv: list[str] = []
    if source == "flag":
        argv = ["-blk-block=4096"]
    elif source == "env":
        monkeypatch.setenv("USBD_BLK_BLOCK", "4096")
    else:
        config = tmp_path / "usbd.toml"
        config.write_text("[blk]\nblock = 4096\n")
        argv = ["--config", str(config)]
    assert load(argv, [driver]).model_dump()["blk"] == {"block": 4096}


# -- the driver refusing to start --------------------------------------------------------------


def _refusing(exc: Exception) -> Driver[Any]:
    def create(settings: CommonSettings, options: ToyOptions) -> ToyDevice:
        raise exc

    return Driver(name="toy", description="", options=ToyOptions, create=create)


@pytest.mark.parametrize(
    ("exc", "status", "line"),
    [
        (OptionError("toy-aeskey", "cannot read the key"), 2, "-toy-aeskey: cannot read the key"),
        (OptionError("--toy-cache", "too small"), 2, "-toy-cache: too small"),
        (ValueError("the store does not match"), 2, "the store does not match"),
        (
            FileNotFoundError(2, "No such file or directory"),
            1,
            "[Errno 2] No such file or directory",
        ),
        (PermissionError(13, "Permission denied"), 1, "[Errno 13] Permission denied"),
    ],
)
def test_a_driver_refusing_to_start_is_one_line_and_its_exit_status(
    exc: Exception, status: int, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    command = Command(PROG, "", [_refusing(exc)])
    assert run(command, ["-listen=/a/s.sock"]) == status
    assert one_error_line(capsys) == f"{PROG}: error: {line}"


# -- secrets -----------------------------------------------------------------------------------


BAD_KEYS = {
    "short": f"key:{SECRET_HEX[:63]}",
    "long": f"key:{SECRET_HEX}ab",
    "not-hex": f"key:{SECRET_HEX[:62]}zz",
    "pasted": SECRET_HEX,
    "misspelt-source": f"kee:{SECRET_HEX}",
    "unknown-source": f"{SECRET_HEX}:{SECRET_HEX}",
}


@pytest.mark.parametrize("spec", list(BAD_KEYS.values()), ids=list(BAD_KEYS))
@pytest.mark.parametrize("source", ["flag", "env", "file"])
def test_a_bad_key_spec_is_reported_without_the_key(
    spec: str,
    source: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv: list[str] = ["-listen=/a/s.sock"]
    if source == "flag":
        argv.append(f"-toy-aeskey={spec}")
    elif source == "env":
        monkeypatch.setenv("USBD_TOY_AESKEY", spec)
    else:
        config = tmp_path / "usbd.toml"
        config.write_text(f'[toy]\naeskey = "{spec}"\n')
        argv += ["--config", str(config)]
    assert run(TOY_COMMAND, argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"{PROG}: error: -toy-aeskey"), line
    assert SECRET_PIECE not in line
    assert "expected" in line


def test_a_key_of_the_wrong_type_in_the_file_is_reported_without_it(tmp_path: Path) -> None:
    config = tmp_path / "usbd.toml"
    config.write_text(f'[toy]\naeskey = ["key:{SECRET_HEX}"]\n')
    message = fail(["--config", str(config)])
    assert message.startswith(f"-toy-aeskey (from 'toy.aeskey' in {config}): invalid value")
    assert SECRET_PIECE not in message


def test_a_misspelt_key_setting_is_reported_without_its_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USBD_TOY_AESKY", f"key:{SECRET_HEX}")
    message = fail([])
    assert message.startswith("unknown setting USBD_TOY_AESKY in the environment")
    assert SECRET_PIECE not in message
    monkeypatch.delenv("USBD_TOY_AESKY")
    config = tmp_path / "usbd.toml"
    config.write_text(f'[toy]\naeskye = "key:{SECRET_HEX}"\n')
    message = fail(["--config", str(config)])
    assert message.startswith(f"-config: unknown setting 'toy.aeskye' in {config}")
    assert SECRET_PIECE not in message


def test_a_valid_key_spec_is_kept_normalised() -> None:
    assert toy(load([f"-toy-aeskey=key:{SECRET_HEX.upper()}"])).aeskey == f"key:{SECRET_HEX}"
    assert toy(load(["-toy-aeskey=env:MY_KEY"])).aeskey == "env:MY_KEY"
    assert toy(load(["-toy-aeskey="])).aeskey is None


def test_describe_options_redacts_the_key() -> None:
    options = toy(load([f"-toy-aeskey=key:{SECRET_HEX}", "-toy-cache=64MiB", "-toy-mode=b"]))
    text = describe_options(options)
    assert text == (
        "cache=64 MiB, direct=False, mode='b', aeskey=<REDACTED>, workers=4, read_ahead=128 KiB"
    )
    assert SECRET_PIECE not in text


def test_describe_options_shows_an_unset_key_as_none() -> None:
    assert "aeskey=None" in describe_options(ToyOptions())


class VaultOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    aeskey: AesKeySpec = Field(default=f"key:{SECRET_HEX}", description="the vault's key")


VAULT: Driver[Any] = Driver(
    name="vault", description="Keeps a key.", options=VaultOptions, create=lambda s, o: ToyDevice(1)
)


def test_help_never_shows_a_secret_default(capsys: pytest.CaptureFixture[str]) -> None:
    command = Command("vaultd", "", [VAULT], headings={"vault": "vault driver options"})
    assert run(command, ["--help"]) == 0
    out = capsys.readouterr().out
    assert help_entry(out, "--vault-aeskey") == "--vault-aeskey SOURCE the vault's key"
    assert SECRET_PIECE not in out
    table = option_table(settings_class(CommonSettings, [VAULT]), [VAULT])
    assert [o.default for o in table if o.flag == "vault-aeskey"] == [None]


def test_describe_options_redacts_a_secret_default() -> None:
    text = describe_options(VaultOptions())
    assert text == "aeskey=<REDACTED>"


# -- help and version --------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["-h", "-help", "--help", "--h"])
def test_help_lists_the_driver_options_under_its_heading_after_the_shared_groups(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = help_text([flag], capsys)
    lines = out.splitlines()
    headings = [line for line in lines if line and not line.startswith(" ")]
    order = [h for h in headings if h.endswith(":")]
    assert order[-1] == "toy driver options:", order
    for shared in ("general:", "storage", "serving NBD clients:", "kernel device"):
        assert any(h.startswith(shared) for h in order[:-1]), (shared, order)
    driver_part = lines[lines.index("toy driver options:") :]
    flags = [line.split()[0] for line in driver_part if line.startswith("  --")]
    assert flags == [
        "--toy-cache",
        "--toy-direct",
        "--toy-mode",
        "--toy-aeskey",
        "--toy-workers",
        "--toy-read-ahead",
    ]
    assert "--store-size" not in "\n".join(driver_part)


def test_help_prints_size_defaults_as_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    out = help_text(["-help"], capsys)
    assert help_entry(out, "--toy-cache") == "--toy-cache SIZE (default 1.0 MiB)"
    assert help_entry(out, "--toy-read-ahead") == "--toy-read-ahead SIZE (default 128 KiB)"
    assert help_entry(out, "--toy-workers") == "--toy-workers N (default 4)"
    assert help_entry(out, "--toy-mode") == "--toy-mode a|b (default a)"
    assert help_entry(out, "--toy-aeskey") == "--toy-aeskey SOURCE"
    assert help_entry(out, "--store-size").endswith("20 GiB) (default 1.0 GiB)")


def test_help_shows_the_description_and_the_epilog(capsys: pytest.CaptureFixture[str]) -> None:
    out = help_text(["--help"], capsys)
    assert "A toy daemon." in out
    assert out.rstrip().endswith("the epilog")


def test_help_wins_over_other_valid_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert "toy driver options:" in help_text(["-store-size=2GiB", "-help"], capsys)


def test_help_for_an_option_whose_description_has_a_percent_sign(
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Spare(BaseModel):
        spare: int = Field(10, description="keep 10% of the cache free")

    driver: Driver[Any] = Driver(
        name="pct", description="", options=Spare, create=lambda s, o: ToyDevice(1)
    )
    assert run(Command("pctd", "", [driver]), ["--help"]) == 0
    assert "keep 10% of the cache free" in capsys.readouterr().out


def test_help_for_an_option_whose_default_has_a_percent_sign(
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Pattern(BaseModel):
        pattern: str = "disk%d.img"

    driver: Driver[Any] = Driver(
        name="pat", description="", options=Pattern, create=lambda s, o: ToyDevice(1)
    )
    assert run(Command("patd", "", [driver]), ["--help"]) == 0
    assert "(default disk%d.img)" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["-version", "--version"])
def test_version_prints_the_program_and_its_version(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(TOY_COMMAND, [flag]) == 0
    assert capsys.readouterr() == (f"{PROG} {VERSION}\n", "")


# -- kernel_options ----------------------------------------------------------------------------


def test_kernel_options_listen_alone_does_not_attach() -> None:
    assert kernel_options(load(["-listen=/a/s.sock"])) is None


def test_kernel_options_device_and_listen_attach_that_device() -> None:
    kernel = kernel_options(load(["-listen=/a/s.sock", "/dev/nbd3"]))
    assert kernel is not None
    assert (kernel.device, kernel.method) == (3, "auto")


def test_kernel_options_nothing_attaches_the_next_free_device() -> None:
    assert kernel_options(load([])) == KernelOptions(
        device=None,
        method="auto",
        connections=None,
        max_devices=DEFAULT_MAX_DEVICES,
        timeout=0,
        dead_timeout=60,
    )


@pytest.mark.parametrize("method", ["ioctl", "netlink"])
def test_kernel_options_an_attach_method_with_listen_attaches(method: str) -> None:
    kernel = kernel_options(load([f"-attach={method}", "-listen=127.0.0.1:0"]))
    assert kernel is not None
    assert (kernel.device, kernel.method) == (None, method)


def test_kernel_options_carry_the_kernel_settings() -> None:
    argv = ["-connections=4", "-timeout=30", "-dead-timeout=5", "-nbd-max-devs=64", "nbd1"]
    assert kernel_options(load(argv)) == KernelOptions(
        device=1, method="auto", connections=4, max_devices=64, timeout=30, dead_timeout=5
    )


def test_kernel_options_attach_none_with_listen_does_not_attach() -> None:
    assert kernel_options(load(["-attach=none", "-listen=/a/s.sock"])) is None


def test_kernel_options_attach_none_needs_listen() -> None:
    with pytest.raises(UsageError, match=r"^-attach: 'none' needs -listen"):
        kernel_options(load(["-attach=none"]))


def test_kernel_options_attach_none_refuses_a_device() -> None:
    with pytest.raises(UsageError, match=r"^NBD_DEVICE: not allowed with -attach=none$"):
        kernel_options(load(["-attach=none", "-listen=/a/s.sock", "/dev/nbd0"]))


# -- a driver's actions (usbd-dedup --check) -------------------------------------------------


def _inspect(settings: CommonSettings, options: ToyOptions) -> int:
    """An action that reports what it got, and fails as its settings ask."""
    if settings.store_name == "bad-value":
        raise ValueError("the volume says no")
    if settings.store_name == "unusable":
        raise OSError("the volume is in use")
    print(f"inspect {settings.store_name} cache={options.cache} size={settings.store_size}")
    return 3


ACTING = Driver(
    name="toy",
    description="A toy device with an action.",
    options=ToyOptions,
    create=_create_toy,
    actions={"inspect": Action("look at the store, then exit", _inspect)},
)
ACTING_COMMAND = Command(PROG, "A toy daemon.", [ACTING], headings=HEADINGS)


def test_an_action_runs_instead_of_the_daemon_with_the_same_settings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--store-name", "vol", "-toy-cache=2MiB", "--inspect", "-store-size=5MiB"]
    assert run(ACTING_COMMAND, argv) == 3
    out, err = capsys.readouterr()
    assert out == f"inspect vol cache={2 * MiB} size={5 * MiB}\n"
    assert "started" not in out + err


def test_an_action_is_listed_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(ACTING_COMMAND, ["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--inspect look at the store, then exit" in out


@pytest.mark.parametrize(
    ("argv", "status", "line"),
    [
        (["--store-name", "bad-value", "--inspect"], 2, "the volume says no"),
        (["--store-name", "unusable", "--inspect"], 1, "the volume is in use"),
        (["--inspect=yes"], 2, "-inspect: takes no value (it is what the command does)"),
        (["--inspect", "-inspect"], None, None),
    ],
)
def test_an_actions_errors_are_one_line_with_the_daemons_statuses(
    argv: list[str], status: int | None, line: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run(ACTING_COMMAND, argv)
    _out, err = capsys.readouterr()
    if status is None:  # the same action twice is the action once
        assert result == 3, err
        return
    assert result == status
    assert err.strip().splitlines() == [f"{PROG}: error: {line}"], err


def test_a_driver_without_the_action_refuses_it(capsys: pytest.CaptureFixture[str]) -> None:
    both = Command(PROG, "two", [TOY, ACTING], headings=HEADINGS)
    assert parse_argv(["--inspect"], [], ["inspect"]).action == "inspect"
    assert run(TOY_COMMAND, ["--inspect"]) == 2
    assert "unknown flag -inspect" in capsys.readouterr().err
    assert both.drivers[0] is TOY
