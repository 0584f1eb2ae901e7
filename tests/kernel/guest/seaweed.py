"""Looks at a SeaweedFS server from inside the test VM, with the standard library only: under
emulation a python that imports boto3 takes 7-14 s to start, a bare one 1.5 s.

The S3 gateway needs signed requests, but SeaweedFS's filer (``$FILER``, e.g.
http://127.0.0.1:40888) serves the same objects unsigned: bucket ``B``'s key ``K`` is the file
``/buckets/B/K``.

``seaweed.py wait BUCKET``: wait until the filer holds the bucket (``weed mini -bucket=`` creates
it a moment after the servers start) and the S3 port (``$S3``) answers.

``seaweed.py show BUCKET VOLUME``: one line on what an objstore volume has in the bucket: its
data objects, whether its lease is there, and the manifest head's public part (commit number,
epoch, writer), read as ``_manifest.read_public`` does: ``USBDMAN1``, a 4-byte length, that
much JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import time
import urllib.error
import urllib.request

WAIT = 120.0


def get(url: str) -> bytes | None:
    """The body at ``url``, or None for a 404."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            body: bytes = answer.read()
            return body
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def wait(bucket: str) -> None:
    started = time.monotonic()
    while True:
        try:
            listing = get(f"{os.environ['FILER']}/buckets/")
            names = [e["FullPath"] for e in json.loads(listing or b"{}").get("Entries") or []]
            if f"/buckets/{bucket}" in names:
                # 403 to an unsigned request: the gateway is up.
                with contextlib.suppress(urllib.error.HTTPError):
                    urllib.request.urlopen(f"{os.environ['S3']}/{bucket}", timeout=10).close()
                break
        except OSError:
            pass  # not listening yet
        if time.monotonic() - started > WAIT:
            raise SystemExit(f"seaweed.py: no bucket {bucket} after {WAIT:.0f} s")
        time.sleep(0.25)
    print(f"bucket {bucket} ready after {time.monotonic() - started:.1f} s")


def show(bucket: str, volume: str) -> None:
    root = f"{os.environ['FILER']}/buckets/{bucket}/{volume}"
    listing = get(f"{root}/data/?limit=100000")
    data = len(json.loads(listing).get("Entries") or []) if listing else 0
    lease = "absent" if get(f"{root}/lease") is None else "present"
    line = f"bucket {bucket}: {data} data objects, lease {lease}"
    head = get(f"{root}/manifest")
    if head is not None:
        assert head[:8] == b"USBDMAN1", head[:8]
        (length,) = struct.unpack_from(">I", head, 8)
        public = json.loads(head[12 : 12 + length])
        writer = public["writer"]
        line += (
            f", manifest seq {public['seq']} epoch {public['epoch']} "
            f"writer {writer['host']} pid {writer['pid']}"
        )
    print(line)


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "wait":
        wait(*args)
    else:
        show(*args)


if __name__ == "__main__":
    main()
