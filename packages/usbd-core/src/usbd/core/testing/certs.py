"""Throw-away X.509 certificates for TLS tests, in the directory layouts nbdkit and libnbd read.

:func:`make_certificates` writes, under one root, a CA and a server certificate for
``localhost`` and 127.0.0.1 (the ``server`` directory: ``ca-cert.pem``, ``server-cert.pem``,
``server-key.pem``), a client certificate signed by the same CA (``client``: ``ca-cert.pem``,
``client-cert.pem``, ``client-key.pem``), the CA alone (``anonymous``: a client that trusts
the server but has no certificate of its own), a client of a second, unrelated CA
(``wrong_ca``), which neither trusts the server nor is trusted by it, and a client whose
certificate the CA revoked (``revoked``) with the server's files plus that ``ca-crl.pem``
(``server_crl``). Keys are P-256 (quick to
make) and files are 0600. It needs the ``cryptography`` package (``usbd-core[testing]``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Certificates", "make_certificates"]


@dataclass(frozen=True)
class Certificates:
    """The directories :func:`make_certificates` wrote (see the module's docstring)."""

    server: Path
    client: Path
    anonymous: Path
    wrong_ca: Path
    revoked: Path
    server_crl: Path


@dataclass(frozen=True)
class _Issuer:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "usbd tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
    )


def _ca(common_name: str) -> _Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        _builder(name, name, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Issuer(key, cert)


def _leaf(issuer: _Issuer, common_name: str, *, server: bool) -> _Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(_name(common_name), issuer.cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    return _Issuer(key, builder.sign(issuer.key, hashes.SHA256()))


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _directory(root: Path, name: str, ca: _Issuer, role: str, leaf: _Issuer | None) -> Path:
    path = root / name
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(path / "ca-cert.pem", _pem(ca.cert))
    if leaf is not None:
        _write(path / f"{role}-cert.pem", _pem(leaf.cert))
        _write(path / f"{role}-key.pem", _key_pem(leaf.key))
    return path


def _crl(ca: _Issuer, revoked: x509.Certificate) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(revoked.serial_number)
        .revocation_date(now - datetime.timedelta(minutes=5))
        .build()
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - datetime.timedelta(hours=1))
        .next_update(now + datetime.timedelta(days=2))
        .add_revoked_certificate(entry)
        .sign(ca.key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.PEM)


def make_certificates(root: Path) -> Certificates:
    """Write the directories under ``root`` (created if need be)."""
    ca = _ca("usbd test CA")
    other = _ca("another CA")
    server = _leaf(ca, "localhost", server=True)
    revoked = _leaf(ca, "revoked", server=False)
    server_crl = _directory(root, "server-crl", ca, "server", server)
    _write(server_crl / "ca-crl.pem", _crl(ca, revoked.cert))
    return Certificates(
        server=_directory(root, "server", ca, "server", server),
        client=_directory(root, "client", ca, "client", _leaf(ca, "client", server=False)),
        anonymous=_directory(root, "anonymous", ca, "client", None),
        wrong_ca=_directory(
            root, "wrong-ca", other, "client", _leaf(other, "intruder", server=False)
        ),
        revoked=_directory(root, "revoked", ca, "client", revoked),
        server_crl=server_crl,
    )
