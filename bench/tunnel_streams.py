"""Tunnel mode throughput: one stream's bulk rate with 64 KiB writes, and N concurrent streams'
fairness, through two real ``qgw run`` processes on loopback (PSK, static QKD keys).

    python bench/tunnel_streams.py [--mib 512] [--streams 100] [--stream-mib 8] [--out F.json]

(default output: bench/results/tunnel_streams.json)

The source writes with ``sendall`` of 64 KiB; gateway A's tunnel ``listen`` takes it, gateway
B dials the sink, which reads with 1 MiB ``recv`` calls and hashes nothing (pure transport).
The single-stream source is a thread of this process; the sink and the N concurrent sources run
on event loops (one thread each), so that they do not starve each other for the GIL. A
direct loopback copy (source -> sink, no gateways) is measured in the same run as the ceiling.
Numbers on a shared machine are noisy: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config import to_toml
from gateway.initdemo import free_ports
from keysource.static import write_seed_file

CHUNK = 64 * 1024


FIRST: dict[int, float] = {}  # sink connection -> time its first byte arrived


class _Sink(asyncio.BufferedProtocol):
    def __init__(self, idx: int, counts: dict[int, int], done: dict[int, float]) -> None:
        self.idx, self.counts, self.done = idx, counts, done
        self.buf = bytearray(1 << 20)
        self.n = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        if not self.n:
            FIRST[self.idx] = time.perf_counter()
        self.n += nbytes
        self.counts[self.idx] = self.n

    def eof_received(self) -> bool:
        self.done[self.idx] = time.perf_counter()
        return False  # close


def sink_server(counts: dict[int, int], done: dict[int, float]) -> tuple[Any, int]:
    """A counting sink on its own event loop thread (one thread: no GIL convoy of handlers)."""
    loop = asyncio.new_event_loop()
    ids = itertools.count()
    server = loop.run_until_complete(
        loop.create_server(lambda: _Sink(next(ids), counts, done), "127.0.0.1", 0, backlog=1024)
    )
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return (loop, server), server.sockets[0].getsockname()[1]


async def _async_source(port: int, nbytes: int) -> None:
    data = os.urandom(CHUNK)
    r, w = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    while sent < nbytes:
        w.write(data)
        sent += CHUNK
        await w.drain()
    w.write_eof()
    await r.read(1)  # the far end closes
    w.close()


async def _many_sources(port: int, n: int, nbytes: int) -> None:
    await asyncio.gather(*(_async_source(port, nbytes) for _ in range(n)))


def source(port: int, nbytes: int) -> None:
    data = os.urandom(CHUNK)
    with socket.create_connection(("127.0.0.1", port)) as s:
        sent = 0
        while sent < nbytes:
            s.sendall(data)
            sent += CHUNK
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # wait for the far end to close


def configs(root: Path, listen_port: int, sink_port: int) -> tuple[Path, Path, int, int]:
    root.mkdir(parents=True, exist_ok=True)
    psk = root / "psk"
    fd = os.open(psk, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    seed = root / "seed.toml"
    write_seed_file(seed)
    gw, ma, mb = free_ports(3)
    paths = []
    for i, site in enumerate(("a", "b")):
        d: dict[str, Any] = {
            "gateway": {
                "site_id": f"site-{site}",
                "role": "initiator" if i == 0 else "responder",
                "listen": f"127.0.0.1:{gw}",
                "peer": f"127.0.0.1:{gw}",
            },
            "auth": {"mode": "psk", "psk_file": str(psk), "peer_name": f"site-{'ba'[i]}"},
            "qkd": {
                "mode": "required",
                "source": "static",
                "static_file": str(seed),
                "sae_id": f"sae-{site}",
                "peer_sae_id": f"sae-{'ba'[i]}",
            },
            "metrics": {"listen": f"127.0.0.1:{(ma, mb)[i]}"},
            "logging": {"level": "warning"},
            "tunnel": [
                {"name": "bulk", "listen": f"127.0.0.1:{listen_port}"}
                if i == 0
                else {"name": "bulk", "connect": f"127.0.0.1:{sink_port}"}
            ],
        }
        p = root / f"site-{site}.toml"
        p.write_text(to_toml(d))
        paths.append(p)
    return paths[0], paths[1], ma, mb


def wait_established(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("gateways did not establish")


def profile_args(root: Path, name: str) -> list[str]:
    """With QGW_BENCH_PROFILE=1 each gateway runs under cProfile (root/NAME.prof)."""
    if os.environ.get("QGW_BENCH_PROFILE"):
        return ["-m", "cProfile", "-o", str(root / f"{name}.prof")]
    return []


def cpu_seconds(pid: int, user_only: bool = False) -> float:
    """User (+ system) CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + (0 if user_only else int(fields[12]))
    return ticks / os.sysconf("SC_CLK_TCK")


def run_one(port: int, nbytes: int, counts: dict[int, int], done: dict[int, float]) -> float:
    before = set(done)
    t0 = time.perf_counter()
    source(port, nbytes)
    deadline = time.monotonic() + 120
    while set(done) == before and time.monotonic() < deadline:
        time.sleep(0.001)
    (idx,) = set(done) - before
    assert counts[idx] == nbytes, (counts[idx], nbytes)
    return nbytes / (done[idx] - t0) / 1e6


def run_many(
    port: int, n: int, nbytes: int, counts: dict[int, int], done: dict[int, float]
) -> dict[str, Any]:
    before = set(done)
    t0 = time.perf_counter()
    runner = threading.Thread(target=asyncio.run, args=(_many_sources(port, n, nbytes),))
    runner.start()  # the sources on one event loop (threads would starve each other)
    # Fairness: every stream's progress at the moment the first one finishes.
    deadline = time.monotonic() + 300
    while not set(done) - before and time.monotonic() < deadline:
        time.sleep(0.002)
    snapshot = {i: c for i, c in counts.items() if i not in before}
    runner.join(300)
    mine = sorted(set(done) - before)
    progress = sorted(snapshot.get(i, 0) for i in mine)
    times = sorted(done[i] - t0 for i in mine)
    assert all(counts[i] == nbytes for i in mine)
    total = n * nbytes / (max(times)) / 1e6
    # Each stream's own rate, from its first byte to its last at the sink: "fair within 2x"
    # compares the fastest and the slowest of these.
    rates = sorted(nbytes / (done[i] - FIRST[i]) / 1e6 for i in mine)
    return {
        "streams": n,
        "bytes_per_stream": nbytes,
        "aggregate_mb_s": round(total, 1),
        "first_done_s": round(times[0], 3),
        "last_done_s": round(times[-1], 3),
        "per_stream_mb_s_min": round(nbytes / times[-1] / 1e6, 2),
        "per_stream_mb_s_max": round(nbytes / times[0] / 1e6, 2),
        "finish_last_over_first": round(times[-1] / times[0], 2),
        "stream_rate_mb_s_min": round(rates[0], 2),
        "stream_rate_mb_s_median": round(rates[len(rates) // 2], 2),
        "stream_rate_mb_s_max": round(rates[-1], 2),
        "fairness_max_over_min_rate": round(rates[-1] / rates[0], 2),
        # bytes delivered by the slowest and the fastest stream when the first one finished
        "progress_at_first_finish_min_over_max": round(progress[0] / max(progress[-1], 1), 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="bytes of the single-stream run (MiB)")
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--stream-mib", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tunnel_streams.json")
    args = ap.parse_args()
    counts: dict[int, int] = {}
    done: dict[int, float] = {}
    srv, sink_port = sink_server(counts, done)
    direct = run_one(sink_port, args.mib << 20, counts, done)
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"qgw-tunnel-bench-{os.getpid()}"
    (listen_port,) = free_ports(1)
    ca, cb, ma, _mb = configs(root, listen_port, sink_port)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                *profile_args(root, c.stem),
                "-m",
                "gateway",
                "run",
                "--config",
                str(c),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(root / f"{c.stem}.log").open("wb"),
        )
        for c in (cb, ca)
    ]
    try:
        wait_established(ma)
        time.sleep(0.5)
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        user0 = [cpu_seconds(p.pid, user_only=True) for p in procs]
        one = run_one(listen_port, args.mib << 20, counts, done)
        cpu1 = [cpu_seconds(p.pid) for p in procs]
        user1 = [cpu_seconds(p.pid, user_only=True) for p in procs]
        many = run_many(listen_port, args.streams, args.stream_mib << 20, counts, done)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        loop, server = srv
        loop.call_soon_threadsafe(server.close)
    result = {
        "note": "loopback, 2 cores shared with other work (noisy); compare rows of one run only",
        "direct_loopback_mb_s": round(direct, 1),
        "one_stream_64k_writes_mb_s": round(one, 1),
        "one_stream_bytes": args.mib << 20,
        # MB per CPU-second of each gateway process during the single-stream run: what one
        # gateway could carry on a free core (less sensitive to the other load on the machine).
        "one_stream_mb_per_cpu_s": {
            name: round((args.mib << 20) / max(c1 - c0, 1e-9) / 1e6, 1)
            for name, c0, c1 in zip(("gateway_b", "gateway_a"), cpu0, cpu1, strict=True)
        },
        "one_stream_user_cpu_share": {
            name: round((u1 - u0) / max(c1 - c0, 1e-9), 2)
            for name, u0, u1, c0, c1 in zip(
                ("gateway_b", "gateway_a"), user0, user1, cpu0, cpu1, strict=True
            )
        },
        "concurrent": many,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
