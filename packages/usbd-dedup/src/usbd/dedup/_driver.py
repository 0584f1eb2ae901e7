"""The dedup disk as a command: ``usbd-dedup --store-dir /srv --store-name vol /dev/nbd5``,
and its other two jobs, ``--check`` and ``--stats``, on a volume not in use.

Defaults, and why (a user of dm-vdo or ZFS dedup should find them sane):

* ``-dedup-blocksize 4KiB``: the file systems' and the kernel's block, so their writes are
  whole blocks; dm-vdo uses 4 KiB too. Larger blocks index less and dedup less.
* ``-dedup-memcache 512MiB``: the original's default.
* ``-dedup-compress zstd``: the fast level -1, and blocks that do not fit half a slot are
  stored raw.
* no ``-dedup-verify``: with a 256-bit hash a collision is not a practical event; with it,
  each match is read and compared before it is shared, as ZFS ``dedup=verify`` does.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from usbd.core import format_size, parse_size
from usbd.core.cli import OptionError
from usbd.core.cli import main as cli_main
from usbd.core.driver import Action, Driver
from usbd.core.lockfile import unlock
from usbd.core.settings import CommonSettings, Flag, Size

from ._check import check
from ._device import DedupDevice
from ._format import CLEAN, MAX_BLOCK, MIN_BLOCK, STATE, State
from ._metrics import METRICS
from ._store import Stats
from ._volume import open_closed, open_volume, volume_dir

__all__ = ["DedupOptions", "driver", "main"]


def _block_size(value: object) -> object:
    size = parse_size(value) if isinstance(value, str) else value
    if (
        isinstance(size, int)
        and not isinstance(size, bool)
        and (size & (size - 1) or not MIN_BLOCK <= size <= MAX_BLOCK)
    ):
        raise ValueError(
            f"invalid block size {format_size(size)}: expected a power of two from "
            f"{format_size(MIN_BLOCK)} to {format_size(MAX_BLOCK)}"
        )
    return size


def _compress(value: object) -> object:
    if isinstance(value, str):
        text = value.strip().lower()
        if text not in ("zstd", "identity"):
            raise ValueError(f"invalid compression {value!r}: expected zstd or identity")
        return text
    return value


class DedupOptions(BaseModel):
    """The original's -dedup-memcache, plus the block size, compression and verify."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memcache: Size = Field(
        512 << 20,
        description="memory for the index cache (LevelDB's block cache and write buffer, and "
        "the changes between commits): ex. 100 MiB, 2 GiB",
    )
    blocksize: Annotated[int, BeforeValidator(_block_size), Flag("SIZE", format_size)] = Field(
        4096,
        description="the unit of deduplication: a power of two from 512 B to 64 KiB, fixed "
        "when the volume is created",
    )
    compress: Annotated[Literal["zstd", "identity"], BeforeValidator(_compress), Flag("ALGO")] = (
        Field("zstd", description="compression of stored blocks: zstd or identity")
    )
    verify: bool = Field(
        False, description="compare the bytes of a block with a stored one before sharing it"
    )


#: Uncommitted index changes allowed per byte of -dedup-memcache (about 200 bytes each, an
#: eighth of the budget).
_BYTES_PER_CHANGE = 8 * 200


def _create(settings: CommonSettings, options: DedupOptions) -> DedupDevice:
    given_size = "store_size" in settings.model_fields_set and settings.store_size > 0
    if "store_size" in settings.model_fields_set and settings.store_size <= 0:
        raise OptionError("store-size", "a volume needs a size above 0")
    # A fixed parameter that differs from the volume's is a Mismatch, an OSError naming the
    # flag: exit status 1, as the volume, not the flag's syntax, is what refuses it.
    volume = open_volume(
        volume_dir(settings.store_dir, settings.store_name),
        size=settings.store_size if given_size else None,
        block_size=options.blocksize if "blocksize" in options.model_fields_set else None,
        memcache=options.memcache,
        compress=options.compress == "zstd",
        verify=options.verify,
    )
    try:
        return DedupDevice(volume, pending_limit=max(16384, options.memcache // _BYTES_PER_CHANGE))
    except BaseException:
        volume.close(clean=False)
        raise


def _check(settings: CommonSettings, options: DedupOptions) -> int:
    """--check: the deep check of a volume not in use; exit 1 if it has damage."""
    directory = volume_dir(settings.store_dir, settings.store_name)
    db, files, params, lock_fd = open_closed(directory, options.memcache)
    try:
        report = check(db, files, params, deep=True)
        for line in report.lines:
            print(line)
        stats = Stats(report.state, params.block_size, params.size)
        for key, value in stats.lines():
            print(f"{key}: {value}")
        print(report.summary)
        if not report.unrepairable:
            db.put(CLEAN, b"", sync=True)
        return 1 if report.unrepairable else 0
    finally:
        db.close()
        files.close()
        unlock(lock_fd)
        os.close(lock_fd)


def _stats(settings: CommonSettings, options: DedupOptions) -> int:
    """--stats: the counters of a volume not in use, as of its last commit."""
    directory = volume_dir(settings.store_dir, settings.store_name)
    db, files, params, lock_fd = open_closed(directory, options.memcache)
    try:
        state = State.unpack(db.get(STATE))
        for key, value in Stats(state, params.block_size, params.size).lines():
            print(f"{key}: {value}")
        print(f"allocated bytes: {files.allocated()}")
        if db.get(CLEAN) is None:
            print("(the volume was not stopped cleanly: run --check)", file=sys.stderr)
        return 0
    finally:
        db.close()
        files.close()
        unlock(lock_fd)
        os.close(lock_fd)


def _describe(settings: CommonSettings, options: DedupOptions) -> str:
    return (
        f"{format_size(options.blocksize)} dedup blocks, {format_size(options.memcache)} "
        f"index cache, {options.compress} compression, "
        f"{'byte-compare on hash match' if options.verify else 'BLAKE3-256 matches shared'}"
    )


driver = Driver(
    name="dedup",
    aliases=("dedup-file", "dedup-disk"),
    description="Each distinct block stored once: <store-dir>/<store-name>.dedup/ holds a "
    "LevelDB index (block map, reference counts, BLAKE3 hashes) and the block files. FLUSH "
    "syncs the data, then commits the index in one synced batch; freed blocks are reused and "
    "punched out.",
    options=DedupOptions,
    create=_create,
    stores_data=True,
    describe=_describe,
    actions={
        "check": Action(
            "check and repair a volume not in use (reads every stored block), then exit",
            _check,
        ),
        "stats": Action("print a volume's statistics (not in use), then exit", _stats),
    },
    metrics=METRICS,
)


def main() -> int:
    return cli_main(driver, prog="usbd-dedup")
