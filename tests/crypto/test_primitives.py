"""Known-answer tests for the symmetric primitives and X25519 (sources in tests/vectors/)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import crypto as C
from gateway.errors import AuthenticationError, CryptoError
from tests.vectors import load_vectors, unhex


@pytest.mark.parametrize("v", load_vectors("poly1305"), ids=lambda v: v["name"])
def test_poly1305_rfc8439(v: dict[str, str]) -> None:
    key, msg, tag = unhex(v["key"]), unhex(v["msg"]), unhex(v["tag"])
    assert C.poly1305_tag(key, msg) == tag
    assert C.poly1305_verify(key, msg, tag)
    assert not C.poly1305_verify(key, msg + b"!", tag)
    assert not C.poly1305_verify(key, msg, bytes([tag[0] ^ 1]) + tag[1:])


def test_poly1305_rejects_wrong_key_length() -> None:
    with pytest.raises(CryptoError):
        C.poly1305_tag(bytes(31), b"m")
    with pytest.raises(CryptoError):
        C.poly1305_verify(bytes(33), b"m", bytes(16))


@pytest.mark.parametrize("v", load_vectors("hmac_sha384"), ids=lambda v: v["name"])
def test_hmac_sha384_rfc4231(v: dict[str, str]) -> None:
    assert C.hmac_sha384(unhex(v["key"]), unhex(v["data"])) == unhex(v["mac"])


@pytest.mark.parametrize("v", load_vectors("x25519"), ids=lambda v: v["name"])
def test_x25519_rfc7748(v: dict[str, str]) -> None:
    if v["kind"] == "scalarmult":
        assert C.X25519PrivateKey(unhex(v["scalar"])).exchange(unhex(v["u"])) == unhex(v["out"])
        return
    alice = C.X25519PrivateKey(unhex(v["alice_private"]))
    bob = C.X25519PrivateKey(unhex(v["bob_private"]))
    assert alice.public_bytes() == unhex(v["alice_public"])
    assert bob.public_bytes() == unhex(v["bob_public"])
    assert alice.exchange(bob.public_bytes()) == unhex(v["shared"])
    assert bob.exchange(alice.public_bytes()) == unhex(v["shared"])


def test_x25519_low_order_and_bad_lengths_are_typed_errors() -> None:
    key = C.X25519PrivateKey(bytes(range(32)))
    with pytest.raises(AuthenticationError):
        key.exchange(bytes(32))  # u = 0: low order, all-zero shared secret
    with pytest.raises(AuthenticationError):
        key.exchange(bytes(31))
    with pytest.raises(CryptoError):
        C.X25519PrivateKey(bytes(16))
    assert repr(key) == "<secret>"
    key.wipe()
    with pytest.raises(CryptoError):
        key.public_bytes()


def _hkdf_reference(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out independently with the standard library's hmac."""
    prk = hmac.new(salt or bytes(48), ikm, hashlib.sha384).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha384).digest()
        out += block
        counter += 1
    return out[:length]


@pytest.mark.parametrize("length", [1, 32, 48, 49, 96, 255 * 48])
def test_hkdf_sha384_matches_independent_reference(length: int) -> None:
    salt, ikm, info = b"qgw salt", bytes(range(80)), b"qgw test info"
    prk = C.hkdf_extract(salt, ikm)
    assert prk == hmac.new(salt, ikm, hashlib.sha384).digest()
    assert C.hkdf_expand(prk, info, length) == _hkdf_reference(salt, ikm, info, length)


def test_hkdf_empty_salt_is_zero_block_and_bad_prk_rejected() -> None:
    assert C.hkdf_extract(b"", b"ikm") == hmac.new(bytes(48), b"ikm", hashlib.sha384).digest()
    with pytest.raises(CryptoError):
        C.hkdf_expand(bytes(32), b"info", 32)


@settings(max_examples=50, deadline=None)
@given(
    salt=st.binary(max_size=64),
    ikm=st.binary(max_size=128),
    info=st.binary(max_size=64),
    length=st.integers(1, 200),
)
def test_hkdf_property(salt: bytes, ikm: bytes, info: bytes, length: int) -> None:
    assert C.hkdf_expand(C.hkdf_extract(salt, ikm), info, length) == _hkdf_reference(
        salt, ikm, info, length
    )


@pytest.mark.parametrize("v", load_vectors("aes256gcm"), ids=lambda v: v["name"])
def test_aes256gcm_gcm_spec(v: dict[str, str]) -> None:
    aead = C.Aead(unhex(v["key"]))
    iv, pt, aad = unhex(v["iv"]), unhex(v["pt"]), unhex(v["aad"])
    sealed = aead.seal(iv, pt, aad)
    assert sealed == unhex(v["ct"]) + unhex(v["tag"])
    assert aead.open(iv, sealed, aad) == pt
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 0x80])
    with pytest.raises(AuthenticationError):
        aead.open(iv, tampered, aad)
    with pytest.raises(AuthenticationError):
        aead.open(iv, sealed, aad + b"x")


def test_aead_key_length_and_wipe() -> None:
    with pytest.raises(CryptoError):
        C.Aead(bytes(16))
    aead = C.Aead(bytes(32))
    assert repr(aead) == "<secret>"
    aead.wipe()
    with pytest.raises(CryptoError):
        aead.seal(bytes(12), b"x", b"")


@settings(max_examples=50, deadline=None)
@given(pt=st.binary(max_size=2048), aad=st.binary(max_size=64), flip=st.integers(0, 10_000))
def test_aead_round_trip_and_any_bit_flip_fails(pt: bytes, aad: bytes, flip: int) -> None:
    aead, iv = C.Aead(bytes(range(32))), bytes(12)
    sealed = aead.seal(iv, pt, aad)
    assert aead.open(iv, sealed, aad) == pt
    bit = flip % (len(sealed) * 8)
    bad = bytearray(sealed)
    bad[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(AuthenticationError):
        aead.open(iv, bytes(bad), aad)
