"""SecureTransport (PUB/ACK over the link): end-to-end acknowledgement semantics, without
sockets. Two transports are joined by a fake link whose connections can be replaced."""

from __future__ import annotations

import asyncio
import struct

import pytest

from gateway.bridge.transport import BridgeMessage, MessageProps
from gateway.errors import BrokerRejected, BrokerUnavailable, PeerRejected, PeerUnavailable
from gateway.peer_transport import ACK, ACK_UNAVAILABLE, MAX_CONCURRENT_DELIVERIES, SecureTransport


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
