"""The one place that owns cryptographic primitives.

Only this package imports ``cryptography`` (and ``oqs`` when the optional provider is used).
Everything else calls the verbs below: ``encapsulate``/``decapsulate``, ``sign``/``verify``,
``hkdf_extract``/``hkdf_expand``, ``seal``/``open``, ``poly1305_tag``, ``hmac_sha384``.

Providers: post-quantum operations (ML-KEM, ML-DSA) go through a :class:`Provider`, so that
``liboqs-python`` can stand in for ``cryptography`` (see ``_oqs``). Symmetric primitives and
X25519 always come from ``cryptography``.

Randomness: key generation takes its seed from the caller (the protocol core draws it from an
injected source). ML-KEM encapsulation draws its 32-byte message from the provider's own DRBG,
because neither provider exposes the derandomised ``Encaps_internal`` of FIPS 203.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
from enum import StrEnum
from typing import Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import poly1305 as _poly1305
from cryptography.hazmat.primitives.asymmetric import x25519 as _x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from gateway.errors import AuthenticationError, CryptoError, ProviderUnavailable

HASH_LEN = 48  # SHA-384 output, bytes
AEAD_KEY_LEN = 32  # AES-256
AEAD_NONCE_LEN = 12  # GCM, RFC 5116
AEAD_TAG_LEN = 16
X25519_LEN = 32
POLY1305_KEY_LEN = 32  # r || s, RFC 8439 2.5
POLY1305_TAG_LEN = 16


class KemAlg(StrEnum):
    MLKEM768 = "ML-KEM-768"
    MLKEM1024 = "ML-KEM-1024"
    # Conservative (unstructured-lattice LWE) KEM; OpenSSL has none, only the oqs provider.
    FRODOKEM976AES = "FrodoKEM-976-AES"


#: KEMs every provider must offer; the others need the oqs provider.
CORE_KEMS: frozenset[KemAlg] = frozenset({KemAlg.MLKEM768, KemAlg.MLKEM1024})


class SigAlg(StrEnum):
    MLDSA44 = "ML-DSA-44"
    MLDSA65 = "ML-DSA-65"
    MLDSA87 = "ML-DSA-87"


# FIPS 203 Table 3 / FIPS 204 Table 2 sizes (bytes).
KEM_SIZES: dict[KemAlg, tuple[int, int]] = {  # (encapsulation key, ciphertext)
    KemAlg.MLKEM768: (1184, 1088),
    KemAlg.MLKEM1024: (1568, 1568),
    KemAlg.FRODOKEM976AES: (15632, 15792),  # FrodoKEM spec (2023, with salt); liboqs 0.16
}
KEM_SEED_LEN = 64  # d || z, FIPS 203 ML-KEM.KeyGen_internal (length-checked for every KEM)
KEM_SS_LEN = 32
#: Shared-secret length per KEM (bytes): FrodoKEM-976 yields 24 (its security level / 8).
KEM_SS_LENS: dict[KemAlg, int] = {
    KemAlg.MLKEM768: 32,
    KemAlg.MLKEM1024: 32,
    KemAlg.FRODOKEM976AES: 24,
}
SIG_SIZES: dict[SigAlg, tuple[int, int]] = {  # (public key, signature)
    SigAlg.MLDSA44: (1312, 2420),
    SigAlg.MLDSA65: (1952, 3309),
    SigAlg.MLDSA87: (2592, 4627),
}
SIG_SEED_LEN = 32  # xi, FIPS 204 ML-DSA.KeyGen_internal


class KemPrivateKey(Protocol):
    """An ML-KEM decapsulation key held by a provider (opaque; prints as <secret>)."""

    alg: KemAlg

    def public_bytes(self) -> bytes: ...


class SigPrivateKey(Protocol):
    """An ML-DSA signing key held by a provider (opaque; prints as <secret>)."""

    alg: SigAlg

    def public_bytes(self) -> bytes: ...


class Provider(Protocol):
    """Post-quantum operations. Implemented by ``_pyca.PycaProvider`` and ``_oqs.OqsProvider``."""

    name: str

    def kem_algorithms(self) -> frozenset[str]: ...

    def kem_keygen(self, alg: KemAlg, seed: bytes) -> KemPrivateKey: ...

    def encapsulate(self, alg: KemAlg, public: bytes) -> tuple[bytes, bytes]:
        """Return (ciphertext, shared secret). Raises CryptoError on a malformed key."""
        ...

    def decapsulate(self, key: KemPrivateKey, ciphertext: bytes) -> bytes: ...

    def sig_keygen(self, alg: SigAlg, seed: bytes) -> SigPrivateKey: ...

    def sign(self, key: SigPrivateKey, message: bytes, context: bytes) -> bytes: ...

    def verify(
        self, alg: SigAlg, public: bytes, message: bytes, signature: bytes, context: bytes
    ) -> bool: ...


def get_provider(name: str = "pyca") -> Provider:
    """Return the named provider; raise ProviderUnavailable with the reason when it cannot load."""
    if name == "pyca":
        from gateway.crypto._pyca import PycaProvider  # noqa: PLC0415 -- circular: _pyca imports this module

        return PycaProvider()
    if name == "oqs":
        from gateway.crypto._oqs import OqsProvider  # noqa: PLC0415 -- optional provider loads only on demand

        return OqsProvider()
    raise ProviderUnavailable(f"unknown crypto provider {name!r} (known: pyca, oqs)")


# --- hashing, KDF, MAC -------------------------------------------------------------------


def sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def hmac_sha384(key: bytes, data: bytes) -> bytes:
    return _hmac.new(key, data, hashlib.sha384).digest()


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-384 (RFC 5869 2.2): PRK = HMAC-SHA384(salt, IKM)."""
    return hmac_sha384(salt if salt else bytes(HASH_LEN), ikm)


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand with SHA-384 (RFC 5869 2.3)."""
    if len(prk) != HASH_LEN:
        raise CryptoError("HKDF-Expand: PRK must be 48 bytes")
    return HKDFExpand(algorithm=hashes.SHA384(), length=length, info=info).derive(prk)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return _hmac.compare_digest(a, b)


def poly1305_tag(key: bytes, message: bytes) -> bytes:
    """One-time Poly1305 (RFC 8439 2.5). The 32-byte key r||s MUST be used for one message only."""
    if len(key) != POLY1305_KEY_LEN:
        raise CryptoError("Poly1305 key must be 32 bytes")
    return _poly1305.Poly1305.generate_tag(key, message)


def poly1305_verify(key: bytes, message: bytes, tag: bytes) -> bool:
    if len(key) != POLY1305_KEY_LEN:
        raise CryptoError("Poly1305 key must be 32 bytes")
    try:
        _poly1305.Poly1305.verify_tag(key, message, tag)
    except InvalidSignature:
        return False
    return True


# --- X25519 ---------------------------------------------------------------------------------


class X25519PrivateKey:
    """An X25519 private key; prints as <secret>."""

    __slots__ = ("_key",)

    def __init__(self, seed: bytes) -> None:
        if len(seed) != X25519_LEN:
            raise CryptoError("X25519 private key must be 32 bytes")
        self._key: _x25519.X25519PrivateKey | None = _x25519.X25519PrivateKey.from_private_bytes(
            seed
        )

    def public_bytes(self) -> bytes:
        if self._key is None:
            raise CryptoError("X25519 key was wiped")
        return self._key.public_key().public_bytes_raw()

    def exchange(self, peer_public: bytes) -> bytes:
        """X25519(priv, peer). Raises AuthenticationError for a low-order peer key (all-zero output)."""
        if self._key is None:
            raise CryptoError("X25519 key was wiped")
        if len(peer_public) != X25519_LEN:
            raise AuthenticationError("X25519 public key must be 32 bytes")
        try:
            shared = self._key.exchange(_x25519.X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # OpenSSL refuses all-zero shared secrets
            raise AuthenticationError("X25519 peer key has low order") from exc
        return shared

    def wipe(self) -> None:
        self._key = None

    def __repr__(self) -> str:
        return "<secret>"


# --- AEAD -----------------------------------------------------------------------------------


class Aead:
    """AES-256-GCM under one key. Prints as <secret>."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != AEAD_KEY_LEN:
            raise CryptoError("AES-256-GCM key must be 32 bytes")
        self._aead: AESGCM | None = AESGCM(key)

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        if self._aead is None:
            raise CryptoError("AEAD key was wiped")
        return self._aead.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        if self._aead is None:
            raise CryptoError("AEAD key was wiped")
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag as exc:
            raise AuthenticationError("record authentication failed") from exc

    def wipe(self) -> None:
        self._aead = None

    def __repr__(self) -> str:
        return "<secret>"
