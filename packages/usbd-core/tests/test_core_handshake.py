"""The sans-IO handshake, byte for byte against the fixed-newstyle negotiation in the spec."""

from __future__ import annotations

import struct

import pytest
from core_helpers import (
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META,
    OPT_REPLY_MAGIC,
    OPT_SET_META,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META,
    REP_SERVER,
    OptionReply,
    info_data,
    meta_data,
    option,
    request,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from usbd.core import ExportInfo, Handshake, ProtocolError, TransmissionFlag

DISK = ExportInfo(
    name="disk",
    size=1 << 20,
    flags=TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH,
    description="a disk",
    min_block=512,
    preferred_block=8192,
    max_payload=1 << 22,
)
OTHER = ExportInfo(
    name="other", size=4096, flags=TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY
)
FIXED_NEWSTYLE, NO_ZEROES = 1, 2


def handshake(client_flags: int = FIXED_NEWSTYLE | NO_ZEROES) -> Handshake:
    """A handshake past the client flags, offering DISK (the default) and OTHER."""
    hs = Handshake([DISK, OTHER], default_export="disk")
    assert hs.receive_data(struct.pack(">I", client_flags)) == b""
    return hs


def parse(data: bytes) -> list[OptionReply]:
    """Split server output into option replies; it must consist of whole replies only."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, reply, length = struct.unpack_from(">QIII", data, pos)
        assert magic == OPT_REPLY_MAGIC
        pos += 20
        out.append(OptionReply(opt, reply, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def kinds(replies: list[OptionReply]) -> list[int]:
    return [r.reply for r in replies]


def exchange(hs: Handshake, opt: int, data: bytes = b"") -> list[OptionReply]:
    replies = parse(hs.receive_data(option(opt, data)))
    assert all(r.option == opt for r in replies)
    return replies


def info_types(replies: list[OptionReply]) -> list[int]:
    return [struct.unpack_from(">H", r.data)[0] for r in replies if r.reply == REP_INFO]


def go(hs: Handshake, name: str = "disk") -> None:
    replies = exchange(hs, OPT_GO, info_data(name))
    assert kinds(replies) == [REP_INFO, REP_ACK]
    assert hs.finished


# -- greeting and client flags -------------------------------------------------------------


def test_greeting_is_magic_ihaveopt_and_both_handshake_flags() -> None:
    greeting = Handshake([DISK]).start()
    assert greeting == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES)
    assert greeting[:8] == b"NBDMAGIC"
    assert greeting[8:16] == b"IHAVEOPT"


@pytest.mark.parametrize("flags", [0, FIXED_NEWSTYLE, NO_ZEROES, FIXED_NEWSTYLE | NO_ZEROES])
def test_known_client_flags_are_accepted_silently(flags: int) -> None:
    hs = handshake(flags)
    assert not hs.finished


@pytest.mark.parametrize("flags", [4, 1 << 31, 0xFFFFFFFF, FIXED_NEWSTYLE | 8])
def test_unknown_client_flags_are_fatal(flags: int) -> None:
    hs = Handshake([DISK])
    with pytest.raises(ProtocolError, match="flags"):
        hs.receive_data(struct.pack(">I", flags))


# -- EXPORT_NAME -----------------------------------------------------------------------------


def test_export_name_known_sends_size_flags_and_124_zeroes() -> None:
    hs = handshake(FIXED_NEWSTYLE)
    reply = hs.receive_data(option(OPT_EXPORT_NAME, b"other"))
    assert reply == struct.pack(">QH", 4096, int(OTHER.flags)) + bytes(124)
    assert hs.finished
    assert hs.result is not None
    assert hs.result.export == OTHER
    assert not hs.result.no_zeroes
    assert not hs.result.structured_replies


def test_export_name_with_no_zeroes_omits_the_padding() -> None:
    hs = handshake(FIXED_NEWSTYLE | NO_ZEROES)
    reply = hs.receive_data(option(OPT_EXPORT_NAME, b"disk"))
    assert reply == struct.pack(">QH", 1 << 20, int(DISK.flags))
    assert hs.result is not None
    assert hs.result.no_zeroes


def test_export_name_empty_selects_the_default_export() -> None:
    hs = handshake()
    reply = hs.receive_data(option(OPT_EXPORT_NAME, b""))
    assert reply[:8] == struct.pack(">Q", DISK.size)
    assert hs.result is not None
    assert hs.result.export.name == "disk"


def test_export_name_after_structured_reply_advertises_df() -> None:
    hs = handshake()
    assert kinds(exchange(hs, OPT_STRUCTURED_REPLY)) == [REP_ACK]
    reply = hs.receive_data(option(OPT_EXPORT_NAME, b"disk"))
    (flags,) = struct.unpack(">H", reply[8:10])
    assert flags == int(DISK.flags | TransmissionFlag.SEND_DF)


@pytest.mark.parametrize("name", [b"nope", b"\xff\xfe", b"disk\x00"])
def test_export_name_unknown_or_invalid_is_fatal(name: bytes) -> None:
    hs = handshake()
    with pytest.raises(ProtocolError):
        hs.receive_data(option(OPT_EXPORT_NAME, name))
    assert hs.result is None


# -- ABORT and LIST --------------------------------------------------------------------------


def test_abort_acks_and_finishes_without_result() -> None:
    hs = handshake()
    assert kinds(exchange(hs, OPT_ABORT)) == [REP_ACK]
    assert hs.finished
    assert hs.result is None
    with pytest.raises(RuntimeError):
        hs.receive_data(b"more")


def test_list_sends_each_export_then_ack() -> None:
    hs = handshake()
    replies = exchange(hs, OPT_LIST)
    assert kinds(replies) == [REP_SERVER, REP_SERVER, REP_ACK]
    assert replies[0].data == struct.pack(">I", 4) + b"disk" + b"a disk"
    assert replies[1].data == struct.pack(">I", 5) + b"other"
    assert replies[2].data == b""
    assert not hs.finished


def test_list_with_data_is_invalid_and_haggling_continues() -> None:
    hs = handshake()
    assert kinds(exchange(hs, OPT_LIST, b"x")) == [REP_ERR_INVALID]
    assert not hs.finished
    go(hs)


# -- INFO and GO -----------------------------------------------------------------------------


def test_info_answers_export_name_description_and_block_size() -> None:
    hs = handshake()
    requests = (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE)
    replies = exchange(hs, OPT_INFO, info_data("disk", *requests))
    assert kinds(replies) == [REP_INFO] * 4 + [REP_ACK]
    assert info_types(replies) == [INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]
    assert replies[0].data == struct.pack(">HQH", INFO_EXPORT, 1 << 20, int(DISK.flags))
    assert replies[1].data == struct.pack(">H", INFO_NAME) + b"disk"
    assert replies[2].data == struct.pack(">H", INFO_DESCRIPTION) + b"a disk"
    assert replies[3].data == struct.pack(">HIII", INFO_BLOCK_SIZE, 512, 8192, 1 << 22)
    assert not hs.finished  # INFO only informs
    assert hs.result is None


def test_info_repeated_and_unknown_requests_are_answered_once_or_ignored() -> None:
    hs = handshake()
    replies = exchange(hs, OPT_INFO, info_data("disk", INFO_NAME, 99, INFO_NAME))
    assert info_types(replies) == [INFO_EXPORT, INFO_NAME]


def test_info_without_description_sends_none() -> None:
    hs = handshake()
    replies = exchange(hs, OPT_INFO, info_data("other", INFO_DESCRIPTION))
    assert info_types(replies) == [INFO_EXPORT]


def test_go_finishes_with_the_named_export() -> None:
    hs = handshake()
    replies = exchange(hs, OPT_GO, info_data("other", INFO_BLOCK_SIZE))
    assert kinds(replies) == [REP_INFO, REP_INFO, REP_ACK]
    assert replies[1].data == struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, 32 << 20)
    assert hs.finished
    assert hs.result is not None
    assert hs.result.export == OTHER
    assert hs.result.flags == OTHER.flags


def test_go_with_empty_name_selects_default() -> None:
    hs = handshake()
    replies = exchange(hs, OPT_GO, info_data(""))
    assert kinds(replies) == [REP_INFO, REP_ACK]
    assert hs.result is not None
    assert hs.result.export == DISK


@pytest.mark.parametrize("opt", [OPT_INFO, OPT_GO])
def test_info_and_go_unknown_export_is_err_unknown_and_haggling_continues(opt: int) -> None:
    hs = handshake()
    assert kinds(exchange(hs, opt, info_data("missing"))) == [REP_ERR_UNKNOWN]
    assert not hs.finished
    go(hs, "other")
    assert hs.result is not None
    assert hs.result.export == OTHER


MALFORMED = {
    "empty": b"",
    "truncated name": struct.pack(">I", 10) + b"dis",
    "no request count": struct.pack(">I", 4) + b"disk",
    "truncated requests": info_data("disk")[:-2] + struct.pack(">HH", 2, INFO_NAME),
    "trailing bytes": info_data("disk", INFO_NAME) + b"\x00",
    "name too long": info_data("d" * 4097),
    "invalid utf-8": info_data(b"\xc3\x28"),
}


@pytest.mark.parametrize("opt", [OPT_INFO, OPT_GO])
@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_info_and_go_data_is_err_invalid(opt: int, data: bytes) -> None:
    hs = handshake()
    assert kinds(exchange(hs, opt, data)) == [REP_ERR_INVALID]
    assert not hs.finished
    go(hs)


def test_name_of_exactly_4096_bytes_is_well_formed() -> None:
    hs = handshake()
    # Well-formed, just not an export we have.
    assert kinds(exchange(hs, OPT_INFO, info_data("d" * 4096))) == [REP_ERR_UNKNOWN]


# -- unsupported options and STRUCTURED_REPLY ---------------------------------------------


@pytest.mark.parametrize("opt", [OPT_STARTTLS, 4, 11, 12, 99, 0, 0xFFFFFFFF])
def test_unknown_options_and_starttls_are_err_unsup(opt: int) -> None:
    hs = handshake()
    assert kinds(exchange(hs, opt, b"some data")) == [REP_ERR_UNSUP]
    assert not hs.finished
    go(hs)


def test_structured_reply_is_acked_and_negotiated() -> None:
    hs = handshake()
    assert kinds(exchange(hs, OPT_STRUCTURED_REPLY)) == [REP_ACK]
    replies = exchange(hs, OPT_GO, info_data("disk"))
    assert replies[0].data == struct.pack(
        ">HQH", INFO_EXPORT, 1 << 20, int(DISK.flags | TransmissionFlag.SEND_DF)
    )
    assert hs.result is not None
    assert hs.result.structured_replies
    assert hs.result.flags & TransmissionFlag.SEND_DF


def test_structured_reply_with_data_is_invalid_and_not_negotiated() -> None:
    hs = handshake()
    assert kinds(exchange(hs, OPT_STRUCTURED_REPLY, b"\x00")) == [REP_ERR_INVALID]
    go(hs)
    assert hs.result is not None
    assert not hs.result.structured_replies
    assert not hs.result.flags & TransmissionFlag.SEND_DF


# -- meta contexts ---------------------------------------------------------------------------


def meta_names(replies: list[OptionReply]) -> list[str]:
    return [r.data[4:].decode() for r in replies if r.reply == REP_META]


@pytest.mark.parametrize(
    ("queries", "listed"),
    [
        (("base:allocation",), ["base:allocation"]),
        (("base:",), ["base:allocation"]),
        ((), ["base:allocation"]),
        (("qemu:dirty-bitmap:x",), []),
        (("qemu:", "base:allocation", "x:y"), ["base:allocation"]),
        (("base:other",), []),
    ],
)
def test_list_meta_context(queries: tuple[str, ...], listed: list[str]) -> None:
    hs = handshake()
    replies = exchange(hs, OPT_LIST_META, meta_data("disk", *queries))
    assert meta_names(replies) == listed
    assert replies[-1].reply == REP_ACK
    assert not hs.finished


def test_list_meta_context_unknown_export_is_err_unknown() -> None:
    hs = handshake()
    assert kinds(exchange(hs, OPT_LIST_META, meta_data("missing"))) == [REP_ERR_UNKNOWN]
    go(hs)


def test_set_meta_context_selects_base_allocation() -> None:
    hs = handshake()
    exchange(hs, OPT_STRUCTURED_REPLY)
    replies = exchange(hs, OPT_SET_META, meta_data("disk", "x:y", "base:allocation"))
    assert kinds(replies) == [REP_META, REP_ACK]
    (context_id,) = struct.unpack_from(">I", replies[0].data)
    assert context_id != 0
    assert meta_names(replies) == ["base:allocation"]
    go(hs, "disk")
    assert hs.result is not None
    assert hs.result.base_allocation


def test_set_meta_context_before_structured_reply_is_invalid() -> None:
    hs = handshake()
    replies = exchange(hs, OPT_SET_META, meta_data("disk", "base:allocation"))
    assert kinds(replies) == [REP_ERR_INVALID]
    exchange(hs, OPT_STRUCTURED_REPLY)
    go(hs)
    assert hs.result is not None
    assert not hs.result.base_allocation


@pytest.mark.parametrize("queries", [(), ("base:",), ("qemu:dirty-bitmap:x",)])
def test_set_meta_context_that_matches_nothing_selects_nothing(queries: tuple[str, ...]) -> None:
    hs = handshake()
    exchange(hs, OPT_STRUCTURED_REPLY)
    assert kinds(exchange(hs, OPT_SET_META, meta_data("disk", *queries))) == [REP_ACK]
    go(hs)
    assert hs.result is not None
    assert not hs.result.base_allocation


def test_later_set_meta_context_replaces_the_earlier_one() -> None:
    hs = handshake()
    exchange(hs, OPT_STRUCTURED_REPLY)
    exchange(hs, OPT_SET_META, meta_data("disk", "base:allocation"))
    exchange(hs, OPT_SET_META, meta_data("disk"))
    go(hs)
    assert hs.result is not None
    assert not hs.result.base_allocation


def test_go_for_another_export_than_set_meta_context_drops_base_allocation() -> None:
    hs = handshake()
    exchange(hs, OPT_STRUCTURED_REPLY)
    exchange(hs, OPT_SET_META, meta_data("disk", "base:allocation"))
    go(hs, "other")
    assert hs.result is not None
    assert hs.result.structured_replies
    assert not hs.result.base_allocation


def test_set_meta_context_unknown_export_is_err_unknown() -> None:
    hs = handshake()
    exchange(hs, OPT_STRUCTURED_REPLY)
    replies = exchange(hs, OPT_SET_META, meta_data("missing", "base:allocation"))
    assert kinds(replies) == [REP_ERR_UNKNOWN]
    go(hs)
    assert hs.result is not None
    assert not hs.result.base_allocation


@pytest.mark.parametrize(
    "data",
    [meta_data("missing", "base:allocation"), b"\x00"],
    ids=["unknown export", "malformed"],
)
def test_failed_set_meta_context_still_clears_the_earlier_selection(data: bytes) -> None:
    hs = handshake()
    exchange(hs, OPT_STRUCTURED_REPLY)
    exchange(hs, OPT_SET_META, meta_data("disk", "base:allocation"))
    assert kinds(exchange(hs, OPT_SET_META, data))[-1] in (REP_ERR_UNKNOWN, REP_ERR_INVALID)
    go(hs)
    assert hs.result is not None
    assert not hs.result.base_allocation


@pytest.mark.parametrize("opt", [OPT_LIST_META, OPT_SET_META])
@pytest.mark.parametrize(
    "data",
    [
        b"",
        struct.pack(">I", 4) + b"disk",  # no query count
        meta_data("disk", "base:allocation")[:-1],  # truncated query
        meta_data("disk") + b"!",  # trailing
        struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 5000) + b"q" * 5000,
        struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 2) + b"\xff\xff",
    ],
    ids=["empty", "no count", "truncated", "trailing", "long query", "bad utf-8"],
)
def test_malformed_meta_context_data_is_err_invalid(opt: int, data: bytes) -> None:
    hs = handshake()
    exchange(hs, OPT_STRUCTURED_REPLY)
    assert kinds(exchange(hs, opt, data)) == [REP_ERR_INVALID]
    go(hs)


# -- framing ---------------------------------------------------------------------------------


def test_bad_option_magic_is_fatal() -> None:
    hs = handshake()
    with pytest.raises(ProtocolError, match="magic"):
        hs.receive_data(option(OPT_LIST, magic=IHAVEOPT ^ 1))


def test_over_long_option_is_fatal_before_its_data_arrives() -> None:
    hs = handshake()
    header = struct.pack(">QII", IHAVEOPT, OPT_INFO, 64 * 1024 + 1)
    with pytest.raises(ProtocolError, match="too long"):
        hs.receive_data(header)


def test_longest_allowed_option_is_answered() -> None:
    hs = handshake()
    assert kinds(exchange(hs, 99, bytes(64 * 1024))) == [REP_ERR_UNSUP]


SCRIPT = (
    struct.pack(">I", FIXED_NEWSTYLE | NO_ZEROES)
    + option(OPT_LIST)
    + option(99, b"junk")
    + option(OPT_INFO, info_data("other", INFO_NAME, INFO_BLOCK_SIZE))
    + option(OPT_STRUCTURED_REPLY)
    + option(OPT_LIST_META, meta_data("disk", "base:"))
    + option(OPT_SET_META, meta_data("disk", "base:allocation"))
    + option(OPT_GO, info_data("disk", INFO_DESCRIPTION))
)
TRAILER = request(0, 1, 0, 512) + request(1, 2, 0, 4)[:10]


def test_one_byte_at_a_time_gives_the_same_output_as_all_at_once() -> None:
    whole = Handshake([DISK, OTHER])
    out_whole = whole.receive_data(SCRIPT + TRAILER)
    piecewise = Handshake([DISK, OTHER])
    out_pieces = b""
    data = SCRIPT + TRAILER
    for i in range(len(data)):
        out_pieces += piecewise.receive_data(data[i : i + 1])
        if piecewise.finished:
            rest = data[i + 1 :]
            break
    assert out_pieces == out_whole
    assert kinds(parse(out_whole)) == [
        REP_SERVER,
        REP_SERVER,
        REP_ACK,
        REP_ERR_UNSUP,
        REP_INFO,
        REP_INFO,
        REP_INFO,
        REP_ACK,
        REP_ACK,
        REP_META,
        REP_ACK,
        REP_META,
        REP_ACK,
        REP_INFO,
        REP_INFO,
        REP_ACK,
    ]
    assert whole.result == piecewise.result
    assert whole.result is not None
    assert whole.result.base_allocation
    assert whole.leftover == TRAILER
    assert piecewise.leftover == b""  # fed one byte at a time, nothing was left over
    assert rest == TRAILER


def test_bytes_after_go_are_kept_as_leftover() -> None:
    hs = handshake()
    hs.receive_data(option(OPT_GO, info_data("disk")) + TRAILER)
    assert hs.finished
    assert hs.leftover == TRAILER


def test_bytes_after_export_name_are_kept_as_leftover() -> None:
    hs = handshake()
    hs.receive_data(option(OPT_EXPORT_NAME, b"disk") + b"\x25\x60")
    assert hs.leftover == b"\x25\x60"


def test_bytes_after_abort_are_kept_not_parsed() -> None:
    hs = handshake()
    hs.receive_data(option(OPT_ABORT) + option(OPT_LIST))
    assert hs.result is None
    assert hs.leftover == option(OPT_LIST)


# -- fuzzing ---------------------------------------------------------------------------------


def feed(chunks: list[bytes]) -> None:
    """Feed chunks until the handshake ends; the only acceptable failure is ProtocolError."""
    hs = Handshake([DISK, OTHER], default_export="disk")
    try:
        for chunk in chunks:
            out = hs.receive_data(chunk)
            assert isinstance(out, bytes)
            if out and not hs.finished:
                parse(out)
            if hs.finished:
                break
    except ProtocolError:
        return


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_give_output_or_protocol_error(chunks: list[bytes]) -> None:
    feed(chunks)


_OPTIONS = st.sampled_from(
    [OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, 8, 9, 10, 11, 4, 77]
)
_DATA = st.one_of(
    st.binary(max_size=40),
    st.builds(
        info_data,
        st.sampled_from(["disk", "other", "", "x"]),
        st.integers(0, 5),
        st.integers(0, 5),
    ),
    st.builds(meta_data, st.sampled_from(["disk", "other", ""]), st.text(max_size=20)),
)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 3),
    st.lists(st.tuples(_OPTIONS, _DATA), max_size=6),
    st.integers(1, 50),
)
def test_well_framed_arbitrary_options_give_output_or_protocol_error(
    flags: int, options: list[tuple[int, bytes]], step: int
) -> None:
    data = struct.pack(">I", flags) + b"".join(option(o, d) for o, d in options)
    feed([data[i : i + step] for i in range(0, len(data), step)])
