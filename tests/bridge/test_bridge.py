"""Two real mosquitto brokers, two Bridges, an in-memory link between them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.bridge.bridge import DROP_LOOP, DROP_NO_RULE, DROP_OVERSIZE, Bridge, topic_matches
from gateway.bridge.transport import ORIGIN_PROPERTY, BridgeMessage, MessageProps

from .conftest import LinkTransport, eventually, mqtt_settings, publish_props


@pytest.mark.parametrize(
    ("f", "t", "ok"),
    [
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("+/b", "x/b", True),
        ("#", "$SYS/x", False),
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+/c", "a//c", True),
    ],
)
def test_topic_matches(f: str, t: str, ok: bool) -> None:
    assert topic_matches(f, t) is ok


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("a_dir", ["out", "both"])
async def test_round_trip_a_to_b_with_prefixes(
    make_pair: Any, probes: Any, qos: int, a_dir: str
) -> None:
    p = await make_pair(
        [
            {
                "pattern": "sensors/#",
                "direction": a_dir,
                "qos": qos,
                "local_prefix": "plant/",
                "remote_prefix": "wire/",
            }
        ],
        [
            {
                "pattern": "sensors/#",
                "direction": "in",
                "qos": 1,
                "local_prefix": "from-a/",
                "remote_prefix": "wire/",
            }
        ],
    )
    sub = probes(p.b_broker, "app-b")
    sub.subscribe("#", 1)
    pub = probes(p.a_broker, "app-a")
    pub.publish("plant/sensors/t1", b"21.5", qos=qos)
    pub.publish("plant/other/t1", b"not bridged", qos=qos)
    await eventually(lambda: len(sub.snapshot()) >= 1, what="message at B")
    await asyncio.sleep(0.2)
    got = sub.snapshot()
    assert [(m.topic, m.payload, m.qos) for m in got] == [("from-a/sensors/t1", b"21.5", qos)]
    assert p.a.counters.rules[0].messages_out == 1
    assert p.b.counters.rules[0].messages_in == 1
    assert p.a_link.forwarded[0].topic == "wire/sensors/t1"


@pytest.mark.parametrize("qos", [0, 1])
async def test_round_trip_b_to_a_in_rule(make_pair: Any, probes: Any, qos: int) -> None:
    p = await make_pair(
        [
            {
                "pattern": "cmd/+",
                "direction": "in",
                "qos": qos,
                "local_prefix": "",
                "remote_prefix": "x/",
            }
        ],
        [
            {
                "pattern": "cmd/+",
                "direction": "out",
                "qos": qos,
                "local_prefix": "",
                "remote_prefix": "x/",
            }
        ],
    )
    sub = probes(p.a_broker, "app-a")
    sub.subscribe("#", 1)
    pub = probes(p.b_broker, "app-b")
    pub.publish("cmd/open", b"1", qos=qos)
    pub.publish("cmd/open/extra", b"no: + matches one level", qos=qos)
    await eventually(lambda: len(sub.snapshot()) >= 1, what="message at A")
    await asyncio.sleep(0.2)
    assert [(m.topic, m.payload, m.qos) for m in sub.snapshot()] == [("cmd/open", b"1", qos)]


async def test_inbound_without_matching_rule_is_counted_and_dropped(
    make_pair: Any, probes: Any
) -> None:
    p = await make_pair(
        [{"pattern": "a/#", "direction": "out"}],
        [{"pattern": "b/#", "direction": "in"}],
    )
    sub = probes(p.b_broker, "app-b")
    sub.subscribe("#")
    probes(p.a_broker, "app-a").publish("a/1", b"x")
    await eventually(lambda: p.b.counters.dropped[DROP_NO_RULE] == 1, what="no_rule drop")
    assert p.a.counters.rules[0].messages_out == 1  # the peer took it (by policy: dropped)
    assert sub.snapshot() == []


async def test_retained_set_clear_and_late_subscriber(make_pair: Any, probes: Any) -> None:
    p = await make_pair(
        [{"pattern": "state/#", "direction": "out"}],
        [{"pattern": "state/#", "direction": "in"}],
    )
    pub = probes(p.a_broker, "app-a")
    pub.publish("state/door", b"open", retain=True)
    await eventually(lambda: p.b.counters.rules[0].messages_in == 1, what="retained forwarded")
    late = probes(p.b_broker, "late-1")
    late.subscribe("state/#")
    await eventually(lambda: len(late.snapshot()) == 1, what="retained at late subscriber")
    m = late.snapshot()[0]
    assert (m.topic, m.payload, m.retain) == ("state/door", b"open", True)

    pub.publish("state/door", b"", retain=True)  # clear
    await eventually(lambda: p.b.counters.rules[0].messages_in == 2, what="clear forwarded")
    assert p.a_link.forwarded[-1].retain is True
    assert p.a_link.forwarded[-1].payload == b""
    late2 = probes(p.b_broker, "late-2")
    late2.subscribe("state/#")
    await asyncio.sleep(0.3)
    assert late2.snapshot() == []


async def test_v5_properties_preserved(make_pair: Any, probes: Any) -> None:
    p = await make_pair(
        [{"pattern": "rpc/#", "direction": "out"}],
        [{"pattern": "rpc/#", "direction": "in"}],
    )
    sub = probes(p.b_broker, "app-b")
    sub.subscribe("rpc/#")
    props = publish_props(
        ContentType="application/json",
        ResponseTopic="rpc/reply/42",
        CorrelationData=b"\x00\x01corr",
        MessageExpiryInterval=3600,
        PayloadFormatIndicator=1,
    )
    props.UserProperty = [("k1", "v1"), ("k2", "v2"), ("k1", "again")]
    probes(p.a_broker, "app-a").publish("rpc/call", b'{"x": 1}', props=props)
    await eventually(lambda: len(sub.snapshot()) == 1, what="message with properties")
    got = sub.snapshot()[0].props
    assert got is not None
    assert got.ContentType == "application/json"
    assert got.ResponseTopic == "rpc/reply/42"
    assert got.CorrelationData == b"\x00\x01corr"
    assert 3590 <= got.MessageExpiryInterval <= 3600
    assert got.PayloadFormatIndicator == 1
    assert got.UserProperty == [
        ("k1", "v1"),
        ("k2", "v2"),
        ("k1", "again"),
        (ORIGIN_PROPERTY, "site-a"),
    ]


async def test_both_rules_on_both_sides_do_not_loop(make_pair: Any, probes: Any) -> None:
    rule = {"pattern": "chat/#", "direction": "both", "qos": 1}
    p = await make_pair([rule], [rule])
    sa, sb = probes(p.a_broker, "app-a"), probes(p.b_broker, "app-b")
    sa.subscribe("chat/#")
    sb.subscribe("chat/#")
    for i in range(5):
        sa.publish("chat/a", f"a{i}".encode())
        sb.publish("chat/b", f"b{i}".encode())
    await eventually(
        lambda: len(sa.snapshot()) >= 10 and len(sb.snapshot()) >= 10, what="both ways"
    )
    await asyncio.sleep(0.5)  # give a loop time to show itself
    for s in (sa, sb):
        payloads = sorted(m.payload for m in s.snapshot())
        assert payloads == sorted(
            [f"a{i}".encode() for i in range(5)] + [f"b{i}".encode() for i in range(5)]
        )
    assert p.a.counters.rules[0].messages_out == 5
    assert p.b.counters.rules[0].messages_out == 5


async def test_origin_marker_stops_a_loop_without_no_local(make_pair: Any, probes: Any) -> None:
    """A message already marked with our site (e.g. republished by another client) is not
    forwarded; a message from the peer marked with our site is not delivered."""
    p = await make_pair(
        [{"pattern": "t/#", "direction": "both"}], [{"pattern": "t/#", "direction": "both"}]
    )
    props = publish_props()
    props.UserProperty = [(ORIGIN_PROPERTY, "site-a")]
    probes(p.a_broker, "app-a").publish("t/x", b"echo", props=props)
    await eventually(lambda: p.a.counters.rules[0].dropped[DROP_LOOP] == 1, what="loop drop")
    assert p.a_link.forwarded == []
    await p.b.deliver(BridgeMessage("t/y", b"z", 1, False, MessageProps(), origin="site-b"))
    assert p.b.counters.dropped[DROP_LOOP] == 1


async def test_oversize_counted_dropped_and_acked(make_pair: Any, probes: Any) -> None:
    p = await make_pair(
        [{"pattern": "big/#", "direction": "out"}],
        [{"pattern": "big/#", "direction": "in"}],
        max_payload_bytes=2048,
    )
    pub = probes(p.a_broker, "app-a")
    pub.publish("big/1", b"x" * 4096)
    pub.publish("big/2", b"y" * 100)
    await eventually(lambda: p.a.counters.rules[0].messages_out == 1, what="small one forwarded")
    assert p.a.counters.rules[0].dropped[DROP_OVERSIZE] == 1
    assert [m.topic for m in p.a_link.forwarded] == ["big/2"]
    # Acked: a new bridge on the same session does not get it again.
    await p.a.stop()
    link = LinkTransport()
    link.peer = p.b
    a2 = Bridge(p.a.settings, "site-a", link)
    await a2.start()
    try:
        await asyncio.sleep(0.5)
        assert a2.counters.rules[0].dropped[DROP_OVERSIZE] == 0
        assert link.forwarded == []
    finally:
        await a2.stop()


async def test_deliver_raises_when_broker_down(mosquitto: Any) -> None:
    from gateway.errors import BrokerUnavailable

    b = Bridge(
        mqtt_settings(mosquitto, "qgw-b", [{"pattern": "#", "direction": "in"}]),
        "site-b",
        LinkTransport(),
    )
    await b.start()
    mosquitto.stop()
    await eventually(lambda: not b.connected, what="disconnect noticed")
    with pytest.raises(BrokerUnavailable):
        await b.deliver(BridgeMessage("a", b"1", 1, False, MessageProps(), "site-a"))
    assert b.counters.deliver_failures == 1
    await b.stop(timeout=1)


async def test_message_marked_by_any_gateway_is_not_forwarded_again(
    make_pair: Any, probes: Any
) -> None:
    """Two sites, no second hop: a message that entered through another gateway (here a sibling
    pair's, marked with the peer site) is not sent back."""
    p = await make_pair(
        [{"pattern": "t/#", "direction": "both"}], [{"pattern": "t/#", "direction": "both"}]
    )
    props = publish_props()
    props.UserProperty = [(ORIGIN_PROPERTY, "site-b")]
    probes(p.a_broker, "app-a").publish("t/x", b"from a sibling", props=props)
    await eventually(lambda: p.a.counters.rules[0].dropped[DROP_LOOP] == 1, what="loop drop")
    assert p.a_link.forwarded == []


def test_share_group_makes_a_shared_subscription() -> None:
    from gateway.bridge.bridge import Bridge
    from gateway.config import MqttSection

    class Nothing:
        async def forward(self, msg: Any) -> None:
            raise AssertionError

    mqtt = MqttSection(
        rules=[
            {"pattern": "s/#", "direction": "out", "local_prefix": "p/", "share_group": "qgw"},
            {"pattern": "u/#", "direction": "both"},
        ]
    )
    subs = Bridge(mqtt, "site-a", Nothing()).subscriptions()
    assert [(s.topic_filter, s.no_local) for s in subs] == [
        ("$share/qgw/p/s/#", False),
        ("u/#", True),
    ]


async def test_broker_reconnects_during_an_outage_keep_one_window(mosquitto: Any) -> None:
    """Review H1: each reconnect to the local broker redelivers the unacked window; the old
    copies must stop retrying, so tasks, memory and duplicates stay within one window."""
    import socket

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from gateway.bridge.bridge import Bridge
    from gateway.errors import PeerUnavailable

    class Down:
        def __init__(self) -> None:
            self.down = True
            self.sent: list[bytes] = []

        async def forward(self, m: BridgeMessage) -> None:
            if self.down:
                raise PeerUnavailable("down")
            self.sent.append(m.payload)

    t = Down()
    b = Bridge(
        mqtt_settings(mosquitto, "qgw-a", [{"pattern": "t/#", "direction": "out"}], inflight=8),
        "site-a",
        t,
    )
    await b.start()
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="app", protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        for i in range(8):
            pub.publish("t/x", str(i).encode(), 1).wait_for_publish(5)
        await eventually(lambda: b.counters.inflight == 8, what="window full")
        for _ in range(3):
            conn = b._client._conn  # type: ignore[attr-defined]
            conn.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
            await eventually(lambda: not b.connected, what="disconnect")
            await eventually(lambda: b.connected, what="reconnect")
            await asyncio.sleep(0.5)
            assert len(b._tasks) <= 8
        t.down = False
        await eventually(lambda: len(t.sent) >= 8 and b.counters.inflight == 0, what="drained")
        await asyncio.sleep(0.5)
        assert sorted(t.sent) == sorted(str(i).encode() for i in range(8))  # no duplicates
    finally:
        pub.disconnect()
        pub.loop_stop()
        await b.stop(timeout=1)
