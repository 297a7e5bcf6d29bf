from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.bridge.bridge import Bridge
from gateway.bridge.mosquitto import Mosquitto
from gateway.bridge.transport import BridgeMessage
from gateway.config import MqttSection
from gateway.errors import PeerUnavailable
from tests.support.mosquitto import mosquitto, mosquitto_factory  # noqa: F401  (fixtures)

WAIT = 15.0  # seconds: upper bound of every wait in these tests


async def eventually(pred: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.02)


def mqtt_settings(
    broker: Mosquitto, client_id: str, rules: list[dict[str, Any]], **kw: Any
) -> MqttSection:
    return MqttSection(broker=broker.url, client_id=client_id, rules=rules, **kw)  # type: ignore[arg-type]


class LinkTransport:
    """In-memory PeerTransport: forward on one bridge calls deliver on the other."""

    def __init__(self) -> None:
        self.peer: Bridge | None = None
        self.forwarded: list[BridgeMessage] = []
        self.down = False

    async def forward(self, msg: BridgeMessage) -> None:
        if self.down or self.peer is None:
            raise PeerUnavailable("link down")
        await self.peer.deliver(msg)
        self.forwarded.append(msg)


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: Properties | None


@dataclass
class Probe:
    """A test application on one broker: publishes and records what it receives."""

    broker: Mosquitto
    client_id: str
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._subacks = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        c.on_message = self._on_message
        c.on_subscribe = lambda *_a: self._subacks.set()
        c.max_inflight_messages_set(1000)
        c.connect("127.0.0.1", self.broker.port, clean_start=True)
        c.loop_start()
        self.client = c

    def _on_message(self, _c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        with self._lock:
            self.received.append(
                Received(m.topic, bytes(m.payload), m.qos, bool(m.retain), m.properties)
            )

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._subacks.clear()
        self.client.subscribe(topic_filter, qos)
        assert self._subacks.wait(WAIT)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        props: Properties | None = None,
    ) -> None:
        info = self.client.publish(topic, payload, qos, retain, props)
        info.wait_for_publish(WAIT)
        assert info.is_published()

    def publish_many(self, items: list[tuple[str, bytes]], qos: int = 1) -> None:
        infos = [self.client.publish(t, p, qos) for t, p in items]
        for info in infos:
            info.wait_for_publish(WAIT)
            assert info.is_published()

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_props(**kw: Any) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


@dataclass
class Pair:
    a_broker: Mosquitto
    b_broker: Mosquitto
    a: Bridge
    b: Bridge
    a_link: LinkTransport
    b_link: LinkTransport


@pytest.fixture
async def make_pair(
    mosquitto_factory: Callable[..., Mosquitto],  # noqa: F811
) -> AsyncIterator[Callable[..., Awaitable[Pair]]]:
    bridges: list[Bridge] = []
    probes: list[Probe] = []

    async def make(a_rules: list[dict[str, Any]], b_rules: list[dict[str, Any]], **kw: Any) -> Pair:
        ab, bb = mosquitto_factory(), mosquitto_factory()
        la, lb = LinkTransport(), LinkTransport()
        a = Bridge(mqtt_settings(ab, "qgw-a", a_rules, **kw), "site-a", la)
        b = Bridge(mqtt_settings(bb, "qgw-b", b_rules, **kw), "site-b", lb)
        la.peer, lb.peer = b, a
        bridges.extend([a, b])
        await a.start()
        await b.start()
        return Pair(ab, bb, a, b, la, lb)

    yield make
    for p in probes:
        p.close()
    for br in bridges:
        await br.stop(timeout=1)


@pytest.fixture
def probes() -> Any:
    made: list[Probe] = []

    def make(broker: Mosquitto, name: str) -> Probe:
        p = Probe(broker, name)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
