"""Opening a volume: reach the store, take the lease, read (or create) the manifest, check that
it is the volume asked for, and with the right key, before any data is served.

Every refusal here is one line saying which thing is wrong (:class:`OpenError`, an OSError, so
the command exits 1): the store does not answer, the bucket is missing, the credentials are
refused, another daemon holds the volume, the volume was created with other parameters, or the
key does not authenticate the manifest.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from usbd.core import format_size

from ._codec import Codec
from ._lease import Lease, LeaseHeld, identity
from ._manifest import Manifest, ManifestError, Params, compression_of, create, load, params_of
from ._store import ObjectStore, PreconditionFailed, Refused, StoreError, Unavailable

__all__ = ["OpenError", "Volume", "open_volume"]

log = logging.getLogger("usbd.objstore")

#: The flag that sets each parameter a volume keeps, for messages.
FLAGS = {
    "size": "store-size",
    "object_size": "objstore-objsize",
    "compression": "objstore-compress",
    "encryption": "objstore-aesmode",
}


#: Seconds the first request may take to find a store that answers.
CHECK_TIMEOUT = 5.0


class OpenError(OSError):
    """The volume cannot be opened as asked; the message says why, in one line."""


@dataclass
class Volume:
    """An open volume: its store, name, codec, committed manifest and this daemon's lease."""

    store: ObjectStore
    name: str
    codec: Codec
    manifest: Manifest
    lease: Lease
    me: dict[str, Any]
    created: bool


def _describe(name: str, value: Any) -> str:
    return format_size(value) if name in ("size", "object_size") else str(value)


def check_params(name: str, found: Params, wanted: Params, given: set[str]) -> Params:
    """The volume's parameters, after checking those the user gave against them."""
    for field in ("size", "object_size", "compression", "encryption"):
        have, want = getattr(found, field), getattr(wanted, field)
        if field in given and have != want:
            flag = FLAGS[field]
            raise OpenError(
                f"volume {name!r} was created with -{flag}={_describe(field, have)}, not "
                f"{_describe(field, want)}: leave -{flag} out to use the volume's"
            )
    return found


def _unreachable(store: ObjectStore, exc: StoreError, hint: str) -> OpenError:
    return OpenError(f"the object store does not answer ({store.where}): {exc}{hint}")


def open_volume(
    store: ObjectStore,
    name: str,
    wanted: Params,
    given: set[str],
    key_for: Callable[[str], bytes | None],
    *,
    takeover: bool,
    timeout: float,
    hint: str = "",
) -> Volume:
    """Open (or create) volume ``name``. ``key_for(encryption)`` gives the AES key the volume's
    encryption needs (None for ``identity``); ``given`` names the parameters the user set,
    which must then match an existing volume's."""
    # Nothing answering at all is most likely no server there: say so soon.
    try:
        store.check(deadline=time.monotonic() + min(timeout, CHECK_TIMEOUT))
    except Unavailable as exc:
        raise _unreachable(store, exc, hint) from None
    except Refused as exc:
        raise _refused(store, exc) from None
    deadline = time.monotonic() + timeout
    me = identity()
    lease = Lease(store, name, me)
    try:
        note = lease.take(takeover=takeover, deadline=deadline)
    except LeaseHeld as exc:
        raise OpenError(str(exc)) from None
    except Unavailable as exc:
        raise _unreachable(store, exc, hint) from None
    except Refused as exc:
        raise _refused(store, exc) from None
    if note:
        log.warning("%s", note)
    try:
        volume = _open_manifest(store, name, wanted, given, key_for, lease, me, deadline)
    except BaseException:
        lease.release()
        raise
    return volume


def _refused(store: ObjectStore, exc: Refused) -> OpenError:
    if exc.reason == "credentials":
        return OpenError(f"the object store refused the credentials ({store.where}): {exc}")
    if exc.reason == "bucket":
        return OpenError(f"{exc} ({store.where}): create it first")
    return OpenError(f"the object store refused access ({store.where}): {exc}")


def _open_manifest(
    store: ObjectStore,
    name: str,
    wanted: Params,
    given: set[str],
    key_for: Callable[[str], bytes | None],
    lease: Lease,
    me: dict[str, Any],
    deadline: float,
) -> Volume:
    chosen: dict[str, Any] = {}

    def codec_for(public: dict[str, Any]) -> Codec:
        params = check_params(name, params_of(public), wanted, given)
        chosen["params"] = params
        return Codec(
            bytes.fromhex(public["volume"]),
            compression_of(params.compression),
            key_for(params.encryption),
        )

    try:
        manifest = load(store, name, codec_for, deadline)
        created = False
        if manifest is None:
            codec = Codec(
                uuid.uuid4().bytes, compression_of(wanted.compression), key_for(wanted.encryption)
            )
            try:
                manifest = create(store, name, codec, wanted, me, deadline)
            except PreconditionFailed:
                raise OpenError(f"volume {name!r} was created by someone else just now") from None
            created = True
            log.info("created volume %r in %s", name, store.where)
        else:
            params = chosen["params"]
            codec = Codec(
                manifest.volume, compression_of(params.compression), key_for(params.encryption)
            )
    except ManifestError as exc:
        if "authenticate" in str(exc):
            raise OpenError(
                f"the AES key (-objstore-aeskey) does not open volume {name!r}: a wrong key, "
                f"or the manifest was altered ({exc})"
            ) from None
        raise OpenError(f"volume {name!r} cannot be read: {exc}") from None
    except Unavailable as exc:
        raise _unreachable(store, exc, "") from None
    except Refused as exc:
        raise _refused(store, exc) from None
    return Volume(store, name, codec, manifest, lease, me, created)
