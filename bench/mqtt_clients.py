"""QoS 1 receive throughput of Python MQTT clients through a real local mosquitto.

What is measured: a persistent session (clean_start=False) holds N queued QoS 1 messages;
the client under test connects, and we time from connect until it has received and
acknowledged all N. That is the bridge's hot path minus the peer link: receive, hand the
message to asyncio, acknowledge. Receive Maximum is set to the gateway's default window
(256) where the client allows it.

Clients:
- aiomqtt 2.5.1 (acknowledges on receipt: NOT usable for end-to-end at-least-once; baseline)
- paho-mqtt 2.x threaded loop, manual_ack=True, message handed into asyncio with
  loop.call_soon_threadsafe, ack(mid) called from the asyncio thread after "forwarding"
- gmqtt (if installed) with optimistic_acknowledgement=False (PUBACK after on_message's
  coroutine returns)

Run:  PYTHONPATH=. python bench/mqtt_clients.py [--messages 20000] [--payload 100] [--rounds 3]
Writes bench/results/mqtt_clients.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.bridge.mosquitto import Mosquitto

TOPIC = "bench/q1"
WINDOW = 256
RESULTS = Path(__file__).resolve().parent / "results" / "mqtt_clients.json"


def _connect_props() -> Properties:
    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = 3600
    p.ReceiveMaximum = WINDOW
    return p


def prepare_session(port: int, client_id: str) -> None:
    """Create the persistent session with a QoS 1 subscription, then leave."""
    done = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.on_subscribe = lambda *a: done.set()
    c.connect("127.0.0.1", port, clean_start=False, properties=_connect_props())
    c.loop_start()
    c.subscribe(TOPIC, qos=1)
    assert done.wait(10)
    c.disconnect()
    c.loop_stop()


def preload(port: int, n: int, payload: bytes) -> None:
    """Publish n QoS 1 messages (acked by the broker) while the subscriber is away."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=paho.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    acked = 0
    done = threading.Event()

    def on_publish(*_: Any) -> None:
        nonlocal acked
        acked += 1
        if acked == n:
            done.set()

    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    for _ in range(n):
        c.publish(TOPIC, payload, qos=1)
    assert done.wait(120), f"preload: {acked}/{n}"
    c.disconnect()
    c.loop_stop()


def leftover(port: int, client_id: str) -> int:
    """Messages the broker still holds for the session (all should have been acked)."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    got = 0

    def on_message(*_: Any) -> None:
        nonlocal got
        got += 1

    c.on_message = on_message
    p = _connect_props()
    p.SessionExpiryInterval = 0  # end the session after this check
    c.connect("127.0.0.1", port, clean_start=False, properties=p)
    c.loop_start()
    time.sleep(1.0)
    c.disconnect()
    c.loop_stop()
    return got


async def run_aiomqtt(port: int, client_id: str, n: int) -> float:
    import aiomqtt

    t0 = time.perf_counter()
    got = 0
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=_connect_props(),
    ) as client:
        async for _ in client.messages:
            got += 1
            if got == n:
                break
    return time.perf_counter() - t0


async def run_paho_manual(port: int, client_id: str, n: int) -> float:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    c = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5,
        manual_ack=True,
    )
    got = 0

    def handle(msg: paho.MQTTMessage) -> None:  # asyncio thread: "forward", then ack
        nonlocal got
        c.ack(msg.mid, msg.qos)
        got += 1
        if got == n and not done.done():
            done.set_result(None)

    c.on_message = lambda _c, _u, msg: loop.call_soon_threadsafe(handle, msg)
    t0 = time.perf_counter()
    c.connect("127.0.0.1", port, clean_start=False, properties=_connect_props())
    c.loop_start()
    await asyncio.wait_for(done, 300)
    elapsed = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return elapsed


async def run_gmqtt(port: int, client_id: str, n: int) -> float:
    import gmqtt

    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    got = 0

    async def on_message(_c: Any, _topic: str, _payload: bytes, _qos: int, _props: Any) -> int:
        nonlocal got
        got += 1
        if got == n and not done.done():
            done.set_result(None)
        return 0

    c = gmqtt.Client(
        client_id,
        clean_session=False,
        optimistic_acknowledgement=False,
        session_expiry_interval=3600,
        receive_maximum=WINDOW,
    )
    c.on_message = on_message
    t0 = time.perf_counter()
    await c.connect("127.0.0.1", port, version=gmqtt.constants.MQTTv50)
    await asyncio.wait_for(done, 300)
    elapsed = time.perf_counter() - t0
    await c.disconnect()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--payload", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    runners: dict[str, Callable[[int, str, int], Awaitable[float]]] = {
        "aiomqtt (ack on receipt)": run_aiomqtt,
        "paho threaded, manual ack via asyncio": run_paho_manual,
    }
    try:
        import gmqtt

        runners[f"gmqtt {getattr(gmqtt, '__version__', '?')}, ack after on_message"] = run_gmqtt
    except ImportError:
        print("gmqtt not installed: skipped")

    results: dict[str, Any] = {}
    with Mosquitto() as broker:
        for name, fn in runners.items():
            rates = []
            for r in range(args.rounds):
                cid = f"bench-{abs(hash(name)) % 10**6}-{r}"
                prepare_session(broker.port, cid)
                preload(broker.port, args.messages, b"x" * args.payload)
                secs = asyncio.run(fn(broker.port, cid, args.messages))  # type: ignore[arg-type]
                rates.append(args.messages / secs)
                left = leftover(broker.port, cid)
                assert left == 0, f"{name}: {left} messages left unacked"
                print(f"{name:45s} round {r}: {args.messages / secs:9.0f} msg/s")
            results[name] = {
                "msgs_per_s_median": round(statistics.median(rates)),
                "msgs_per_s_rounds": [round(x) for x in rates],
            }
    out = {
        "what": "QoS 1 receive+ack throughput from a persistent session queue, local mosquitto 2.0.11",
        "messages": args.messages,
        "payload_bytes": args.payload,
        "receive_maximum": WINDOW,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
