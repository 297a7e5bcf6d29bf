"""ML-KEM and ML-DSA through the pyca provider: round trips, determinism, typed errors."""

from __future__ import annotations

import hashlib

import pytest

from gateway.crypto import CORE_KEMS, KEM_SIZES, SIG_SIZES, KemAlg, Provider, SigAlg, get_provider
from gateway.errors import AuthenticationError, CryptoError, ProviderUnavailable
from tests.vectors import load_vectors, unhex


@pytest.fixture(scope="module")
def pyca() -> Provider:
    return get_provider("pyca")


def test_unknown_provider() -> None:
    with pytest.raises(ProviderUnavailable, match="unknown crypto provider"):
        get_provider("nope")


def test_pyca_reports_mlkem(pyca: Provider) -> None:
    assert {"ML-KEM-768", "ML-KEM-1024"} <= pyca.kem_algorithms()


def test_pyca_refuses_frodokem_with_the_reason(pyca: Provider) -> None:
    assert "FrodoKEM-976-AES" not in pyca.kem_algorithms()
    with pytest.raises(ProviderUnavailable, match=r"crypto\.provider = 'oqs'"):
        pyca.kem_keygen(KemAlg.FRODOKEM976AES, bytes(64))
    with pytest.raises(ProviderUnavailable, match=r"crypto\.provider = 'oqs'"):
        pyca.encapsulate(KemAlg.FRODOKEM976AES, bytes(KEM_SIZES[KemAlg.FRODOKEM976AES][0]))


@pytest.mark.parametrize("alg", sorted(CORE_KEMS))
def test_mlkem_round_trip_sizes_and_determinism(pyca: Provider, alg: KemAlg) -> None:
    seed = bytes(range(64))
    key = pyca.kem_keygen(alg, seed)
    assert len(key.public_bytes()) == KEM_SIZES[alg][0]
    assert pyca.kem_keygen(alg, seed).public_bytes() == key.public_bytes()
    assert pyca.kem_keygen(alg, bytes(64)).public_bytes() != key.public_bytes()
    ct, ss = pyca.encapsulate(alg, key.public_bytes())
    assert len(ct) == KEM_SIZES[alg][1]
    assert len(ss) == 32
    assert pyca.decapsulate(key, ct) == ss
    assert repr(key) == "<secret>"


@pytest.mark.parametrize("v", load_vectors("pqc_keygen_recorded"), ids=lambda v: v["name"])
def test_recorded_keygen_vectors(pyca: Provider, v: dict[str, str]) -> None:
    if v["kind"] == "kem":
        public = pyca.kem_keygen(KemAlg(v["alg"]), unhex(v["seed"])).public_bytes()
    else:
        public = pyca.sig_keygen(SigAlg(v["alg"]), unhex(v["seed"])).public_bytes()
    assert hashlib.sha256(public).hexdigest() == v["public_sha256"]


@pytest.mark.parametrize("alg", sorted(CORE_KEMS))
def test_mlkem_bad_inputs_are_typed_errors(pyca: Provider, alg: KemAlg) -> None:
    key = pyca.kem_keygen(alg, bytes(64))
    pk_len, ct_len = KEM_SIZES[alg]
    with pytest.raises(CryptoError):
        pyca.kem_keygen(alg, bytes(63))
    with pytest.raises(AuthenticationError, match="wrong length"):
        pyca.encapsulate(alg, key.public_bytes()[:-1])
    with pytest.raises(AuthenticationError, match="malformed"):
        pyca.encapsulate(alg, b"\xff" * pk_len)  # coefficients >= q fail the FIPS 203 check
    with pytest.raises(AuthenticationError, match="wrong length"):
        pyca.decapsulate(key, bytes(ct_len + 1))
    ct, ss = pyca.encapsulate(alg, key.public_bytes())
    tampered = bytes([ct[0] ^ 1]) + ct[1:]
    # Implicit rejection (FIPS 203): a tampered ciphertext decapsulates to an unrelated secret.
    assert pyca.decapsulate(key, tampered) != ss


@pytest.mark.parametrize("alg", list(SigAlg))
def test_mldsa_sign_verify(pyca: Provider, alg: SigAlg) -> None:
    key = pyca.sig_keygen(alg, bytes(range(32)))
    assert pyca.sig_keygen(alg, bytes(range(32))).public_bytes() == key.public_bytes()
    assert len(key.public_bytes()) == SIG_SIZES[alg][0]
    msg, ctx = b"transcript hash", b"qgw v1 bootstrap"
    sig = pyca.sign(key, msg, ctx)
    assert len(sig) == SIG_SIZES[alg][1]
    pub = key.public_bytes()
    assert pyca.verify(alg, pub, msg, sig, ctx)
    assert not pyca.verify(alg, pub, msg + b"x", sig, ctx)
    assert not pyca.verify(alg, pub, msg, sig, b"other context")
    assert not pyca.verify(alg, pub, msg, bytes([sig[0] ^ 1]) + sig[1:], ctx)
    assert not pyca.verify(alg, pub, msg, sig[:-1], ctx)
    assert not pyca.verify(alg, pub[:-1], msg, sig, ctx)
    other = pyca.sig_keygen(alg, bytes(32)).public_bytes()
    assert not pyca.verify(alg, other, msg, sig, ctx)
    with pytest.raises(CryptoError):
        pyca.sig_keygen(alg, bytes(31))
    assert repr(key) == "<secret>"


def test_mldsa_parameter_sets_do_not_cross(pyca: Provider) -> None:
    key = pyca.sig_keygen(SigAlg.MLDSA65, bytes(32))
    sig = pyca.sign(key, b"m", b"")
    assert not pyca.verify(SigAlg.MLDSA87, key.public_bytes(), b"m", sig, b"")
