"""SecureTransport (PUB/ACK over the link): end-to-end acknowledgement semantics, without
sockets. Two transports are joined by a fake link whose connections can be replaced."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.bridge.codec import encode
from gateway.bridge.transport import BridgeMessage, MessageProps
from gateway.errors import (
    BrokerRejected,
    BrokerUnavailable,
    DecodeError,
    GatewayError,
    PeerRejected,
    PeerUnavailable,
)
from gateway.peer_transport import (
    ACK,
    ACK_BATCH,
    ACK_REJECTED,
    ACK_UNAVAILABLE,
    BATCH_MAX_BYTES,
    BATCH_MAX_MESSAGES,
    MAX_CONCURRENT_DELIVERIES,
    PUB,
    PUB_BATCH,
    SecureTransport,
    decode_ack_batch,
    decode_pub_batch,
    encode_ack_batch,
    encode_pub_batch,
)


def msg(payload: bytes = b"x", **kw: object) -> BridgeMessage:
    return BridgeMessage("t/x", payload, 1, False, MessageProps(**kw), origin="site-a")  # type: ignore[arg-type]


class FakeLink:
    """Two ends; `conn` is the current connection token; payloads sent with an old `via` fail."""

    def __init__(self) -> None:
        self.conn = object()
        self.ends: dict[str, SecureTransport] = {}
        self.wire: list[tuple[str, bytes]] = []

    def sender(self, me: str, other: str):  # type: ignore[no-untyped-def]
        async def send(data: bytes, via: object | None) -> None:
            if via is not None and via is not self.conn:
                raise PeerUnavailable("the connection this answers has gone")
            conn = self.conn
            self.wire.append((me, data))
            await asyncio.sleep(0)
            if conn is self.conn:  # still the same connection when it arrives
                await self.ends[other].on_payload(data, conn)

        return send

    def reconnect(self) -> None:
        self.conn = object()
        for t in self.ends.values():
            t.link_down()


def pair(deliver_b):  # type: ignore[no-untyped-def]
    link = FakeLink()
    a = SecureTransport(link.sender("a", "b"), timeout=2.0)
    b = SecureTransport(link.sender("b", "a"), timeout=2.0)
    link.ends = {"a": a, "b": b}
    b.attach(deliver_b)
    a.attach(deliver_b)
    return link, a, b


async def test_forward_returns_after_the_peer_broker_accepted() -> None:
    got: list[BridgeMessage] = []

    async def deliver(m: BridgeMessage) -> None:
        await asyncio.sleep(0.01)
        got.append(m)

    _link, a, _b = pair(deliver)
    await a.forward(msg(b"hello"))
    assert [m.payload for m in got] == [b"hello"]
    assert a.outstanding == 0


@pytest.mark.parametrize(
    ("error", "expected"),
    [(BrokerRejected("no", 0x87), PeerRejected), (BrokerUnavailable("down"), PeerUnavailable)],
)
async def test_peer_broker_outcome_maps_to_rejected_or_unavailable(
    error: Exception, expected: type
) -> None:
    async def deliver(m: BridgeMessage) -> None:
        raise error

    _link, a, _b = pair(deliver)
    with pytest.raises(expected):
        await a.forward(msg())


async def test_ack_from_an_old_connection_never_answers_a_newer_message() -> None:
    """Review C1: B is still delivering X when the connection is replaced; its ACK must not
    travel on the new connection, where A's next PUB could carry the same id."""
    release = asyncio.Event()
    delivered: list[bytes] = []

    async def deliver(m: BridgeMessage) -> None:
        if m.payload == b"X":
            await release.wait()  # a slow broker B
        delivered.append(m.payload)

    link, a, _b = pair(deliver)
    x = asyncio.ensure_future(a.forward(msg(b"X")))
    await asyncio.sleep(0.05)
    link.reconnect()  # A's forward of X fails: stays unacked at broker A, will be resent
    with pytest.raises(PeerUnavailable):
        await x
    a._ids = iter([next(iter(struct.unpack(">Q", link.wire[0][1][1:9])))])  # worst case: same id
    y = asyncio.ensure_future(a.forward(msg(b"Y")))
    await asyncio.sleep(0.05)
    release.set()  # X's delivery finishes now; its ACK must be dropped, not sent on the new link
    await asyncio.wait_for(y, 2)
    assert delivered.count(b"Y") == 1  # Y's forward returned because Y was delivered
    acks = [d for who, d in link.wire if who == "b" and d[0] == ACK]
    assert len(acks) == 1  # only Y's


async def test_unencodable_message_is_rejected_not_retried() -> None:
    """Review H2: a message the codec cannot carry is a permanent refusal (dropped and counted
    by the bridge), not 'peer unavailable' retried for ever."""

    async def deliver(m: BridgeMessage) -> None:
        raise AssertionError("must not be sent")

    _link, a, _b = pair(deliver)
    with pytest.raises(PeerRejected):
        await a.forward(msg(user_properties=tuple(("k", "v") for _ in range(1025))))


async def test_busy_receiver_answers_unavailable_without_blocking() -> None:
    """Review M2: when every delivery slot is taken, on_payload answers at once."""
    gate = asyncio.Event()

    async def deliver(m: BridgeMessage) -> None:
        await gate.wait()

    link, a, b = pair(deliver)
    b._busy = MAX_CONCURRENT_DELIVERIES
    with pytest.raises(PeerUnavailable):
        await asyncio.wait_for(a.forward(msg()), 1)
    assert b.busy_refusals == 1
    assert any(who == "b" and d[0] == ACK and d[9] == ACK_UNAVAILABLE for who, d in link.wire)


async def test_garbage_and_unknown_acks_are_counted() -> None:
    async def deliver(m: BridgeMessage) -> None:
        return None

    _link, a, _b = pair(deliver)
    await a.on_payload(b"\x07" * 3, None)
    await a.on_payload(struct.pack(">BQB", ACK, 12345, 0), None)
    await a.on_payload(struct.pack(">BQ", 9, 1), None)
    assert a.decode_errors == 2
    assert a.unknown_acks == 1


# --- batched path: PUB_BATCH / ACK_BATCH (docs/protocol.md §6a) ---------------------------

M1 = BridgeMessage("siteA/t", b"21.5", 1, False, MessageProps(), origin="site-a")
M2 = BridgeMessage(
    "siteA/u",
    b"on",
    0,
    True,
    MessageProps(user_properties=(("k", "v"),), content_type="text/plain"),
    origin="site-a",
)
ID1, ID2 = 0x0102030405060708, 0x0102030405060709


def test_application_payload_vectors_of_protocol_md() -> None:
    """The hex vectors printed in docs/protocol.md §6a."""
    m1 = bytes.fromhex("010206736974652d61000773697465412f7400000000000432312e35")
    m2 = bytes.fromhex(
        "010506736974652d61000773697465412f75000a746578742f706c61696e000100016b000176000000026f6e"
    )
    assert encode(M1) == m1
    assert encode(M2) == m2
    batch = encode_pub_batch([(ID1, m1), (ID2, m2)])
    assert (
        batch
        == bytes.fromhex("03000201020304050607080000001c")
        + m1
        + bytes.fromhex("01020304050607090000002c")
        + m2
    )
    assert len(batch) == 99
    acks = encode_ack_batch([(ID1, 0), (ID2, 2)])
    assert acks == bytes.fromhex("040002010203040506070800010203040506070902")
    assert decode_pub_batch(batch) == [(ID1, m1), (ID2, m2)]
    assert decode_ack_batch(acks) == [(ID1, 0), (ID2, 2)]
    assert struct.pack(">BQ", PUB, ID1) + m1 == bytes.fromhex("010102030405060708") + m1


@given(st.binary(max_size=200))
def test_batch_decoders_raise_only_decode_error(data: bytes) -> None:
    for decoder, kind in ((decode_pub_batch, PUB_BATCH), (decode_ack_batch, ACK_BATCH)):
        for raw in (data, bytes([kind]) + data):
            with contextlib.suppress(DecodeError):
                decoder(raw)


@pytest.mark.parametrize(
    "bad",
    [
        b"\x03\x00\x00",  # count 0
        b"\x03\x00\x01" + b"\x00" * 11,  # entry header cut short
        b"\x03\x00\x01" + b"\x00" * 8 + b"\x00\x00\x00\x05abc",  # message cut short
        b"\x03\x00\x01" + b"\x00" * 8 + b"\x00\x00\x00\x00" + b"x",  # trailing byte
    ],
)
def test_malformed_pub_batches_do_not_decode(bad: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_pub_batch(bad)


@pytest.mark.parametrize(
    "bad", [b"\x04\x00\x00", b"\x04\x00\x01" + b"\x00" * 8, b"\x04\x00\x01" + b"\x00" * 10]
)
def test_malformed_ack_batches_do_not_decode(bad: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_ack_batch(bad)


class BatchLink:
    """Two batched transports joined synchronously (send_nowait), with replaceable
    connections; deliveries at the receiver finish when the test says so."""

    def __init__(self) -> None:
        self.conn = object()
        self.wire: list[tuple[str, bytes]] = []
        self.ends: dict[str, SecureTransport] = {}
        self.inbox: list[tuple[str, bytes, object]] = []

    def sender(self, me: str):  # type: ignore[no-untyped-def]
        def send_nowait(data: bytes, via: object | None) -> None:
            if via is not None and via is not self.conn:
                raise PeerUnavailable("the connection this answers has gone")
            self.wire.append((me, data))
            self.inbox.append((me, data, self.conn))

        return send_nowait

    async def pump(self) -> None:
        """Let scheduled flushes run, then hand what was sent to the other end."""
        for _ in range(3):
            await asyncio.sleep(0)
        while self.inbox:
            me, data, conn = self.inbox.pop(0)
            if conn is self.conn:
                other = "b" if me == "a" else "a"
                await self.ends[other].on_payload(data, conn)
            for _ in range(3):
                await asyncio.sleep(0)


async def _unused(data: bytes, via: object | None) -> None:
    raise AssertionError("the batched path must not use the coroutine send")


def batch_pair(
    deliveries: list[tuple[BridgeMessage, Callable[[GatewayError | None], None]]],
) -> tuple[BatchLink, SecureTransport, SecureTransport]:
    link = BatchLink()
    a = SecureTransport(_unused, timeout=2.0, send_nowait=link.sender("a"))
    b = SecureTransport(_unused, timeout=2.0, send_nowait=link.sender("b"))
    b.attach_nowait(lambda m, done: deliveries.append((m, done)))
    link.ends = {"a": a, "b": b}
    return link, a, b


async def test_one_loop_iteration_of_forwards_is_one_pub_batch_and_one_ack_batch() -> None:
    deliveries: list[tuple[BridgeMessage, Callable[[GatewayError | None], None]]] = []
    link, a, _b = batch_pair(deliveries)
    outcomes: list[GatewayError | None] = []
    for i in range(100):
        a.forward_nowait(msg(b"%d" % i), outcomes.append)
    await link.pump()
    assert [d[0] for _, d in link.wire] == [PUB_BATCH]  # 100 messages, one payload
    assert [m.payload for m, _ in deliveries] == [b"%d" % i for i in range(100)]  # in order
    assert outcomes == []  # nothing is done before the peer's broker accepted it
    for _, done in deliveries:
        done(None)
    await link.pump()
    assert [d[0] for who, d in link.wire if who == "b"] == [ACK_BATCH]
    assert outcomes == [None] * 100
    assert a.outstanding == 0


async def test_large_batches_are_split_by_count_and_bytes() -> None:
    link, a, _b = batch_pair([])
    for _ in range(BATCH_MAX_MESSAGES + 1):
        a.forward_nowait(msg(b"x"), lambda e: None)
    for _ in range(3):
        a.forward_nowait(msg(b"y" * (BATCH_MAX_BYTES // 2)), lambda e: None)
    await asyncio.sleep(0)
    counts = [len(decode_pub_batch(d)) for _, d in link.wire]
    assert counts == [BATCH_MAX_MESSAGES, 2, 1, 1]
    assert all(len(d) <= BATCH_MAX_BYTES + 64 for _, d in link.wire)
    await a.aclose()


async def test_batch_statuses_map_to_outcomes() -> None:
    deliveries: list[tuple[BridgeMessage, Callable[[GatewayError | None], None]]] = []
    link, a, _b = batch_pair(deliveries)
    outcomes: list[type | None] = []
    for _ in range(3):
        a.forward_nowait(msg(), lambda e: outcomes.append(None if e is None else type(e)))
    await link.pump()
    deliveries[0][1](None)
    deliveries[1][1](BrokerRejected("no", 0x87))
    deliveries[2][1](BrokerUnavailable("down"))
    await link.pump()
    assert outcomes == [None, PeerRejected, PeerUnavailable]


async def test_batch_ack_from_an_old_connection_is_dropped() -> None:
    """The reconnect case of the batched path: answers go only on the connection the
    batch came on."""
    deliveries: list[tuple[BridgeMessage, Callable[[GatewayError | None], None]]] = []
    link, a, b = batch_pair(deliveries)
    outcomes: list[GatewayError | None] = []
    a.forward_nowait(msg(b"X"), outcomes.append)
    await link.pump()
    link.conn = object()  # reconnect
    a.link_down()
    b.link_down()
    assert len(outcomes) == 1
    assert isinstance(outcomes[0], PeerUnavailable)
    deliveries[0][1](None)  # X's delivery finishes after the reconnect
    await link.pump()
    assert [who for who, _ in link.wire] == ["a"]  # its ACK never went out
    assert b.unknown_acks == 0


async def test_undecodable_entry_is_refused_and_the_rest_delivered() -> None:
    deliveries: list[tuple[BridgeMessage, Callable[[GatewayError | None], None]]] = []
    link, _a, b = batch_pair(deliveries)
    await b.on_payload(encode_pub_batch([(1, b"\x09junk"), (2, encode(M1))]), link.conn)
    await link.pump()
    assert [m for m, _ in deliveries] == [M1]
    assert b.decode_errors == 1
    assert decode_ack_batch(link.wire[0][1]) == [(1, ACK_REJECTED)]


async def test_malformed_batches_and_unknown_ids_are_counted_not_answered() -> None:
    deliveries: list[tuple[BridgeMessage, Callable[[GatewayError | None], None]]] = []
    link, _a, b = batch_pair(deliveries)
    await b.on_payload(b"\x03\x00\x01" + b"\x00" * 11, link.conn)
    await b.on_payload(b"\x04\x00\x02" + b"\x00" * 9, link.conn)
    await b.on_payload(encode_ack_batch([(77, 0)]), link.conn)
    await b.on_payload(b"\x05whatever", link.conn)
    await link.pump()
    assert b.decode_errors == 3
    assert b.unknown_acks == 1
    assert link.wire == []
    assert deliveries == []


async def test_busy_receiver_answers_batch_entries_unavailable() -> None:
    deliveries: list[tuple[BridgeMessage, Callable[[GatewayError | None], None]]] = []
    link, a, b = batch_pair(deliveries)
    b._busy = MAX_CONCURRENT_DELIVERIES
    outcomes: list[GatewayError | None] = []
    a.forward_nowait(msg(), outcomes.append)
    await link.pump()
    assert deliveries == []
    assert b.busy_refusals == 1
    assert len(outcomes) == 1
    assert isinstance(outcomes[0], PeerUnavailable)


async def test_unanswered_forwards_fail_by_the_sweep() -> None:
    link = BatchLink()
    a = SecureTransport(_unused, timeout=0.2, send_nowait=link.sender("a"))
    outcomes: list[GatewayError | None] = []
    a.forward_nowait(msg(), outcomes.append)
    async with asyncio.timeout(10):
        while not outcomes:
            await asyncio.sleep(0.05)
    assert isinstance(outcomes[0], PeerUnavailable)
    assert a.outstanding == 0


async def test_link_down_at_send_fails_the_batch() -> None:
    def down(data: bytes, via: object | None) -> None:
        raise PeerUnavailable("peer link is down")

    a = SecureTransport(_unused, send_nowait=down)
    outcomes: list[GatewayError | None] = []
    a.forward_nowait(msg(), outcomes.append)
    a.forward_nowait(msg(user_properties=tuple(("k", "v") for _ in range(1025))), outcomes.append)
    assert isinstance(outcomes[0], PeerRejected)  # cannot be encoded: at once
    await asyncio.sleep(0)
    assert isinstance(outcomes[1], PeerUnavailable)
    assert a.outstanding == 0
