"""Sizes and listen addresses as people type them on the command line."""

from __future__ import annotations

import pytest

from usbd.core import format_size, parse_size
from usbd.core.cli import Listen, parse_listen

KiB, MiB, GiB, TiB, PiB, EiB = (1 << (10 * i) for i in range(1, 7))


@pytest.mark.parametrize(
    ("text", "size"),
    [
        # the original project's examples
        ("1.0 GiB", GiB),
        ("20GiB", 20 * GiB),
        ("100 MiB", 100 * MiB),
        # every unit, decimal and binary
        ("512", 512),
        ("512B", 512),
        ("1 kB", 1000),
        ("1KB", 1000),
        ("1 KiB", KiB),
        ("3MB", 3_000_000),
        ("3 MiB", 3 * MiB),
        ("2GB", 2 * 10**9),
        ("2TB", 2 * 10**12),
        ("2 TiB", 2 * TiB),
        ("1PB", 10**15),
        ("1 PiB", PiB),
        ("1EB", 10**18),
        ("1 EiB", EiB),
        # case-insensitive
        ("1 gib", GiB),
        ("1 GIB", GiB),
        ("1 mb", 10**6),
        ("5 b", 5),
        # single letters are binary, as with nbdkit and qemu-img
        ("4k", 4 * KiB),
        ("64M", 64 * MiB),
        ("1G", GiB),
        ("1T", TiB),
        # decimal points
        ("1.5GiB", GiB + GiB // 2),
        ("0.5 kB", 500),
        (".5 KiB", 512),
        ("2. MiB", 2 * MiB),
        ("1.0000001 B", 1),
        # surrounding whitespace
        ("  100 MiB  ", 100 * MiB),
        ("0", 0),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "GiB",
        "abc",
        "1.2.3",
        "-1",
        "+1",
        "10 XB",
        "1 GiBs",
        "1 Gi B",
        "1e3",
        "0x10",
        "1,5G",
    ],
)
def test_parse_size_rejects_with_a_helpful_message(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size") as info:
        parse_size(text)
    message = str(info.value)
    assert repr(text) in message
    assert "MiB" in message  # says what is accepted


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (KiB, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (64 * MiB, "64 MiB"),
        (100 * MiB, "100 MiB"),
        (GiB, "1.0 GiB"),
        (20 * GiB, "20 GiB"),
        (9 * GiB + GiB // 2, "9.5 GiB"),
        (10 * GiB, "10 GiB"),
        (TiB, "1.0 TiB"),
        (3 * PiB, "3.0 PiB"),
        (2 * EiB, "2.0 EiB"),
        (4096 * EiB, "4096 EiB"),  # no unit above EiB
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize("size", [512, KiB, 3 * MiB, GiB, 20 * GiB, 7 * TiB, 1536])
def test_format_then_parse_round_trips_exact_sizes(size: int) -> None:
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize(
    ("text", "listen"),
    [
        ("127.0.0.1:10809", Listen(host="127.0.0.1", port=10809)),
        ("localhost:0", Listen(host="localhost", port=0)),
        (":10809", Listen(host=None, port=10809)),
        ("[::1]:5000", Listen(host="::1", port=5000)),
        ("0.0.0.0:65535", Listen(host="0.0.0.0", port=65535)),
        ("/tmp/nbd.sock", Listen(path="/tmp/nbd.sock")),
        ("./nbd.sock", Listen(path="./nbd.sock")),
        ("/run/a:b", Listen(path="/run/a:b")),
    ],
)
def test_parse_listen(text: str, listen: Listen) -> None:
    assert parse_listen(text) == listen


@pytest.mark.parametrize(
    "text", ["", "localhost", "nbd.sock", "host:", "host:port", "host:65536", "host:-1", "1:2:x"]
)
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid listen address"):
        parse_listen(text)
