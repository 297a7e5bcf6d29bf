"""Tunnel-only gateways (no topic rules, no broker) as two Gateway objects in this event loop:
the runtime wiring, readiness without a broker, a graceful stop resetting streams at the peer,
and the qgw_tunnel_* metrics page."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.runtime import Gateway
from gateway.status import render_text
from tests.runtime.helpers import free_port, settings, site_pair
from tests.support.sites import metric_value, parse_metrics

WAIT_SECONDS = 20.0


@dataclass
class Pair:
    a: Gateway
    b: Gateway
    port: int  # gateway A's "echo" listen port
    stop_a: asyncio.Event
    stop_b: asyncio.Event
    tasks: tuple[asyncio.Task[None], asyncio.Task[None]]


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await r.read(1 << 16):
            w.write(data)
            await w.drain()
        w.write_eof()
        await w.drain()
    w.close()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    eport = server.sockets[0].getsockname()[1]
    lport = free_port()
    a, b = site_pair(tmp_path)
    for d in (a, b):
        d["mqtt"]["rules"] = []  # tunnel only: no bridge, no broker needed
    a["tunnel"] = [{"name": "echo", "listen": f"127.0.0.1:{lport}"}]
    b["tunnel"] = [{"name": "echo", "connect": f"127.0.0.1:{eport}"}]
    ga, gb = Gateway(settings(a, tmp_path)), Gateway(settings(b, tmp_path))
    sa, sb = asyncio.Event(), asyncio.Event()
    tb = asyncio.ensure_future(gb.run(sb))
    ta = asyncio.ensure_future(ga.run(sa))
    try:
        assert await ga.link.wait_up(WAIT_SECONDS)
        assert await gb.link.wait_up(WAIT_SECONDS)
        yield Pair(ga, gb, lport, sa, sb, (ta, tb))
    finally:
        sa.set()
        sb.set()
        await asyncio.wait_for(asyncio.gather(ta, tb, return_exceptions=True), WAIT_SECONDS)
        server.close()
        await server.wait_closed()


async def roundtrip(port: int, data: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)

    async def write() -> None:
        for i in range(0, len(data), 1 << 16):
            w.write(data[i : i + (1 << 16)])
            await w.drain()
        w.write_eof()

    wt = asyncio.ensure_future(write())
    got = bytearray()
    while chunk := await asyncio.wait_for(r.read(1 << 20), WAIT_SECONDS):
        got += chunk
    await wt
    w.close()
    return bytes(got)


async def test_tunnel_only_gateways_are_ready_without_a_broker(pair: Pair) -> None:
    assert not pair.a.bridge_enabled
    assert pair.a.readiness() == (True, "ok")
    data = os.urandom(3 << 20)
    got = await roundtrip(pair.port, data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


async def test_metrics_page_has_the_tunnel_series(pair: Pair) -> None:
    await roundtrip(pair.port, b"m" * 5000)
    fams = parse_metrics(pair.a.metrics.render().decode())
    assert metric_value(fams, "qgw_tunnel_bytes_total", tunnel="echo", direction="sent") == 5000
    assert metric_value(fams, "qgw_tunnel_streams_total", tunnel="echo", event="opened") == 1
    assert metric_value(fams, "qgw_tunnel_streams_total", tunnel="echo", event="closed") == 1
    assert metric_value(fams, "qgw_tunnel_streams_active", tunnel="echo") == 0
    fams_b = parse_metrics(pair.b.metrics.render().decode())
    assert (
        metric_value(fams_b, "qgw_tunnel_bytes_total", tunnel="echo", direction="received") == 5000
    )


async def test_graceful_stop_resets_the_peers_streams(pair: Pair) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", pair.port)
    w.write(b"hello")
    assert await asyncio.wait_for(r.readexactly(5), WAIT_SECONDS) == b"hello"
    pair.stop_a.set()  # gateway A stops: its streams are reset "going away" at B too
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(r.readexactly(1), WAIT_SECONDS)
    w.close()
    await asyncio.wait_for(pair.tasks[0], WAIT_SECONDS)
    c = pair.b.tunnels.mux.counters["echo"]
    assert c.resets["going_away"] == 1
    assert not pair.b.tunnels.mux.streams


async def test_status_shows_the_tunnels(pair: Pair) -> None:
    await roundtrip(pair.port, b"s" * 1234)
    doc = pair.a.status_document()
    (t,) = doc["tunnels"]
    assert t["name"] == "echo"
    assert t["end"] == "listen"
    assert t["bytes_sent"] == 1234
    assert t["streams_opened"] == 1
    assert doc["broker"]["enabled"] is False
    text = render_text(doc)
    assert f"tunnel echo (listen 127.0.0.1:{pair.port}): 0 streams open, 1 opened" in text
    assert "broker: not used (tunnel only)" in text
    assert pair.b.status_document()["tunnels"][0]["end"] == "connect"
