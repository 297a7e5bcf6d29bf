"""The broker's queue from $SYS (issue 18): read on the bridge's connection, never forwarded.

Against the scripted fake broker of test_mqtt5_client (every packet visible) and against a real
mosquitto with a short ``sys_interval`` (and one whose ACL forbids $SYS).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import mqtt5

from gateway.bridge.bridge import Bridge
from gateway.bridge.client import Incoming
from gateway.bridge.mosquitto import Mosquitto
from gateway.bridge.mqtt5_client import SYS_SUBSCRIPTION_ID, SYS_TOPICS

from .conftest import LinkTransport, eventually, mqtt_settings
from .test_mqtt5_client import WAIT, BrokerConn, FakeBroker, broker, make_client, started

__all__ = ["broker"]  # the fake broker fixture, used by name

Q0 = mqtt5.QoS.AT_MOST_ONCE


def sys_publish(topic: str, value: bytes, qos: int = 0, pid: int | None = None) -> Any:
    return mqtt5.PublishPacket(
        topic,
        value,
        qos=mqtt5.QoS(qos),
        retain=True,
        packet_id=pid,
        subscription_ids=[SYS_SUBSCRIPTION_ID],
    )


@contextlib.asynccontextmanager
async def bridged(
    m: Mosquitto, mosquitto_factory: Any
) -> AsyncIterator[tuple[Bridge, LinkTransport]]:
    """Bridge A on broker ``m`` (rule ``# out``) wired in memory to a bridge B on a second broker
    (rule ``# in``); yields A and the link transport that records what A forwarded."""
    link = LinkTransport()
    peer = Bridge(
        mqtt_settings(mosquitto_factory(), "qgw-b", [{"pattern": "#", "direction": "in"}]),
        "site-b",
        LinkTransport(),
    )
    link.peer = peer
    a = Bridge(mqtt_settings(m, "qgw-a", [{"pattern": "#", "direction": "out"}]), "site-a", link)
    await peer.start()
    await a.start()
    try:
        yield a, link
    finally:
        await a.stop(timeout=1)
        await peer.stop(timeout=1)


async def expect_sys_subscribe(conn: BrokerConn) -> Any:
    sub = await conn.expect(mqtt5.SubscribePacket)
    assert sub.subscription_id == SYS_SUBSCRIPTION_ID
    assert [f.pattern for f in sub.topic_filters] == list(SYS_TOPICS)
    assert all(f.max_qos == Q0 for f in sub.topic_filters)
    return sub


async def test_sys_values_are_kept_and_never_handed_to_the_bridge(broker: FakeBroker) -> None:
    client = make_client(broker, broker_stats=True)
    got: list[Incoming] = []
    conn = await started(broker, client, got)
    try:
        assert client.broker_stats_updated is None
        sub = await expect_sys_subscribe(conn)  # after the rules' SUBACK, on the same connection
        conn.send(mqtt5.SubAckPacket(sub.packet_id, [mqtt5.SubAckReasonCode(0)] * len(SYS_TOPICS)))
        conn.send(
            sys_publish("$SYS/broker/store/messages/count", b"1234"),
            sys_publish("$SYS/broker/store/messages/bytes", b"99000"),
            sys_publish("$SYS/broker/uptime", b"77 seconds"),
            sys_publish("$SYS/broker/version", b"mosquitto version 2.0.11\x00\x07"),
            sys_publish("$SYS/broker/publish/messages/dropped", b"not a number"),  # ignored
            sys_publish("$SYS/broker/clients/connected", b"3", qos=1, pid=9),  # upgraded: acked
        )
        ack = await conn.expect(mqtt5.PubAckPacket)
        assert ack.packet_id == 9
        await eventually(lambda: "clients_connected" in client.broker_stats, WAIT, "$SYS values")
        assert client.broker_stats == {
            "stored_messages": 1234,
            "stored_bytes": 99000,
            "uptime_seconds": 77,
            "version": "mosquitto version 2.0.11",
            "clients_connected": 3,
        }
        assert client.broker_stats_updated is not None
        assert got == []  # none reached the bridge
        assert client.protocol_errors == 0
        # a rule delivery still flows as before
        conn.send(
            mqtt5.PublishPacket(
                "t/1", b"x", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=3, subscription_ids=[1]
            )
        )
        await eventually(lambda: len(got) == 1, WAIT, "rule delivery")
        assert got[0].topic == "t/1"
    finally:
        await client.stop()


async def test_refused_sys_is_not_asked_again_and_the_bridge_runs_on(broker: FakeBroker) -> None:
    client = make_client(broker, broker_stats=True)
    got: list[Incoming] = []
    conn = await started(broker, client, got)
    try:
        sub = await expect_sys_subscribe(conn)
        refused = [mqtt5.SubAckReasonCode.NOT_AUTHORIZED] * len(SYS_TOPICS)
        conn.send(mqtt5.SubAckPacket(sub.packet_id, refused))
        conn.send(mqtt5.PingRespPacket())
        await asyncio.sleep(0.1)
        assert client.connected
        conn.close()  # the next connection: rules only
        conn2 = await broker.accept()
        await conn2.handshake(session_present=True)
        conn2.send(
            mqtt5.PublishPacket(
                "t/2", b"y", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=4, subscription_ids=[1]
            )
        )
        await eventually(lambda: len(got) == 1, WAIT, "delivery on the second connection")
        assert client.ack(got[0])
        ack = await conn2.expect(mqtt5.PubAckPacket)  # no SUBSCRIBE before it
        assert ack.packet_id == 4
        assert client.broker_stats == {}
        assert client.protocol_errors == 0
    finally:
        await client.stop()


async def test_a_broker_that_drops_us_over_sys_is_not_asked_a_third_time(
    broker: FakeBroker,
) -> None:
    client = make_client(broker, broker_stats=True)
    got: list[Incoming] = []
    conn = await started(broker, client, got)
    try:
        await expect_sys_subscribe(conn)
        conn.close()  # strike 1
        conn = await broker.accept()
        await conn.handshake(session_present=True)
        await expect_sys_subscribe(conn)
        conn.close()  # strike 2: off
        conn = await broker.accept()
        await conn.handshake(session_present=True)
        conn.send(mqtt5.PingRespPacket())
        conn.send(
            mqtt5.PublishPacket(
                "t/3", b"z", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=5, subscription_ids=[1]
            )
        )
        await eventually(lambda: len(got) == 1, WAIT, "delivery on the third connection")
        assert client.ack(got[0])
        ack = await conn.expect(mqtt5.PubAckPacket)  # no $SYS SUBSCRIBE before it
        assert ack.packet_id == 5
    finally:
        await client.stop()


async def test_real_mosquitto_queue_is_read_and_sys_is_never_forwarded(
    mosquitto_factory: Any, probes: Any
) -> None:
    """A rule on '#' does not match $SYS topics (MQTT 5 4.7.2), in the broker and in the
    bridge's own matcher; the values arrive on the bridge's connection."""
    m: Mosquitto = mosquitto_factory(sys_interval=1)
    async with bridged(m, mosquitto_factory) as (a, link):
        await eventually(lambda: a.broker_queue() is not None, what="$SYS values")
        q = a.broker_queue()
        assert q is not None
        assert isinstance(q["stored_messages"], int)
        assert q["version"].startswith("mosquitto version")
        first_uptime = q["uptime_seconds"]
        probes(m, "app").publish("plain/1", b"hello")
        await eventually(lambda: len(link.forwarded) == 1, what="the plain message forwarded")
        # two more $SYS rounds (every second), none of them forwarded or dropped as bad input
        await eventually(
            lambda: (a.broker_queue() or {}).get("uptime_seconds", 0) >= first_uptime + 2,
            what="$SYS updates",
        )
        assert [f.topic for f in link.forwarded] == ["plain/1"]
        c = a.counters
        assert not c.dropped
        assert not c.rules[0].dropped
        assert a.broker_protocol_errors == 0
        assert c.rules[0].messages_out == 1


async def test_acl_forbids_sys_no_queue_and_the_bridge_works(
    mosquitto_factory: Any, probes: Any, tmp_path: Path
) -> None:
    """mosquitto 2.0 grants the SUBSCRIBE and filters $SYS at delivery by the read ACL; a
    broker that refuses it in the SUBACK is the fake broker's test above."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite #\n")  # '#' grants everything except $SYS/...
    m: Mosquitto = mosquitto_factory(sys_interval=1, extra_config=f"acl_file {acl}\n")
    async with bridged(m, mosquitto_factory) as (a, link):
        probes(m, "app").publish("plain/1", b"hello")
        await eventually(lambda: len(link.forwarded) == 1, what="the message forwarded")
        await asyncio.sleep(2.5)  # two $SYS rounds we would have seen
        assert a.broker_queue() is None
        assert a.connected
        assert a.broker_protocol_errors == 0
        assert [f.topic for f in link.forwarded] == ["plain/1"]
