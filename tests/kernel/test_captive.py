"""Captive mode (``--run``) with a kernel device named: the command uses /dev/nbdX, and when it
exits the daemon detaches the device and exits with the command's status. A device the command
left mounted is served until it is unmounted (detaching under a mounted filesystem would fail
its I/O). A second daemon on the same file finds what the first command wrote."""

from __future__ import annotations

from typing import TYPE_CHECKING

from test_attach import run

if TYPE_CHECKING:
    from vm import VM


def test_a_run_command_uses_the_named_device_which_is_detached_when_it_exits(vm: VM) -> None:
    filedisk = '"$USBD_BIN/usbd-filedisk" --store-dir /tmp --store-name vol --store-size 128MiB'
    result = run(
        vm,
        f"""
        mkdir -p /mnt/vol
        status=0
        {filedisk} /dev/nbd0 --run 'mkfs.ext4 -q /dev/nbd0 && mount /dev/nbd0 /mnt/vol &&
            echo captive-data >/mnt/vol/f && umount /mnt/vol && exit 6' || status=$?
        echo "first exit $status, nbd0 size $(cat /sys/block/nbd0/size)"

        {filedisk} /dev/nbd0 --run 'mount /dev/nbd0 /mnt/vol && echo "read $(cat /mnt/vol/f)"' \\
            >/tmp/second.out 2>&1 &
        pid=$!
        for i in $(seq 600); do grep -q "still in use" /tmp/second.out && break; sleep 0.1; done
        sleep 1
        kill -0 $pid && echo "still serving while mounted"
        echo more >>/mnt/vol/f && sync
        umount /mnt/vol
        status=0
        wait $pid || status=$?
        cat /tmp/second.out
        echo "second exit $status, nbd0 size $(cat /sys/block/nbd0/size)"
        """,
    )
    out = result.output
    assert "first exit 6, nbd0 size 0" in out
    assert "read captive-data" in out
    assert "/dev/nbd0 is still in use (mounted or open) after the --run command" in out
    assert "still serving while mounted" in out
    assert "second exit 0, nbd0 size 0" in out
    assert out.count('usbd-filedisk is processing requests for "/dev/nbd0"') == 2
    assert out.count("usbd-filedisk terminated normally.") == 2
    assert "I/O error" not in out
