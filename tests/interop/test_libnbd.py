"""python3-libnbd (the ``nbd`` module) against usbd-ramdisk: every command, flag and error.

libnbd is a strict client: by default it refuses out-of-range requests, unadvertised
commands and odd flags itself. The error tests turn that off (``set_strict_mode(0)``) so the
bad request really reaches the server, then check the errno the server answered with and
that the same connection still reads and writes correctly afterwards (a wrong reply length
or a stray payload would desynchronise the stream and fail the next request).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import UsbdServer

KiB = 1024
MiB = 1024 * KiB
MAX_PAYLOAD = 32 * MiB
HOLE, ZERO = 1, 2

Handle = Any
Connect = Callable[..., Handle]


@pytest.fixture
def disk(server: UsbdServer, connect: Connect) -> Handle:
    """A connection to the shared server, whose disk is trimmed back to all zeros first."""
    h = connect(server.uri)
    h.trim(server.size, 0)
    assert h.pread(4096, 0) == bytes(4096)
    return h


def extents(h: Handle, length: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    """base:allocation as (length, flags) pairs, from one BLOCK_STATUS request."""
    seen: list[tuple[str, int, list[int]]] = []

    def callback(context: str, at: int, entries: list[int], error: Any) -> int:
        seen.append((context, at, list(entries)))
        return 0

    h.block_status(length, offset, callback, flags)
    assert [(c, at) for c, at, _ in seen] == [("base:allocation", offset)]
    entries = seen[0][2]
    return list(zip(entries[::2], entries[1::2], strict=True))


def assert_alive(h: Handle, size: int) -> None:
    """The connection still serves reads and writes, and its replies are still in step."""
    marker = os.urandom(513)
    offset = size - 4096 - 7
    h.pwrite(marker, offset)
    assert h.pread(513, offset) == marker
    assert h.pread(7, offset + 513) == bytes(7)


# -- negotiation -------------------------------------------------------------------------------


def test_negotiated_flags(server: UsbdServer, connect: Connect, libnbd: ModuleType) -> None:
    h = connect(server.uri, full_info=True)
    assert h.get_protocol() == "newstyle-fixed"
    assert h.get_structured_replies_negotiated() is True
    assert h.get_size() == server.size
    assert h.get_canonical_export_name() == server.export_name
    assert h.get_export_description() == server.description
    assert h.is_read_only() is False
    assert h.is_rotational() is False
    for can in (
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_df",
        "can_multi_conn",
        "can_cache",
    ):
        assert getattr(h, can)() is True, can
    assert h.can_meta_context(libnbd.CONTEXT_BASE_ALLOCATION) is True
    assert h.get_block_size(libnbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(libnbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(libnbd.SIZE_MAXIMUM) == MAX_PAYLOAD


def test_structured_replies_off(server: UsbdServer, connect: Connect, libnbd: ModuleType) -> None:
    h = connect(server.uri, structured=False)
    assert h.get_structured_replies_negotiated() is False
    # DF and meta contexts only exist with structured replies.
    assert h.can_df() is False
    assert h.can_meta_context(libnbd.CONTEXT_BASE_ALLOCATION) is False
    data = os.urandom(100_000)
    h.pwrite(data, 3 * MiB + 1)
    assert h.pread(100_000, 3 * MiB + 1) == data


def test_empty_export_name_selects_the_default(server: UsbdServer, connect: Connect) -> None:
    uri = server.uri.replace(f"/{server.export_name}", "/", 1)
    h = connect(uri, full_info=True)
    assert h.get_size() == server.size
    assert h.get_canonical_export_name() == server.export_name


def test_unknown_export_is_refused(
    server: UsbdServer, connect: Connect, libnbd: ModuleType
) -> None:
    uri = server.uri.replace(f"/{server.export_name}", "/no-such-export", 1)
    with pytest.raises(libnbd.Error) as caught:
        connect(uri)
    assert caught.value.errno == "ENOENT"


def test_opt_mode_list_info_go(server: UsbdServer, connect: Connect, libnbd: ModuleType) -> None:
    h = connect(server.uri, opt_mode=True, meta=False)
    assert h.aio_is_negotiating()

    exports: list[tuple[str, str]] = []
    assert h.opt_list(lambda name, description: exports.append((name, description))) == 1
    assert exports == [(server.export_name, server.description)]

    def contexts(*queries: str) -> list[str]:
        h.clear_meta_contexts()
        for query in queries:
            h.add_meta_context(query)
        found: list[str] = []
        assert h.opt_list_meta_context(found.append) == len(found)
        return found

    assert contexts() == ["base:allocation"]  # no query: everything on offer
    assert contexts("base:") == ["base:allocation"]  # a namespace query
    assert contexts("base:allocation") == ["base:allocation"]
    assert contexts("qemu:dirty-bitmap:x") == []
    assert contexts("qemu:dirty-bitmap:x", "base:allocation") == ["base:allocation"]

    h.set_export_name("no-such-export")
    with pytest.raises(libnbd.Error) as caught:
        h.opt_info()
    assert caught.value.errno == "ENOENT"
    assert h.aio_is_negotiating()  # a failed INFO leaves negotiation open

    h.set_export_name(server.export_name)
    h.opt_info()
    assert h.get_size() == server.size
    assert h.can_trim() and h.can_fua() and not h.is_read_only()

    h.clear_meta_contexts()
    h.add_meta_context("base:allocation")
    h.add_meta_context("qemu:dirty-bitmap:x")
    h.opt_go()
    assert h.aio_is_ready()
    assert h.can_meta_context("base:allocation") is True
    assert h.can_meta_context("qemu:dirty-bitmap:x") is False
    assert_alive(h, server.size)


def test_opt_abort(server: UsbdServer, connect: Connect) -> None:
    h = connect(server.uri, opt_mode=True)
    h.opt_abort()
    assert h.aio_is_closed()
    # The server shrugs it off and keeps serving.
    assert_alive(connect(server.uri), server.size)


# -- data commands -----------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_pread_pwrite(server: UsbdServer, disk: Handle, connect: Connect, structured: bool) -> None:
    h = connect(server.uri, structured=structured)
    size = server.size
    model = bytearray(8 * MiB)

    def write(data: bytes, offset: int) -> None:
        h.pwrite(data, offset)
        model[offset : offset + len(data)] = data

    write(os.urandom(1 * MiB), 2 * MiB)  # aligned
    write(os.urandom(12345), 4 * MiB + 4097)  # unaligned offset and length
    write(os.urandom(300_000), 2 * MiB + 700_000)  # overlaps the first and runs past it
    write(b"\x01", 0)  # single bytes, at the very start ...
    write(b"\x02", 5 * MiB - 1)
    for offset, length in (
        (0, 1),
        (0, 2),
        (5 * MiB - 1, 1),
        (2 * MiB - 3, 1 * MiB + 300_000),  # hole, data, overlap, hole
        (4 * MiB + 4000, 12345 + 200),
        (0, 8 * MiB),
    ):
        assert h.pread(length, offset) == model[offset : offset + length], (offset, length)

    # ... and at the very end, with whole-payload-sized requests near it.
    h.pwrite(b"\xff", size - 1)
    assert h.pread(1, size - 1) == b"\xff"
    assert h.pread(2, size - 2) == b"\x00\xff"
    big = os.urandom(MAX_PAYLOAD)
    h.pwrite(big, size - MAX_PAYLOAD)
    assert h.pread(MAX_PAYLOAD, size - MAX_PAYLOAD) == big


def test_read_replies_hole_chunks_unless_df(disk: Handle, libnbd: ModuleType) -> None:
    """A structured read over data and holes comes as DATA and HOLE chunks; with DF, as one
    DATA chunk. Either way the bytes are right."""
    data = os.urandom(64 * KiB)
    disk.pwrite(data, 1 * MiB)
    chunks: list[tuple[int, int, int]] = []

    def chunk(buf: bytes, offset: int, status: int, error: Any) -> int:
        chunks.append((offset, len(buf), status))
        return 0

    expected = data + bytes(192 * KiB)
    assert disk.pread_structured(256 * KiB, 1 * MiB, chunk) == expected
    assert sorted(chunks) == [
        (1 * MiB, 64 * KiB, libnbd.READ_DATA),
        (1 * MiB + 64 * KiB, 192 * KiB, libnbd.READ_HOLE),
    ]

    chunks.clear()
    assert disk.pread_structured(256 * KiB, 1 * MiB, chunk, libnbd.CMD_FLAG_DF) == expected
    assert chunks == [(1 * MiB, 256 * KiB, libnbd.READ_DATA)]

    chunks.clear()
    assert disk.pread_structured(1 * MiB, 8 * MiB, chunk) == bytes(MiB)
    assert chunks == [(8 * MiB, 1 * MiB, libnbd.READ_HOLE)]


def test_flush_and_fua(server: UsbdServer, disk: Handle, libnbd: ModuleType) -> None:
    fua = libnbd.CMD_FLAG_FUA
    data = os.urandom(256 * KiB)
    disk.pwrite(data, 0, fua)
    disk.trim(1000, 5000, fua)
    disk.zero(1000, 20_000, fua)
    disk.flush()
    assert (
        disk.pread(256 * KiB, 0)
        == data[:5000] + bytes(1000) + data[6000:20_000] + bytes(1000) + data[21_000:]
    )
    # The spec makes FUA valid on every command once SEND_FUA is advertised; libnbd only
    # lets it through on reads and flushes with strict flag checks off.
    disk.set_strict_mode(disk.get_strict_mode() & ~libnbd.STRICT_FLAGS)
    assert disk.pread(10, 0, fua) == data[:10]
    disk.flush(fua)
    assert_alive(disk, server.size)


def test_trim(disk: Handle) -> None:
    data = os.urandom(1 * MiB)
    disk.pwrite(data, 2 * MiB)
    disk.trim(100_000, 2 * MiB + 1000)  # unaligned: partial blocks read as zeros too
    disk.trim(256 * KiB, 2 * MiB + 512 * KiB)  # aligned: given back entirely
    expected = bytearray(data)
    expected[1000:101_000] = bytes(100_000)
    expected[512 * KiB : 768 * KiB] = bytes(256 * KiB)
    assert disk.pread(1 * MiB, 2 * MiB) == expected
    runs = extents(disk, 1 * MiB, 2 * MiB)
    assert sum(length for length, _ in runs) == 1 * MiB
    assert (256 * KiB, HOLE | ZERO) in runs


@pytest.mark.parametrize(
    "flag_names",
    [(), ("NO_HOLE",), ("FAST_ZERO",), ("NO_HOLE", "FAST_ZERO"), ("FUA",)],
    ids=lambda names: "+".join(names) or "plain",
)
def test_zero(disk: Handle, libnbd: ModuleType, flag_names: tuple[str, ...]) -> None:
    flags = 0
    for name in flag_names:
        flags |= getattr(libnbd, f"CMD_FLAG_{name}")
    data = os.urandom(2 * MiB)
    disk.pwrite(data, 1 * MiB)
    disk.zero(70_001, 1 * MiB + 3, flags)  # unaligned
    disk.zero(512 * KiB, 2 * MiB, flags)  # aligned
    expected = bytearray(data)
    expected[3:70_004] = bytes(70_001)
    expected[1 * MiB : 1 * MiB + 512 * KiB] = bytes(512 * KiB)
    assert disk.pread(2 * MiB, 1 * MiB) == expected
    runs = extents(disk, 512 * KiB, 2 * MiB)
    if "NO_HOLE" in flag_names:
        # The spec: with NO_HOLE the server must not deallocate the range.
        assert all(not run_flags & HOLE for _, run_flags in runs), runs
    else:
        # The ramdisk punches holes when allowed: it gives the memory back.
        assert runs[0] == (512 * KiB, HOLE | ZERO)


def test_cache(server: UsbdServer, disk: Handle, libnbd: ModuleType) -> None:
    """The ramdisk holds everything in memory already: CACHE is advertised and answered,
    changes nothing, and out of range it gets EINVAL like a read."""
    assert disk.can_cache() is True
    disk.pwrite(b"cached", 4096)
    disk.cache(4096, 0)
    disk.cache(server.size, 0)
    assert disk.pread(6, 4096) == b"cached"
    disk.set_strict_mode(0)
    with pytest.raises(libnbd.Error) as caught:
        disk.cache(4096, server.size - 1)
    assert caught.value.errno == "EINVAL"
    assert_alive(disk, server.size)


def test_block_status(server: UsbdServer, disk: Handle, libnbd: ModuleType) -> None:
    disk.pwrite(os.urandom(128 * KiB), 1 * MiB)
    disk.pwrite(os.urandom(64 * KiB), 4 * MiB)
    assert extents(disk, 8 * MiB, 0) == [
        (1 * MiB, HOLE | ZERO),
        (128 * KiB, 0),
        (3 * MiB - 128 * KiB, HOLE | ZERO),
        (64 * KiB, 0),
        (4 * MiB - 64 * KiB, HOLE | ZERO),
    ]
    # The reply describes the request, not the whole device, starting at its first byte.
    assert extents(disk, 1 * MiB, 1 * MiB + 100) == [
        (128 * KiB - 100, 0),
        (1 * MiB - 128 * KiB + 100, HOLE | ZERO),
    ]
    assert extents(disk, 10, server.size - 10) == [(10, HOLE | ZERO)]
    # REQ_ONE: exactly one extent, still starting at the requested offset.
    req_one = libnbd.CMD_FLAG_REQ_ONE
    assert extents(disk, 8 * MiB, 0, req_one) == [(1 * MiB, HOLE | ZERO)]
    assert extents(disk, 8 * MiB, 1 * MiB + 4096, req_one) == [(128 * KiB - 4096, 0)]


def test_block_status_needs_a_context(
    server: UsbdServer, connect: Connect, libnbd: ModuleType
) -> None:
    h = connect(server.uri, meta=False)
    assert h.can_meta_context(libnbd.CONTEXT_BASE_ALLOCATION) is False
    with pytest.raises(libnbd.Error) as caught:
        h.block_status(4096, 0, lambda *args: 0)
    assert caught.value.errno == "ENOTSUP"  # libnbd's own refusal
    h.set_strict_mode(0)
    with pytest.raises(libnbd.Error) as caught:
        h.block_status(4096, 0, lambda *args: 0)
    assert caught.value.errno == "EINVAL"  # the server's
    assert_alive(h, server.size)


# -- errors ------------------------------------------------------------------------------------

U64 = 2**64
#: (id, request, errno the server must answer with). ``h`` is a handle, ``n`` the nbd module,
#: ``size`` the export size.
ERROR_CASES: list[tuple[str, Callable[[Handle, ModuleType, int], object], str]] = [
    ("read-past-end", lambda h, n, size: h.pread(20, size - 10), "EINVAL"),
    ("read-at-end", lambda h, n, size: h.pread(1, size), "EINVAL"),
    ("read-offset-wraps", lambda h, n, size: h.pread(10, U64 - 5), "EINVAL"),
    ("read-zero-length", lambda h, n, size: h.pread(0, 0), "EINVAL"),
    ("read-too-long", lambda h, n, size: h.pread(MAX_PAYLOAD + 1, 0), "EINVAL"),
    ("read-unknown-flag", lambda h, n, size: h.pread(1, 0, 1 << 5), "EINVAL"),
    ("read-no-hole-flag", lambda h, n, size: h.pread(1, 0, n.CMD_FLAG_NO_HOLE), "EINVAL"),
    ("write-past-end", lambda h, n, size: h.pwrite(b"x" * 20, size - 10), "ENOSPC"),
    ("write-far-past-end", lambda h, n, size: h.pwrite(b"x", 2**63), "ENOSPC"),
    # Zero-length writes count as out of range (nbdkit answers the same).
    ("write-zero-length", lambda h, n, size: h.pwrite(b"", 0), "ENOSPC"),
    ("write-unknown-flag", lambda h, n, size: h.pwrite(b"x", 0, 1 << 7), "EINVAL"),
    ("write-req-one-flag", lambda h, n, size: h.pwrite(b"x", 0, n.CMD_FLAG_REQ_ONE), "EINVAL"),
    ("write-too-long", lambda h, n, size: h.pwrite(bytes(MAX_PAYLOAD + 1), 0), "EINVAL"),
    ("zero-past-end", lambda h, n, size: h.zero(20, size - 10), "ENOSPC"),
    ("trim-past-end", lambda h, n, size: h.trim(20, size - 10), "EINVAL"),
    ("trim-fast-zero-flag", lambda h, n, size: h.trim(1, 0, n.CMD_FLAG_FAST_ZERO), "EINVAL"),
    ("cache-past-end", lambda h, n, size: h.cache(20, size - 10), "EINVAL"),
]


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize(
    ("request_", "expected"), [(c[1], c[2]) for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_bad_request_gets_errno_and_stream_stays_in_step(
    server: UsbdServer,
    connect: Connect,
    libnbd: ModuleType,
    structured: bool,
    request_: Callable[[Handle, ModuleType, int], object],
    expected: str,
) -> None:
    h = connect(server.uri, structured=structured, strict=0)
    with pytest.raises(libnbd.Error) as caught:
        request_(h, libnbd, server.size)
    assert caught.value.errno == expected, caught.value
    assert_alive(h, server.size)
    # Twice, to be sure the first error left nothing behind in the stream.
    with pytest.raises(libnbd.Error):
        request_(h, libnbd, server.size)
    assert_alive(h, server.size)


def test_block_status_past_end(server: UsbdServer, connect: Connect, libnbd: ModuleType) -> None:
    h = connect(server.uri, strict=0)
    with pytest.raises(libnbd.Error) as caught:
        h.block_status(20, server.size - 10, lambda *args: 0)
    assert caught.value.errno == "EINVAL"
    assert_alive(h, server.size)


def test_df_needs_structured_replies(
    server: UsbdServer, connect: Connect, libnbd: ModuleType
) -> None:
    h = connect(server.uri, structured=False, strict=0)
    with pytest.raises(libnbd.Error) as caught:
        h.pread_structured(10, 0, lambda *args: 0, libnbd.CMD_FLAG_DF)
    assert caught.value.errno == "EINVAL"
    assert_alive(h, server.size)


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_read_only_export(
    readonly_server: UsbdServer, connect: Connect, libnbd: ModuleType, structured: bool
) -> None:
    h = connect(readonly_server.uri, structured=structured)
    size = readonly_server.size
    assert h.is_read_only() is True
    assert not (h.can_trim() or h.can_zero() or h.can_fua() or h.can_fast_zero())
    with pytest.raises(libnbd.Error) as caught:
        h.pwrite(b"x", 0)  # libnbd refuses by itself ...
    assert caught.value.errno == "EPERM"
    h.set_strict_mode(0)  # ... and the server refuses what is sent anyway
    fua = libnbd.CMD_FLAG_FUA
    for request in (
        lambda: h.pwrite(b"x", 0),
        lambda: h.pwrite(b"x" * 4096, 8192, fua),
        lambda: h.pwrite(b"x", size + 4096),  # permission is checked before range
        lambda: h.trim(4096, 0),
        lambda: h.zero(4096, 0),
        lambda: h.zero(4096, 0, libnbd.CMD_FLAG_NO_HOLE),
    ):
        with pytest.raises(libnbd.Error) as caught:
            request()
        assert caught.value.errno == "EPERM"
        assert h.pread(size, 0) == bytes(size)
    h.flush()  # flushing writes nobody could make is harmless


# -- many requests, many connections -----------------------------------------------------------


def _drain(h: Handle) -> None:
    for _ in range(100_000):
        if h.aio_in_flight() == 0:
            return
        h.poll(5000)  # milliseconds; a ceiling only, no timing is asserted
    pytest.fail("requests still in flight")


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_many_requests_in_flight(
    server: UsbdServer, disk: Handle, connect: Connect, libnbd: ModuleType, structured: bool
) -> None:
    """Hundreds of writes, then reads, issued without waiting, with bad requests mixed in:
    every reply goes to the right request (data and errnos), whatever order it comes in."""
    h = connect(server.uri, structured=structured, strict=0)
    rng = random.Random(2)
    slot = 96 * KiB
    writes: list[tuple[int, bytes, int]] = []
    bad: list[int] = []
    for i in range(300):
        length = rng.randrange(1, slot)
        offset = i * slot + rng.randrange(0, slot - length + 1)
        data = rng.randbytes(length)
        cookie = h.aio_pwrite(
            libnbd.Buffer.from_bytearray(bytearray(data)),
            offset,
            flags=libnbd.CMD_FLAG_FUA if i % 7 == 0 else 0,
        )
        writes.append((offset, data, cookie))
        if i % 25 == 0:
            bad.append(h.aio_pwrite(libnbd.Buffer.from_bytearray(bytearray(10)), server.size - 5))
    _drain(h)
    for _, _, cookie in writes:
        assert h.aio_command_completed(cookie) is True
    for cookie in bad:
        with pytest.raises(libnbd.Error) as caught:
            h.aio_command_completed(cookie)
        assert caught.value.errno == "ENOSPC"

    reads: list[tuple[bytes, Any, int]] = []
    bad = []
    for i, (offset, data, _) in enumerate(writes):
        buf = libnbd.Buffer(len(data))
        reads.append((data, buf, h.aio_pread(buf, offset)))
        if i % 25 == 0:
            bad.append(h.aio_pread(libnbd.Buffer(10), server.size - 5))
    _drain(h)
    for data, buf, cookie in reads:
        assert h.aio_command_completed(cookie) is True
        assert buf.to_bytearray() == data
    for cookie in bad:
        with pytest.raises(libnbd.Error) as caught:
            h.aio_command_completed(cookie)
        assert caught.value.errno == "EINVAL"
    assert_alive(h, server.size)


def test_multi_conn(server: UsbdServer, disk: Handle, connect: Connect) -> None:
    """CAN_MULTI_CONN: a write acknowledged on one connection and flushed on another is
    visible on a third."""
    first, second, third = (connect(server.uri) for _ in range(3))
    data = os.urandom(200_000)
    first.pwrite(data, 6 * MiB + 3)
    second.flush()
    assert third.pread(200_000, 6 * MiB + 3) == data


def test_disconnect_keeps_data(server: UsbdServer, disk: Handle, connect: Connect) -> None:
    h = connect(server.uri)
    data = os.urandom(4096)
    h.pwrite(data, 7 * MiB)
    h.shutdown()  # NBD_CMD_DISC
    assert connect(server.uri).pread(4096, 7 * MiB) == data
