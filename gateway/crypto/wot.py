"""Web-of-trust endorsements (auth mode ``wot``, docs/protocol.md §3.6): X.509 cross-certificates.

An **introducer** is a self-signed ML-DSA-87 certificate (``BasicConstraints(ca=True,
path_length=0)``, ``keyCertSign``): the same shape as a site CA, made by
:func:`create_introducer`. An **endorsement** is an ordinary X.509 end-entity certificate that
an introducer issues for a gateway's *existing* ML-DSA public key (cross-certification, RFC
5280 §3.2): SAN = DNSName(gateway name), the validity the introducer chose, signed with the
introducer's ML-DSA key. Nothing here is a home-made format; an endorsement verifies with
``openssl verify -CAfile introducer.crt endorsement.crt`` too.

:func:`evaluate` is the trust decision. Each presented endorsement either *counts* for exactly
one configured introducer or is *rejected* with a reason. It counts only when, in this order
(cheap checks before any signature):

1. it parses, is signed with ML-DSA and carries an ML-DSA key in ``allowed_algs``;
2. its public key is the very key that signs the handshake (the key of endorsement 0);
3. its SAN names ``expected_name`` exactly;
4. ``now`` is within its validity;
5. its SHA-256 fingerprint is not on the local revocation list;
6. its issuer and authority key identifier match a configured introducer;
7. RFC 5280 path validation (``cryptography.x509.verification``) against that one
   introducer alone succeeds at ``now`` (signature, introducer validity, profile).

Distinct introducers are counted (two endorsements by one introducer count once); the policy
accepts when ``full >= full_needed`` or ``full + marginal >= marginals_needed``. Every failure
is an :class:`AuthenticationError` or a rejected entry naming the reason; garbage bytes never
raise anything else.
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from gateway.crypto import SigAlg, SigPrivateKey
from gateway.crypto.x509 import (
    _PRIV,
    _SIG_OIDS,
    MAX_CERT_DER,
    MAX_CHAIN_CERTS,
    _alg_of_private,
    _alg_of_public,
    _key_pem,
    _load_one_cert,
    _load_private,
    _raw_public,
    _ski,
    _validity,
    check_name,
    create_ca,
    gateway_leaf,
    load_signing_key,
)
from gateway.errors import AuthenticationError, CryptoError

MAX_ENDORSEMENTS = MAX_CHAIN_CERTS  # the handshake's certificate list holds at most 4 (§3.2)
INTRODUCER_ALG = SigAlg.MLDSA87


class Trust(enum.StrEnum):
    FULL = "full"
    MARGINAL = "marginal"


@dataclass(frozen=True, slots=True)
class Introducer:
    """A configured introducer: its self-signed certificate and the trust we give it."""

    label: str  # the certificate's CN, for messages
    trust: Trust
    der: bytes  # the self-signed certificate
    fingerprint: str  # SHA-256 of the introducer's raw public key, hex (its identity)

    def __repr__(self) -> str:
        return f"Introducer({self.label!r}, {self.trust.value}, key {self.fingerprint[:16]})"


@dataclass(frozen=True, slots=True)
class Rejected:
    index: int  # position in the presented list
    introducer: str | None  # label of the introducer it claims, when known
    reason: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The trust decision for one presented endorsement list. Prints without key bytes."""

    accepted: bool
    name: str
    alg: SigAlg
    public_key: bytes  # the endorsed key: it must sign the transcript
    key_fingerprint: str  # SHA-256 of the raw public key, hex
    vouched: tuple[Introducer, ...]  # distinct introducers whose endorsement counted
    missing: tuple[Introducer, ...]  # configured introducers that did not vouch
    rejected: tuple[Rejected, ...]
    full_needed: int
    marginals_needed: int

    @property
    def full(self) -> int:
        return sum(1 for i in self.vouched if i.trust is Trust.FULL)

    @property
    def marginal(self) -> int:
        return sum(1 for i in self.vouched if i.trust is Trust.MARGINAL)

    def summary(self) -> str:
        """One line: counts, threshold, who vouched, who is missing, why others were rejected."""

        def names(xs: tuple[Introducer, ...]) -> str:
            return ", ".join(f"{i.label} ({i.trust.value})" for i in xs) or "none"

        text = (
            f"{self.full} full + {self.marginal} marginal endorsement(s) for {self.name!r} "
            f"(key {self.key_fingerprint[:16]}); policy needs {self.full_needed} full or "
            f"{self.marginals_needed} in all; vouched: {names(self.vouched)}; "
            f"missing: {names(self.missing)}"
        )
        if self.rejected:
            why = "; ".join(
                f"#{r.index}{f' ({r.introducer})' if r.introducer else ''}: {r.reason}"
                for r in self.rejected
            )
            text += f"; not counted: {why}"
        return text

    def __repr__(self) -> str:
        return f"Verdict(accepted={self.accepted}, {self.summary()})"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def key_fingerprint(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()


def endorsement_fingerprint(der: bytes) -> str:
    """What a revocation list names: SHA-256 of the endorsement certificate's DER, hex."""
    return hashlib.sha256(der).hexdigest()


# --- making things --------------------------------------------------------------------------


def create_introducer(
    name: str, days: int = 3650, *, now: _dt.datetime | None = None
) -> tuple[bytes, bytes]:
    """A self-signed ML-DSA-87 introducer certificate and its key: ``(cert PEM, key PEM)``."""
    return create_ca(name, INTRODUCER_ALG, days, now=now)


def create_gateway_key(alg: SigAlg = SigAlg.MLDSA65) -> tuple[bytes, bytes]:
    """A gateway's ML-DSA key pair for wot mode: ``(private key PKCS#8 PEM, public key PEM)``."""
    key = _PRIV[SigAlg(alg)].generate()
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _key_pem(key), bytes(pub)


def _load_public(pem: bytes) -> Any:
    try:
        key = serialization.load_pem_public_key(pem)
    except Exception as exc:  # ValueError, UnsupportedAlgorithm
        raise CryptoError("not a PEM public key") from exc
    if _alg_of_public(key) is None:
        raise CryptoError("the public key is not an ML-DSA key")
    return key


def public_key_of(key_pem: bytes) -> bytes:
    """The public key PEM of a private key PEM (``qgw wot endorse --key`` takes either)."""
    if b"PRIVATE KEY" in key_pem:
        key = _load_private(key_pem)
        _alg_of_private(key)
        return bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    _load_public(key_pem)
    return key_pem


def endorse(
    introducer_cert_pem: bytes,
    introducer_key_pem: bytes,
    name: str,
    public_key_pem: bytes,
    days: int = 365,
    *,
    now: _dt.datetime | None = None,
) -> bytes:
    """The introducer certifies ``public_key_pem`` as gateway ``name``: an endorsement (PEM).

    The profile is that of ``gateway.crypto.x509.issue_cert`` (SAN DNS name, CA=false,
    digitalSignature, EKU serverAuth + clientAuth, SKI, AKI); validity capped at the introducer's.
    """
    check_name(name)
    icert = _load_one_cert(introducer_cert_pem)
    ikey = _load_private(introducer_key_pem)
    _alg_of_private(ikey)
    if ikey.public_key().public_bytes_raw() != _raw_public(icert.public_key()):
        raise CryptoError("the introducer key does not match the introducer certificate")
    subject_key = _load_public(public_key_pem)
    not_before, not_after = _validity(now or _now(), days)
    not_after = min(not_after, icert.not_valid_after_utc)
    if not_after <= not_before:
        raise CryptoError("the introducer certificate has expired")
    cert = gateway_leaf(
        name,
        icert.subject,
        subject_key=subject_key,
        issuer_key=ikey.public_key(),
        not_before=not_before,
        not_after=not_after,
    ).sign(ikey, None)
    return bytes(cert.public_bytes(serialization.Encoding.PEM))


# --- loading configuration ------------------------------------------------------------------


def load_introducer(pem: bytes, trust: Trust | str) -> Introducer:
    """A configured introducer file: one self-signed ML-DSA certificate that may sign others."""
    cert = _load_one_cert(pem)
    if cert.signature_algorithm_oid not in _SIG_OIDS:
        raise CryptoError("the introducer certificate is not signed with ML-DSA")
    try:
        key = cert.public_key()
    except Exception as exc:
        raise CryptoError("the introducer certificate's key cannot be read") from exc
    if _alg_of_public(key) is None:
        raise CryptoError("the introducer key is not an ML-DSA key")
    if cert.issuer != cert.subject:
        raise CryptoError("the introducer certificate is not self-signed")
    try:
        cert.verify_directly_issued_by(cert)
    except Exception as exc:  # InvalidSignature, ValueError, TypeError
        raise CryptoError("the introducer certificate's self-signature does not verify") from exc
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CryptoError("the introducer certificate is not a CA (BasicConstraints ca=true)")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    label = str(cns[0].value) if cns else "?"
    return Introducer(
        label=label,
        trust=Trust(trust),
        der=cert.public_bytes(serialization.Encoding.DER),
        fingerprint=key_fingerprint(_raw_public(key)),
    )


def load_endorsements(pem: bytes) -> list[bytes]:
    """This gateway's endorsement file (PEM, 1..4 certificates) -> DER list, in file order."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CryptoError("not a PEM certificate file") from exc
    if not certs:
        raise CryptoError("holds no endorsement")
    if len(certs) > MAX_ENDORSEMENTS:
        raise CryptoError(
            f"holds {len(certs)} endorsements; the handshake carries at most {MAX_ENDORSEMENTS}"
        )
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def own_endorsements(chain: list[bytes], key_pem: bytes) -> str:
    """Check our endorsements: all for our key, one name. Returns the name (our identity)."""
    key = load_signing_key(key_pem)
    ours = key.public_bytes()
    names: set[str] = set()
    for i, der in enumerate(chain):
        cert = x509.load_der_x509_certificate(der)
        if _raw_public(cert.public_key()) != ours:
            raise CryptoError(f"endorsement {i} is for another key than the configured auth.key")
        names.update(_dns_names(cert))
    if len(names) != 1:
        raise CryptoError(
            f"the endorsements must all name one gateway (they name {sorted(names) or 'none'})"
        )
    return check_name(names.pop())


def parse_revocations(text: bytes) -> frozenset[str]:
    """A revocation list: one endorsement fingerprint (64 hex digits) per line; ``#`` comments."""
    out: set[str] = set()
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise CryptoError("the revocation list is not UTF-8 text") from exc
    for n, line in enumerate(lines, start=1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if len(entry) != 64 or any(c not in "0123456789abcdef" for c in entry):
            raise CryptoError(
                f"line {n}: expected the SHA-256 fingerprint of an endorsement (64 hex digits)"
            )
        out.add(entry)
    return frozenset(out)


# --- the trust decision -----------------------------------------------------------------------


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(sans.get_values_for_type(x509.DNSName))


def _aki(cert: x509.Certificate) -> bytes:
    try:
        v = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return b""
    return bytes(v.key_identifier or b"")


def _parse(der: bytes, i: int) -> x509.Certificate:
    if not isinstance(der, bytes | bytearray) or not der or len(der) > MAX_CERT_DER:
        raise AuthenticationError(f"endorsement {i}: malformed DER")
    try:
        cert = x509.load_der_x509_certificate(bytes(der))
        _ = (cert.signature_algorithm_oid, cert.not_valid_before_utc, cert.not_valid_after_utc)
        _ = cert.extensions
    except Exception as exc:  # pyca raises ValueError and friends
        raise AuthenticationError(f"endorsement {i}: malformed DER") from exc
    return cert


def evaluate(
    endorsements: list[bytes] | tuple[bytes, ...],
    introducers: tuple[Introducer, ...],
    expected_name: str,
    now: _dt.datetime,
    *,
    revoked: frozenset[str] = frozenset(),
    full_needed: int = 1,
    marginals_needed: int = 3,
    allowed_algs: frozenset[SigAlg] = frozenset(SigAlg),
) -> Verdict:
    """Count the endorsements that vouch for ``expected_name`` (see the module docstring).

    Raises AuthenticationError when there is no usable key at all (empty list, too many,
    endorsement 0 malformed or not an allowed ML-DSA key); otherwise returns a Verdict.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=_dt.UTC)
    if not endorsements:
        raise AuthenticationError("web of trust: peer sent no endorsement")
    if len(endorsements) > MAX_ENDORSEMENTS:
        raise AuthenticationError(f"web of trust: more than {MAX_ENDORSEMENTS} endorsements")
    first = _parse(endorsements[0], 0)
    try:
        key = first.public_key()
    except Exception as exc:  # UnsupportedAlgorithm
        raise AuthenticationError("endorsement 0: wrong algorithm (unknown key)") from exc
    alg = _alg_of_public(key)
    if alg is None or alg not in allowed_algs:
        raise AuthenticationError(
            f"endorsement 0: wrong algorithm (key {alg.value if alg else type(key).__name__})"
        )
    public = _raw_public(key)
    by_ski: dict[bytes, list[tuple[Introducer, x509.Certificate]]] = {}
    for intro in introducers:
        icert = x509.load_der_x509_certificate(intro.der)
        by_ski.setdefault(_ski(icert), []).append((intro, icert))

    vouched: dict[str, Introducer] = {}
    rejected: list[Rejected] = []
    for i, der in enumerate(endorsements):
        try:
            cert = first if i == 0 else _parse(der, i)
        except AuthenticationError as exc:
            rejected.append(Rejected(i, None, str(exc).removeprefix(f"endorsement {i}: ")))
            continue
        candidates = by_ski.get(_aki(cert), []) if _aki(cert) else []
        candidates = [(n, c) for n, c in candidates if c.subject == cert.issuer]
        claimed = candidates[0][0].label if candidates else None
        reason = _check(
            cert,
            der=bytes(der),
            public=public,
            expected_name=expected_name,
            now=now,
            revoked=revoked,
            allowed_algs=allowed_algs,
        )
        if reason is None and not candidates:
            reason = "issued by an unknown key (no configured introducer)"
        if reason is None:
            reason = "signature does not verify under the introducer"
            for intro, icert in candidates:
                if _path_ok(cert, icert, expected_name, now):
                    vouched.setdefault(intro.fingerprint, intro)
                    reason = None
                    break
        if reason is not None:
            rejected.append(Rejected(i, claimed, reason))
    got = tuple(vouched.values())
    missing = tuple(
        m for m in {n.fingerprint: n for n in introducers}.values() if m.fingerprint not in vouched
    )
    full = sum(1 for v in got if v.trust is Trust.FULL)
    accepted = full >= full_needed or len(got) >= marginals_needed
    return Verdict(
        accepted=accepted,
        name=expected_name,
        alg=alg,
        public_key=public,
        key_fingerprint=key_fingerprint(public),
        vouched=got,
        missing=missing,
        rejected=tuple(rejected),
        full_needed=full_needed,
        marginals_needed=marginals_needed,
    )


def _check(
    cert: x509.Certificate,
    *,
    der: bytes,
    public: bytes,
    expected_name: str,
    now: _dt.datetime,
    revoked: frozenset[str],
    allowed_algs: frozenset[SigAlg],
) -> str | None:
    """The cheap checks (1-5 of the module docstring): a reason, or None when they pass."""
    if cert.signature_algorithm_oid not in _SIG_OIDS:
        return f"wrong algorithm (signed with {cert.signature_algorithm_oid.dotted_string}, not ML-DSA)"
    try:
        key = cert.public_key()
    except (UnsupportedAlgorithm, ValueError):
        return "wrong algorithm (unknown key)"
    alg = _alg_of_public(key)
    if alg is None or alg not in allowed_algs:
        return "wrong algorithm (the endorsed key is not an allowed ML-DSA key)"
    if _raw_public(key) != public:
        return "endorses another key than the one that signs the handshake"
    names = _dns_names(cert)
    if names != [expected_name]:
        return f"wrong name (expected {expected_name!r}, names {', '.join(map(repr, names[:4])) or 'none'})"
    if now < cert.not_valid_before_utc:
        return f"not yet valid (from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC)"
    if now > cert.not_valid_after_utc:
        return f"expired ({cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)"
    if endorsement_fingerprint(der) in revoked:
        return "revoked (on the local revocation list)"
    return None


def _path_ok(
    cert: x509.Certificate, icert: x509.Certificate, expected_name: str, now: _dt.datetime
) -> bool:
    """RFC 5280 path validation of ``cert`` with ``icert`` as the only trust anchor."""
    try:
        verifier = (
            PolicyBuilder()
            .store(Store([icert]))
            .time(now)
            .build_server_verifier(x509.DNSName(expected_name))
        )
        verifier.verify(cert, [])
    except (VerificationError, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class EndorsementInfo:
    """What ``qgw wot show`` prints about one endorsement."""

    index: int
    names: tuple[str, ...]
    issuer: str
    not_before: _dt.datetime
    not_after: _dt.datetime
    fingerprint: str  # of the endorsement (what a revocation list names)
    key_fingerprint: str
    algorithm: str


def describe(der: bytes, index: int = 0) -> EndorsementInfo:
    cert = _parse(der, index)
    try:
        raw = _raw_public(cert.public_key())
        alg_obj = _alg_of_public(cert.public_key())
        alg = alg_obj.value if alg_obj else "not ML-DSA"
    except (UnsupportedAlgorithm, ValueError):
        raw, alg = b"", "unknown"
    cns = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return EndorsementInfo(
        index=index,
        names=tuple(_dns_names(cert)),
        issuer=str(cns[0].value) if cns else cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=endorsement_fingerprint(bytes(der)),
        key_fingerprint=key_fingerprint(raw),
        algorithm=alg,
    )


def signing_key(pem: bytes) -> SigPrivateKey:
    return load_signing_key(pem)
