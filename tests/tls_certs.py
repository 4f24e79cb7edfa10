"""Test certificates made on the spot with ``cryptography``: a CA, a server
certificate for 127.0.0.1 and localhost, a client certificate of that CA, and
one of another CA (which a server must refuse)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Identity:
    """A certificate and its key, as PEM files and bytes."""

    cert_file: Path
    key_file: Path

    @property
    def cert(self) -> bytes:
        return self.cert_file.read_bytes()

    @property
    def key(self) -> bytes:
        return self.key_file.read_bytes()


@dataclass(frozen=True)
class Pki:
    ca: Identity
    server: Identity
    client: Identity
    stranger: Identity
    """A client certificate from another CA, which the server must refuse."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    directory: Path,
    stem: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[Identity, x509.Name, ec.EllipticCurvePrivateKey]:
    """A certificate for *stem*, signed by *issuer* (None: a self-signed CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(f"cachecoord test {stem}")
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    identity = Identity(directory / f"{stem}.crt", directory / f"{stem}.key")
    identity.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    identity.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return identity, subject, key


def make_pki(directory: Path) -> Pki:
    ca, ca_name, ca_key = _issue(directory, "ca", None)
    server, _, _ = _issue(
        directory, "server", (ca_name, ca_key), usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    client, _, _ = _issue(
        directory, "client", (ca_name, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    _, other_name, other_key = _issue(directory, "other-ca", None)
    stranger, _, _ = _issue(
        directory, "stranger", (other_name, other_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return Pki(ca=ca, server=server, client=client, stranger=stranger)
