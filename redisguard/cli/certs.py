"""Development certificates with ``cryptography``: a CA, a server cert and a client cert.

For trying redisguard out and for tests only: the CA key sits next to the certificates it signs.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            if n.startswith(("spiffe://", "urn:", "https://")):
                out.append(x509.UniformResourceIdentifier(n))
            else:
                out.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(out)


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate | None,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
    *,
    is_ca: bool = False,
    sans: Iterable[str] = (),
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "redisguard dev")])  # fmt: skip
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca_cert.subject if ca_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if is_ca:
        b = b.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )  # fmt: skip
    else:
        assert usage is not None  # a leaf certificate names its use
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    sans = list(sans)
    if sans:
        b = b.add_extension(_san(sans), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def init_dev_certs(
    directory: str | os.PathLike[str],
    extra_sans: Iterable[str] = (),
    client_name: str = "alice",
    days: int = 365,
    force: bool = False,
) -> list[Path]:
    """Write ca.pem/ca.key, server.pem/server.key, client.pem/client.key; keys 0600."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    names = ["ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key"]
    if not force and all((d / n).exists() for n in names):
        return []
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _issue("redisguard dev CA", ca_key, None, ca_key, days * 2, is_ca=True)
    server = _issue("localhost", server_key, ca, ca_key, days,
                    sans=[*DEFAULT_SANS, *extra_sans], usage=ExtendedKeyUsageOID.SERVER_AUTH)  # fmt: skip
    client = _issue(client_name, client_key, ca, ca_key, days,
                    sans=[f"spiffe://redisguard.dev/{client_name}"], usage=ExtendedKeyUsageOID.CLIENT_AUTH)  # fmt: skip
    _write_cert(d / "ca.pem", ca)
    _write_key(d / "ca.key", ca_key)
    _write_cert(d / "server.pem", server)
    _write_key(d / "server.key", server_key)
    _write_cert(d / "client.pem", client)
    _write_key(d / "client.key", client_key)
    return [d / n for n in names]
