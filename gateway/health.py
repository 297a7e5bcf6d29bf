"""Health and metrics over HTTP (aiohttp): ``/healthz``, ``/readyz``, ``/metrics``.

- ``/healthz``: 200 ``ok`` while the process (its event loop) runs.
- ``/readyz``: 200 ``ok`` when the ``ready()`` callable says so (session established and keys
  fresh), else 503 with its reason. A ``ready()`` that raises counts as not ready.
- ``/metrics``: the Prometheus text exposition of the gateway's :class:`~gateway.metrics.Metrics`.
- ``/status``: the JSON document ``qgw status`` prints (gateway.status; no key material).

Bind it to a management address (default ``127.0.0.1:9464``): it carries no secrets but tells
an observer the gateway's state. ``listen`` may use port 0 (tests); :attr:`HttpServer.port` is
the port actually bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.errors import ConfigError, GatewayError
from gateway.metrics import CONTENT_TYPE, Metrics

__all__ = ["HttpServer", "ReadyCheck", "StatusSource", "parse_listen", "start_http"]

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], tuple[bool, str]]
StatusSource = Callable[[], dict[str, Any]]

_METRICS_KEY = web.AppKey("metrics", Metrics)
_READY_KEY: web.AppKey[ReadyCheck] = web.AppKey("ready")
_STATUS_KEY: web.AppKey[StatusSource] = web.AppKey("status")


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` allowed) into host and port; raise ConfigError."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError([("metrics.listen", f"must be HOST:PORT, got {listen!r}")])
    return host, int(port)


async def _healthz(request: web.Request) -> web.Response:
    del request
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    check = request.app[_READY_KEY]
    try:
        ok, reason = check()
    except Exception:  # a broken check must not crash the server; it means "not ready"
        log.exception("readiness check raised")
        ok, reason = False, "readiness check failed"
    if ok:
        return web.Response(text="ok\n")
    return web.Response(status=503, text=f"not ready: {reason}\n")


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[_METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _status(request: web.Request) -> web.Response:
    try:
        doc = request.app[_STATUS_KEY]()
    except Exception:  # a bug in the status collector must not take the server down
        log.exception("status collection raised")
        return web.json_response({"error": "status collection failed"}, status=500)
    return web.json_response(doc)


def make_app(
    metrics: Metrics, ready: ReadyCheck, status: StatusSource | None = None
) -> web.Application:
    """The aiohttp application (exposed for embedding; :func:`start_http` is the usual entry)."""
    app = web.Application()
    app[_METRICS_KEY] = metrics
    app[_READY_KEY] = ready
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    if status is not None:
        app[_STATUS_KEY] = status
        app.router.add_get("/status", _status)
    return app


class HttpServer:
    """A running health/metrics server. Stop it with :meth:`stop`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening and close open connections (idempotent)."""
        await self._runner.cleanup()

    def __repr__(self) -> str:
        return f"HttpServer({self.url})"


async def start_http(
    listen: str, metrics: Metrics, ready: ReadyCheck, status: StatusSource | None = None
) -> HttpServer:
    """Serve ``/healthz``, ``/readyz`` and ``/metrics`` on ``listen`` (``HOST:PORT``, port 0 ok).

    Raises ConfigError for a malformed address and GatewayError if it cannot be bound.
    """
    host, port = parse_listen(listen)
    runner = web.AppRunner(
        make_app(metrics, ready, status),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise GatewayError(f"metrics: cannot listen on {listen}: {exc.strerror}") from exc
    bound = port
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            bound = int(addr[1])
            break
    log.info("health and metrics on http://%s:%d", host, bound)
    return HttpServer(runner, host, bound)
