"""Regression tests for the independent protocol review (docs/protocol.md §11 rows added)."""

from __future__ import annotations

from gateway.core import labels as L
from gateway.core.connection import (
    Alarm,
    Association,
    Closed,
    Connection,
    HandshakeComplete,
    NeedQkdKeys,
    State,
)
from gateway.core.wire import AlertMsg

from .pair import PROVIDER, Pair, admit, drive_admission, first_frame, seeded_rng
from .test_attacks import frames


def test_rekey_resp_while_resumption_waits_for_qkd_keys_closes_cleanly() -> None:
    """H1: an injected REKEY_RESP before our REKEY_INIT exists must not raise out of the core."""
    p = Pair()
    p.handshake()
    p.i.conn.rekey_now(p.now)
    p.pump()
    resp = next(f for c in p.wire_r2i for f in frames(c) if f[4] == L.FrameType.REKEY_RESP)
    i2 = Connection(p.i.conn.params, p.i.conn.auth, PROVIDER, seeded_rng(5), p.assoc_i)
    i2.start(p.now)
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(6), p.assoc_r)
    drive_admission(i2, r2, p.now)  # resumption admitted: now it waits for three QKD keys
    assert isinstance(i2.next_event(), NeedQkdKeys)
    i2.receive_data(resp, p.now)  # must not raise
    assert i2.state is State.CLOSED
    assert p.assoc_i.chain is not None  # the chain survives a bogus frame


def test_replayed_rekey_init_on_new_connection_is_refused_and_chains_stay_equal() -> None:
    """H2: under qkd = off a replayed REKEY_INIT must not overwrite the pending `next` chain."""
    p = Pair(policy=L.QkdPolicyId.OFF)
    p.handshake()
    p.i.conn.rekey_now(p.now)
    replay = p.i.conn.data_to_send()  # the REKEY_INIT, as an on-path attacker records it
    assert replay[4] == L.FrameType.REKEY_INIT
    p.r.conn.receive_data(replay, p.now)
    held = p.r.conn.data_to_send()  # R's REKEY_RESP, held back by the attacker
    # the attacker replays the same REKEY_INIT on a second connection to R
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(9), p.assoc_r)
    admit(r2, p.i.conn.auth, p.assoc_i, p.now)  # the attacker cannot do this (chain key) ...
    r2.receive_data(replay, p.now)  # ... but even an admitted connection refuses the replay
    assert r2.state is State.CLOSED
    ev = [e for e in iter(r2.next_event, None) if isinstance(e, Closed)]
    assert ev[0].alert is L.Alert.REPLAY
    # the real exchange completes and both sides agree
    p.i.conn.receive_data(held, p.now)
    p.pump()
    assert p.assoc_i.chain == p.assoc_r.chain
    p.i.conn.rekey_now(p.now)
    p.pump()
    assert p.closed() == []
    assert [e.epoch for e in p.rekeys()[1]] == [1, 2]


def test_spoofed_no_session_alert_after_handshake_does_not_force_rebootstrap() -> None:
    """M1: an unauthenticated ALERT in ESTABLISHED only closes the connection."""
    p = Pair()
    p.handshake()
    p.i.conn.receive_data(AlertMsg(L.Alert.NO_SESSION, "no").encode(), p.now)
    closed = p.i.of(Closed) or [e for e in iter(p.i.conn.next_event, None) if isinstance(e, Closed)]
    assert closed[0].alert is not L.Alert.NO_SESSION


def test_rebootstrap_without_qkd_refused_while_chain_live_preferred() -> None:
    """M1: with stolen credentials under `preferred`, an attacker cannot bootstrap without QKD."""
    p = Pair(policy=L.QkdPolicyId.PREFERRED)
    p.handshake()
    attacker = Pair(
        policy=L.QkdPolicyId.PREFERRED,
        auths=(p.i.conn.auth, p.r.conn.auth),
        assoc_r=p.assoc_r,
        seed=77,
    )
    attacker.kme.available = False  # no access to the master SAE's KME
    attacker.handshake()
    assert not attacker.r.of(HandshakeComplete)
    assert any(c.alert is L.Alert.QKD_UNAVAILABLE for c in attacker.closed())
    assert not any(a.kind == "rebootstrap" for a in attacker.r.of(Alarm))
    # however old the chain (here > 3 x interval without an epoch), it stays so: review
    # finding 2 (a thief after an outage), until the responder restarts (§10)
    late = Pair(
        policy=L.QkdPolicyId.PREFERRED,
        auths=(p.i.conn.auth, p.r.conn.auth),
        assoc_r=p.assoc_r,
        seed=78,
    )
    late.kme.available = False
    late.now = p.now + p.r.conn.params.rekey_interval * L.REJECT_AFTER_FACTOR + 1
    late.handshake()
    assert not late.r.of(HandshakeComplete)
    assert any(c.alert is L.Alert.QKD_UNAVAILABLE for c in late.closed())
    assert p.assoc_r.chain is not None  # the unauthenticated INIT did not drop the old chain


def test_rebootstrap_alarm_only_after_authentication() -> None:
    """M2: a forged INIT (PKI: public admission key) does not raise the rebootstrap alarm."""
    p = Pair(auth="pki")
    p.handshake()
    from .pair import pki_auths

    rogue_a, _ = pki_auths()  # a key the responder does not trust
    forged = Pair(auth="pki", auths=(rogue_a, p.r.conn.auth), assoc_r=p.assoc_r, kme=p.kme, seed=31)
    forged.handshake()
    assert not forged.r.of(HandshakeComplete)
    assert not any(a.kind == "rebootstrap" for a in forged.r.of(Alarm))


def test_alert_reason_sent_to_peer_reveals_nothing() -> None:
    """Low 3: the peer learns the alert code, not our internal reason."""
    p = Pair()
    p.handshake()
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(1), p.assoc_r)
    admit(r2, p.i.conn.auth, now=p.now)
    r2.receive_data(first_frame(p.wire_i2r, L.FrameType.INIT), p.now)  # replayed INIT
    sent = r2.data_to_send()
    msg = AlertMsg.decode(sent[5:])
    assert msg.reason == "replay"
    assert "nonce" not in msg.reason


def test_responder_rekey_waiting_for_kme_times_out() -> None:
    """Low 5: a responder stuck waiting for dec_keys in a rekey closes at the deadline."""
    p = Pair()
    p.handshake()
    p.kme.dec_keys = lambda ids: None  # type: ignore[method-assign]
    p.i.conn.rekey_now(p.now)
    # deliver REKEY_INIT; R asks the KME; we never answer
    for ev in iter(p.i.conn.next_event, None):
        if isinstance(ev, NeedQkdKeys):
            p.i.conn.provide_qkd_keys(p.kme.enc_keys(ev.count), p.now)
    p.r.conn.receive_data(p.i.conn.data_to_send(), p.now)
    assert [type(e).__name__ for e in iter(p.r.conn.next_event, None)] == ["NeedQkdKeysById"]
    t = p.r.conn.get_timer()
    assert t is not None
    p.r.conn.handle_timer(t + 0.1)
    assert p.r.conn.state is State.CLOSED


def test_new_association_has_no_chain() -> None:
    assert Association().chain is None
