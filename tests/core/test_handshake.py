"""In-memory pair tests of the sans-I/O core: every suite x auth mode x QKD policy."""

from __future__ import annotations

import itertools

import pytest

from gateway.core import labels as L
from gateway.core.connection import (
    Alarm,
    Association,
    Closed,
    HandshakeComplete,
    RekeyComplete,
    State,
)

from .pair import FakeKme, Pair

# suite 0x03 (FrodoKEM) needs the oqs provider: tests/crypto/test_oqs_suite.py runs it
SUITES = [s for s in L.SuiteId if s is not L.SuiteId.FRODOKEM976AES_X25519_AES256GCM_SHA384]
POLICIES = list(L.QkdPolicyId)


def assert_in_step(p: Pair) -> None:
    """Both sides hold the same chain key, epoch and transcript hash."""
    assert p.assoc_i.chain is not None
    assert p.assoc_i.chain == p.assoc_r.chain
    assert p.assoc_i.epoch == p.assoc_r.epoch == p.i.conn.epoch == p.r.conn.epoch
    assert p.i.conn.transcript_hash == p.r.conn.transcript_hash


@pytest.mark.parametrize(
    ("suite", "auth", "policy"), list(itertools.product(SUITES, ["psk", "pki"], POLICIES))
)
def test_handshake_rekey_and_traffic(suite: L.SuiteId, auth: str, policy: L.QkdPolicyId) -> None:
    p = Pair(auth=auth, suite=suite, policy=policy)
    p.handshake()
    assert p.closed() == []
    assert p.established()
    hi, hr = p.i.of(HandshakeComplete)[0], p.r.of(HandshakeComplete)[0]
    assert hi.transcript_hash == hr.transcript_hash
    assert hi.qkd_used == hr.qkd_used == (policy is not L.QkdPolicyId.OFF)
    assert hi.peer.name == "site-b"
    assert hr.peer.name == "site-a"
    assert_in_step(p)
    chains = [p.assoc_i.chain]
    for n in range(3):
        big = bytes(range(256)) * 1000  # 256 kB: fragmented over several records
        p.i.conn.send_message(big, p.now)
        p.r.conn.send_message(b"reply %d" % n, p.now)
        p.pump()
        assert p.r.messages()[-1] == big
        assert p.i.messages()[-1] == b"reply %d" % n
        p.advance(p.i.conn.params.rekey_interval + 0.5)
        assert p.closed() == []
        assert_in_step(p)
        chains.append(p.assoc_i.chain)
    ri, rr = p.rekeys()
    assert [e.epoch for e in ri] == [e.epoch for e in rr] == [1, 2, 3]
    assert all(e.qkd_used == (policy is not L.QkdPolicyId.OFF) for e in ri + rr)
    assert len(set(chains)) == 4  # every epoch has a fresh chain key
    # QKD bits consumed: 1 key for bootstrap, 3 per rekey
    assert len(p.kme.delivered) == (0 if policy is L.QkdPolicyId.OFF else 1 + 3 * 3)


def test_different_runs_give_different_keys() -> None:
    a, b = Pair(seed=1), Pair(seed=2)
    a.handshake()
    b.handshake()
    assert a.assoc_i.chain != b.assoc_i.chain


def test_qkd_key_changes_every_derived_key() -> None:
    """Same randomness, same PSK, different QKD key -> different keys (QKD enters the schedule)."""
    from .pair import psk_auths

    auths = psk_auths(bytes(32))
    a = Pair(seed=5, kme=FakeKme(1), auths=auths)
    b = Pair(seed=5, kme=FakeKme(2), auths=auths)
    a.handshake()
    b.handshake()
    assert a.established()
    assert b.established()
    assert a.assoc_i.chain != b.assoc_i.chain


def test_preferred_without_qkd_alarms_and_records_absence() -> None:
    kme = FakeKme()
    kme.available = False
    p = Pair(policy=L.QkdPolicyId.PREFERRED, kme=kme)
    p.handshake()
    assert p.established()
    assert p.i.of(HandshakeComplete)[0].qkd_used is False
    assert any(a.kind == "qkd_unavailable" for a in p.i.of(Alarm))
    # QKD comes back: the next rekey uses it and the mode change is alarmed (cleared)
    kme.available = True
    p.advance(121)
    ri, rr = p.rekeys()
    assert ri[-1].qkd_used
    assert rr[-1].qkd_used
    changed = [a for a in p.alarms() if a.kind == "qkd_mode_downgrade"]
    assert changed
    assert changed[-1].active is False


def test_preferred_responder_without_qkd_is_authenticated_and_alarmed() -> None:
    kme = FakeKme()
    kme.peer_available = False
    p = Pair(policy=L.QkdPolicyId.PREFERRED, kme=kme)
    p.handshake()
    assert p.established()
    assert p.i.of(HandshakeComplete)[0].qkd_used is False
    assert p.r.of(HandshakeComplete)[0].qkd_used is False
    assert any(a.kind == "qkd_unavailable" for a in p.alarms())


def test_required_fails_closed_without_qkd() -> None:
    kme = FakeKme()
    kme.available = False
    p = Pair(policy=L.QkdPolicyId.REQUIRED, kme=kme)
    p.handshake()
    assert not p.established()
    assert p.i.conn.state is State.CLOSED
    assert p.closed()[0].alert is L.Alert.QKD_UNAVAILABLE
    assert any(a.kind == "qkd_unavailable" for a in p.alarms())


def test_required_responder_kme_down_fails_closed() -> None:
    kme = FakeKme()
    kme.peer_available = False
    p = Pair(policy=L.QkdPolicyId.REQUIRED, kme=kme)
    p.handshake()
    assert not p.established()
    assert any(c.alert is L.Alert.QKD_UNAVAILABLE for c in p.closed())


def test_required_rekey_without_qkd_keeps_keys_then_expires() -> None:
    p = Pair(policy=L.QkdPolicyId.REQUIRED)
    p.handshake()
    p.kme.available = False
    p.advance(121)
    assert p.closed() == []
    assert p.rekeys() == ([], [])
    assert any(a.kind == "qkd_unavailable" for a in p.alarms())
    # traffic still flows on the QKD-derived epoch-0 keys...
    p.i.conn.send_message(b"still", p.now)
    p.pump()
    assert p.r.messages() == [b"still"]
    # ...until the epoch is too old: fail closed
    for _ in range(60):
        p.advance(5)
        if p.closed():
            break
    assert any(c.alert is L.Alert.KEYS_EXPIRED for c in p.closed())


def test_required_rekey_recovers_when_qkd_returns() -> None:
    p = Pair(policy=L.QkdPolicyId.REQUIRED)
    p.handshake()
    p.kme.available = False
    p.advance(121)
    p.kme.available = True
    p.advance(L.REKEY_RETRY_SECONDS + 0.1)
    assert [e.epoch for e in p.rekeys()[0]] == [1]
    assert p.closed() == []


def test_resumption_on_new_connection_uses_chain_not_signatures() -> None:
    p = Pair(auth="pki")
    p.handshake()
    p.advance(121)
    epoch = p.assoc_i.epoch
    # new TCP connection, same associations: resumes with a QKD-authenticated rekey
    q = Pair(auth="pki", assoc_i=p.assoc_i, assoc_r=p.assoc_r, kme=p.kme, seed=9)
    q.handshake()
    assert q.established()
    hi = q.i.of(HandshakeComplete)[0]
    assert hi.resumed
    assert q.r.of(HandshakeComplete)[0].resumed
    assert q.assoc_i.epoch == epoch + 1
    assert_in_step(q)
    q.r.conn.send_message(b"resumed", q.now)
    q.pump()
    assert q.i.messages() == [b"resumed"]


def test_resumption_when_responder_lost_state_fails_with_no_session() -> None:
    p = Pair()
    p.handshake()
    q = Pair(assoc_i=p.assoc_i, assoc_r=Association(), kme=p.kme, seed=3)
    q.handshake()
    assert not q.established()
    assert any(c.alert is L.Alert.NO_SESSION for c in q.closed())


def test_rebootstrap_while_chain_exists_is_alarmed() -> None:
    p = Pair()
    p.handshake()
    # the peer restarted (no chain) and bootstraps again with the same PSK
    q = Pair(
        assoc_i=Association(),
        assoc_r=p.assoc_r,
        kme=p.kme,
        seed=4,
        auths=(p.i.conn.auth, p.r.conn.auth),
    )
    q.handshake()
    assert q.established()
    assert any(a.kind == "rebootstrap" for a in q.r.of(Alarm))


def test_budget_forces_rekey_before_limit() -> None:
    p = Pair(max_records=64, max_bytes=1 << 30)
    p.handshake()
    for n in range(200):
        if not p.i.conn.can_send():
            p.pump()
        p.i.conn.send_message(b"x%d" % n, p.now)
        p.pump()
    assert len(p.r.messages()) == 200
    assert len(p.rekeys()[0]) >= 3
    assert p.closed() == []


def test_responder_budget_also_triggers_initiator_rekey() -> None:
    p = Pair(max_records=32, max_bytes=1 << 30)
    p.handshake()
    for n in range(100):
        p.r.conn.send_message(b"r%d" % n, p.now)
        p.pump()
    assert len(p.i.messages()) == 100
    assert p.rekeys()[1]
    assert p.closed() == []


def test_close_is_authenticated_and_wipes() -> None:
    p = Pair()
    p.handshake()
    p.i.conn.close(p.now)
    p.pump()
    closed = p.r.of(Closed)
    assert closed
    assert closed[0].by_peer
    assert p.i.conn._send is None


def test_rekey_complete_events_carry_equal_hashes() -> None:
    p = Pair()
    p.handshake()
    p.i.conn.rekey_now(p.now)
    p.pump()
    ri, rr = p.rekeys()
    assert isinstance(ri[0], RekeyComplete)
    assert ri[0].transcript_hash == rr[0].transcript_hash
