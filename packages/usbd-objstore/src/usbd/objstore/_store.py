"""The object stores a volume can live in: S3 (and compatibles) through boto3, or a local directory.

The device needs very little of a store: whole-object GET and PUT, DELETE, a paginated LIST,
and two conditional PUTs, ``If-None-Match: *`` (create only if absent: the lease, a new volume's
manifest) and ``If-Match: <etag>`` (replace only what we last saw: lease renewal and every
manifest commit, which is what fences a writer that lost its lease). Data objects are never
overwritten, so nothing else needs conditions.

Errors are translated here, at the edge, into four kinds the device can act on:

* :class:`NotFound` -- the key (or, for :class:`Refused`, the bucket) is not there;
* :class:`PreconditionFailed` -- a conditional PUT lost (someone else wrote the key);
* :class:`Unavailable` -- worth retrying: refused or reset connections, timeouts, 5xx, throttling;
* :class:`Refused` -- not worth retrying: wrong credentials, no such bucket, access denied.

Retries are ours, not botocore's (which is set to one attempt): every call takes a deadline,
and transient failures are retried with capped exponential backoff until it passes, so that a
read of an uncached object during an outage fails with EIO after a bounded time instead of
hanging the kernel, while the uploader, which passes no deadline, retries until the store is
back.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import io
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)

__all__ = [
    "Deadline",
    "LocalStore",
    "NotFound",
    "ObjectStore",
    "PreconditionFailed",
    "Refused",
    "S3Store",
    "StoreError",
    "Unavailable",
    "fsync_dir",
]

log = logging.getLogger("usbd.objstore")

T = TypeVar("T")

#: When to stop retrying: ``time.monotonic()`` seconds, None for never, or a function giving
#: either, asked before each retry (so that a caller can shorten the wait of a call under way,
#: as close does for the uploader's).
Deadline = float | Callable[[], float | None] | None

#: Objects at least this large go up as multipart uploads, in parts of this size.
MULTIPART_THRESHOLD = 16 << 20
#: Backoff between retries: from 0.1 s, doubling, at most 5 s, with jitter.
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0


class StoreError(Exception):
    """A store operation failed; ``key`` names the object (or the bucket)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class NotFound(StoreError):
    """No such object."""


class PreconditionFailed(StoreError):
    """A conditional PUT found the key in another state than the condition named."""


class Unavailable(StoreError):
    """The store did not answer, or answered that it cannot now: retrying may work."""


class Refused(StoreError):
    """The store answered, and retrying will not help. ``reason`` is ``credentials``,
    ``bucket`` (no such bucket) or ``denied``."""

    def __init__(self, message: str, key: str = "", reason: str = "denied") -> None:
        super().__init__(message, key)
        self.reason = reason


class ObjectStore:
    """What the device uses of a store; each method may raise any :class:`StoreError`.

    ``retried`` and ``gave_up`` are figures for the metrics, kept by the stores that retry
    (:func:`retrying`): attempts that failed transiently and were tried again, and calls that
    failed for good (their deadline passed, or the store refused). Plain ints, bumped on the
    error paths only.
    """

    #: For log lines and messages: where the objects are (never a secret).
    where: str = ""
    retried: int = 0
    gave_up: int = 0

    def get(self, key: str, deadline: Deadline = None) -> bytes:
        """The whole object."""
        raise NotImplementedError

    def get_tagged(self, key: str, deadline: Deadline = None) -> tuple[bytes, str]:
        """The whole object and its ETag (the value a later ``if_match`` names)."""
        raise NotImplementedError

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        deadline: Deadline = None,
    ) -> str:
        """Store ``data`` under ``key`` (only if the key is absent, or only if its ETag is
        ``if_match``) and return the new ETag."""
        raise NotImplementedError

    def delete(self, keys: Sequence[str], deadline: Deadline = None) -> None:
        """Remove ``keys``; absent ones are not an error."""
        raise NotImplementedError

    def list(self, prefix: str, deadline: Deadline = None) -> Iterator[str]:
        """Every key that starts with ``prefix``, however many pages that takes."""
        raise NotImplementedError

    def check(self, deadline: Deadline = None) -> None:
        """Raise :class:`Refused` or :class:`Unavailable` if the bucket cannot be used."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections."""


def retrying(call: Callable[[], T], deadline: Deadline, counts: ObjectStore | None = None) -> T:
    """``call()``, retried on :class:`Unavailable` with backoff until ``deadline``. The last
    failure is raised. ``counts`` is the store whose ``retried`` and ``gave_up`` count it."""
    delay = _BACKOFF_FIRST
    attempts = 0
    while True:
        try:
            return call()
        except Refused:
            if counts is not None:
                counts.gave_up += 1
            raise
        except Unavailable as exc:
            attempts += 1
            now = time.monotonic()
            limit = deadline() if callable(deadline) else deadline
            if limit is not None and now + delay > limit:
                if counts is not None:
                    counts.gave_up += 1
                raise
            if counts is not None:
                counts.retried += 1
            if attempts in (1, 10) or attempts % 100 == 0:
                log.warning("%s; retrying (attempt %d)", exc, attempts)
            time.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, _BACKOFF_MAX)


# -- S3 -------------------------------------------------------------------------------------

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412"}
_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
}
_TRANSIENT = {
    # 409 on a conditional write: another write to the key was under way; S3 says retry.
    "ConditionalRequestConflict",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "BadDigest",
    "XAmzContentSHA256Mismatch",
}


_SESSION: Any = None
_SESSION_LOCK = threading.Lock()


def _s3_client(**options: Any) -> Any:
    """An S3 client from the process's one boto3 session: each session loads the service
    models anew (about 12 MiB and a tenth of a second), and clients made from one share them.
    Credentials are given to each client, so stores with different keys do not mix. Sessions
    are not thread-safe, hence the lock; the clients are."""
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            _SESSION = boto3.session.Session()
        return _SESSION.client("s3", **options)


class S3Store(ObjectStore):
    """A bucket of an S3-compatible service, through one thread-safe boto3 client.

    ``config`` is the driver's ``-objstore-cfg``: ``endpoint``, ``bucket``, ``region``,
    ``access_key_id``, ``secret_key`` and ``path_style`` (default true with an endpoint:
    self-hosted servers rarely have wildcard DNS for virtual-host addressing). Without keys
    boto3's own credential chain is used (environment, ~/.aws, instance roles).
    """

    def __init__(self, config: dict[str, Any], *, timeout: float = 10.0, pool: int = 32) -> None:
        self.bucket: str = config["bucket"]
        endpoint = config.get("endpoint") or None
        self.where = f"s3://{self.bucket} at {endpoint or 'AWS'}"
        path_style = config.get("path_style", endpoint is not None)
        botocore_config = Config(
            region_name=config.get("region") or "us-east-1",
            connect_timeout=min(timeout, 5.0),
            read_timeout=timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=pool,
            s3={"addressing_style": "path" if path_style else "auto"},
            # Only when the operation requires it: self-hosted servers vary in which of the
            # newer checksum headers they accept, and every object carries its own MAC.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = _s3_client(
            endpoint_url=endpoint,
            config=botocore_config,
            aws_access_key_id=config.get("access_key_id") or None,
            aws_secret_access_key=config.get("secret_key") or None,
        )
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_THRESHOLD,
            max_concurrency=4,
            use_threads=True,
        )

    def _call(self, what: str, key: str, call: Callable[[], T], deadline: Deadline) -> T:
        return retrying(lambda: self._translate(what, key, call), deadline, self)

    def _translate(self, what: str, key: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = f"{what} {key}: {code or status} {error.get('Message', '')}".rstrip()
            if code == "NoSuchBucket":
                raise Refused(f"bucket {self.bucket!r} does not exist", key, "bucket") from None
            if code in _NOT_FOUND or (status == 404 and not code):
                raise NotFound(message, key) from None
            if code in _TRANSIENT or status >= 500 or status in (408, 409, 429):
                raise Unavailable(message, key) from None
            if code in _PRECONDITION or status == 412:
                raise PreconditionFailed(message, key) from None
            if code in _CREDENTIALS:
                raise Refused(message, key, "credentials") from None
            raise Refused(message, key, "denied") from None
        except NoCredentialsError:
            raise Refused(
                "no credentials: give access_key_id and secret_key in -objstore-cfg, or set "
                "up boto3's credential chain",
                key,
                "credentials",
            ) from None
        except (ConnectionError, HTTPClientError, IncompleteReadError, S3UploadFailedError) as exc:
            # A connection refused, reset or cut short, a timeout, a multipart upload that
            # failed part-way: all worth another try.
            raise Unavailable(f"{what} {key}: {exc}", key) from None
        except BotoCoreError as exc:
            raise Refused(f"{what} {key}: {exc}", key, "denied") from None

    def get(self, key: str, deadline: Deadline = None) -> bytes:
        return self.get_tagged(key, deadline)[0]

    def get_tagged(self, key: str, deadline: Deadline = None) -> tuple[bytes, str]:
        def call() -> tuple[bytes, str]:
            answer = self._client.get_object(Bucket=self.bucket, Key=key)
            body = answer["Body"]
            try:
                data = body.read()
            finally:
                body.close()
            return data, str(answer.get("ETag", ""))

        return self._call("GET", key, call, deadline)

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        deadline: Deadline = None,
    ) -> str:
        conditions: dict[str, str] = {}
        if if_match is not None:
            conditions["IfMatch"] = if_match
        if if_none_match:
            conditions["IfNoneMatch"] = "*"
        if conditions:
            # The objects replaced in place (the manifest, the lease) carry their MD5, so a
            # server refuses a body cut short rather than storing it: SeaweedFS kept the head
            # as an empty object after about one kill -9 in 80 during its PUT without it
            # (none in 400 with it; tests/crash/seaweed_aborted_put.py), and the volume no
            # longer opened. Immutable objects need not: one cut short is never committed.
            digest = hashlib.md5(data, usedforsecurity=False).digest()
            conditions["ContentMD5"] = base64.b64encode(digest).decode("ascii")

        def call() -> str:
            if len(data) >= MULTIPART_THRESHOLD and not conditions:
                self._client.upload_fileobj(
                    io.BytesIO(data), self.bucket, key, Config=self._transfer
                )
                return ""
            answer = self._client.put_object(Bucket=self.bucket, Key=key, Body=data, **conditions)
            return str(answer.get("ETag", ""))

        # A conditional PUT whose answer was lost fails its own condition when retried; the
        # caller tells that apart by reading the key back (see _manifest.commit).
        return self._call("PUT", key, call, deadline)

    def delete(self, keys: Sequence[str], deadline: Deadline = None) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000
            batch = [{"Key": key} for key in keys[start : start + 1000]]

            def call(batch: list[dict[str, str]] = batch) -> None:
                answer = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                errors = [e for e in answer.get("Errors", []) if e.get("Code") != "NoSuchKey"]
                if errors:
                    first = errors[0]
                    raise Unavailable(
                        f"DELETE {first.get('Key')}: {first.get('Code')} {first.get('Message')}",
                        str(first.get("Key", "")),
                    )

            self._call("DELETE", batch[0]["Key"], call, deadline)

    def list(self, prefix: str, deadline: Deadline = None) -> Iterator[str]:
        token: str | None = None
        while True:

            def call(token: str | None = token) -> dict[str, Any]:
                extra = {"ContinuationToken": token} if token else {}
                answer: dict[str, Any] = self._client.list_objects_v2(
                    Bucket=self.bucket, Prefix=prefix, **extra
                )
                return answer

            page = self._call("LIST", prefix, call, deadline)
            for item in page.get("Contents", []):
                yield str(item["Key"])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def check(self, deadline: Deadline = None) -> None:
        # A LIST rather than HEAD: HEAD answers have no body, so a refusal comes as a bare
        # 403 or 404 without the code that says which (wrong secret, no such bucket).
        self._call(
            "LIST",
            self.bucket,
            lambda: self._client.list_objects_v2(Bucket=self.bucket, MaxKeys=1),
            deadline,
        )

    def close(self) -> None:
        self._client.close()


# -- a local directory ------------------------------------------------------------------------


def _etag(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (a new or renamed file's name)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(ObjectStore):
    """Objects as files under a directory, each key a relative path.

    A PUT writes a private temporary file, fsyncs it, then publishes it by rename (or, for
    ``If-None-Match``, by ``link``, which fails if the name exists) and fsyncs the directory,
    so an object is either wholly there or not at all, as in S3. Conditional PUTs compare
    ETags (a hash of the content) under an exclusive lock on the directory, so they are
    atomic between processes on this host, which is what the lease needs here.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.where = f"directory {self.root}"
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise Refused(f"bad key {key!r}", key)
        return self.root / key

    def _translate(self, what: str, key: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except FileNotFoundError:
            raise NotFound(f"{what} {key}: no such object", key) from None
        except FileExistsError:
            raise PreconditionFailed(f"{what} {key}: the object exists", key) from None
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise Refused(f"{what} {key}: {exc.strerror}", key) from None
            raise Unavailable(f"{what} {key}: {exc.strerror}", key) from None

    def get(self, key: str, deadline: Deadline = None) -> bytes:
        return self._translate("GET", key, self._path(key).read_bytes)

    def get_tagged(self, key: str, deadline: Deadline = None) -> tuple[bytes, str]:
        data = self.get(key)
        return data, _etag(data)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        deadline: Deadline = None,
    ) -> str:
        path = self._path(key)

        def call() -> str:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                if if_none_match:
                    with self._exclusive():
                        os.link(temporary, path)
                elif if_match is not None:
                    with self._exclusive():
                        try:
                            current = _etag(path.read_bytes())
                        except FileNotFoundError:
                            current = ""
                        if current != if_match:
                            raise PreconditionFailed(f"PUT {key}: the object changed", key)
                        os.replace(temporary, path)
                else:
                    os.replace(temporary, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
            fsync_dir(path.parent)
            return _etag(data)

        return self._translate("PUT", key, call)

    def delete(self, keys: Sequence[str], deadline: Deadline = None) -> None:
        parents = set()
        for key in keys:
            path = self._path(key)
            with contextlib.suppress(FileNotFoundError):
                self._translate("DELETE", key, path.unlink)
            parents.add(path.parent)
        for parent in parents:
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(parent)

    def list(self, prefix: str, deadline: Deadline = None) -> Iterator[str]:
        found = []
        for directory, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith("."):
                    continue  # a PUT under way
                key = os.path.relpath(os.path.join(directory, name), self.root)
                if key.startswith(prefix):
                    found.append(key)
        yield from sorted(found)

    def check(self, deadline: Deadline = None) -> None:
        if not self.root.is_dir():
            raise Refused(f"{self.root} is not a directory", str(self.root), "bucket")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise Refused(f"{self.root} is not writable", str(self.root), "denied")
        self._sweep()

    def _sweep(self) -> None:
        """Remove the temporary files of PUTs whose process died mid-way (kill -9): nothing
        else ever would, since listing skips them. A live process's are left alone."""
        for directory, _dirs, files in os.walk(self.root):
            for name in files:
                parts = name.rsplit(".", 2)
                if not name.startswith(".") or len(parts) != 3 or not parts[1].isdigit():
                    continue
                try:
                    os.kill(int(parts[1]), 0)
                except ProcessLookupError:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, name))
                except PermissionError:
                    pass  # someone else's, and running
