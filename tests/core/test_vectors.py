"""Known-answer vectors for the key schedule and the rekey chain (tests/vectors/key_schedule.json).

Two checks: the implementation reproduces the recorded file, and an independent HKDF-SHA-384
written here from RFC 5869 (on Python's hmac module, not gateway.crypto) reproduces it too,
following the cascade as docs/protocol.md §4 states it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

import pytest

from gateway.core import schedule
from tests.vectors import load_vectors

CASES = load_vectors("key_schedule")
PROTOCOL = b"qgw/1 ML-KEM+X25519+QKD HKDF-SHA384 AES-256-GCM"  # docs/protocol.md §2, restated


def _h(b: str | None) -> bytes | None:
    return None if b is None else bytes.fromhex(b)


# --- independent reference (RFC 5869 + docs/protocol.md §4) ---


def ref_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha384).digest()


def ref_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha384).digest()
        out += t
        i += 1
    return out[:length]


def ref_label(secret: bytes, label: str, ctx: bytes, length: int = 48) -> bytes:
    full = b"qgw1 " + label.encode()
    info = struct.pack(">H", length) + bytes([len(full)]) + full + bytes([len(ctx)]) + ctx
    return ref_expand(secret, info, length)


def ref_keys(secret: bytes, th: bytes) -> dict[str, str]:
    ms = ref_label(secret, "master", th)
    return {
        "key_i2r": ref_label(ms, "i2r key", b"", 32).hex(),
        "iv_i2r": ref_label(ms, "i2r iv", b"", 12).hex(),
        "key_r2i": ref_label(ms, "r2i key", b"", 32).hex(),
        "iv_r2i": ref_label(ms, "r2i iv", b"", 12).hex(),
        "chain": ref_label(ms, "chain", b"").hex(),
    }


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_implementation_matches_recorded_vectors(case: dict[str, Any]) -> None:
    i = case["inputs"]
    bs = schedule.bootstrap_secret(
        _h(i["psk"]), _h(i["qkd"]), bytes.fromhex(i["mlkem_ss"]), bytes.fromhex(i["x25519_ss"])
    )
    for k in ("S0", "S1", "S2", "S3"):
        assert bs[k].hex() == case[k], k
    keys = schedule.epoch_keys(bs["S3"], bytes.fromhex(i["th3"]))
    assert keys.chain.hex() == case["chain"]
    assert keys.key_i2r.hex() == case["key_i2r"]
    assert keys.iv_r2i.hex() == case["iv_r2i"]
    for rk in case["rekeys"]:
        ri = rk["inputs"]
        rs = schedule.rekey_secret(
            *(bytes.fromhex(ri[k]) for k in ("chain_prev", "qkd", "mlkem_ss", "x25519_ss"))
        )
        for k in ("R0", "R1", "R2"):
            assert rs[k].hex() == rk[k], k
        ks = schedule.epoch_keys(rs["R2"], bytes.fromhex(ri["th"]))
        assert ks.chain.hex() == rk["chain"]
        assert ks.key_r2i.hex() == rk["key_r2i"]
        mi, mr = schedule.rekey_mac_keys(bytes.fromhex(ri["chain_prev"]), rk["epoch"])
        assert (mi.hex(), mr.hex()) == (rk["mac_i"], rk["mac_r"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_independent_reference_matches_vectors(case: dict[str, Any]) -> None:
    i = case["inputs"]
    zero = bytes(32)
    s0 = ref_extract(hashlib.sha384(PROTOCOL).digest(), _h(i["psk"]) or zero)
    s1 = ref_extract(ref_label(s0, "derived", b""), _h(i["qkd"]) or zero)
    s2 = ref_extract(ref_label(s1, "derived", b""), bytes.fromhex(i["mlkem_ss"]))
    s3 = ref_extract(ref_label(s2, "derived", b""), bytes.fromhex(i["x25519_ss"]))
    assert [s0.hex(), s1.hex(), s2.hex(), s3.hex()] == [
        case["S0"],
        case["S1"],
        case["S2"],
        case["S3"],
    ]
    k = ref_keys(s3, bytes.fromhex(i["th3"]))
    assert all(k[n] == case[n] for n in k)
    chain = bytes.fromhex(case["chain"])
    for rk in case["rekeys"]:
        ri = rk["inputs"]
        assert ri["chain_prev"] == chain.hex()  # the rekeys are chained
        r0 = ref_extract(chain, bytes.fromhex(ri["qkd"]))
        r1 = ref_extract(ref_label(r0, "derived", b""), bytes.fromhex(ri["mlkem_ss"]))
        r2 = ref_extract(ref_label(r1, "derived", b""), bytes.fromhex(ri["x25519_ss"]))
        assert [r0.hex(), r1.hex(), r2.hex()] == [rk["R0"], rk["R1"], rk["R2"]]
        rkeys = ref_keys(r2, bytes.fromhex(ri["th"]))
        assert all(rkeys[n] == rk[n] for n in rkeys)
        ctx = struct.pack(">I", rk["epoch"])
        assert ref_label(chain, "rekey i mac", ctx).hex() == rk["mac_i"]
        assert ref_label(chain, "rekey r mac", ctx).hex() == rk["mac_r"]
        chain = bytes.fromhex(rk["chain"])


def test_each_input_changes_the_output() -> None:
    base = [bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32, bytes([4]) * 32]
    ref = schedule.bootstrap_secret(*base)["S3"]
    for n in range(4):
        changed = list(base)
        changed[n] = bytes([9]) * 32
        assert schedule.bootstrap_secret(*changed)["S3"] != ref
    # absence (zeros) differs from presence
    assert schedule.bootstrap_secret(base[0], None, base[2], base[3])["S3"] != ref
