"""Classical (ECDSA P-256) TLS PKI for the KME links (ETSI GS QKD 014 mutual TLS).

Why classical: the SAE-to-KME and KME-to-KME links are HTTPS through Python's ``ssl`` module,
which uses the system OpenSSL; that OpenSSL offers no ML-DSA certificates in TLS. The KME sits
inside the secure site (docs/keysource.md), so this link is not exposed to the WAN attacker.
The gateway-to-gateway bootstrap uses ML-DSA certificates (a different PKI, not this module).

What is issued:

- a CA (``new_ca``), self-signed, ``basicConstraints CA:TRUE, pathlen 0``;
- KME server certificates (``issue_server``): ``serverAuth``, SANs for the given DNS names and
  IP addresses (by default ``localhost``, ``127.0.0.1``, ``::1``);
- SAE client certificates (``issue_client``): ``clientAuth``, subject CN = the SAE ID (the KME
  takes the caller's SAE ID from this CN);
- KME-to-KME certificates (``issue_peer``): ``serverAuth`` + ``clientAuth`` with SANs, for the
  key-sync channel of the two-process simulator.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DNS = ("localhost",)
DEFAULT_IPS = ("127.0.0.1", "::1")
CA_DAYS = 3650
LEAF_DAYS = 825  # the CA/Browser Forum's old maximum; a demo PKI, renewed by re-running init-demo


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, both PEM. Prints without the key."""

    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        subject = x509.load_pem_x509_certificate(self.cert_pem).subject.rfc4514_string()
        return f"Issued(subject={subject!r}, key=<secret>)"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qgw demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=5)  # tolerate small clock skew


def new_ca(common_name: str, days: int = CA_DAYS) -> Issued:
    """A self-signed ECDSA P-256 CA."""
    key = _new_key()
    name = _name(common_name)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _issue(
    ca: Issued,
    common_name: str,
    *,
    usages: Sequence[x509.ObjectIdentifier],
    dns: Sequence[str],
    ips: Sequence[str],
    days: int,
) -> Issued:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the CA key must be an ECDSA key")
    key = _new_key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_server(
    ca: Issued,
    common_name: str,
    dns: Sequence[str] = DEFAULT_DNS,
    ips: Sequence[str] = DEFAULT_IPS,
    days: int = LEAF_DAYS,
) -> Issued:
    """A KME server certificate (serverAuth) with DNS and IP SANs."""
    return _issue(
        ca, common_name, usages=[ExtendedKeyUsageOID.SERVER_AUTH], dns=dns, ips=ips, days=days
    )


def issue_client(ca: Issued, sae_id: str, days: int = LEAF_DAYS) -> Issued:
    """An SAE client certificate (clientAuth); the subject CN is the SAE ID."""
    return _issue(ca, sae_id, usages=[ExtendedKeyUsageOID.CLIENT_AUTH], dns=(), ips=(), days=days)


def issue_peer(
    ca: Issued,
    common_name: str,
    dns: Sequence[str] = DEFAULT_DNS,
    ips: Sequence[str] = DEFAULT_IPS,
    days: int = LEAF_DAYS,
) -> Issued:
    """A KME-to-KME certificate: serverAuth and clientAuth, with SANs."""
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return _issue(ca, common_name, usages=usages, dns=dns, ips=ips, days=days)


def write_issued(issued: Issued, cert_path: Path, key_path: Path | None) -> None:
    """Write the certificate (0644) and, when ``key_path`` is given, the key (0600)."""
    write_file(cert_path, issued.cert_pem, private=False)
    if key_path is not None:
        write_file(key_path, issued.key_pem, private=True)


def write_file(path: Path, data: bytes, private: bool) -> None:
    """Write a file atomically enough for a demo; private files are created 0600 from the start."""
    mode = 0o600 if private else 0o644
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    tmp.replace(path)


def load_issued(cert_path: Path, key_path: Path) -> Issued:
    """Read back a certificate and key pair written by :func:`write_issued`."""
    return Issued(cert_path.read_bytes(), key_path.read_bytes())
