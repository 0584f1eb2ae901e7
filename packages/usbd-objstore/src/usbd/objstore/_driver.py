"""The object store as a command: ``usbd-objstore --store-size 20GiB``, with the original's flags.

Defaults, and why (a user of s3backer should find them sane):

* ``-objstore-objsize 1MiB``: an object is the unit of upload and of fetch. The original's
  64 MiB made a 4 KiB random write cost a 64 MiB upload and a 4 KiB read a 64 MiB download;
  s3backer recommends blocks of about 1 MiB for the same reason. Smaller objects mean more
  requests (and per-request charges) for sequential I/O; larger ones more amplification.
* ``-objstore-aesmode aes-gcm`` with ``<store-dir>/key.aes`` generated if absent: encrypted
  and authenticated by default, as the original encrypted by default.
* ``-objstore-compress zstd``: fast, and incompressible chunks are stored as they are.
* ``-objstore-flushevery 10s`` and ``-objstore-concurflush 8``: as the original (which used
  16 workers; 8 keep a 2-core host responsive).
* ``-objstore-diskcache 0``: the cache may hold the whole device, as the original.
* no persistent cache, as the original: FLUSH then waits for the bucket, which is what makes a
  lost machine lose nothing flushed. ``-objstore-persistcache`` trades that for local speed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from usbd.core import describe_key_spec, format_size, load_key, parse_size
from usbd.core.cli import OptionError
from usbd.core.cli import main as cli_main
from usbd.core.driver import Driver
from usbd.core.settings import AesKeySpec, CommonSettings, Flag, Size

from ._device import ObjStoreDevice
from ._manifest import Params
from ._metrics import METRICS
from ._store import LocalStore, ObjectStore, S3Store
from ._volume import open_volume

__all__ = ["DEFAULT_S3", "ObjStoreOptions", "driver", "main"]

#: The original's default: a local minio with its default credentials.
DEFAULT_S3: dict[str, Any] = {
    "endpoint": "http://127.0.0.1:9000",
    "bucket": "usbd",
    "region": "us-east-1",
    "access_key_id": "minioadmin",
    "secret_key": "minioadmin",
}
_S3_KEYS = ("endpoint", "bucket", "region", "access_key_id", "secret_key", "path_style")
_LOCAL_KEYS = ("path",)
_LATER_KINDS = ("b2", "azure", "swift", "google", "oracle", "sftp")
_MIN_OBJECT = 64 << 10
_MAX_OBJECT = 256 << 20
_MIN_CACHED_OBJECTS = 4
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def _kind(value: object) -> object:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _LATER_KINDS:
            raise ValueError(
                f"kind {text!r} is not available yet: this version has s3 (S3 and compatibles) "
                "and local (a directory)"
            )
        if text not in ("s3", "local"):
            raise ValueError(f"invalid kind {value!r}: expected s3 or local")
        return text
    return value


def _aesmode(value: object) -> object:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("aes-ctr", "aes-cfb", "aes-ofb"):
            raise ValueError(
                f"{text} is refused: it does not authenticate, so a corrupted or swapped object "
                "would be read as garbage; use aes-gcm (or identity for no encryption)"
            )
        if text not in ("aes-gcm", "identity"):
            raise ValueError(f"invalid mode {value!r}: expected aes-gcm or identity")
        return text
    return value


def _compress(value: object) -> object:
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "s2":
            raise ValueError("s2 is not offered (no maintained Python binding): use zstd")
        if text not in ("zstd", "gzip", "identity"):
            raise ValueError(f"invalid compression {value!r}: expected zstd, gzip or identity")
        return text
    return value


def _object_size(value: object) -> object:
    size = parse_size(value) if isinstance(value, str) else value
    if (
        isinstance(size, int)
        and not isinstance(size, bool)
        and (size % 4096 or not _MIN_OBJECT <= size <= _MAX_OBJECT)
    ):
        raise ValueError(
            f"invalid object size {format_size(size)}: expected a multiple of 4 KiB from "
            f"{format_size(_MIN_OBJECT)} to {format_size(_MAX_OBJECT)}"
        )
    return size


def parse_duration(value: object) -> object:
    """Seconds from ``10s``, ``500ms``, ``1m30s``, ``2h`` or a plain number (Go's durations)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: expected e.g. 10s, 500ms, 1m30s")  # noqa: TRY004
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"invalid duration {value!r}: expected 0 or more")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return float(text)
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"invalid duration {value!r}: expected e.g. 10s, 500ms, 1m30s")
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        return sum(float(n) * scale[u] for n, u in parts)
    return value


def _show_duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _count(value: object) -> object:
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit():
            raise ValueError(f"invalid value {value!r}: expected a whole number (0: choose)")
        return int(text)
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise ValueError(f"invalid value {value!r}: expected a whole number (0: choose)")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), Flag("DURATION", _show_duration)]


class ObjStoreOptions(BaseModel):
    """The original's -objstore-* flags, plus -objstore-takeover and -objstore-timeout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Annotated[str, BeforeValidator(_kind), Flag("KIND")] = Field(
        "s3",
        description="type of remote object store: s3 (S3 and compatibles) or local (a "
        "directory); the original's other kinds come later",
    )
    cfg: Annotated[str, Flag("JSON", secret=True)] = Field(
        "",
        description="JSON configuration: for s3 endpoint, bucket, region, access_key_id, "
        "secret_key, path_style (default: a local minio at 127.0.0.1:9000 with its default "
        'credentials, bucket "usbd"; without keys, boto3\'s credential chain); for local '
        "path (default <store-dir>/objects)",
    )
    objsize: Annotated[int, BeforeValidator(_object_size), Flag("SIZE", format_size)] = Field(
        1 << 20,
        description="size of remote objects: the unit of upload and fetch (ex. 1 MiB, 4 MiB)",
    )
    diskcache: Size = Field(
        0,
        description="local disk for caching remote objects (0: a full local copy); clean "
        "objects are evicted least recently used, dirty ones never",
    )
    persistcache: bool = Field(
        False,
        description="keep the local cache across restarts: FLUSH is then durable on local disk "
        "and uploads follow; without it FLUSH waits until the writes are in the bucket",
    )
    aeskey: AesKeySpec = Field(
        None,
        description="AES key: key:<hex>, file:<path> or env:<VAR> (default <store-dir>/key.aes, "
        "generated if absent)",
    )
    aesmode: Annotated[str, BeforeValidator(_aesmode), Flag("MODE")] = Field(
        "aes-gcm",
        description="encryption of remote objects: aes-gcm (authenticated) or identity (none; "
        "objects are then checksummed)",
    )
    compress: Annotated[str, BeforeValidator(_compress), Flag("ALGO")] = Field(
        "zstd", description="compression of remote objects: zstd, gzip or identity"
    )
    concurflush: Annotated[int, BeforeValidator(_count), Flag("N")] = Field(
        0, description="uploads (and read-ahead fetches) at a time (0: 8)"
    )
    flushevery: Duration = Field(
        10.0,
        description="how often dirty objects are uploaded (0: only on FLUSH without a "
        "persistent cache, when the cache is full, and at exit)",
    )
    takeover: bool = Field(
        False,
        description="take over a volume whose lease has expired (its holder stopped renewing "
        "it: make sure that daemon is gone)",
    )
    timeout: Duration = Field(
        30.0,
        description="how long a read of an uncached object, or a FLUSH without a persistent "
        "cache, waits for an unreachable store before failing with EIO",
    )


def _config(options: ObjStoreOptions) -> dict[str, Any]:
    if not options.cfg.strip():
        return dict(DEFAULT_S3) if options.kind == "s3" else {}
    try:
        config = json.loads(options.cfg)
    except ValueError as exc:
        raise OptionError("objstore-cfg", f"not valid JSON ({exc.args[0].split(':')[0]})") from None
    if not isinstance(config, dict):
        raise OptionError("objstore-cfg", "expected a JSON object")
    accepted = _S3_KEYS if options.kind == "s3" else _LOCAL_KEYS
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise OptionError(
            "objstore-cfg",
            f"unknown key(s) {', '.join(unknown)} for kind {options.kind}: expected "
            f"{', '.join(accepted)}",
        )
    if options.kind == "s3":
        if not config.get("bucket"):
            config["bucket"] = DEFAULT_S3["bucket"]
        if "path_style" in config and not isinstance(config["path_style"], bool):
            raise OptionError("objstore-cfg", "path_style: expected true or false")
        if bool(config.get("access_key_id")) != bool(config.get("secret_key")):
            raise OptionError(
                "objstore-cfg",
                "access_key_id and secret_key go together: give both, or neither for boto3's "
                "credential chain",
            )
        for key in _S3_KEYS[:5]:
            if key in config and not isinstance(config[key], str):
                raise OptionError("objstore-cfg", f"{key}: expected a string")
    return config


def _store(settings: CommonSettings, options: ObjStoreOptions) -> tuple[ObjectStore, str]:
    """The store and, for the default S3, a hint for when nothing answers there."""
    config = _config(options)
    if options.kind == "local":
        given = config.get("path")
        root = Path(given) if given else settings.store_dir / "objects"
        if not given:
            root.mkdir(mode=0o700, exist_ok=True)  # with aesmode identity objects are plain
        return LocalStore(root), ""
    hint = ""
    if not options.cfg.strip():
        hint = (
            " (the default: a local minio; point -objstore-cfg at your S3, e.g. "
            '\'{"endpoint": "http://HOST:PORT", "bucket": "NAME", "access_key_id": "...", '
            '"secret_key": "..."}\', or use -objstore-kind=local)'
        )
    workers = options.concurflush or 8
    return S3Store(config, timeout=min(options.timeout, 30.0), pool=4 * workers + 8), hint


def _cache_objects(options: ObjStoreOptions, object_size: int) -> int | None:
    """How many objects -objstore-diskcache holds (None: no bound)."""
    if not options.diskcache:
        return None
    count = options.diskcache // object_size
    if count < _MIN_CACHED_OBJECTS:
        raise OptionError(
            "objstore-diskcache",
            f"{format_size(options.diskcache)} holds fewer than {_MIN_CACHED_OBJECTS} "
            f"objects of {format_size(object_size)}: give at least "
            f"{format_size(_MIN_CACHED_OBJECTS * object_size)} (or 0 for a full copy)",
        )
    return count


def _create(settings: CommonSettings, options: ObjStoreOptions) -> ObjStoreDevice:
    _cache_objects(options, options.objsize)  # before anything is created or contacted
    store, hint = _store(settings, options)
    given = {
        field
        for field, name in (
            ("object_size", "objsize"),
            ("compression", "compress"),
            ("encryption", "aesmode"),
        )
        if name in options.model_fields_set
    }
    if "store_size" in settings.model_fields_set:
        given.add("size")
    if settings.store_size <= 0:
        raise OptionError("store-size", "a volume needs a size above 0")
    wanted = Params(settings.store_size, options.objsize, options.compress, options.aesmode)

    def key_for(encryption: str) -> bytes | None:
        if encryption == "identity":
            return None
        return load_key(options.aeskey, settings.store_dir)

    volume = open_volume(
        store,
        settings.store_name,
        wanted,
        given,
        key_for,
        takeover=options.takeover,
        timeout=options.timeout,
        hint=hint,
    )
    try:
        # Checked again with the volume's own object size, which may differ from the flag's.
        cache_objects = _cache_objects(options, volume.manifest.params.object_size)
        return ObjStoreDevice(
            volume,
            settings.store_dir / f"{settings.store_name}.cache",
            persistent=options.persistcache,
            cache_objects=cache_objects,
            workers=options.concurflush or 8,
            flush_every=options.flushevery,
            timeout=options.timeout,
        )
    except BaseException:
        volume.lease.release()
        store.close()
        raise


def _describe(settings: CommonSettings, options: ObjStoreOptions) -> str:
    config = _config(options)
    if options.kind == "s3":
        shown = ", ".join(
            f"{key}=<REDACTED>" if key == "secret_key" else f"{key}={json.dumps(value)}"
            for key, value in config.items()
        )
        where = f"a s3 remote object store ({shown})"
    else:
        where = f"a local object store ({config.get('path') or settings.store_dir / 'objects'})"
    cache = (
        "as much as the whole device" if not options.diskcache else format_size(options.diskcache)
    )
    key = describe_key_spec(options.aeskey, settings.store_dir)
    encryption = (
        "no encryption"
        if options.aesmode == "identity"
        else f"{options.aesmode} encryption (key {key})"
    )
    return (
        f"{where}, with {format_size(options.objsize)} objects, using up to {cache} of "
        f"{'persistent' if options.persistcache else 'temporary'} local storage for cache, "
        f"{options.compress} compression, {encryption}, uploading every "
        f"{_show_duration(options.flushevery)} using {options.concurflush or 8} workers"
    )


driver = Driver(
    name="objstore",
    aliases=("osbd",),
    description="A device cached on local disk (<store-dir>/<store-name>.cache) and backed by "
    "an S3 bucket (or a directory), volume <store-name>: objects of -objstore-objsize, "
    "compressed and encrypted, committed by a manifest so the bucket always holds a "
    "point-in-time image. One writer per volume (a lease in the bucket).",
    options=ObjStoreOptions,
    create=_create,
    stores_data=True,
    describe=_describe,
    metrics=METRICS,
)


def main() -> int:
    return cli_main(driver, prog="usbd-objstore")
