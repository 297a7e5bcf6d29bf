"""Web-of-trust bootstrap (auth mode ``wot``, docs/protocol.md §3.4): the trust decision and the
handshake with real ML-DSA endorsements (X.509 cross-certificates) from real introducers."""

from __future__ import annotations

import dataclasses
import datetime
import random
from dataclasses import dataclass

import pytest

from gateway.core import labels as L
from gateway.core import schedule
from gateway.core.auth import WotAuthenticator
from gateway.core.connection import Closed, HandshakeComplete, State
from gateway.core.wire import Hello, Init
from gateway.credentials import WotPolicy, make_wot_evaluator
from gateway.crypto import hmac_sha384, wot, x509
from gateway.errors import AuthenticationError

from .pair import PROVIDER, FakeKme, Pair

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Intro:
    cert: bytes
    key: bytes
    trust: wot.Trust

    def loaded(self, trust: wot.Trust | None = None) -> wot.Introducer:
        return wot.load_introducer(self.cert, trust or self.trust)

    def endorse(self, name: str, pub: bytes, **kw: object) -> bytes:
        kw.setdefault("now", NOW)  # NOW, not the wall clock: the suite may run > 5 min later
        pem = wot.endorse(self.cert, self.key, name, pub, **kw)  # type: ignore[arg-type]
        return x509.load_cert_chain(pem)[0]


@dataclass(frozen=True)
class Gw:
    name: str
    key: bytes  # private PEM
    pub: bytes  # public PEM


@pytest.fixture(scope="module")
def intros() -> dict[str, Intro]:
    out = {"full": Intro(*wot.create_introducer("full-1", now=NOW), wot.Trust.FULL)}
    for n in (1, 2, 3):
        out[f"m{n}"] = Intro(*wot.create_introducer(f"marginal-{n}", now=NOW), wot.Trust.MARGINAL)
    out["rogue"] = Intro(*wot.create_introducer("rogue", now=NOW), wot.Trust.FULL)  # nowhere
    return out


@pytest.fixture(scope="module")
def gws() -> dict[str, Gw]:
    return {n: Gw(n, *wot.create_gateway_key()) for n in ("site-a", "site-b")}


def policy(intros: dict[str, Intro], **kw: object) -> WotPolicy:
    configured = tuple(intros[k].loaded() for k in ("full", "m1", "m2", "m3"))
    base: dict[str, object] = {
        "introducers": configured,
        "full_needed": 1,
        "marginals_needed": 3,
        "revoked": frozenset(),
    }
    base.update(kw)
    return WotPolicy(**base)  # type: ignore[arg-type]


def authn(gw: Gw, certs: list[bytes], pol: WotPolicy, key: bytes | None = None) -> WotAuthenticator:
    return WotAuthenticator(
        gw.name,
        certs=tuple(certs),
        key=x509.load_signing_key(key or gw.key),
        provider=PROVIDER,
        evaluator=make_wot_evaluator(pol),
    )


def pair(
    intros: dict[str, Intro],
    gws: dict[str, Gw],
    a_certs: list[bytes],
    pol: WotPolicy | None = None,
    a_key: bytes | None = None,
    **kw: object,
) -> Pair:
    """site-a (initiator) presents ``a_certs``; site-b is endorsed by the full introducer."""
    pol = pol or policy(intros)
    b = gws["site-b"]
    b_auth = authn(b, [intros["full"].endorse(b.name, b.pub)], policy(intros))
    p = Pair(auth="wot", auths=(authn(gws["site-a"], a_certs, policy(intros), a_key), b_auth), **kw)
    # the responder judges site-a under ``pol``
    p.r.conn.auth = authn(b, list(b_auth.certs), pol)
    p.handshake()
    return p


def refusal(p: Pair) -> Closed:
    closed = [c for c in p.r.of(Closed) if not c.by_peer]
    assert closed, "the responder did not refuse"
    return closed[0]


def evaluate(intros: dict[str, Intro], certs: list[bytes], **kw: object) -> wot.Verdict:
    pol = policy(intros, **kw)
    return make_wot_evaluator(pol)(tuple(certs), "site-a", NOW)


# --- threshold ---------------------------------------------------------------------------------


def test_one_full_endorsement_is_enough(intros: dict[str, Intro], gws: dict[str, Gw]) -> None:
    a = gws["site-a"]
    p = pair(intros, gws, [intros["full"].endorse(a.name, a.pub)])
    assert p.established()
    peer = p.r.of(HandshakeComplete)[0].peer
    assert peer.name == "site-a"
    assert peer.fingerprint == wot.key_fingerprint(x509.load_signing_key(a.key).public_bytes())[:16]


def test_three_marginal_endorsements_are_enough(
    intros: dict[str, Intro], gws: dict[str, Gw]
) -> None:
    a = gws["site-a"]
    certs = [intros[m].endorse(a.name, a.pub) for m in ("m1", "m2", "m3")]
    assert pair(intros, gws, certs).established()


def test_two_marginals_are_one_short_and_the_alert_names_who_vouched(
    intros: dict[str, Intro], gws: dict[str, Gw]
) -> None:
    a = gws["site-a"]
    p = pair(intros, gws, [intros[m].endorse(a.name, a.pub) for m in ("m1", "m2")])
    assert not p.established()
    c = refusal(p)
    assert c.alert is L.Alert.INSUFFICIENT_TRUST
    assert "0 full + 2 marginal" in c.reason
    assert "vouched: marginal-1 (marginal), marginal-2 (marginal)" in c.reason
    assert "missing: full-1 (full), marginal-3 (marginal)" in c.reason
    # the initiator (established after RESP) learns the code from the unauthenticated alert
    assert any(x.by_peer and "alert 21" in x.reason for x in p.i.of(Closed))


def test_k_of_n_thresholds_are_configurable(intros: dict[str, Intro], gws: dict[str, Gw]) -> None:
    a = gws["site-a"]
    two = [intros[m].endorse(a.name, a.pub) for m in ("m1", "m2")]
    assert evaluate(intros, two, marginals_needed=2).accepted
    assert not evaluate(intros, two, marginals_needed=3).accepted
    full = [intros["full"].endorse(a.name, a.pub)]
    assert not evaluate(intros, full, full_needed=2, marginals_needed=2).accepted
    # a full endorsement also counts towards the "any trust level" threshold
    assert evaluate(intros, [*full, two[0]], full_needed=2, marginals_needed=2).accepted


def test_same_introducer_twice_counts_once(intros: dict[str, Intro], gws: dict[str, Gw]) -> None:
    a = gws["site-a"]
    m1, m2 = intros["m1"], intros["m2"]
    certs = [
        m1.endorse(a.name, a.pub),
        m1.endorse(a.name, a.pub, days=30),
        m2.endorse(a.name, a.pub),
    ]
    v = evaluate(intros, certs)
    assert [i.label for i in v.vouched] == ["marginal-1", "marginal-2"]
    assert not v.accepted
    p = pair(intros, gws, certs)
    assert refusal(p).alert is L.Alert.INSUFFICIENT_TRUST


# --- endorsements that must not count ----------------------------------------------------------


def _one_rejected(v: wot.Verdict) -> str:
    assert not v.accepted
    assert not v.vouched
    (r,) = v.rejected
    return r.reason


def test_endorsement_for_another_key_does_not_count(
    intros: dict[str, Intro], gws: dict[str, Gw]
) -> None:
    a = gws["site-a"]
    _, other_pub = wot.create_gateway_key()
    m1 = intros["m1"].endorse(a.name, a.pub)  # the key that signs comes from endorsement 0
    v = evaluate(intros, [m1, intros["full"].endorse(a.name, other_pub)])
    assert not v.accepted
    assert v.rejected[0].reason == "endorses another key than the one that signs the handshake"
    p = pair(intros, gws, [m1, intros["full"].endorse(a.name, other_pub)])
    assert refusal(p).alert is L.Alert.INSUFFICIENT_TRUST
    # leading with the other key's endorsement: the signature does not verify under it
    p = pair(intros, gws, [intros["full"].endorse(a.name, other_pub)])
    assert refusal(p).alert is L.Alert.BAD_CERTIFICATE
    assert "signature does not verify" in refusal(p).reason


def test_endorsement_for_another_name_does_not_count(
    intros: dict[str, Intro], gws: dict[str, Gw]
) -> None:
    a = gws["site-a"]
    assert _one_rejected(evaluate(intros, [intros["full"].endorse("site-c", a.pub)])).startswith(
        "wrong name"
    )
    p = pair(intros, gws, [intros["full"].endorse("site-c", a.pub)])
    assert refusal(p).alert is L.Alert.INSUFFICIENT_TRUST


def test_expired_endorsement_does_not_count(intros: dict[str, Intro], gws: dict[str, Gw]) -> None:
    a = gws["site-a"]
    old = intros["full"].endorse(a.name, a.pub, days=10, now=NOW - 20 * DAY)
    assert _one_rejected(evaluate(intros, [old])).startswith("expired")
    assert refusal(pair(intros, gws, [old])).alert is L.Alert.INSUFFICIENT_TRUST


def test_not_yet_valid_endorsement_does_not_count(
    intros: dict[str, Intro], gws: dict[str, Gw]
) -> None:
    a = gws["site-a"]
    future = intros["full"].endorse(a.name, a.pub, now=NOW + 2 * DAY)
    assert _one_rejected(evaluate(intros, [future])).startswith("not yet valid")
    assert refusal(pair(intros, gws, [future])).alert is L.Alert.INSUFFICIENT_TRUST


def test_revoked_endorsement_does_not_count(intros: dict[str, Intro], gws: dict[str, Gw]) -> None:
    a = gws["site-a"]
    e = intros["full"].endorse(a.name, a.pub)
    assert evaluate(intros, [e]).accepted
    revoked = frozenset({wot.endorsement_fingerprint(e)})
    assert _one_rejected(evaluate(intros, [e], revoked=revoked)).startswith("revoked")
    p = pair(intros, gws, [e], pol=policy(intros, revoked=revoked))
    assert refusal(p).alert is L.Alert.INSUFFICIENT_TRUST


def test_endorsement_by_an_unknown_key_does_not_count(
    intros: dict[str, Intro], gws: dict[str, Gw]
) -> None:
    a = gws["site-a"]
    e = intros["rogue"].endorse(a.name, a.pub)
    assert _one_rejected(evaluate(intros, [e])).startswith("issued by an unknown key")
    assert refusal(pair(intros, gws, [e])).alert is L.Alert.INSUFFICIENT_TRUST


def test_endorsement_under_a_configured_name_but_another_key_does_not_count(
    intros: dict[str, Intro], gws: dict[str, Gw]
) -> None:
    """A rogue introducer that copies the full introducer's name and key identifier."""
    a = gws["site-a"]
    real = intros["full"].loaded()
    _, fake_key = x509.create_ca("full-1", x509.SigAlg.MLDSA87)
    e = _forge_aki(fake_key, a, real)
    assert _one_rejected(evaluate(intros, [e])) == "signature does not verify under the introducer"


def _forge_aki(ca_key: bytes, gw: Gw, like: wot.Introducer) -> bytes:
    """An endorsement whose issuer name and AKI claim ``like`` but that ``ca_key`` signs."""
    from cryptography import x509 as cx
    from cryptography.hazmat.primitives import serialization

    icert = cx.load_der_x509_certificate(like.der)
    ski = icert.extensions.get_extension_for_class(cx.SubjectKeyIdentifier).value
    key = serialization.load_pem_private_key(ca_key, None)
    pub = serialization.load_pem_public_key(gw.pub)
    cert = (
        cx.CertificateBuilder()
        .subject_name(cx.Name([]))
        .issuer_name(icert.subject)
        .public_key(pub)  # type: ignore[arg-type]
        .serial_number(1)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(cx.SubjectAlternativeName([cx.DNSName(gw.name)]), critical=False)
        .add_extension(cx.AuthorityKeyIdentifier(ski.digest, None, None), critical=False)
        .sign(key, None)  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_endorsement_signed_with_a_non_mldsa_algorithm_does_not_count(
    intros: dict[str, Intro], gws: dict[str, Gw]
) -> None:
    """Issuer name and key identifier of the full introducer, but an Ed25519 signature."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    a = gws["site-a"]
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_pem = ed.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    real = intros["full"].loaded()
    e = _forge_aki(ed_pem, a, real)
    assert _one_rejected(evaluate(intros, [e])).startswith("wrong algorithm")
    # and an endorsed key that is not ML-DSA cannot sign the transcript at all
    ed_pub = ed.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(x509.CryptoError, match="not an ML-DSA key"):
        wot.endorse(intros["full"].cert, intros["full"].key, a.name, ed_pub)
    p = pair(intros, gws, [e])
    assert refusal(p).alert is L.Alert.INSUFFICIENT_TRUST


def test_garbage_endorsements_raise_only_authentication_errors(
    intros: dict[str, Intro], gws: dict[str, Gw]
) -> None:
    a = gws["site-a"]
    good = intros["full"].endorse(a.name, a.pub)
    rnd = random.Random(15)
    for _ in range(200):
        n = rnd.randrange(len(good))
        bad = good[:n] + bytes([good[n] ^ (1 << rnd.randrange(8))]) + good[n + 1 :]
        try:
            v = evaluate(intros, [bad])
        except AuthenticationError:
            continue
        assert not v.accepted or bad == good
    for junk in ([], [b""], [b"\x30\x00"], [good] * 5):
        with pytest.raises(AuthenticationError):
            evaluate(intros, junk)


# --- attackers ------------------------------------------------------------------------------------


def test_attacker_with_two_marginal_introducer_keys_cannot_bootstrap(
    intros: dict[str, Intro], gws: dict[str, Gw]
) -> None:
    """Two stolen marginal introducer keys mint endorsements for the attacker's own key."""
    mallory_key, mallory_pub = wot.create_gateway_key()
    a = gws["site-a"]
    minted = [intros[m].endorse("site-a", mallory_pub) for m in ("m1", "m2")]
    # the real site-a's full endorsement binds site-a's key, not Mallory's: it does not help
    p = pair(intros, gws, [*minted, intros["full"].endorse(a.name, a.pub)], a_key=mallory_key)
    assert not p.established()
    assert refusal(p).alert is L.Alert.INSUFFICIENT_TRUST
    # and the same two with the real key's third marginal is still short for Mallory's key
    p = pair(intros, gws, [*minted, intros["m3"].endorse(a.name, a.pub)], a_key=mallory_key)
    assert refusal(p).alert is L.Alert.INSUFFICIENT_TRUST


def _endorsed_pair(intros: dict[str, Intro], gws: dict[str, Gw], **kw: object) -> Pair:
    a = gws["site-a"]
    p = pair(intros, gws, [intros["full"].endorse(a.name, a.pub)], **kw)
    assert p.established()
    return p


@pytest.mark.parametrize("which", ["HELLO", "INIT", "RESP", "CONFIRM"])
def test_flipped_bit_anywhere_in_a_wot_handshake_is_rejected(
    intros: dict[str, Intro], gws: dict[str, Gw], which: str
) -> None:
    """Including every endorsement byte of RESP and CONFIRM (the transcript covers them)."""
    ref = _endorsed_pair(intros, gws)
    auths = (ref.i.conn.auth, ref.r.conn.auth)
    direction, index = {
        "HELLO": ("i2r", 0),
        "INIT": ("i2r", 1),
        "RESP": ("r2i", 2),
        "CONFIRM": ("i2r", 2),
    }[which]
    chunk = (ref.wire_i2r if direction == "i2r" else ref.wire_r2i)[index]
    msg_len = int.from_bytes(chunk[:4], "big") + 4
    rnd = random.Random(which)
    positions = sorted({*range(0, 8), *(rnd.randrange(msg_len) for _ in range(24)), msg_len - 1})
    for pos in positions:
        p = Pair(auth="wot", auths=auths)
        seen = {"n": 0}

        def tamper(d: str, data: bytes, pos: int = pos, seen: dict[str, int] = seen) -> bytes:
            if d != direction:
                return data
            seen["n"] += 1
            if seen["n"] - 1 != index:
                return data
            b = bytearray(data)
            b[pos] ^= 1 << (pos % 8)
            return bytes(b)

        p.tamper = tamper
        p.handshake()
        receiver = p.r if direction == "i2r" else p.i
        assert not receiver.of(HandshakeComplete), f"{which} bit {pos} accepted"
        if receiver.conn.state is not State.CLOSED:
            assert pos < 4, f"{which} bit {pos}: {receiver.conn.state}"
            p.advance(L.HANDSHAKE_TIMEOUT_SECONDS + 1)
        assert receiver.conn.state is State.CLOSED, f"{which} bit {pos}"


@pytest.mark.parametrize("to", [L.AuthModeId.PKI, L.AuthModeId.PSK])
def test_downgrade_from_wot_in_init_is_refused(
    intros: dict[str, Intro], gws: dict[str, Gw], to: L.AuthModeId
) -> None:
    """The attacker rewrites INIT's auth mode and recomputes its public admission MAC."""
    a = gws["site-a"]
    b = gws["site-b"]
    certs = [intros["full"].endorse(a.name, a.pub)]
    p = Pair(
        auth="wot",
        auths=(
            authn(a, certs, policy(intros)),
            authn(b, [intros["full"].endorse(b.name, b.pub)], policy(intros)),
        ),
    )

    def tamper(d: str, data: bytes) -> bytes:
        if d != "i2r" or data[4] != L.FrameType.INIT:
            return data
        m = dataclasses.replace(Init.decode(data[5:]), auth_mode=to)
        adm = hmac_sha384(schedule.admission_key_pki(m.suite, m.responder), m.core())
        return dataclasses.replace(m, admission=adm[: L.ADMISSION_LEN]).encode()

    p.tamper = tamper
    p.handshake()
    assert not p.established()
    assert refusal(p).alert is L.Alert.AUTH_MODE_MISMATCH


@pytest.mark.parametrize("to", [L.AuthModeId.PKI, L.AuthModeId.PSK])
def test_downgrade_from_wot_in_hello_is_refused(
    intros: dict[str, Intro], gws: dict[str, Gw], to: L.AuthModeId
) -> None:
    """The HELLO's proof key is public in wot (as in pki): rewriting it still meets the mode check."""
    ref = _endorsed_pair(intros, gws)
    p = Pair(auth="wot", auths=(ref.i.conn.auth, ref.r.conn.auth))

    def tamper(d: str, data: bytes) -> bytes:
        if d != "i2r" or data[4] != L.FrameType.HELLO:
            return data
        m = Hello.decode(data[5:])
        return dataclasses.replace(m, auth_mode=to).encode()

    p.tamper = tamper
    p.handshake()
    assert not p.established()
    assert refusal(p).alert is L.Alert.AUTH_MODE_MISMATCH


def test_wot_responder_refuses_a_pki_initiator(
    intros: dict[str, Intro], gws: dict[str, Gw]
) -> None:
    from .pair import pki_auths

    ref = _endorsed_pair(intros, gws)
    pki_a, _ = pki_auths()
    p = Pair(auth="wot", auths=(pki_a, ref.r.conn.auth))
    p.handshake()
    assert not p.established()
    assert refusal(p).alert is L.Alert.AUTH_MODE_MISMATCH


def test_leaked_introducer_and_gateway_keys_do_not_allow_a_rekey(
    intros: dict[str, Intro], gws: dict[str, Gw]
) -> None:
    """After a wot bootstrap, every introducer key and both ML-DSA keys leak: no rekey, no
    re-bootstrap (the same attacks as tests/core/test_attacks.py runs for pki)."""
    from .test_attacks import _forged_rekey_init

    p = _endorsed_pair(intros, gws)
    # Best effort with every public byte and every leaked signing key: no signature is accepted
    # after bootstrap; the chain key and the QKD pads are out of reach.
    fake_chain = schedule.epoch_keys(bytes(48), p.i.conn.transcript_hash).chain
    forged = _forged_rekey_init(
        p, fake_chain, bytes(32), [bytes(16), bytes(15) + b"\x01", bytes(15) + b"\x02"]
    )
    p.r.conn.receive_data(forged, p.now)
    p.pump()
    assert p.rekeys()[1] == []
    assert any(c.alert is L.Alert.AUTHENTICATION_FAILED for c in p.r.of(Closed))

    # A fresh bootstrap with freshly minted endorsements (the attacker holds every introducer
    # key) towards the same responder association: refused without the master SAE's QKD key.
    p2 = _endorsed_pair(intros, gws)
    a = gws["site-a"]
    minted = [intros[k].endorse(a.name, a.pub) for k in ("full", "m1", "m2", "m3")]
    attacker = Pair(
        auth="wot",
        auths=(authn(a, minted, policy(intros)), p2.r.conn.auth),
        assoc_r=p2.assoc_r,
        kme=FakeKme(seed=999),
        seed=55,
    )
    attacker.kme.dec_keys = p2.kme.dec_keys  # type: ignore[method-assign]
    attacker.handshake()
    assert not attacker.r.of(HandshakeComplete)
    assert any(c.alert is L.Alert.QKD_UNAVAILABLE for c in attacker.closed())


def test_global_budget_bounds_unauthenticated_wot_inits(
    intros: dict[str, Intro], gws: dict[str, Gw]
) -> None:
    """wot INITs are as unauthenticated as pki ones (public admission keys): forged ones from
    many addresses cost at most the global budget of KME calls and signatures (B3, §3.6)."""
    from gateway.core.connection import Association, NeedQkdKeysById

    from .pair import split_frames

    ref = _endorsed_pair(intros, gws)
    rogue_key, rogue_pub = wot.create_gateway_key()
    rogue = authn(
        gws["site-a"], [intros["rogue"].endorse("site-a", rogue_pub)], policy(intros), rogue_key
    )
    assoc_r = Association()
    kme_calls = signatures = refused = 0
    n_addr = L.GLOBAL_BOOTSTRAP_BURST + 15
    for n in range(n_addr):
        att = Pair(auth="wot", auths=(rogue, ref.r.conn.auth), assoc_r=assoc_r, seed=100 + n)
        att.r.conn.source = f"10.0.0.{n}"  # one INIT per address: the per-address bucket allows it
        att.handshake()
        assert not att.r.of(HandshakeComplete)
        kme_calls += len(att.r.of(NeedQkdKeysById))
        signatures += sum(1 for f in split_frames(att.wire_r2i) if f[4] == L.FrameType.RESP)
        refused += att.r.conn.stats["global_budget_refusals"]
    assert kme_calls == signatures == L.GLOBAL_BOOTSTRAP_BURST  # the clock did not move
    assert refused == n_addr - L.GLOBAL_BOOTSTRAP_BURST
