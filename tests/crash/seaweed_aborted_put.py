"""Reproduce what the objstore crash loop found in SeaweedFS 4.48 (``weed mini``): a client
killed in the middle of a PutObject can leave the key as an empty object, in place of the
content it had, where S3 keeps the old object (an incomplete PUT changes nothing).

usbd-objstore replaces one object, its head ``<volume>/manifest``, at every commit; after a
kill -9 that came during such a PUT the head was 0 bytes and the next start failed for good
("volume 'vol' cannot be read: vol/manifest is not a usbd-objstore manifest"; about one kill
in 300 in the loops). Here a child process overwrites one small object again and again (with
If-Match, as the driver's commits do, or plainly with ``--plain``) and is SIGKILLed at a
random moment; the object is then read back twice, 3 s apart::

    python tests/crash/seaweed_aborted_put.py [--plain] [ROUNDS]

It prints each round that found the object anything but one whole version (here: 6 rounds
in 150, empty both times; weed's log shows "chunked upload failed: truncated request body:
read chunk at offset 0 (got 0 bytes)" for the aborted PUTs, most of which it handles right).

The same PUTs with a Content-MD5 header, which usbd-objstore now sends for every object it
replaces in place, left nothing damaged in 400 kills (5 in 400 without it, side by side).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from usbd.objstore.testing import SeaweedS3

BUCKET = "aborted-put"
KEY = "k"
VERSION = 13  # bytes per repeat of a version's stamp
SIZE = 100 * VERSION

PUTTER = r"""
import json, sys
import boto3
from botocore.config import Config
cfg, conditional = json.loads(sys.argv[1]), sys.argv[2] == "1"
client = boto3.session.Session(
    aws_access_key_id=cfg["access_key_id"], aws_secret_access_key=cfg["secret_key"],
    region_name=cfg["region"],
).client("s3", endpoint_url=cfg["endpoint"], config=Config(
    s3={"addressing_style": "path"}, proxies={},
    request_checksum_calculation="when_required", response_checksum_validation="when_required",
))
etag = client.head_object(Bucket=cfg["bucket"], Key="k")["ETag"]
print("ready", flush=True)
n = 0
while True:
    n += 1
    body = (b"VERSION%06d" % n) * 100
    extra = {"IfMatch": etag} if conditional else {}
    etag = client.put_object(Bucket=cfg["bucket"], Key="k", Body=body, **extra)["ETag"]
"""


def whole(body: bytes) -> bool:
    return len(body) == SIZE and body.startswith(b"VERSION") and body == body[:VERSION] * 100


def main() -> int:
    args = sys.argv[1:]
    conditional = "--plain" not in args
    rounds = int(next((a for a in args if a.isdigit()), "150"))
    workdir = Path(tempfile.mkdtemp(prefix="usbd-aborted-put-", dir="/tmp"))
    bad = 0
    with SeaweedS3(workdir, bucket=BUCKET) as server:
        client = server.client()
        client.put_object(Bucket=BUCKET, Key=KEY, Body=b"VERSION000000" * 100)
        cfg = json.dumps(server.objstore_cfg())
        for n in range(rounds):
            child = subprocess.Popen(
                [sys.executable, "-c", PUTTER, cfg, "1" if conditional else "0"],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert child.stdout is not None
            child.stdout.readline()
            time.sleep(random.uniform(0.0, 0.3))
            child.kill()
            child.wait()
            for look in range(2):
                body = client.get_object(Bucket=BUCKET, Key=KEY)["Body"].read()
                if whole(body):
                    break
                bad += look == 0
                print(f"round {n}, look {look}: {len(body)} bytes, starts {body[:20]!r}")
                time.sleep(3)
    kind = "conditional" if conditional else "plain"
    print(f"{rounds} {kind} PUTs killed: {bad} left the object damaged; weed's files: {workdir}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
