"""The transports under cancellation and concurrent senders (found in the review of issue 14).

A receive that is cancelled (an ``--idle-timeout`` deadline, a stop) must either return what
it took off the socket or take nothing: its scheduler checkpoint once came after the bytes
were taken, so a deadline landing there dropped a request. And over TLS, a record the
receive side produces (an alert refusing a renegotiation, say) must not go out in the middle
of a record a task is still sending. Real sockets and real TLS throughout.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from usbd.core._tls import TLSTransport, server_context
from usbd.core._transport import CHECKPOINT_EVERY, SocketTransport
from usbd.core.testing.certs import Certificates, make_certificates


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("pki"))


def _client_context(directory: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=directory / "ca-cert.pem")


@asynccontextmanager
async def pair(
    tls: Certificates | None,
) -> AsyncIterator[tuple[SocketTransport, trio.abc.Stream]]:
    """A server transport and the client's stream over a socketpair, TLS set up if asked."""
    ours, theirs = socket.socketpair()
    transport: SocketTransport
    client: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
    if tls is None:
        transport = SocketTransport(ours)
    else:
        transport = TLSTransport(ours, server_context(tls.server, verify_peer=False))
        client = trio.SSLStream(client, _client_context(tls.client), server_hostname="localhost")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.handshake)  # type: ignore[attr-defined]
            nursery.start_soon(client.do_handshake)  # type: ignore[attr-defined]
    try:
        yield transport, client
    finally:
        transport.close()
        await trio.aclose_forcefully(client)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_cancelled_receive_returns_what_it_took_or_takes_nothing(
    tls: bool, certs: Certificates
) -> None:
    sent = os.urandom(10 * 3 * CHECKPOINT_EVERY)
    with trio.fail_after(30):
        async with pair(certs if tls else None) as (transport, client):
            await client.send_all(sent)
            got = bytearray()
            buffer = memoryview(bytearray(10))
            cancelled = 0
            for _ in range(3 * CHECKPOINT_EVERY + 3):  # every call under a cancelled scope
                with trio.CancelScope() as scope:
                    scope.cancel()
                    n = await transport.recv_into(buffer)
                    got += buffer[:n]
                cancelled += scope.cancelled_caught
            assert cancelled >= 2  # the checkpoints did come, cancelled
            while len(got) < len(sent):
                n = await transport.recv_into(buffer)
                assert n, "the stream ended short: a cancelled receive dropped bytes"
                got += buffer[:n]
            assert got == sent


async def test_tls_records_from_two_tasks_are_never_interleaved(certs: Certificates) -> None:
    """A task sends a reply bigger than the socket holds while the peer does not read; a
    record produced meanwhile by the receive side is sent after it, whole: the peer decrypts
    every byte (a record cut into another is a MAC failure there)."""
    reply = os.urandom(8 << 20)
    extra = b"x" * 100
    with trio.fail_after(60):
        async with pair(certs) as (transport, client):
            assert isinstance(transport, TLSTransport)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transport.send, [reply])
                await trio.sleep(0.2)  # the send is now waiting for the socket to drain
                # What a read that produced a record does (the receive loop's flush):
                transport._tls.write(extra)
                nursery.start_soon(transport._flush)
                got = bytearray()
                while len(got) < len(reply) + len(extra):
                    more = await client.receive_some(1 << 20)
                    assert more, "the server's TLS stream ended"
                    got += more
            at = got.find(extra)  # after the records already under way, whole
            assert at >= 0
            assert got[:at] + got[at + len(extra) :] == reply
