"""Full-transcript vectors (tests/vectors/transcripts.json, docs/protocol.md "Test vectors").

Two checks per recorded case:

* **replay**: the two real cores run the scenario again with the recorded randomness, the
  recorded encapsulations / signatures and the recorded QKD keys, and must put every frame on
  the wire byte for byte as recorded (any change in the code's output fails here);
* **independent recomputation**: every frame of the known types is rebuilt from the recorded
  inputs with code written here from docs/protocol.md alone (frame layouts with ``struct``,
  HKDF from RFC 5869 on Python's ``hmac``; X25519, ML-KEM, ML-DSA verification, Poly1305 and
  AES-GCM through gateway.crypto), and every recorded intermediate value is checked too.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import struct
from typing import Any

import pytest

from gateway.crypto import (
    Aead,
    KemAlg,
    SigAlg,
    X25519PrivateKey,
    get_provider,
    poly1305_tag,
    x509,
)
from tests.core.test_vectors import ref_extract, ref_label
from tests.vectors import load_vectors
from tests.vectors.make_transcripts import (
    CASES,
    ListKme,
    ReplayProvider,
    ReplayRng,
    app_payloads,
    run_scenario,
)

VECTORS = load_vectors("transcripts")
PYCA = get_provider("pyca")
IDS = [v["name"] for v in VECTORS]

# docs/protocol.md, restated here on purpose (not imported from gateway.core.labels)
PROTOCOL = b"qgw/1 ML-KEM+X25519+QKD HKDF-SHA384 AES-256-GCM"
INIT, RESP, CONFIRM, REKEY_INIT, REKEY_RESP, RECORD, ALERT = 1, 2, 3, 4, 5, 0x10, 0x30
CHALLENGE, HELLO, ADMIT = 6, 7, 8
KNOWN_TYPES = {INIT, RESP, CONFIRM, REKEY_INIT, REKEY_RESP, CHALLENGE, HELLO, ADMIT, RECORD, ALERT}
DATA, EPOCH_CONFIRM, CLOSE = 1, 5, 6
SIG_CTX = b"qgw/1 handshake"


def _h(x: str) -> bytes:
    return bytes.fromhex(x)


def sha384(b: bytes) -> bytes:
    return hashlib.sha384(b).digest()


def hmac384(k: bytes, m: bytes) -> bytes:
    return hmac.new(k, m, hashlib.sha384).digest()


def frame(ftype: int, body: bytes) -> bytes:
    return struct.pack(">IB", 1 + len(body), ftype) + body


def vec8(b: bytes) -> bytes:
    return bytes([len(b)]) + b


def vec16(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def certs(chain: list[bytes]) -> bytes:
    return bytes([len(chain)]) + b"".join(len(d).to_bytes(3, "big") + d for d in chain)


def key_id(text: str) -> bytes:
    """RFC 4122 byte order: the 32 hex digits of the text form in order (§3)."""
    return bytes.fromhex(text.replace("-", ""))


def x25519_pub(priv: bytes) -> bytes:
    return X25519PrivateKey(priv).public_bytes()


def x25519(priv: bytes, pub: bytes) -> bytes:
    return X25519PrivateKey(priv).exchange(pub)


def epoch_keys(secret: bytes, th: bytes) -> dict[str, bytes]:
    """KS5/KS6 (RK-KS4)."""
    ms = ref_label(secret, "master", th)
    return {
        "MS": ms,
        "key_i2r": ref_label(ms, "i2r key", b"", 32),
        "iv_i2r": ref_label(ms, "i2r iv", b"", 12),
        "key_r2i": ref_label(ms, "r2i key", b"", 32),
        "iv_r2i": ref_label(ms, "r2i iv", b"", 12),
        "chain": ref_label(ms, "chain", b""),
    }


class Reference:
    """An independent reader of one recorded case, following docs/protocol.md step by step."""

    def __init__(self, vec: dict[str, Any]) -> None:
        self.vec = vec
        self.cfg = vec["config"]
        self.kem = KemAlg.MLKEM768 if self.cfg["suite"] == 1 else KemAlg.MLKEM1024
        self.psk = _h(self.cfg["psk"]) if self.cfg["auth_mode"] == "psk" else None
        self.kme = {k["key_ID"]: _h(k["key"]) for k in vec["kme_keys"]}
        self.exchanges = list(vec["exchanges"])
        self.records = {(r["connection"], r["frame"]): r for r in vec["records"]}
        self.keys: dict[int, dict[str, bytes]] = {}
        self.chain = b""
        self.seq: dict[tuple[int, str, int], int] = {}
        self.data: list[bytes] = []
        self.checked = 0
        self.values_checked = 0

    def check_values(self, ex: dict[str, Any], got: dict[str, bytes]) -> None:
        for name, value in got.items():
            assert ex["values"][name] == value.hex(), f"epoch {ex['epoch']}: {name}"
            self.values_checked += 1

    def frames(self, conn: int, frames: list[dict[str, Any]]) -> None:
        pending: dict[str, Any] = {}
        adm: dict[str, Any] = {}
        for index, f in enumerate(frames):
            raw, direction = _h(f["hex"]), f["dir"]
            ftype = raw[4]
            assert struct.unpack(">I", raw[:4])[0] == len(raw) - 4
            if ftype not in KNOWN_TYPES:
                continue  # a frame type this reference does not know yet (the replay checks it)
            if ftype == CHALLENGE:
                assert direction == "r2i"
                ex = self.exchanges.pop(0)
                assert ex["kind"] == "admission"
                adm = {"ex": ex, "challenge": self.challenge(ex)}
                built = adm["challenge"]
            elif ftype == HELLO:
                assert direction == "i2r"
                adm["hello"] = built = self.hello(adm["ex"], adm["challenge"])
            elif ftype == ADMIT:
                assert direction == "r2i"
                built = self.admit(adm["ex"], adm["challenge"], adm["hello"])
            elif ftype == INIT:
                assert direction == "i2r"
                ex = self.exchanges.pop(0)
                assert ex["kind"] == "bootstrap"
                pending = {"ex": ex, "init": self.init(ex)}
                built = pending["init"]
            elif ftype == RESP:
                assert direction == "r2i"
                pending["resp"] = built = self.resp(pending["ex"], pending["init"])
            elif ftype == CONFIRM:
                assert direction == "i2r"
                built = self.confirm(pending["ex"], pending["init"], pending["resp"])
            elif ftype == REKEY_INIT:
                assert direction == "i2r"
                ex = self.exchanges.pop(0)
                assert ex["kind"] == "rekey"
                pending = {"ex": ex, "rk_init": self.rekey_init(ex)}
                built = pending["rk_init"]
            elif ftype == REKEY_RESP:
                assert direction == "r2i"
                built = self.rekey_resp(pending["ex"], pending["rk_init"])
            elif ftype == RECORD:
                built = self.record(conn, index, direction, raw)
            else:
                raise AssertionError(f"frame type {ftype:#x} in a happy-path transcript")
            assert built == raw, f"connection {conn} frame {index} ({f['type']}) differs"
            self.checked += 1

    # --- admission (§3.5 AD1-AD5) ---

    def challenge(self, ex: dict[str, Any]) -> bytes:
        return frame(CHALLENGE, bytes([1]) + _h(ex["inputs"]["cookie"]))

    def _admission_keys(self, ex: dict[str, Any]) -> tuple[bytes, bytes]:
        c, e = self.cfg, ex["epoch"]
        if self.chain:  # the initiator holds a chain: resume, proven with chain_e
            assert ex["inputs"]["hello_kind"] == 1
            ctx = struct.pack(">I", e)
            return ref_label(self.chain, "resume hello", ctx), ref_label(
                self.chain, "resume admit", ctx
            )
        assert ex["inputs"]["hello_kind"] == 0
        assert e == 0
        if self.psk is not None:
            s0 = ref_extract(sha384(PROTOCOL), self.psk)
            return ref_label(s0, "bootstrap hello", b""), ref_label(s0, "bootstrap admit", b"")
        suite = bytes([c["suite"]])
        return sha384(b"qgw1 mac1" + suite + c["id_r"].encode()), sha384(
            b"qgw1 mac1" + suite + c["id_i"].encode()
        )

    def hello(self, ex: dict[str, Any], challenge: bytes) -> bytes:
        c, e = self.cfg, ex["epoch"]
        kind = 1 if self.chain else 0
        core = (
            bytes([1, c["suite"], 1 if c["auth_mode"] == "pki" else 2, c["qkd_policy"], kind])
            + struct.pack(">I", e)
            + vec8(c["id_i"].encode())
            + vec8(c["id_r"].encode())
            + _h(ex["inputs"]["n_hello"])  # §3.5: 32 bytes, after id_r
        )
        k_hello, _ = self._admission_keys(ex)
        proof = hmac384(k_hello, core + challenge[5 + 1 :])[:32]
        self.check_values(ex, {"HELLO_core": core, "K_hello": k_hello, "hello_proof": proof})
        return frame(HELLO, core + proof)

    def admit(self, ex: dict[str, Any], challenge: bytes, hello: bytes) -> bytes:
        kind = 1 if self.chain else 0
        core = bytes([kind]) + struct.pack(">I", ex["epoch"])
        _, k_admit = self._admission_keys(ex)
        h = sha384(challenge + hello)
        proof = hmac384(k_admit, h + core)[:32]
        got = {"H_CHALLENGE_HELLO": h, "ADMIT_core": core, "K_admit": k_admit}
        self.check_values(ex, got | {"admit_proof": proof})
        return frame(ADMIT, core + proof)

    # --- bootstrap (§3, §4 KS1-KS6) ---

    def init(self, ex: dict[str, Any]) -> bytes:
        i, c = ex["inputs"], self.cfg
        ek_i = PYCA.kem_keygen(self.kem, _h(i["ek_seed_i"])).public_bytes()
        x_i = x25519_pub(_h(i["x_priv_i"]))
        kid = key_id(i["qkd_key_id"]) if i["qkd_offered"] else bytes(16)
        core = (
            bytes([1, c["suite"], 1 if c["auth_mode"] == "pki" else 2, c["qkd_policy"]])
            + bytes([int(i["qkd_offered"])])
            + kid
            + _h(i["n_i"])
            + vec8(c["id_i"].encode())
            + vec8(c["id_r"].encode())
            + vec16(ek_i)
            + x_i
        )
        s0 = ref_extract(sha384(PROTOCOL), self.psk or bytes(32))
        if self.psk is not None:
            k_adm = ref_label(s0, "init admission", b"")
        else:
            k_adm = sha384(b"qgw1 mac1" + bytes([c["suite"]]) + c["id_r"].encode())
        adm = hmac384(k_adm, core)[:32]
        self.check_values(ex, {"K_adm": k_adm, "INIT_core": core, "adm": adm, "ek_i": ek_i})
        self.check_values(ex, {"X_i": x_i, "S0": s0})
        return frame(INIT, core + adm)

    def _peer_public(self, side: str) -> bytes:
        chain = [_h(d) for d in self.cfg[f"certs_{side}"]]
        now = datetime.datetime.fromisoformat(self.cfg["wall_clock"])
        peer = x509.verify_peer(
            chain, self.cfg["ca_pem"].encode(), self.cfg[f"id_{side}"], now, {SigAlg.MLDSA65}
        )
        return peer.public_key

    def resp(self, ex: dict[str, Any], init: bytes) -> bytes:
        i = ex["inputs"]
        ct, x_r = _h(i["ct"]), x25519_pub(_h(i["x_priv_r"]))
        dk = PYCA.kem_keygen(self.kem, _h(i["ek_seed_i"]))
        ss_kem = PYCA.decapsulate(dk, ct)
        ss_x = x25519(_h(i["x_priv_i"]), x_r)
        assert ss_x == x25519(_h(i["x_priv_r"]), x25519_pub(_h(i["x_priv_i"])))
        qkd = self.kme[i["qkd_key_id"]][:32] if i["qkd_used"] else bytes(32)
        if i["qkd_used"]:
            assert _h(i["qkd_key"]) == self.kme[i["qkd_key_id"]]
        s0 = ref_extract(sha384(PROTOCOL), self.psk or bytes(32))
        s1 = ref_extract(ref_label(s0, "derived", b""), qkd)
        s2 = ref_extract(ref_label(s1, "derived", b""), ss_kem)
        s3 = ref_extract(ref_label(s2, "derived", b""), ss_x)
        chain_r = [_h(d) for d in self.cfg.get("certs_r", [])]
        core = _h(i["n_r"]) + bytes([int(i["qkd_used"])]) + vec16(ct) + x_r + certs(chain_r)
        th2 = sha384(init + core)
        got = {"X_r": x_r, "ss_kem": ss_kem, "ss_x": ss_x, "S1": s1, "S2": s2, "S3": s3}
        if self.psk is not None:
            k_psk_r = ref_label(s0, "r psk auth", th2)
            auth_r = hmac384(k_psk_r, th2)
            got["K_psk_r"] = k_psk_r
        else:
            auth_r = _h(i["sig_r"])
            msg = b"qgw/1 responder signs TH2" + th2
            assert PYCA.verify(SigAlg.MLDSA65, self._peer_public("r"), msg, auth_r, SIG_CTX)
        th2s = sha384(init + core + vec16(auth_r))
        k_fin_r = ref_label(s3, "r finished", th2s)
        fin_r = hmac384(k_fin_r, th2s)
        got |= {"RESP_core": core, "TH2": th2, "auth_r": auth_r, "TH2s": th2s}
        self.check_values(ex, got | {"K_fin_r": k_fin_r, "fin_r": fin_r})
        self._s3 = s3
        self._s0 = s0
        return frame(RESP, core + vec16(auth_r) + fin_r)

    def confirm(self, ex: dict[str, Any], init: bytes, resp: bytes) -> bytes:
        i = ex["inputs"]
        core = certs([_h(d) for d in self.cfg.get("certs_i", [])])
        th3a = sha384(init + resp + core)
        got = {"CONFIRM_core": core, "TH3a": th3a}
        if self.psk is not None:
            k_psk_i = ref_label(self._s0, "i psk auth", th3a)
            auth_i = hmac384(k_psk_i, th3a)
            got["K_psk_i"] = k_psk_i
        else:
            auth_i = _h(i["sig_i"])
            msg = b"qgw/1 initiator signs TH3a" + th3a
            assert PYCA.verify(SigAlg.MLDSA65, self._peer_public("i"), msg, auth_i, SIG_CTX)
        th3s = sha384(init + resp + core + vec16(auth_i))
        k_fin_i = ref_label(self._s3, "i finished", th3s)
        out = frame(CONFIRM, core + vec16(auth_i) + hmac384(k_fin_i, th3s))
        th3 = sha384(init + resp + out)
        keys = epoch_keys(self._s3, th3)
        got |= {"auth_i": auth_i, "TH3s": th3s, "K_fin_i": k_fin_i, "TH3": th3}
        self.check_values(ex, got | {"fin_i": hmac384(k_fin_i, th3s), **keys})
        self.keys[0], self.chain = keys, keys["chain"]
        return out

    # --- rekey and resumption (§5, RK-KS1-RK-KS4) ---

    def rekey_init(self, ex: dict[str, Any]) -> bytes:
        i, e = ex["inputs"], ex["epoch"]
        assert _h(i["chain_prev"]) == self.chain  # the rekeys are chained
        mk_i = ref_label(self.chain, "rekey i mac", struct.pack(">I", e))
        ek = PYCA.kem_keygen(self.kem, _h(i["ek_seed"])).public_bytes()
        x = x25519_pub(_h(i["x_priv"]))
        ids = b"".join(key_id(k) for k in i["key_ids"]) if i["qkd_offered"] else bytes(48)
        a_i = (
            bytes([REKEY_INIT])
            + struct.pack(">I", e)
            + _h(i["n"])
            + bytes([int(i["qkd_offered"])])
            + ids
            + vec16(ek)
            + x
        )
        k1 = self.kme[i["key_ids"][1]][:32] if i["qkd_offered"] else None
        wc1 = poly1305_tag(k1, a_i) if k1 else bytes(16)
        mac_i = hmac384(mk_i, a_i + wc1)
        self.check_values(ex, {"MK_i": mk_i, "ek": ek, "X": x, "A_i": a_i, "WC_1": wc1})
        self.check_values(ex, {"mac_i": mac_i})
        # A_i begins with the type byte: the frame is u32 length || A_i || WC_1 || mac_i
        return struct.pack(">I", len(a_i) + 64) + a_i + wc1 + mac_i

    def rekey_resp(self, ex: dict[str, Any], rk_init: bytes) -> bytes:
        i, e = ex["inputs"], ex["epoch"]
        mk_r = ref_label(self.chain, "rekey r mac", struct.pack(">I", e))
        ct, x_r = _h(i["ct"]), x25519_pub(_h(i["x_priv_r"]))
        a_r = (
            bytes([REKEY_RESP])
            + struct.pack(">I", e)
            + _h(i["n_r"])
            + bytes([int(i["qkd_used"])])
            + vec16(ct)
            + x_r
        )
        h_init = sha384(rk_init)
        used = i["qkd_used"]
        wc2 = poly1305_tag(self.kme[i["key_ids"][2]][:32], h_init + a_r) if used else bytes(16)
        mac_r = hmac384(mk_r, h_init + a_r + wc2)
        out = struct.pack(">I", len(a_r) + 64) + a_r + wc2 + mac_r
        ss_kem = PYCA.decapsulate(PYCA.kem_keygen(self.kem, _h(i["ek_seed"])), ct)
        ss_x = x25519(_h(i["x_priv"]), x_r)
        k0 = self.kme[i["key_ids"][0]][:32] if used else bytes(32)
        r0 = ref_extract(self.chain, k0)
        r1 = ref_extract(ref_label(r0, "derived", b""), ss_kem)
        r2 = ref_extract(ref_label(r1, "derived", b""), ss_x)
        th = sha384(rk_init + out)
        keys = epoch_keys(r2, th)
        got = {"MK_r": mk_r, "X_r": x_r, "A_r": a_r, "H_REKEY_INIT": h_init, "WC_2": wc2}
        got |= {"mac_r": mac_r, "ss_kem": ss_kem, "ss_x": ss_x, "R0": r0, "R1": r1, "R2": r2}
        self.check_values(ex, got | {"TH_rk": th, **keys})
        self.keys[e], self.chain = keys, keys["chain"]
        return out

    # --- records (§6 REC1) ---

    def record(self, conn: int, index: int, direction: str, raw: bytes) -> bytes:
        rec = self.records[(conn, index)]
        epoch, seq = rec["epoch"], rec["seq"]
        k = self.keys[epoch]
        key, iv = k[f"key_{direction}"], k[f"iv_{direction}"]
        expected_seq = self.seq.get((conn, direction, epoch), 0)
        assert seq == expected_seq, "seq starts at 0 per epoch and direction and counts up"
        self.seq[(conn, direction, epoch)] = seq + 1
        nonce = bytes(a ^ b for a, b in zip(iv, bytes(4) + struct.pack(">Q", seq), strict=True))
        plaintext = bytes([rec["content_type"]]) + _h(rec["data"])
        aad = struct.pack(">IBIQ", 13 + len(plaintext) + 16, RECORD, epoch, seq)
        ct = Aead(key).seal(nonce, plaintext, aad)
        assert (rec["key"], rec["iv"], rec["nonce"]) == (key.hex(), iv.hex(), nonce.hex())
        assert (rec["aad"], rec["ciphertext"]) == (aad.hex(), ct.hex())
        assert len(ct) == len(plaintext) + 16  # the GCM tag is appended
        if rec["content_type"] == DATA:
            self.data.append(_h(rec["data"]))
        return aad + ct


def _replay(vec: dict[str, Any]) -> list[list[tuple[str, bytes]]]:
    case = next(c for c in CASES if c.name == vec["name"])
    draws = vec["rng_draws"]
    rngs = ReplayRng([_h(d) for d in draws["i"]]), ReplayRng([_h(d) for d in draws["r"]])
    provider = ReplayProvider(PYCA, vec["provider_log"])
    kme = ListKme([(k["key_ID"], _h(k["key"])) for k in vec["kme_keys"]])
    frames = run_scenario(case, vec["config"], provider, rngs, kme)
    assert rngs[0].left == rngs[1].left == 0, "recorded randomness left over"
    assert provider.left == 0, "recorded encapsulations or signatures left over"
    return frames


REGENERATE = (
    "the cores' output differs from tests/vectors/transcripts.json; if the protocol change "
    "is intended, run `python -m tests.vectors.make_transcripts` and review the diff"
)


@pytest.mark.parametrize("vec", VECTORS, ids=IDS)
def test_cores_reproduce_every_recorded_frame(vec: dict[str, Any]) -> None:
    try:
        frames = _replay(vec)
    except AssertionError as exc:
        raise AssertionError(f"{REGENERATE}: {exc}") from exc
    recorded = [[(f["dir"], _h(f["hex"])) for f in c["frames"]] for c in vec["connections"]]
    assert len(frames) == len(recorded)
    for n, (got, want) in enumerate(zip(frames, recorded, strict=True)):
        assert len(got) == len(want), f"connection {n}: frame count; {REGENERATE}"
        for k, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, f"connection {n} frame {k} ({want[k][1][4]:#x}) differs; {REGENERATE}"


@pytest.mark.parametrize("vec", VECTORS, ids=IDS)
def test_independent_reference_rebuilds_every_frame_and_value(vec: dict[str, Any]) -> None:
    ref = Reference(vec)
    for n, conn in enumerate(vec["connections"]):
        ref.frames(n, conn["frames"])
    known = [f for c in vec["connections"] for f in c["frames"] if _h(f["hex"])[4] in KNOWN_TYPES]
    assert ref.checked == len(known)
    assert not ref.exchanges, "exchanges recorded without their frames"
    total = sum(len(ex["values"]) for ex in vec["exchanges"])
    assert ref.values_checked == total, "every recorded intermediate value was recomputed"
    # the DATA records carry the bridge's application payloads, in the order sent
    payloads = [p for _, _, p in app_payloads()]
    assert ref.data == payloads * (len(ref.data) // len(payloads))


@pytest.mark.parametrize("vec", VECTORS, ids=IDS)
def test_vectors_cover_bootstrap_two_rekeys_close_and_resumption(vec: dict[str, Any]) -> None:
    case = next(c for c in CASES if c.name == vec["name"])
    exchanges = [ex for ex in vec["exchanges"] if ex["kind"] != "admission"]
    kinds = [(ex["kind"], ex["epoch"], ex["frames"][0]["connection"]) for ex in exchanges]
    assert kinds == [("bootstrap", 0, 0), ("rekey", 1, 0), ("rekey", 2, 0), ("rekey", 3, 1)]
    admissions = [(ex["epoch"], ex["frames"][0]) for ex in vec["exchanges"] if ex not in exchanges]
    assert admissions == [(0, {"connection": 0, "frame": 0}), (2, {"connection": 1, "frame": 0})]
    flags = [(ex["inputs"]["qkd_offered"], ex["inputs"]["qkd_used"]) for ex in exchanges]
    plan = {"both": (True, True), "i_down": (False, False), "r_down": (True, False)}
    assert flags == [plan[p] for p in case.qkd_plan]
    types = [(r["connection"], r["content_type"]) for r in vec["records"]]
    assert (0, CLOSE) in types
    assert (1, EPOCH_CONFIRM) in types
    assert sum(1 for _, t in types if t == DATA) >= 8
    first = [f["type"] for f in vec["connections"][1]["frames"][:4]]
    assert first == ["CHALLENGE", "HELLO", "ADMIT", "REKEY_INIT"]
