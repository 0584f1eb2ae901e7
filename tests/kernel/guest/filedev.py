"""A file-backed device for the kernel tests that need data to outlive the daemon (kill -9
and restart). Run with the venv's python:
``filedev.py --store-dir /tmp --store-name disk --store-size 256MiB [NBD_DEVICE]`` serves
``/tmp/disk.img``.

It is the smallest honest persistent device: pread/pwrite, FLUSH = fdatasync. The real file
driver (usbd-filedisk) will take its place in these tests when it lands.
"""

from __future__ import annotations

import errno
import os
import sys

from usbd.core import Device, DeviceError
from usbd.core.cli import main
from usbd.core.driver import Driver, NoOptions
from usbd.core.settings import CommonSettings


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


def _create(settings: CommonSettings, options: NoOptions) -> FileDevice:
    return FileDevice(str(settings.store_dir / f"{settings.store_name}.img"), settings.store_size)


driver = Driver(
    name="testfile",
    description="a file-backed device for kernel tests",
    options=NoOptions,
    create=_create,
    stores_data=True,
)

if __name__ == "__main__":
    sys.exit(main(driver, prog="filedev"))
