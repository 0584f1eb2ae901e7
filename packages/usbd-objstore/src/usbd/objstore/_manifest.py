"""The manifest: the one object that says which objects make up the volume, committed whole.

The bucket holds, under the volume's name::

    <name>/manifest                          the head: the only object ever replaced
    <name>/lease                             who may write (see _lease.py)
    <name>/data/<chunk:08x>.<gen:016x>       one chunk's bytes at one generation, never replaced
    <name>/meta/base.<seq:016x>-<attempt>    the full chunk map as of commit <seq>, never replaced

Data objects are immutable: an upload of chunk 7 writes a new key with a new generation. The
device is whatever the head names, so the remote copy changes only when the head is replaced,
all at once, and is a point-in-time image between commits whatever dies when. Objects the head
stops naming are deleted only after that head is committed; anything left over by a crash
(uploaded but never committed, or superseded but not yet deleted) is collected when the volume
is next opened.

The head is a small public part (format, volume id, size, object size, compression,
encryption, commit number, writer) so that a daemon opened with other parameters can say which
differ even with the wrong key, then a sealed body that binds the public part by its hash and
holds the chunk map as a base (a separate immutable object, named with its hash) plus the
changes since. Most commits rewrite only the head; when the changes outgrow
:data:`COMPACT_AT` entries a new base is written first. Every commit is a PUT with
``If-Match`` on the ETag of the head this writer last committed: a writer whose lease was taken
over finds the head changed and stops (:class:`Fenced`) instead of overwriting.

Each commit attempt carries a random ``attempt`` id in the public part. A commit whose answer
was lost (or that raised after it may have landed: :class:`CommitUncertain`) is settled by
reading the head back: it is ours only if it carries our attempt id, never merely the same
commit number.

Generations are ``epoch << 32 | counter``: the epoch goes up by one each time a writer opens
the volume (committed before it uploads anything), so two runs never make the same key, even
when the first crashed after uploading objects it never committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ._codec import Codec, Compression, IntegrityError, Kind
from ._store import Deadline, NotFound, ObjectStore, PreconditionFailed, StoreError

__all__ = [
    "COMPACT_AT",
    "FORMAT",
    "CommitUncertain",
    "Fenced",
    "Manifest",
    "ManifestError",
    "Params",
    "base_key",
    "commit",
    "create",
    "data_key",
    "head_key",
    "load",
    "read_public",
    "seq_of_base",
    "settle_uncertain",
]

log = logging.getLogger("usbd.objstore")

FORMAT = 1
MAGIC = b"USBDMAN1"
#: Changes carried in the head before the map is rewritten as a new base.
COMPACT_AT = 4096
_LENGTH = struct.Struct(">I")
_PAIR = struct.Struct(">QQ")


class ManifestError(Exception):
    """The head cannot be read as a manifest of this volume (corrupted, wrong key, replaced)."""


class Fenced(Exception):
    """Another writer committed to the volume since this one last did: stop writing."""


class CommitUncertain(Exception):
    """A commit failed in a way that does not say whether the head was replaced; ``attempt``
    is the manifest it tried to publish (see :func:`settle_uncertain`)."""

    def __init__(self, message: str, attempt: Manifest) -> None:
        super().__init__(message)
        self.attempt = attempt


@dataclass(frozen=True)
class Params:
    """What a volume is created with and cannot change: a reopen must match."""

    size: int
    object_size: int
    compression: str
    encryption: str


@dataclass(frozen=True)
class Manifest:
    """One committed head: parameters, commit number, writer epoch, and the chunk map
    (``chunks``: chunk index -> generation, absent chunks read as zeros)."""

    volume: bytes
    params: Params
    seq: int
    epoch: int
    writer: dict[str, Any]
    chunks: Mapping[int, int]
    base: dict[str, Any] | None = None
    deltas: Mapping[int, int] = field(default_factory=dict)
    etag: str = ""
    #: The random id of the commit attempt that published this head.
    attempt: str = ""


def head_key(name: str) -> str:
    return f"{name}/manifest"


def data_key(name: str, chunk: int, generation: int) -> str:
    return f"{name}/data/{chunk:08x}.{generation:016x}"


def base_key(name: str, seq: int, attempt: str) -> str:
    return f"{name}/meta/base.{seq:016x}-{attempt}"


def seq_of_base(key: str) -> int:
    """The commit number in a base's key."""
    return int(key.rsplit(".", 1)[1].split("-", 1)[0], 16)


def read_public(blob: bytes, name: str) -> tuple[dict[str, Any], bytes, bytes]:
    """The head's public part (parsed and raw) and its sealed body."""
    if len(blob) < len(MAGIC) + _LENGTH.size or not blob.startswith(MAGIC):
        raise ManifestError(f"{name} is not a usbd-objstore manifest")
    (length,) = _LENGTH.unpack_from(blob, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    raw = blob[start : start + length]
    try:
        public = json.loads(raw)
    except ValueError:
        raise ManifestError(f"{name} is damaged (its public part is not JSON)") from None
    if not isinstance(public, dict) or public.get("format") != FORMAT:
        raise ManifestError(f"{name} has format {public.get('format')!r}, this reads {FORMAT}")
    return public, raw, blob[start + length :]


def params_of(public: Mapping[str, Any]) -> Params:
    return Params(
        int(public["size"]),
        int(public["object_size"]),
        str(public["compression"]),
        str(public["encryption"]),
    )


def _encode(
    manifest: Manifest, codec: Codec, base: dict[str, Any] | None, deltas: Mapping[int, int]
) -> bytes:
    public = {
        "format": FORMAT,
        "volume": manifest.volume.hex(),
        "size": manifest.params.size,
        "object_size": manifest.params.object_size,
        "compression": manifest.params.compression,
        "encryption": manifest.params.encryption,
        "seq": manifest.seq,
        "epoch": manifest.epoch,
        "writer": manifest.writer,
        "attempt": manifest.attempt,
        "committed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    raw = json.dumps(public, sort_keys=True).encode()
    body = json.dumps(
        {
            "public": hashlib.sha256(raw).hexdigest(),
            "base": base,
            "deltas": sorted(deltas.items()),
        }
    ).encode()
    sealed = codec.seal(Kind.MANIFEST, manifest.seq, manifest.epoch, body)
    return MAGIC + _LENGTH.pack(len(raw)) + raw + sealed


def _pack_map(chunks: Mapping[int, int]) -> bytes:
    return b"".join(_PAIR.pack(c, g) for c, g in sorted(chunks.items()))


def _unpack_map(data: bytes) -> dict[int, int]:
    return {c: g for c, g in _PAIR.iter_unpack(data)}


def load(
    store: ObjectStore, name: str, codec_for: Any, deadline: Deadline = None
) -> Manifest | None:
    """The committed head of volume ``name``, or None if there is none.

    ``codec_for(public)`` gives the codec for the volume the public part describes (it checks
    the parameters first, so that a mismatch is reported before any key is tried).
    """
    key = head_key(name)
    try:
        blob, etag = store.get_tagged(key, deadline=deadline)
    except NotFound:
        return None
    public, raw, sealed = read_public(blob, key)
    codec: Codec = codec_for(public)
    seq, epoch = int(public["seq"]), int(public["epoch"])
    try:
        body = json.loads(codec.open(sealed, Kind.MANIFEST, seq, epoch, key))
    except IntegrityError as exc:
        raise ManifestError(str(exc)) from None
    if body.get("public") != hashlib.sha256(raw).hexdigest():
        raise ManifestError(f"{key}: its public part was altered")
    chunks: dict[int, int] = {}
    base = body.get("base")
    if base is not None:
        blob = store.get(base["key"], deadline=deadline)
        if hashlib.sha256(blob).hexdigest() != base["sha256"]:
            raise ManifestError(f"{base['key']}: not the base {key} names (replaced or damaged)")
        try:
            chunks = _unpack_map(
                codec.open(blob, Kind.BASE, int(base["seq"]), int(base["epoch"]), base["key"])
            )
        except IntegrityError as exc:
            raise ManifestError(str(exc)) from None
    deltas = {int(c): int(g) for c, g in body.get("deltas", [])}
    for chunk, generation in deltas.items():
        if generation:
            chunks[chunk] = generation
        else:
            chunks.pop(chunk, None)
    return Manifest(
        bytes.fromhex(public["volume"]),
        params_of(public),
        seq,
        epoch,
        dict(public.get("writer", {})),
        chunks,
        base,
        deltas,
        etag,
        str(public.get("attempt", "")),
    )


def create(
    store: ObjectStore,
    name: str,
    codec: Codec,
    params: Params,
    writer: dict[str, Any],
    deadline: Deadline = None,
) -> Manifest:
    """A new, empty volume's first head (only if there is no head yet)."""
    manifest = Manifest(codec.volume, params, 1, 1, writer, {}, attempt=uuid.uuid4().hex[:16])
    blob = _encode(manifest, codec, None, {})
    etag = store.put(head_key(name), blob, if_none_match=True, deadline=deadline)
    return replace(manifest, etag=etag)


def commit(
    store: ObjectStore,
    name: str,
    codec: Codec,
    current: Manifest,
    changes: Mapping[int, int],
    *,
    epoch: int | None = None,
    writer: dict[str, Any] | None = None,
    deadline: Deadline = None,
) -> tuple[Manifest, list[str]]:
    """Publish ``current`` with ``changes`` (chunk -> new generation, 0: now zeros), and maybe
    a new epoch. Returns the new head and the keys that no longer belong to the volume (to be
    deleted now that it is committed). Raises :class:`Fenced` if another writer committed,
    :class:`CommitUncertain` if it cannot tell whether the head was replaced."""
    chunks = dict(current.chunks)
    deltas = dict(current.deltas)
    garbage = []
    for chunk, generation in changes.items():
        old = chunks.get(chunk)
        if old is not None and old != generation:
            garbage.append(data_key(name, chunk, old))
        if generation:
            chunks[chunk] = generation
        else:
            chunks.pop(chunk, None)
        deltas[chunk] = generation
    seq = current.seq + 1
    attempt = uuid.uuid4().hex[:16]
    new = replace(
        current,
        seq=seq,
        epoch=current.epoch if epoch is None else epoch,
        writer=current.writer if writer is None else writer,
        chunks=chunks,
        attempt=attempt,
    )
    base = current.base
    if len(deltas) > COMPACT_AT:
        key = base_key(name, seq, attempt)
        blob = codec.seal(Kind.BASE, seq, new.epoch, _pack_map(chunks))
        store.put(key, blob, deadline=deadline)
        if base is not None:
            garbage.append(base["key"])
        base = {
            "key": key,
            "seq": seq,
            "epoch": new.epoch,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "count": len(chunks),
        }
        deltas = {}
    blob = _encode(new, codec, base, deltas)
    key = head_key(name)
    new = replace(new, base=base, deltas=deltas)
    try:
        etag = store.put(key, blob, if_match=current.etag, deadline=deadline)
    except PreconditionFailed:
        etag = _ours_after_all(store, key, new, current, deadline)
    except StoreError as exc:
        raise CommitUncertain(f"commit {seq} of {name}: {exc}", new) from exc
    return replace(new, etag=etag), garbage


def settle_uncertain(
    store: ObjectStore, name: str, current: Manifest, attempt: Manifest, deadline: Deadline
) -> Manifest:
    """After :class:`CommitUncertain`: the head in force, ``attempt`` (it landed) or
    ``current`` (it did not); :class:`Fenced` if someone else's is there."""
    key = head_key(name)
    etag = _ours_after_all(store, key, attempt, current, deadline)
    return current if etag == current.etag else replace(attempt, etag=etag)


def _ours_after_all(
    store: ObjectStore, key: str, new: Manifest, current: Manifest, deadline: Deadline
) -> str:
    """The head's ETag if it is ``new`` (a retry lost the first attempt's answer) or still
    ``current``; else :class:`Fenced` naming who committed."""
    blob, etag = store.get_tagged(key, deadline=deadline)
    public, _raw, _sealed = read_public(blob, key)
    writer = public.get("writer", {})
    if public.get("attempt") == new.attempt or etag == current.etag:
        return etag
    raise Fenced(
        f"the volume was committed by {writer.get('host', '?')} pid {writer.get('pid', '?')} "
        f"(commit {public.get('seq')}, epoch {public.get('epoch')}) since this daemon's last "
        "commit: its lease was taken over"
    )


def describe(codec_params: Params) -> str:
    return (
        f"{codec_params.size} bytes, {codec_params.object_size}-byte objects, "
        f"{codec_params.compression} compression, {codec_params.encryption} encryption"
    )


def compression_of(name: str) -> Compression:
    return {"zstd": Compression.ZSTD, "gzip": Compression.GZIP}.get(name, Compression.IDENTITY)
