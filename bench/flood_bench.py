"""Flood benchmark (issue 10): can a connection flood lock the real peer out?

Real processes on loopback: the KME simulator (both KMEs, ETSI 014 over mTLS), gateway B's peer
link (responder), gateway A's peer link (initiator), and a flood generator. For each flood rate
(connections per second) and number of source addresses (127.0.0.x), the benchmark starts the
flood, waits one second, cuts A's TCP connection and measures how long A takes to resume
(until B's first record of the new epoch has arrived, i.e. the session is confirmed), the QKD keys
A spent for it, and what B did with the flood (evictions, refusals, log lines). Writes
``bench/results/flood.json``.

    python bench/flood_bench.py                      # the whole matrix
    python bench/flood_bench.py --quick              # two points (smoke run)
    python bench/flood_bench.py flood --port P --rate 1000 --duration 5 --addresses 8

The flood generator is a plain non-blocking-socket loop (no asyncio, no handshake): it opens
connections from the given source addresses at the given rate, holds each one for ``--hold``
seconds without sending a valid HELLO (the cheapest attack: the responder must keep it pending)
and reports how many it made and its own CPU time, so the JSON shows whether the generator or
the gateway was the bottleneck. The numbers are from a shared 2-core machine: compare points of
the same run only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "flood.json"
RATES = (100, 500, 1000, 2000, 5000)
ADDRESSES = (1, 8, 64)
FLOOD_SOURCE_BASE = "127.0.1."  # flood sources 127.0.1.1 ...; the real peer uses 127.0.0.1


# --- flood generator ----------------------------------------------------------------------


def flood(
    host: str, port: int, rate: float, duration: float, addresses: int, hold: float
) -> dict[str, Any]:
    """Open ``rate`` connections/s for ``duration`` s from ``addresses`` sources; hold each."""
    sources = [f"{FLOOD_SOURCE_BASE}{i + 1}" for i in range(addresses)]
    open_socks: collections.deque[tuple[float, socket.socket]] = collections.deque()
    made = failed = 0
    start = time.monotonic()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    n = 0
    while True:
        now = time.monotonic()
        if now - start >= duration:
            break
        due = int((now - start) * rate) - n
        for _ in range(max(0, min(due, 200))):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.bind((sources[n % len(sources)], 0))
                rc = s.connect_ex((host, port))
            except OSError:
                rc = -1
            if rc in (0, errno.EINPROGRESS):
                open_socks.append((now, s))
                made += 1
            else:
                s.close()
                failed += 1
            n += 1
        while open_socks and now - open_socks[0][0] >= hold:
            open_socks.popleft()[1].close()
        time.sleep(0.002)
    elapsed = time.monotonic() - start
    for _, s in open_socks:
        s.close()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {
        "made": made,
        "failed": failed,
        "seconds": round(elapsed, 3),
        "achieved_rate": round(made / elapsed, 1) if elapsed else 0.0,
        "generator_cpu_seconds": round(cpu, 3),
        "generator_cpu_fraction": round(cpu / elapsed, 3) if elapsed else 0.0,
    }


# --- forged bootstrap INITs (pki: the admission keys are public) --------------------------------


class _NoChain:
    chain = None
    epoch = -1
    next = None


async def _forge_one(host: str, port: int, source: str, ek: bytes, xpub: bytes) -> str:
    import dataclasses
    import uuid

    from gateway.core import labels as L
    from gateway.core import schedule
    from gateway.core.admission import Admission
    from gateway.core.wire import Challenge, FrameBuffer, Init
    from gateway.crypto import hmac_sha384

    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    fb = FrameBuffer()

    async def frame() -> tuple[Any, bytes, bytes] | None:
        while (f := fb.next_frame()) is None:
            data = await reader.read(65536)
            if not data:
                return None
            fb.feed(data)
        return f

    try:
        async with asyncio.timeout(10):
            f = await frame()
            if f is None or f[0] is not L.FrameType.CHALLENGE:
                return "no_challenge"
            adm = Admission(
                initiator=True,
                suite=L.SuiteId.MLKEM768_X25519_AES256GCM_SHA384,
                auth_mode=L.AuthModeId.PKI,
                qkd_policy=L.QkdPolicyId.REQUIRED,
                identity="site-a",
                peer_name="site-b",
                s0=schedule.psk_secret(None),
            )
            writer.write(
                adm.consume_challenge(Challenge.decode(f[1]), f[2], _NoChain(), os.urandom)
            )
            f = await frame()
            if f is None or f[0] is not L.FrameType.ADMIT:
                return "not_admitted" if f is None else f"hello_{f[0].name.lower()}"
            unsigned = Init(
                suite=1,
                auth_mode=L.AuthModeId.PKI,
                qkd_policy=L.QkdPolicyId.REQUIRED,
                qkd_offered=True,
                qkd_key_id=uuid.uuid4().bytes,  # an ID the attacker saw on the wire or made up
                nonce=os.urandom(32),
                initiator="site-a",
                responder="site-b",
                kem_public=ek,
                x25519_public=xpub,
                admission=b"",
            )
            key = schedule.admission_key_pki(1, "site-b")  # public knowledge
            init = dataclasses.replace(unsigned, admission=hmac_sha384(key, unsigned.core())[:32])
            writer.write(init.encode())
            f = await frame()
            if f is None:
                return "closed"
            if f[0] is L.FrameType.RESP:
                return "resp_signed"
            if f[0] is L.FrameType.ALERT:
                return f"alert_{f[1][0]}"
            return str(f[0].name.lower())
    except TimeoutError:
        return "timeout"
    finally:
        writer.close()


async def forge(host: str, port: int, count: int, addresses: int) -> dict[str, Any]:
    from gateway.crypto import KemAlg, X25519PrivateKey, get_provider

    ek = get_provider("pyca").kem_keygen(KemAlg.MLKEM768, os.urandom(64)).public_bytes()
    xpub = X25519PrivateKey(os.urandom(32)).public_bytes()
    sem = asyncio.Semaphore(32)
    results: collections.Counter[str] = collections.Counter()

    async def one(n: int) -> None:
        async with sem:
            try:
                src = f"127.0.3.{n % addresses + 1}"
                results[await _forge_one(host, port, src, ek, xpub)] += 1
            except OSError as exc:
                results[f"os_{exc.__class__.__name__}"] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(one(n) for n in range(count)))
    return {
        "forged_inits": count,
        "addresses": addresses,
        "seconds": round(time.monotonic() - t0, 3),
        "answers": dict(results),
    }


# --- one peer link in its own process ----------------------------------------------------------


def site_configs(
    root: Path, kme: Any, port: int, auth: str = "psk"
) -> tuple[dict[str, Any], dict[str, Any]]:
    psk = root / "psk"
    if not psk.exists():
        fd = os.open(psk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(32))
        os.close(fd)
    out = []
    for i, (site, other, sae, peer_sae, k) in enumerate(
        (("site-a", "site-b", "sae-a", "sae-b", "A"), ("site-b", "site-a", "sae-b", "sae-a", "B"))
    ):
        cert, key = kme.sae(sae)
        out.append(
            {
                "gateway": {
                    "site_id": site,
                    "role": "initiator" if i == 0 else "responder",
                    "listen": f"127.0.0.1:{port}",
                    "peer": f"127.0.0.1:{port}",
                    "reconnect_max_seconds": 2.0,
                },
                "auth": (
                    {"mode": "psk", "psk_file": str(psk), "peer_name": other}
                    if auth == "psk"
                    else {
                        "mode": "pki",
                        "cert": str(root / "gw-pki" / f"{site}.crt"),
                        "key": str(root / "gw-pki" / f"{site}.key"),
                        "ca": str(root / "gw-pki" / "ca.crt"),
                        "peer_name": other,
                    }
                ),
                "qkd": {
                    "mode": "required",
                    "source": "etsi014",
                    "kme_url": kme.api_url(k),
                    "sae_id": sae,
                    "peer_sae_id": peer_sae,
                    "cert": str(cert),
                    "key": str(key),
                    "ca": str(kme.ca),
                },
                "mqtt": {
                    "broker": "mqtt://127.0.0.1:1883",
                    "client_id": f"qgw-{site}",
                    "rules": [{"pattern": "t/#", "direction": "both", "qos": 1}],
                },
                "metrics": {"listen": "127.0.0.1:0"},
            }
        )
    return out[0], out[1]


def _metric(body: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in body.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head != name and not head.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def st_role_debug() -> bool:
    return os.environ.get("FLOOD_BENCH_LOG") == "debug"


async def _peer_main(config_path: str) -> None:
    import logging

    from gateway.config import settings_from_dict
    from gateway.credentials import load_authenticator
    from gateway.crypto import get_provider
    from gateway.link import PeerLink
    from gateway.logs import setup_logging
    from gateway.metrics import Metrics
    from keysource import from_settings

    class _Counting(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines = 0

        def emit(self, record: logging.LogRecord) -> None:
            self.lines += 1

    if os.environ.get("FLOOD_BENCH_LOG"):  # debugging: the link's log on this process's stderr
        setup_logging("debug" if st_role_debug() else "info")
    else:
        setup_logging("warning", stream=open(os.devnull, "w"))  # noqa: SIM115 -- process lifetime
    counter = _Counting()
    logging.getLogger().addHandler(counter)
    d = json.loads(Path(config_path).read_text())
    st = settings_from_dict(d, base=Path(config_path).parent, environ={})
    provider = get_provider("pyca")
    metrics = Metrics(site_id=st.gateway.site_id)
    ks = from_settings(st.qkd)

    async def on_message(data: bytes, via: object) -> None:
        return None

    link = PeerLink(
        st,
        auth=load_authenticator(st, provider),
        provider=provider,
        keysource=ks,
        metrics=metrics,
        on_message=on_message,
    )
    task = asyncio.ensure_future(link.run())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    role_initiator = st.gateway.role.value == "initiator"
    while link.listen_port is None and not role_initiator:
        await asyncio.sleep(0.01)
    say({"event": "ready", "port": link.listen_port})
    try:
        while line := (await reader.readline()).decode().strip():
            body = metrics.render().decode()
            if line == "wait_up":
                ok = await link.wait_up(30)
                with contextlib.suppress(TimeoutError):  # counted once R's first record arrived
                    async with asyncio.timeout(10):
                        while role_initiator and link.status.handshakes == 0:
                            await asyncio.sleep(0.01)
                say({"event": "up", "ok": ok})
            elif line == "cut":  # initiator: break the TCP connection, time the resumption
                before_res = link.status.resumptions
                before_enc = _metric(body, "qgw_qkd_keys_total", role="enc")
                before_hs = link.status.handshakes
                cur = link._current
                t0 = time.monotonic()
                if cur is not None:
                    cur.transport.abort()
                ok = True
                try:
                    async with asyncio.timeout(30):
                        while link.status.resumptions == before_res:
                            await asyncio.sleep(0.005)
                except TimeoutError:
                    ok = False
                seconds = time.monotonic() - t0
                body = metrics.render().decode()
                say(
                    {
                        "event": "resumed" if ok else "not_resumed",
                        "seconds": round(seconds, 4),
                        "enc_keys": _metric(body, "qgw_qkd_keys_total", role="enc") - before_enc,
                        "bootstraps": link.status.handshakes - before_hs,
                    }
                )
            elif line == "stats":
                say(
                    {
                        "event": "stats",
                        "admissions": _metric(body, "qgw_admissions_total"),
                        "evictions": {
                            r: _metric(body, "qgw_admission_evictions_total", reason=r)
                            for r in ("pool_full", "pool_busy", "address_cap", "hello_deadline")
                        },
                        "refusals": _metric(body, "qgw_admission_refusals_total"),
                        "budget_refusals": _metric(body, "qgw_admission_budget_refusals_total"),
                        "dec_keys": _metric(body, "qgw_qkd_keys_total", role="dec"),
                        "enc_keys": _metric(body, "qgw_qkd_keys_total", role="enc"),
                        "kme_dec_calls": _metric(
                            body, "qgw_kme_request_seconds_count", operation="dec_keys"
                        ),
                        "resumed_ok": _metric(
                            body, "qgw_handshakes_total", reason="resumed", result="ok"
                        ),
                        "log_lines": counter.lines,
                        "summary_lines": link.closed_summary.lines,
                        "cpu_seconds": round(time.process_time(), 3),
                    }
                )
            elif line == "quit":
                break
    finally:
        await link.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ks.aclose()


class Peer:
    """A peer-link process driven over stdin/stdout JSON lines."""

    def __init__(self, config: dict[str, Any], root: Path, name: str) -> None:
        path = root / f"{name}.json"
        path.write_text(json.dumps(config))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "peer", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(root / f"{name}.err").open("w"),
            text=True,
            env=env,
        )
        self.ready = self.read(60)

    def read(self, timeout: float) -> dict[str, Any]:
        import selectors

        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError("peer process did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer process exited ({self.proc.poll()})")
        return dict(json.loads(line))

    def ask(self, command: str, timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("quit", 1)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def forge_phase(
    root: Path, kme_setup: Any, count: int = 500, addresses: int = 250
) -> dict[str, Any]:
    """pki pair with a live session; ``count`` forged bootstrap INITs from ``addresses`` sources."""
    from gateway.pki import write_gateway_pki

    write_gateway_pki(root, ["site-a", "site-b"])
    port = _free_port()
    da, db = site_configs(root, kme_setup, port, auth="pki")
    b = Peer(db, root, "b-pki")
    a = Peer(da, root, "a-pki")
    try:
        assert a.ask("wait_up")["ok"], "no pki session"
        before = b.ask("stats")
        t0 = time.monotonic()
        out = asyncio.run(forge("127.0.0.1", port, count, addresses))
        elapsed = time.monotonic() - t0
        after = b.ask("stats")
        res = a.ask("cut", 40)  # the real peer still resumes afterwards
        kme_calls = after["kme_dec_calls"] - before["kme_dec_calls"]
        sigs = out["answers"].get("resp_signed", 0)
        return {
            **out,
            "responder_dec_keys_calls": kme_calls,
            "responder_signatures": sigs,
            "kme_calls_per_forged_init": round(kme_calls / count, 4),
            "signatures_per_forged_init": round(sigs / count, 4),
            "budget_refusals": after["budget_refusals"] - before["budget_refusals"],
            "global_budget": {"burst": 10, "per_second": 2.0},
            "budget_bound_for_this_run": round(10 + 2.0 * elapsed, 1),
            "real_peer_resume_after": res,
        }
    finally:
        a.stop()
        b.stop()


def run_matrix(
    rates: tuple[int, ...], addresses: tuple[int, ...], flood_seconds: float, forge_count: int = 500
) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests.support.kme import start_kme, write_kme_setup

    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kme_setup = write_kme_setup(root / "kme")
        kme = start_kme(kme_setup, "both")
        port = _free_port()
        da, db = site_configs(root, kme_setup, port)
        b = Peer(db, root, "b")
        a = Peer(da, root, "a")
        try:
            assert a.ask("wait_up")["ok"], "no session before the flood"
            base = a.ask("cut")  # a resumption without a flood, for comparison
            points.append({"rate": 0, "addresses": 0, "resume": base, "flood": None})
            for n_addr in addresses:
                for rate in rates:
                    before = b.ask("stats")
                    gen = subprocess.Popen(
                        [
                            sys.executable,
                            str(Path(__file__).resolve()),
                            "flood",
                            "--port",
                            str(port),
                            "--rate",
                            str(rate),
                            "--duration",
                            str(flood_seconds),
                            "--addresses",
                            str(n_addr),
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    time.sleep(1.0)  # the flood is under way
                    res = a.ask("cut", 40)
                    out, _ = gen.communicate(timeout=flood_seconds + 30)
                    time.sleep(2.5)  # pending connections drain (HELLO deadline)
                    after = b.ask("stats")
                    delta = {
                        k: (
                            {r: after[k][r] - before[k][r] for r in after[k]}
                            if isinstance(after[k], dict)
                            else round(after[k] - before[k], 3)
                        )
                        for k in after
                        if k != "event"
                    }
                    points.append(
                        {
                            "rate": rate,
                            "addresses": n_addr,
                            "resume": res,
                            "flood": json.loads(out),
                            "responder": delta,
                        }
                    )
                    print(json.dumps(points[-1]), flush=True)
            final_a, final_b = a.ask("stats"), b.ask("stats")
        finally:
            a.stop()
            b.stop()
        try:
            forged = forge_phase(root, kme_setup) if forge_count else None
        finally:
            kme.stop()
    resumed = [p for p in points if p["rate"]]
    return {
        "what": "resumption of the real peer under a connection flood (issue 10)",
        "method": (
            "KME simulator (ETSI 014 over mTLS), responder and initiator peer links and the flood "
            "generator as separate processes on loopback; per point: flood for "
            f"{flood_seconds} s, cut A's TCP connection 1 s in, time until A's session is confirmed "
            "(B's first record of the new epoch); flood sources 127.0.1.x, real peer 127.0.0.1; "
            "qkd = required, psk auth. Shared 2-core machine: compare points of this run only."
        ),
        "machine": {"cpus": os.cpu_count(), "shared": True},
        "target": {"resume_seconds_max": 2.0, "qkd_keys_per_resumption": 3},
        "points": points,
        "forged_pki_inits": forged,
        "summary": {
            "max_resume_seconds": max((p["resume"]["seconds"] for p in resumed), default=None),
            "all_resumed": all(p["resume"]["event"] == "resumed" for p in resumed),
            "qkd_keys_per_resumption": sorted({p["resume"]["enc_keys"] for p in points}),
            "bootstraps_during_flood": sum(p["resume"]["bootstraps"] for p in resumed),
            "resumed_ok_counted": {
                "initiator": final_a["resumed_ok"],
                "responder": final_b["resumed_ok"],
            },
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd")
    f = sub.add_parser("flood", help="run the flood generator only")
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--rate", type=float, default=1000)
    f.add_argument("--duration", type=float, default=5)
    f.add_argument("--addresses", type=int, default=8)
    f.add_argument("--hold", type=float, default=3.0)
    p = sub.add_parser("peer", help="(internal) one peer link driven over stdin")
    p.add_argument("config")
    ap.add_argument("--quick", action="store_true", help="two points only")
    ap.add_argument("--flood-seconds", type=float, default=5.0)
    args = ap.parse_args()
    if args.cmd == "flood":
        print(
            json.dumps(
                flood(args.host, args.port, args.rate, args.duration, args.addresses, args.hold)
            )
        )
    elif args.cmd == "peer":
        asyncio.run(_peer_main(args.config))
    else:
        rates, addrs = ((500, 5000), (8,)) if args.quick else (RATES, ADDRESSES)
        result = run_matrix(rates, addrs, args.flood_seconds)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
