"""Record full-transcript vectors (tests/vectors/transcripts.json): every byte on the wire.

Run: python -m tests.vectors.make_transcripts   (rewrites the file; review the diff!)

Two real protocol cores (tests/core/pair.py) talk in memory with a fixed clock, a seeded RNG
per side and the in-memory KME of pair.py. Every chunk either core writes is recorded, split
into frames, in the order sent, so any frame type the cores exchange (today INIT ... ALERT,
tomorrow whatever else) lands in the file without changes here. Three things cannot be
derived from a seed, because the providers draw them from their own DRBG: the ML-KEM
encapsulation randomness, the ML-DSA signing randomness and the certificates (issued fresh
with random keys). They are recorded as they come out (``provider_log`` and
``config.ca_pem``); tests/core/test_transcript_vectors.py replays them into the cores
(:class:`ReplayProvider`) and checks that every frame comes out byte for byte again, and
recomputes every frame and every intermediate value from the recorded inputs with an
independent implementation written from docs/protocol.md.

The scenario per case: connection 0 bootstraps, carries a PUB and its ACK, rekeys twice
(data after each), closes with an authenticated CLOSE record; connection 1 resumes on the
same associations (REKEY_INIT/REKEY_RESP, no bootstrap credentials) and carries data again.

Application payloads come from :func:`app_payloads`, the one place that calls the bridge's
payload encoder (gateway/peer_transport.py); regenerate after that format changes.
"""

from __future__ import annotations

import datetime
import json
import random
import struct
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.bridge.codec import encode as bridge_encode
from gateway.bridge.transport import BridgeMessage, MessageProps
from gateway.core import labels as L
from gateway.core import schedule
from gateway.core.auth import PkiAuthenticator, PskAuthenticator
from gateway.core.connection import Association
from gateway.core.records import record_nonce
from gateway.core.wire import (
    Admit,
    Challenge,
    Confirm,
    Hello,
    Init,
    RekeyInit,
    RekeyResp,
    Resp,
    vec16,
)
from gateway.credentials import make_verifier
from gateway.crypto import (
    Aead,
    KemAlg,
    KemPrivateKey,
    Provider,
    SigAlg,
    SigPrivateKey,
    X25519PrivateKey,
    get_provider,
    hmac_sha384,
    poly1305_tag,
    sha384,
    x509,
)
from gateway.peer_transport import ACK, ACK_OK, PUB
from tests.core.pair import Pair

SEED = 20261201
MONOTONIC_START = 1000.0
WALL_CLOCK = datetime.datetime(2026, 12, 1, 12, 0, 0, tzinfo=datetime.UTC)
OUT = Path(__file__).with_name("transcripts.json")
PYCA = get_provider("pyca")


# --- the application payloads (the one call into the bridge's payload encoder) ---------------


def app_payloads() -> list[tuple[str, str, bytes]]:
    """(direction, description, payload) carried in every connection of the scenario.

    A PUB from the initiator's site and the ACK the responder's site sends back for it, then
    a PUB the other way and its ACK, exactly as gateway/peer_transport.py frames them.
    """
    msg_a = BridgeMessage(
        topic="plant/line1/temperature",
        payload=b"21.5",
        qos=1,
        retain=False,
        properties=MessageProps(content_type="text/plain", payload_format_indicator=1),
        origin="site-a",
    )
    msg_b = BridgeMessage(
        topic="control/line1/setpoint",
        payload=b'{"c": 20}',
        qos=1,
        retain=True,
        properties=MessageProps(user_properties=(("unit", "C"),)),
        origin="site-b",
    )
    return [
        ("i2r", "PUB id=1 " + repr(msg_a), struct.pack(">BQ", PUB, 1) + bridge_encode(msg_a)),
        ("r2i", "ACK id=1 status=0", struct.pack(">BQB", ACK, 1, ACK_OK)),
        ("r2i", "PUB id=7 " + repr(msg_b), struct.pack(">BQ", PUB, 7) + bridge_encode(msg_b)),
        ("i2r", "ACK id=7 status=0", struct.pack(">BQB", ACK, 7, ACK_OK)),
    ]


# --- recorded / replayed randomness ----------------------------------------------------------


class RecordingRng:
    """The injected RNG of one side: random.Random(seed), every draw logged in order."""

    def __init__(self, seed: int) -> None:
        self._r = random.Random(seed)
        self.draws: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        out = self._r.randbytes(n)
        self.draws.append(out)
        return out


class ReplayRng:
    """Hands out recorded draws in order; a draw of another length is a test failure."""

    def __init__(self, draws: list[bytes]) -> None:
        self._draws = list(draws)

    def __call__(self, n: int) -> bytes:
        if not self._draws:
            raise AssertionError("the core drew more randomness than was recorded")
        out = self._draws.pop(0)
        if len(out) != n:
            raise AssertionError(f"the core drew {n} bytes where {len(out)} were recorded")
        return out

    @property
    def left(self) -> int:
        return len(self._draws)


@dataclass
class ProviderLog:
    """What the provider produced from its own DRBG: encapsulations and signatures."""

    encapsulations: list[dict[str, str]] = field(default_factory=list)
    signatures: list[dict[str, str]] = field(default_factory=list)


class NeedFreshCredentials(Exception):
    """Regenerating: a signature over a new message is needed but the old keys are gone."""


class RecordingProvider:
    """The pyca provider, logging every encapsulation and signature.

    ``reuse`` (the previous file's ``provider_log``) keeps regeneration stable: an
    encapsulation to the same ML-KEM key and a signature over the same message return the
    recorded bytes, so an unchanged protocol rewrites the same file.
    """

    def __init__(
        self,
        inner: Provider,
        log: ProviderLog,
        reuse: dict[str, list[dict[str, str]]] | None = None,
    ) -> None:
        self.inner, self.log, self.name = inner, log, "recording-" + inner.name
        reuse = reuse or {"encapsulations": [], "signatures": []}
        self._enc_cache = {e["ek_sha384"]: e for e in reuse["encapsulations"]}
        self._sig_cache = {(g["message"], g["context"]): g for g in reuse["signatures"]}

    def kem_algorithms(self) -> frozenset[str]:
        return self.inner.kem_algorithms()

    def kem_keygen(self, alg: KemAlg, seed: bytes) -> KemPrivateKey:
        return self.inner.kem_keygen(alg, seed)

    def encapsulate(self, alg: KemAlg, public: bytes) -> tuple[bytes, bytes]:
        digest = sha384(public).hex()
        if digest in self._enc_cache:
            self.inner.encapsulate(alg, public)  # the key must still be well-formed
            rec = self._enc_cache[digest]
            ct, ss = bytes.fromhex(rec["ct"]), bytes.fromhex(rec["ss"])
        else:
            ct, ss = self.inner.encapsulate(alg, public)
        self.log.encapsulations.append({"ek_sha384": digest, "ct": ct.hex(), "ss": ss.hex()})
        return ct, ss

    def decapsulate(self, key: KemPrivateKey, ciphertext: bytes) -> bytes:
        return self.inner.decapsulate(key, ciphertext)

    def sig_keygen(self, alg: SigAlg, seed: bytes) -> SigPrivateKey:
        return self.inner.sig_keygen(alg, seed)

    def sign(self, key: SigPrivateKey, message: bytes, context: bytes) -> bytes:
        rec = self._sig_cache.get((message.hex(), context.hex()))
        if rec is not None:
            sig = bytes.fromhex(rec["signature"])
        elif key is None:
            raise NeedFreshCredentials
        else:
            sig = self.inner.sign(key, message, context)
        self.log.signatures.append(
            {"message": message.hex(), "context": context.hex(), "signature": sig.hex()}
        )
        return sig

    def verify(
        self, alg: SigAlg, public: bytes, message: bytes, signature: bytes, context: bytes
    ) -> bool:
        return self.inner.verify(alg, public, message, signature, context)


class ReplayProvider(RecordingProvider):
    """Returns the recorded encapsulations and signatures (after checking their inputs)."""

    def __init__(self, inner: Provider, log: dict[str, list[dict[str, str]]]) -> None:
        super().__init__(inner, ProviderLog())
        self._enc = list(log["encapsulations"])
        self._sig = list(log["signatures"])

    def encapsulate(self, alg: KemAlg, public: bytes) -> tuple[bytes, bytes]:
        if not self._enc:
            raise AssertionError("the core encapsulated more often than recorded")
        rec = self._enc.pop(0)
        if sha384(public).hex() != rec["ek_sha384"]:
            raise AssertionError("encapsulation to another ML-KEM key than recorded")
        self.inner.encapsulate(alg, public)  # the key must still be well-formed
        return bytes.fromhex(rec["ct"]), bytes.fromhex(rec["ss"])

    def sign(self, key: SigPrivateKey, message: bytes, context: bytes) -> bytes:
        if not self._sig:
            raise AssertionError("the core signed more often than recorded")
        rec = self._sig.pop(0)
        if (message.hex(), context.hex()) != (rec["message"], rec["context"]):
            raise AssertionError("the core signed another message than recorded")
        return bytes.fromhex(rec["signature"])

    @property
    def left(self) -> int:
        return len(self._enc) + len(self._sig)


class ListKme:
    """The KME pair of one QKD link, answering from a fixed list of (key_ID, key)."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        self._fresh = list(keys)
        self._b: dict[str, bytes] = {}
        self.delivered: list[tuple[str, bytes]] = []
        self.plan = "both"

    def enc_keys(self, n: int) -> list[tuple[str, bytes]] | None:
        if self.plan == "i_down":
            return None
        out, self._fresh = self._fresh[:n], self._fresh[n:]
        if len(out) < n:
            raise AssertionError("the scenario used more QKD keys than recorded")
        self._b.update(out)
        self.delivered += out
        return out

    def dec_keys(self, ids: tuple[str, ...]) -> list[tuple[str, bytes]] | None:
        if self.plan == "r_down" or any(i not in self._b for i in ids):
            return None
        return [(i, self._b.pop(i)) for i in ids]


def kme_keys(seed: int, n: int = 16) -> list[tuple[str, bytes]]:
    r = random.Random(seed)
    return [(str(uuid.UUID(bytes=r.randbytes(16), version=4)), r.randbytes(32)) for _ in range(n)]


# --- cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    auth: str  # "psk" / "pki"
    suite: L.SuiteId
    policy: L.QkdPolicyId
    seed: int
    # per exchange (bootstrap, rekey 1, rekey 2, resumption): whose KME delivers QKD keys:
    # "both", "i_down" (the initiator gets none: qkd_offered = 0), "r_down" (the responder
    # cannot fetch the offered IDs: qkd_used = 0)
    qkd_plan: tuple[str, str, str, str] = ("both", "both", "both", "both")


CASES = (
    Case(
        "psk, ML-KEM-768 (suite 0x01), qkd = required",
        "psk",
        L.SuiteId.MLKEM768_X25519_AES256GCM_SHA384,
        L.QkdPolicyId.REQUIRED,
        SEED,
    ),
    Case(
        "pki, ML-KEM-1024 (suite 0x02), qkd = required",
        "pki",
        L.SuiteId.MLKEM1024_X25519_AES256GCM_SHA384,
        L.QkdPolicyId.REQUIRED,
        SEED + 1,
    ),
    Case(
        "psk, ML-KEM-768 (suite 0x01), qkd = preferred: rekey 1 without QKD at the initiator, "
        "rekey 2 without QKD at the responder",
        "psk",
        L.SuiteId.MLKEM768_X25519_AES256GCM_SHA384,
        L.QkdPolicyId.PREFERRED,
        SEED + 2,
        ("both", "i_down", "r_down", "both"),
    ),
)


def make_config(case: Case, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Credentials of a case: a PSK from the seed, or an ML-DSA CA and two certificates
    (those of ``previous`` when it has them, else fresh ones with fresh keys)."""
    cfg: dict[str, Any] = {
        "auth_mode": case.auth,
        "suite": int(case.suite),
        "qkd_policy": int(case.policy),
        "id_i": "site-a",
        "id_r": "site-b",
        "monotonic_start": MONOTONIC_START,
        "wall_clock": WALL_CLOCK.isoformat(),
    }
    if case.auth == "psk":
        cfg["psk"] = random.Random(case.seed ^ 0x5A5A).randbytes(32).hex()
        return cfg
    if previous and previous.get("ca_pem"):
        for k in ("ca_pem", "certs_i", "certs_r"):
            cfg[k] = previous[k]
        return cfg  # no signing keys: signatures over unchanged messages are reused
    ca_pem, ca_key = x509.create_ca("qgw vectors CA", SigAlg.MLDSA87, 36500, now=WALL_CLOCK)
    cfg["ca_pem"] = ca_pem.decode()
    keys = {}
    for side, name in (("i", "site-a"), ("r", "site-b")):
        cert_pem, key_pem = x509.issue_cert(
            ca_pem, ca_key, name, SigAlg.MLDSA65, 36500, now=WALL_CLOCK
        )
        cfg[f"certs_{side}"] = [d.hex() for d in x509.load_cert_chain(cert_pem)]
        keys[side] = key_pem
    cfg["_keys"] = keys  # signing keys: used while recording, never written to the file
    return cfg


def authenticators(cfg: dict[str, Any], provider: Provider) -> tuple[Any, Any]:
    if cfg["auth_mode"] == "psk":
        psk = bytes.fromhex(cfg["psk"])
        return PskAuthenticator(cfg["id_i"], psk), PskAuthenticator(cfg["id_r"], psk)
    verifier = make_verifier(cfg["ca_pem"].encode())
    out = []
    for side in ("i", "r"):
        key_pem = cfg.get("_keys", {}).get(side)
        # replaying: the provider returns recorded signatures and never touches the key
        key: Any = x509.load_signing_key(key_pem) if key_pem else None
        out.append(
            PkiAuthenticator(
                cfg[f"id_{side}"],
                certs=tuple(bytes.fromhex(d) for d in cfg[f"certs_{side}"]),
                key=key,
                provider=provider,
                verifier=verifier,
                clock=lambda: WALL_CLOCK,
            )
        )
    return out[0], out[1]


def split_frames(chunk: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(chunk):
        (length,) = struct.unpack(">I", chunk[pos : pos + 4])
        out.append(chunk[pos : pos + 4 + length])
        pos += 4 + length
    return out


def run_scenario(
    case: Case,
    cfg: dict[str, Any],
    provider: Provider,
    rngs: tuple[Callable[[int], bytes], Callable[[int], bytes]],
    kme: ListKme,
) -> list[list[tuple[str, bytes]]]:
    """Drive the scenario; return the frames of each connection as (direction, frame)."""
    auths = authenticators(cfg, provider)
    assoc_i, assoc_r = Association(), Association()
    connections = []
    for n in range(2):
        p = Pair(
            suite=case.suite,
            policy=case.policy,
            kme=kme,  # type: ignore[arg-type]
            assoc_i=assoc_i,
            assoc_r=assoc_r,
            auths=auths,
            provider=provider,
            rngs=rngs,
        )
        p.now = MONOTONIC_START + 10.0 * n
        kme.plan = case.qkd_plan[3 * n]
        p.handshake()
        if not p.established():
            raise AssertionError(f"connection {n} did not establish: {p.closed()}")
        _carry(p)
        if n == 0:
            for k in (1, 2):
                kme.plan = case.qkd_plan[k]
                p.i.conn.rekey_now(p.now)
                p.pump()
                if (p.i.conn.epoch, p.r.conn.epoch) != (k, k):
                    raise AssertionError(f"rekey {k} did not complete: {p.closed()}")
                _carry(p)
            p.i.conn.close(p.now)
            p.pump()
        if p.closed() and n == 1:
            raise AssertionError(f"connection {n} closed: {p.closed()}")
        connections.append([(d, f) for d, chunk in p.wire for f in split_frames(chunk)])
    return connections


def _carry(p: Pair) -> None:
    for direction, _, payload in app_payloads():
        side = p.i if direction == "i2r" else p.r
        side.conn.send_message(payload, p.now)
        p.pump()
    got_r, got_i = p.r.messages(), p.i.messages()
    sent_i = [x for d, _, x in app_payloads() if d == "i2r"]
    sent_r = [x for d, _, x in app_payloads() if d == "r2i"]
    if got_r[-len(sent_i) :] != sent_i or got_i[-len(sent_r) :] != sent_r:
        raise AssertionError("application payloads were not delivered")


# --- intermediate values (computed with the implementation's own functions) ------------------


def _find_draw(draws: list[bytes], n: int, match: Callable[[bytes], bool]) -> bytes:
    for d in draws:
        if len(d) == n and match(d):
            return d
    raise AssertionError("no recorded draw produces this public value")


def _x_priv(draws: list[bytes], public: bytes) -> bytes:
    return _find_draw(draws, 32, lambda d: X25519PrivateKey(d).public_bytes() == public)


def _kem_seed(draws: list[bytes], alg: KemAlg, public: bytes) -> bytes:
    return _find_draw(draws, 64, lambda d: PYCA.kem_keygen(alg, d).public_bytes() == public)


def _keys(k: schedule.EpochKeys) -> dict[str, str]:
    return {
        "key_i2r": k.key_i2r.hex(),
        "iv_i2r": k.iv_i2r.hex(),
        "key_r2i": k.key_r2i.hex(),
        "iv_r2i": k.iv_r2i.hex(),
        "chain": k.chain.hex(),
    }


class Annotator:
    """Walks the recorded frames and writes down the inputs and every intermediate value."""

    def __init__(
        self, case: Case, cfg: dict[str, Any], draws: dict[str, list[bytes]], kme: ListKme
    ) -> None:
        self.case, self.cfg, self.draws = case, cfg, draws
        self.kme = dict(kme.delivered)
        self.alg = KemAlg.MLKEM768 if case.suite == 1 else KemAlg.MLKEM1024
        self.psk = bytes.fromhex(cfg["psk"]) if case.auth == "psk" else None
        self.chain = b""
        self.epoch_keys: dict[int, schedule.EpochKeys] = {}
        self.exchanges: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []

    def connection(self, n: int, frames: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        pending: dict[str, Any] = {}
        for index, (direction, raw) in enumerate(frames):
            ftype = raw[4]
            try:
                name = L.FrameType(ftype).name
            except ValueError:
                name = f"0x{ftype:02x}"
            out.append({"dir": direction, "type": name, "hex": raw.hex()})
            where = {"connection": n, "frame": index}
            body = raw[5:]
            if ftype == L.FrameType.CHALLENGE:
                pending = {"CHALLENGE": (raw, Challenge.decode(body), where)}
            elif ftype == L.FrameType.HELLO:
                pending["HELLO"] = (raw, Hello.decode(body), where)
            elif ftype == L.FrameType.ADMIT:
                self._admission(pending, raw, Admit.decode(body), where)
            elif ftype == L.FrameType.INIT:
                pending = {"INIT": (raw, Init.decode(body), where)}
            elif ftype == L.FrameType.RESP:
                pending["RESP"] = (raw, Resp.decode(body), where)
            elif ftype == L.FrameType.CONFIRM:
                self._bootstrap(pending, raw, Confirm.decode(body), where)
            elif ftype == L.FrameType.REKEY_INIT:
                pending = {"REKEY_INIT": (raw, RekeyInit.decode(body), where)}
            elif ftype == L.FrameType.REKEY_RESP:
                self._rekey(pending, raw, RekeyResp.decode(body), where)
            elif ftype == L.FrameType.RECORD:
                self._record(direction, raw, where)
        return out

    def _admission(self, pending: dict[str, Any], raw: bytes, a: Admit, where: Any) -> None:
        """§3.5 AD1..AD5: CHALLENGE, HELLO, ADMIT."""
        ch_raw, ch, w_ch = pending["CHALLENGE"]
        hello_raw, h, w_hello = pending["HELLO"]
        ctx = struct.pack(">I", h.epoch)
        if h.kind == L.HelloKind.RESUME:
            k_hello = schedule.expand_label(self.chain, L.L_HELLO_RESUME, ctx)
            k_admit = schedule.expand_label(self.chain, L.L_ADMIT_RESUME, ctx)
        elif self.psk is not None:
            s0 = schedule.psk_secret(self.psk)
            k_hello = schedule.expand_label(s0, L.L_HELLO_PSK, b"")
            k_admit = schedule.expand_label(s0, L.L_ADMIT_PSK, b"")
        else:
            k_hello = schedule.admission_key_pki(h.suite, h.responder)
            k_admit = schedule.admission_key_pki(h.suite, h.initiator)
        h_ch_hello = sha384(ch_raw + hello_raw)
        self.exchanges.append(
            {
                "kind": "admission",
                "epoch": h.epoch,
                "frames": [w_ch, w_hello, where],
                "inputs": {
                    "cookie": ch.cookie.hex(),
                    "n_hello": h.nonce.hex(),
                    "hello_kind": int(h.kind),
                },
                "values": {
                    "HELLO_core": h.core().hex(),
                    "K_hello": k_hello.hex(),
                    "hello_proof": hmac_sha384(k_hello, h.core() + ch.cookie)[:32].hex(),
                    "H_CHALLENGE_HELLO": h_ch_hello.hex(),
                    "ADMIT_core": a.core().hex(),
                    "K_admit": k_admit.hex(),
                    "admit_proof": hmac_sha384(k_admit, h_ch_hello + a.core())[:32].hex(),
                },
            }
        )

    def _bootstrap(self, pending: dict[str, Any], raw: bytes, c: Confirm, where: Any) -> None:
        init_raw, m, w_init = pending["INIT"]
        resp_raw, r, w_resp = pending["RESP"]
        kid = str(uuid.UUID(bytes=m.qkd_key_id))
        qkd = self.kme[kid] if m.qkd_offered else None
        s0 = schedule.psk_secret(self.psk)
        if self.psk is not None:
            k_adm = schedule.admission_key_psk(s0)
        else:
            k_adm = schedule.admission_key_pki(m.suite, m.responder)
        kem_seed = _kem_seed(self.draws["i"], self.alg, m.kem_public)
        x_i = _x_priv(self.draws["i"], m.x25519_public)
        x_r = _x_priv(self.draws["r"], r.x25519_public)
        ss_kem = PYCA.decapsulate(PYCA.kem_keygen(self.alg, kem_seed), r.kem_ciphertext)
        ss_x = X25519PrivateKey(x_i).exchange(r.x25519_public)
        bs = schedule.bootstrap_secret(self.psk, qkd if r.qkd_used else None, ss_kem, ss_x)
        th2 = sha384(init_raw + r.core())
        th2s = sha384(init_raw + r.core() + vec16(r.auth))
        k_fin_r = schedule.finished_key(bs["S3"], L.L_FINISHED_R, th2s)
        prefix = init_raw + resp_raw
        th3a = sha384(prefix + c.core())
        th3s = sha384(prefix + c.core() + vec16(c.auth))
        k_fin_i = schedule.finished_key(bs["S3"], L.L_FINISHED_I, th3s)
        th3 = sha384(prefix + raw)
        ms = schedule.expand_label(bs["S3"], L.L_MASTER, th3)
        keys = schedule.epoch_keys(bs["S3"], th3)
        values: dict[str, str] = {
            "K_adm": k_adm.hex(),
            "INIT_core": m.core().hex(),
            "adm": hmac_sha384(k_adm, m.core())[:32].hex(),
            "ek_i": m.kem_public.hex(),
            "X_i": m.x25519_public.hex(),
            "X_r": r.x25519_public.hex(),
            "ss_kem": ss_kem.hex(),
            "ss_x": ss_x.hex(),
            **{k: v.hex() for k, v in bs.items()},
            "RESP_core": r.core().hex(),
            "TH2": th2.hex(),
            "auth_r": r.auth.hex(),
            "TH2s": th2s.hex(),
            "K_fin_r": k_fin_r.hex(),
            "fin_r": hmac_sha384(k_fin_r, th2s).hex(),
            "CONFIRM_core": c.core().hex(),
            "TH3a": th3a.hex(),
            "auth_i": c.auth.hex(),
            "TH3s": th3s.hex(),
            "K_fin_i": k_fin_i.hex(),
            "fin_i": hmac_sha384(k_fin_i, th3s).hex(),
            "TH3": th3.hex(),
            "MS": ms.hex(),
            **_keys(keys),
        }
        if self.psk is not None:
            k_psk_r = schedule.psk_auth_key(s0, L.L_PSK_AUTH_R, th2)
            k_psk_i = schedule.psk_auth_key(s0, L.L_PSK_AUTH_I, th3a)
            values["K_psk_r"], values["K_psk_i"] = k_psk_r.hex(), k_psk_i.hex()
        inputs = {
            "n_i": m.nonce.hex(),
            "ek_seed_i": kem_seed.hex(),
            "x_priv_i": x_i.hex(),
            "qkd_offered": m.qkd_offered,
            "qkd_key_id": kid if m.qkd_offered else None,
            "qkd_key": qkd.hex() if qkd else None,
            "n_r": r.nonce.hex(),
            "x_priv_r": x_r.hex(),
            "qkd_used": r.qkd_used,
            "ct": r.kem_ciphertext.hex(),
        }
        if self.psk is None:
            inputs["sig_r"], inputs["sig_i"] = r.auth.hex(), c.auth.hex()
        self.exchanges.append(
            {
                "kind": "bootstrap",
                "epoch": 0,
                "frames": [w_init, w_resp, where],
                "inputs": inputs,
                "values": values,
            }
        )
        self.chain = keys.chain
        self.epoch_keys[0] = keys

    def _rekey(self, pending: dict[str, Any], raw: bytes, r: RekeyResp, where: Any) -> None:
        init_raw, m, w_init = pending["REKEY_INIT"]
        ids = [str(uuid.UUID(bytes=k)) for k in m.key_ids]
        qkd = [self.kme[i] for i in ids] if m.qkd_offered else None
        mk_i, mk_r = schedule.rekey_mac_keys(self.chain, m.epoch)
        a_i = m.auth_input()
        h_init = sha384(init_raw)
        a_r = r.auth_input()
        kem_seed = _kem_seed(self.draws["i"], self.alg, m.kem_public)
        x_i = _x_priv(self.draws["i"], m.x25519_public)
        x_r = _x_priv(self.draws["r"], r.x25519_public)
        ss_kem = PYCA.decapsulate(PYCA.kem_keygen(self.alg, kem_seed), r.kem_ciphertext)
        ss_x = X25519PrivateKey(x_i).exchange(r.x25519_public)
        k0 = qkd[0] if (qkd and r.qkd_used) else None
        rs = schedule.rekey_secret(self.chain, k0, ss_kem, ss_x)
        th = sha384(init_raw + raw)
        keys = schedule.epoch_keys(rs["R2"], th)
        wc1 = poly1305_tag(qkd[1][:32], a_i) if qkd else bytes(16)
        wc2 = poly1305_tag(qkd[2][:32], h_init + a_r) if (qkd and r.qkd_used) else bytes(16)
        self.exchanges.append(
            {
                "kind": "rekey",
                "epoch": m.epoch,
                "frames": [w_init, where],
                "inputs": {
                    "chain_prev": self.chain.hex(),
                    "n": m.nonce.hex(),
                    "qkd_offered": m.qkd_offered,
                    "key_ids": ids if m.qkd_offered else None,
                    "qkd_keys": [k.hex() for k in qkd] if qkd else None,
                    "ek_seed": kem_seed.hex(),
                    "x_priv": x_i.hex(),
                    "n_r": r.nonce.hex(),
                    "x_priv_r": x_r.hex(),
                    "qkd_used": r.qkd_used,
                    "ct": r.kem_ciphertext.hex(),
                },
                "values": {
                    "MK_i": mk_i.hex(),
                    "MK_r": mk_r.hex(),
                    "ek": m.kem_public.hex(),
                    "X": m.x25519_public.hex(),
                    "A_i": a_i.hex(),
                    "WC_1": wc1.hex(),
                    "mac_i": hmac_sha384(mk_i, a_i + wc1).hex(),
                    "H_REKEY_INIT": h_init.hex(),
                    "X_r": r.x25519_public.hex(),
                    "A_r": a_r.hex(),
                    "WC_2": wc2.hex(),
                    "mac_r": hmac_sha384(mk_r, h_init + a_r + wc2).hex(),
                    "ss_kem": ss_kem.hex(),
                    "ss_x": ss_x.hex(),
                    **{k: v.hex() for k, v in rs.items()},
                    "TH_rk": th.hex(),
                    "MS": schedule.expand_label(rs["R2"], L.L_MASTER, th).hex(),
                    **_keys(keys),
                },
            }
        )
        self.chain = keys.chain
        self.epoch_keys[m.epoch] = keys

    def _record(self, direction: str, raw: bytes, where: Any) -> None:
        epoch, seq = struct.unpack(">IQ", raw[5:17])
        k = self.epoch_keys[epoch]
        key, iv = (k.key_i2r, k.iv_i2r) if direction == "i2r" else (k.key_r2i, k.iv_r2i)
        nonce = record_nonce(iv, seq)
        plaintext = Aead(key).open(nonce, raw[17:], raw[:17])
        descr = {p: d for _, d, p in app_payloads()}.get(plaintext[1:], "")
        self.records.append(
            {
                **where,
                "dir": direction,
                "epoch": epoch,
                "seq": seq,
                "content_type": plaintext[0],
                "data": plaintext[1:].hex(),
                "payload": descr,
                "key": key.hex(),
                "iv": iv.hex(),
                "nonce": nonce.hex(),
                "aad": raw[:17].hex(),
                "ciphertext": raw[17:].hex(),
            }
        )


def record_case(case: Case, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record one case; with ``previous`` (its entry in the old file) reuse what it can."""
    try:
        return _record_case(case, previous)
    except NeedFreshCredentials:
        assert previous is not None
        return _record_case(case, {**previous, "config": {}})


def _record_case(case: Case, previous: dict[str, Any] | None) -> dict[str, Any]:
    cfg = make_config(case, previous["config"] if previous else None)
    log = ProviderLog()
    provider = RecordingProvider(PYCA, log, previous["provider_log"] if previous else None)
    rng_i, rng_r = RecordingRng(case.seed), RecordingRng(case.seed + 1000)
    kme = ListKme(kme_keys(case.seed + 2000))
    frames = run_scenario(case, cfg, provider, (rng_i, rng_r), kme)
    ann = Annotator(case, cfg, {"i": rng_i.draws, "r": rng_r.draws}, kme)
    connections = [{"frames": ann.connection(n, f)} for n, f in enumerate(frames)]
    cfg.pop("_keys", None)
    return {
        "name": case.name,
        "config": cfg,
        "kme_keys": [{"key_ID": k, "key": v.hex()} for k, v in kme.delivered],
        "rng_draws": {"i": [d.hex() for d in rng_i.draws], "r": [d.hex() for d in rng_r.draws]},
        "provider_log": {"encapsulations": log.encapsulations, "signatures": log.signatures},
        "connections": connections,
        "exchanges": ann.exchanges,
        "records": ann.records,
    }


def build(previous: dict[str, Any] | None = None) -> dict[str, Any]:
    old = {v["name"]: v for v in (previous or {}).get("vectors", [])}
    return {
        "source": f"recorded from two gateway.core cores in memory (seeds {SEED}...); "
        "python -m tests.vectors.make_transcripts; format: docs/protocol.md section 'Test vectors'",
        "notes": "byte strings are lowercase hex; frames are whole frames (u32 length || type || "
        "body) in the order sent; 'inputs' are what a second implementation needs, 'values' "
        "every intermediate it can check",
        "vectors": [record_case(c, old.get(c.name)) for c in CASES],
    }


if __name__ == "__main__":
    fresh = "--fresh" in sys.argv  # new certificates, ciphertexts and signatures throughout
    prev = None if fresh or not OUT.exists() else json.loads(OUT.read_text(encoding="utf-8"))
    OUT.write_text(json.dumps(build(prev), indent=1) + "\n")
    print(f"wrote {OUT}")
