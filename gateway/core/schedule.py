"""Key schedule (docs/protocol.md §4): an HKDF-SHA-384 cascade.

Bootstrap::

    KS1  S0 = Extract(salt = H(PROTOCOL),  ikm = PSK            or 0^32)
    KS2  S1 = Extract(salt = Derive(S0),   ikm = QKD key[0:32]  or 0^32)
    KS3  S2 = Extract(salt = Derive(S1),   ikm = ML-KEM shared secret (32))
    KS4  S3 = Extract(salt = Derive(S2),   ikm = X25519 shared secret (32))
    KS5  MS = Expand(S3, "master", TH3)
    KS6  traffic keys/IVs and chain_0 = Expand(MS, label, "")

Rekey to epoch n (chained from the previous epoch's chain key)::

    RK-KS1  R0 = Extract(salt = chain_{n-1}, ikm = QKD key[0:32] or 0^32)
    RK-KS2  R1 = Extract(salt = Derive(R0),   ikm = ML-KEM shared secret)
    RK-KS3  R2 = Extract(salt = Derive(R1),   ikm = X25519 shared secret)
    RK-KS4  MS_n = Expand(R2, "master", TH_rk); keys and chain_n as KS6

``Derive(S) = Expand(S, "derived", "", 48)``. Absent inputs are fixed-length zero strings;
their absence is recorded in the authenticated transcript (flags), never implied.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gateway.core import labels as L
from gateway.crypto import (
    AEAD_KEY_LEN,
    AEAD_NONCE_LEN,
    HASH_LEN,
    hkdf_expand,
    hkdf_extract,
    sha384,
)

ZERO_IKM = bytes(32)


def hkdf_label(label: bytes, context: bytes, length: int) -> bytes:
    full = L.LABEL_PREFIX + label
    return struct.pack(">H", length) + bytes([len(full)]) + full + bytes([len(context)]) + context


def expand_label(secret: bytes, label: bytes, context: bytes, length: int = HASH_LEN) -> bytes:
    return hkdf_expand(secret, hkdf_label(label, context, length), length)


def derive(secret: bytes) -> bytes:
    return expand_label(secret, L.L_DERIVED, b"")


def _fixed(ikm: bytes | None, name: str) -> bytes:
    if ikm is None:
        return ZERO_IKM
    if len(ikm) < 32:
        raise ValueError(f"{name} must provide at least 32 bytes")
    return ikm[:32]


def _kem_secret(ss: bytes) -> bytes:
    """The KEM slot takes the KEM's whole shared secret: 32 bytes (ML-KEM) or 24 (FrodoKEM-976)."""
    if len(ss) not in (24, 32):
        raise ValueError("KEM secret must be 24 or 32 bytes")
    return ss


@dataclass(frozen=True, slots=True)
class EpochKeys:
    """Traffic keys of one epoch (both directions) and the chain key for the next one."""

    key_i2r: bytes
    iv_i2r: bytes
    key_r2i: bytes
    iv_r2i: bytes
    chain: bytes

    def __repr__(self) -> str:
        return "EpochKeys(<secret>)"


def psk_secret(psk: bytes | None) -> bytes:
    """KS1: S0."""
    return hkdf_extract(sha384(L.PROTOCOL), _fixed(psk, "PSK"))


def bootstrap_secret(
    psk: bytes | None, qkd: bytes | None, mlkem_ss: bytes, x25519_ss: bytes
) -> dict[str, bytes]:
    """KS1..KS4: returns every intermediate (for vectors); ``S3`` is the handshake secret."""
    s0 = psk_secret(psk)  # KS1
    s1 = hkdf_extract(derive(s0), _fixed(qkd, "QKD key"))  # KS2
    s2 = hkdf_extract(derive(s1), _kem_secret(mlkem_ss))  # KS3
    s3 = hkdf_extract(derive(s2), _fixed(x25519_ss, "X25519 secret"))  # KS4
    return {"S0": s0, "S1": s1, "S2": s2, "S3": s3}


def rekey_secret(
    chain_prev: bytes, qkd: bytes | None, mlkem_ss: bytes, x25519_ss: bytes
) -> dict[str, bytes]:
    """RK-KS1..RK-KS3: returns every intermediate; ``R2`` is the rekey secret."""
    r0 = hkdf_extract(chain_prev, _fixed(qkd, "QKD key"))  # RK-KS1
    r1 = hkdf_extract(derive(r0), _kem_secret(mlkem_ss))  # RK-KS2
    r2 = hkdf_extract(derive(r1), _fixed(x25519_ss, "X25519 secret"))  # RK-KS3
    return {"R0": r0, "R1": r1, "R2": r2}


def epoch_keys(secret: bytes, transcript_hash: bytes) -> EpochKeys:
    """KS5/KS6 (and RK-KS4): master secret bound to the transcript, then per-direction keys."""
    ms = expand_label(secret, L.L_MASTER, transcript_hash)
    return EpochKeys(
        key_i2r=expand_label(ms, L.L_KEY_I2R, b"", AEAD_KEY_LEN),
        iv_i2r=expand_label(ms, L.L_IV_I2R, b"", AEAD_NONCE_LEN),
        key_r2i=expand_label(ms, L.L_KEY_R2I, b"", AEAD_KEY_LEN),
        iv_r2i=expand_label(ms, L.L_IV_R2I, b"", AEAD_NONCE_LEN),
        chain=expand_label(ms, L.L_CHAIN, b""),
    )


def rekey_mac_keys(chain_prev: bytes, new_epoch: int) -> tuple[bytes, bytes]:
    """HMAC keys of REKEY_INIT and REKEY_RESP for ``new_epoch`` (from the previous chain key)."""
    ctx = struct.pack(">I", new_epoch)
    return (
        expand_label(chain_prev, L.L_REKEY_MAC_I, ctx),
        expand_label(chain_prev, L.L_REKEY_MAC_R, ctx),
    )


def finished_key(s3: bytes, label: bytes, th: bytes) -> bytes:
    return expand_label(s3, label, th)


def psk_auth_key(s0: bytes, label: bytes, th: bytes) -> bytes:
    return expand_label(s0, label, th)


def admission_key_psk(s0: bytes) -> bytes:
    return expand_label(s0, L.L_ADMISSION_PSK, b"")


def admission_key_pki(suite: int, responder: str) -> bytes:
    """Public-knowledge admission key (WireGuard mac1 analogue): stops blind garbage only."""
    return sha384(L.L_ADMISSION_MAC1 + bytes([suite]) + responder.encode())
