"""qemu-img and qemu-io (qemu-utils) against usbd-ramdisk.

qemu's NBD client negotiates structured replies and base:allocation and uses them to skip
holes, so these tests also cover block status as a second, independent client sees it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import ServerFactory, UsbdServer

KiB = 1024
MiB = 1024 * KiB
SIZE = 16 * MiB

Run = Callable[..., Any]


def _image(path: Path) -> bytes:
    """A raw image: random data, a zero run in the middle, an odd-sized tail of data."""
    data = os.urandom(4 * MiB) + bytes(8 * MiB) + os.urandom(4 * MiB - 1000) + b"\x7f" * 1000
    assert len(data) == SIZE
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_convert_and_compare_both_ways(
    transport: str, start_server: ServerFactory, tools: Run, tmp_path: Path
) -> None:
    server = start_server(transport, size=SIZE)
    source = tmp_path / "src.img"
    data = _image(source)

    info = json.loads(tools("qemu-img", "info", "--output=json", server.uri).stdout)
    assert info["virtual-size"] == SIZE

    # file -> NBD, then qemu-img compares the two byte for byte.
    tools("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), server.uri)
    proc = tools("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), server.uri)
    assert "Images are identical" in proc.stdout

    # NBD -> file: a fresh image with the same bytes.
    back = tmp_path / "back.img"
    tools("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(back))
    assert back.read_bytes() == data
    proc = tools("qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri, str(back))
    assert "Images are identical" in proc.stdout

    # A one-byte change on the server is found, at the right offset.
    offset = 13_000_001
    tools("qemu-io", "-f", "raw", "-c", f"write -P {data[offset] ^ 0xFF} {offset} 1", server.uri)
    proc = tools(
        "qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), server.uri, check=False
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # qemu-img compares 512-byte sectors and names the first sector that differs.
    assert f"Content mismatch at offset {offset // 512 * 512}!" in proc.stdout


def test_map_sees_data_and_zeros(start_server: ServerFactory, tools: Run, tmp_path: Path) -> None:
    server = start_server("unix", size=SIZE)
    source = tmp_path / "src.img"
    _image(source)
    tools("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), server.uri)
    extents = json.loads(tools("qemu-img", "map", "--output=json", "-f", "raw", server.uri).stdout)
    assert sum(e["length"] for e in extents) == SIZE
    # Every byte of random data is reported as data; the middle of the zero run is zero.
    for start, end, want_data in (
        (0, 4 * MiB, True),
        (12 * MiB, SIZE, True),
        (5 * MiB, 11 * MiB, False),
    ):
        for e in extents:
            if e["start"] < end and start < e["start"] + e["length"]:
                assert e["data"] is want_data, (start, end, e)
                assert e["zero"] is not want_data, (start, end, e)


def _qemu_io(tools: Run, uri: str, *commands: str, check: bool = True) -> Any:
    args = ["-f", "raw"]
    for command in commands:
        args += ["-c", command]
    return tools("qemu-io", *args, uri, check=check)


def test_qemu_io_patterns(server: UsbdServer, tools: Run) -> None:
    uri = server.uri
    _qemu_io(
        tools,
        uri,
        "write -P 0xab 0 64k",
        "write -P 0xcd 1000 4000",  # unaligned, inside the first write
        "write -f -P 0xef 1M 128k",  # FUA
        "aio_write -P 0x11 2M 64k",
        "aio_write -P 0x22 3M 64k 64k",
        "aio_flush",
        "flush",
    )
    proc = _qemu_io(
        tools,
        uri,
        "read -P 0xab 0 1000",
        "read -P 0xcd 1000 4000",
        "read -P 0xab 5000 60536",
        "read -P 0xef 1M 128k",
        "read -P 0x11 2M 64k",
        "read -P 0x22 3M 128k",
    )
    assert "Pattern verification failed" not in proc.stdout + proc.stderr

    # Zeroing (with and without unmap) and discard read back as zeros.
    _qemu_io(tools, uri, "write -z 0 4k", "write -z -u 8k 8k", "discard 1M 64k")
    _qemu_io(
        tools,
        uri,
        "read -P 0 0 4k",
        "read -P 0xcd 4k 904",
        "read -P 0xab 5000 3192",
        "read -P 0 8k 8k",
        "read -P 0 1M 64k",
        "read -P 0xef 1088k 64k",
    )


def test_qemu_io_detects_wrong_pattern(server: UsbdServer, tools: Run) -> None:
    """The pattern check above would pass vacuously if qemu-io never compared: prove it does."""
    _qemu_io(tools, server.uri, "write -P 0x5a 4M 64k")
    proc = _qemu_io(tools, server.uri, "read -P 0xa5 4M 64k", check=False)
    assert proc.returncode != 0
    assert "Pattern verification failed at offset 4194304" in proc.stdout + proc.stderr
    # A single byte off in the middle is caught too.
    _qemu_io(tools, server.uri, "write -P 0x00 4227072 1")
    proc = _qemu_io(tools, server.uri, "read -P 0x5a 4M 64k", check=False)
    assert proc.returncode != 0
    assert "Pattern verification failed" in proc.stdout + proc.stderr
