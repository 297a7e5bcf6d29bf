"""Hypothesis: decoders never raise anything but DecodeError; the state machine never crashes."""

from __future__ import annotations

import contextlib
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core import labels as L
from gateway.core.connection import Association, Closed, Connection, Role, SessionParams, State
from gateway.core.wire import DECODERS, FrameBuffer, decode_record_header
from gateway.errors import DecodeError

from .pair import PROVIDER, Pair, psk_auths, seeded_rng

FTYPES = list(DECODERS)


@given(st.sampled_from(FTYPES), st.binary(max_size=3000))
@settings(max_examples=400)
def test_message_decoders_raise_only_decode_error(ftype: L.FrameType, data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        DECODERS[ftype](data)


@given(st.binary(max_size=200))
def test_record_header_decoder(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_record_header(data)


@given(st.lists(st.binary(max_size=600), max_size=8))
def test_frame_buffer_any_chunks(chunks: list[bytes]) -> None:
    fb = FrameBuffer()
    try:
        for c in chunks:
            fb.feed(c)
            while fb.next_frame() is not None:
                pass
    except DecodeError:
        pass


def _recorded() -> list[bytes]:
    p = Pair(auth="psk", policy=L.QkdPolicyId.OFF)
    p.handshake()
    p.i.conn.send_message(b"hello", p.now)
    p.r.conn.send_message(b"world", p.now)
    p.pump()
    p.i.conn.rekey_now(p.now)
    p.pump()
    chunks = p.wire_i2r + p.wire_r2i
    frames: list[bytes] = []
    for c in chunks:
        fb = FrameBuffer()
        fb.feed(c)
        while (f := fb.next_frame()) is not None:
            frames.append(f[2])
    return frames


RECORDED = _recorded()
AUTHS = psk_auths(bytes(32))


def _mutate(frame: bytes, how: int, rnd: random.Random) -> bytes:
    if how == 0 or len(frame) < 6:
        return frame
    b = bytearray(frame)
    if how == 1:
        b[rnd.randrange(5, len(b))] ^= 1 << rnd.randrange(8)
    elif how == 2:
        del b[rnd.randrange(5, len(b)) :]
        b[0:4] = (len(b) - 4).to_bytes(4, "big")
    return bytes(b)


@given(
    role=st.sampled_from([Role.INITIATOR, Role.RESPONDER]),
    picks=st.lists(
        st.tuples(st.integers(0, len(RECORDED) - 1), st.integers(0, 2), st.integers(0, 2**32)),
        max_size=8,
    ),
    garbage=st.binary(max_size=64),
    start=st.booleans(),
    resume=st.booleans(),
)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_state_machine_any_input_reaches_legal_state(
    role: Role, picks: list[tuple[int, int, int]], garbage: bytes, start: bool, resume: bool
) -> None:
    auth = AUTHS[0] if role is Role.INITIATOR else AUTHS[1]
    peer = "site-b" if role is Role.INITIATOR else "site-a"
    policy = L.QkdPolicyId.REQUIRED if resume else L.QkdPolicyId.OFF
    params = SessionParams(role, L.SuiteId(1), policy, peer_name=peer)
    assoc = Association()
    if resume:  # an association with a live chain: the connection resumes (waits for QKD keys)
        p = Pair(auth="psk", auths=AUTHS, policy=policy)
        p.handshake()
        assoc = p.assoc_i if role is Role.INITIATOR else p.assoc_r
    c = Connection(params, auth, PROVIDER, seeded_rng(3), assoc)
    now = 0.0
    if start and role is Role.INITIATOR:
        c.start(now)
    for idx, how, seed in picks:
        c.receive_data(_mutate(RECORDED[idx], how, random.Random(seed)), now)  # never raises
        now += 1
        t = c.get_timer()
        if t is not None:
            c.handle_timer(max(now, t))
    c.receive_data(garbage, now)
    assert c.state in set(State)
    events = list(iter(c.next_event, None))
    closes = [e for e in events if isinstance(e, Closed)]
    assert len(closes) <= 1
    if closes:
        assert c.state is State.CLOSED
        assert events[-1] is closes[0] or all(
            not isinstance(e, Closed) for e in events[events.index(closes[0]) + 1 :]
        )
