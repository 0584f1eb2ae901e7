"""Regressions from the fuzzers in fuzz/ (each the smallest form of a finding).

Every string NBD puts on the wire, error messages included, must be UTF-8 without NUL and
at most 4096 bytes long (the specification's "Conventions"). A client that sends READs and
never reads the replies must not make the server hold more than its in-flight budget.
"""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing
from core_helpers import (
    IHAVEOPT,
    OPT_INFO,
    READ,
    REP_ERR_UNKNOWN,
    MemDevice,
    ThreadedMemDevice,
    connected,
    info_data,
    option,
    request,
    wait_until,
)

from usbd.core import ExportInfo, Handshake, TransmissionFlag
from usbd.core._transmission import structured_error_reply


def _error_message(reply: bytes) -> bytes:
    """The message of a structured ERROR chunk, checked against its lengths."""
    _magic, _flags, _kind, _cookie, length = struct.unpack_from(">IHHQI", reply)
    _error, mlen = struct.unpack_from(">IH", reply, 20)
    assert length == 6 + mlen == len(reply) - 20
    return reply[26 : 26 + mlen]


def test_structured_error_message_cut_on_a_character_boundary() -> None:
    # fuzz transmission: the 4096-byte cut split a two-byte character (invalid UTF-8).
    message = "Z" * 4095 + "\u00e9"
    text = _error_message(structured_error_reply(1, 5, message))
    assert text.decode("utf-8") == "Z" * 4095
    assert len(text) <= 4096


def test_structured_error_message_has_no_nul() -> None:
    text = _error_message(structured_error_reply(1, 5, "device said \0 here"))
    assert b"\0" not in text
    assert text.decode("utf-8") == "device said   here"


def test_option_error_message_bounded_for_a_long_export_name() -> None:
    # fuzz handshake: an unknown 4000-byte name of control characters came back quoted
    # (repr escapes each as four characters) in a 16018-byte ERR_UNKNOWN message.
    disk = ExportInfo(name="disk", size=4096, flags=TransmissionFlag.HAS_FLAGS)
    hs = Handshake([disk], default_export="disk")
    hs.receive_data(struct.pack(">I", 3))
    out = hs.receive_data(option(OPT_INFO, info_data(b"\x01" * 4000)))
    magic, _opt, reply, length = struct.unpack_from(">QIII", out)
    assert magic != IHAVEOPT and reply == REP_ERR_UNKNOWN
    assert length == len(out) - 20 <= 4096
    out[20:].decode("utf-8")


@pytest.mark.parametrize("device_type", [MemDevice, ThreadedMemDevice])
async def test_replies_for_a_peer_that_does_not_read_stay_within_the_budget(
    device_type: type[MemDevice],
) -> None:
    # fuzz/netfuzz.py against usbd-filedisk: 64 READs of 1 MiB a connection, replies never
    # read, and the daemon grew to 7 GiB; one such client made it hold 400 MiB. Both paths
    # (the inline batch, tasks for a blocking device) read every request and queued every
    # reply behind the blocked send; now queued replies count against max_in_flight.
    mib = 1 << 20
    device = device_type(8 * mib)
    connection, client = connected(device, max_in_flight=2 * mib)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.serve)
        with trio.fail_after(30):
            await client.send(b"".join(request(READ, i, i % 7 * mib, mib) for i in range(100)))
            # Stuck: a send the client does not take, no task running.
            await wait_until(lambda: connection._sending and not connection._tasks)
            await trio.testing.wait_all_tasks_blocked()
            reads = device.calls.count("read")
            # The budget, and what the socket's buffers took before the send blocked.
            assert 2 <= reads < 20, reads
        await client.stream.aclose()  # the send fails: the connection ends
