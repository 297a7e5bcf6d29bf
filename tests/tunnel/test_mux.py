"""The sans-I/O stream multiplexer (gateway/tunnel/mux.py), two instances wired in memory."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.tunnel import messages as m
from gateway.tunnel.mux import (
    CreditAvailable,
    EndOfStream,
    Event,
    Finished,
    Multiplexer,
    Opened,
    OpenRefused,
    OpenRequested,
    Received,
    StreamReset,
)


def pair(window: int = 1000, max_streams: int = 16) -> tuple[Multiplexer, Multiplexer]:
    a = Multiplexer(initiator=True, listen_names=["svc"], window=window, max_streams=max_streams)
    b = Multiplexer(initiator=False, connect_names=["svc"], window=window, max_streams=max_streams)
    return a, b


def pump(src: Multiplexer, dst: Multiplexer) -> list[Event]:
    """Carry src's payloads to dst; return dst's events (Received data copied to bytes)."""
    for p in src.payloads_to_send():
        assert m.is_tunnel_payload(p)
        dst.receive(p)
    out: list[Event] = []
    while (ev := dst.next_event()) is not None:
        out.append(Received(ev.sid, bytes(ev.data)) if isinstance(ev, Received) else ev)
    return out


def opened(a: Multiplexer, b: Multiplexer) -> int:
    sid = a.open("svc")
    assert pump(a, b) == [OpenRequested(sid, "svc")]
    b.accept(sid)
    assert pump(b, a) == [Opened(sid)]
    return sid


def test_open_data_half_close_both_ways() -> None:
    a, b = pair()
    sid = opened(a, b)
    assert sid % 2 == 0  # the initiator's ids are even (TS8)
    a.send_data(sid, b"hello")
    assert pump(a, b) == [Received(sid, b"hello")]
    a.send_fin(sid)  # a -> b closed, b -> a still open
    assert pump(a, b) == [EndOfStream(sid)]
    b.send_data(sid, b"answer after the peer's FIN")
    assert pump(b, a) == [Received(sid, b"answer after the peer's FIN")]
    b.send_fin(sid)
    assert pump(b, a) == [EndOfStream(sid), Finished(sid)]
    assert not a.streams
    assert not b.streams
    assert a.counters["svc"].streams_opened == b.counters["svc"].streams_opened == 1
    assert a.counters["svc"].streams_closed == b.counters["svc"].streams_closed == 1


def test_responder_opens_odd_ids() -> None:
    b = Multiplexer(initiator=False, listen_names=["x"])
    assert [b.open("x"), b.open("x")] == [1, 3]


def test_unknown_name_refused_and_counted() -> None:
    a, b = pair()
    sid = a.open("nope")
    assert pump(a, b) == []
    assert b.counters["-unknown-"].refusals["unknown_tunnel"] == 1
    assert "nope" not in b.counters  # peer-chosen names never become labels
    assert pump(b, a) == [OpenRefused(sid, m.RefuseReason.UNKNOWN_TUNNEL)]
    assert a.counters["-unknown-"].refusals["unknown_tunnel"] == 1
    assert not a.streams


def test_connect_failure_refused() -> None:
    a, b = pair()
    sid = a.open("svc")
    pump(a, b)
    b.refuse(sid, m.RefuseReason.CONNECT_FAILED)
    assert pump(b, a) == [OpenRefused(sid, m.RefuseReason.CONNECT_FAILED)]
    assert b.counters["svc"].refusals["connect_failed"] == 1
    assert a.counters["svc"].refusals["connect_failed"] == 1


def test_too_many_streams_refused() -> None:
    a, b = pair(max_streams=2)
    opened(a, b)
    opened(a, b)
    sid = a.open("svc") if len(a.streams) < a.max_streams else None
    assert sid is None  # the opener has its own limit
    a.max_streams = 10
    sid = a.open("svc")
    assert pump(a, b) == []
    assert pump(b, a) == [OpenRefused(sid, m.RefuseReason.TOO_MANY_STREAMS)]


def test_window_stops_sender_and_grants_resume_it() -> None:
    a, b = pair(window=1000)
    sid = opened(a, b)
    assert a.credit(sid) == 1000
    a.send_data(sid, b"x" * 1000)
    assert a.credit(sid) == 0
    assert a.counters["svc"].window_stalls == 1
    evs = pump(a, b)  # b hands the bytes to its writer and grants them again
    assert evs == [Received(sid, b"x" * 1000)]
    assert pump(b, a) == [CreditAvailable(sid)]
    assert a.credit(sid) == 1000


def test_paused_writer_withholds_grants_until_resumed() -> None:
    a, b = pair(window=1000)
    sid = opened(a, b)
    b.writer_paused(sid)  # b's local socket is not draining
    a.send_data(sid, b"y" * 1000)
    pump(a, b)
    assert pump(b, a) == []  # no WINDOW: a stays stopped
    assert a.credit(sid) == 0
    b.writer_resumed(sid)
    assert pump(b, a) == [CreditAvailable(sid)]
    assert a.credit(sid) == 1000


def test_data_over_window_is_a_protocol_error() -> None:
    a, b = pair(window=100)
    sid = opened(a, b)
    b.receive(m.encode_data(sid, b"z" * 101))  # a buggy peer ignoring its credit
    assert b.next_event() == StreamReset(sid, m.ResetReason.PROTOCOL_ERROR, by_peer=False)
    assert b.payloads_to_send() == [m.encode_reset(sid, m.ResetReason.PROTOCOL_ERROR)]
    assert b.protocol_errors == 1
    assert b.counters["svc"].resets["protocol_error"] == 1


def test_data_after_fin_is_a_protocol_error() -> None:
    a, b = pair()
    sid = opened(a, b)
    a.send_fin(sid)
    pump(a, b)
    b.receive(m.encode_data(sid, b"late"))
    assert b.next_event() == StreamReset(sid, m.ResetReason.PROTOCOL_ERROR, by_peer=False)


def test_open_with_own_parity_is_refused_as_protocol_error() -> None:
    _a, b = pair()
    b.receive(m.encode_open(1, 10, "svc"))  # odd ids are b's own
    assert b.payloads_to_send() == [m.encode_reset(1, m.ResetReason.PROTOCOL_ERROR)]
    assert b.next_event() is None
    assert b.protocol_errors == 1


def test_reset_from_either_side() -> None:
    a, b = pair()
    sid = opened(a, b)
    b.reset(sid, m.ResetReason.ABORTED)
    assert pump(b, a) == [StreamReset(sid, m.ResetReason.ABORTED, by_peer=True)]
    assert not a.streams
    assert not b.streams
    # a late WINDOW for the gone stream is stale, not an error
    b.receive(m.encode_window(sid, 5))
    assert b.stale_messages == 1


def test_reset_while_connecting_becomes_refused() -> None:
    a, b = pair()
    sid = a.open("svc")
    pump(a, b)
    a.reset(sid)  # the local client went away before the far end connected
    assert pump(a, b) == [StreamReset(sid, m.ResetReason.ABORTED, by_peer=True)]
    assert not b.streams


def test_link_down_resets_everything_locally() -> None:
    a, b = pair()
    s1, s2 = opened(a, b), opened(a, b)
    a.send_data(s1, b"queued, never sent")
    a.link_down()
    assert a.payloads_to_send() == []
    evs = [a.next_event(), a.next_event()]
    assert {e.sid for e in evs if isinstance(e, StreamReset)} == {s1, s2}
    assert a.counters["svc"].resets["link_down"] == 2


def test_garbage_for_a_live_stream_resets_it() -> None:
    a, b = pair()
    sid = opened(a, b)
    b.receive(bytes([m.Kind.FIN]) + sid.to_bytes(4, "big") + b"extra")
    assert b.decode_errors == 1
    assert b.next_event() == StreamReset(sid, m.ResetReason.PROTOCOL_ERROR, by_peer=False)


def test_large_transfer_with_checksum_many_streams() -> None:
    a, b = pair(window=64 * 1024, max_streams=64)
    sids = [opened(a, b) for _ in range(20)]
    blobs = {sid: bytes((sid * 7 + i) % 251 for i in range(200_000)) for sid in sids}
    sent = dict.fromkeys(sids, 0)
    got: dict[int, bytearray] = {sid: bytearray() for sid in sids}
    while any(sent[s] < len(blobs[s]) for s in sids):
        for sid in sids:
            n = min(a.credit(sid), m.MAX_DATA, len(blobs[sid]) - sent[sid])
            if n:
                a.send_data(sid, blobs[sid][sent[sid] : sent[sid] + n])
                sent[sid] += n
        for ev in pump(a, b):
            if isinstance(ev, Received):
                got[ev.sid] += ev.data
        pump(b, a)
    for sid in sids:
        assert hashlib.sha256(got[sid]).digest() == hashlib.sha256(blobs[sid]).digest()


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=40), max_size=30))
def test_any_payloads_never_raise(payloads: list[bytes]) -> None:
    a, b = pair()
    opened(a, b)
    for p in payloads:
        b.receive(bytes([0x10 + (p[0] % 16 if p else 0)]) + p)
        while b.next_event() is not None:
            pass
        b.payloads_to_send()
    assert len(b.streams) <= b.max_streams
