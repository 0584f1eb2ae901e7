"""A bytearray RAM disk for nbdkit's Python plugin: the Python baseline of the benchmark.

Run as ``nbdkit -f -U SOCK python bench/nbdkit_ramdisk.py size=1G``. It is about as small
as a Python NBD server gets, so it shows what nbdkit's C core does for a Python device.
Copies go through a memoryview so that a read or write costs one copy, not two.
"""

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's python plugin

API_VERSION = 2
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
size = 1 << 30
disk = memoryview(bytearray())


def config(key: str, value: str) -> None:
    """``size=N[KMGT]`` (default 1G)."""
    global size
    if key != "size":
        raise ValueError(f"unknown parameter {key}")
    unit = _UNITS.get(value[-1:].lower(), 1)
    size = int(value.rstrip("kKmMgGtT")) * unit


def config_complete() -> None:
    global disk
    disk = memoryview(bytearray(size))


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_PARALLEL  # type: ignore[no-any-return]


def open(readonly: bool) -> int:  # nbdkit calls the plugin's "open"
    return 1


def get_size(h: int) -> int:
    return size


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    buf[:] = disk[offset : offset + len(buf)]


def pwrite(h: int, buf: bytes, offset: int, flags: int) -> None:
    disk[offset : offset + len(buf)] = buf
