"""TLS (NBD_OPT_STARTTLS) with real clients: libnbd's nbdinfo and nbdcopy (``nbds://`` and
``nbds+unix://`` URIs with ``tls-certificates=DIR``), python3-libnbd, qemu-img and qemu-io
with a ``tls-creds-x509`` object.

Certificates are made for the module with the cryptography package
(:mod:`usbd.core.testing.certs`): a CA, a server certificate for localhost and 127.0.0.1, a
client certificate, and a client of a second CA. Refused: a client that does not trust the
server's CA, one without a certificate (or of another CA) when the server verifies peers, and
a plaintext client when TLS is required; a plaintext client of ``--tls on`` is still served.
Data written over TLS is read back and compared, megabytes at a time (many TLS records per
request, records split across receives, replies gathered from many chunks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from usbd.core._tls import PSK_SUPPORTED
from usbd.core.testing.certs import Certificates, make_certificates

if TYPE_CHECKING:
    from conftest import ServerFactory, UsbdServer

MiB = 1024 * 1024
Run = Callable[..., Any]


def _short_dir() -> Path:
    """A directory for sockets and certificates (unix socket paths must stay short)."""
    return Path(tempfile.mkdtemp(prefix="usbd-tls-", dir="/tmp"))


@pytest.fixture(scope="module")
def certs() -> Iterator[Certificates]:
    root = _short_dir()
    try:
        yield make_certificates(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


class TLSServers:
    """Starts usbd-ramdisk with TLS flags (the module's servers are stopped, and checked,
    by conftest's factory); at the end, checks that no key was ever printed."""

    def __init__(self, certs: Certificates, factory: ServerFactory) -> None:
        self.certs = certs
        self.factory = factory
        self.started: list[UsbdServer] = []

    def __call__(self, transport: str, mode: str = "require", *flags: str) -> UsbdServer:
        extra = ["--tls", mode, "--tls-certificates", str(self.certs.server), *flags]
        server = self.factory(transport, extra=extra)
        self.started.append(server)
        return server

    def check_no_key_was_printed(self) -> None:
        secrets = _key_lines(self.certs)
        for server in self.started:
            said = server.log() + server.output()
            assert not [line for line in secrets if line in said], "key material logged"


@pytest.fixture(scope="module")
def tls_servers(certs: Certificates, module_servers: ServerFactory) -> Iterator[TLSServers]:
    servers = TLSServers(certs, module_servers)
    yield servers
    servers.check_no_key_was_printed()


@pytest.fixture(scope="module", params=["unix", "tcp"])
def required(request: pytest.FixtureRequest, tls_servers: TLSServers) -> UsbdServer:
    """--tls require, on a unix socket and on 127.0.0.1."""
    return tls_servers(request.param)


@pytest.fixture(scope="module")
def verifying(tls_servers: TLSServers) -> UsbdServer:
    """--tls require --tls-verify-peer: only clients with a certificate of its CA."""
    return tls_servers("unix", "require", "--tls-verify-peer")


@pytest.fixture(scope="module")
def optional(tls_servers: TLSServers) -> UsbdServer:
    """--tls on: TLS if the client asks for it."""
    return tls_servers("unix", "on")


def _key_lines(certs: Certificates) -> list[str]:
    """The base64 lines of every private key the tests use."""
    keys = [certs.server / "server-key.pem", certs.client / "client-key.pem"]
    return [
        line
        for key in keys
        for line in key.read_text().splitlines()
        if line and not line.startswith("-----")
    ]


def with_certs(uri: str, directory: Path) -> str:
    """The URI with libnbd's tls-certificates query parameter."""
    return f"{uri}{'&' if '?' in uri else '?'}tls-certificates={directory}"


def plaintext(uri: str) -> str:
    return uri.replace("nbds", "nbd", 1)


def qemu_tls(server: UsbdServer, directory: Path) -> list[str]:
    """qemu's --object and --image-opts for the server's export over TLS."""
    if server.socket_path is not None:
        where = f"path={server.socket_path},tls-hostname=localhost"
    else:
        port = server.uri.rsplit(":", 1)[1].split("/", 1)[0]
        where = f"host=127.0.0.1,port={port}"
    return [
        "--object",
        f"tls-creds-x509,id=tls0,endpoint=client,dir={directory}",
        "--image-opts",
        f"driver=nbd,{where},export={server.export_name},tls-creds=tls0",
    ]


# -- libnbd's tools --------------------------------------------------------------------------


def test_the_server_prints_nbds_uris_when_tls_is_required(required: UsbdServer) -> None:
    assert required.uri.startswith("nbds://" if required.transport == "tcp" else "nbds+unix://")


def test_nbdinfo_negotiates_tls(required: UsbdServer, certs: Certificates, tools: Run) -> None:
    doc = json.loads(tools("nbdinfo", "--json", with_certs(required.uri, certs.client)).stdout)
    assert doc["TLS"] is True
    assert doc["structured"] is True
    assert doc["exports"][0]["export-size"] == required.size


def test_nbdcopy_round_trips_megabytes_over_tls(
    required: UsbdServer, certs: Certificates, tools: Run, tmp_path: Path
) -> None:
    uri = with_certs(required.uri, certs.anonymous)  # no client certificate needed here
    source = tmp_path / "source"
    source.write_bytes(os.urandom(24 * MiB + 4321))
    tools("nbdcopy", "--request-size=4194304", "--requests=8", str(source), uri)
    back = tmp_path / "back"
    tools("nbdcopy", uri, str(back))
    assert back.read_bytes()[: source.stat().st_size] == source.read_bytes()


def test_a_client_of_another_ca_refuses_the_server(
    required: UsbdServer, certs: Certificates, tools: Run
) -> None:
    proc = tools("qemu-img", "info", *qemu_tls(required, certs.wrong_ca), check=False)
    assert proc.returncode != 0
    assert "certificate" in proc.stderr.lower(), proc.stderr
    if required.transport == "tcp":
        # libnbd checks the server's certificate against the host it connects to, so not
        # on a unix socket (it behaves the same with nbdkit).
        proc = tools("nbdinfo", with_certs(required.uri, certs.wrong_ca), check=False)
        assert proc.returncode != 0
        assert "certificate verification" in proc.stderr


def test_a_plaintext_client_is_refused_when_tls_is_required(
    required: UsbdServer, tools: Run
) -> None:
    uri = plaintext(required.uri)
    for argv in (["nbdinfo", uri], ["nbdinfo", "--list", uri]):
        proc = tools(*argv, check=False)
        assert proc.returncode != 0, argv
        assert "server replied with error" in proc.stderr, proc.stderr


# -- python3-libnbd --------------------------------------------------------------------------


def test_libnbd_writes_and_reads_back_over_tls(
    required: UsbdServer, certs: Certificates, libnbd: ModuleType
) -> None:
    h = libnbd.NBD()
    h.set_tls(libnbd.TLS_REQUIRE)
    h.set_tls_certificates(str(certs.client))
    h.set_export_name(required.export_name)
    if required.socket_path is not None:
        h.connect_unix(required.socket_path)
    else:
        h.connect_uri(required.uri)
    assert h.get_tls_negotiated()
    data = os.urandom(16 * MiB)  # one request carries ~1000 TLS records each way
    h.pwrite(data, 8 * MiB)
    h.flush()
    assert h.pread(len(data), 8 * MiB) == data
    small = [os.urandom(512) for _ in range(64)]
    for i, chunk in enumerate(small):
        h.aio_pwrite(chunk, i * 4096)
    while h.aio_in_flight():
        h.poll(-1)
    assert [h.pread(512, i * 4096) for i in range(64)] == small
    h.shutdown()


def test_libnbd_in_option_mode_sees_tls_reqd_before_starttls(
    required: UsbdServer, libnbd: ModuleType
) -> None:
    h = libnbd.NBD()
    h.set_tls(libnbd.TLS_DISABLE)
    h.set_opt_mode(True)
    h.connect_uri(plaintext(required.uri))
    with pytest.raises(libnbd.Error):
        h.opt_list(lambda name, description: 0)
    with pytest.raises(libnbd.Error):
        h.opt_go()
    h.opt_abort()


# -- qemu ------------------------------------------------------------------------------------


def test_qemu_img_converts_to_and_from_the_export_over_tls(
    required: UsbdServer, certs: Certificates, tools: Run, tmp_path: Path
) -> None:
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(6 * MiB) + bytes(2 * MiB) + os.urandom(MiB))
    _, creds, _, image = qemu_tls(required, certs.client)
    tools(
        "qemu-img",
        "convert",
        "-n",
        "--object",
        creds,
        "-f",
        "raw",
        str(source),
        "--target-image-opts",
        image,
    )
    back = tmp_path / "back.raw"
    tools("qemu-img", "convert", "--object", creds, "--image-opts", image, "-O", "raw", str(back))
    assert back.read_bytes()[: source.stat().st_size] == source.read_bytes()


def test_qemu_io_pattern_write_and_verify_over_tls(
    required: UsbdServer, certs: Certificates, tools: Run
) -> None:
    proc = tools(
        "qemu-io",
        *qemu_tls(required, certs.client),
        "-c",
        "write -P 0x5a 40M 5M",
        "-c",
        "read -P 0x5a 40M 5M",
        "-c",
        "read -P 0 63M 4096",
    )
    assert "Pattern verification failed" not in proc.stdout
    assert proc.stdout.count("read ") == 2, proc.stdout


def test_qemu_img_without_tls_creds_is_refused(required: UsbdServer, tools: Run) -> None:
    opts = qemu_tls(required, Path("/nonexistent"))[3].replace(",tls-creds=tls0", "")
    proc = tools("qemu-img", "info", "--image-opts", opts, check=False)
    assert proc.returncode != 0
    assert "TLS" in proc.stderr, proc.stderr


# -- --tls-verify-peer -----------------------------------------------------------------------


def test_verify_peer_serves_a_client_with_a_certificate_of_its_ca(
    verifying: UsbdServer, certs: Certificates, tools: Run
) -> None:
    doc = json.loads(tools("nbdinfo", "--json", with_certs(verifying.uri, certs.client)).stdout)
    assert doc["TLS"] is True
    proc = tools(
        "qemu-io",
        *qemu_tls(verifying, certs.client),
        "-c",
        "write -P 7 0 64k",
        "-c",
        "read -P 7 0 64k",
    )
    assert "Pattern verification failed" not in proc.stdout


@pytest.mark.parametrize("who", ["anonymous", "wrong_ca"])
def test_verify_peer_refuses_other_clients(
    verifying: UsbdServer, certs: Certificates, tools: Run, who: str
) -> None:
    directory = getattr(certs, who)
    if who == "wrong_ca":
        # It must trust the server to get as far as showing its own certificate.
        directory = _mixed(certs, directory)
    proc = tools("nbdinfo", with_certs(verifying.uri, directory), check=False)
    assert proc.returncode != 0
    proc = tools("qemu-img", "info", *qemu_tls(verifying, directory), check=False)
    assert proc.returncode != 0
    log = verifying.log()
    assert "TLS handshake failed" in log or "handshake failures" in log, log


def _mixed(certs: Certificates, client_of_other_ca: Path) -> Path:
    """A client directory trusting the server's CA but holding another CA's certificate."""
    mixed = client_of_other_ca.parent / "mixed"
    mixed.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(certs.client / "ca-cert.pem", mixed / "ca-cert.pem")
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(client_of_other_ca / name, mixed / name)
    return mixed


# -- --tls on --------------------------------------------------------------------------------


def test_tls_on_serves_plaintext_and_tls_clients(
    optional: UsbdServer, certs: Certificates, tools: Run, libnbd: ModuleType
) -> None:
    assert optional.uri.startswith("nbd+unix://")
    plain = json.loads(tools("nbdinfo", "--json", optional.uri).stdout)
    assert plain["TLS"] is False
    secure_uri = with_certs(optional.uri.replace("nbd+unix", "nbds+unix", 1), certs.client)
    assert json.loads(tools("nbdinfo", "--json", secure_uri).stdout)["TLS"] is True
    h = libnbd.NBD()
    h.set_tls(libnbd.TLS_ALLOW)  # upgrades when offered
    h.set_tls_certificates(str(certs.client))
    h.set_export_name(optional.export_name)
    assert optional.socket_path is not None
    h.connect_unix(optional.socket_path)
    assert h.get_tls_negotiated()
    h.pwrite(b"both ways", 0)
    h.shutdown()
    plain_h = libnbd.NBD()
    plain_h.set_export_name(optional.export_name)
    plain_h.connect_unix(optional.socket_path)
    assert not plain_h.get_tls_negotiated()
    assert plain_h.pread(9, 0) == b"both ways"
    plain_h.shutdown()


# -- start-up errors -------------------------------------------------------------------------


def _bad_key_dir(certs: Certificates) -> Path:
    directory = certs.server.parent / "bad-key"
    directory.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(certs.server / "server-cert.pem", directory / "server-cert.pem")
    # The client's key: a real key, but not the one the certificate is for.
    shutil.copy(certs.client / "client-key.pem", directory / "server-key.pem")
    return directory


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("on-without-certificates", "-tls: --tls=on needs --tls-certificates DIR"),
        ("missing-server-cert", "-tls-certificates: cannot read "),
        ("mismatched-key", "-tls-certificates: "),
        ("verify-peer-without-ca", "-tls-verify-peer: cannot read "),
        ("psk", "-tls-psk: pre-shared keys need Python 3.13 or later"),
        ("bad-mode", "-tls: invalid value 'maybe': expected 'off', 'on' or 'require'"),
    ],
)
def test_bad_tls_settings_stop_the_daemon_before_it_serves(
    certs: Certificates, case: str, expected: str, tmp_path: Path
) -> None:
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:" + "5e" * 32 + "\n")
    no_ca = tmp_path / "no-ca"
    no_ca.mkdir()
    for name in ("server-cert.pem", "server-key.pem"):
        shutil.copy(certs.server / name, no_ca / name)
    flags = {
        "on-without-certificates": ["--tls", "on"],
        "missing-server-cert": ["--tls", "require", "--tls-certificates", str(certs.client)],
        "mismatched-key": ["--tls", "require", "--tls-certificates", str(_bad_key_dir(certs))],
        "verify-peer-without-ca": [
            *("--tls", "require", "--tls-certificates", str(no_ca)),
            "--tls-verify-peer",
        ],
        "psk": ["--tls", "require", "--tls-psk", str(psk)],
        "bad-mode": ["--tls", "maybe"],
    }[case]
    if case == "psk" and PSK_SUPPORTED:
        pytest.skip("this Python's ssl has PSK support")
    proc = subprocess.run(
        [sys.executable, "-m", "usbd.ramdisk", "--listen", str(tmp_path / "s.sock"), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc
    assert proc.stderr.startswith(f"usbd-ramdisk: error: {expected}"), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "is serving" not in proc.stdout
    said = proc.stdout + proc.stderr
    assert not [line for line in _key_lines(certs) if line in said]
    assert "5e5e5e" not in said


# -- docs/tls.md -----------------------------------------------------------------------------


def test_the_openssl_recipe_in_tls_md_makes_certificates_both_sides_accept(
    tools: Run, tmp_path: Path, start_server: ServerFactory
) -> None:
    """docs/tls.md's openssl commands, for localhost and 127.0.0.1, give a working server
    directory and client directory, client certificate checks included."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "tls.md").read_text()
    recipe = next(b for b in text.split("```") if b.lstrip().startswith("# once: the CA"))
    recipe = recipe.replace("nbd.example.com", "localhost").replace("10.0.1.2", "127.0.0.1")
    tools("openssl", "version")  # there, or skip (fail in CI)
    subprocess.run(
        ["bash", "-e", "-c", recipe], cwd=tmp_path, check=True, timeout=120, capture_output=True
    )
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    for directory, names in (
        (server_dir, ("ca-cert.pem", "server-cert.pem", "server-key.pem")),
        (client_dir, ("ca-cert.pem", "client-cert.pem", "client-key.pem")),
    ):
        directory.mkdir()
        for name in names:
            shutil.copy(tmp_path / name, directory / name)
    extra = ["--tls", "require", "--tls-certificates", str(server_dir), "--tls-verify-peer"]
    server = start_server("tcp", extra=extra)
    doc = json.loads(tools("nbdinfo", "--json", with_certs(server.uri, client_dir)).stdout)
    assert doc["TLS"] is True
