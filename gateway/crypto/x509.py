"""ML-DSA X.509: a site CA, gateway certificates, and peer chain verification.

The CA signs with ML-DSA-87 by default, gateway certificates carry ML-DSA-65 keys by default
(FIPS 204; RFC 9881 "Algorithm Identifiers for ML-DSA in X.509"). Chains are verified with
``cryptography.x509.verification`` (RFC 5280 path validation and the CA/B-style profile checks
that pyca applies), then our own rules on top:

* every certificate in the presented chain and the trust anchor is signed with ML-DSA and the
  leaf key is an ML-DSA key in ``allowed_algs`` ("wrong signature algorithm" otherwise);
* the leaf's SAN holds exactly ``expected_name`` as a DNS name (no wildcard matching);
* the validity period is checked at the ``now`` the caller passes (the core reads no clock).

Every failure is an :class:`AuthenticationError` whose message names the reason; garbage
bytes never raise anything else. Private keys are PKCS#8 PEM, unencrypted (the file mode,
0600, is their protection; see ``gateway.pki``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from gateway.crypto import SigAlg, SigPrivateKey
from gateway.crypto._pyca import PycaProvider
from gateway.errors import AuthenticationError, CryptoError

MAX_CHAIN_CERTS = 4  # leaf + up to 3 intermediates; bounds the work a peer can ask for
MAX_CERT_DER = 16 * 1024  # an ML-DSA-87 certificate is about 7.5 kB
CLOCK_SKEW = _dt.timedelta(minutes=5)  # not_valid_before is backdated by this much

_PRIV: dict[SigAlg, Any] = {
    SigAlg.MLDSA44: mldsa.MLDSA44PrivateKey,
    SigAlg.MLDSA65: mldsa.MLDSA65PrivateKey,
    SigAlg.MLDSA87: mldsa.MLDSA87PrivateKey,
}
_PUB: dict[SigAlg, Any] = {
    SigAlg.MLDSA44: mldsa.MLDSA44PublicKey,
    SigAlg.MLDSA65: mldsa.MLDSA65PublicKey,
    SigAlg.MLDSA87: mldsa.MLDSA87PublicKey,
}
_SIG_OIDS: dict[x509.ObjectIdentifier, SigAlg] = {
    SignatureAlgorithmOID.ML_DSA_44: SigAlg.MLDSA44,
    SignatureAlgorithmOID.ML_DSA_65: SigAlg.MLDSA65,
    SignatureAlgorithmOID.ML_DSA_87: SigAlg.MLDSA87,
}
# A DNS name as a gateway identity: LDH labels, no wildcard, no trailing dot.
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


@dataclass(frozen=True, slots=True)
class VerifiedPeer:
    """What a verified peer certificate proves. Prints by name and fingerprint only."""

    name: str  # the SAN DNS name that matched expected_name
    alg: SigAlg  # the leaf's ML-DSA parameter set
    public_key: bytes  # raw FIPS 204 public key (for verifying the handshake signature)
    fingerprint: str  # SHA-256 of the leaf certificate DER, lowercase hex (64 chars)

    def __repr__(self) -> str:
        return f"VerifiedPeer(name={self.name!r}, alg={self.alg.value}, fp={self.fingerprint[:16]})"


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid gateway identity (lowercase DNS name), else raise."""
    if not isinstance(name, str) or not _DNS_NAME.match(name):
        raise CryptoError(
            f"invalid gateway name {name!r}: use a lowercase DNS name (letters, digits, '-', '.')"
        )
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    raise CryptoError(f"invalid gateway name {name!r}: an IP address is not a DNS name")


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _validity(now: _dt.datetime, days: int) -> tuple[_dt.datetime, _dt.datetime]:
    if days < 1:
        raise CryptoError("validity must be at least 1 day")
    return now - CLOCK_SKEW, now + _dt.timedelta(days=days)


def _key_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _alg_of_public(key: Any) -> SigAlg | None:
    for alg, cls in _PUB.items():
        if isinstance(key, cls):
            return alg
    return None


def _alg_of_private(key: Any) -> SigAlg:
    for alg, cls in _PRIV.items():
        if isinstance(key, cls):
            return alg
    raise CryptoError("the private key is not an ML-DSA key")


def create_ca(
    name: str,
    alg: SigAlg = SigAlg.MLDSA87,
    days: int = 3650,
    *,
    now: _dt.datetime | None = None,
) -> tuple[bytes, bytes]:
    """Create a self-signed ML-DSA site CA. Returns ``(cert PEM, PKCS#8 key PEM)``.

    The CA may sign end-entity certificates only (path length 0).
    """
    if not name or len(name) > 64:
        raise CryptoError("CA name must be 1..64 characters")
    not_before, not_after = _validity(now or _now(), days)
    key = _PRIV[SigAlg(alg)].generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def gateway_leaf(
    name: str,
    issuer: x509.Name,
    *,
    subject_key: Any,
    issuer_key: Any,
    not_before: _dt.datetime,
    not_after: _dt.datetime,
) -> x509.CertificateBuilder:
    """The one gateway certificate profile (CA-issued in pki, introducer-issued in wot).

    CN and SAN = the name, not a CA, digital signature only, server+client auth, SKI/AKI.
    """
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
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
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False
        )
    )


def issue_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    name: str,
    alg: SigAlg = SigAlg.MLDSA65,
    days: int = 365,
    *,
    now: _dt.datetime | None = None,
) -> tuple[bytes, bytes]:
    """Issue a gateway certificate for DNS name ``name``. Returns ``(cert PEM, key PEM)``.

    SAN = DNSName(name), CN = name, BasicConstraints(ca=False) critical, KeyUsage
    digitalSignature critical, EKU serverAuth + clientAuth (a gateway is initiator and
    responder), SKI and AKI. The validity is capped at the CA's own ``not_valid_after``.
    """
    check_name(name)
    ca_cert = _load_one_cert(ca_cert_pem)
    ca_key = _load_private(ca_key_pem)
    _alg_of_private(ca_key)
    if ca_key.public_key().public_bytes_raw() != _raw_public(ca_cert.public_key()):
        raise CryptoError("the CA key does not match the CA certificate")
    if x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()).digest != _ski(ca_cert):
        raise CryptoError("the CA certificate's subject key identifier does not match its key")
    not_before, not_after = _validity(now or _now(), days)
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    if not_after <= not_before:
        raise CryptoError("the CA certificate has expired")
    key = _PRIV[SigAlg(alg)].generate()
    cert = gateway_leaf(
        name,
        ca_cert.subject,
        subject_key=key.public_key(),
        issuer_key=ca_key.public_key(),
        not_before=not_before,
        not_after=not_after,
    ).sign(ca_key, None)
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _ski(cert: x509.Certificate) -> bytes:
    try:
        return bytes(
            cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        )
    except x509.ExtensionNotFound:
        return b""


def _raw_public(key: Any) -> bytes:
    raw = getattr(key, "public_bytes_raw", None)
    return bytes(raw()) if raw is not None else b""


def _load_one_cert(pem: bytes) -> x509.Certificate:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CryptoError("not a PEM certificate") from exc
    if len(certs) != 1:
        raise CryptoError(f"expected one certificate, found {len(certs)}")
    return certs[0]


def _load_private(pem: bytes) -> Any:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:  # never echo the input: it is key material
        raise CryptoError("not an unencrypted PEM (PKCS#8) private key") from exc
    except Exception as exc:  # unsupported key types raise other pyca errors
        raise CryptoError("unsupported private key") from exc


def load_signing_key(pem: bytes) -> SigPrivateKey:
    """Load an ML-DSA private key (PKCS#8 PEM) as a key for ``PycaProvider.sign``."""
    key = _load_private(pem)
    return PycaProvider.wrap_signing_key(_alg_of_private(key), key)


def load_cert_chain(pem: bytes) -> list[bytes]:
    """PEM file (leaf first, then intermediates) -> list of DER certificates."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CryptoError("not a PEM certificate chain") from exc
    if not certs:
        raise CryptoError("no certificate in the PEM data")
    if len(certs) > MAX_CHAIN_CERTS:
        raise CryptoError(f"certificate chain longer than {MAX_CHAIN_CERTS}")
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def certificate_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _parse_chain(chain_der: list[bytes]) -> list[x509.Certificate]:
    if not isinstance(chain_der, list | tuple) or not chain_der:
        raise AuthenticationError("peer certificate: empty chain")
    if len(chain_der) > MAX_CHAIN_CERTS:
        raise AuthenticationError(f"peer certificate: chain longer than {MAX_CHAIN_CERTS}")
    certs = []
    for i, der in enumerate(chain_der):
        if not isinstance(der, bytes | bytearray) or not der or len(der) > MAX_CERT_DER:
            raise AuthenticationError(f"peer certificate: malformed DER (certificate {i})")
        try:
            cert = x509.load_der_x509_certificate(bytes(der))
            # Touch the lazily parsed fields now so that a bad encoding fails here.
            _ = (cert.signature_algorithm_oid, cert.not_valid_before_utc, cert.not_valid_after_utc)
            _ = cert.extensions
        except Exception as exc:  # pyca raises ValueError and friends
            raise AuthenticationError(f"peer certificate: malformed DER (certificate {i})") from exc
        certs.append(cert)
    return certs


def _check_time(cert: x509.Certificate, now: _dt.datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise AuthenticationError(f"peer certificate: {what} is not yet valid")
    if now > cert.not_valid_after_utc:
        raise AuthenticationError(f"peer certificate: {what} has expired")


def verify_peer(
    chain_der: list[bytes],
    ca_pems: bytes,
    expected_name: str,
    now: _dt.datetime,
    allowed_algs: set[SigAlg] | frozenset[SigAlg],
) -> VerifiedPeer:
    """Verify a peer's certificate chain (leaf first) against the CA(s) in ``ca_pems``.

    Raises AuthenticationError naming the reason: malformed DER, wrong signature algorithm,
    expired / not yet valid, wrong name, untrusted CA (chain does not verify).
    Refusing a peer that claims *our own* name is the caller's job (it knows our name).
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=_dt.UTC)
    try:
        roots = x509.load_pem_x509_certificates(ca_pems)
    except ValueError as exc:
        raise CryptoError("trusted CA file is not PEM") from exc
    if not roots:
        raise CryptoError("trusted CA file holds no certificate")

    certs = _parse_chain(chain_der)
    leaf = certs[0]

    # Cheap checks first: algorithm, time, name. No signature is verified before these pass.
    for i, cert in enumerate(certs):
        if cert.signature_algorithm_oid not in _SIG_OIDS:
            raise AuthenticationError(
                f"peer certificate: wrong signature algorithm (certificate {i} is signed with "
                f"{cert.signature_algorithm_oid.dotted_string}, not ML-DSA)"
            )
    try:
        leaf_key = leaf.public_key()
    except Exception as exc:  # unknown key types raise UnsupportedAlgorithm
        raise AuthenticationError(
            "peer certificate: wrong signature algorithm (unknown key)"
        ) from exc
    alg = _alg_of_public(leaf_key)
    if alg is None or alg not in allowed_algs:
        allowed = ", ".join(sorted(a.value for a in allowed_algs))
        got = alg.value if alg is not None else type(leaf_key).__name__
        raise AuthenticationError(
            f"peer certificate: wrong signature algorithm (leaf key {got}, allowed: {allowed})"
        )
    _check_time(leaf, now, "leaf")
    for i, cert in enumerate(certs[1:], start=1):
        _check_time(cert, now, f"intermediate {i}")
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if expected_name not in names:
        raise AuthenticationError(
            f"peer certificate: wrong name (expected {expected_name!r}, certificate names "
            f"{', '.join(repr(n) for n in names[:4]) or 'none'})"
        )

    # RFC 5280 path validation against the trust store, at `now`.
    try:
        store = Store(roots)
        verifier = (
            PolicyBuilder()
            .store(store)
            .time(now)
            .build_server_verifier(x509.DNSName(expected_name))
        )
        chain = verifier.verify(leaf, certs[1:])
    except VerificationError as exc:
        raise AuthenticationError(
            f"peer certificate: untrusted CA or invalid chain ({exc})"
        ) from exc
    except ValueError as exc:  # e.g. a name pyca's DNSName refuses
        raise AuthenticationError(f"peer certificate: cannot verify ({exc})") from exc
    anchor = chain[-1]
    if _alg_of_public(anchor.public_key()) is None:
        raise AuthenticationError(
            "peer certificate: wrong signature algorithm (CA key is not ML-DSA)"
        )

    der = leaf.public_bytes(serialization.Encoding.DER)
    return VerifiedPeer(
        name=expected_name,
        alg=alg,
        public_key=_raw_public(leaf_key),
        fingerprint=certificate_fingerprint(der),
    )


def certificate_name(der: bytes) -> str:
    """The (single) SAN DNS name of a certificate: a gateway's identity in PKI mode."""
    try:
        cert = x509.load_der_x509_certificate(der)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise CryptoError("certificate has no SAN DNS name") from exc
    if len(dns) != 1:
        raise CryptoError("gateway certificate must carry exactly one SAN DNS name")
    return dns[0]


@dataclass(frozen=True, slots=True)
class OwnCertificate:
    """What ``check_own_certificate`` learned about this gateway's certificate."""

    name: str
    not_before: _dt.datetime
    not_after: _dt.datetime
    fingerprint: str
    ca_problem: str | None  # why the chain does not verify against the CA file, else None


def load_ca_certificates(pem: bytes) -> int:
    """Check that a CA file holds at least one PEM certificate; return how many."""
    try:
        roots = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CryptoError("not a PEM certificate file") from exc
    if not roots:
        raise CryptoError("holds no certificate")
    return len(roots)


def private_key_matches(key_pem: bytes, cert_der: bytes) -> bool:
    """True when the private key is the one whose public key the certificate carries."""
    key = _load_private(key_pem)
    try:
        cert_pub = x509.load_der_x509_certificate(cert_der).public_key()
    except Exception as exc:  # unknown key types raise UnsupportedAlgorithm
        raise CryptoError("certificate public key cannot be read") from exc
    return _raw_public(key.public_key()) == _raw_public(cert_pub) != b""


def check_own_certificate(
    chain_der: list[bytes], ca_pems: bytes, now: _dt.datetime
) -> OwnCertificate:
    """Validity and CA verification of our own chain, as the peer will check it."""
    leaf = x509.load_der_x509_certificate(chain_der[0])
    name = certificate_name(chain_der[0])
    problem: str | None = None
    try:
        verify_peer(chain_der, ca_pems, name, now, frozenset(SigAlg))
    except (AuthenticationError, CryptoError) as exc:
        problem = str(exc).removeprefix("peer certificate: ")
    return OwnCertificate(
        name=name,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        fingerprint=certificate_fingerprint(chain_der[0]),
        ca_problem=problem,
    )


def certificate_not_after(pem: bytes) -> _dt.datetime:
    """End of validity of the first certificate in a PEM file (any key type: the KME's too)."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CryptoError("not a PEM certificate") from exc
    if not certs:
        raise CryptoError("no certificate in the PEM data")
    return certs[0].not_valid_after_utc
