"""End-to-end benchmark: QoS 1 messages per second and latency from a publisher at site A to a
subscriber at site B, through (1) the qgw gateway pair (ML-KEM+X25519+QKD, the KME simulator
over mTLS, ML-DSA bootstrap) and (2) a mosquitto-to-mosquitto bridge over TLS (ECDSA P-256,
TLS 1.3) measured in the same run on the same machine. Writes bench/results/e2e.json.

Run: .venv/bin/python bench/e2e_bench.py [--quick] [--messages N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.bridge.mosquitto import Mosquitto, free_port
from gateway.crypto import tlspki
from gateway.demo import Demo


def measure(
    pub_port: int,
    sub_port: int,
    topic: str,
    n: int,
    size: int,
    rate: float | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Publish n QoS 1 messages at pub_port, count them at sub_port; rate and latency."""
    arrivals: dict[int, float] = {}
    lat: list[float] = []
    done = threading.Event()
    lock = threading.Lock()
    tag = f"{os.getpid()}-{topic}-{rate}"
    sub = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{tag}", protocol=paho.MQTTv5
    )

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        seq = int.from_bytes(msg.payload[:4], "big")
        sent = float(msg.payload[4:24].decode())
        with lock:
            if seq not in arrivals:
                arrivals[seq] = now
                lat.append(now - sent)
            if len(arrivals) >= n:
                done.set()

    subscribed = threading.Event()
    sub.on_message = on_message
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.connect("127.0.0.1", sub_port)
    sub.subscribe(topic.rstrip("#") + "#", qos=1)
    sub.loop_start()
    assert subscribed.wait(10), "subscriber did not subscribe"
    pub = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{tag}", protocol=paho.MQTTv5
    )
    pub.max_inflight_messages_set(256)
    pub.connect("127.0.0.1", pub_port)
    pub.loop_start()
    time.sleep(0.5)
    pad = b"x" * max(0, size - 24)
    t0 = time.perf_counter()
    for seq in range(n):
        payload = seq.to_bytes(4, "big") + f"{time.perf_counter():20.6f}".encode() + pad
        while True:
            info = pub.publish(topic.rstrip("#") + "m", payload, qos=1)
            if info.rc == paho.MQTT_ERR_SUCCESS:
                break
            time.sleep(0.001)
        if rate:
            time.sleep(max(0.0, t0 + (seq + 1) / rate - time.perf_counter()))
    done.wait(timeout)
    t1 = max(arrivals.values()) if arrivals else time.perf_counter()
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()
    lat.sort()
    got = len(arrivals)
    return {
        "mode": f"paced at {rate:g} msg/s" if rate else "burst (as fast as the publisher can)",
        "messages": n,
        "delivered": got,
        "payload_bytes": size,
        "msgs_per_s": got / (t1 - t0) if got else 0.0,
        "latency_ms_p50": statistics.median(lat) * 1e3 if lat else None,
        "latency_ms_p99": lat[int(len(lat) * 0.99) - 1] * 1e3 if lat else None,
    }


PACED_RATE = 200.0


def mosquitto_tls_bridge(root: Path, n: int, size: int) -> dict[str, Any]:
    ca = tlspki.new_ca("bench broker CA")
    server = tlspki.issue_server(ca, "broker-b")
    client = tlspki.issue_client(ca, "bridge-a")
    tlspki.write_issued(ca, root / "ca.crt", None)
    tlspki.write_issued(server, root / "b.crt", root / "b.key")
    tlspki.write_issued(client, root / "a.crt", root / "a.key")
    tls_port = free_port()
    b = Mosquitto(
        root / "b",
        extra_config=(
            f"listener {tls_port} 127.0.0.1\nallow_anonymous true\ncafile {root}/ca.crt\n"
            f"certfile {root}/b.crt\nkeyfile {root}/b.key\nrequire_certificate true\ntls_version tlsv1.3\n"
        ),
    ).start()
    a = Mosquitto(
        root / "a",
        extra_config=(
            f"connection bench-bridge\naddress 127.0.0.1:{tls_port}\ntopic bench/# out 1\n"
            f"bridge_cafile {root}/ca.crt\nbridge_certfile {root}/a.crt\nbridge_keyfile {root}/a.key\n"
            "bridge_tls_version tlsv1.3\ncleansession false\nbridge_protocol_version mqttv311\n"
        ),
    ).start()
    try:
        time.sleep(1.5)  # let the bridge connect
        return {
            "note": "mosquitto 2.0.11 bridge over TLS 1.3 (ECDSA P-256), bridge_protocol_version mqttv311 (its v5 bridge fails here)",
            "burst": measure(a.port, b.port, "bench/", n, size),
            "paced": measure(a.port, b.port, "bench/", max(200, n // 10), size, rate=PACED_RATE),
        }
    finally:
        a.stop()
        b.stop()


def qgw_pair(root: Path, n: int, size: int) -> dict[str, Any]:
    demo = Demo(root, duration=0, rate=1)
    try:
        demo.start()
        return {
            "note": "ML-KEM-768+X25519+QKD, ML-DSA-65 bootstrap, KME simulator over mTLS, rekey every 10 s (demo setting)",
            "burst": measure(demo.ports.mqtt_a, demo.ports.mqtt_b, "demo/bench/", n, size),
            "paced": measure(
                demo.ports.mqtt_a,
                demo.ports.mqtt_b,
                "demo/bench/",
                max(200, n // 10),
                size,
                rate=PACED_RATE,
            ),
        }
    finally:
        demo.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--messages", type=int, default=None)
    ap.add_argument("--size", type=int, default=100)
    args = ap.parse_args()
    n = args.messages or (1000 if args.quick else 10000)
    with tempfile.TemporaryDirectory(prefix="qgw-bench-") as tmp:
        root = Path(tmp)
        (root / "qgw").mkdir()
        (root / "mq").mkdir()
        result = {
            "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
            "what": "QoS 1, publisher at site A -> subscriber at site B, all on loopback in one run",
            "mosquitto_tls_bridge": mosquitto_tls_bridge(root / "mq", n, args.size),
            "qgw_pair": qgw_pair(root / "qgw", n, args.size),
        }
    out = Path(__file__).resolve().parent / "results" / "e2e.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
