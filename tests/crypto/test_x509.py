"""ML-DSA X.509: issuing and verify_peer's refusals, each with its reason."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.crypto import SigAlg, get_provider
from gateway.crypto import x509 as gx
from gateway.errors import AuthenticationError, CryptoError

ALL = {SigAlg.MLDSA44, SigAlg.MLDSA65, SigAlg.MLDSA87}
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    ca, ca_key = gx.create_ca("qgw test CA")
    cert, key = gx.issue_cert(ca, ca_key, "site-b")
    return {"ca": ca, "ca_key": ca_key, "cert": cert, "key": key, "chain": gx.load_cert_chain(cert)}


def test_happy_path_returns_name_key_and_fingerprint(pki: dict[str, Any]) -> None:
    peer = gx.verify_peer(pki["chain"], pki["ca"], "site-b", NOW, {SigAlg.MLDSA65})
    assert peer.name == "site-b"  # the caller compares this with its own name (reflection)
    assert peer.alg is SigAlg.MLDSA65
    assert len(peer.fingerprint) == 64
    # The certified key is the one in the key file: a signature made with it verifies.
    provider = get_provider("pyca")
    signing = gx.load_signing_key(pki["key"])
    assert signing.public_bytes() == peer.public_key
    sig = provider.sign(signing, b"transcript", b"ctx")
    assert provider.verify(peer.alg, peer.public_key, b"transcript", sig, b"ctx")
    assert peer.public_key.hex() not in repr(peer)


def test_issued_certificate_profile(pki: dict[str, Any]) -> None:
    cert = x509.load_pem_x509_certificate(pki["cert"])
    ca = x509.load_pem_x509_certificate(pki["ca"])
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).critical
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["site-b"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-b"
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.ML_DSA_87
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc
    key = serialization.load_pem_private_key(pki["key"], None)
    assert pki["key"].startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert key.public_key().public_bytes_raw() == cert.public_key().public_bytes_raw()  # type: ignore[union-attr]


def test_wrong_name(pki: dict[str, Any]) -> None:
    with pytest.raises(AuthenticationError, match="wrong name"):
        gx.verify_peer(pki["chain"], pki["ca"], "site-a", NOW, ALL)


def test_untrusted_ca_even_with_the_same_name(pki: dict[str, Any]) -> None:
    other, _ = gx.create_ca("qgw test CA")  # same subject, different key
    with pytest.raises(AuthenticationError, match="untrusted CA"):
        gx.verify_peer(pki["chain"], other, "site-b", NOW, ALL)


def test_expired_and_not_yet_valid(pki: dict[str, Any]) -> None:
    with pytest.raises(AuthenticationError, match="expired"):
        gx.verify_peer(pki["chain"], pki["ca"], "site-b", NOW + dt.timedelta(days=366), ALL)
    with pytest.raises(AuthenticationError, match="not yet valid"):
        gx.verify_peer(pki["chain"], pki["ca"], "site-b", NOW - dt.timedelta(hours=1), ALL)


def test_certificate_issued_in_the_past_has_expired(pki: dict[str, Any]) -> None:
    old, _ = gx.issue_cert(
        pki["ca"], pki["ca_key"], "site-b", days=1, now=NOW - dt.timedelta(days=3)
    )
    with pytest.raises(AuthenticationError, match="leaf has expired"):
        gx.verify_peer(gx.load_cert_chain(old), pki["ca"], "site-b", NOW, ALL)


def test_naive_now_is_taken_as_utc(pki: dict[str, Any]) -> None:
    naive = NOW.replace(tzinfo=None)
    assert gx.verify_peer(pki["chain"], pki["ca"], "site-b", naive, ALL).name == "site-b"


def test_parameter_set_not_allowed(pki: dict[str, Any]) -> None:
    with pytest.raises(AuthenticationError, match="wrong signature algorithm"):
        gx.verify_peer(pki["chain"], pki["ca"], "site-b", NOW, {SigAlg.MLDSA87})


def _leaf_builder(
    public_key: Any, issuer: x509.Name, name: str = "site-b"
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )


def test_classical_leaf_under_mldsa_ca_is_wrong_algorithm(pki: dict[str, Any]) -> None:
    ca_cert = x509.load_pem_x509_certificate(pki["ca"])
    ca_key = serialization.load_pem_private_key(pki["ca_key"], None)
    for leaf_key in (ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()):
        leaf = _leaf_builder(leaf_key.public_key(), ca_cert.subject).sign(ca_key, None)  # type: ignore[arg-type]
        der = leaf.public_bytes(serialization.Encoding.DER)
        with pytest.raises(AuthenticationError, match="wrong signature algorithm"):
            gx.verify_peer([der], pki["ca"], "site-b", NOW, ALL)


def test_mldsa_leaf_under_ecdsa_ca_is_wrong_algorithm() -> None:
    ca_key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "classic CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    leaf_key = get_provider("pyca").sig_keygen(SigAlg.MLDSA65, bytes(32))
    from cryptography.hazmat.primitives.asymmetric import mldsa

    leaf_pub = mldsa.MLDSA65PublicKey.from_public_bytes(leaf_key.public_bytes())
    leaf = _leaf_builder(leaf_pub, subject).sign(ca_key, hashes.SHA384())
    der = leaf.public_bytes(serialization.Encoding.DER)
    with pytest.raises(AuthenticationError, match="wrong signature algorithm"):
        gx.verify_peer([der], ca.public_bytes(serialization.Encoding.PEM), "site-b", NOW, ALL)


def test_chain_shape_limits(pki: dict[str, Any]) -> None:
    with pytest.raises(AuthenticationError, match="empty chain"):
        gx.verify_peer([], pki["ca"], "site-b", NOW, ALL)
    with pytest.raises(AuthenticationError, match="longer than"):
        gx.verify_peer(pki["chain"] * 5, pki["ca"], "site-b", NOW, ALL)
    with pytest.raises(AuthenticationError, match="malformed DER"):
        gx.verify_peer([b"\x00" * (gx.MAX_CERT_DER + 1)], pki["ca"], "site-b", NOW, ALL)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(chain=st.lists(st.binary(max_size=300), min_size=0, max_size=5))
def test_garbage_is_always_authentication_error(pki: dict[str, Any], chain: list[bytes]) -> None:
    with pytest.raises(AuthenticationError):
        gx.verify_peer(chain, pki["ca"], "site-b", NOW, ALL)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_mutated_certificate_is_rejected(pki: dict[str, Any], data: st.DataObject) -> None:
    der = bytearray(pki["chain"][0])
    pos = data.draw(st.integers(0, len(der) - 1))
    der[pos] ^= data.draw(st.integers(1, 255))
    try:
        peer = gx.verify_peer([bytes(der)], pki["ca"], "site-b", NOW, ALL)
    except AuthenticationError:
        return
    # A byte flip that still verifies can only be an encoding-neutral one (never the key).
    assert (
        peer.public_key
        == x509.load_der_x509_certificate(pki["chain"][0]).public_key().public_bytes_raw()
    )  # type: ignore[union-attr]


def test_loaders_reject_garbage_with_typed_errors(pki: dict[str, Any]) -> None:
    with pytest.raises(CryptoError):
        gx.load_signing_key(b"not a key")
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(CryptoError, match="not an ML-DSA key"):
        gx.load_signing_key(ec_pem)
    with pytest.raises(CryptoError):
        gx.load_cert_chain(b"garbage")
    with pytest.raises(CryptoError):
        gx.load_cert_chain(b"")
    with pytest.raises(CryptoError):
        gx.verify_peer(pki["chain"], b"not a CA", "site-b", NOW, ALL)
    _, other_key = gx.create_ca("other")
    with pytest.raises(CryptoError, match="does not match"):
        gx.issue_cert(pki["ca"], other_key, "site-c")


@pytest.mark.parametrize(
    "bad", ["", "Site-A", "site_a", "-site", "a..b", "*.site", "10.0.0.1", "x" * 64]
)
def test_issue_refuses_bad_names(pki: dict[str, Any], bad: str) -> None:
    with pytest.raises(CryptoError, match="invalid gateway name"):
        gx.issue_cert(pki["ca"], pki["ca_key"], bad)


@pytest.mark.parametrize("alg", [SigAlg.MLDSA44, SigAlg.MLDSA87])
def test_other_parameter_sets(pki: dict[str, Any], alg: SigAlg) -> None:
    cert, _ = gx.issue_cert(pki["ca"], pki["ca_key"], "site-c.example", alg)
    peer = gx.verify_peer(gx.load_cert_chain(cert), pki["ca"], "site-c.example", NOW, {alg})
    assert peer.alg is alg
