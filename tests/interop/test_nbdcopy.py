"""nbdcopy (libnbd-bin) against usbd-ramdisk: bulk copies over several connections at once."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import ServerFactory

MiB = 1024 * 1024
SIZE = 32 * MiB
TRANSPORTS = ["unix", "tcp"]

Run = Callable[..., Any]


def _random_file(path: Path, size: int = SIZE) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    "options",
    [
        ["--connections=4", "--requests=16"],
        ["-C", "2", "-R", "64", "--request-size=65536", "--flush"],
    ],
    ids=["C4-R16", "C2-R64-64k-flush"],
)
def test_round_trip_random_data(
    transport: str, options: list[str], start_server: ServerFactory, tools: Run, tmp_path: Path
) -> None:
    server = start_server(transport, size=SIZE)
    data = _random_file(tmp_path / "src.img")
    tools("nbdcopy", *options, str(tmp_path / "src.img"), server.uri)
    tools("nbdcopy", *options, server.uri, str(tmp_path / "dst.img"))
    back = (tmp_path / "dst.img").read_bytes()
    assert len(back) == SIZE
    assert back == data


def test_sparse_source_overwrites_old_data(
    start_server: ServerFactory, tools: Run, tmp_path: Path
) -> None:
    """Zero runs in the source must become zeros on the server (WRITE_ZEROES or TRIM), even
    where the server held data before."""
    server = start_server("unix", size=SIZE)
    _random_file(tmp_path / "noise.img")
    tools("nbdcopy", "-C", "4", str(tmp_path / "noise.img"), server.uri)

    sparse = bytearray(SIZE)
    for offset in (0, 5 * MiB + 12345, SIZE - 70000):
        sparse[offset : offset + 70000] = os.urandom(70000)
    source = tmp_path / "sparse.img"
    with source.open("wb") as f:  # a file with real holes, so nbdcopy sees them as such
        f.truncate(SIZE)
        for offset in (0, 5 * MiB + 12345, SIZE - 70000):
            f.seek(offset)
            f.write(sparse[offset : offset + 70000])
    tools("nbdcopy", "-C", "4", str(source), server.uri)
    tools("nbdcopy", server.uri, str(tmp_path / "back.img"))
    assert (tmp_path / "back.img").read_bytes() == bytes(sparse)


def test_server_to_server(start_server: ServerFactory, tools: Run, tmp_path: Path) -> None:
    """NBD to NBD: one usbd process reads while another writes, unix socket to TCP."""
    first = start_server("unix", size=SIZE)
    second = start_server("tcp", size=SIZE)
    data = _random_file(tmp_path / "src.img")
    tools("nbdcopy", "-C", "4", str(tmp_path / "src.img"), first.uri)
    tools("nbdcopy", "-C", "4", "--requests=32", first.uri, second.uri)
    tools("nbdcopy", second.uri, str(tmp_path / "dst.img"))
    assert (tmp_path / "dst.img").read_bytes() == data


def test_read_only_destination_is_refused(
    start_server: ServerFactory, tools: Run, tmp_path: Path
) -> None:
    server = start_server("unix", size=MiB, read_only=True)
    _random_file(tmp_path / "src.img", MiB)
    proc = tools("nbdcopy", str(tmp_path / "src.img"), server.uri, check=False)
    assert proc.returncode != 0
    assert "read-only" in proc.stderr
    # Reading from it still works, and it still holds zeros.
    tools("nbdcopy", server.uri, str(tmp_path / "dst.img"))
    assert (tmp_path / "dst.img").read_bytes() == bytes(MiB)
