"""What a running file disk reports to ``--metrics``, ``usbdsrvd status`` and SIGUSR1.

The figures come from one ``fstat`` of the open backing file per look (a scrape, the status
file's refresh every few seconds). That is a system call, not I/O: the kernel answers from
the inode the open file holds in memory, without reading the disk and without the inode lock
that writes, punches and zeroing take (ext4 and btrfs add their delayed allocations under a
spin lock, nothing more), so it neither waits for the I/O path nor slows it. Keeping the
figure as the device works would cost the I/O path instead: only the file system knows what
a write allocated (a hole filled or not), so every write and trim would need an ``fstat`` of
its own. On a network or FUSE file system the ``fstat`` may ask the server, and a look waits
for its answer.
"""

from __future__ import annotations

from usbd.core.metrics import Metric, gauge

__all__ = ["METRICS"]

METRICS: tuple[Metric, ...] = (
    gauge(
        "allocated_bytes",
        "Bytes the backing file takes on disk (st_blocks x 512, what du shows): grows with "
        "writes into holes, falls with TRIM and zeroing that punch holes.",
        headline=True,
    ),
    gauge(
        "size_bytes",
        "The backing file's size (st_size): the device's size, unless the file was "
        "truncated behind the daemon.",
    ),
    gauge(
        "punch_holes",
        "1 while the file system punches holes (TRIM gives space back), 0 once it refused: "
        "TRIM is then ignored and the allocated bytes never fall.",
    ),
)
