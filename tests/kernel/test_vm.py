"""The kernel harness itself: a guest's status and output come back, ``nbd.ko`` loads, and
the existing ramdisk daemon serves a filesystem to the real kernel driver via nbd-client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from vm import VM


def test_status_output_env_and_cwd(vm: VM) -> None:
    result = vm.run(
        'uname -r; echo "greeting=$GREETING"; echo "cwd=$PWD"; echo "home=$HOME"; exit 3',
        env={"GREETING": "hello 'quoted' world"},
    )
    assert result.status == 3, result.output
    lines = result.output.splitlines()
    assert vm.kernel.version in lines, result.output
    assert "greeting=hello 'quoted' world" in lines, result.output
    assert f"cwd={vm.cwd}" in lines, result.output
    assert "home=/root" in lines, result.output


def test_timeout_gives_no_status(vm: VM) -> None:
    result = vm.run("sleep 100000", timeout=10)
    assert result.status == -1
    assert "qemu timed out" in result.output


def test_modprobe_nbd_creates_devices(vm: VM) -> None:
    result = vm.run(
        """set -euo pipefail
        if ls /dev/nbd0 2>/dev/null; then echo "nbd0 before modprobe"; exit 1; fi
        modprobe nbd nbds_max=4
        echo /dev/nbd*
        test -d /sys/block/nbd0
        test ! -e /sys/block/nbd0/pid  # not connected
        ls -d /sys/block/nbd* | wc -l
        """
    )
    assert result.status == 0, result.output
    lines = result.output.splitlines()
    assert "/dev/nbd0 /dev/nbd1 /dev/nbd2 /dev/nbd3" in lines, result.output
    assert "4" in lines, result.output


#: Serve a ramdisk with usbd-ramdisk, attach it with nbd-client on a unix socket, make a
#: filesystem, write and verify through a cold cache, then read it back through a second
#: device (which cannot share the first one's page cache: the data must come from the
#: daemon), detach, and require a clean exit on SIGTERM.
FILESYSTEM_ROUND_TRIP = r"""set -euo pipefail
modprobe nbd nbds_max=2
"$RAMDISK" --listen /tmp/r.sock --store-size "$SIZE" >/tmp/usbd.out 2>/tmp/usbd.err &
daemon=$!
for _ in $(seq 600); do
    grep -q ' is serving ' /tmp/usbd.out && break
    kill -0 "$daemon"
    sleep 0.1
done
grep ' is serving ' /tmp/usbd.out
nbd-client -N '' -unix /tmp/r.sock /dev/nbd0
echo "size=$(blockdev --getsize64 /dev/nbd0)"
"mkfs.$FS" -q "$FORCE" /dev/nbd0
mkdir -p /tmp/mnt
mount /dev/nbd0 /tmp/mnt
head -c 24M /dev/urandom >/tmp/mnt/data
mkdir /tmp/mnt/tree
for i in $(seq 50); do head -c $((i * 1000)) /dev/urandom >"/tmp/mnt/tree/$i"; done
(cd /tmp/mnt && find . -type f | sort | xargs sha256sum) >/tmp/sums
sync
umount /tmp/mnt
blockdev --flushbufs /dev/nbd0
echo 3 >/proc/sys/vm/drop_caches
mount /dev/nbd0 /tmp/mnt
(cd /tmp/mnt && sha256sum --quiet -c /tmp/sums)
umount /tmp/mnt
nbd-client -d /dev/nbd0
nbd-client -N '' -unix /tmp/r.sock /dev/nbd1
mount -o ro /dev/nbd1 /tmp/mnt
(cd /tmp/mnt && sha256sum --quiet -c /tmp/sums)
echo "verified $(wc -l </tmp/sums) files"
umount /tmp/mnt
nbd-client -d /dev/nbd1
kill -TERM "$daemon"
status=0
wait "$daemon" || status=$?
cat /tmp/usbd.out /tmp/usbd.err
echo "daemon exit=$status"
"""


@pytest.mark.parametrize(
    ("fs", "force", "size"),
    [
        ("ext4", "-F", "256MiB"),
        ("xfs", "-f", "512MiB"),  # mkfs.xfs refuses filesystems under 300 MB
    ],
)
def test_filesystem_round_trip_through_nbd_client(vm: VM, fs: str, force: str, size: str) -> None:
    result = vm.run(
        FILESYSTEM_ROUND_TRIP,
        env={"RAMDISK": vm.bin("usbd-ramdisk"), "FS": fs, "FORCE": force, "SIZE": size},
    )
    assert result.status == 0, result.output
    lines = result.output.splitlines()
    expected = int(size.removesuffix("MiB")) * 1024 * 1024
    assert f"size={expected}" in lines, result.output
    assert "verified 51 files" in lines, result.output
    assert "daemon exit=0" in lines, result.output
    assert "usbd-ramdisk terminated normally." in lines, result.output
    assert "Traceback" not in result.output
