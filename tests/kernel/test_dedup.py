"""usbd-dedup under a real kernel: ext4 on /dev/nbd0. A directory tree of varied random files
(about 32 MiB) is copied into the filesystem twice: the data files ``blocks.*`` grow by about
the tree once, not twice. Deleting one copy and trimming frees nothing the other copy still
uses; deleting a file of unique data and trimming makes them shrink by about its size. The
daemon is stopped, ``usbd-dedup --check`` finds the volume consistent, ``--stats`` agrees with
what the files hold, and a new daemon serves the remaining copy: every file verifies."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from test_attach import run, served

if TYPE_CHECKING:
    from vm import VM

KiB = 1024
MiB = 1024 * KiB

STORAGE = "--store-dir /tmp/dd --store-name vol --store-size 256MiB"
DEDUP = f'"$USBD_BIN/usbd-dedup" {STORAGE}'

#: Writes /tmp/tree: files of random data (nothing in them repeats or compresses), from empty
#: to 4 MiB, in nested directories; prints the count, the bytes and the 4 KiB blocks they fill.
TREE = r"""
import os, random
rng = random.Random(13)
sizes = [0, 1, 59, 4095, 4096, 4097, 8191]
sizes += [rng.randrange(1, 8 * 1024) for _ in range(40)]
sizes += [rng.randrange(8 * 1024, 512 * 1024) for _ in range(40)]
sizes += [rng.randrange(1 << 20, 4 << 20) for _ in range(8)]
count = size_sum = block_sum = 0
for i, size in enumerate(sizes):
    folder = f"/tmp/tree/d{i % 5}/e{i % 3}" if i % 4 else "/tmp/tree"
    os.makedirs(folder, exist_ok=True)
    with open(f"{folder}/f{i:03d}.bin", "wb") as f:  # a first byte that is never zero
        f.write(bytes([1 + i % 255]) + os.urandom(size - 1) if size else b"")
    count, size_sum, block_sum = count + 1, size_sum + size, block_sum + -(-size // 4096) * 4096
os.makedirs("/tmp/tree/empty/dir")
print(f"tree: {count} files, {size_sum} bytes, {block_sum} bytes in 4 KiB blocks")
"""


def number(pattern: str, out: str) -> int:
    match = re.search(pattern, out, re.MULTILINE)
    assert match is not None, (pattern, out)
    return int(match.group(1))


def test_ext4_copies_share_blocks_trim_frees_and_the_files_verify_after_a_restart(
    vm: VM,
) -> None:
    result = run(
        vm,
        f"""
        "$USBD_PY" -c 'import plyvel, zstandard, blake3; print("imports ok", plyvel.__version__)'
        # Bytes allocated to the data files (what du shows).
        stored() {{
            stat -c '%b %B' /tmp/dd/vol.dedup/blocks.* | awk '{{s += $1 * $2}} END {{print s}}'
        }}
        # wait_below LIMIT: until freed slots are punched (the contract: after the FLUSH
        # that made them durable, or a few seconds later); a ceiling, not an expectation.
        wait_below() {{
            local i
            for i in $(seq 120); do [ "$(stored)" -lt "$1" ] && break; sleep 0.5; done
        }}
        "$USBD_PY" - <<'EOF'
{TREE}
EOF
        (cd /tmp/tree && find . -type f -print0 | sort -z | xargs -0 sha256sum) >/tmp/tree.sums
        mkdir -p /tmp/dd /mnt/vol
        start dd {DEDUP} /dev/nbd0
        # 4 KiB blocks, as the dedup's: below 512 MiB mke2fs would make them 1 KiB, and a
        # file's data would start anywhere in a 4 KiB block, differently in each copy.
        mkfs.ext4 -q -b 4096 /dev/nbd0 && mount /dev/nbd0 /mnt/vol
        sync
        echo "stored after mkfs $(stored)"
        cp -a /tmp/tree /mnt/vol/one && sync
        echo "stored after one copy $(stored)"
        cp -a /tmp/tree /mnt/vol/two && sync
        echo "stored after two copies $(stored)"
        head -c 16M /dev/urandom >/mnt/vol/unique.bin && sync
        echo "stored after unique $(stored)"
        rm -r /mnt/vol/one && sync && fstrim -v /mnt/vol && sync
        echo "stored after one copy deleted $(stored)"
        limit=$(( $(stored) - 12 * 1024 * 1024 ))
        rm /mnt/vol/unique.bin && sync && fstrim -v /mnt/vol && sync
        wait_below $limit
        echo "stored after unique deleted $(stored)"
        umount /mnt/vol
        stop dd
        echo "stored after stop $(stored)"
        "$USBD_BIN/usbd-dedup" --check {STORAGE} | sed 's/^/[check] /'
        "$USBD_BIN/usbd-dedup" --stats {STORAGE} | sed 's/^/[stats] /'

        start dd {DEDUP} /dev/nbd0
        drop_caches /dev/nbd0
        mount /dev/nbd0 /mnt/vol
        (cd /mnt/vol/two && sha256sum -c --quiet /tmp/tree.sums)
        echo "verified $(wc -l </tmp/tree.sums) files in /mnt/vol/two"
        test ! -e /mnt/vol/one && test ! -e /mnt/vol/unique.bin && test -d /mnt/vol/two/empty/dir
        umount /mnt/vol
        fsck.ext4 -n -f /dev/nbd0 && echo "fsck clean"
        stop dd
        echo "stored at the end $(stored)"
        dmesg | grep -iE 'I/O error|EXT4-fs (error|warning)' || echo "no I/O errors"
        """,
    )
    out = result.output
    assert "imports ok" in out
    files = number(r"^tree: (\d+) files", out)
    # The files' bytes, and the 4 KiB blocks they fill (the last one of each is padded with
    # zeros, which compress: the data files hold at least the bytes, at most the blocks).
    tree = number(r"^tree: \d+ files, (\d+) bytes", out)
    tree_blocks = number(r"^tree: \d+ files, \d+ bytes, (\d+) bytes in 4 KiB blocks", out)
    assert files == 95 and 36 * MiB <= tree <= tree_blocks <= 38 * MiB, out
    assert out.count('[dd] usbd-dedup is processing requests for "/dev/nbd0"') == 2, out

    stored = {
        when: number(rf"^stored {when} (\d+)$", out)
        for when in (
            "after mkfs",
            "after one copy",
            "after two copies",
            "after unique",
            "after one copy deleted",
            "after unique deleted",
            "after stop",
            "at the end",
        )
    }
    shown = ", ".join(f"{when} {value / MiB:.2f}" for when, value in stored.items())
    shown = f"MiB stored: {shown}; tree {tree / MiB:.2f} MiB"
    first = stored["after one copy"] - stored["after mkfs"]
    second = stored["after two copies"] - stored["after one copy"]
    # The first copy is stored (its files' data, and some metadata); the second, whose data
    # blocks are the same, adds about its directories, inodes and journal blocks.
    assert tree <= first <= tree_blocks * 1.1 + 2 * MiB, shown
    assert second <= tree * 0.1, shown
    assert 16 * MiB <= stored["after unique"] - stored["after two copies"] <= 18 * MiB, shown
    # The second copy still uses every data block of the first: deleting it frees no more
    # than metadata...
    assert stored["after unique"] - stored["after one copy deleted"] <= 2 * MiB, shown
    # ... while unique data, once deleted and trimmed, is punched out of the data files.
    assert stored["after one copy deleted"] - stored["after unique deleted"] >= 15 * MiB, shown
    assert stored["after unique deleted"] >= stored["after mkfs"] + tree, shown
    assert abs(stored["after stop"] - stored["after unique deleted"]) <= 1 * MiB, shown
    # Mounting, fsck and unmounting write a superblock and journal blocks, no file data.
    assert stored["after stop"] <= stored["at the end"] <= stored["after stop"] + 2 * MiB, shown

    assert "[check] check: consistent" in out, out
    stats = {
        key: float(value)
        for key, value in re.findall(r"^\[stats\] ([a-z ]+): ([0-9]+(?:\.[0-9]+)?)", out, re.M)
    }
    assert stats["block size"] == 4096, stats
    # What the statistics count is what the data files hold: the one copy left and metadata.
    assert tree <= stats["stored bytes"] <= stored["after stop"], (stats, stored)
    # Every block of the copy left is distinct; the metadata adds a few hundred at most.
    assert tree_blocks <= stats["unique blocks"] * 4096 <= tree_blocks + 2 * MiB, stats
    assert stats["mapped blocks"] >= stats["unique blocks"], stats

    assert f"verified {files} files in /mnt/vol/two" in out
    assert "fsck clean" in out
    assert "no I/O errors" in out
    assert out.count("daemon dd exit 0") == 2, out
    assert out.count("[dd] usbd-dedup terminated normally.") == 2, out
    assert "[dd stderr]" not in out  # no WARNING, ERROR or traceback from either daemon
    first_run = out.split("stored after stop")[0]
    counts = served(first_run, "dd")
    assert counts["flush"] > 0 and counts["trim"] > 0, counts
