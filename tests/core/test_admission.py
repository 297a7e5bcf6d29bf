"""Pre-handshake admission (docs/protocol.md §3.5, AD1..AD5) driven in memory.

Each test names the defence it covers; each was checked to fail with that defence removed.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core import labels as L
from gateway.core import schedule
from gateway.core.admission import Admission, Admitted
from gateway.core.connection import (
    Alarm,
    Association,
    Closed,
    Connection,
    HandshakeComplete,
    NeedQkdKeys,
    NeedQkdKeysById,
    State,
)
from gateway.core.wire import Admit, AlertMsg, Challenge, Hello
from gateway.errors import DecodeError

from .pair import (
    PROVIDER,
    Pair,
    admit,
    drive_admission,
    first_frame,
    pki_auths,
    psk_auths,
    seeded_rng,
    split_frames,
)

# --- codecs --------------------------------------------------------------------------------


@given(st.binary(max_size=200))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_admission_decoders_raise_only_decode_error(data: bytes) -> None:
    for dec in (Challenge.decode, Hello.decode, Admit.decode):
        with contextlib.suppress(DecodeError):
            dec(data)


@given(
    kind=st.sampled_from(list(L.HelloKind)),
    epoch=st.integers(0, 2**32 - 1),
    name=st.from_regex(r"[A-Za-z0-9._-]{1,63}", fullmatch=True),
    proof=st.binary(min_size=32, max_size=32),
)
@settings(max_examples=100, deadline=None)
def test_admission_frames_round_trip(
    kind: L.HelloKind, epoch: int, name: str, proof: bytes
) -> None:
    if kind is L.HelloKind.BOOTSTRAP:
        epoch = 0
    h = Hello(1, 2, 1, kind, epoch, name, "peer", bytes(range(32)), proof)
    assert Hello.decode(h.encode()[5:]) == h
    a = Admit(kind, epoch, proof)
    assert Admit.decode(a.encode()[5:]) == a
    c = Challenge(proof)
    assert Challenge.decode(c.encode()[5:]) == c
    assert len(c.encode()) == 4 + 1 + 1 + 32


def test_bootstrap_hello_with_an_epoch_is_a_decode_error() -> None:
    raw = Hello(1, 1, 2, L.HelloKind.RESUME, 7, "a", "b", bytes(32), bytes(32)).encode()
    body = bytearray(raw[5:])
    body[4] = L.HelloKind.BOOTSTRAP
    with pytest.raises(DecodeError):
        Hello.decode(bytes(body))


# --- the exchange --------------------------------------------------------------------------


def test_responder_speaks_first_with_a_fresh_cookie() -> None:
    """AD1: every connection starts with CHALLENGE; two connections never share a cookie."""
    p = Pair()
    a = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(1), Association())
    b = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(2), Association())
    ca, cb = a.data_to_send(), b.data_to_send()
    assert ca[4] == cb[4] == L.FrameType.CHALLENGE
    assert ca[6:] != cb[6:]


def test_no_qkd_key_is_fetched_before_admit() -> None:
    """Wasted QKD key: the initiator asks for enc_keys only after a verified ADMIT."""
    p = Pair()
    p.handshake()
    i2 = Connection(p.i.conn.params, p.i.conn.auth, PROVIDER, seeded_rng(5), p.assoc_i)
    i2.start(p.now)
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(6), p.assoc_r)
    i2.receive_data(r2.data_to_send(), p.now)  # CHALLENGE
    assert [type(e) for e in iter(i2.next_event, None)] == []  # HELLO only, no NeedQkdKeys
    # the responder is loaded and refuses (or an attacker evicts us): nothing was spent
    i2.receive_data(AlertMsg(L.Alert.RATE_LIMITED, "rate_limited").encode(), p.now)
    events = list(iter(i2.next_event, None))
    assert not any(isinstance(e, NeedQkdKeys) for e in events)
    assert isinstance(events[-1], Closed)
    assert p.assoc_i.chain is not None  # a refusal costs nothing of the association


def test_resumption_spends_exactly_three_qkd_keys() -> None:
    p = Pair()
    p.handshake()
    before = len(p.kme.delivered)
    q = Pair(assoc_i=p.assoc_i, assoc_r=p.assoc_r, kme=p.kme, seed=3)
    q.handshake()
    assert q.established()
    assert len(p.kme.delivered) - before == L.REKEY_QKD_KEYS


def test_resume_hello_proves_the_chain_before_any_kme_call() -> None:
    """A HELLO with a wrong chain MAC is refused at AD3: no dec_keys, no Admitted event."""
    p = Pair()
    p.handshake()
    fake = Association()
    fake.set_chain(p.assoc_r.epoch, bytes(48))  # right epoch, wrong chain key
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(8), p.assoc_r)
    challenge = r2.data_to_send()
    adm = Admission(  # the same builder the real initiator uses
        initiator=True,
        suite=r2.params.suite,
        auth_mode=p.i.conn.auth.mode,
        qkd_policy=r2.params.qkd_policy,
        identity="site-a",
        peer_name="site-b",
        s0=schedule.psk_secret(None),
    )
    r2.receive_data(
        adm.consume_challenge(Challenge.decode(challenge[5:]), challenge, fake, seeded_rng(12)),
        p.now,
    )
    events = list(iter(r2.next_event, None))
    assert not any(isinstance(e, Admitted | NeedQkdKeysById) for e in events)
    assert isinstance(events[-1], Closed)
    assert events[-1].alert is L.Alert.NO_SESSION  # any failed resume: 16, no epoch oracle


def test_resume_without_chain_gets_no_session_before_qkd_is_spent() -> None:
    """Alert 16 comes at HELLO, so the initiator learns it before fetching any QKD key."""
    p = Pair()
    p.handshake()
    before = len(p.kme.delivered)
    q = Pair(assoc_i=p.assoc_i, assoc_r=Association(), kme=p.kme, seed=3)
    q.handshake()
    assert any(c.alert is L.Alert.NO_SESSION for c in q.closed())
    assert len(p.kme.delivered) == before
    assert not any(isinstance(e, NeedQkdKeys) for e in q.i.events)


def test_resume_accepts_the_next_epoch_when_a_rekey_was_in_flight() -> None:
    """I installed e+1 (saw REKEY_RESP) but R never saw a record of e+1: R has it in `next`."""
    p = Pair()
    p.handshake()
    p.i.conn.rekey_now(p.now)
    for ev in iter(p.i.conn.next_event, None):
        if isinstance(ev, NeedQkdKeys):
            p.i.conn.provide_qkd_keys(p.kme.enc_keys(ev.count), p.now)
    p.r.conn.receive_data(p.i.conn.data_to_send(), p.now)  # REKEY_INIT
    for ev in iter(p.r.conn.next_event, None):
        if isinstance(ev, NeedQkdKeysById):
            p.r.conn.provide_qkd_keys(p.kme.dec_keys(ev.key_ids), p.now)
    p.i.conn.receive_data(p.r.conn.data_to_send(), p.now)  # REKEY_RESP: I is on epoch 1
    p.i.conn.data_to_send()  # the EPOCH_CONFIRM is lost with the connection
    assert p.assoc_i.epoch == 1
    assert p.assoc_r.epoch == 0
    assert p.assoc_r.next is not None
    q = Pair(assoc_i=p.assoc_i, assoc_r=p.assoc_r, kme=p.kme, seed=4)
    q.handshake()
    assert q.established()
    assert p.assoc_i.epoch == p.assoc_r.epoch == 2
    assert p.assoc_i.chain == p.assoc_r.chain


def test_hello_cannot_be_replayed_onto_another_connection() -> None:
    """The proof covers the cookie: a captured HELLO is refused on a new connection."""
    p = Pair()
    p.handshake()
    i2 = Connection(p.i.conn.params, p.i.conn.auth, PROVIDER, seeded_rng(9), p.assoc_i)
    i2.start(p.now)
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(10), p.assoc_r)
    i2.receive_data(r2.data_to_send(), p.now)
    hello = i2.data_to_send()  # captured on the wire
    assert hello[4] == L.FrameType.HELLO
    r3 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(11), p.assoc_r)
    r3.data_to_send()
    r3.receive_data(hello, p.now)
    events = list(iter(r3.next_event, None))
    assert not any(isinstance(e, Admitted) for e in events)
    assert isinstance(events[-1], Closed)
    assert events[-1].alert is L.Alert.NO_SESSION  # a resume HELLO: 16 (AD3)


def test_forged_admit_is_refused_and_costs_no_qkd_key() -> None:
    """AD5: a resuming initiator checks R's chain MAC in ADMIT before fetching QKD keys."""
    p = Pair()
    p.handshake()
    i2 = Connection(p.i.conn.params, p.i.conn.auth, PROVIDER, seeded_rng(5), p.assoc_i)
    i2.start(p.now)
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(6), p.assoc_r)
    i2.receive_data(r2.data_to_send(), p.now)
    i2.data_to_send()
    forged = Admit(L.HelloKind.RESUME, p.assoc_i.epoch, bytes(32)).encode()
    i2.receive_data(forged, p.now)
    events = list(iter(i2.next_event, None))
    assert not any(isinstance(e, NeedQkdKeys) for e in events)
    assert isinstance(events[-1], Closed)
    assert events[-1].alert is L.Alert.ADMISSION_FAILED


def test_admitted_kind_fixes_the_next_frame() -> None:
    """A bootstrap admission accepts only INIT; a resume admission only REKEY_INIT."""
    p = Pair()
    p.handshake()
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(12), p.assoc_r)
    admit(r2, p.i.conn.auth, now=p.now)  # bootstrap kind
    p.i.conn.rekey_now(p.now)
    for ev in iter(p.i.conn.next_event, None):
        if isinstance(ev, NeedQkdKeys):
            p.i.conn.provide_qkd_keys(p.kme.enc_keys(ev.count), p.now)
    rekey_init = p.i.conn.data_to_send()
    r2.receive_data(rekey_init, p.now)
    closed = [e for e in iter(r2.next_event, None) if isinstance(e, Closed)]
    assert closed[0].alert is L.Alert.UNEXPECTED_MESSAGE
    r3 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(13), p.assoc_r)
    admit(r3, p.i.conn.auth, p.assoc_i, p.now)  # resume kind
    r3.receive_data(first_frame(p.wire_i2r, L.FrameType.INIT), p.now)
    closed = [e for e in iter(r3.next_event, None) if isinstance(e, Closed)]
    assert closed[0].alert is L.Alert.UNEXPECTED_MESSAGE


@pytest.mark.parametrize(
    ("mode", "resume", "authenticated"),
    [("psk", False, True), ("pki", False, False), ("psk", True, True), ("pki", True, True)],
)
def test_admitted_event_says_whether_a_secret_was_proven(
    mode: str, resume: bool, authenticated: bool
) -> None:
    p = Pair(auth=mode)
    p.handshake()
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(14), p.assoc_r)
    events = admit(r2, p.i.conn.auth, p.assoc_i if resume else None, p.now)
    ev = [e for e in events if isinstance(e, Admitted)]
    assert ev == [
        Admitted(
            L.HelloKind.RESUME if resume else L.HelloKind.BOOTSTRAP,
            p.assoc_r.epoch if resume else 0,
            authenticated,
        )
    ]


def test_psk_bootstrap_hello_without_the_psk_is_refused() -> None:
    p = Pair()
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(15), Association())
    stranger, _ = psk_auths()  # same names, another PSK
    r2.data_to_send()
    i2 = Connection(p.i.conn.params, stranger, PROVIDER, seeded_rng(16), Association())
    i2.start(p.now)
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(17), Association())
    drive_admission(i2, r2, p.now)
    events = list(iter(r2.next_event, None))
    assert not any(isinstance(e, Admitted) for e in events)
    assert [e.alert for e in events if isinstance(e, Closed)] == [L.Alert.ADMISSION_FAILED]


@pytest.mark.parametrize("field", ["suite", "auth_mode", "qkd_policy", "responder"])
def test_hello_mismatch_alerts(field: str) -> None:
    expect = {
        "suite": L.Alert.SUITE_MISMATCH,
        "auth_mode": L.Alert.AUTH_MODE_MISMATCH,
        "qkd_policy": L.Alert.QKD_POLICY_MISMATCH,
        "responder": L.Alert.WRONG_IDENTITY,
    }[field]
    p = Pair()
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(18), Association())
    r2.data_to_send()
    values = {"suite": 2, "auth_mode": 1, "qkd_policy": 0, "responder": "site-x"}
    h = Hello(1, 2, 2, L.HelloKind.BOOTSTRAP, 0, "site-a", "site-b", bytes(32), bytes(32))
    r2.receive_data(dataclasses.replace(h, **{field: values[field]}).encode(), p.now)
    closed = [e for e in iter(r2.next_event, None) if isinstance(e, Closed)]
    assert closed[0].alert is expect


def test_hello_with_another_version_gets_alert_2() -> None:
    p = Pair()
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(19), Association())
    r2.data_to_send()
    raw = bytearray(
        Hello(1, 1, 2, L.HelloKind.BOOTSTRAP, 0, "site-a", "site-b", bytes(32), bytes(32)).encode()
    )
    raw[5] = 2
    r2.receive_data(bytes(raw), p.now)
    closed = [e for e in iter(r2.next_event, None) if isinstance(e, Closed)]
    assert closed[0].alert is L.Alert.UNSUPPORTED_VERSION


# --- budgets -------------------------------------------------------------------------------


def test_global_budget_bounds_kme_calls_and_signatures_over_many_addresses() -> None:
    """pki: forged bootstrap INITs from 250 addresses cost at most the global budget."""
    p = Pair(auth="pki")
    rogue, _ = pki_auths()  # not trusted by the responder; knows only public values
    assoc_r = Association()
    kme_calls = signatures = refused = 0
    for n in range(250):
        att = Pair(auth="pki", auths=(rogue, p.r.conn.auth), assoc_r=assoc_r, seed=100 + n)
        att.r.conn.source = f"10.0.0.{n}"  # one INIT per address: the per-address bucket allows it
        att.handshake()
        assert not att.r.of(HandshakeComplete)
        kme_calls += len(att.r.of(NeedQkdKeysById))
        signatures += sum(1 for f in split_frames(att.wire_r2i) if f[4] == L.FrameType.RESP)
        refused += att.r.conn.stats["global_budget_refusals"]
    assert kme_calls == signatures == L.GLOBAL_BOOTSTRAP_BURST  # the clock did not move
    assert refused == 250 - L.GLOBAL_BOOTSTRAP_BURST


def test_rebootstrap_after_forged_no_session_needs_qkd_under_preferred() -> None:
    """§10 weakness: a forged alert 16 plus stolen bootstrap credentials and a responder that
    cannot fetch QKD keys (the attacker has no KME access) must not yield a session."""
    p = Pair(policy=L.QkdPolicyId.PREFERRED)
    p.handshake()
    # an on-path attacker answers our resumption with a forged alert 16 ...
    i2 = Connection(p.i.conn.params, p.i.conn.auth, PROVIDER, seeded_rng(21), p.assoc_i)
    i2.start(p.now)
    fake_r = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(22), Association())
    i2.receive_data(fake_r.data_to_send(), p.now)
    i2.data_to_send()
    i2.receive_data(AlertMsg(L.Alert.NO_SESSION, "no_session").encode(), p.now)
    events = list(iter(i2.next_event, None))
    assert [e.alert for e in events if isinstance(e, Closed)] == [L.Alert.NO_SESSION]
    assert any(isinstance(e, Alarm) and e.kind == "rebootstrap" for e in events)
    assert p.assoc_i.chain is None
    # ... then plays the responder with the stolen PSK; it cannot fetch the QKD key
    attacker = Pair(
        policy=L.QkdPolicyId.PREFERRED,
        auths=(p.i.conn.auth, p.r.conn.auth),
        assoc_i=p.assoc_i,
        kme=p.kme,
        seed=23,
    )
    attacker.kme.peer_available = False
    attacker.handshake()
    assert not attacker.i.of(HandshakeComplete)
    assert any(c.alert is L.Alert.QKD_UNAVAILABLE for c in attacker.i.of(Closed))
    # the real responder (QKD works) is accepted, and the flag clears
    p.kme.peer_available = True
    real = Pair(
        policy=L.QkdPolicyId.PREFERRED,
        auths=(p.i.conn.auth, p.r.conn.auth),
        assoc_i=p.assoc_i,
        kme=p.kme,
        seed=24,
    )
    real.handshake()
    assert real.established()
    assert not p.assoc_i.rebootstrap_needs_qkd


def test_no_session_is_not_honoured_after_admit() -> None:
    """Once R proved the chain in ADMIT, a later alert 16 cannot make us forget it."""
    p = Pair()
    p.handshake()
    i2 = Connection(p.i.conn.params, p.i.conn.auth, PROVIDER, seeded_rng(25), p.assoc_i)
    i2.start(p.now)
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(26), p.assoc_r)
    drive_admission(i2, r2, p.now)
    assert i2.state is State.I_EXPECT_REKEY_RESP
    i2.receive_data(AlertMsg(L.Alert.NO_SESSION, "no_session").encode(), p.now)
    closed = [e for e in iter(i2.next_event, None) if isinstance(e, Closed)]
    assert closed[0].alert is L.Alert.UNEXPECTED_MESSAGE
    assert p.assoc_i.chain is not None


def test_responder_confirms_a_new_session_with_a_record() -> None:
    """Honest counts: R's first record (EPOCH_CONFIRM) tells I the session is really up."""
    for resume in (False, True):
        p = Pair()
        p.handshake()
        if resume:
            p = Pair(assoc_i=p.assoc_i, assoc_r=p.assoc_r, kme=p.kme, seed=5)
            p.handshake()
        assert p.established()
        assert p.i.conn.stats["records_received"] >= 1
        assert any(f[4] == L.FrameType.RECORD for f in split_frames(p.wire_r2i))


def test_drained_global_budget_refuses_before_admit_and_costs_the_initiator_no_qkd_key() -> None:
    """Finding 1: pki bootstrap budgets are charged at AD3, before ADMIT. Forged bootstraps
    from many addresses drain the global bucket; the real initiator is then refused with alert
    17 before ADMIT (no enc_keys call), and its own per-address bucket is left untouched."""
    p0 = Pair(auth="pki", policy=L.QkdPolicyId.PREFERRED)
    a_i, a_r = p0.i.conn.auth, p0.r.conn.auth
    rogue, _ = pki_auths()  # knows only the public admission keys
    assoc_r = Association()
    for n in range(L.GLOBAL_BOOTSTRAP_BURST):
        att = Pair(auth="pki", policy=L.QkdPolicyId.PREFERRED, auths=(rogue, a_r),
                   assoc_r=assoc_r, seed=100 + n)  # fmt: skip
        att.r.conn.source = f"198.51.100.{n}"
        att.handshake()
    real = Pair(auth="pki", policy=L.QkdPolicyId.PREFERRED, auths=(a_i, a_r),
                assoc_r=assoc_r, seed=7)  # fmt: skip
    real.r.conn.source = "192.0.2.1"
    real.handshake()
    assert not real.i.of(NeedQkdKeys)
    assert real.kme.delivered == []
    (closed,) = real.i.of(Closed)
    assert closed.alert is L.Alert.RATE_LIMITED
    assert closed.by_peer
    assert closed.before_admit
    assert not any(f[4] == L.FrameType.ADMIT for f in split_frames(real.wire_r2i))
    assert "192.0.2.1" not in assoc_r.buckets  # the global refusal took no per-address token


def test_a_refusal_after_admit_is_not_flagged_before_admit() -> None:
    """Finding 1: only a close before AD5 may skip the initiator's back-off (§7)."""
    p = Pair()
    p.i.conn.start(p.now)
    drive_admission(p.i.conn, p.r.conn, p.now)
    assert p.i.conn.state is not State.I_EXPECT_ADMIT  # ADMIT verified
    p.i.conn.receive_data(AlertMsg(L.Alert.RATE_LIMITED, "rate_limited").encode(), p.now)
    (closed,) = [e for e in iter(p.i.conn.next_event, None) if isinstance(e, Closed)]
    assert closed.alert is L.Alert.RATE_LIMITED
    assert not closed.before_admit


# --- a responder that has had a chain (review findings 2 and 3) ----------------------------


def test_forged_init_after_an_outage_does_not_drop_the_chain() -> None:
    """Finding 3: a pki INIT (public admission keys) after > 3 x interval must not make R forget
    the chain; the real initiator still resumes afterwards."""
    p = Pair(auth="pki", policy=L.QkdPolicyId.PREFERRED)
    p.handshake()
    chain, epoch = p.assoc_r.chain, p.assoc_r.epoch
    rogue, _ = pki_auths()
    late = p.now + p.r.conn.params.rekey_interval * L.REJECT_AFTER_FACTOR + 1
    att = Pair(auth="pki", policy=L.QkdPolicyId.PREFERRED, auths=(rogue, p.r.conn.auth),
               assoc_r=p.assoc_r, seed=41)  # fmt: skip
    att.now = late
    att.handshake()
    assert not att.r.of(HandshakeComplete)
    assert (p.assoc_r.chain, p.assoc_r.epoch) == (chain, epoch)
    again = Pair(auth="pki", policy=L.QkdPolicyId.PREFERRED,
                 auths=(p.i.conn.auth, p.r.conn.auth), assoc_i=p.assoc_i, assoc_r=p.assoc_r,
                 kme=p.kme, seed=42)  # fmt: skip
    again.now = late
    again.handshake()
    assert again.established()


def test_bootstrap_without_qkd_is_refused_however_old_the_chain() -> None:
    """Finding 2: a PSK thief without KME access cannot bootstrap to R under `preferred` once R
    has held a chain, even after the chain went stale; R's first bootstrap without QKD alarms."""
    p = Pair(policy=L.QkdPolicyId.PREFERRED)
    p.kme.available = False  # the first bootstrap ever: accepted without QKD, but alarmed
    p.handshake()
    assert p.established()
    assert any(a.kind == "qkd_unavailable" for a in p.r.of(Alarm))
    thief = Pair(policy=L.QkdPolicyId.PREFERRED, auths=(p.i.conn.auth, p.r.conn.auth),
                 assoc_r=p.assoc_r, seed=43)  # fmt: skip
    thief.kme.available = False
    thief.now = p.now + 100 * p.r.conn.params.rekey_interval
    thief.handshake()
    assert not thief.r.of(HandshakeComplete)
    assert any(c.alert is L.Alert.QKD_UNAVAILABLE for c in thief.closed())
    # with QKD key the real initiator (which lost its state) can bootstrap again, alarmed
    back = Pair(policy=L.QkdPolicyId.PREFERRED, auths=(p.i.conn.auth, p.r.conn.auth),
                assoc_r=p.assoc_r, seed=44)  # fmt: skip
    back.now = thief.now
    back.handshake()
    assert back.established()
    assert any(a.kind == "rebootstrap" for a in back.r.of(Alarm))


# --- every failed resume answers 16; an unconfirmed bootstrap is dropped (findings 4, 8) -----


def test_resume_with_another_chain_under_the_same_epoch_rebootstraps() -> None:
    """Finding 4: I and R hold different chains at epoch 0. R answers 16 (not 7), so I drops
    its chain and bootstraps again (with QKD) instead of retrying the dead chain for ever."""
    p = Pair(policy=L.QkdPolicyId.PREFERRED)
    p.handshake()  # R: chain Z at epoch 0
    i_assoc = Association()
    q = Pair(policy=L.QkdPolicyId.PREFERRED, auths=(p.i.conn.auth, p.r.conn.auth),
             assoc_i=i_assoc, kme=p.kme, seed=70)  # fmt: skip
    q.handshake()  # I: chain Y at epoch 0; that responder's copy is lost
    assert i_assoc.epoch == p.assoc_r.epoch == 0
    assert i_assoc.chain != p.assoc_r.chain
    t = Pair(policy=L.QkdPolicyId.PREFERRED, auths=(p.i.conn.auth, p.r.conn.auth),
             assoc_i=i_assoc, assoc_r=p.assoc_r, kme=p.kme, seed=80)  # fmt: skip
    t.handshake()
    assert [c.alert for c in t.i.of(Closed)] == [L.Alert.NO_SESSION]
    assert i_assoc.chain is None
    assert i_assoc.rebootstrap_needs_qkd
    u = Pair(policy=L.QkdPolicyId.PREFERRED, auths=(p.i.conn.auth, p.r.conn.auth),
             assoc_i=i_assoc, assoc_r=p.assoc_r, kme=p.kme, seed=81)  # fmt: skip
    u.handshake()
    assert u.established()
    assert i_assoc.chain == p.assoc_r.chain


@pytest.mark.parametrize("how", ["eof", "timeout"])
def test_bootstrap_closed_without_alert_before_r_confirms_is_dropped(how: str) -> None:
    """Finding 4: the CONFIRM is lost with a TCP close (no ALERT) or the dead-peer timeout
    fires before R's first record: I must not keep a chain R may not hold."""
    p = Pair(policy=L.QkdPolicyId.PREFERRED)
    drop = lambda way, b: b"" if way == "r2i" and b[4] == L.FrameType.RECORD else b
    p.tamper = drop  # R's EPOCH_CONFIRM record never reaches I
    p.handshake()
    assert p.i.conn.state is State.ESTABLISHED
    assert p.assoc_i.chain is not None
    if how == "eof":
        p.i.conn.transport_closed(p.now)
    else:
        p.i.conn.close(p.now, L.Alert.TIMEOUT, "peer silent")
    (closed,) = [e for e in iter(p.i.conn.next_event, None) if isinstance(e, Closed)]
    assert closed.refused_unconfirmed
    assert p.assoc_i.chain is None
    assert p.assoc_i.rebootstrap_needs_qkd


def test_recorded_challenge_and_admit_do_not_replay_to_the_initiator() -> None:
    """Finding 7: HELLO carries n_hello, so a recorded (CHALLENGE, ADMIT) pair fails AD5 on a
    new connection (even with the very same initiator RNG otherwise) and costs no QKD key."""
    p = Pair(policy=L.QkdPolicyId.PREFERRED)
    p.handshake()  # recorded: a psk bootstrap
    frames = split_frames(p.wire_r2i)
    challenge = next(f for f in frames if f[4] == L.FrameType.CHALLENGE)
    admit_frame = next(f for f in frames if f[4] == L.FrameType.ADMIT)
    i = Connection(p.i.conn.params, p.i.conn.auth, PROVIDER, seeded_rng(99), Association())
    i.start(0.0)
    i.receive_data(challenge, 0.0)
    assert i.data_to_send()[4] == L.FrameType.HELLO
    i.receive_data(admit_frame, 0.0)
    events = list(iter(i.next_event, None))
    assert not any(isinstance(e, NeedQkdKeys) for e in events)
    assert [e.alert for e in events if isinstance(e, Closed)] == [L.Alert.ADMISSION_FAILED]


def test_hello_nonce_is_covered_by_the_hello_proof() -> None:
    """Finding 7: n_hello is part of HELLO_core: a HELLO with n_hello changed is refused."""
    p = Pair()
    i = Connection(p.i.conn.params, p.i.conn.auth, PROVIDER, seeded_rng(5), Association())
    i.start(0.0)
    r = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(6), Association())
    i.receive_data(r.data_to_send(), 0.0)
    hello = bytearray(i.data_to_send())
    hello[-33] ^= 1  # the last byte of n_hello (the 32-byte proof follows it)
    r.receive_data(bytes(hello), 0.0)
    closed = [e for e in iter(r.next_event, None) if isinstance(e, Closed)]
    assert [c.alert for c in closed] == [L.Alert.ADMISSION_FAILED]


def test_challenge_with_another_version_gets_alert_2() -> None:
    """Finding 10: the version byte of CHALLENGE is checked before decoding (§3.5)."""
    p = Pair()
    i = Connection(p.i.conn.params, p.i.conn.auth, PROVIDER, seeded_rng(5), Association())
    i.start(0.0)
    raw = bytearray(Challenge(bytes(32)).encode())
    raw[5] = 2
    i.receive_data(bytes(raw), 0.0)
    closed = [e for e in iter(i.next_event, None) if isinstance(e, Closed)]
    assert [c.alert for c in closed] == [L.Alert.UNSUPPORTED_VERSION]


def _rekey_in_flight() -> Pair:
    """I is on epoch 1 (saw REKEY_RESP); R is on epoch 0 with epoch 1 waiting in `next`."""
    p = Pair()
    p.handshake()
    p.i.conn.rekey_now(p.now)
    for ev in iter(p.i.conn.next_event, None):
        if isinstance(ev, NeedQkdKeys):
            p.i.conn.provide_qkd_keys(p.kme.enc_keys(ev.count), p.now)
    p.r.conn.receive_data(p.i.conn.data_to_send(), p.now)
    for ev in iter(p.r.conn.next_event, None):
        if isinstance(ev, NeedQkdKeysById):
            p.r.conn.provide_qkd_keys(p.kme.dec_keys(ev.key_ids), p.now)
    p.i.conn.receive_data(p.r.conn.data_to_send(), p.now)
    p.i.conn.data_to_send()
    assert p.assoc_r.next is not None
    return p


def test_rekey_init_must_follow_the_admitted_epoch() -> None:
    """Finding 9: a resume admitted for epoch 0 accepts REKEY_INIT for epoch 1 only, not a
    REKEY_INIT for next + 1 = 2 that R would otherwise take."""
    p = _rekey_in_flight()
    stale = Association()
    stale.set_chain(0, p.assoc_r.chain)  # type: ignore[arg-type]
    r2 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(21), p.assoc_r)
    admit(r2, p.i.conn.auth, stale, p.now)  # admitted: resume at epoch 0
    # the real initiator (epoch 1) builds REKEY_INIT for epoch 2 on another connection
    i3 = Connection(p.i.conn.params, p.i.conn.auth, PROVIDER, seeded_rng(22), p.assoc_i)
    i3.start(p.now)
    r3 = Connection(p.r.conn.params, p.r.conn.auth, PROVIDER, seeded_rng(23), p.assoc_r)
    drive_admission(i3, r3, p.now)
    for ev in iter(i3.next_event, None):
        if isinstance(ev, NeedQkdKeys):
            i3.provide_qkd_keys(p.kme.enc_keys(ev.count), p.now)
    rekey_init = first_frame([i3.data_to_send()], L.FrameType.REKEY_INIT)
    r2.receive_data(rekey_init, p.now)
    events = list(iter(r2.next_event, None))
    assert not any(isinstance(e, NeedQkdKeysById) for e in events)
    assert [e.alert for e in events if isinstance(e, Closed)] == [L.Alert.UNEXPECTED_MESSAGE]


def test_alert_17_before_challenge_is_a_refusal_before_admit() -> None:
    """Finding 5: a responder refusing at accept (pool_busy, address_cap) sends alert 17 first;
    the initiator sees a refusal before ADMIT (no back-off growth in the shell)."""
    p = Pair()
    i = Connection(p.i.conn.params, p.i.conn.auth, PROVIDER, seeded_rng(5), Association())
    i.start(0.0)
    i.receive_data(AlertMsg(L.Alert.RATE_LIMITED, "rate_limited").encode(), 0.0)
    (closed,) = [e for e in iter(i.next_event, None) if isinstance(e, Closed)]
    assert closed.alert is L.Alert.RATE_LIMITED
    assert closed.by_peer
    assert closed.before_admit
