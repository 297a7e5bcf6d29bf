"""`qgw status` shows the local broker's queue from $SYS, and /metrics has it as gauges.

One Gateway object in this event loop with a real mosquitto (``sys_interval 1``) and no peer:
while the peer is away the messages of an ``out`` rule wait at the broker, and the status
document shows them there (issue 18: the broker is the queue, so show it).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.bridge.mosquitto import Mosquitto
from gateway.runtime import Gateway
from gateway.status import render_text
from tests.runtime.helpers import settings, site_pair
from tests.support.mosquitto import mosquitto_factory  # noqa: F401  (fixture)
from tests.support.sites import MqttClient, metric_value, parse_metrics

WAIT_SECONDS = 20.0
N = 40


async def eventually(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def queue(gw: Gateway) -> dict[str, Any] | None:
    q: dict[str, Any] | None = gw.status_document()["broker"]["queue"]
    return q


async def test_status_and_metrics_show_the_brokers_queue(
    tmp_path: Path,
    mosquitto_factory: Callable[..., Mosquitto],  # noqa: F811
) -> None:
    broker = mosquitto_factory(sys_interval=1)
    a, _ = site_pair(
        tmp_path,
        qkd_mode="off",
        rules=[{"pattern": "q/#", "direction": "out", "qos": 1}],
        brokers=(broker.port, broker.port),
    )
    gw = Gateway(settings(a, tmp_path))  # its peer never comes: everything stays queued
    stop = asyncio.Event()
    task = asyncio.ensure_future(gw.run(stop))
    pub: MqttClient | None = None
    try:
        await eventually(lambda: gw.bridge.connected, "the bridge's broker connection")
        await eventually(lambda: queue(gw) is not None, "$SYS values in the status document")
        q0 = queue(gw)
        assert q0 is not None
        base = q0["stored_messages"]
        assert isinstance(base, int)
        assert q0["version"].startswith("mosquitto version")
        assert q0["updated"] is not None
        assert q0["age_seconds"] >= 0

        pub = MqttClient(broker.port, "app")
        for i in range(N):
            await asyncio.to_thread(pub.publish, f"q/{i}", b"x" * 10, 1)
        # held by the broker for our session (in flight to us, or queued) until the peer acks
        await eventually(
            lambda: (queue(gw) or {}).get("stored_messages", 0) >= base + N,
            "the stored count to include the backlog",
        )
        doc = gw.status_document()
        json.dumps(doc)  # the document is JSON
        text = render_text(doc)
        stored = doc["broker"]["queue"]["stored_messages"]
        assert f"broker queue: {stored} messages stored" in text
        assert "dropped since broker start" in text

        gw._sync_metrics()
        fams = parse_metrics(gw.metrics.render().decode())
        assert metric_value(fams, "qgw_broker_stored_messages") >= base + N
        assert metric_value(fams, "qgw_broker_dropped_messages") == 0
        # nothing about $SYS reached the rule or the bad-input counters
        assert gw.bridge.counters.rules[0].messages_out == 0
        assert not gw.bridge.counters.dropped
        assert gw.bridge.broker_protocol_errors == 0
    finally:
        if pub is not None:
            pub.close()
        stop.set()
        await asyncio.wait_for(task, WAIT_SECONDS)


def test_status_without_sys_says_not_readable(tmp_path: Path) -> None:
    """No broker connection (or no $SYS): ``broker.queue`` is null, the gauges NaN."""
    a, _ = site_pair(tmp_path, qkd_mode="off")
    gw = Gateway(settings(a, tmp_path))
    doc = gw.status_document()
    assert doc["broker"]["queue"] is None
    assert "broker queue: not readable" in render_text(doc)
    gw._sync_metrics()
    fams = parse_metrics(gw.metrics.render().decode())
    assert math.isnan(metric_value(fams, "qgw_broker_stored_messages"))
