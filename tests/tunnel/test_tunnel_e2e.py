"""Tunnel mode end to end: two real gateways (``qgw run``), the KME simulator over mTLS, real
mosquitto brokers (the MQTT bridge runs beside the tunnels), and TCP servers/clients in this
process on loopback with OS-chosen ports.

Site A (qgw initiator) listens for "echo", "half", "slow", "refused" and "ghost"; site B (the
responder) dials the local servers for the first four and has no "ghost". Site B listens for
"back", which site A dials: either gateway can hold either end.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.initdemo import free_ports
from gateway.tunnel.mux import DEFAULT_WINDOW
from gateway.tunnel.sockets import WRITE_HIGH_WATER
from tests.support.mosquitto import require_mosquitto
from tests.support.sites import TwoSites, wait_until
from tests.tunnel.tcp import (
    IO_TIMEOUT_SECONDS,
    Server,
    blob,
    connect,
    echo,
    exchange,
    keep_talking,
    recv_all,
    send_and_read,
)

pytestmark = pytest.mark.integration

REKEY_SECONDS = "2"  # rekeys happen all through these tests


class Slow:
    """A destination that accepts and does not read until released, then hashes everything."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.digests: list[str] = []
        self.server = Server(self.handle)

    def handle(self, conn: socket.socket) -> None:
        assert self.release.wait(120), "never released"
        self.digests.append(hashlib.sha256(recv_all(conn)).hexdigest())


def half_server(conn: socket.socket) -> None:
    """Reads to EOF first, then answers with what it got (reversed) and closes: the client's
    half-close must reach here while the answer direction stays open."""
    data = recv_all(conn)
    conn.sendall(b"got:" + hashlib.sha256(data).hexdigest().encode())
    conn.shutdown(socket.SHUT_WR)


class SpeaksFirst:
    """Sends a greeting and half-closes first; then reads the client's bytes to EOF and keeps
    their digest: the server -> client direction ends while client -> server goes on."""

    def __init__(self) -> None:
        self.digests: list[str] = []
        self.server = Server(self.handle)

    def handle(self, conn: socket.socket) -> None:
        conn.sendall(b"hello, then goodbye")
        conn.shutdown(socket.SHUT_WR)
        self.digests.append(hashlib.sha256(recv_all(conn)).hexdigest())


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_mosquitto()
    root: Path = tmp_path_factory.mktemp("tunnel")
    echo_srv = Server(echo)
    half_srv = Server(half_server)
    first = SpeaksFirst()
    slow = Slow()
    dead = socket.create_server(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens here: connects are refused
    names = ("echo", "half", "first", "slow", "refused", "ghost")
    pa = dict(zip(names, free_ports(len(names)), strict=True))
    (pb_back,) = free_ports(1)
    s = TwoSites(root, env={"QGW_REKEY__INTERVAL_SECONDS": REKEY_SECONDS})

    def site_a(d: dict[str, Any]) -> None:
        d["tunnel"] = [{"name": n, "listen": f"127.0.0.1:{p}"} for n, p in pa.items()] + [
            {"name": "back", "connect": f"127.0.0.1:{echo_srv.port}"}
        ]

    def site_b(d: dict[str, Any]) -> None:
        d["tunnel"] = [
            {"name": "echo", "connect": f"127.0.0.1:{echo_srv.port}"},
            {"name": "half", "connect": f"127.0.0.1:{half_srv.port}"},
            {"name": "first", "connect": f"127.0.0.1:{first.server.port}"},
            {"name": "slow", "connect": f"127.0.0.1:{slow.server.port}"},
            {"name": "refused", "connect": f"127.0.0.1:{dead_port}"},
            {"name": "back", "listen": f"127.0.0.1:{pb_back}"},
        ]

    s.edit_site("a", site_a)
    s.edit_site("b", site_b)
    try:
        s.start()
        yield {
            "s": s,
            "a": pa,
            "b": {"back": pb_back},
            "slow": slow,
            "first": first,
            "echo": echo_srv,
        }
    finally:
        slow.release.set()
        s.close()
        for srv in (echo_srv, half_srv, first.server, slow.server):
            srv.close()


def test_large_transfer_with_checksum(sites: dict[str, Any]) -> None:
    data = blob(24 << 20, seed=1)
    got = exchange(sites["a"]["echo"], data)
    assert len(got) == len(data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_many_concurrent_streams(sites: dict[str, Any]) -> None:
    n = 60
    blobs = [blob(300_000 + i * 997, seed=100 + i) for i in range(n)]
    results: list[bytes | None] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = exchange(sites["a"]["echo"], blobs[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(IO_TIMEOUT_SECONDS * 2)
    assert not errors
    for i in range(n):
        assert results[i] == blobs[i], f"stream {i} differs"
    s: TwoSites = sites["s"]
    assert s.metric("a", "qgw_tunnel_streams_total", tunnel="echo", event="opened") >= n
    s.wait_metric("a", "qgw_tunnel_streams_active", lambda v: v == 0, tunnel="echo")


def test_either_gateway_holds_either_end(sites: dict[str, Any]) -> None:
    data = blob(3 << 20, seed=2)
    assert exchange(sites["b"]["back"], data) == data  # B listens, A dials
    s: TwoSites = sites["s"]
    assert s.metric("b", "qgw_tunnel_bytes_total", tunnel="back", direction="sent") >= len(data)
    assert s.metric("a", "qgw_tunnel_bytes_total", tunnel="back", direction="received") >= len(data)


def test_half_close_both_directions(sites: dict[str, Any]) -> None:
    data = blob(2 << 20, seed=3)
    with connect(sites["a"]["half"]) as c:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)  # client -> server closed; the answer must still come
        answer = recv_all(c)  # ... and ends with the server's own half-close
    assert answer == b"got:" + hashlib.sha256(data).hexdigest().encode()
    # The other way round: the far server half-closes first; the client reads that end of
    # file and only then sends its own bytes, which must still arrive in full.
    first: SpeaksFirst = sites["first"]
    with connect(sites["a"]["first"]) as c:
        assert recv_all(c) == b"hello, then goodbye"  # the server's FIN arrived as EOF
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b""
    wait_until(lambda: len(first.digests) == 1, 30, "the server to read to EOF")
    assert first.digests[0] == hashlib.sha256(data).hexdigest()
    s: TwoSites = sites["s"]
    for name in ("half", "first"):
        s.wait_metric("a", "qgw_tunnel_streams_active", lambda v: v == 0, tunnel=name)
        assert s.metric("a", "qgw_tunnel_resets_total", tunnel=name) == 0


def test_far_end_refusing(sites: dict[str, Any]) -> None:
    s: TwoSites = sites["s"]
    # The refusal reaches the client as a TCP reset, never as a clean end of file.
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        send_and_read(sites["a"]["refused"], b"anyone?")
    s.wait_metric(
        "b",
        "qgw_tunnel_refusals_total",
        lambda v: v >= 1,
        tunnel="refused",
        reason="connect_failed",
    )
    s.wait_metric(
        "a",
        "qgw_tunnel_refusals_total",
        lambda v: v >= 1,
        tunnel="refused",
        reason="connect_failed",
    )


def test_unknown_tunnel_name_refused_and_counted(sites: dict[str, Any]) -> None:
    s: TwoSites = sites["s"]
    with pytest.raises((ConnectionResetError, BrokenPipeError)):  # a reset, not a clean EOF
        send_and_read(sites["a"]["ghost"], b"hello?")
    s.wait_metric(
        "b",
        "qgw_tunnel_refusals_total",
        lambda v: v >= 1,
        tunnel="-unknown-",
        reason="unknown_tunnel",
    )
    assert s.metric("a", "qgw_tunnel_refusals_total", tunnel="ghost", reason="unknown_tunnel") >= 1
    assert "ghost" not in {
        smp.labels.get("tunnel")
        for fam in s.scrape("b").values()
        for smp in fam.samples
        if smp.name.startswith("qgw_tunnel_")
    }


def test_slow_reader_memory_stays_bounded(sites: dict[str, Any]) -> None:
    s: TwoSites = sites["s"]
    slow: Slow = sites["slow"]
    total = 96 << 20  # far more than every buffer on the path together
    data = blob(total, seed=4)
    sent = [0]
    stalls0 = s.metric("a", "qgw_tunnel_window_stalls_total", tunnel="slow")
    c = connect(sites["a"]["slow"])

    def write() -> None:
        view = memoryview(data)
        while sent[0] < total:
            sent[0] += c.send(view[sent[0] : sent[0] + (1 << 16)])
        c.shutdown(socket.SHUT_WR)

    w = threading.Thread(target=write, daemon=True)
    w.start()
    try:
        s.wait_metric(
            "a", "qgw_tunnel_window_stalls_total", lambda v: v > stalls0, timeout=30, tunnel="slow"
        )
        bound = DEFAULT_WINDOW + WRITE_HIGH_WATER + DEFAULT_WINDOW // 4
        for _ in range(10):  # while stalled, on both gateways
            held_b = s.metric("b", "qgw_tunnel_buffered_bytes", tunnel="slow")
            held_a = s.metric("a", "qgw_tunnel_buffered_bytes", tunnel="slow")
            queue_a = s.metric("a", "qgw_tunnel_send_queue_bytes")
            assert held_b <= bound, held_b
            assert held_a <= bound, held_a
            assert queue_a <= DEFAULT_WINDOW + 64 * 1024, queue_a
        assert sent[0] < total, "the writer was never held back"
    finally:
        slow.release.set()
    w.join(IO_TIMEOUT_SECONDS * 2)
    c.close()
    wait_until(lambda: len(slow.digests) == 1, 60, "the slow reader to finish")
    assert slow.digests[0] == hashlib.sha256(data).hexdigest()


def test_streams_survive_rekeys(sites: dict[str, Any]) -> None:
    s: TwoSites = sites["s"]
    start = s.metric("a", "qgw_rekeys_total", result="ok")
    chunk = blob(1 << 20, seed=5)
    rounds = 0
    with connect(sites["a"]["echo"]) as c:
        deadline_rounds = 2000
        while s.metric("a", "qgw_rekeys_total", result="ok") < start + 2:
            c.sendall(chunk)
            assert recv_all(c, len(chunk)) == chunk
            rounds += 1
            assert rounds < deadline_rounds, "no two rekeys while the stream was open"
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b""
    assert s.metric("a", "qgw_tunnel_resets_total", tunnel="echo") == 0


def test_metrics_per_tunnel(sites: dict[str, Any]) -> None:
    s: TwoSites = sites["s"]
    data = b"x" * 100_000
    before = s.metric("a", "qgw_tunnel_bytes_total", tunnel="echo", direction="sent")
    before_half = s.metric("a", "qgw_tunnel_bytes_total", tunnel="half", direction="sent")
    assert exchange(sites["a"]["echo"], data) == data
    after = s.metric("a", "qgw_tunnel_bytes_total", tunnel="echo", direction="sent")
    assert after - before == len(data)
    assert s.metric("a", "qgw_tunnel_bytes_total", tunnel="half", direction="sent") == before_half
    assert s.metric("b", "qgw_tunnel_bytes_total", tunnel="echo", direction="received") >= after
    assert s.metric("a", "qgw_tunnel_errors_total", kind="protocol") == 0
    assert s.metric("b", "qgw_tunnel_errors_total", kind="decode") == 0


def test_link_cut_resets_streams_cleanly_and_new_streams_work(sites: dict[str, Any]) -> None:
    """Last in this module: SIGKILL gateway B mid-stream. Records lost with the connection are
    not retransmitted, so streams cannot resume: the client sees a reset (TS14), the reset is
    counted, and after B is back a new stream carries data again."""
    s: TwoSites = sites["s"]
    c = connect(sites["a"]["echo"])
    c.sendall(b"before the cut")
    assert recv_all(c, 14) == b"before the cut"
    s.kill_gateway("b")
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        keep_talking(c)  # the reset arrives once gateway A notices the lost connection
    c.close()
    s.wait_metric(
        "a", "qgw_tunnel_resets_total", lambda v: v >= 1, tunnel="echo", reason="link_down"
    )
    s.wait_metric("a", "qgw_tunnel_streams_active", lambda v: v == 0, tunnel="echo")
    s.start_gateway("b")
    s.wait_established()
    data = blob(1 << 20, seed=6)
    assert exchange(sites["a"]["echo"], data) == data
