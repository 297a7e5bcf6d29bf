"""End-to-end benchmark, site A -> site B, driven by C load generators (bench/loadgen.c).

Every system under test is started on loopback in the same run, one after the other:

- ``mosquitto-tls-bridge``: broker A bridges ``bench/#`` to broker B over TLS 1.3 with
  certificates (mosquitto's own bridge, QoS 1) -- what operators run today;
- ``qgw-bridge``: two brokers, the KME simulator pair, two ``qgw run`` gateways in bridge mode
  (the ``qgw demo`` set: ML-KEM-768 + X25519 + QKD, ML-DSA PKI bootstrap), rule ``demo/#``;
- ``qgw-tunnel``: broker A's own bridge to broker B carried through a qgw tunnel
  (``[[tunnel]] listen`` on gateway A, ``connect`` on gateway B); skipped with the reason
  printed while ``qgw check-config`` rejects ``[[tunnel]]``.

For each system and payload (100 B, 1 KiB, 64 KiB) it measures, with ``loadgen pub`` at broker A
and ``loadgen sub`` at broker B: the max lossless throughput (median of several bursts of N QoS
1 messages in which every message arrived), latency p50/p99/p99.9 at fixed offered loads (200,
1k, 5k msg/s and 50 % / 90 % of the system's measured max; loads above the max are skipped and
say so), CPU microseconds per message of every process (from /proc/PID/stat utime + stime; the
load generators report their own getrusage), idle CPU with an established session, and RSS.
Writes bench/results/e2e.json (schema: docs/benchmarks.md and bench/e2e_schema.py).

Run: .venv/bin/python bench/e2e_bench.py [--quick] [--systems a,b] [--payloads 100,1024]
(``make bench`` builds bench/build/loadgen first.)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
# the gateways and the KME are started as `python -m gateway` subprocesses: run this tree's code
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
)

from bench.e2e_schema import SYSTEMS, validate_e2e
from gateway.bridge.mosquitto import Mosquitto, free_port
from gateway.crypto import tlspki
from gateway.demo import Demo, DemoError, _scrape, _sum
from gateway.initdemo import init_demo

LOADGEN = HERE / "build" / "loadgen"
RESULTS = HERE / "results"
PAYLOADS = (100, 1024, 65536)
FIXED_LOADS = (200, 1000, 5000)  # msg/s, issue 8
FRACTIONS = (0.5, 0.9)  # of each system's measured max lossless rate
PROBE_TIMEOUT_SECONDS = 45.0
BENCH_REKEY_SECONDS = 120  # production default (the demo's 10 s would put rekeys in every round)


# ---------------------------------------------------------------- process accounting -------


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident set of ``pid`` in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def snapshot(procs: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in procs.items()}


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy so far (/proc/stat "cpu": every field but idle and
    iowait; guest time is already inside user)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


# ---------------------------------------------------------------- systems --------------------


class System:
    """One system under test: start it, say which processes and ports it has, stop it.

    Adding a system: subclass, set ``name`` (one of bench/e2e_schema.SYSTEMS or a new name added
    there), ``topic`` (published at broker A, subscribed at broker B) and ``note``; implement
    :meth:`start` (fill ``pub_port``, ``sub_port``, ``procs``) and :meth:`stop`; optionally
    :meth:`skip_reason`. Then add it to :data:`ALL_SYSTEMS`.
    """

    name = ""
    topic = "bench/e2e"
    note = ""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pub_port = 0
        self.sub_port = 0
        self.procs: dict[str, int] = {}  # "broker-a" -> pid, ...

    def skip_reason(self) -> str | None:
        """Why this system cannot run on this tree (None: it can)."""
        return None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def _pid(broker: Mosquitto) -> int:
    proc = broker._proc  # the launcher keeps its Popen private; we only read the pid
    if proc is None:
        raise DemoError("broker not running")
    return proc.pid


class MosquittoTlsBridge(System):
    name = "mosquitto-tls-bridge"
    topic = "bench/e2e"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.brokers: list[Mosquitto] = []
        self.version = mosquitto_version()
        self.note = (
            f"mosquitto {self.version} bridge A -> B over TLS 1.3 (ECDSA P-256 certificates, "
            "client certificate required), topic bench/# out 1, bridge_protocol_version mqttv311"
        )

    def start(self) -> None:
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        ca = tlspki.new_ca("bench broker CA")
        tlspki.write_issued(ca, r / "ca.crt", None)
        tlspki.write_issued(tlspki.issue_server(ca, "broker-b"), r / "b.crt", r / "b.key")
        tlspki.write_issued(tlspki.issue_client(ca, "bridge-a"), r / "a.crt", r / "a.key")
        tls_port = free_port()
        b = Mosquitto(
            r / "b",
            extra_config=(
                f"listener {tls_port} 127.0.0.1\nallow_anonymous true\ncafile {r}/ca.crt\n"
                f"certfile {r}/b.crt\nkeyfile {r}/b.key\nrequire_certificate true\n"
                "tls_version tlsv1.3\n"
            ),
        ).start()
        self.brokers.append(b)
        a = Mosquitto(
            r / "a",
            extra_config=(
                f"connection bench-bridge\naddress 127.0.0.1:{tls_port}\ntopic bench/# out 1\n"
                f"bridge_cafile {r}/ca.crt\nbridge_certfile {r}/a.crt\n"
                f"bridge_keyfile {r}/a.key\nbridge_tls_version tlsv1.3\ncleansession false\n"
                "bridge_protocol_version mqttv311\nrestart_timeout 1\n"
            ),
        ).start()
        self.brokers.append(a)
        self.pub_port, self.sub_port = a.port, b.port
        self.procs = {"broker-a": _pid(a), "broker-b": _pid(b)}

    def stop(self) -> None:
        for b in reversed(self.brokers):
            with contextlib.suppress(Exception):
                b.stop()
        self.brokers.clear()


class _BenchDemo(Demo):
    """``qgw demo``'s launcher (init-demo set, brokers, KME simulator, two ``qgw run``) with
    the production rekey interval instead of the demo's 10 s."""

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        env = dict(env or {})
        if "QGW_REKEY__INTERVAL_SECONDS" in env:
            env["QGW_REKEY__INTERVAL_SECONDS"] = str(BENCH_REKEY_SECONDS)
        return super()._spawn(name, argv, env)

    def pids(self) -> dict[str, int]:
        out = {"broker-a": _pid(self.brokers[0]), "broker-b": _pid(self.brokers[1])}
        for name, p in self.procs:
            out[name] = p.pid
        return out


class QgwBridge(System):
    name = "qgw-bridge"
    topic = "demo/bench"
    note = (
        "two `qgw run` gateways in bridge mode (rule demo/# both, QoS 1), ML-KEM-768 + X25519 + "
        f"QKD (KME simulator over mTLS), ML-DSA PKI bootstrap, rekey every {BENCH_REKEY_SECONDS} s"
    )

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.demo: _BenchDemo | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.demo = _BenchDemo(self.root, duration=0, rate=1)
        self.demo.start()
        self.pub_port, self.sub_port = self.demo.ports.mqtt_a, self.demo.ports.mqtt_b
        self.procs = self.demo.pids()

    def stop(self) -> None:
        if self.demo is not None:
            self.demo.close()
            self.demo = None


TUNNEL_NAME = "mqtt-bridge"


class _TunnelDemo(_BenchDemo):
    """Like :class:`_BenchDemo`, but broker A's own bridge goes to gateway A's tunnel listener
    and gateway B connects that tunnel to broker B (configs written by :class:`QgwTunnel`)."""

    def __init__(self, root: Path, res: Any, tunnel_port: int) -> None:
        super().__init__(root, duration=0, rate=1)
        self.res = res
        self.tunnel_port = tunnel_port

    def start(self) -> None:
        ports = self.res.ports
        self.ports = ports
        # broker A's own bridge dials gateway A's tunnel listener and retries every second
        # until the gateways' session carries it (the probe waits for the first message)
        a = Mosquitto(
            self.root / f"mosquitto-{ports.mqtt_a}",
            port=ports.mqtt_a,
            extra_config=(
                f"connection qgw-tunnel\naddress 127.0.0.1:{self.tunnel_port}\n"
                "topic bench/# out 1\ncleansession false\nbridge_protocol_version mqttv311\n"
                "restart_timeout 1\n"
            ),
        ).start()
        self.brokers.append(a)
        b = Mosquitto(self.root / f"mosquitto-{ports.mqtt_b}", port=ports.mqtt_b).start()
        self.brokers.append(b)
        self._spawn("kme", ["kme", "serve", "--config", str(self.res.kme_config)])
        self._wait_for(
            "the KME simulator",
            lambda: "ready" in (self.root / "kme.log").read_text(errors="replace"),
        )
        env = {"QGW_REKEY__INTERVAL_SECONDS": str(BENCH_REKEY_SECONDS)}
        self.metrics_a = f"http://127.0.0.1:{ports.metrics_a}/metrics"
        self.metrics_b = f"http://127.0.0.1:{ports.metrics_b}/metrics"
        self._spawn("gateway-b", ["run", "--config", str(self.root / "site-b.toml")], env)
        self._spawn("gateway-a", ["run", "--config", str(self.root / "site-a.toml")], env)
        self._wait_for(
            "the gateways' session",
            lambda: (
                _sum(_scrape(self.metrics_a), "qgw_session_state", "state=established") == 1
                and _sum(_scrape(self.metrics_b), "qgw_session_state", "state=established") == 1
            ),
        )


class QgwTunnel(System):
    name = "qgw-tunnel"
    topic = "bench/e2e"
    note = (
        "mosquitto's own bridge A -> B (plain MQTT, topic bench/# out 1) carried through a qgw "
        f"tunnel ([[tunnel]] name={TUNNEL_NAME}: listen on gateway A, connect to broker B on "
        "gateway B), ML-KEM-768 + X25519 + QKD, ML-DSA PKI bootstrap, rekey every "
        f"{BENCH_REKEY_SECONDS} s"
    )

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.demo: _TunnelDemo | None = None
        self._prepared = False
        self._reason: str | None = None

    def _prepare(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        self.root.mkdir(parents=True, exist_ok=True)
        self.res = init_demo(self.root)
        self.tunnel_port = free_port()
        with (self.root / "site-a.toml").open("a") as f:
            f.write(
                f'\n[[tunnel]]\nname = "{TUNNEL_NAME}"\nlisten = "127.0.0.1:{self.tunnel_port}"\n'
            )
        with (self.root / "site-b.toml").open("a") as f:
            f.write(
                f'\n[[tunnel]]\nname = "{TUNNEL_NAME}"\n'
                f'connect = "127.0.0.1:{self.res.ports.mqtt_b}"\n'
            )
        for site in ("site-a", "site-b"):
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "check-config",
                    "--strict",
                    "--config",
                    str(self.root / f"{site}.toml"),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if r.returncode != 0:
                lines = [x for x in (r.stderr + r.stdout).splitlines() if "tunnel" in x.lower()]
                detail = "; ".join(lines[:3]) or (r.stderr or r.stdout).strip()[-300:]
                self._reason = (
                    f"`qgw check-config` rejects [[tunnel]] in {site}.toml "
                    f"(exit {r.returncode}): {detail}"
                )
                return

    def skip_reason(self) -> str | None:
        self._prepare()
        return self._reason

    def start(self) -> None:
        self._prepare()
        self.demo = _TunnelDemo(self.root, self.res, self.tunnel_port)
        self.demo.start()
        self.pub_port, self.sub_port = self.res.ports.mqtt_a, self.res.ports.mqtt_b
        self.procs = self.demo.pids()

    def stop(self) -> None:
        if self.demo is not None:
            self.demo.close()
            self.demo = None


ALL_SYSTEMS: dict[str, Callable[[Path], System]] = {
    "mosquitto-tls-bridge": MosquittoTlsBridge,
    "qgw-tunnel": QgwTunnel,
    "qgw-bridge": QgwBridge,
}
assert set(ALL_SYSTEMS) <= set(SYSTEMS)


# ---------------------------------------------------------------- load generator runs -------

_run_ids = itertools.count(int(time.time()) % 100000 * 1000)


class LoadgenError(RuntimeError):
    pass


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    raise LoadgenError(f"no JSON from loadgen: {text[-500:]!r}")


@contextlib.contextmanager
def subscriber(
    port: int, topic: str, n: int, run: int, timeout: float, idle: float, size: int = 100
) -> Iterator[subprocess.Popen[str]]:
    """``loadgen sub`` on broker B, returned once it has subscribed."""
    p = subprocess.Popen(
        [
            str(LOADGEN),
            "sub",
            "-p",
            str(port),
            "-t",
            topic,
            "-n",
            str(n),
            "-r",
            str(run),
            "-s",
            str(size),
            "-q",
            "1",
            "-T",
            f"{timeout:.1f}",
            "-I",
            f"{idle:.1f}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 10
        line = ""
        while time.monotonic() < deadline and line != "ready":
            if sel.select(max(0.0, deadline - time.monotonic())):
                line = p.stdout.readline().strip()
                if not line and p.poll() is not None:
                    break
        sel.close()
        if line != "ready":
            raise LoadgenError(f"subscriber not ready: {p.stderr.read() if p.stderr else ''}")
        yield p
    finally:
        if p.poll() is None:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        if p.poll() is None:
            p.kill()
            p.wait(5)


def one_run(
    system: System,
    size: int,
    n: int,
    rate: float = 0.0,
    window: int = 1000,
    expect_seconds: float = 10.0,
) -> dict[str, Any]:
    """Publish ``n`` messages of ``size`` bytes at broker A (burst if rate == 0), receive them
    at broker B; return both load generators' reports plus per-process CPU deltas."""
    run = next(_run_ids)
    timeout = 30.0 + 4 * expect_seconds
    with subscriber(system.sub_port, system.topic, n, run, timeout, 5.0, size) as sub:
        cpu0, busy0 = snapshot(system.procs), machine_busy_seconds()
        pub = subprocess.run(
            [
                str(LOADGEN),
                "pub",
                "-p",
                str(system.pub_port),
                "-t",
                system.topic,
                "-n",
                str(n),
                "-s",
                str(size),
                "-r",
                str(run),
                "-q",
                "1",
                "-R",
                f"{rate:.3f}",
                "-w",
                str(window),
            ],
            capture_output=True,
            text=True,
            timeout=timeout + 60,
            check=False,
        )
        try:
            out, _ = sub.communicate(timeout=timeout + 10)
        except subprocess.TimeoutExpired as exc:
            raise LoadgenError("subscriber did not finish") from exc
        cpu1, busy1 = snapshot(system.procs), machine_busy_seconds()
    p, s = _last_json(pub.stdout), _last_json(out)
    if pub.returncode not in (0, 1):
        raise LoadgenError(f"publisher failed ({pub.returncode}): {pub.stderr[-500:]}")
    span_s = max(1e-9, (s["last_recv_ns"] - p["first_send_ns"]) / 1e9) if s["received"] else 0.0
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    return {
        "pub": p,
        "sub": s,
        "received": s["received"],
        "lost": s["lost"],
        "duplicates": s["duplicates"],
        "span_s": span_s,
        "msgs_per_s": s["received"] / span_s if span_s else 0.0,
        "cpu_s": cpu,
        "machine_busy_s": busy1 - busy0,
    }


def probe(system: System) -> None:
    """Wait until one message gets from broker A to broker B (bridges connect asynchronously)."""
    deadline = time.monotonic() + PROBE_TIMEOUT_SECONDS
    while True:
        run = next(_run_ids)
        with subscriber(system.sub_port, system.topic, 1, run, 3.0, 3.0) as sub:
            subprocess.run(
                [
                    str(LOADGEN),
                    "pub",
                    "-p",
                    str(system.pub_port),
                    "-t",
                    system.topic,
                    "-n",
                    "1",
                    "-r",
                    str(run),
                    "-q",
                    "1",
                ],
                capture_output=True,
                timeout=30,
                check=False,
            )
            out, _ = sub.communicate(timeout=30)
        if _last_json(out)["received"] == 1:
            return
        if time.monotonic() > deadline:
            raise LoadgenError(
                f"{system.name}: no message got through in {PROBE_TIMEOUT_SECONDS} s"
            )


# ---------------------------------------------------------------- measurements --------------


def _per_msg_us(r: dict[str, Any]) -> dict[str, float]:
    n = max(1, r["received"])
    out = {k: v * 1e6 / n for k, v in r["cpu_s"].items()}
    out["loadgen-pub"] = r["pub"]["cpu_us"] / n
    out["loadgen-sub"] = r["sub"]["cpu_us"] / n
    return out


def _machine(r: dict[str, Any]) -> dict[str, float]:
    """Whole-machine CPU during the round, in % of one core: busy in all, by the measured
    processes (load generators included), and by everything else (other users' work)."""
    span = r["span_s"] or 1.0
    ours = sum(r["cpu_s"].values()) + (r["pub"]["cpu_us"] + r["sub"]["cpu_us"]) / 1e6
    busy = r["machine_busy_s"]
    return {
        "busy": 100 * busy / span,
        "measured_processes": 100 * ours / span,
        "other": max(0.0, 100 * (busy - ours) / span),
    }


def _percent(r: dict[str, Any]) -> dict[str, float]:
    span = r["span_s"] or 1.0
    out = {k: 100 * v / span for k, v in r["cpu_s"].items()}
    out["loadgen-pub"] = r["pub"]["cpu_us"] / 1e4 / span
    out["loadgen-sub"] = r["sub"]["cpu_us"] / 1e4 / span
    return out


def _median_dicts(ds: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(d[k] for d in ds), 2) for k in ds[0]} if ds else {}


class Plan:
    def __init__(self, quick: bool, rounds: int | None) -> None:
        self.quick = quick
        self.rounds = rounds or 3
        self.round_seconds = 1.0 if quick else 2.5  # each burst round lasts about this long
        self.idle_seconds = 10.0 if quick else 30.0
        self.load_seconds = 1.0 if quick else 3.0  # each offered load at least this long
        self.load_min_messages = 300 if quick else 1000  # ... and at least this many messages
        self.load_max_seconds = 3.0 if quick else 8.0


def measure_burst(system: System, size: int, plan: Plan, cross: bool) -> dict[str, Any]:
    """Warm-up, then ``plan.rounds`` bursts; with ``cross``, each loadgen round is followed
    by the same burst through mosquitto_pub / mosquitto_sub (interleaved, so drift in the
    machine's load hits both instruments alike)."""
    window = 100 if size > 16384 else 1000
    warm_n = 200 if size > 16384 else 2000
    warm = one_run(system, size, warm_n, window=window)
    rate0 = max(warm["msgs_per_s"], 50.0)
    n = int(min(max(rate0 * plan.round_seconds, 200), 300_000))
    rounds, clients = [], []
    for _ in range(plan.rounds):
        rounds.append(one_run(system, size, n, window=window, expect_seconds=n / rate0))
        if cross:
            clients.append(crosscheck_clients(system, n, 1, 30 + 8 * n / rate0))
    lossless = [r for r in rounds if r["lost"] == 0]
    return {
        "burst_messages": n,
        "window": window,
        "rounds": [
            {
                "msgs_per_s": round(r["msgs_per_s"], 1),
                "received": r["received"],
                "lost": r["lost"],
                "duplicates": r["duplicates"],
            }
            for r in rounds
        ],
        "max_lossless_msgs_per_s": round(statistics.median(r["msgs_per_s"] for r in lossless), 1)
        if lossless
        else 0.0,
        "lost": sum(r["lost"] for r in rounds),
        "duplicates": sum(r["duplicates"] for r in rounds),
        "cpu_us_per_msg": _median_dicts([_per_msg_us(r) for r in rounds]),
        "burst_cpu_percent": _median_dicts([_percent(r) for r in rounds]),
        "machine_cpu_percent": _median_dicts([_machine(r) for r in rounds]),
        "mosquitto_clients_burst": _merge_cross(clients, rounds) if cross else None,
    }


def _merge_cross(clients: list[dict[str, Any]], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    if any("skipped" in c for c in clients):
        return {"skipped": clients[0]["skipped"]}
    rates = [c["msgs_per_s"] for c in clients]
    ratios = [r["msgs_per_s"] / c for r, c in zip(rounds, rates, strict=True) if c]
    return {
        "messages": clients[0]["messages"] if clients else 0,
        "payload_bytes": 99,
        "msgs_per_s": round(statistics.median(rates), 1) if rates else 0.0,
        "rounds_msgs_per_s": rates,
        "lost": sum(c["lost"] for c in clients),
        "loadgen_over_clients": round(statistics.median(ratios), 2) if ratios else None,
    }


def crosscheck_clients(system: System, n: int, rounds: int, timeout: float) -> dict[str, Any]:
    """The same burst with Debian's mosquitto-clients (``mosquitto_pub -l`` at broker A,
    ``mosquitto_sub -C N`` at broker B), 100-byte lines: a second instrument for the 100 B
    row. Rate = N / (subscriber exit - publisher start), so it includes process start-up."""
    pub_bin, sub_bin = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
    if not pub_bin or not sub_bin:
        return {"skipped": "mosquitto-clients not installed"}
    lines = (b"x" * 99 + b"\n") * n  # 99 characters + newline: 99-byte payloads
    rates, lost = [], 0
    for _ in range(rounds):
        sub = subprocess.Popen(
            [
                sub_bin,
                "-p",
                str(system.sub_port),
                "-t",
                system.topic,
                "-q",
                "1",
                "-C",
                str(n),
                "-W",
                str(int(timeout)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.5)  # mosquitto_sub has no "subscribed" signal
            t0 = time.monotonic()
            subprocess.run(
                [pub_bin, "-p", str(system.pub_port), "-t", system.topic, "-q", "1", "-l"],
                input=lines,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
            out, _ = sub.communicate(timeout=timeout + 10)
            t1 = time.monotonic()
        finally:
            if sub.poll() is None:
                sub.kill()
                sub.wait(5)
        got = out.count(b"\n")
        lost += max(0, n - got)
        if got >= n:
            rates.append(n / (t1 - t0))
    return {
        "messages": n,
        "payload_bytes": 99,
        "msgs_per_s": round(statistics.median(rates), 1) if rates else 0.0,
        "rounds_msgs_per_s": [round(r, 1) for r in rates],
        "lost": lost,
    }


def offered_loads(max_rate: float) -> tuple[dict[int, str], dict[str, str]]:
    """{load: label} to measure and {load: reason} skipped (above the measured max)."""
    loads: dict[int, str] = {}
    skipped: dict[str, str] = {}
    for f in FRACTIONS:
        load = round(max_rate * f)
        if load >= 1:
            loads.setdefault(load, f"{f:.0%} of max")
    for load in FIXED_LOADS:
        if load <= max_rate:
            loads[load] = "fixed"
        else:
            skipped[str(load)] = f"above the measured max lossless rate ({max_rate:.0f} msg/s)"
    return dict(sorted(loads.items())), skipped


def measure_latency(system: System, size: int, max_rate: float, plan: Plan) -> dict[str, Any]:
    loads, skipped = offered_loads(max_rate)
    latency: dict[str, Any] = {}
    window = 100 if size > 16384 else 1000
    for load, label in loads.items():
        secs = min(max(plan.load_seconds, plan.load_min_messages / load), plan.load_max_seconds)
        n = max(20, int(load * secs))
        r = one_run(system, size, n, rate=float(load), window=window, expect_seconds=secs)
        lat = r["sub"]["latency_ms"]
        latency[str(load)] = {
            "p50": lat["p50"],
            "p99": lat["p99"],
            "p999": lat["p999"],
            "p90": lat["p90"],
            "max": lat["max"],
            "mean": lat["mean"],
            "offered": label,
            "messages": n,
            "received": r["received"],
            "lost": r["lost"],
            "duplicates": r["duplicates"],
            "achieved_send_rate": round(r["pub"]["send_rate"], 1),
            "late_sends": r["pub"]["late"],
            "cpu_us_per_msg": {k: round(v, 2) for k, v in _per_msg_us(r).items()},
        }
    return {"latency_ms": latency, "latency_skipped": skipped}


def measure_idle(system: System, seconds: float) -> dict[str, float]:
    time.sleep(2.0)  # let start-up work settle
    c0, t0 = snapshot(system.procs), time.monotonic()
    time.sleep(seconds)
    c1, t1 = snapshot(system.procs), time.monotonic()
    return {k: round(100 * (c1[k] - c0[k]) / (t1 - t0), 3) for k in c0}


def run_system(system: System, payloads: list[int], plan: Plan, rows: list[dict[str, Any]]) -> None:
    """Measure ``system`` for every payload; append one row per payload to ``rows`` as soon as
    it is complete (a failure later keeps the rows already measured)."""
    print(f"== {system.name}: starting", flush=True)
    system.start()
    try:
        probe(system)
        print(f"   idle {plan.idle_seconds:.0f} s", flush=True)
        idle = measure_idle(system, plan.idle_seconds)
        for size in payloads:
            t = time.monotonic()
            burst = measure_burst(system, size, plan, cross=size == min(payloads))
            lat = measure_latency(system, size, burst["max_lossless_msgs_per_s"], plan)
            cross = burst["mosquitto_clients_burst"]
            rss = {k: rss_kib(pid) for k, pid in system.procs.items()}
            row = {
                "system": system.name,
                "payload_bytes": size,
                "qos": 1,
                "max_lossless_msgs_per_s": burst["max_lossless_msgs_per_s"],
                "latency_ms": lat["latency_ms"],
                "cpu_us_per_msg": burst["cpu_us_per_msg"],
                "idle_cpu_percent": idle,
                "latency_skipped": lat["latency_skipped"],
                "burst_cpu_percent": burst["burst_cpu_percent"],
                "machine_cpu_percent": burst["machine_cpu_percent"],
                "burst_messages": burst["burst_messages"],
                "window": burst["window"],
                "rounds": burst["rounds"],
                "lost": burst["lost"],
                "duplicates": burst["duplicates"],
                "rss_kib": {k: v.get("VmRSS", 0) for k, v in rss.items()},
                "peak_rss_kib": {k: v.get("VmHWM", 0) for k, v in rss.items()},
            }
            if cross is not None:
                row["mosquitto_clients_burst"] = cross
            rows.append(row)
            print(
                f"   {size:>6} B: max lossless {row['max_lossless_msgs_per_s']:>9.1f} msg/s, "
                + ", ".join(
                    f"{k}: p50 {v['p50']:.2f} p99 {v['p99']:.2f} ms"
                    for k, v in row["latency_ms"].items()
                )
                + (f"; mosquitto_pub/sub {cross.get('msgs_per_s', 0):.0f} msg/s" if cross else "")
                + f" ({time.monotonic() - t:.0f} s)",
                flush=True,
            )
    finally:
        system.stop()


# ---------------------------------------------------------------- machine, main -------------


def _first_line(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    return ((r.stdout or r.stderr).strip().splitlines() or ["unknown"])[0]


def mosquitto_version() -> str:
    line = _first_line([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"])
    return line.split("version", 1)[1].strip() if "version" in line else line


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "mosquitto": mosquitto_version(),
        "openssl": _first_line(["openssl", "version"]),
        "loadavg_at_start": round(os.getloadavg()[0], 2),
    }


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through every System.stop() and temp folder


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short rounds (about 4 minutes in all)")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS), help="comma-separated")
    ap.add_argument(
        "--payloads", default=",".join(map(str, PAYLOADS)), help="bytes, comma-separated"
    )
    ap.add_argument("--rounds", type=int, default=None, help="burst rounds (median), default 3")
    ap.add_argument("--out", type=Path, default=RESULTS / "e2e.json")
    args = ap.parse_args()
    if not LOADGEN.exists():
        print(f"{LOADGEN} is missing: run `make bench/build/loadgen` (needs libmosquitto-dev)")
        return 2
    plan = Plan(args.quick, args.rounds)
    payloads = [int(x) for x in args.payloads.split(",") if x]
    started = time.monotonic()
    doc: dict[str, Any] = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "schema": "qgw-e2e/1",
        "quick": args.quick,
        "what": "QoS 1, loadgen pub at broker A -> loadgen sub at broker B, every system on "
        "loopback on this machine, one after the other in the same run",
        "systems": {},
        "skipped": [],
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="qgw-bench-") as tmp:
        for name in [s for s in args.systems.split(",") if s]:
            system = ALL_SYSTEMS[name](Path(tmp) / name)
            reason = system.skip_reason()
            if reason:
                print(f"== {name}: SKIPPED: {reason}", flush=True)
                doc["skipped"].append({"system": name, "reason": reason})
                continue
            doc["systems"][name] = {"note": system.note}
            try:
                run_system(system, payloads, plan, doc["rows"])
            except (LoadgenError, DemoError, OSError, subprocess.SubprocessError) as exc:
                print(f"== {name}: FAILED: {exc}", flush=True)
                doc["skipped"].append({"system": name, "reason": f"failed: {exc}"})
    doc["duration_s"] = round(time.monotonic() - started, 1)
    problems = validate_e2e(doc)
    if problems:
        print("e2e.json does not match its schema:\n  " + "\n  ".join(problems))
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(doc, indent=1) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out} ({doc['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
