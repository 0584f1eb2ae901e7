"""The file disk as a command: ``usbd-filedisk --store-dir /srv --store-name vol /dev/nbd5``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from usbd.core.cli import OptionError
from usbd.core.cli import main as cli_main
from usbd.core.driver import Driver
from usbd.core.settings import CommonSettings

from ._device import (
    DEFAULT_SIZE,
    DirectFileDisk,
    FileDisk,
    SizeMismatch,
    StoreError,
    describe_sizes,
)
from ._metrics import METRICS

#: The flag behind each parameter a StoreError can name.
_FLAGS = {"size": "store-size", "direct": "file-direct", "path": "store-name"}


class FileOptions(BaseModel):
    """-file-grow and -file-direct."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grow: bool = Field(
        False,
        description="grow an existing backing file to a larger --store-size (it is never shrunk)",
    )
    direct: bool = Field(
        False,
        description="bypass the page cache (O_DIRECT); the file's size must be a multiple of 4 KiB",
    )


def _mismatch(exc: SizeMismatch) -> str:
    have, want = describe_sizes(exc.current, exc.wanted)
    if exc.wanted > exc.current:
        return f"{exc.path} is {have}, smaller than {want}: add -file-grow to grow it"
    return (
        f"{exc.path} is {have}, larger than {want}: shrinking is never done "
        "(leave out -store-size to use the file's size)"
    )


def _create(settings: CommonSettings, options: FileOptions) -> FileDisk:
    path = (settings.store_dir / f"{settings.store_name}.bin").absolute()
    # Only a size the user gave (flag, USBD_STORE_SIZE or the config file) is checked
    # against an existing file; 0 means "not given".
    given = "store_size" in settings.model_fields_set and settings.store_size > 0
    kind = DirectFileDisk if options.direct else FileDisk
    try:
        return kind(
            path,
            settings.store_size if given else None,
            grow=options.grow,
            default_size=settings.store_size or DEFAULT_SIZE,
        )
    except SizeMismatch as exc:
        raise OptionError("store-size", _mismatch(exc)) from None
    except StoreError as exc:
        raise OptionError(_FLAGS.get(exc.param, exc.param), str(exc)) from None


driver = Driver(
    name="file",
    aliases=("disk",),
    description="A sparse file <store-dir>/<store-name>.bin as the device: created without "
    "writing zeros, trim punches holes, flush is fdatasync. An existing file keeps its size.",
    options=FileOptions,
    create=_create,
    stores_data=True,
    metrics=METRICS,
)


def main() -> int:
    return cli_main(driver, prog="usbd-filedisk")
