"""ML-KEM and ML-DSA from pyca/cryptography (OpenSSL inside its wheel)."""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

from gateway.crypto import (
    KEM_SEED_LEN,
    KEM_SIZES,
    SIG_SEED_LEN,
    SIG_SIZES,
    KemAlg,
    KemPrivateKey,
    SigAlg,
    SigPrivateKey,
)
from gateway.errors import AuthenticationError, CryptoError, ProviderUnavailable

_KEM: dict[KemAlg, tuple[Any, Any]] = {
    KemAlg.MLKEM768: (mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey),
    KemAlg.MLKEM1024: (mlkem.MLKEM1024PrivateKey, mlkem.MLKEM1024PublicKey),
}
_SIG: dict[SigAlg, tuple[Any, Any]] = {
    SigAlg.MLDSA44: (mldsa.MLDSA44PrivateKey, mldsa.MLDSA44PublicKey),
    SigAlg.MLDSA65: (mldsa.MLDSA65PrivateKey, mldsa.MLDSA65PublicKey),
    SigAlg.MLDSA87: (mldsa.MLDSA87PrivateKey, mldsa.MLDSA87PublicKey),
}


class _PycaKey:
    """A pyca private key object; prints as <secret>."""

    __slots__ = ("_key",)

    def __init__(self, key: Any) -> None:
        self._key = key

    def public_bytes(self) -> bytes:
        return bytes(self._key.public_key().public_bytes_raw())

    def __repr__(self) -> str:
        return "<secret>"


class _PycaKemKey(_PycaKey):
    __slots__ = ("alg",)

    def __init__(self, alg: KemAlg, key: Any) -> None:
        super().__init__(key)
        self.alg = alg


class _PycaSigKey(_PycaKey):
    __slots__ = ("alg",)

    def __init__(self, alg: SigAlg, key: Any) -> None:
        super().__init__(key)
        self.alg = alg


def _ours(alg: KemAlg) -> None:
    if alg not in _KEM:
        raise ProviderUnavailable(f"{alg} needs crypto.provider = 'oqs' (OpenSSL has no {alg})")


class PycaProvider:
    name = "pyca"

    def kem_algorithms(self) -> frozenset[str]:
        return frozenset(a.value for a in _KEM)

    def kem_keygen(self, alg: KemAlg, seed: bytes) -> KemPrivateKey:
        if len(seed) != KEM_SEED_LEN:
            raise CryptoError("ML-KEM seed must be 64 bytes")
        _ours(alg)
        return _PycaKemKey(alg, _KEM[alg][0].from_seed_bytes(seed))

    def encapsulate(self, alg: KemAlg, public: bytes) -> tuple[bytes, bytes]:
        _ours(alg)
        if len(public) != KEM_SIZES[alg][0]:
            raise AuthenticationError(f"{alg} encapsulation key has the wrong length")
        try:
            pub = _KEM[alg][1].from_public_bytes(public)
            shared, ct = pub.encapsulate()
        except ValueError as exc:  # FIPS 203 7.2 modulus check failed
            raise AuthenticationError(f"{alg} encapsulation key is malformed") from exc
        return bytes(ct), bytes(shared)

    def decapsulate(self, key: KemPrivateKey, ciphertext: bytes) -> bytes:
        if not isinstance(key, _PycaKemKey):
            raise CryptoError("key does not belong to the pyca provider")
        if len(ciphertext) != KEM_SIZES[key.alg][1]:
            raise AuthenticationError(f"{key.alg} ciphertext has the wrong length")
        try:
            return bytes(key._key.decapsulate(ciphertext))
        except ValueError as exc:
            raise AuthenticationError(f"{key.alg} ciphertext is malformed") from exc

    def sig_keygen(self, alg: SigAlg, seed: bytes) -> SigPrivateKey:
        if len(seed) != SIG_SEED_LEN:
            raise CryptoError("ML-DSA seed must be 32 bytes")
        return _PycaSigKey(alg, _SIG[alg][0].from_seed_bytes(seed))

    def sign(self, key: SigPrivateKey, message: bytes, context: bytes) -> bytes:
        if not isinstance(key, _PycaSigKey):
            raise CryptoError("key does not belong to the pyca provider")
        return bytes(key._key.sign(message, context))

    def verify(
        self, alg: SigAlg, public: bytes, message: bytes, signature: bytes, context: bytes
    ) -> bool:
        if len(public) != SIG_SIZES[alg][0] or len(signature) != SIG_SIZES[alg][1]:
            return False
        try:
            _SIG[alg][1].from_public_bytes(public).verify(signature, message, context)
        except (InvalidSignature, ValueError):
            return False
        return True

    @staticmethod
    def wrap_signing_key(alg: SigAlg, key: Any) -> SigPrivateKey:
        """Wrap a key loaded from a PEM file (used by gateway.crypto.x509)."""
        return _PycaSigKey(alg, key)
