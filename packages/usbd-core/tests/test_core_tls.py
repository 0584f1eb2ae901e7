"""TLS: NBD_OPT_STARTTLS in the sans-IO handshake (the spec's NOTLS, SELECTIVETLS-with-all-
exports-optional and FORCEDTLS modes), and the server context built from nbdkit's layout.

The TLS transport itself, and the server upgrading a connection, are tested against a real
TLS client (the standard library's, over a socket) in test_core_tls_transport.py; the real NBD
clients in tests/interop/test_tls.py.
"""

from __future__ import annotations

import struct

import pytest
from core_helpers import (
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META,
    OPT_SET_META,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META,
    REP_SERVER,
    info_data,
    meta_data,
    option,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core_handshake import DISK, FIXED_NEWSTYLE, NO_ZEROES, OTHER, kinds, parse

from usbd.core import Handshake, ProtocolError
from usbd.core._handshake import TLSMode

REP_ERR_TLS_REQD = (1 << 31) + 5


def handshake(tls: TLSMode) -> Handshake:
    hs = Handshake([DISK, OTHER], default_export="disk", tls=tls)
    hs.start()
    assert hs.receive_data(struct.pack(">I", FIXED_NEWSTYLE | NO_ZEROES)) == b""
    return hs


def send(hs: Handshake, opt: int, data: bytes = b"") -> list[int]:
    replies = parse(hs.receive_data(option(opt, data)))
    assert all(r.option == opt for r in replies)
    return kinds(replies)


def upgrade(hs: Handshake) -> None:
    assert send(hs, OPT_STARTTLS) == [REP_ACK]
    assert hs.starttls
    hs.tls_started()
    assert hs.tls_active and not hs.starttls


def test_off_answers_starttls_err_unsup_and_never_tls_reqd() -> None:
    hs = handshake("off")
    assert send(hs, OPT_STARTTLS) == [REP_ERR_UNSUP]
    assert not hs.starttls
    assert send(hs, OPT_LIST) == [REP_SERVER, REP_SERVER, REP_ACK]
    assert send(hs, OPT_GO, info_data("disk")) == [REP_INFO, REP_ACK]
    assert hs.finished


@pytest.mark.parametrize("tls", ["on", "require"])
def test_starttls_is_acked_and_stops_the_handshake_until_tls_runs(tls: TLSMode) -> None:
    hs = handshake(tls)
    assert send(hs, OPT_STARTTLS) == [REP_ACK]
    assert hs.starttls and not hs.tls_active and not hs.finished
    with pytest.raises(RuntimeError, match="TLS"):
        hs.receive_data(option(OPT_LIST))
    hs.tls_started()
    assert send(hs, OPT_LIST) == [REP_SERVER, REP_SERVER, REP_ACK]
    assert send(hs, OPT_GO, info_data("other")) == [REP_INFO, REP_ACK]
    assert hs.result is not None and hs.result.export == OTHER


@pytest.mark.parametrize("tls", ["on", "require"])
def test_starttls_with_data_is_err_invalid(tls: TLSMode) -> None:
    hs = handshake(tls)
    assert send(hs, OPT_STARTTLS, b"x") == [REP_ERR_INVALID]
    assert not hs.starttls
    upgrade(hs)


@pytest.mark.parametrize("tls", ["on", "require"])
def test_second_starttls_after_tls_is_err_invalid(tls: TLSMode) -> None:
    hs = handshake(tls)
    upgrade(hs)
    assert send(hs, OPT_STARTTLS) == [REP_ERR_INVALID]
    assert not hs.starttls
    assert send(hs, OPT_GO, info_data("disk")) == [REP_INFO, REP_ACK]


@pytest.mark.parametrize("tls", ["on", "require"])
def test_plaintext_after_starttls_before_the_tls_handshake_is_fatal(tls: TLSMode) -> None:
    # A man in the middle could append options to the client's STARTTLS (CVE-2021-3716).
    hs = handshake(tls)
    with pytest.raises(ProtocolError, match="after STARTTLS"):
        hs.receive_data(option(OPT_STARTTLS) + option(OPT_STRUCTURED_REPLY))


@pytest.mark.parametrize(
    ("opt", "data"),
    [
        (OPT_LIST, b""),
        (OPT_INFO, info_data("disk")),
        (OPT_GO, info_data("disk")),
        (OPT_STRUCTURED_REPLY, b""),
        (OPT_LIST_META, meta_data("disk", "base:allocation")),
        (OPT_SET_META, meta_data("disk", "base:allocation")),
        (4, b""),
        (99, b"junk"),
    ],
)
def test_require_refuses_every_option_before_starttls_with_tls_reqd(opt: int, data: bytes) -> None:
    hs = handshake("require")
    assert send(hs, opt, data) == [REP_ERR_TLS_REQD]
    assert not hs.finished and hs.result is None
    upgrade(hs)
    assert REP_ERR_TLS_REQD not in send(hs, opt, data)


def test_require_lets_abort_through() -> None:
    hs = handshake("require")
    assert send(hs, OPT_ABORT) == [REP_ACK]
    assert hs.finished and hs.result is None


def test_require_closes_on_export_name_before_tls() -> None:
    hs = handshake("require")
    with pytest.raises(ProtocolError, match="TLS"):
        hs.receive_data(option(OPT_EXPORT_NAME, b"disk"))
    assert hs.result is None


def test_require_serves_export_name_after_tls() -> None:
    hs = handshake("require")
    upgrade(hs)
    reply = hs.receive_data(option(OPT_EXPORT_NAME, b"disk"))
    assert reply == struct.pack(">QH", DISK.size, int(DISK.flags))
    assert hs.result is not None and hs.result.export == DISK


def test_on_serves_a_plaintext_client() -> None:
    hs = handshake("on")
    assert send(hs, OPT_STRUCTURED_REPLY) == [REP_ACK]
    assert send(hs, OPT_GO, info_data("disk")) == [REP_INFO, REP_ACK]
    assert hs.result is not None and hs.result.structured_replies
    assert not hs.tls_active


def test_no_negotiation_state_survives_starttls() -> None:
    # The spec: structured replies and meta contexts negotiated in plaintext are forgotten.
    hs = handshake("on")
    assert send(hs, OPT_STRUCTURED_REPLY) == [REP_ACK]
    assert send(hs, OPT_SET_META, meta_data("disk", "base:allocation")) == [REP_META, REP_ACK]
    upgrade(hs)
    assert send(hs, OPT_GO, info_data("disk")) == [REP_INFO, REP_ACK]
    assert hs.result is not None
    assert not hs.result.structured_replies
    assert not hs.result.base_allocation


def test_tls_started_without_starttls_is_a_bug() -> None:
    hs = handshake("on")
    with pytest.raises(RuntimeError):
        hs.tls_started()


_OPTIONS = st.sampled_from(
    [OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, 8, 9, 10, 11, 4, 77]
)
_DATA = st.one_of(
    st.just(b""),
    st.binary(max_size=24),
    st.builds(info_data, st.sampled_from(["disk", "other", ""]), st.integers(0, 3)),
    st.builds(meta_data, st.sampled_from(["disk", ""]), st.just("base:allocation")),
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["off", "on", "require"]),
    st.lists(st.tuples(_OPTIONS, _DATA), max_size=8),
    st.integers(1, 40),
)
def test_arbitrary_options_in_every_mode_keep_the_tls_rules(
    tls: TLSMode, options: list[tuple[int, bytes]], step: int
) -> None:
    """Whatever a client sends, in any mode: replies are whole, ERR_TLS_REQD only in require
    mode before TLS, an export only after TLS in require mode, STARTTLS acked only when TLS
    is on offer and not yet active; each acked STARTTLS is followed by tls_started."""
    hs = Handshake([DISK, OTHER], default_export="disk", tls=tls)
    data = struct.pack(">I", FIXED_NEWSTYLE | NO_ZEROES) + b"".join(
        option(o, d) for o, d in options
    )
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    try:
        for chunk in chunks:
            was_active = hs.tls_active
            out = hs.receive_data(chunk)
            if not hs.finished:
                for reply in parse(out):
                    if reply.reply == REP_ERR_TLS_REQD:
                        assert tls == "require" and not hs.tls_active
                    if reply.option == OPT_STARTTLS and reply.reply == REP_ACK:
                        assert tls != "off" and not was_active
            if hs.starttls:
                hs.tls_started()
            if hs.finished:
                break
    except ProtocolError:
        return
    if hs.result is not None and tls == "require":
        assert hs.tls_active
