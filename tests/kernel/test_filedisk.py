"""usbd-filedisk under a real kernel: ext4 on /dev/nbdX, the daemon stopped and started again
on the same file, the files verify; TRIM from the filesystem punches holes in the file."""

from __future__ import annotations

from typing import TYPE_CHECKING

from test_attach import run, served

if TYPE_CHECKING:
    from vm import VM


def test_ext4_survives_a_stop_and_start_of_the_daemon(vm: VM) -> None:
    filedisk = '"$USBD_BIN/usbd-filedisk" --store-dir /tmp --store-name vol --store-size 256MiB'
    result = run(
        vm,
        f"""
        start disk {filedisk} /dev/nbd0
        mkfs.ext4 -q /dev/nbd0 && mkdir -p /mnt/vol && mount /dev/nbd0 /mnt/vol
        write_files /mnt/vol
        head -c 32M /dev/urandom >/mnt/vol/big.bin && sync
        echo "allocated before trim $(du -k /tmp/vol.bin | cut -f1)"
        rm /mnt/vol/big.bin && sync && fstrim /mnt/vol
        echo "allocated after trim $(du -k /tmp/vol.bin | cut -f1)"
        umount /mnt/vol
        stop disk
        stat -c "file mode %a size %s" /tmp/vol.bin
        start disk {filedisk} /dev/nbd0
        drop_caches /dev/nbd0
        mount /dev/nbd0 /mnt/vol
        verify_files /mnt/vol
        umount /mnt/vol
        fsck.ext4 -n -f /dev/nbd0 && echo "fsck clean"
        stop disk
        """,
    )
    out = result.output
    assert out.count('[disk] usbd-filedisk is processing requests for "/dev/nbd0"') == 2
    assert "verified 4 files in /mnt/vol" in out
    assert "fsck clean" in out
    assert "file mode 600 size 268435456" in out
    before = int(out.split("allocated before trim ")[1].split()[0])
    after = int(out.split("allocated after trim ")[1].split()[0])
    assert before - after >= 30 * 1024, (before, after)  # KiB: the 32 MiB file's blocks
    assert out.count("daemon disk exit 0") == 2
    assert served(out, "disk")["flush"] > 0
