"""Two complete sites as real processes, for the integration tests.

:class:`TwoSites` writes a demo setup with :func:`gateway.initdemo.init_demo` (ML-DSA PKI
auth, QKD ``required`` from the KME simulator over mTLS), then runs::

    mosquitto A (persistence on)    KME simulator (one process, --kme both)    mosquitto B
    qgw run --config site-a.toml    <==== loopback TCP ====>    qgw run --config site-b.toml

Every process is started and stopped here; logs go to files in the setup folder
(``gateway-a.log``, ``gateway-b.log``, ``kme.log``, ``mosquitto-*/mosquitto.log``), and the
integration conftest attaches their tails to the report of a failed test. Every wait has a
timeout. Per test, rules and environment overrides are set before the gateways start::

    with TwoSites(tmp_path, rules={"a": [...], "b": [...]}, env={"QGW_MQTT__INFLIGHT": "64"}) as s:
        s.start()                                  # brokers, KME, both gateways, established
        sub = s.client("b", "sub-1"); sub.subscribe("x/#")
        pub = s.client("a", "pub-1"); pub.publish("x/1", b"hello")
        sub.wait_for(1)
        s.kill_gateway("a"); s.start_gateway("a")
        assert s.metric("a", "qgw_handshakes_total", result="ok") == 1

:class:`NetnsSites` is the same picture on two "hosts" (:class:`tests.support.netns.NetnsPair`):
site A's broker, KME A (``--kme A``) and gateway in namespace a, site B's in namespace b;
the gateways and the two KME processes talk over the veth link. The test process cannot reach
inside the namespaces, so MQTT clients there are ``python -m tests.support.mqtt_tool`` processes
(see that module) and metrics are scraped by a small process inside the namespace.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway.bridge.mosquitto import Mosquitto, find_mosquitto
from gateway.config import to_toml
from gateway.initdemo import DemoResult, init_demo
from tests.support.kme import admin_set
from tests.support.netns import NetnsPair, require_netns

ROOT = Path(__file__).resolve().parents[2]
SITES = ("a", "b")
START_TIMEOUT_SECONDS = 30.0  # one process (KME, gateway) becoming ready
ESTABLISH_TIMEOUT_SECONDS = 30.0  # both gateways' session established
STOP_TIMEOUT_SECONDS = 10.0  # SIGTERM -> SIGKILL
MQTT_TIMEOUT_SECONDS = 10.0  # connect / subscribe / one PUBACK
LOG_TAIL_CHARS = 3000

#: Environment for every gateway unless a test overrides it: a short reconnect back-off so a
#: restarted peer is found within seconds (the default cap is 30 s).
DEFAULT_GATEWAY_ENV = {"QGW_GATEWAY__RECONNECT_MAX_SECONDS": "2"}

_open: weakref.WeakSet[TwoSites] = weakref.WeakSet()


def open_sites() -> list[TwoSites]:
    """Every TwoSites not closed yet (the conftest reports their logs when a test fails)."""
    return list(_open)


def wait_until(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``cond`` until true; raise AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def rule(
    pattern: str,
    direction: str,
    qos: int = 1,
    local_prefix: str = "",
    remote_prefix: str = "",
) -> dict[str, Any]:
    """One ``[[mqtt.rules]]`` entry."""
    return {
        "pattern": pattern,
        "direction": direction,
        "qos": qos,
        "local_prefix": local_prefix,
        "remote_prefix": remote_prefix,
    }


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: no inherited QGW_*, this checkout on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QGW_")}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def parse_metrics(text: str) -> dict[str, Metric]:
    """Prometheus text -> {family name: family}; raises ValueError on a malformed page."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def metric_value(families: dict[str, Metric], sample: str, **labels: str) -> float:
    """Sum of the samples called ``sample`` whose labels include ``labels`` (0.0 if none)."""
    total = 0.0
    for fam in families.values():
        for s in fam.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _set_rules(rules: list[dict[str, Any]]) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        d["mqtt"]["rules"] = rules

    return change


# --- MQTT client in the test process ------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One message as a subscriber saw it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    user_properties: tuple[tuple[str, str], ...] = ()
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    message_expiry_interval: int | None = None
    payload_format_indicator: int | None = None


def _received(msg: paho.MQTTMessage) -> Received:
    p = getattr(msg, "properties", None)

    def get(name: str) -> Any:
        return getattr(p, name, None) if p is not None else None

    return Received(
        topic=msg.topic,
        payload=bytes(msg.payload),
        qos=msg.qos,
        retain=bool(msg.retain),
        user_properties=tuple((str(k), str(v)) for k, v in (get("UserProperty") or [])),
        content_type=get("ContentType"),
        response_topic=get("ResponseTopic"),
        correlation_data=get("CorrelationData"),
        message_expiry_interval=get("MessageExpiryInterval"),
        payload_format_indicator=get("PayloadFormatIndicator"),
    )


def publish_properties(
    *,
    user_properties: list[tuple[str, str]] | None = None,
    content_type: str | None = None,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    message_expiry_interval: int | None = None,
    payload_format_indicator: int | None = None,
) -> Properties:
    """MQTT v5 PUBLISH properties for :meth:`MqttClient.publish`."""
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if user_properties:
        p.UserProperty = user_properties
    if content_type is not None:
        p.ContentType = content_type
    if response_topic is not None:
        p.ResponseTopic = response_topic
    if correlation_data is not None:
        p.CorrelationData = correlation_data
    if message_expiry_interval is not None:
        p.MessageExpiryInterval = message_expiry_interval
    if payload_format_indicator is not None:
        p.PayloadFormatIndicator = payload_format_indicator
    return p


class MqttClient:
    """paho-mqtt v2 (callback API 2, MQTT v5) client with its network thread; records messages.

    Clean start, so every test starts with a fresh session (use unique ``client_id`` values).
    """

    def __init__(self, port: int, client_id: str, host: str = "127.0.0.1") -> None:
        self.client_id = client_id
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._subacks: dict[int, list[Any]] = {}
        self._connected = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_connect = lambda *_a: self._connected.set()
        self._c = c
        c.connect(host, port, keepalive=30)
        c.loop_start()
        if not self._connected.wait(MQTT_TIMEOUT_SECONDS):
            self.close()
            raise AssertionError(f"MQTT client {client_id} could not connect to {host}:{port}")

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        r = _received(msg)
        with self._cond:
            self.messages.append(r)
            self._cond.notify_all()

    def _on_subscribe(self, _c: paho.Client, _u: Any, mid: int, rcs: list[Any], _p: Any) -> None:
        with self._cond:
            self._subacks[mid] = rcs
            self._cond.notify_all()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK (fails on a refused subscription)."""
        rc, mid = self._c.subscribe(topic_filter, qos=qos)
        assert rc == paho.MQTT_ERR_SUCCESS, f"subscribe {topic_filter}: {rc}"
        assert mid is not None
        with self._cond:
            ok = self._cond.wait_for(lambda: mid in self._subacks, MQTT_TIMEOUT_SECONDS)
            assert ok, f"no SUBACK for {topic_filter}"
            codes = self._subacks.pop(mid)
        assert all(not c.is_failure for c in codes), f"subscribe {topic_filter} refused: {codes}"

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
        wait: bool = True,
    ) -> paho.MQTTMessageInfo:
        """Publish; with ``wait`` return after the broker's PUBACK (QoS 1) or the write (QoS 0)."""
        info = self._c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if wait:
            info.wait_for_publish(MQTT_TIMEOUT_SECONDS)
            assert info.is_published(), f"publish on {topic} not acknowledged in time"
        return info

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def wait_for(
        self,
        count: int,
        timeout: float = MQTT_TIMEOUT_SECONDS,
        match: Callable[[Received], bool] | None = None,
    ) -> list[Received]:
        """Wait until at least ``count`` recorded messages satisfy ``match``; return them."""

        def matching() -> list[Received]:
            return [m for m in self.messages if match is None or match(m)]

        with self._cond:
            ok = self._cond.wait_for(lambda: len(matching()) >= count, timeout)
            got = matching()
        assert ok, f"{self.client_id}: {len(got)} of {count} messages within {timeout:.0f} s"
        return got

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._c.disconnect()
        with contextlib.suppress(Exception):
            self._c.loop_stop()


# --- the two sites ------------------------------------------------------------------------


@dataclass
class _Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass(eq=False, repr=False)
class TwoSites:
    """Brokers, KME simulator and both gateways of a two-site setup (see module docstring).

    ``rules``: per site ("a"/"b") the ``[[mqtt.rules]]`` list written into its TOML before
    the gateways start (default: init_demo's ``demo/#`` both). ``env``: environment overrides
    for both gateways (e.g. ``QGW_REKEY__INTERVAL_SECONDS``); ``site_env`` per site on top.
    """

    root: Path
    rules: dict[str, list[dict[str, Any]]] | None = None
    env: dict[str, str] = field(default_factory=dict)
    site_env: dict[str, dict[str, str]] = field(default_factory=dict)
    kme_hosts: tuple[str, ...] = ()
    #: how the gateways fetch keys from the simulator: "etsi014" or "skip" (init-demo's
    #: --key-source); QGW_TEST_KEY_SOURCE=skip runs every integration test over SKIP
    key_source: str = field(
        default_factory=lambda: os.environ.get("QGW_TEST_KEY_SOURCE", "etsi014")
    )
    demo: DemoResult = field(init=False)
    brokers: dict[str, Mosquitto] = field(init=False, default_factory=dict)
    _procs: dict[str, _Proc] = field(init=False, default_factory=dict)
    _clients: list[Any] = field(init=False, default_factory=list)
    _closed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        find_mosquitto()  # fail early with install advice
        self.demo = init_demo(self.root, kme_hosts=self.kme_hosts, key_source=self.key_source)
        self.ports = self.demo.ports
        if self.rules:
            for site, rules in self.rules.items():
                self.edit_site(site, _set_rules(rules))
        _open.add(self)

    # -- configuration -------------------------------------------------------------------

    def site_config(self, site: str) -> Path:
        return self.root / f"site-{site}.toml"

    def edit_site(self, site: str, change: Callable[[dict[str, Any]], None]) -> None:
        """Rewrite ``site-X.toml``: ``change`` edits the parsed dict in place."""
        path = self.site_config(site)
        data = tomllib.loads(path.read_text())
        change(data)
        path.write_text(to_toml(data))

    def edit_kme(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Rewrite ``kme.toml`` (only while the KME simulator is stopped)."""
        path = self.demo.kme_config
        data = tomllib.loads(path.read_text())
        change(data)
        path.write_text(to_toml(data))

    def gateway_env(self, site: str) -> dict[str, str]:
        return {**DEFAULT_GATEWAY_ENV, **self.env, **self.site_env.get(site, {})}

    def metrics_port(self, site: str) -> int:
        return self.ports.metrics_a if site == "a" else self.ports.metrics_b

    def mqtt_port(self, site: str) -> int:
        return self.ports.mqtt_a if site == "a" else self.ports.mqtt_b

    # -- processes -----------------------------------------------------------------------

    def _popen(self, argv: list[str], env: dict[str, str], log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> _Proc:
        old = self._procs.get(name)
        assert old is None or old.proc.poll() is not None, f"{name} is already running"
        log = self.root / f"{name}.log"
        with log.open("ab") as f:  # appended across restarts; the child keeps its own fd
            f.write(f"===== start {name} at {time.strftime('%H:%M:%S')} =====\n".encode())
            f.flush()
            proc = self._popen([sys.executable, "-m", "gateway", *args], child_env(env), f)
        p = _Proc(name, proc, log)
        self._procs[name] = p
        return p

    def running(self, name: str) -> bool:
        p = self._procs.get(name)
        return p is not None and p.proc.poll() is None

    def _wait_log(self, p: _Proc, text: str, timeout: float) -> None:
        def ready() -> bool:
            if p.proc.poll() is not None:
                raise AssertionError(
                    f"{p.name} exited with {p.proc.returncode}:\n{self.log_tail(p.name)}"
                )
            tail = p.log.read_text(errors="replace").rsplit("===== start", 1)[-1]
            return text in tail

        wait_until(ready, timeout, f"{p.name} to print {text!r}")

    def _terminate(
        self, name: str, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_SECONDS
    ) -> int | None:
        p = self._procs.get(name)
        if p is None:
            return None
        if p.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.proc.send_signal(sig)
            try:
                p.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(timeout)
        return p.proc.returncode

    def start_brokers(self) -> None:
        for site in SITES:
            if site not in self.brokers:
                self.brokers[site] = Mosquitto(
                    self.root / f"mosquitto-{site}", port=self.mqtt_port(site), persistence=True
                )
            self.brokers[site].start()

    def start_kme(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """``qgw kme serve --config kme.toml`` (both KMEs); returns once it printed 'ready'."""
        p = self._spawn("kme", ["kme", "serve", "--config", str(self.demo.kme_config)])
        self._wait_log(p, "ready", timeout)

    def stop_kme(self) -> None:
        self._terminate("kme")

    def kme_admin(self, kme: str = "A", **changes: Any) -> dict[str, Any]:
        """POST /admin/link on KME ``kme`` (e.g. ``up=False``, ``eavesdropper=True``)."""
        port = self.ports.kme_a_admin if kme.upper() == "A" else self.ports.kme_b_admin
        return admin_set(f"http://127.0.0.1:{port}", **changes)

    def start_gateway(self, site: str) -> None:
        """``qgw run --config site-X.toml``; returns once its /metrics answers."""
        p = self._spawn(
            f"gateway-{site}",
            ["run", "--config", str(self.site_config(site))],
            self.gateway_env(site),
        )
        self._wait_metrics(p, site)

    def _wait_metrics(self, p: _Proc, site: str, interval: float = 0.1) -> None:
        """Wait until gateway ``site`` answers /metrics (fails at once if it exited)."""

        def answers() -> bool:
            if p.proc.poll() is not None:
                raise AssertionError(
                    f"{p.name} exited with {p.proc.returncode}:\n{self.log_tail(p.name)}"
                )
            try:
                self.scrape_text(site)
            except OSError:
                return False
            return True

        wait_until(answers, START_TIMEOUT_SECONDS, f"gateway {site}'s /metrics", interval=interval)

    def kill_gateway(self, site: str, sig: int = signal.SIGKILL) -> int | None:
        """Send ``sig`` (default SIGKILL) to gateway ``site`` and wait for it to exit."""
        return self._terminate(f"gateway-{site}", sig)

    def signal_gateway(self, site: str, sig: int) -> None:
        """Send ``sig`` (e.g. SIGHUP) to gateway ``site`` without waiting for anything."""
        p = self._procs[f"gateway-{site}"]
        assert p.proc.poll() is None, f"gateway-{site} is not running"
        p.proc.send_signal(sig)

    def gateway_log(self, site: str) -> str:
        """The log of gateway ``site`` since its last start."""
        p = self._procs[f"gateway-{site}"]
        return p.log.read_text(errors="replace").rsplit("===== start", 1)[-1]

    def stop_gateway(self, site: str) -> int | None:
        """Graceful stop (SIGTERM); returns the exit code."""
        return self._terminate(f"gateway-{site}", signal.SIGTERM)

    def restart_gateway(self, site: str, sig: int = signal.SIGTERM) -> None:
        self._terminate(f"gateway-{site}", sig)
        self.start_gateway(site)

    def start(self, *, kme: bool = True, wait: bool = True) -> TwoSites:
        """Brokers, the KME simulator (unless ``kme=False``), gateway B then A; with ``wait``
        return once both report an established session."""
        self.start_brokers()
        if kme:
            self.start_kme()
        self.start_gateway("b")
        self.start_gateway("a")
        if wait:
            self.wait_established()
        return self

    # -- metrics -------------------------------------------------------------------------

    def scrape_text(self, site: str) -> str:
        url = f"http://127.0.0.1:{self.metrics_port(site)}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())

    def scrape(self, site: str) -> dict[str, Metric]:
        """GET /metrics of gateway ``site``, parsed (raises OSError when unreachable)."""
        return parse_metrics(self.scrape_text(site))

    def metric(self, site: str, sample: str, **labels: str) -> float:
        return metric_value(self.scrape(site), sample, **labels)

    def wait_metric(
        self,
        site: str,
        sample: str,
        cond: Callable[[float], bool],
        timeout: float = 15.0,
        **labels: str,
    ) -> float:
        """Wait until ``cond(value)``; return the value. Unreachable counts as not yet."""
        seen: list[float] = []

        def check() -> bool:
            try:
                v = self.metric(site, sample, **labels)
            except OSError:
                return False
            seen.append(v)
            return cond(v)

        try:
            wait_until(check, timeout, f"{sample}{labels} at {site}", interval=0.25)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last value {seen[-1:]}") from None
        return seen[-1]

    def established(self, site: str) -> bool:
        try:
            return self.metric(site, "qgw_session_state", state="established") == 1
        except OSError:
            return False

    def wait_established(self, timeout: float = ESTABLISH_TIMEOUT_SECONDS) -> None:
        wait_until(
            lambda: self.established("a") and self.established("b"),
            timeout,
            "both gateways' session to be established",
            interval=0.2,
        )

    # -- MQTT ----------------------------------------------------------------------------

    def client(self, site: str, client_id: str) -> MqttClient:
        """A connected MQTT v5 client at site ``site``'s broker (closed with the sites)."""
        c = MqttClient(self.mqtt_port(site), client_id)
        self._clients.append(c)
        return c

    # -- logs and cleanup ----------------------------------------------------------------

    def log_paths(self) -> dict[str, Path]:
        out = {name: p.log for name, p in self._procs.items()}
        for site, b in self.brokers.items():
            out[f"mosquitto-{site}"] = b.log_path
        return out

    def log_tail(self, name: str, chars: int = LOG_TAIL_CHARS) -> str:
        path = self.log_paths().get(name)
        if path is None or not path.exists():
            return "(no log)"
        return path.read_text(errors="replace")[-chars:]

    def report(self) -> str:
        """Tails of every log (for a failed test's report)."""
        parts = [f"setup folder: {self.root}"]
        for name in sorted(self.log_paths()):
            parts.append(f"----- {name} (tail) -----\n{self.log_tail(name)}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop every client and process (gateways first), then the brokers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for c in self._clients:
            c.close()
        names = sorted(self._procs, key=lambda n: (not n.startswith("gateway"), n))
        for name in names:
            with contextlib.suppress(Exception):
                self._terminate(name)
        for b in self.brokers.values():
            with contextlib.suppress(Exception):
                b.stop()
        _open.discard(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.root}>"

    def __enter__(self) -> TwoSites:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _close_leftovers() -> None:
    for s in list(_open):
        with contextlib.suppress(Exception):
            s.close()


# --- two hosts: network namespaces --------------------------------------------------------


@dataclass(eq=False, repr=False)
class NetnsSites(TwoSites):
    """Site A in namespace a, site B in namespace b (see the module docstring).

    KME A and KME B run as two processes whose sync channel uses the veth addresses; gateway B
    listens on its veth address and gateway A connects to it. Brokers, KMEs' ETSI 014 APIs and
    metrics stay on each namespace's own loopback.
    """

    net: NetnsPair | None = None

    def __post_init__(self) -> None:
        assert self.net is not None, "NetnsSites needs a created NetnsPair"
        net = self.net
        self.kme_hosts = (net.a.addr, net.b.addr)
        super().__post_init__()
        p = self.ports
        addr = {"a": net.a.addr, "b": net.b.addr}

        def kme(d: dict[str, Any]) -> None:
            d["kme_a"]["sync_listen"] = f"{addr['a']}:{p.kme_a_sync}"
            d["kme_b"]["sync_listen"] = f"{addr['b']}:{p.kme_b_sync}"

        self.edit_kme(kme)
        for site in SITES:

            def gw(d: dict[str, Any]) -> None:
                d["gateway"]["listen"] = f"{addr['b']}:{p.gw_b}"
                d["gateway"]["peer"] = f"{addr['b']}:{p.gw_b}"

            self.edit_site(site, gw)

    def _spawn_in(self, site: str, name: str, argv: list[str], env: dict[str, str]) -> _Proc:
        assert self.net is not None
        old = self._procs.get(name)
        assert old is None or old.proc.poll() is not None, f"{name} is already running"
        log = self.root / f"{name}.log"
        with log.open("ab") as f:
            f.write(f"===== start {name} at {time.strftime('%H:%M:%S')} =====\n".encode())
            f.flush()
            proc = self.net.run_in(
                site,
                argv,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        p = _Proc(name, proc, log)
        self._procs[name] = p
        return p

    def _spawn_qgw(
        self, site: str, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> _Proc:
        return self._spawn_in(site, name, [sys.executable, "-m", "gateway", *args], child_env(env))

    def start_brokers(self) -> None:
        binary = find_mosquitto()
        for site in SITES:
            b = Mosquitto(
                self.root / f"mosquitto-{site}", port=self.mqtt_port(site), persistence=True
            )
            self.brokers[site] = b
            # The launcher starts brokers in this namespace; reuse its generated config
            # (same options as on loopback) and start the binary inside the site's namespace.
            b.config_path.write_text(b._config())
            p = self._spawn_in(
                site, f"mosquitto-{site}-proc", [binary, "-c", str(b.config_path)], child_env()
            )
            log = b.log_path

            def up(p: _Proc = p, log: Path = log) -> bool:
                if p.proc.poll() is not None:
                    raise AssertionError(f"{p.name} exited: {self.log_tail(p.name)}")
                return log.exists() and " running" in log.read_text(errors="replace")

            wait_until(up, START_TIMEOUT_SECONDS, f"mosquitto {site}")

    def start_kme(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """KME A in namespace a, then KME B in namespace b (two-process mode)."""
        for site in SITES:
            p = self._spawn_qgw(
                site,
                f"kme-{site}",
                ["kme", "serve", "--config", str(self.demo.kme_config), "--kme", site.upper()],
            )
            self._wait_log(p, "ready", timeout)

    def stop_kme(self) -> None:
        for site in ("b", "a"):
            self._terminate(f"kme-{site}")

    def kme_admin(self, kme: str = "A", **changes: Any) -> dict[str, Any]:
        port = self.ports.kme_a_admin if kme.upper() == "A" else self.ports.kme_b_admin
        body = json.dumps(changes)
        script = (
            "import sys, urllib.request as u;"
            f"r = u.urlopen(u.Request('http://127.0.0.1:{port}/admin/link', data=sys.argv[1].encode(),"
            " headers={'Content-Type': 'application/json'}), timeout=5);"
            "print(r.read().decode())"
        )
        assert self.net is not None
        out = self.net.run(kme.lower(), [sys.executable, "-c", script, body], timeout=15)
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def start_gateway(self, site: str) -> None:
        p = self._spawn_qgw(
            site,
            f"gateway-{site}",
            ["run", "--config", str(self.site_config(site))],
            self.gateway_env(site),
        )
        self._wait_metrics(p, site, interval=0.3)

    def scrape_text(self, site: str) -> str:
        """GET /metrics from inside the site's namespace (OSError when unreachable)."""
        assert self.net is not None
        url = f"http://127.0.0.1:{self.metrics_port(site)}/metrics"
        script = (
            "import sys, urllib.request as u;"
            f"sys.stdout.write(u.urlopen({url!r}, timeout=5).read().decode())"
        )
        try:
            out = self.net.run(site, [sys.executable, "-c", script], timeout=15)
        except subprocess.TimeoutExpired as exc:
            raise OSError(f"scrape {site} timed out") from exc
        if out.returncode != 0:
            raise OSError(f"scrape {site} failed: {out.stderr.strip()[-300:]}")
        return out.stdout

    def client(self, site: str, client_id: str) -> MqttClient:
        raise NotImplementedError("use tool() / MqttTool: the brokers live in the namespaces")

    def tool(self, site: str, mode: str, out: Path, *args: str) -> subprocess.Popen[bytes]:
        """Start ``python -m tests.support.mqtt_tool MODE --port P --out OUT ARGS`` in ``site``."""
        assert self.net is not None
        log = self.root / f"{out.stem}.log"
        with log.open("ab") as f:
            return self.net.run_in(
                site,
                [
                    sys.executable,
                    "-m",
                    "tests.support.mqtt_tool",
                    mode,
                    "--port",
                    str(self.mqtt_port(site)),
                    "--out",
                    str(out),
                    *args,
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env(),
                cwd=str(ROOT),
            )


# --- pytest fixtures ------------------------------------------------------------------------

SitesFactory = Callable[..., TwoSites]


@pytest.fixture
def two_sites(tmp_path: Path) -> Iterator[SitesFactory]:
    """A factory: ``two_sites(rules=..., env=...)`` -> a configured, not yet started TwoSites.

    Everything it started is stopped after the test, pass or fail.
    """
    made: list[TwoSites] = []

    def make(**kwargs: Any) -> TwoSites:
        s = TwoSites(tmp_path / f"sites{len(made)}", **kwargs)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close()


@pytest.fixture
def netns_sites(tmp_path: Path) -> Iterator[Callable[..., NetnsSites]]:
    """A factory for :class:`NetnsSites` on a fresh :class:`NetnsPair` (fails without netns)."""
    require_netns()
    made: list[tuple[NetnsSites | None, NetnsPair]] = []

    def make(**kwargs: Any) -> NetnsSites:
        net = NetnsPair().create()
        made.append((None, net))
        s = NetnsSites(tmp_path / f"netns{len(made)}", net=net, **kwargs)
        made[-1] = (s, net)
        return s

    try:
        yield make
    finally:
        for s, net in made:
            if s is not None:
                s.close()
            net.close()
