"""A file-backed device for the kernel tests that need data to outlive the daemon (kill -9
and restart). Run with the venv's python: ``filedev.py --store-size 256MiB PATH [NBD_DEVICE]``.

It is the smallest honest persistent device: pread/pwrite, FLUSH = fdatasync. The real file
driver (usbd-filedisk) will take its place in these tests when it lands.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from usbd.core import Device, DeviceError
from usbd.core.cli import main
from usbd.core.driver import Driver


class FileDevice(Device):
    parallel = True
    multi_conn = True

    def __init__(self, path: str, size: int) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        if os.pwrite(self.fd, data, offset) != len(data):
            raise DeviceError(errno.EIO, "short write")

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", required=True, help="backing file")


driver = Driver(
    name="testfile",
    description="a file-backed device for kernel tests",
    create=lambda args: FileDevice(args.path, args.store_size or (256 << 20)),
    add_arguments=_add,
)

if __name__ == "__main__":
    sys.exit(main(driver, prog="filedev"))
