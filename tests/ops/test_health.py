from __future__ import annotations

import socket

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import ConfigError, GatewayError
from gateway.health import parse_listen, start_http
from gateway.metrics import Metrics

TIMEOUT = aiohttp.ClientTimeout(total=5)


def counter(body: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"{name}{labels} not in /metrics")


async def test_endpoints() -> None:
    m = Metrics(site_id="site-a", rules=["0"])
    state = {"ready": (False, "session down")}
    server = await start_http("127.0.0.1:0", m, lambda: state["ready"])
    try:
        assert server.port > 0
        async with aiohttp.ClientSession(server.url, timeout=TIMEOUT) as http:
            async with http.get("/healthz") as r:
                assert r.status == 200
                assert (await r.text()).strip() == "ok"

            async with http.get("/readyz") as r:
                assert r.status == 503
                assert "session down" in await r.text()
            state["ready"] = (True, "ok")
            async with http.get("/readyz") as r:
                assert r.status == 200

            async with http.get("/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                assert "version=" in r.headers["Content-Type"]
                before = await r.text()
            assert counter(before, "qgw_records_total", direction="sent") == 0

            m.handshake("ok")
            m.records("sent", 5, 500)
            m.message("0", "out", "forwarded")
            async with http.get("/metrics") as r:
                after = await r.text()
            assert counter(after, "qgw_handshakes_total", result="ok", reason="ok") == 1
            assert counter(after, "qgw_records_total", direction="sent") == 5
            assert counter(after, "qgw_bytes_total", direction="sent") == 500
            assert (
                counter(after, "qgw_messages_total", rule="0", direction="out", result="forwarded")
                == 1
            )

            async with http.get("/nope") as r:
                assert r.status == 404
            async with http.post("/metrics") as r:
                assert r.status == 405
    finally:
        await server.stop()


async def test_ready_check_that_raises_is_not_ready() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("secret-ish internals")

    server = await start_http("127.0.0.1:0", Metrics(), broken)
    try:
        async with (
            aiohttp.ClientSession(server.url, timeout=TIMEOUT) as http,
            http.get("/readyz") as r,
        ):
            assert r.status == 503
            text = await r.text()
            assert "secret-ish" not in text
    finally:
        await server.stop()


async def test_readiness_from_metrics_flips() -> None:
    m = Metrics()
    server = await start_http("127.0.0.1:0", m, lambda: m.readiness(240))
    try:
        async with aiohttp.ClientSession(server.url, timeout=TIMEOUT) as http:
            async with http.get("/readyz") as r:
                assert r.status == 503
            m.set_session("established", epoch=1)
            async with http.get("/readyz") as r:
                assert r.status == 200
            m.set_session("down")
            async with http.get("/readyz") as r:
                assert r.status == 503
    finally:
        await server.stop()


async def test_stop_releases_the_port() -> None:
    server = await start_http("127.0.0.1:0", Metrics(), lambda: (True, "ok"))
    port = server.port
    await server.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as http,
            http.get(f"http://127.0.0.1:{port}/healthz"),
        ):
            pass


async def test_two_servers_two_registries() -> None:
    a, b = Metrics(site_id="site-a"), Metrics(site_id="site-b")
    sa = await start_http("127.0.0.1:0", a, lambda: (True, "ok"))
    sb = await start_http("127.0.0.1:0", b, lambda: (True, "ok"))
    try:
        a.record_auth_failure()
        bodies = []
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            for s in (sa, sb):
                async with http.get(f"{s.url}/metrics") as r:
                    bodies.append(await r.text())
        assert counter(bodies[0], "qgw_record_auth_failures_total") == 1
        assert counter(bodies[1], "qgw_record_auth_failures_total") == 0
    finally:
        await sa.stop()
        await sb.stop()


async def test_bind_failure_is_a_gateway_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(GatewayError, match="cannot listen"):
            await start_http(f"127.0.0.1:{port}", Metrics(), lambda: (True, "ok"))


@pytest.mark.parametrize("bad", ["", "nohost", ":80", "h:99999", "h:x"])
def test_parse_listen_rejects(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(bad)


def test_parse_listen_v6() -> None:
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
