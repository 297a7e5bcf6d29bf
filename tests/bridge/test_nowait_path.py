"""The bridge's callback data path (forward_nowait / deliver_nowait / publish_nowait): the
window, the backlog, retries and acknowledgements without a Task per message (real
mosquitto brokers, an in-memory transport)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from gateway.bridge.bridge import Bridge
from gateway.bridge.mqtt5_client import Mqtt5BrokerClient
from gateway.bridge.transport import BridgeMessage
from gateway.errors import GatewayError, PeerUnavailable

from .conftest import eventually, mqtt_settings

RULE_OUT = [{"pattern": "seq/#", "direction": "out", "qos": 1}]
RULE_IN = [{"pattern": "seq/#", "direction": "in", "qos": 1}]
Done = Callable[[GatewayError | None], None]


class NowaitTransport:
    """forward_nowait into the peer bridge's deliver_nowait; ``hold`` keeps the outcomes
    until released; ``fail`` answers unavailable."""

    batched = True

    def __init__(self) -> None:
        self.peer: Bridge | None = None
        self.hold = False
        self.fail = 0  # this many next forwards fail
        self.held: list[tuple[BridgeMessage, Done]] = []
        self.calls = 0

    async def forward(self, msg: BridgeMessage) -> None:
        raise AssertionError("the callback path must be used")

    def forward_nowait(self, msg: BridgeMessage, done: Done) -> None:
        self.calls += 1
        if self.fail:
            self.fail -= 1
            asyncio.get_running_loop().call_soon(done, PeerUnavailable("down"))
            return
        if self.hold:
            self.held.append((msg, done))
            return
        assert self.peer is not None
        self.peer.deliver_nowait(msg, done)

    def release(self) -> None:
        self.hold = False
        held, self.held = self.held, []
        for m, done in held:
            assert self.peer is not None
            self.peer.deliver_nowait(m, done)


def seqs(sub: Any) -> list[int]:
    return sorted(int(m.payload) for m in sub.snapshot())


async def test_window_backlog_and_no_task_per_message(mosquitto_factory: Any, probes: Any) -> None:
    a_broker, b_broker = mosquitto_factory(), mosquitto_factory()
    b = Bridge(mqtt_settings(b_broker, "qgw-b", RULE_IN), "site-b", NowaitTransport())
    t = NowaitTransport()
    t.peer = b
    t.hold = True
    a_settings = mqtt_settings(a_broker, "qgw-a", RULE_OUT, inflight=8)
    # The broker may push 64 (as mosquitto does past Receive Maximum): the bridge's own
    # window still allows 8 forwards, the rest wait in its backlog.
    client = Mqtt5BrokerClient(a_settings, receive_maximum=64)
    a = Bridge(a_settings, "site-a", t, client=client)
    await b.start()
    await a.start()
    sub = probes(b_broker, "app-b")
    sub.subscribe("seq/#")
    try:
        probes(a_broker, "app-a").publish_many([("seq/x", str(i).encode()) for i in range(300)])
        await eventually(lambda: len(t.held) == 8, what="window full")
        await asyncio.sleep(0.2)
        assert len(t.held) == 8  # the window: at most 8 forwards outstanding
        assert a.counters.inflight == 8
        await eventually(lambda: len(a._backlog) > 0, what="backlog beyond the window")
        assert a._tasks == set()  # no Task per message on this path
        t.release()
        await eventually(lambda: seqs(sub) == list(range(300)), what="all delivered once")
        await eventually(lambda: a.counters.inflight == 0, what="window drained")
        assert a.counters.rules[0].messages_out == 300
        assert b.counters.rules[0].messages_in == 300
        assert a._tasks == set()
        assert b._tasks == set()
        assert a.counters.stale_acks == 0
    finally:
        await a.stop(timeout=1)
        await b.stop(timeout=1)

    # everything was acknowledged to broker A: a new session holder gets nothing
    t2 = NowaitTransport()
    t2.peer = b
    a2 = Bridge(mqtt_settings(a_broker, "qgw-a", RULE_OUT, inflight=8), "site-a", t2)
    await b.start()
    await a2.start()
    try:
        await asyncio.sleep(0.5)
        assert t2.calls == 0
    finally:
        await a2.stop(timeout=1)
        await b.stop(timeout=1)


async def test_failed_forwards_retry_and_stay_unacked_until_done(
    mosquitto_factory: Any, probes: Any
) -> None:
    a_broker, b_broker = mosquitto_factory(), mosquitto_factory()
    b = Bridge(mqtt_settings(b_broker, "qgw-b", RULE_IN), "site-b", NowaitTransport())
    t = NowaitTransport()
    t.peer = b
    t.fail = 5
    a = Bridge(mqtt_settings(a_broker, "qgw-a", RULE_OUT, inflight=4), "site-a", t)
    await b.start()
    await a.start()
    sub = probes(b_broker, "app-b")
    sub.subscribe("seq/#")
    try:
        probes(a_broker, "app-a").publish_many([("seq/x", str(i).encode()) for i in range(10)])
        await eventually(lambda: seqs(sub) == list(range(10)), what="all after retries")
        assert a.counters.rules[0].forward_retries == 5
        assert a.counters.rules[0].messages_out == 10
    finally:
        await a.stop(timeout=1)
        await b.stop(timeout=1)
