"""A tiny MQTT v5 publisher / counter to run where the test process cannot reach (namespaces).

::

    python -m tests.support.mqtt_tool publish --port P --out F --topic T --count N [--rate R]
    python -m tests.support.mqtt_tool count   --port P --out F --filter 'T/#' --expect N
                                              [--timeout S] [--settle S]

``publish`` sends messages ``{"seq": n}`` for n in ``start .. start+count-1`` with QoS 1 and
waits for every PUBACK. ``count`` subscribes and counts sequence numbers. Both write their
progress as JSON to ``--out`` (atomically, several times a second, and once more at the end
with ``"done": true``), so a test can poll the file:

- publish: ``{"published": n, "acked": n, "done": bool, "error": str|null}``
- count: ``{"subscribed": bool, "distinct": n, "total": n, "duplicates": n,
  "missing": [first 50 missing of 0..expect-1], "done": bool, "error": str|null}``

``count`` ends when it has seen all ``expect`` sequence numbers and then ``--settle`` seconds
passed (late duplicates are counted too), or after ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

WRITE_EVERY_SECONDS = 0.2
CONNECT_TIMEOUT_SECONDS = 10.0


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def connect(port: int, client_id: str) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.max_inflight_messages_set(1000)
    connected = threading.Event()
    c.on_connect = lambda *_a: connected.set()
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    if not connected.wait(CONNECT_TIMEOUT_SECONDS):
        raise SystemExit(f"could not connect to 127.0.0.1:{port}")
    return c


def publish(args: argparse.Namespace) -> int:
    out = Path(args.out)
    c = connect(args.port, args.client_id or f"mqtt-tool-pub-{os.getpid()}")
    acked = 0
    lock = threading.Lock()

    def on_publish(*_a: Any) -> None:
        nonlocal acked
        with lock:
            acked += 1

    c.on_publish = on_publish
    infos = []
    last_write = 0.0
    started = time.monotonic()
    for i in range(args.count):
        seq = args.start + i
        infos.append(c.publish(args.topic, json.dumps({"seq": seq}), qos=args.qos))
        if args.rate > 0:
            due = started + (i + 1) / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        now = time.monotonic()
        if now - last_write >= WRITE_EVERY_SECONDS:
            write_json(out, {"published": i + 1, "acked": acked, "done": False, "error": None})
            last_write = now
    error = None
    deadline = time.monotonic() + args.timeout
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        if not info.is_published():
            error = "not every publish was acknowledged in time"
            break
        if time.monotonic() - last_write >= WRITE_EVERY_SECONDS:
            write_json(out, {"published": args.count, "acked": acked, "done": False, "error": None})
            last_write = time.monotonic()
    write_json(out, {"published": args.count, "acked": acked, "done": True, "error": error})
    c.disconnect()
    c.loop_stop()
    return 0 if error is None else 1


def count(args: argparse.Namespace) -> int:
    out = Path(args.out)
    seen: dict[int, int] = {}
    total = 0
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        nonlocal total
        try:
            seq = int(json.loads(msg.payload)["seq"])
        except (ValueError, KeyError, TypeError):
            return
        with lock:
            total += 1
            seen[seq] = seen.get(seq, 0) + 1

    c = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=args.client_id or f"mqtt-tool-count-{os.getpid()}",
        protocol=paho.MQTTv5,
    )
    c.on_message = on_message
    c.on_subscribe = lambda *_a: subscribed.set()
    connected = threading.Event()
    c.on_connect = lambda *_a: connected.set()
    c.connect("127.0.0.1", args.port, keepalive=30)
    c.loop_start()
    error = None
    if not connected.wait(CONNECT_TIMEOUT_SECONDS):
        error = "could not connect"
    else:
        c.subscribe(args.filter, qos=args.qos)
        if not subscribed.wait(CONNECT_TIMEOUT_SECONDS):
            error = "no SUBACK"

    def state(done: bool) -> dict[str, Any]:
        with lock:
            distinct = len(seen)
            missing = [n for n in range(args.expect) if n not in seen][:50]
            return {
                "subscribed": subscribed.is_set(),
                "distinct": distinct,
                "total": total,
                "duplicates": total - distinct,
                "missing": missing,
                "done": done,
                "error": error,
            }

    deadline = time.monotonic() + args.timeout
    complete_at: float | None = None
    while error is None and time.monotonic() < deadline:
        s = state(False)
        write_json(out, s)
        if complete_at is None and s["distinct"] >= args.expect:
            complete_at = time.monotonic()
        if complete_at is not None and time.monotonic() - complete_at >= args.settle:
            break
        time.sleep(WRITE_EVERY_SECONDS)
    final = state(True)
    if error is None and final["distinct"] < args.expect:
        final["error"] = "timeout"
    write_json(out, final)
    c.disconnect()
    c.loop_stop()
    return 0 if final["error"] is None else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mqtt_tool", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("publish")
    p.add_argument("--topic", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--rate", type=float, default=0.0, help="messages per second (0 = no pacing)")
    p.add_argument("--timeout", type=float, default=60.0, help="for all PUBACKs")
    q = sub.add_parser("count")
    q.add_argument("--filter", required=True)
    q.add_argument("--expect", type=int, required=True)
    q.add_argument("--timeout", type=float, default=60.0)
    q.add_argument("--settle", type=float, default=1.0)
    for x in (p, q):
        x.add_argument("--port", type=int, required=True)
        x.add_argument("--out", required=True)
        x.add_argument("--qos", type=int, default=1, choices=[0, 1])
        x.add_argument("--client-id", default=None)
    args = ap.parse_args(argv)
    return publish(args) if args.mode == "publish" else count(args)


if __name__ == "__main__":
    sys.exit(main())
