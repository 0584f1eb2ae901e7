"""The TLS transport and the server's upgrade, over real sockets against the standard
library's TLS client (trio.SSLStream on the client side), with certificates made per test
session; and the start-up checks of the certificate directory.

The real NBD clients (libnbd, qemu) are in tests/interop/test_tls.py.
"""

from __future__ import annotations

import logging
import os
import ssl
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from core_helpers import (
    OPT_GO,
    OPT_LIST,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_UNSUP,
    Closed,
    MemDevice,
    RawClient,
    info_data,
    option,
)
from cryptography.hazmat.primitives import serialization

from usbd.core import Export, Server, open_tcp_listeners, open_unix_listener
from usbd.core._tls import (
    PSK_SUPPORTED,
    ServerTLS,
    TLSConfigError,
    read_psk_file,
    server_context,
    server_tls,
)
from usbd.core.testing.certs import Certificates, make_certificates

REP_ERR_TLS_REQD = (1 << 31) + 5
MiB = 1 << 20


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("pki"))


def client_context(directory: Path, *, with_certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=directory / "ca-cert.pem")
    if with_certificate and (directory / "client-cert.pem").exists():
        context.load_cert_chain(directory / "client-cert.pem", directory / "client-key.pem")
    return context


Connect = Callable[[], Awaitable[RawClient]]


@asynccontextmanager
async def tls_serving(
    export: Export, where: str | None, tls: ServerTLS, handshake_timeout: float = 30.0
) -> AsyncIterator[Connect]:
    server = Server([export], tls=tls, handshake_timeout=handshake_timeout)
    if where is None:
        listeners = await open_tcp_listeners("127.0.0.1", 0)
    else:
        listeners = [await open_unix_listener(where)]
    clients: list[RawClient] = []
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve, listeners)
        address = bound[0].socket.getsockname()

        async def connect() -> RawClient:
            if isinstance(address, str):
                client = await RawClient.unix(address)
            else:
                client = await RawClient.tcp(address[1])
            clients.append(client)
            return client

        try:
            yield connect
        finally:
            for client in clients:
                await trio.aclose_forcefully(client.stream)
            nursery.cancel_scope.cancel()


async def starttls(client: RawClient, context: ssl.SSLContext) -> None:
    """STARTTLS, then the TLS handshake on the client's side; the client speaks TLS after."""
    await client.send(option(OPT_STARTTLS))
    assert (await client.option_reply()).reply == REP_ACK
    assert not client._buf
    stream = trio.SSLStream(client.stream, context, server_hostname="localhost")
    await stream.do_handshake()
    client.stream = stream


def require(certs: Certificates, *, verify_peer: bool = False) -> ServerTLS:
    return ServerTLS("require", server_context(certs.server, verify_peer=verify_peer))


async def test_bulk_data_round_trips_over_tls(certs: Certificates, where: str | None) -> None:
    device = MemDevice(16 * MiB)
    with trio.fail_after(60):
        async with tls_serving(Export(device), where, require(certs)) as connect:
            client = await connect()
            await client.greeting()
            await starttls(client, client_context(certs.client))
            await client.go(greet=False)
            data = os.urandom(8 * MiB + 12345)  # many records, the last one partial
            assert await client.write(4096, data) == 0
            assert bytes(device.data[4096 : 4096 + len(data)]) == data
            assert await client.read(4096, len(data)) == data
            # Pipelined small requests: replies batched into few records.
            for i in range(64):
                await client.send(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, i * 512, 512))
            for i in range(64):
                error, cookie = await client.simple_reply()
                assert (error, cookie) == (0, i)
                assert await client.recv_exactly(512) == device.data[i * 512 : (i + 1) * 512]
            await client.aclose()


async def test_a_tls_12_client_is_served_too(certs: Certificates) -> None:
    device = MemDevice(4 * MiB)
    context = client_context(certs.client)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with trio.fail_after(30):
        async with tls_serving(Export(device), None, require(certs)) as connect:
            client = await connect()
            await client.greeting()
            await starttls(client, context)
            assert isinstance(client.stream, trio.SSLStream)
            assert client.stream.version() == "TLSv1.2"
            await client.go(greet=False)
            data = os.urandom(3 * MiB)
            assert await client.write(0, data) == 0
            assert await client.read(0, len(data)) == data


async def test_require_refuses_plaintext_options_then_serves_after_starttls(
    certs: Certificates,
) -> None:
    device = MemDevice()
    with trio.fail_after(30):
        async with tls_serving(Export(device), None, require(certs)) as connect:
            client = await connect()
            await client.greeting()
            for opt, data in ((OPT_LIST, b""), (OPT_GO, info_data(""))):
                await client.send(option(opt, data))
                assert (await client.option_reply()).reply == REP_ERR_TLS_REQD
            # Structured replies asked for in plaintext do not survive the upgrade.
            await client.send(option(OPT_STRUCTURED_REPLY))
            assert (await client.option_reply()).reply == REP_ERR_TLS_REQD
            await starttls(client, client_context(certs.client))
            await client.go(greet=False)
            assert await client.write(0, b"secret") == 0
            assert await client.read(0, 6) == b"secret"


async def test_on_serves_plaintext_and_tls_clients(certs: Certificates) -> None:
    device = MemDevice()
    tls = ServerTLS("on", server_context(certs.server))
    with trio.fail_after(30):
        async with tls_serving(Export(device), None, tls) as connect:
            plain = await connect()
            await plain.go()
            assert await plain.write(0, b"plain") == 0
            secure = await connect()
            await secure.greeting()
            await starttls(secure, client_context(certs.anonymous))
            await secure.go(greet=False)
            assert await secure.read(0, 5) == b"plain"


async def test_server_without_tls_answers_starttls_unsupported() -> None:
    device = MemDevice()
    with trio.fail_after(30):
        server = Server([Export(device)])
        listeners = await open_tcp_listeners("127.0.0.1", 0)
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(server.serve, listeners)
            client = await RawClient.tcp(bound[0].socket.getsockname()[1])
            await client.greeting()
            await client.send(option(OPT_STARTTLS))
            assert (await client.option_reply()).reply == REP_ERR_UNSUP
            await client.go(greet=False)
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_verify_peer_refuses_clients_without_a_certificate_of_its_ca(
    certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="usbd")  # however the server rate-limits them
    device = MemDevice()
    with trio.fail_after(30):
        async with tls_serving(Export(device), None, require(certs, verify_peer=True)) as connect:
            anonymous = await connect()
            await anonymous.greeting()
            with pytest.raises((trio.BrokenResourceError, Closed)):
                await starttls(anonymous, client_context(certs.anonymous))
                # TLS 1.3: the client learns of the refusal on its first read.
                await anonymous.go(greet=False)
            intruder = await connect()
            await intruder.greeting()
            context = client_context(certs.wrong_ca)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # even if it does not check the server
            with pytest.raises((trio.BrokenResourceError, Closed)):
                await starttls(intruder, context)
                await intruder.go(greet=False)
            client = await connect()
            await client.greeting()
            await starttls(client, client_context(certs.client))
            await client.go(greet=False)
            assert device.calls == []  # nobody else got as far as a request
            assert await client.write(0, b"ok") == 0
    refusals = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(refusals) == 2, refusals
    assert "peer did not return a certificate" in refusals[0]
    assert "certificate verify failed" in refusals[1]


async def test_verify_peer_refuses_a_revoked_certificate_listed_in_ca_crl(
    certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="usbd")
    tls = ServerTLS("require", server_context(certs.server_crl, verify_peer=True))
    with trio.fail_after(30):
        async with tls_serving(Export(MemDevice()), None, tls) as connect:
            revoked = await connect()
            await revoked.greeting()
            with pytest.raises((trio.BrokenResourceError, Closed)):
                await starttls(revoked, client_context(certs.revoked))
                await revoked.go(greet=False)
            client = await connect()  # not revoked: served
            await client.greeting()
            await starttls(client, client_context(certs.client))
            await client.go(greet=False)
    assert any("certificate revoked" in r.getMessage() for r in caplog.records)


async def test_client_of_another_ca_refuses_the_server(certs: Certificates) -> None:
    with trio.fail_after(30):
        async with tls_serving(Export(MemDevice()), None, require(certs)) as connect:
            client = await connect()
            await client.greeting()
            with pytest.raises(trio.BrokenResourceError) as info:
                await starttls(client, client_context(certs.wrong_ca))
            assert "CERTIFICATE_VERIFY_FAILED" in repr(info.value.__cause__)


async def test_plaintext_after_starttls_closes_the_connection(certs: Certificates) -> None:
    with trio.fail_after(30):
        async with tls_serving(Export(MemDevice()), None, require(certs)) as connect:
            client = await connect()
            await client.greeting()
            await client.send(option(OPT_STARTTLS) + option(OPT_GO, info_data("")))
            assert await client.closed_by_server()


async def test_tls_handshake_runs_under_the_handshake_deadline(certs: Certificates) -> None:
    with trio.fail_after(30):
        async with tls_serving(
            Export(MemDevice()), None, require(certs), handshake_timeout=0.5
        ) as connect:
            client = await connect()
            await client.greeting()
            await client.send(option(OPT_STARTTLS))
            assert (await client.option_reply()).reply == REP_ACK
            # ... and never starts TLS: the server hangs up.
            assert await client.closed_by_server()


async def test_garbage_instead_of_a_client_hello_closes_the_connection(
    certs: Certificates,
) -> None:
    with trio.fail_after(30):
        async with tls_serving(Export(MemDevice()), None, require(certs)) as connect:
            client = await connect()
            await client.greeting()
            await client.send(option(OPT_STARTTLS))
            assert (await client.option_reply()).reply == REP_ACK
            await client.send(b"GET / HTTP/1.0\r\n\r\n" * 4)
            await client.closed_by_server()
            ok = await connect()
            await ok.greeting()
            await starttls(ok, client_context(certs.client))
            await ok.go(greet=False)


# -- start-up checks -----------------------------------------------------------------------


def test_context_is_tls12_or_later_and_asks_no_certificate_by_default(certs: Certificates) -> None:
    context = server_context(certs.server)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    assert server_context(certs.server, verify_peer=True).verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("missing", ["server-cert.pem", "server-key.pem"])
def test_a_missing_file_names_the_flag_and_the_file(
    certs: Certificates, tmp_path: Path, missing: str
) -> None:
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        if name != missing:
            (tmp_path / name).write_bytes((certs.server / name).read_bytes())
    with pytest.raises(TLSConfigError, match=rf"^-tls-certificates: cannot read .*{missing}"):
        server_context(tmp_path)


def test_verify_peer_needs_the_ca(certs: Certificates, tmp_path: Path) -> None:
    for name in ("server-cert.pem", "server-key.pem"):
        (tmp_path / name).write_bytes((certs.server / name).read_bytes())
    server_context(tmp_path)  # fine without verifying clients
    with pytest.raises(TLSConfigError, match=r"^-tls-verify-peer: cannot read .*ca-cert.pem"):
        server_context(tmp_path, verify_peer=True)


def test_a_bad_or_mismatched_key_is_refused_without_showing_it(
    certs: Certificates, tmp_path: Path
) -> None:
    (tmp_path / "server-cert.pem").write_bytes((certs.server / "server-cert.pem").read_bytes())
    other_key = (certs.client / "client-key.pem").read_bytes()
    (tmp_path / "server-key.pem").write_bytes(other_key)
    with pytest.raises(TLSConfigError, match=r"^-tls-certificates: .*private key") as info:
        server_context(tmp_path)
    assert b"PRIVATE" not in str(info.value).encode()
    (tmp_path / "server-key.pem").write_bytes(b"not a key\n")
    with pytest.raises(TLSConfigError, match=r"^-tls-certificates: "):
        server_context(tmp_path)


def test_an_encrypted_key_is_refused_rather_than_prompted_for(
    certs: Certificates, tmp_path: Path
) -> None:
    key = serialization.load_pem_private_key(
        (certs.server / "server-key.pem").read_bytes(), password=None
    )
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    (tmp_path / "server-cert.pem").write_bytes((certs.server / "server-cert.pem").read_bytes())
    (tmp_path / "server-key.pem").write_bytes(encrypted)
    with pytest.raises(TLSConfigError, match=r"^-tls-certificates: .*encrypted"):
        server_context(tmp_path)


def test_server_tls_checks_the_combination(certs: Certificates) -> None:
    assert server_tls("off", None) is None
    with pytest.raises(TLSConfigError, match=r"^-tls: --tls=require needs --tls-certificates"):
        server_tls("require", None)
    with pytest.raises(TLSConfigError, match=r"^-tls-certificates: needs --tls=on"):
        server_tls("off", certs.server)
    with pytest.raises(TLSConfigError, match=r"^-tls-verify-peer: needs --tls=on"):
        server_tls("off", None, verify_peer=True)
    with pytest.raises(TLSConfigError, match=r"^-tls-certificates: .* is not a directory"):
        server_tls("on", certs.server / "nowhere")
    tls = server_tls("on", certs.server, verify_peer=True)
    assert tls is not None and tls.mode == "on"
    assert tls.context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.skipif(PSK_SUPPORTED, reason="this Python's ssl supports PSK")
def test_psk_says_it_needs_a_newer_python(tmp_path: Path) -> None:
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:" + "ab" * 32 + "\n")
    with pytest.raises(TLSConfigError, match=r"^-tls-psk: .*Python 3\.13"):
        server_tls("require", None, psk=keys)
    assert sys.version_info < (3, 13)


def test_psk_file_parses_nbdkits_format_and_names_bad_lines_only(tmp_path: Path) -> None:
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:" + "0a" * 16 + "\n\nbob:ff00\n")
    assert read_psk_file(keys) == {"alice": bytes.fromhex("0a" * 16), "bob": b"\xff\x00"}
    keys.write_text("alice:" + "0a" * 16 + "\nbob:not-hex-secret\n")
    with pytest.raises(TLSConfigError, match="line 2: expected username:hexkey") as info:
        read_psk_file(keys)
    assert "not-hex-secret" not in str(info.value)
    keys.write_text("\n")
    with pytest.raises(TLSConfigError, match="no username:hexkey"):
        read_psk_file(keys)
    with pytest.raises(TLSConfigError, match="cannot read"):
        read_psk_file(tmp_path / "absent.psk")
