"""``qgw demo``: the whole two-site picture on this machine, with embedded defaults.

``init-demo`` into a temporary folder, two mosquitto brokers on free loopback ports, the KME
simulator pair (one process serving KME A and KME B over mTLS, one simulated QKD link), both
gateways as real ``qgw run`` processes; then sample messages are published at site A and
counted as they arrive at site B, with a live status line, until Ctrl-C or ``--duration``.

``--mode bridge`` (default): the gateways' own MQTT bridge carries the messages (topic rules).
``--mode tunnel``: the gateways have no topic rules; broker A's own mosquitto bridge
(``connection`` in its mosquitto.conf) connects to gateway A's ``[[tunnel]]`` listen port, and
gateway B dials broker B for each stream: mosquitto's bridge runs through the qgw session.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from gateway.bridge.mosquitto import Mosquitto
from gateway.config import load_settings, to_toml
from gateway.errors import GatewayError
from gateway.initdemo import free_ports, init_demo

DEMO_REKEY_SECONDS = 10.0  # a rekey shows within 15 s
PUBLISH_PER_SECOND = 20
DRAIN_SECONDS = 15.0
START_TIMEOUT_SECONDS = 30.0
AUTH_LABELS = {"pki": "ML-DSA PKI", "psk": "PSK", "wot": "ML-DSA web of trust"}
TUNNEL_NAME = "mqtt-bridge"
MODES = ("bridge", "tunnel")


def bridge_config(tunnel_port: int) -> str:
    """mosquitto.conf lines for broker A: its own bridge to broker B, through gateway A's tunnel."""
    return "\n".join(
        [
            "connection qgw-tunnel",
            f"address 127.0.0.1:{tunnel_port}",
            "topic demo/# out 1",
            "cleansession false",
            "clientid demo-bridge-a-to-b",
            "bridge_protocol_version mqttv311",
            "try_private true",
            "restart_timeout 1 5",
            "keepalive_interval 30",
            "",
        ]
    )


def _edit_toml(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = tomllib.loads(path.read_text())
    change(data)
    path.write_text(to_toml(data))


class DemoError(GatewayError):
    """The demo could not start or did not complete."""


@dataclass
class Counts:
    published: int = 0
    acked: int = 0
    received: set[int] = field(default_factory=set)
    duplicates: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _scrape(url: str) -> dict[str, float]:
    """Flatten a /metrics page into {'name{labels}': value} (empty dict if unreachable)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 -- our own loopback endpoint
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def _link_state(url: str) -> dict[str, Any]:
    """The KME simulator's view of the QKD link (GET /admin/state), {} if unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 -- our own loopback endpoint
            state = json.loads(r.read())
    except (OSError, ValueError):
        return {}
    link = state.get("link") if isinstance(state, dict) else None
    return link if isinstance(link, dict) else {}


def _set_link(url: str, changes: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(  # noqa: S310 -- our own loopback endpoint
        url, data=json.dumps(changes).encode(), method="POST"
    )
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310
        state = json.loads(r.read())
    return state.get("link", {}) if isinstance(state, dict) else {}


def link_label(link: dict[str, Any]) -> str:
    """``QKD link QBER 1.6%, secret 4.1 kbit/s`` (or ABORTED and why) from /admin/state."""
    if not link:
        return "QKD link ?"
    q = link.get("qber")
    qber = f"QBER {q:.1%}" if isinstance(q, int | float) else "QBER -"
    bps = link.get("secret_bps", link.get("rate_bps", 0.0)) or 0.0
    rate = f"{bps / 1000:.1f} kbit/s" if bps >= 1000 else f"{bps:.0f} bit/s"
    if not link.get("link_up", True):
        return "QKD link DOWN"
    if link.get("aborted"):
        return f"QKD link ABORTED ({qber}, aborts {link.get('aborts', 0)}), secret {rate}"
    return f"QKD link {qber}, secret {rate}"


def _alarms(m: dict[str, float]) -> list[str]:
    out = []
    for k, v in m.items():
        if k.startswith("qgw_qkd_alarm{") and v == 1 and "reason=" in k:
            out.append(k.split("reason=", 1)[1].split(",", 1)[0].rstrip("}"))
    return sorted(out)


def _sum(m: dict[str, float], prefix: str, must: str = "") -> float:
    return sum(v for k, v in m.items() if k.startswith(prefix + "{") and must in k)


class Demo:
    def __init__(
        self,
        root: Path,
        duration: float | None,
        rate: int,
        *,
        keep: bool = True,
        mode: str = "bridge",
        eve_at: float | None = None,
        eve_fraction: float = 1.0,
        eve_for: float | None = None,
        auth: str = "pki",
    ) -> None:
        self.root = root
        self.auth = auth
        self.mode = mode
        self.eve_off_at = None if eve_at is None or eve_for is None else eve_at + eve_for
        self.eve_at = eve_at
        self.eve_fraction = eve_fraction
        self.keep = keep
        self.duration = duration
        self.rate = rate
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.brokers: list[Mosquitto] = []
        self.counts = Counts()
        self.stop = threading.Event()

    # --- processes ---

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 -- handed to the child, closed by the OS
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONUNBUFFERED"] = "1"
        p = subprocess.Popen(  # noqa: S603 -- our own interpreter and module
            [sys.executable, "-m", "gateway", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
        )
        self.procs.append((name, p))
        return p

    def _wait_for(self, what: str, cond: Any, timeout: float = START_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            for name, p in self.procs:
                if p.poll() is not None:
                    tail = (self.root / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise DemoError(
                        f"{name} exited with {p.returncode} while waiting for {what}:\n{tail}"
                    )
            time.sleep(0.1)
        raise DemoError(f"timed out waiting for {what} (logs in {self.root})")

    def start(self) -> None:
        res = init_demo(self.root, link_model="bb84", auth=self.auth)
        ports = res.ports
        self.kme_state = f"http://127.0.0.1:{ports.kme_a_admin}/admin/state"
        self.kme_link = f"http://127.0.0.1:{ports.kme_a_admin}/admin/link"
        print(f"demo folder: {self.root} (mode {self.mode})")
        extra = {ports.mqtt_a: "", ports.mqtt_b: ""}
        if self.mode == "tunnel":
            (tunnel_port,) = free_ports(1)

            def site_a(d: dict[str, Any]) -> None:
                d["mqtt"]["rules"] = []  # the brokers' own bridge carries the messages
                d["tunnel"] = [{"name": TUNNEL_NAME, "listen": f"127.0.0.1:{tunnel_port}"}]

            def site_b(d: dict[str, Any]) -> None:
                d["mqtt"]["rules"] = []
                d["tunnel"] = [{"name": TUNNEL_NAME, "connect": f"127.0.0.1:{ports.mqtt_b}"}]

            _edit_toml(self.root / "site-a.toml", site_a)
            _edit_toml(self.root / "site-b.toml", site_b)
            extra[ports.mqtt_a] = bridge_config(tunnel_port)
        for port in (ports.mqtt_a, ports.mqtt_b):
            b = Mosquitto(
                self.root / f"mosquitto-{port}",
                port=port,
                persistence=True,  # the shipped setting: sessions survive a broker crash
                extra_config=extra[port],
            )
            b.start()
            self.brokers.append(b)
        print(f"  mosquitto site A 127.0.0.1:{ports.mqtt_a}, site B 127.0.0.1:{ports.mqtt_b}")
        if self.mode == "tunnel":
            print(
                f"  broker A's own bridge -> gateway A tunnel {TUNNEL_NAME!r} "
                f"127.0.0.1:{tunnel_port} ==qgw==> gateway B -> broker B"
            )
        self._spawn("kme", ["kme", "serve", "--config", str(res.kme_config)])
        self._wait_for(
            "the KME simulator",
            lambda: "ready" in (self.root / "kme.log").read_text(errors="replace"),
        )
        print(
            f"  KME simulator: KME A https://127.0.0.1:{ports.kme_a}, KME B https://127.0.0.1:{ports.kme_b}"
        )
        env = {"QGW_REKEY__INTERVAL_SECONDS": str(DEMO_REKEY_SECONDS)}
        self.metrics_a = f"http://127.0.0.1:{ports.metrics_a}/metrics"
        self.metrics_b = f"http://127.0.0.1:{ports.metrics_b}/metrics"
        self._spawn("gateway-b", ["run", "--config", str(self.root / "site-b.toml")], env)
        self._spawn("gateway-a", ["run", "--config", str(self.root / "site-a.toml")], env)
        settings = load_settings(self.root / "site-a.toml")
        self.suite = settings.crypto.suite.value
        self.qkd_mode = settings.qkd.mode.value
        print(
            f"  gateways: A (initiator) -> B (responder) 127.0.0.1:{ports.gw_b}, rekey every {DEMO_REKEY_SECONDS:.0f} s"
        )
        self._wait_for(
            "the gateways' session",
            lambda: (
                _sum(_scrape(self.metrics_a), "qgw_session_state", "state=established") == 1
                and _sum(_scrape(self.metrics_b), "qgw_session_state", "state=established") == 1
            ),
        )
        self.ports = ports
        if self.mode == "tunnel":
            # Publish only once broker A's bridge is connected through the tunnel: QoS 1
            # messages are queued for the bridge from its first connection on.
            self._wait_for(
                "broker A's bridge to connect through the tunnel",
                lambda: (
                    _sum(_scrape(self.metrics_b), "qgw_tunnel_streams_active", TUNNEL_NAME) >= 1
                ),
            )
            time.sleep(1.0)  # the bridge's CONNECT / SUBSCRIBE round trips

    # --- MQTT clients ---

    def _clients(self) -> tuple[paho.Client, paho.Client]:
        c = self.counts
        sub = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="demo-subscriber-b", protocol=paho.MQTTv5
        )
        subscribed = threading.Event()

        def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            try:
                seq = int(json.loads(msg.payload)["seq"])
            except (ValueError, KeyError, TypeError):
                return
            with c.lock:
                if seq in c.received:
                    c.duplicates += 1
                c.received.add(seq)

        sub.on_message = on_message
        sub.on_subscribe = lambda *_a: subscribed.set()
        sub.connect("127.0.0.1", self.ports.mqtt_b)
        sub.subscribe("demo/#", qos=1)
        sub.loop_start()
        if not subscribed.wait(10):
            raise DemoError("subscriber at site B could not subscribe")
        pub = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="demo-publisher-a", protocol=paho.MQTTv5
        )

        def on_publish(*_a: Any) -> None:
            with c.lock:
                c.acked += 1

        pub.on_publish = on_publish
        pub.connect("127.0.0.1", self.ports.mqtt_a)
        pub.loop_start()
        return pub, sub

    # --- main loop ---

    def status_line(self, elapsed: float) -> str:
        a, b = _scrape(self.metrics_a), _scrape(self.metrics_b)
        c = self.counts
        epoch = int(_sum(a, "qgw_session_epoch"))
        keys = int(_sum(a, "qgw_qkd_keys_total") + _sum(b, "qgw_qkd_keys_total"))
        rekeys = int(_sum(a, "qgw_rekeys_total", "result=ok"))
        age = _sum(a, "qgw_session_epoch_age_seconds")
        with c.lock:
            delivered = len(c.received)
        rate = delivered / elapsed if elapsed >= 1.0 else 0.0  # no rate from the first instant
        up = "up" if _sum(a, "qgw_session_state", "state=established") == 1 else "DOWN"
        alarms = sorted(set(_alarms(a)) | set(_alarms(b)))
        return (
            f"[{elapsed:5.0f}s] session {up}, epoch {epoch} ({self.suite_label(a)}), rekeys {rekeys}, "
            f"last rekey {age:4.1f}s ago | {link_label(_link_state(self.kme_state))} | "
            f"QKD keys used {keys}{' | ALARM ' + ','.join(alarms) if alarms else ''} | "
            f"published {c.published}, delivered {delivered} ({rate:.1f} msg/s)"
            f"{self.tunnel_status(a)}"
        )

    def tunnel_status(self, a: dict[str, float]) -> str:
        """`` | tunnel mqtt-bridge: 1 stream, 12.3 KiB out`` (tunnel mode only)."""
        if self.mode != "tunnel":
            return ""
        streams = int(_sum(a, "qgw_tunnel_streams_active", TUNNEL_NAME))
        sent = _sum(a, "qgw_tunnel_bytes_total", "direction=sent")
        resets = int(_sum(a, "qgw_tunnel_resets_total", TUNNEL_NAME))
        return (
            f" | tunnel {TUNNEL_NAME}: {streams} stream{'s' if streams != 1 else ''}, "
            f"{sent / 1024:.1f} KiB out, {resets} resets"
        )

    def suite_label(self, a: dict[str, float]) -> str:
        base = "ML-KEM-768+X25519" if "768" in self.suite else "ML-KEM-1024+X25519"
        pqc_only = _sum(a, "qgw_qkd_mode_in_effect", "mode=pqc-only") == 1
        return base if (self.qkd_mode == "off" or pqc_only) else base + "+QKD"

    def run(self) -> int:
        self.start()
        pub, sub = self._clients()
        started = time.monotonic()
        next_status = started
        tty = sys.stdout.isatty()
        try:
            n = 0
            while not self.stop.is_set():
                now = time.monotonic()
                if self.duration is not None and now - started >= self.duration:
                    break
                payload = json.dumps({"seq": n, "site": "a", "t": time.time()}).encode()
                pub.publish(f"demo/sensors/{n % 4}", payload, qos=1)
                self.counts.published += 1
                n += 1
                if self.eve_at is not None and now - started >= self.eve_at:
                    self.eve_at = None
                    self.switch_eve_on(tty)
                if self.eve_off_at is not None and now - started >= self.eve_off_at:
                    self.eve_off_at = None
                    _set_link(self.kme_link, {"eve_ir_fraction": 0.0})
                    print(("\n" if tty else "") + "eavesdropper OFF", flush=True)
                if now >= next_status:
                    line = self.status_line(now - started)
                    print(
                        ("\r" + line + "   ") if tty else line, end="" if tty else "\n", flush=True
                    )
                    next_status = now + (1.0 if tty else 5.0)
                time.sleep(1.0 / self.rate)
        except KeyboardInterrupt:
            pass
        elapsed = time.monotonic() - started
        if tty:
            print()
        # let what was published arrive (the gateways acknowledge end to end)
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline and len(self.counts.received) < self.counts.published:
            time.sleep(0.1)
        return self.summary(elapsed, pub, sub)

    def switch_eve_on(self, tty: bool) -> None:
        """Intercept-resend on ``eve_fraction`` of the pulses, via the KME admin endpoint.

        The pools are emptied as well: key distilled before the abort is still secure and a
        KME would keep serving it, so without this the gateways' alarm would only come once
        the pool (100 keys here) has been used up."""
        _set_link(self.kme_link, {"eve_ir_fraction": self.eve_fraction, "flush": True})
        print(
            ("\n" if tty else "")
            + f"eavesdropper ON: intercept-resend on {self.eve_fraction:.0%} of the pulses "
            "(KME pools emptied); watch the QBER, the abort and the gateways' alarm",
            flush=True,
        )

    def summary(self, elapsed: float, pub: paho.Client, sub: paho.Client) -> int:
        a, b = _scrape(self.metrics_a), _scrape(self.metrics_b)
        c = self.counts
        for cl in (pub, sub):
            cl.loop_stop()
            cl.disconnect()
        delivered = len(c.received)
        lost = c.published - delivered
        handshakes = int(_sum(a, "qgw_handshakes_total", "result=ok"))
        rekeys = int(_sum(a, "qgw_rekeys_total", "result=ok"))
        keys_a = int(_sum(a, "qgw_qkd_keys_total"))
        keys_b = int(_sum(b, "qgw_qkd_keys_total"))
        bits = int(_sum(a, "qgw_qkd_key_bits_total") + _sum(b, "qgw_qkd_key_bits_total"))
        print("summary")
        print(
            f"  suite               {self.suite_label(a)} (AES-256-GCM, HKDF-SHA-384), auth {AUTH_LABELS[self.auth]}"
        )
        if self.mode == "tunnel":
            opened = int(_sum(a, "qgw_tunnel_streams_total", "event=opened"))
            sent = int(_sum(a, "qgw_tunnel_bytes_total", "direction=sent"))
            got = int(_sum(a, "qgw_tunnel_bytes_total", "direction=received"))
            print(
                f"  carried by          mosquitto's own bridge through tunnel {TUNNEL_NAME!r}: "
                f"{opened} streams, {sent} bytes A->B, {got} bytes B->A"
            )
        print(f"  duration            {elapsed:.1f} s")
        print(f"  messages published  {c.published} at site A (QoS 1)")
        print(f"  messages delivered  {delivered} at site B ({c.duplicates} duplicates)")
        print(f"  messages lost       {lost}")
        print(f"  handshakes          {handshakes}")
        print(f"  rekeys              {rekeys}")
        print(
            f"  QKD keys consumed   {keys_a} at A (enc_keys) + {keys_b} at B (dec_keys), {bits} bits in all"
        )
        link = _link_state(self.kme_state)
        print(
            f"  QKD link            {link.get('preset', '?')} preset, {link.get('distance_km', '?')} km, "
            f"{link.get('blocks', 0)} blocks, {link.get('aborts', 0)} aborted; {link_label(link)}"
        )
        print(
            f"  logs                {self.root if self.keep else '(removed at exit; --keep keeps them)'}"
        )
        return 0 if lost == 0 and delivered > 0 else 1

    def close(self) -> None:
        for _name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _name, p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for b in self.brokers:
            with contextlib.suppress(Exception):
                b.stop()


def cmd_demo(args: argparse.Namespace) -> int:
    own = args.dir is None
    root = Path(tempfile.mkdtemp(prefix="qgw-demo-")) if own else Path(args.dir)
    demo = Demo(
        root,
        args.duration,
        args.rate,
        keep=args.keep or not own,
        mode=args.mode,
        eve_at=args.eve_at,
        eve_fraction=args.eve_fraction,
        eve_for=args.eve_for,
        auth=args.auth,
    )
    try:
        return demo.run()
    finally:
        demo.close()
        if own and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the two-site demo on this machine (brokers, KME simulator, both gateways)",
        description="Run the whole two-site picture on loopback: two mosquitto brokers, the KME "
        "simulator pair, two gateways; publish at site A and count at site B. Ctrl-C stops "
        "(or --duration N). Exit 0 when nothing published was lost.",
    )
    p.add_argument(
        "--duration", type=float, default=None, help="stop after N seconds and print a summary"
    )
    p.add_argument(
        "--rate",
        type=int,
        default=PUBLISH_PER_SECOND,
        help="messages per second published at site A",
    )
    p.add_argument(
        "--dir", type=Path, default=None, help="use this folder instead of a temporary one"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, configs)")
    p.add_argument(
        "--auth",
        choices=list(AUTH_LABELS),
        default="pki",
        help="bootstrap authentication: ML-DSA PKI (default), PSK, or web of trust",
    )
    p.add_argument(
        "--eve-at",
        type=float,
        default=None,
        metavar="SECONDS",
        help="switch an intercept-resend eavesdropper on after SECONDS (QBER -> abort -> alarm)",
    )
    p.add_argument(
        "--eve-fraction",
        type=float,
        default=1.0,
        metavar="F",
        help="fraction of the pulses Eve intercepts with --eve-at (default 1)",
    )
    p.add_argument(
        "--eve-for",
        type=float,
        default=None,
        metavar="SECONDS",
        help="switch the eavesdropper off again after SECONDS (default: stays on)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="bridge",
        help="bridge: the gateways' MQTT bridge carries the messages (default); tunnel: broker "
        "A's own mosquitto bridge runs through a qgw [[tunnel]] to broker B",
    )
    p.set_defaults(handler=cmd_demo)
