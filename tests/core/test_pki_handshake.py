"""Bootstrap with real ML-DSA X.509 certificates: trust, names, validity, algorithms."""

from __future__ import annotations

import datetime

import pytest

from gateway.core import labels as L
from gateway.core.auth import PkiAuthenticator
from gateway.core.connection import HandshakeComplete
from gateway.credentials import make_verifier
from gateway.crypto import SigAlg, x509

from .pair import PROVIDER, Pair

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return x509.create_ca("test site CA")


def auth_for(
    ca: tuple[bytes, bytes],
    name: str,
    trust: bytes | None = None,
    alg: SigAlg = SigAlg.MLDSA65,
    days: int = 30,
    issued_at: datetime.datetime | None = None,
    clock_at: datetime.datetime | None = None,
) -> PkiAuthenticator:
    cert, key = x509.issue_cert(ca[0], ca[1], name, alg=alg, days=days, now=issued_at)
    chain = x509.load_cert_chain(cert)
    return PkiAuthenticator(
        x509.certificate_name(chain[0]),
        certs=tuple(chain),
        key=x509.load_signing_key(key),
        provider=PROVIDER,
        verifier=make_verifier(trust or ca[0]),
        clock=(lambda: clock_at) if clock_at else None,
    )


def run(a: PkiAuthenticator, b: PkiAuthenticator) -> Pair:
    p = Pair(auth="pki", auths=(a, b))
    p.handshake()
    return p


def test_real_certificates_handshake(ca: tuple[bytes, bytes]) -> None:
    p = run(auth_for(ca, "site-a"), auth_for(ca, "site-b"))
    assert p.established()
    assert p.i.of(HandshakeComplete)[0].peer.name == "site-b"
    assert p.r.of(HandshakeComplete)[0].peer.name == "site-a"


def test_mldsa87_leaf_accepted(ca: tuple[bytes, bytes]) -> None:
    p = run(auth_for(ca, "site-a", alg=SigAlg.MLDSA87), auth_for(ca, "site-b"))
    assert p.established()


def test_untrusted_ca_refused(ca: tuple[bytes, bytes]) -> None:
    other = x509.create_ca("rogue CA")
    p = run(auth_for(other, "site-a", trust=ca[0]), auth_for(ca, "site-b"))
    assert not p.established()
    assert any(c.alert is L.Alert.BAD_CERTIFICATE for c in p.closed())


def test_wrong_name_refused(ca: tuple[bytes, bytes]) -> None:
    """A valid certificate from the same CA, but for another gateway."""
    p = run(auth_for(ca, "site-a"), auth_for(ca, "site-c"))
    assert not p.established()
    assert any(c.alert in (L.Alert.BAD_CERTIFICATE, L.Alert.WRONG_IDENTITY) for c in p.closed())


def test_expired_certificate_refused(ca: tuple[bytes, bytes]) -> None:
    old = NOW - datetime.timedelta(days=40)
    p = run(auth_for(ca, "site-a", issued_at=old, days=10), auth_for(ca, "site-b"))
    assert not p.established()
    assert any("expired" in c.reason for c in p.closed())


def test_not_yet_valid_certificate_refused(ca: tuple[bytes, bytes]) -> None:
    future = NOW + datetime.timedelta(days=5)
    p = run(auth_for(ca, "site-a"), auth_for(ca, "site-b", issued_at=future))
    assert not p.established()
    assert any("not yet valid" in c.reason for c in p.closed())


def test_wrong_signature_algorithm_refused(ca: tuple[bytes, bytes]) -> None:
    """ML-DSA-44 is below the configured minimum (ML-DSA-65/87) and is refused."""
    p = run(auth_for(ca, "site-a", alg=SigAlg.MLDSA44), auth_for(ca, "site-b"))
    assert not p.established()
    assert any("algorithm" in c.reason for c in p.closed())


def test_certificate_naming_our_own_identity_refused(ca: tuple[bytes, bytes]) -> None:
    """The responder's peer presents a certificate with the responder's own name."""
    a = auth_for(ca, "site-b")  # attacker holds a cert for site-b and talks to site-b
    a.identity = "site-a"  # and claims to be site-a in INIT
    p = run(a, auth_for(ca, "site-b"))
    assert not p.established()
