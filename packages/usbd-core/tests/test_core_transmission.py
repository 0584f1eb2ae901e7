"""The sans-IO transmission layer: request framing (RequestBuffer) and request checks."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from core_helpers import (
    BLOCK_STATUS,
    CACHE,
    DISC,
    EINVAL,
    ENOSPC,
    EPERM,
    F_DF,
    F_FAST_ZERO,
    F_FUA,
    F_NO_HOLE,
    F_REQ_ONE,
    FLUSH,
    READ,
    TRIM,
    WRITE,
    WRITE_ZEROES,
    request,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from usbd.core import ProtocolError, RequestBuffer, Session, TransmissionFlag, check

#: (command, flags, cookie, offset, length, payload bytes or None)
Decoded = tuple[int, int, int, int, int, bytes | None]


def feed(buffer: RequestBuffer, data: bytes, step: int | None = None) -> list[Decoded]:
    """Push ``data`` through ``buffer`` as a socket would (``step`` bytes per receive at most)
    and return every request popped, payloads copied before the next receive invalidates them.
    """
    out: list[Decoded] = []
    pos = 0
    while pos < len(data):
        space = buffer.space()
        assert len(space) > 0
        n = min(len(space), len(data) - pos, step or len(data))
        space[:n] = data[pos : pos + n]
        buffer.commit(n)
        pos += n
        while (req := buffer.pop()) is not None:
            command, flags, cookie, offset, length, payload = req
            out.append(
                (
                    command,
                    flags,
                    cookie,
                    offset,
                    length,
                    None if payload is None else bytes(payload),
                )
            )
    return out


def write(cookie: int, offset: int, payload: bytes, flags: int = 0) -> bytes:
    return request(WRITE, cookie, offset, len(payload), flags) + payload


STREAM = (
    request(READ, 1, 4096, 512)
    + write(2, 0, bytes(range(200)), F_FUA)
    + request(FLUSH, 3)
    + write(4, 8, b"")
    + request(TRIM, 5, 1 << 40, 1 << 31)
    + write(6, 17, b"xyz")
    + request(DISC, 7)
)
EXPECTED: list[Decoded] = [
    (READ, 0, 1, 4096, 512, None),
    (WRITE, F_FUA, 2, 0, 200, bytes(range(200))),
    (FLUSH, 0, 3, 0, 0, None),
    (WRITE, 0, 4, 8, 0, b""),
    (TRIM, 0, 5, 1 << 40, 1 << 31, None),
    (WRITE, 0, 6, 17, 3, b"xyz"),
    (DISC, 0, 7, 0, 0, None),
]


def test_requests_split_at_every_byte_boundary_decode_the_same() -> None:
    for cut in range(len(STREAM) + 1):
        buffer = RequestBuffer(1024)
        got = feed(buffer, STREAM[:cut]) + feed(buffer, STREAM[cut:])
        assert got == EXPECTED, cut
        assert buffer.idle


def test_requests_one_byte_at_a_time() -> None:
    buffer = RequestBuffer(1024, capacity=32)
    assert feed(buffer, STREAM, step=1) == EXPECTED


def test_partial_request_is_not_popped_and_buffer_is_not_idle() -> None:
    buffer = RequestBuffer(1024)
    assert feed(buffer, write(1, 0, b"abcd")[:-1]) == []
    assert not buffer.idle
    assert buffer.pending == 31
    assert feed(buffer, b"d") == [(WRITE, 0, 1, 0, 4, b"abcd")]
    assert buffer.idle


def test_write_payload_is_a_view_into_the_buffer() -> None:
    buffer = RequestBuffer(1024)
    data = write(9, 0, b"hello")
    space = buffer.space()
    space[: len(data)] = data
    buffer.commit(len(data))
    req = buffer.pop()
    assert req is not None
    payload = req[5]
    assert isinstance(payload, memoryview)
    assert payload.obj is space.obj  # no copy
    assert payload.tobytes() == b"hello"
    assert buffer.pop() is None


@pytest.mark.parametrize("magic", [0, 0x25609514, 0x67446698, 0xFFFFFFFF])
def test_bad_request_magic_is_a_protocol_error(magic: int) -> None:
    buffer = RequestBuffer(1024)
    bad = struct.pack(">I", magic) + request(READ, 1, 0, 512)[4:]
    with pytest.raises(ProtocolError, match="magic"):
        feed(buffer, request(READ, 1, 0, 512) + bad)


@pytest.mark.parametrize("capacity", [28, 100, 4096])
@pytest.mark.parametrize("step", [1, 7, 29, None])
def test_over_max_write_payload_is_discarded_and_next_request_parses(
    capacity: int, step: int | None
) -> None:
    buffer = RequestBuffer(64, capacity=capacity)
    data = write(1, 0, b"\xaa" * 65) + write(2, 0, b"\xbb" * 64) + request(READ, 3, 0, 1)
    got = feed(buffer, data, step)
    assert got == [
        (WRITE, 0, 1, 0, 65, None),  # returned for an error reply, payload gone
        (WRITE, 0, 2, 0, 64, b"\xbb" * 64),
        (READ, 0, 3, 0, 1, None),
    ]
    assert buffer.idle


def test_huge_write_is_discarded_while_it_streams_past() -> None:
    buffer = RequestBuffer(16, capacity=64)
    header = request(WRITE, 1, 0, 1 << 20)
    assert feed(buffer, header) == [(WRITE, 0, 1, 0, 1 << 20, None)]
    assert not buffer.idle
    # The receive window never exceeds what is still owed, so the next header is not eaten.
    total = 0
    while total < (1 << 20) - 10:
        space = buffer.space()
        assert 0 < len(space) <= (1 << 20) - total
        buffer.commit(min(len(space), (1 << 20) - 10 - total))
        total += min(len(space), (1 << 20) - 10 - total)
        assert buffer.pop() is None
    assert feed(buffer, bytes(10) + request(FLUSH, 2)) == [(FLUSH, 0, 2, 0, 0, None)]
    assert buffer.idle


@pytest.mark.parametrize("step", [1, 50, None])
def test_buffer_grows_for_payloads_larger_than_its_capacity(step: int | None) -> None:
    buffer = RequestBuffer(1 << 16, capacity=64)
    big = bytes(i % 251 for i in range(10_000))
    data = request(READ, 1, 0, 8) + write(2, 512, big) + write(3, 0, b"tail")
    got = feed(buffer, data, step)
    assert got == [
        (READ, 0, 1, 0, 8, None),
        (WRITE, 0, 2, 512, 10_000, big),
        (WRITE, 0, 3, 0, 4, b"tail"),
    ]


def test_partial_request_is_moved_to_the_front_when_space_runs_out() -> None:
    # 100 bytes: a READ fills 28, then a WRITE needs 78 more than the 72 left behind it.
    buffer = RequestBuffer(1024, capacity=100)
    data = request(READ, 1, 0, 8) + write(2, 0, bytes(range(50))) + request(READ, 3, 8, 8)
    assert feed(buffer, data, step=40) == [
        (READ, 0, 1, 0, 8, None),
        (WRITE, 0, 2, 0, 50, bytes(range(50))),
        (READ, 0, 3, 8, 8, None),
    ]


def _receive_keeping_views(step: int | None, pin: bool) -> int:
    """What the engine does while its writer thread holds payloads: keep every view, swap in
    fresh storage whenever the next receive would overwrite or move received bytes (pinned,
    the buffer goes on behind them as long as there is room). The views must still read what
    was sent, and the stream parse as if nothing happened. Returns the number of swaps."""
    buffer = RequestBuffer(1024, capacity=200)
    payloads = [bytes([i]) * (20 + 7 * i) for i in range(12)]
    data = b"".join(write(i, i, p) for i, p in enumerate(payloads)) + request(FLUSH, 99)
    views: list[memoryview] = []
    popped: list[int] = []
    pos = swaps = 0
    while pos < len(data):
        if buffer.would_move():
            buffer.swap(bytearray(200))
            assert not buffer.pinned
            swaps += 1
        space = buffer.space()
        n = min(len(space), len(data) - pos, step or len(data))
        space[:n] = data[pos : pos + n]
        buffer.commit(n)
        pos += n
        while (req := buffer.pop()) is not None:
            popped.append(req[2])
            if req[5] is not None:
                views.append(req[5])
                if pin:
                    buffer.pin()
    assert popped == [*range(12), 99]
    assert [bytes(v) for v in views] == payloads
    assert buffer.idle
    return swaps


@pytest.mark.parametrize("step", [1, 13, 97, None])
def test_payload_views_survive_when_the_buffer_is_swapped_before_it_would_move(
    step: int | None,
) -> None:
    starting_over = _receive_keeping_views(step, pin=False)
    going_on = _receive_keeping_views(step, pin=True)
    assert starting_over >= going_on > 1
    if step is not None:  # small receives: going on behind the views needs fewer buffers
        assert starting_over > going_on


def test_receives_stop_at_a_request_end_when_another_would_not_fit_behind_it() -> None:
    """Requests of one size that do not divide the buffer, arriving in pieces (as a big
    WRITE does): the receive stops where the buffer runs out of room for another request, so
    the buffer starts over at its beginning and received bytes are never moved."""
    buffer = RequestBuffer(1024, capacity=300)
    data = b"".join(write(i, 0, bytes([i]) * 40) for i in range(20))  # 68 bytes each
    moves = pos = 0
    popped = []
    while pos < len(data):
        moves += buffer.would_move() and buffer.pending > 0
        space = buffer.space()
        n = min(len(space), len(data) - pos, 50)
        space[:n] = data[pos : pos + n]
        buffer.commit(n)
        pos += n
        while (req := buffer.pop()) is not None:
            assert req[5] is not None
            popped.append(bytes(req[5]))
    assert popped == [bytes([i]) * 40 for i in range(20)]
    assert moves == 0


def test_swapping_in_the_same_storage_moves_what_is_pending_intact() -> None:
    """The engine may get the buffer's own storage back as the spare (the writer finished
    with it while the loop waited): the pending bytes overlap where they must go."""
    buffer = RequestBuffer(1024, capacity=100)
    storage = bytearray(100)
    buffer.swap(storage)
    first, second = write(1, 0, bytes(range(2))), write(2, 0, bytes(range(100, 160)))
    feed(buffer, first)  # 30 bytes taken
    part = second[:60]
    buffer.pin()
    space = buffer.space()
    space[: len(part)] = part
    buffer.commit(len(part))
    assert buffer.pop() is None and buffer.pending == 60  # bytes 30..90: overlaps 0..60
    assert buffer.swap(storage) is storage
    assert bytes(storage[:60]) == part
    assert feed(buffer, second[60:]) == [(WRITE, 0, 2, 0, 60, bytes(range(100, 160)))]


def test_would_move_only_when_received_bytes_would_be_overwritten() -> None:
    buffer = RequestBuffer(1024, capacity=100)
    assert not buffer.would_move()  # nothing received yet
    feed(buffer, write(1, 0, b"abcd"))
    assert buffer.would_move()  # all consumed: the next receive would start at 0 again
    buffer.swap(bytearray(100))
    part = write(2, 0, bytes(60))[:40]
    space = buffer.space()
    space[: len(part)] = part
    buffer.commit(len(part))
    assert buffer.pop() is None
    assert not buffer.would_move()  # the rest fits behind what is there
    assert buffer.swap(bytearray(10)) is not None  # too small for what is pending: grows
    assert buffer.capacity == 100 and buffer.pending == 40
    feed(buffer, write(2, 0, bytes(60))[40:])


_REQUESTS = st.one_of(
    st.builds(
        lambda cmd, cookie, off, length: (request(cmd, cookie, off, length), None),
        st.sampled_from([READ, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS, 99]),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
    ),
    st.builds(lambda payload: (write(7, 0, payload), payload), st.binary(max_size=300)),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_REQUESTS, min_size=1, max_size=12),
    st.lists(st.integers(1, 120), min_size=1, max_size=20),
    st.sampled_from([28, 64, 200, 4096]),
)
def test_random_chunking_of_a_valid_stream(
    requests: list[tuple[bytes, bytes | None]], chunks: list[int], capacity: int
) -> None:
    max_payload = 256  # some generated writes are longer: those are discarded
    data = b"".join(raw for raw, _ in requests)
    buffer = RequestBuffer(max_payload, capacity=capacity)
    got: list[Decoded] = []
    pos = 0
    i = 0
    while pos < len(data):
        step = chunks[i % len(chunks)]
        i += 1
        got += feed(buffer, data[pos : pos + step])
        pos += step
    assert buffer.idle
    assert len(got) == len(requests)
    for (raw, payload), decoded in zip(requests, got, strict=True):
        _, flags, command, cookie, offset, length = struct.unpack_from(">IHHQQI", raw)
        assert decoded[:5] == (command, flags, cookie, offset, length)
        if payload is not None and len(payload) <= max_payload:
            assert decoded[5] == payload
        else:
            assert decoded[5] is None


# -- check() ---------------------------------------------------------------------------------

_TF = TransmissionFlag
ALL = (
    _TF.HAS_FLAGS
    | _TF.SEND_FLUSH
    | _TF.SEND_FUA
    | _TF.SEND_TRIM
    | _TF.SEND_WRITE_ZEROES
    | _TF.SEND_DF
    | _TF.SEND_CACHE
    | _TF.SEND_FAST_ZERO
)
SIZE = 1 << 20
MAX = 1 << 16
FULL = Session(SIZE, ALL, structured_replies=True, base_allocation=True, max_payload=MAX)
RO = dataclasses.replace(FULL, flags=ALL | _TF.READ_ONLY)
SIMPLE = dataclasses.replace(FULL, structured_replies=False, base_allocation=False)
NO_META = dataclasses.replace(FULL, base_allocation=False)
BARE = dataclasses.replace(FULL, flags=_TF.HAS_FLAGS)
ALIGNED = dataclasses.replace(FULL, min_block=512)
RANGED = (READ, WRITE, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS)
E = None  # no error: the device may serve it

CASES = [
    # session, command, flags, offset, length, expected
    *[(FULL, c, 0, 0, 512, E) for c in RANGED],
    (FULL, FLUSH, 0, 0, 0, E),
    (FULL, FLUSH, 0, 0, 1, EINVAL),
    (FULL, FLUSH, 0, 512, 0, EINVAL),
    # read-only: permission comes first, even out of range
    (RO, WRITE, 0, 0, 512, EPERM),
    (RO, TRIM, 0, 0, 512, EPERM),
    (RO, WRITE_ZEROES, 0, 0, 512, EPERM),
    (RO, WRITE, 0, SIZE, 512, EPERM),
    (RO, READ, 0, 0, 512, E),
    (RO, FLUSH, 0, 0, 0, E),
    # ranges
    *[(FULL, c, 0, SIZE - 512, 512, E) for c in RANGED],
    (FULL, WRITE, 0, SIZE - 511, 512, ENOSPC),
    (FULL, WRITE_ZEROES, 0, SIZE, 1, ENOSPC),
    (FULL, READ, 0, SIZE - 511, 512, EINVAL),
    (FULL, TRIM, 0, SIZE, 1, EINVAL),
    (FULL, CACHE, 0, 0, SIZE + 1, EINVAL),
    (FULL, BLOCK_STATUS, 0, SIZE, 1, EINVAL),
    # offset + length overflowing 64 bits must not wrap around into range
    (FULL, READ, 0, 2**64 - 1, 512, EINVAL),
    (FULL, WRITE, 0, 2**64 - 256, 512, ENOSPC),
    (FULL, TRIM, 0, 2**64 - 1, 2**32 - 1, EINVAL),
    (FULL, WRITE_ZEROES, 0, 2**63, 2**32 - 1, ENOSPC),
    # zero length (unspecified by the spec; refused)
    (FULL, READ, 0, 0, 0, EINVAL),
    (FULL, TRIM, 0, 0, 0, EINVAL),
    (FULL, CACHE, 0, 0, 0, EINVAL),
    (FULL, BLOCK_STATUS, 0, 0, 0, EINVAL),
    # unknown commands and flags
    (FULL, 8, 0, 0, 512, EINVAL),
    (FULL, 9, 0, 0, 0, EINVAL),
    (FULL, 0xFFFF, 0, 0, 512, EINVAL),
    (FULL, READ, 1 << 5, 0, 512, EINVAL),
    (FULL, WRITE, 1 << 15, 0, 512, EINVAL),
    (FULL, FLUSH, 1 << 7, 0, 0, EINVAL),
    # flags that belong to another command
    (FULL, WRITE, F_NO_HOLE, 0, 512, EINVAL),
    (FULL, TRIM, F_FAST_ZERO, 0, 512, EINVAL),
    (FULL, WRITE, F_DF, 0, 512, EINVAL),
    (FULL, BLOCK_STATUS, F_DF, 0, 512, EINVAL),
    (FULL, READ, F_REQ_ONE, 0, 512, EINVAL),
    (FULL, WRITE_ZEROES, F_REQ_ONE, 0, 512, EINVAL),
    (FULL, WRITE_ZEROES, F_NO_HOLE | F_FAST_ZERO | F_FUA, 0, 512, E),
    (FULL, READ, F_DF, 0, 512, E),
    (FULL, BLOCK_STATUS, F_REQ_ONE, 0, 512, E),
    # FUA goes with any command, but only when advertised
    *[(FULL, c, F_FUA, 0, 512, E) for c in (READ, WRITE, TRIM, WRITE_ZEROES)],
    (FULL, FLUSH, F_FUA, 0, 0, E),
    (dataclasses.replace(FULL, flags=ALL & ~_TF.SEND_FUA), WRITE, F_FUA, 0, 512, EINVAL),
    (BARE, READ, F_FUA, 0, 512, EINVAL),
    # DF needs structured replies; FAST_ZERO needs SEND_FAST_ZERO
    (SIMPLE, READ, F_DF, 0, 512, EINVAL),
    (
        dataclasses.replace(FULL, flags=ALL & ~_TF.SEND_FAST_ZERO),
        WRITE_ZEROES,
        F_FAST_ZERO,
        0,
        512,
        EINVAL,
    ),
    # payload limits apply to READ and WRITE only
    (FULL, READ, 0, 0, MAX, E),
    (FULL, WRITE, 0, 0, MAX, E),
    (FULL, READ, 0, 0, MAX + 1, EINVAL),
    (FULL, WRITE, 0, 0, MAX + 1, EINVAL),
    (FULL, TRIM, 0, 0, MAX + 1, E),
    (FULL, WRITE_ZEROES, 0, 0, SIZE, E),
    (FULL, BLOCK_STATUS, 0, 0, SIZE, E),
    # commands that were not advertised
    (BARE, FLUSH, 0, 0, 0, EINVAL),
    (BARE, TRIM, 0, 0, 512, EINVAL),
    (BARE, WRITE_ZEROES, 0, 0, 512, EINVAL),
    (BARE, CACHE, 0, 0, 512, EINVAL),
    (BARE, READ, 0, 0, 512, E),
    (BARE, WRITE, 0, 0, 512, E),
    # block status needs base:allocation selected
    (NO_META, BLOCK_STATUS, 0, 0, 512, EINVAL),
    (SIMPLE, BLOCK_STATUS, 0, 0, 512, EINVAL),
    # minimum block size
    (ALIGNED, READ, 0, 512, 1024, E),
    (ALIGNED, READ, 0, 100, 512, EINVAL),
    (ALIGNED, WRITE, 0, 0, 100, EINVAL),
    (ALIGNED, TRIM, 0, 1, 512, EINVAL),
    (ALIGNED, WRITE_ZEROES, 0, 512, 513, EINVAL),
    (ALIGNED, FLUSH, 0, 0, 0, E),
]


_NAMES = {
    id(FULL): "full",
    id(RO): "ro",
    id(SIMPLE): "simple",
    id(NO_META): "nometa",
    id(BARE): "bare",
    id(ALIGNED): "aligned",
}


def _case_id(case: tuple[Session, int, int, int, int, int | None]) -> str:
    session, command, flags, offset, length, expected = case
    return (
        f"{_NAMES.get(id(session), 'custom')}-c{command}-f{flags:#x}-{offset}+{length}-{expected}"
    )


@pytest.mark.parametrize(
    ("session", "command", "flags", "offset", "length", "expected"),
    CASES,
    ids=[_case_id(case) for case in CASES],
)
def test_check(
    session: Session, command: int, flags: int, offset: int, length: int, expected: int | None
) -> None:
    assert check(session, command, flags, offset, length) == expected


@pytest.mark.parametrize("command", [WRITE, WRITE_ZEROES])
def test_zero_length_writes_are_refused(command: int) -> None:
    assert check(FULL, command, 0, 0, 0) in (EINVAL, ENOSPC)
