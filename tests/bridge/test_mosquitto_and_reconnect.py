from __future__ import annotations

import socket
from typing import Any

import pytest

from gateway.bridge.bridge import Bridge
from gateway.bridge.mosquitto import Mosquitto, MosquittoMissing, find_mosquitto

from .conftest import LinkTransport, eventually, mqtt_settings


def test_context_manager_starts_and_stops() -> None:
    try:
        find_mosquitto()
    except MosquittoMissing as exc:
        pytest.skip(str(exc))
    with Mosquitto() as m:
        assert m.running
        with socket.create_connection(("127.0.0.1", m.port), timeout=5):
            pass
        port = m.port
    assert not m.running
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", port), timeout=1),
    ):
        pass


def test_missing_binary_says_how_to_install() -> None:
    with pytest.raises(MosquittoMissing, match="apt-get install mosquitto"):
        find_mosquitto("/nonexistent/mosquitto")


async def test_bridge_resumes_after_broker_restart(mosquitto_factory: Any, probes: Any) -> None:
    a_broker = mosquitto_factory(persistence=True)
    b_broker = mosquitto_factory()
    b = Bridge(
        mqtt_settings(b_broker, "qgw-b", [{"pattern": "r/#", "direction": "in"}]),
        "site-b",
        LinkTransport(),
    )
    link = LinkTransport()
    link.peer = b
    a = Bridge(
        mqtt_settings(a_broker, "qgw-a", [{"pattern": "r/#", "direction": "out"}]), "site-a", link
    )
    await b.start()
    await a.start()
    sub = probes(b_broker, "app-b")
    sub.subscribe("r/#")
    try:
        probes(a_broker, "app-a1").publish("r/1", b"before")
        await eventually(lambda: len(sub.snapshot()) == 1, what="first message")
        a_broker.restart()
        await eventually(lambda: a.connected, what="bridge reconnected")
        probes(a_broker, "app-a2").publish("r/2", b"after")
        await eventually(lambda: len(sub.snapshot()) == 2, what="message after restart")
        assert [m.payload for m in sub.snapshot()] == [b"before", b"after"]
    finally:
        await a.stop()
        await b.stop()
