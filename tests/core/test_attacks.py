"""Negative tests: every attack of docs/protocol.md §9 is stopped where the table says."""

from __future__ import annotations

import dataclasses
import random
import struct

import pytest

from gateway.core import labels as L
from gateway.core import schedule
from gateway.core.connection import (
    Alarm,
    Association,
    Closed,
    Connection,
    HandshakeComplete,
    RekeyComplete,
    Role,
    SessionParams,
    State,
)
from gateway.core.wire import FrameBuffer, Init, RekeyInit
from gateway.crypto import hmac_sha384, poly1305_tag

from .pair import (
    PROVIDER,
    FakeKme,
    Pair,
    admit,
    drive_admission,
    first_frame,
    psk_auths,
    seeded_rng,
)


def frames(chunk: bytes) -> list[bytes]:
    fb = FrameBuffer()
    fb.feed(chunk)
    out = []
    while (f := fb.next_frame()) is not None:
        out.append(f[2])
    return out


def flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def recorded_handshake(auth: str = "psk") -> Pair:
    p = Pair(auth=auth)
    p.handshake()
    assert p.established()
    return p


# --- flipped bits in every handshake message ----------------------------------------------


@pytest.mark.parametrize("auth", ["psk", "pki"])
@pytest.mark.parametrize("which", ["INIT", "RESP", "CONFIRM"])
def test_flipped_bit_anywhere_in_handshake_message_is_rejected(auth: str, which: str) -> None:
    ref = recorded_handshake(auth)
    msg_len = {
        "INIT": len(ref.wire_i2r[1]),  # [0] is HELLO, r2i [0]/[1] CHALLENGE/ADMIT (§3.5)
        "RESP": len(ref.wire_r2i[2]),
        "CONFIRM": len(frames(ref.wire_i2r[2])[0]),
    }[which]
    rnd = random.Random(which + auth)
    positions = sorted({*range(0, 12), *(rnd.randrange(msg_len) for _ in range(40)), msg_len - 1})
    for pos in positions:
        p = Pair(auth=auth, auths=(ref.i.conn.auth, ref.r.conn.auth))
        state = {"n": 0}
        direction = "r2i" if which == "RESP" else "i2r"
        index = 2 if which in ("CONFIRM", "RESP") else 1

        def tamper(
            d: str,
            data: bytes,
            pos: int = pos,
            direction: str = direction,
            index: int = index,
            state: dict[str, int] = state,
        ) -> bytes:
            if d != direction:
                return data
            state["n"] += 1
            if state["n"] - 1 != index:
                return data
            return flip(data, pos, pos % 8)

        p.tamper = tamper
        p.handshake()
        receiver = p.r if direction == "i2r" else p.i
        assert not receiver.of(HandshakeComplete), f"{which} bit {pos} accepted"
        if receiver.conn.state is not State.CLOSED:
            # a flipped length field leaves the receiver waiting for bytes that never come
            assert pos < 4, f"{which} bit {pos}: {receiver.conn.state}"
            p.advance(L.HANDSHAKE_TIMEOUT_SECONDS + 1)
        assert receiver.conn.state is State.CLOSED, f"{which} bit {pos}: {receiver.conn.state}"
        assert not receiver.of(HandshakeComplete)


# --- replay and reflection -------------------------------------------------------------------


def test_replayed_init_to_same_responder_is_refused() -> None:
    p = recorded_handshake()
    init = first_frame(p.wire_i2r, L.FrameType.INIT)
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(77), p.assoc_r)
    admit(r2, p.i.conn.auth, now=p.now)
    r2.receive_data(init, p.now)
    assert r2.state is State.CLOSED
    ev = r2.next_event()
    assert isinstance(ev, Closed)
    assert ev.alert is L.Alert.REPLAY


def test_replayed_handshake_to_restarted_responder_gets_nothing() -> None:
    """A responder that forgot everything: the KME has no key for the replayed ID any more."""
    p = recorded_handshake()
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(78), Association())
    admit(r2, p.i.conn.auth, now=p.now)
    r2.receive_data(first_frame(p.wire_i2r, L.FrameType.INIT), p.now)
    events = []
    while (ev := r2.next_event()) is not None:
        events.append(ev)
        if type(ev).__name__ == "NeedQkdKeysById":
            r2.provide_qkd_keys(p.kme.dec_keys(ev.key_ids), p.now)  # type: ignore[union-attr]
    for chunk in p.wire_i2r[2:]:
        r2.receive_data(chunk, p.now)
    while (ev := r2.next_event()) is not None:
        events.append(ev)
    assert not any(isinstance(e, HandshakeComplete) for e in events)
    assert r2.state is State.CLOSED


def test_replayed_init_in_preferred_mode_cannot_complete() -> None:
    """Even if the responder answers, the attacker cannot produce CONFIRM for the new RESP."""
    p = Pair(policy=L.QkdPolicyId.PREFERRED)
    p.handshake()
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(79), Association())
    admit(r2, p.i.conn.auth, now=p.now)
    r2.receive_data(first_frame(p.wire_i2r, L.FrameType.INIT), p.now)
    while (ev := r2.next_event()) is not None:
        if type(ev).__name__ == "NeedQkdKeysById":
            r2.provide_qkd_keys(None, p.now)
    assert r2.state is State.R_EXPECT_CONFIRM
    r2.receive_data(first_frame(p.wire_i2r, L.FrameType.CONFIRM), p.now)  # the old CONFIRM
    events = []
    while (ev := r2.next_event()) is not None:
        events.append(ev)
    assert not any(isinstance(e, HandshakeComplete) for e in events)
    assert r2.state is State.CLOSED


def test_reflected_init_back_to_initiator_is_refused() -> None:
    p = Pair()
    p.i.conn.start(p.now)
    drive_admission(p.i.conn, p.r.conn, p.now)
    for ev in iter(p.i.conn.next_event, None):
        if type(ev).__name__ == "NeedQkdKeys":
            p.i.conn.provide_qkd_keys(p.kme.enc_keys(1), p.now)
    init = p.i.conn.data_to_send()
    p.i.conn.receive_data(init, p.now)
    assert p.i.conn.state is State.CLOSED


def test_peer_claiming_our_identity_is_refused() -> None:
    """An INIT whose initiator is the responder itself (reflection of identity)."""
    a, b = psk_auths()
    params = SessionParams(Role.RESPONDER, L.SuiteId(1), L.QkdPolicyId.OFF, peer_name="site-a")
    r = Connection(params, b, PROVIDER, seeded_rng(1), Association())
    mirror_a = type(a)("site-b", b.psk() or b"")  # attacker uses the responder's own name
    ip = SessionParams(Role.INITIATOR, L.SuiteId(1), L.QkdPolicyId.OFF, peer_name="site-c")
    i = Connection(ip, mirror_a, PROVIDER, seeded_rng(2), Association())
    i.start(0)
    i.receive_data(r.data_to_send(), 0)  # CHALLENGE
    r.receive_data(i.data_to_send(), 0)  # HELLO: refused at AD3, before any INIT
    ev = r.next_event()
    assert isinstance(ev, Closed)
    assert ev.alert is L.Alert.WRONG_IDENTITY


def test_own_identity_as_peer_is_a_local_error() -> None:
    a, _ = psk_auths()
    params = SessionParams(Role.INITIATOR, L.SuiteId(1), L.QkdPolicyId.OFF, peer_name="site-a")
    with pytest.raises(Exception, match="reflection"):
        Connection(params, a, PROVIDER, seeded_rng(1), Association())


def test_wrong_peer_name_pki() -> None:
    p = Pair(auth="pki")
    p.i.conn.params = dataclasses.replace(p.i.conn.params, peer_name="site-x")
    p.handshake()
    assert not p.established()
    assert p.closed()


def test_responder_expecting_other_peer_refuses() -> None:
    p = Pair(auth="psk")
    p.r.conn.params = dataclasses.replace(p.r.conn.params, peer_name="site-z")
    p.handshake()
    assert any(c.alert is L.Alert.WRONG_IDENTITY for c in p.closed())


def test_untrusted_key_pki() -> None:
    from .pair import pki_auths

    a, _ = pki_auths()
    _, b = pki_auths()  # responder trusts a different initiator key
    p = Pair(auth="pki", auths=(a, b))
    p.handshake()
    assert not p.established()
    assert any(c.alert is L.Alert.BAD_CERTIFICATE for c in p.closed())


# --- downgrade -----------------------------------------------------------------------------------


def _rewrite_init(p: Pair, **changes: object) -> None:
    """Attacker rewrites INIT fields and recomputes the (public-key) PKI admission MAC."""

    def tamper(d: str, data: bytes) -> bytes:
        if d != "i2r" or data[4] != L.FrameType.INIT:
            return data
        m = Init.decode(data[5:])
        m = dataclasses.replace(m, **changes)  # type: ignore[arg-type]
        adm = hmac_sha384(schedule.admission_key_pki(m.suite, m.responder), m.core())[
            : L.ADMISSION_LEN
        ]
        return dataclasses.replace(m, admission=adm).encode()

    p.tamper = tamper


def test_suite_downgrade_in_flight_refused() -> None:
    p = Pair(auth="pki", suite=L.SuiteId.MLKEM1024_X25519_AES256GCM_SHA384)
    _rewrite_init(p, suite=L.SuiteId.MLKEM768_X25519_AES256GCM_SHA384)
    p.handshake()
    assert not p.established()
    assert any(c.alert is L.Alert.SUITE_MISMATCH for c in p.closed())


@pytest.mark.parametrize("policy", [L.QkdPolicyId.REQUIRED, L.QkdPolicyId.PREFERRED])
def test_qkd_mode_downgrade_in_flight_refused(policy: L.QkdPolicyId) -> None:
    p = Pair(auth="pki", policy=policy)
    _rewrite_init(p, qkd_offered=False, qkd_key_id=bytes(16))
    p.handshake()
    assert not p.i.of(HandshakeComplete), "initiator accepted a transcript without its QKD key"
    assert p.closed()


def test_policy_rewrite_refused() -> None:
    p = Pair(auth="pki", policy=L.QkdPolicyId.REQUIRED)
    _rewrite_init(p, qkd_policy=L.QkdPolicyId.PREFERRED)
    p.handshake()
    assert any(c.alert is L.Alert.QKD_POLICY_MISMATCH for c in p.closed())


def test_init_with_other_version_gets_unsupported_version() -> None:
    """§3.1: an INIT whose version byte is not 0x01 is answered with alert 2, not 1."""
    p = Pair(auth="pki")

    def tamper(d: str, data: bytes) -> bytes:
        if d == "i2r" and data[4] == L.FrameType.INIT:
            return data[:5] + bytes([2]) + data[6:]
        return data

    p.tamper = tamper
    p.handshake()
    assert not p.established()
    assert [c.alert for c in p.r.of(Closed)] == [L.Alert.UNSUPPORTED_VERSION]
    assert not any(type(e).__name__ == "NeedQkdKeysById" for e in p.r.events)


def test_low_order_x25519_key_in_init_is_refused() -> None:
    """§3.4 B5: an all-zero X25519 shared secret (peer key u = 0) is refused with alert 11."""
    p = Pair(auth="pki")
    _rewrite_init(p, x25519_public=bytes(32))
    p.handshake()
    assert not p.established()
    assert [c.alert for c in p.r.of(Closed)] == [L.Alert.AUTHENTICATION_FAILED]


def test_psk_admission_mac_stops_forged_init_before_kme() -> None:
    p = Pair(auth="psk")
    _rewrite_init(p, nonce=bytes(32))  # attacker cannot compute the PSK admission MAC
    p.handshake()
    assert any(c.alert is L.Alert.ADMISSION_FAILED for c in p.closed())
    assert not any(type(e).__name__ == "NeedQkdKeysById" for e in p.r.events)


def test_bootstrap_flood_is_rate_limited() -> None:
    a, b = psk_auths()
    assoc = Association()
    results = []
    for n in range(12):
        p = Pair(auths=(a, b), assoc_r=assoc, seed=100 + n)
        p.handshake()
        results.append(p.established())
    assert results[: L.BOOTSTRAP_BURST] == [True] * L.BOOTSTRAP_BURST
    assert not all(results)


# --- key IDs -----------------------------------------------------------------------------------


def test_key_id_reuse_refused() -> None:
    a, b = psk_auths()
    assoc_r = Association()
    kme = FakeKme(seed=42)
    p = Pair(auths=(a, b), assoc_r=assoc_r, kme=kme, seed=1)
    p.handshake()
    assert p.established()
    # a second handshake whose KME hands out the same key ID again
    kme2 = FakeKme(seed=42)
    q = Pair(auths=(a, b), assoc_r=assoc_r, kme=kme2, seed=2)
    q.handshake()
    assert not q.established()
    assert any(c.alert is L.Alert.REPLAY for c in q.closed())


def test_key_id_substitution_detected() -> None:
    """Attacker swaps the key ID for another valid one: the responder's key differs -> MACs fail."""
    p = Pair(auth="psk", policy=L.QkdPolicyId.REQUIRED)
    other = p.kme.enc_keys(1)
    assert other is not None

    def tamper(d: str, data: bytes) -> bytes:
        if d == "i2r" and data[4] == L.FrameType.INIT:
            m = Init.decode(data[5:])
            import uuid

            return dataclasses.replace(m, qkd_key_id=uuid.UUID(other[0][0]).bytes).encode()
        return data

    p.tamper = tamper
    p.handshake()
    assert not p.established()


# --- records ------------------------------------------------------------------------------------


def _records_after_handshake(n: int = 3) -> tuple[Pair, list[bytes]]:
    p = recorded_handshake()
    for k in range(n):
        p.i.conn.send_message(b"message %d" % k, p.now)
    return p, frames(p.i.conn.data_to_send())


def _feed(p: Pair, chunks: list[bytes]) -> Closed | None:
    for c in chunks:
        p.r.conn.receive_data(c, p.now)
    p.pump()
    closed = p.r.of(Closed)
    return closed[0] if closed else None


def test_record_tampered() -> None:
    p, recs = _records_after_handshake()
    c = _feed(p, [flip(recs[0], len(recs[0]) - 3)])
    assert c is not None
    assert c.alert is L.Alert.RECORD_FAILURE
    assert p.r.conn.stats["record_auth_failures"] == 1
    assert p.r.messages() == []


def test_record_header_tampered() -> None:
    p, recs = _records_after_handshake()
    bad = bytearray(recs[0])
    bad[5 + 3] ^= 0  # epoch unchanged
    bad[5 + 4 + 7] ^= 1  # sequence number changed
    c = _feed(p, [bytes(bad)])
    assert c is not None
    assert c.alert is L.Alert.RECORD_FAILURE


def test_record_replayed() -> None:
    p, recs = _records_after_handshake()
    c = _feed(p, [recs[0], recs[0]])
    assert p.r.messages() == [b"message 0"]
    assert c is not None
    assert c.alert is L.Alert.RECORD_FAILURE


def test_record_reordered() -> None:
    p, recs = _records_after_handshake()
    c = _feed(p, [recs[1], recs[0]])
    assert p.r.messages() == []
    assert c is not None


def test_record_dropped_is_detected() -> None:
    p, recs = _records_after_handshake()
    c = _feed(p, [recs[0], recs[2]])
    assert p.r.messages() == [b"message 0"]
    assert c is not None


def test_record_truncated() -> None:
    p, recs = _records_after_handshake()
    short = recs[0][:-5]
    short = struct.pack(">I", len(short) - 4) + short[4:]
    c = _feed(p, [short])
    assert c is not None
    assert p.r.messages() == []


def test_record_from_other_epoch_rejected() -> None:
    p, recs = _records_after_handshake()
    bad = bytearray(recs[0])
    bad[5:9] = struct.pack(">I", 7)
    c = _feed(p, [bytes(bad)])
    assert c is not None


# --- rekey authentication ---------------------------------------------------------------------


def _rekey_with(p: Pair, tamper_init: object = None, kme_swap: bool = False) -> None:
    p.i.conn.rekey_now(p.now)
    p.pump()


def test_rekey_with_wrong_qkd_pad_refused() -> None:
    p = recorded_handshake()
    real = p.kme.dec_keys

    def wrong(ids: tuple[str, ...]) -> list[tuple[str, bytes]] | None:
        got = real(ids)
        assert got is not None
        got[1] = (got[1][0], bytes(32))  # responder's KME returns another pad for key 1
        return got

    p.kme.dec_keys = wrong  # type: ignore[method-assign]
    p.i.conn.rekey_now(p.now)
    p.pump()
    assert p.rekeys() == ([], [])
    assert any(c.alert is L.Alert.AUTHENTICATION_FAILED for c in p.closed())


def test_rekey_with_wrong_chain_mac_refused() -> None:
    p = recorded_handshake()

    def tamper(d: str, data: bytes) -> bytes:
        if d == "i2r" and data[4] == L.FrameType.REKEY_INIT:
            return flip(data, len(data) - 1)
        return data

    p.tamper = tamper
    before = len(p.r.events)
    p.i.conn.rekey_now(p.now)
    p.pump()
    assert p.rekeys() == ([], [])
    assert any(c.alert is L.Alert.AUTHENTICATION_FAILED for c in p.closed())
    # the chain MAC is checked before the KME: no key was fetched for the forged rekey
    assert not any(type(e).__name__ == "NeedQkdKeysById" for e in p.r.events[before:])


def test_rekey_replay_refused() -> None:
    p = recorded_handshake()
    p.i.conn.rekey_now(p.now)
    p.pump()
    old_rekey_init = next(
        f for c in p.wire_i2r for f in frames(c) if f[4] == L.FrameType.REKEY_INIT
    )
    p.r.conn.receive_data(old_rekey_init, p.now)
    p.pump()
    assert any(c.alert is L.Alert.REPLAY for c in p.closed())


def _forged_rekey_init(p: Pair, chain: bytes, pad: bytes, kid: list[bytes]) -> bytes:
    epoch = p.assoc_r.epoch + 1
    kem = PROVIDER.kem_keygen(p.i.conn.kem_alg, bytes(64))
    from gateway.crypto import X25519PrivateKey

    unsigned = RekeyInit(
        epoch,
        bytes(32),
        True,
        tuple(kid),
        kem.public_bytes(),
        X25519PrivateKey(bytes(range(32))).public_bytes(),
        b"",
        b"",
    )
    tag = poly1305_tag(pad, unsigned.auth_input())
    mac_i, _ = schedule.rekey_mac_keys(chain, epoch)
    return dataclasses.replace(
        unsigned, wc_tag=tag, mac=hmac_sha384(mac_i, unsigned.auth_input() + tag)
    ).encode()


def test_attacker_with_mldsa_keys_and_psk_but_no_qkd_cannot_rekey() -> None:
    """The bootstrap credentials are useless after bootstrap: rekeys rest on chain + QKD pads."""
    p = recorded_handshake("pki")
    # The attacker holds both signing keys and recorded every byte; it does not have the
    # chain key (derived with the QKD key) nor the QKD pads. Best effort: derive a 'chain'
    # from everything public and sign nothing (no signature is accepted after bootstrap).
    fake_chain = schedule.epoch_keys(bytes(48), p.i.conn.transcript_hash).chain
    keys = p.kme.enc_keys(3)  # the attacker cannot get these either; give it fresh IDs at most
    assert keys is not None
    forged = _forged_rekey_init(
        p, fake_chain, bytes(32), [bytes(16), bytes(15) + b"\x01", bytes(15) + b"\x02"]
    )
    p.r.conn.receive_data(forged, p.now)
    p.pump()
    assert p.rekeys()[1] == []
    assert any(c.alert is L.Alert.AUTHENTICATION_FAILED for c in p.r.of(Closed))


def test_chain_key_alone_is_not_enough_qkd_pad_needed() -> None:
    """Even with the chain key (HMAC passes), a wrong one-time pad fails the Wegman-Carter tag."""
    p = recorded_handshake()
    chain = p.assoc_r.chain
    assert chain is not None
    keys = p.kme.enc_keys(3)  # real IDs exist at the KME; the attacker does not know the pad bytes
    assert keys is not None
    import uuid

    ids = [uuid.UUID(k).bytes for k, _ in keys]
    forged = _forged_rekey_init(p, chain, bytes(32), ids)
    p.r.conn.receive_data(forged, p.now)
    p.pump()
    assert p.rekeys()[1] == []
    assert any(c.alert is L.Alert.AUTHENTICATION_FAILED for c in p.r.of(Closed))


def test_pad_alone_is_not_enough_chain_needed() -> None:
    p = recorded_handshake()
    keys = p.kme.enc_keys(3)
    assert keys is not None
    import uuid

    ids = [uuid.UUID(k).bytes for k, _ in keys]
    forged = _forged_rekey_init(p, bytes(48), keys[1][1], ids)
    p.r.conn.receive_data(forged, p.now)
    p.pump()
    assert p.rekeys()[1] == []
    assert any(c.alert is L.Alert.AUTHENTICATION_FAILED for c in p.r.of(Closed))


def test_attacker_bootstrap_with_stolen_credentials_fails_under_required_qkd() -> None:
    """With ML-DSA keys and PSK but no access to the master SAE's KME, no key ID works."""
    p = recorded_handshake("pki")
    attacker = Pair(
        auth="pki",
        auths=(p.i.conn.auth, p.r.conn.auth),
        assoc_r=p.assoc_r,
        kme=FakeKme(seed=999),
        seed=55,
    )
    attacker.kme.dec_keys = p.kme.dec_keys  # type: ignore[method-assign]  # responder asks its real KME
    attacker.handshake()
    assert not attacker.r.of(HandshakeComplete)
    assert any(c.alert is L.Alert.QKD_UNAVAILABLE for c in attacker.closed())


def test_unexpected_messages_in_each_state() -> None:
    p = recorded_handshake()
    init = first_frame(p.wire_i2r, L.FrameType.INIT)
    p.i.conn.receive_data(init, p.now)  # INIT to an established initiator
    assert p.i.conn.state is State.CLOSED
    assert not p.rekeys()[0]
    assert isinstance(p.i.of(Closed)[0] if p.i.of(Closed) else p.i.conn.next_event(), Closed)


def test_rekey_events_not_emitted_on_failure() -> None:
    p = recorded_handshake()
    assert p.rekeys() == ([], [])
    assert not any(isinstance(e, RekeyComplete) for e in p.i.events)


def test_preferred_rekey_with_delivered_keys_must_verify_the_pad() -> None:
    """RK3: once the KME delivered the offered keys, WC_1 must verify even under preferred."""
    p = Pair(policy=L.QkdPolicyId.PREFERRED)
    p.handshake()
    assert p.established()
    real = p.kme.dec_keys

    def wrong(ids: tuple[str, ...]) -> list[tuple[str, bytes]] | None:
        got = real(ids)
        assert got is not None
        got[1] = (got[1][0], bytes(32))  # another pad for key 1: WC_1 cannot verify
        return got

    p.kme.dec_keys = wrong  # type: ignore[method-assign]
    p.i.conn.rekey_now(p.now)
    p.pump()
    assert p.rekeys() == ([], [])
    assert [c.alert for c in p.r.of(Closed)] == [L.Alert.AUTHENTICATION_FAILED]


def test_preferred_rekey_with_undeliverable_key_ids_is_chain_only_and_alarmed() -> None:
    """RK3: offered IDs the responder's KME cannot deliver -> qkd_used = 0, chain MAC only,
    alarmed on both sides; never a QKD-authenticated epoch."""
    p = Pair(policy=L.QkdPolicyId.PREFERRED)
    p.handshake()
    p.kme.peer_available = False  # responder's KME delivers nothing (unknown IDs look the same)
    p.i.conn.rekey_now(p.now)
    p.pump()
    ri, rr = p.rekeys()
    assert [e.qkd_used for e in ri] == [False]
    assert [e.qkd_used for e in rr] == [False]
    for side in (p.i, p.r):
        kinds = {a.kind for a in side.of(Alarm)}
        assert {"qkd_unavailable", "qkd_mode_downgrade"} <= kinds
