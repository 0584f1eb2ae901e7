"""usbd-filedisk with a write buffer in the daemon's memory: the crash loops' control.

``python writeback_filedisk.py sound|broken [usbd-filedisk flags]`` runs the real
usbd-filedisk command with its device class replaced (as the drivers' tests patch a module)
by :class:`WriteBackFileDisk`, which keeps written blocks in memory and writes them to the
file on FLUSH (``sound``) or only when it closes (``broken``: FLUSH does nothing, a clean stop
still keeps everything). A plain usbd-filedisk whose FLUSH did nothing would lose nothing to
kill -9 (the page cache survives the process), so a test of the harness needs a driver whose
FLUSH matters to a process crash: the broken variant must fail the loops (lost or older
blocks), the sound one must pass them.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from usbd.core import BytesLike, Device
from usbd.filedisk import FileDisk
from usbd.filedisk import _driver as filedisk_driver

BLOCK = 4096


class WriteBackFileDisk(FileDisk):
    """A FileDisk whose writes wait in memory, per 4 KiB block, until FLUSH (or close)."""

    # The engine's fast path would write to the file behind the buffer's back.
    try_read = Device.try_read
    try_write = Device.try_write
    #: Set by the command line: whether FLUSH writes the buffer out.
    sound = True

    def __init__(self, path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(path, *args, **kwargs)
        self._pending: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def _block(self, block: int) -> bytes:
        return self._pending.get(block) or bytes(FileDisk.read(self, block * BLOCK, BLOCK))

    def read(self, offset: int, length: int) -> BytesLike:
        with self._lock:
            first, last = offset // BLOCK, (offset + length - 1) // BLOCK
            data = b"".join(self._block(b) for b in range(first, last + 1))
        start = offset - first * BLOCK
        return data[start : start + length]

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        with self._lock:
            end = offset + len(data)
            blocks = range(offset // BLOCK, (end - 1) // BLOCK + 1)
            for block in blocks:
                lo, hi = max(offset, block * BLOCK), min(end, (block + 1) * BLOCK)
                old = self._block(block)
                new = old[: lo - block * BLOCK] + data[lo - offset : hi - offset]
                self._pending[block] = bytes(new) + old[hi - block * BLOCK :]
            if fua:  # this write's blocks only, as FUA asks
                self._write_out(blocks)

    def _write_out(self, blocks: Iterable[int] | None = None) -> None:
        for block in sorted(self._pending) if blocks is None else blocks:
            content = self._pending.pop(block)
            FileDisk.write(self, block * BLOCK, memoryview(content), False)
        FileDisk.flush(self)

    def flush(self) -> None:
        if self.sound:
            with self._lock:
                self._write_out()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.write(offset, memoryview(bytes(length)), fua)

    def zero(self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool) -> None:
        self.write(offset, memoryview(bytes(length)), fua)

    def close(self) -> None:
        with self._lock:
            self._write_out()
        super().close()


def main() -> int:
    flush, *rest = sys.argv[1:]
    if flush not in ("sound", "broken"):
        print(f"usage: {Path(__file__).name} sound|broken [usbd-filedisk flags]", file=sys.stderr)
        return 2
    WriteBackFileDisk.sound = flush == "sound"
    filedisk_driver.FileDisk = WriteBackFileDisk  # type: ignore[attr-defined]
    sys.argv[1:] = rest
    return filedisk_driver.main()


if __name__ == "__main__":
    sys.exit(main())
