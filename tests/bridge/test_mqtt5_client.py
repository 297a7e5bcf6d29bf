"""The mqtt5-codec client against a scripted fake broker (a real TCP server on loopback).

A fake broker lets the tests see every packet the client writes on every connection, which a
real mosquitto does not show: the acknowledgement-generation rule, the Receive Maximum of our
publishes, PUBACK reason codes, framing of split and coalesced packets, malformed input.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import mqtt5
import pytest

from gateway.bridge.client import Incoming, Subscription
from gateway.bridge.mqtt5_client import Mqtt5BrokerClient
from gateway.bridge.transport import MessageProps
from gateway.config import MqttSection
from gateway.errors import BrokerRejected, BrokerUnavailable

WAIT = 10.0  # upper bound of every wait here
Q1 = mqtt5.QoS.AT_LEAST_ONCE


class BrokerConn:
    """One accepted connection of the fake broker: packets in, bytes out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.received: list[Any] = []

    async def next(self) -> Any:
        while True:
            if self.buf:
                try:
                    packet, n = mqtt5.read(memoryview(self.buf))
                except IndexError:
                    pass
                else:
                    del self.buf[:n]
                    self.received.append(packet)
                    return packet
            data = await asyncio.wait_for(self.reader.read(65536), WAIT)
            if not data:
                raise EOFError("client closed")
            self.buf += data

    async def expect(self, kind: type) -> Any:
        while True:
            p = await self.next()
            if isinstance(p, kind):
                return p
            if not isinstance(p, mqtt5.PingReqPacket):
                raise AssertionError(f"expected {kind.__name__}, got {p!r}")

    async def expect_until(self, kind: type) -> Any:
        while not isinstance(p := await self.next(), kind):
            pass
        return p

    def send(self, *packets: Any) -> None:
        for p in packets:
            self.writer.write(p.write())

    async def handshake(self, *, session_present: bool = False, receive_max: int = 65535) -> None:
        await self.expect(mqtt5.ConnectPacket)
        self.send(mqtt5.ConnAckPacket(session_present=session_present, receive_max=receive_max))
        sub = await self.expect(mqtt5.SubscribePacket)
        self.send(mqtt5.SubAckPacket(sub.packet_id, [mqtt5.SubAckReasonCode(1)]))

    def close(self) -> None:
        self.writer.close()


class FakeBroker:
    def __init__(self) -> None:
        self.conns: asyncio.Queue[BrokerConn] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await self.conns.put(BrokerConn(r, w))

    async def accept(self) -> BrokerConn:
        return await asyncio.wait_for(self.conns.get(), WAIT)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"mqtt://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def broker() -> AsyncIterator[FakeBroker]:
    b = FakeBroker()
    b.server = await asyncio.start_server(b._accept, "127.0.0.1", 0)
    yield b
    b.server.close()


def make_client(broker: FakeBroker, **kw: Any) -> Mqtt5BrokerClient:
    settings = MqttSection(broker=broker.url, client_id="qgw-t", rules=[])  # type: ignore[call-arg]
    return Mqtt5BrokerClient(settings, **kw)


SUBS = [Subscription("t/#", 1, True, 1)]


async def started(
    broker: FakeBroker, client: Mqtt5BrokerClient, got: list[Incoming], **hs: Any
) -> BrokerConn:
    start = asyncio.ensure_future(client.start(SUBS, got.append))
    conn = await broker.accept()
    await conn.handshake(**hs)
    await asyncio.wait_for(start, WAIT)
    return conn


async def until(pred: Any, what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not pred():
            await asyncio.sleep(0.01)
    assert pred(), what


async def test_connect_is_persistent_and_subscribes_with_v5_options(broker: FakeBroker) -> None:
    client = make_client(broker, receive_maximum=50, session_expiry_seconds=3600)
    start = asyncio.ensure_future(client.start(SUBS, lambda m: None))
    conn = await broker.accept()
    c = await conn.expect(mqtt5.ConnectPacket)
    assert (c.client_id, c.clean_start, c.session_expiry_interval, c.receive_max) == (
        "qgw-t",
        False,
        3600,
        50,
    )
    assert c.keep_alive == 30
    conn.send(mqtt5.ConnAckPacket())
    sub = await conn.expect(mqtt5.SubscribePacket)
    (tf,) = sub.topic_filters
    assert (tf.pattern, int(tf.max_qos), tf.no_local, tf.retain_as_published) == (
        "t/#",
        1,
        True,
        True,
    )
    assert tf.retain_handling == mqtt5.RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS
    assert sub.subscription_id == 1
    conn.send(mqtt5.SubAckPacket(sub.packet_id, [mqtt5.SubAckReasonCode(1)]))
    await asyncio.wait_for(start, WAIT)
    assert client.connected
    await client.stop()
    assert isinstance(await conn.next(), mqtt5.DisconnectPacket)


async def test_an_ack_for_an_earlier_connection_never_goes_out_on_a_newer_one(
    broker: FakeBroker,
) -> None:
    """A PUBLISH arrives on connection 1, which breaks before the bridge acks it; the broker
    redelivers it (same packet id) on connection 2. The late ack of the first copy must be
    refused, and only the second copy's ack may appear on connection 2."""
    got: list[Incoming] = []
    client = make_client(broker)
    conn1 = await started(broker, client, got)
    conn1.send(mqtt5.PublishPacket("t/x", b"m1", qos=Q1, packet_id=7))
    await until(lambda: len(got) == 1, "first delivery")
    old = got[0]
    conn1.close()  # the broker drops the connection before the bridge acked
    await until(lambda: not client.connected, "disconnect seen")
    assert not client.is_current(old)
    assert client.ack(old) is False  # nowhere to go: refused, not queued for later

    conn2 = await broker.accept()  # the client reconnects (1 s back-off)
    await conn2.handshake(session_present=True)
    await until(lambda: client.connected, "reconnected")
    assert client.ack(old) is False  # the old copy's ack never travels on connection 2
    conn2.send(mqtt5.PublishPacket("t/x", b"m1", qos=Q1, packet_id=7, duplicate=True))
    await until(lambda: len(got) == 2, "redelivery")
    new = got[1]
    assert client.is_current(new)
    assert not client.is_current(old)
    assert client.ack(old) is False
    assert client.ack(new) is True
    # a marker publish: everything the client wrote before it arrives before it
    client.publish_nowait(
        "sync", b"", qos=0, retain=False, properties=MessageProps(), done=lambda c, t: None
    )
    await conn2.expect_until(mqtt5.PublishPacket)
    acks = [p.packet_id for p in conn2.received if isinstance(p, mqtt5.PubAckPacket)]
    assert acks == [7]  # exactly one PUBACK on connection 2: the redelivered copy's
    await client.stop()


async def test_nothing_is_acked_without_the_bridge(broker: FakeBroker) -> None:
    got: list[Incoming] = []
    client = make_client(broker)
    conn = await started(broker, client, got)
    conn.send(*(mqtt5.PublishPacket("t/x", b"%d" % i, qos=Q1, packet_id=i + 1) for i in range(3)))
    await until(lambda: len(got) == 3, "deliveries")
    client.publish_nowait(
        "sync", b"", qos=0, retain=False, properties=MessageProps(), done=lambda c, t: None
    )
    await conn.expect(mqtt5.PublishPacket)
    assert not [p for p in conn.received if isinstance(p, mqtt5.PubAckPacket)]
    await client.stop()


async def test_publishes_wait_beyond_the_brokers_receive_maximum(broker: FakeBroker) -> None:
    client = make_client(broker)
    conn = await started(broker, client, [], receive_max=2)
    outcomes: list[int | None] = []
    for i in range(5):
        client.publish_nowait(
            "o/x",
            b"%d" % i,
            qos=1,
            retain=False,
            properties=MessageProps(),
            done=lambda c, t: outcomes.append(c),
        )
    first = [await conn.expect(mqtt5.PublishPacket) for _ in range(2)]
    assert [p.payload for p in first] == [b"0", b"1"]
    # at most 2 unacknowledged: the third goes out only after a PUBACK
    conn.send(mqtt5.PubAckPacket(first[0].packet_id))
    third = await conn.expect(mqtt5.PublishPacket)
    assert third.payload == b"2"
    client.publish_nowait(
        "sync", b"", qos=0, retain=False, properties=MessageProps(), done=lambda c, t: None
    )
    marker = await conn.expect(mqtt5.PublishPacket)
    assert marker.topic == "sync"  # nothing more was sent while two were unacknowledged
    for p in (first[1], third):
        conn.send(mqtt5.PubAckPacket(p.packet_id))
    rest = [await conn.expect(mqtt5.PublishPacket) for _ in range(2)]
    for p in rest:
        conn.send(mqtt5.PubAckPacket(p.packet_id))
    await until(lambda: len(outcomes) == 5, "all acknowledged")
    assert outcomes == [0, 0, 0, 0, 0]
    await client.stop()


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (0x00, None),
        (0x10, None),  # no matching subscribers: accepted
        (0x87, BrokerRejected),  # not authorized: for good
        (0x90, BrokerRejected),
        (0x99, BrokerRejected),
        (0x97, BrokerUnavailable),  # quota exceeded: not now
        (0x80, BrokerUnavailable),
    ],
)
async def test_puback_reason_codes(broker: FakeBroker, code: int, error: type | None) -> None:
    client = make_client(broker)
    conn = await started(broker, client, [])
    props = MessageProps(
        user_properties=(("k", "v"), ("k", "w")),
        content_type="text/plain",
        response_topic="r/x",
        correlation_data=b"\x00\x01",
        message_expiry_interval=60,
        payload_format_indicator=1,
    )
    pub = asyncio.ensure_future(client.publish("o/x", b"hi", 1, True, props))
    p = await conn.expect(mqtt5.PublishPacket)
    assert (p.topic, p.payload, int(p.qos), p.retain) == ("o/x", b"hi", 1, True)
    assert p.user_properties == [("k", "v"), ("k", "w")]
    assert (p.content_type, p.response_topic, p.correlation_data) == ("text/plain", "r/x", b"\0\1")
    assert (p.message_expiry_interval, p.payload_format_indicator) == (60, 1)
    conn.send(mqtt5.PubAckPacket(p.packet_id, reason_code=mqtt5.PubAckReasonCode(code)))
    if error is None:
        await asyncio.wait_for(pub, WAIT)
    else:
        with pytest.raises(error):
            await asyncio.wait_for(pub, WAIT)
    await client.stop()


async def test_a_lost_connection_fails_outstanding_publishes(broker: FakeBroker) -> None:
    client = make_client(broker)
    conn = await started(broker, client, [])
    pub = asyncio.ensure_future(client.publish("o/x", b"hi", 1, False, MessageProps()))
    await conn.expect(mqtt5.PublishPacket)
    conn.close()
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(pub, WAIT)
    with pytest.raises(BrokerUnavailable):  # not connected: at once, not after a timeout
        await asyncio.wait_for(client.publish("o/x", b"hi", 1, False, MessageProps()), WAIT)
    await client.stop()


async def test_publish_times_out_by_the_sweep(broker: FakeBroker) -> None:
    client = make_client(broker, publish_timeout=0.2)
    conn = await started(broker, client, [])
    with pytest.raises(BrokerUnavailable, match="no PUBACK"):
        await asyncio.wait_for(client.publish("o/x", b"hi", 1, False, MessageProps()), WAIT)
    assert isinstance(await conn.expect(mqtt5.PublishPacket), mqtt5.PublishPacket)
    await client.stop()


async def test_split_and_coalesced_packets_are_framed(broker: FakeBroker) -> None:
    got: list[Incoming] = []
    client = make_client(broker)
    conn = await started(broker, client, got)
    big = b"y" * 200  # remaining length needs two bytes
    data = b"".join(
        mqtt5.PublishPacket(
            f"t/{i}",
            big,
            qos=Q1,
            packet_id=i + 1,
            subscription_ids=[1],
            user_properties=[("a", "b")],
        ).write()
        for i in range(20)
    )
    for i in range(0, len(data), 7):  # 7-byte pieces: headers and lengths split everywhere
        conn.writer.write(data[i : i + 7])
        await conn.writer.drain()
        await asyncio.sleep(0)
    await until(lambda: len(got) == 20, "all messages")
    assert [m.topic for m in got] == [f"t/{i}" for i in range(20)]
    assert all(m.payload == big and m.subscription_ids == (1,) for m in got)
    assert got[0].properties.user_properties == (("a", "b"),)
    assert [m.token[1] for m in got] == list(range(1, 21))
    await client.stop()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x30\xff\xff\xff\xff\x01",  # remaining length longer than four bytes
        b"\x32\x03\x00\x05a",  # QoS 1 PUBLISH cut short inside its own length
        b"\xf0\x00",  # reserved packet type
    ],
)
async def test_malformed_packets_are_counted_and_reconnect(
    broker: FakeBroker, garbage: bytes
) -> None:
    got: list[Incoming] = []
    client = make_client(broker)
    conn = await started(broker, client, got)
    conn.writer.write(garbage)
    await until(lambda: client.protocol_errors == 1, "error counted")
    with contextlib.suppress(EOFError, ConnectionError):
        while True:
            await conn.next()  # the client dropped the connection
    conn2 = await broker.accept()
    await conn2.handshake(session_present=True)
    await until(lambda: client.connected, "reconnected")
    assert got == []
    await client.stop()


async def test_first_connect_refused_raises(broker: FakeBroker) -> None:
    client = make_client(broker)
    start = asyncio.ensure_future(client.start(SUBS, lambda m: None))
    conn = await broker.accept()
    await conn.expect(mqtt5.ConnectPacket)
    conn.send(mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode.NOT_AUTHORIZED))
    with pytest.raises(BrokerUnavailable, match="refused"):
        await asyncio.wait_for(start, WAIT)


async def test_keepalive_pings_and_honours_the_server_keep_alive(broker: FakeBroker) -> None:
    client = make_client(broker, keepalive_seconds=60)
    start = asyncio.ensure_future(client.start(SUBS, lambda m: None))
    conn = await broker.accept()
    c = await conn.expect(mqtt5.ConnectPacket)
    assert c.keep_alive == 60
    conn.send(mqtt5.ConnAckPacket(server_keep_alive=1))  # the broker wants 1 s
    sub = await conn.expect(mqtt5.SubscribePacket)
    conn.send(mqtt5.SubAckPacket(sub.packet_id, [mqtt5.SubAckReasonCode(1)]))
    await asyncio.wait_for(start, WAIT)
    p = await conn.next()  # within WAIT, not 60 s
    assert isinstance(p, mqtt5.PingReqPacket)
    conn.send(mqtt5.PingRespPacket())
    await client.stop()


async def test_mqtts_with_a_client_certificate_round_trip(tmp_path: Any) -> None:
    """mqtts:// to a real mosquitto that requires a client certificate: subscribe, receive,
    ack, publish with PUBACK."""
    from gateway.bridge.mosquitto import Mosquitto, free_port
    from gateway.crypto import tlspki

    ca = tlspki.new_ca("test broker CA")
    tlspki.write_issued(ca, tmp_path / "ca.crt", None)
    tlspki.write_issued(tlspki.issue_server(ca, "broker"), tmp_path / "s.crt", tmp_path / "s.key")
    tlspki.write_issued(tlspki.issue_client(ca, "qgw-t"), tmp_path / "c.crt", tmp_path / "c.key")
    port = free_port()
    conf = (
        f"listener {port} 127.0.0.1\ncafile {tmp_path}/ca.crt\ncertfile {tmp_path}/s.crt\n"
        f"keyfile {tmp_path}/s.key\nrequire_certificate true\n"
    )
    with Mosquitto(tmp_path / "m", extra_config=conf):
        settings = MqttSection(  # type: ignore[call-arg]
            broker=f"mqtts://127.0.0.1:{port}",
            client_id="qgw-t",
            rules=[],
            tls_ca=tmp_path / "ca.crt",
            tls_cert=tmp_path / "c.crt",
            tls_key=tmp_path / "c.key",
        )
        got: list[Incoming] = []
        client = Mqtt5BrokerClient(settings)
        await client.start(SUBS, got.append)
        try:
            await client.publish("t/loop", b"via TLS", 1, False, MessageProps())
            # No Local: our own publish does not come back; a second client's does
            other = Mqtt5BrokerClient(
                settings.model_copy(update={"client_id": "other"}), session_expiry_seconds=0
            )
            await other.start([], lambda m: None)
            await other.publish("t/x", b"from other", 1, False, MessageProps())
            await other.stop()
            await until(lambda: len(got) == 1, "delivery over TLS")
            assert got[0].payload == b"from other"
            assert client.ack(got[0])
        finally:
            await client.stop()
