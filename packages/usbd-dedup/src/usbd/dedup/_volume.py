"""Opening a volume: its directory, the lock, the fixed parameters, the check after a crash.

``<store-dir>/<store-name>.dedup/`` holds ``lock`` (an ``flock`` held by the daemon that has
the volume open, whose pid a second one names), ``index/`` (LevelDB) and the data files
``blocks.<slot size>``. The ``C`` key in the index says the last daemon stopped cleanly; it is
deleted at open, so a volume opened without it was not closed (kill -9, a power cut) and is
checked before use.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import plyvel

from usbd.core import format_size
from usbd.core.lockfile import lock_exclusive, unlock

from ._blocks import BlockFiles
from ._check import Report, check
from ._format import CLEAN, PARAMS, STATE, Params, State, class_sizes
from ._index import Index
from ._store import DedupStore

__all__ = ["Mismatch", "OpenError", "Volume", "open_volume", "volume_dir"]

log = logging.getLogger("usbd.dedup")


class OpenError(OSError):
    """The volume cannot be opened (exit status 1): one line saying why."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)

    def __str__(self) -> str:
        return str(self.strerror)


class Mismatch(OpenError):
    """A fixed parameter given now differs from the volume's; ``flag`` names it."""

    def __init__(self, flag: str, message: str) -> None:
        self.flag = flag
        super().__init__(message)


def volume_dir(store_dir: Path, name: str) -> Path:
    return store_dir / f"{name}.dedup"


@dataclass
class Volume:
    """An open volume: the index, the data files, the store over them, and the lock."""

    directory: Path
    db: plyvel.DB
    files: BlockFiles
    params: Params
    store: DedupStore
    lock_fd: int
    checked: Report | None = None

    def close(self, *, clean: bool = True) -> None:
        """Close everything; ``clean`` marks the volume as stopped cleanly (the caller has
        committed everything), so the next open skips the check."""
        try:
            if clean:
                self.db.put(CLEAN, b"", sync=True)
        finally:
            self.db.close()
            self.files.close()
            unlock(self.lock_fd)
            os.close(self.lock_fd)


#: Bytes a cached index entry takes in Python (an OrderedDict entry, its key and value),
#: measured with tracemalloc: 229 for a map entry, 262 for a slot record or a hash entry.
_CACHED_ENTRY = 256


def cache_entries(memcache: int) -> int:
    """Index entries cached in Python (see _index.Cache): a quarter of -dedup-memcache."""
    return memcache // 4 // _CACHED_ENTRY


def _cache_options(memcache: int) -> dict[str, int]:
    """-dedup-memcache split: an eighth (1 to 64 MiB) for each of LevelDB's two write
    buffers (the one filling, the one being written out), an eighth for the changes between
    commits (the device's bound), a quarter for the index's own cache of entries, and the
    rest for LevelDB's block cache."""
    write_buffer = min(max(memcache // 8, 1 << 20), 64 << 20)
    rest = memcache - 2 * write_buffer - memcache // 8 - memcache // 4
    return {
        "write_buffer_size": write_buffer,
        "lru_cache_size": max(rest, 1 << 20),
        # LevelDB keeps each open table's index and Bloom filter outside the block cache
        # (about 60 KiB per 2 MiB table), so the number of open tables bounds that memory:
        # 128 for 64 MiB, LevelDB's default of 1000 from 500 MiB.
        "max_open_files": min(1000, max(64, memcache // (512 << 10))),
    }


def open_volume(
    directory: Path,
    *,
    size: int | None,
    block_size: int | None,
    memcache: int,
    compress: bool = True,
    verify: bool = False,
    create: bool = True,
) -> Volume:
    """Open (or with ``create``, create) the volume in ``directory``. ``size`` and
    ``block_size`` are what the user gave (None: not given, the volume's own are used; a
    new volume then gets 1 GiB and 4 KiB)."""
    if not directory.is_dir():
        if not create:
            raise OpenError(f"{directory}: no such volume")
        # 0700: LevelDB creates its files 0644 (the umask aside), and the index holds the
        # block map and every block's hash; the directory keeps them this user's.
        directory.mkdir(mode=0o700)
    lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        lock_exclusive(lock_fd, directory, "another usbd-dedup?")
        return _open_locked(directory, lock_fd, size, block_size, memcache, compress, verify)
    except BaseException:
        os.close(lock_fd)
        raise


def _open_locked(
    directory: Path,
    lock_fd: int,
    size: int | None,
    block_size: int | None,
    memcache: int,
    compress: bool,
    verify: bool,
) -> Volume:
    db = plyvel.DB(
        str(directory / "index"),
        create_if_missing=True,
        bloom_filter_bits=10,
        compression=None,
        **_cache_options(memcache),
    )
    try:
        raw = db.get(PARAMS)
        new = raw is None
        if raw is None:
            params = Params(size or 1 << 30, block_size or 4096)
            with db.write_batch(sync=True) as batch:
                batch.put(PARAMS, params.pack())
                batch.put(STATE, State().pack())
                batch.put(CLEAN, b"")
        else:
            params = Params.unpack(raw)
            _compare(params, size, block_size)
        files = BlockFiles(directory, class_sizes(params.block_size))
    except BaseException:
        db.close()
        raise
    try:
        report = None
        if db.get(CLEAN) is None:
            log.warning("%s was not stopped cleanly: checking it", directory)
            report = check(db, files, params, deep=False)
            for line in report.lines:
                log.warning("%s", line)
            log.warning("%s", report.summary)
        elif not new:
            # Data past the high-water marks is never referenced; a clean stop leaves none.
            files.cut(State.unpack(db.get(STATE)).high)
        db.delete(CLEAN, sync=True)
        state = State.unpack(db.get(STATE))
        store = DedupStore(
            Index(db, cache_entries(memcache)),
            files,
            params,
            state,
            compress=compress,
            verify=verify,
        )
    except BaseException:
        files.close()
        db.close()
        raise
    return Volume(directory, db, files, params, store, lock_fd, report)


def _compare(params: Params, size: int | None, block_size: int | None) -> None:
    if size is not None and size != params.size:
        raise Mismatch(
            "store-size",
            f"-store-size {format_size(size)} differs from the volume's "
            f"{format_size(params.size)}: a dedup volume keeps its size (leave out -store-size)",
        )
    if block_size is not None and block_size != params.block_size:
        raise Mismatch(
            "dedup-blocksize",
            f"-dedup-blocksize {format_size(block_size)} differs from the volume's "
            f"{format_size(params.block_size)}: it is fixed when the volume is created "
            "(leave out -dedup-blocksize)",
        )


def open_closed(
    directory: Path, memcache: int = 64 << 20
) -> tuple[plyvel.DB, BlockFiles, Params, int]:
    """A volume not in use, for --check and --stats: the index, the files, the params and
    the lock's descriptor (the caller closes all four)."""
    if not (directory / "index").is_dir():
        raise OpenError(f"{directory}: no such volume")
    lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        lock_exclusive(lock_fd, directory, "another usbd-dedup?")
        db = plyvel.DB(str(directory / "index"), compression=None, **_cache_options(memcache))
    except BaseException:
        os.close(lock_fd)
        raise
    try:
        raw = db.get(PARAMS)
        if raw is None:
            raise OpenError(f"{directory}: not a dedup volume (no parameters in its index)")
        params = Params.unpack(raw)
        files = BlockFiles(directory, class_sizes(params.block_size))
    except BaseException:
        db.close()
        unlock(lock_fd)
        os.close(lock_fd)
        raise
    return db, files, params, lock_fd
