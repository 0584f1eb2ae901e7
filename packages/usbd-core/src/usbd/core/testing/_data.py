"""Test data and byte comparisons that say where two buffers first differ."""

from __future__ import annotations

import hashlib
import random

__all__ = ["alternating_image", "assert_same_bytes", "random_bytes", "sha256"]

MiB = 1024 * 1024


def random_bytes(length: int, seed: int | str = 0) -> bytes:
    """Reproducible noise: ``length`` bytes that depend only on ``seed``."""
    return random.Random(seed).randbytes(length)


def alternating_image(
    size: int, block: int = 4096, seed: int | str = 0, *, odd: bool = False
) -> bytes:
    """Blocks of noise alternating with blocks of zeros: data in the even blocks (the odd ones
    when ``odd``). A device that drops all-zero writes or mixes up blocks cannot pass this."""
    noise = random_bytes(size, seed)
    image = bytearray(size)
    for start in range(block if odd else 0, size, 2 * block):
        image[start : start + block] = noise[start : start + block]
    return bytes(image)


def sha256(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int | None:
    """Index of the first byte where ``a`` and ``b`` differ (a length mismatch counts)."""
    if a == b:
        return None
    n = min(len(a), len(b))
    lo = 0
    step = 1 << 16
    while lo < n and a[lo : lo + step] == b[lo : lo + step]:
        lo += step
    for i in range(lo, min(lo + step, n)):
        if a[i] != b[i]:
            return i
    return n


def assert_same_bytes(
    expected: bytes | bytearray, got: bytes | bytearray, offset: int = 0, what: str = "read"
) -> None:
    """Fail naming the device offset of the first wrong byte, not a wall of bytes."""
    index = first_difference(expected, got)
    if index is None:
        return
    if index >= min(len(expected), len(got)):
        raise AssertionError(f"{what} at {offset}: {len(got)} bytes, expected {len(expected)}")
    wrong = got[index : index + 16].hex()
    right = expected[index : index + 16].hex()
    raise AssertionError(
        f"{what}: wrong data at device offset {offset + index}: got {wrong}..., expected {right}..."
    )
