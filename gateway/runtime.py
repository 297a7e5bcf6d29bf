"""One gateway process: ``qgw run --config F``.

Wires the pieces: credentials -> core authenticator, key source (ETSI 014 client or static),
peer link (asyncio shell around the core), the secure transport (PUB/ACK over the link), the
MQTT bridge, metrics and health HTTP. Stops cleanly on SIGTERM/SIGINT: the bridge stops taking
messages and lets in-flight forwards finish, then the session is closed with an authenticated
CLOSE; whatever was not acknowledged stays at the broker for the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
from collections import Counter
from pathlib import Path

from gateway.bridge.bridge import Bridge
from gateway.config import QkdMode, Settings, load_settings, require_files
from gateway.credentials import load_authenticator
from gateway.crypto import get_provider
from gateway.errors import BrokerUnavailable
from gateway.health import HttpServer, start_http
from gateway.link import PeerLink
from gateway.logs import register_secret, setup_logging
from gateway.metrics import Metrics
from gateway.peer_transport import SecureTransport
from keysource import from_settings
from keysource.base import KeySource

log = logging.getLogger("qgw.run")

METRICS_SYNC_SECONDS = 1.0
# Young-generation threshold of the cyclic garbage collector (CPython's default is 700): the
# data path allocates a few short-lived objects per message, and every collection of the
# older generations walks the whole long-lived heap (crypto, config, asyncio). Measured in
# docs/bridge.md ("CPU per message").
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Freeze what start-up allocated (never collected again) and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


BROKER_RETRY_MAX_SECONDS = 10.0


class Gateway:
    """All parts of one gateway; ``await run(stop)`` until ``stop`` is set."""

    def __init__(self, settings: Settings) -> None:
        require_files(settings)
        self.settings = settings
        if settings.mqtt.password is not None:
            register_secret(settings.mqtt.password.get_secret_value())
        self.provider = get_provider(settings.crypto.provider)
        self.auth = load_authenticator(settings, self.provider)
        self.keysource: KeySource | None = (
            None if settings.qkd.mode is QkdMode.OFF else from_settings(settings.qkd)
        )
        self.metrics = Metrics(
            site_id=settings.gateway.site_id,
            rules=[str(i) for i in range(len(settings.mqtt.rules))],
        )
        self.metrics.set_qkd_mode(settings.qkd.mode.value)
        self.transport = SecureTransport(self._send, send_nowait=self._send_nowait)
        self.bridge = Bridge(settings.mqtt, settings.gateway.site_id, self.transport)
        self.transport.attach(self.bridge.deliver)
        self.transport.attach_nowait(self.bridge.deliver_nowait)
        self.link = PeerLink(
            settings,
            auth=self.auth,
            provider=self.provider,
            keysource=self.keysource,
            metrics=self.metrics,
            on_message=self.transport.on_payload,
            on_down=self.transport.link_down,
        )
        self.http: HttpServer | None = None
        self._seen: Counter[tuple[str, ...]] = Counter()  # last total copied, per counter

    async def _send(self, payload: bytes, via: object | None) -> None:
        await self.link.send(payload, via)

    def _send_nowait(self, payload: bytes, via: object | None) -> None:
        self.link.send_nowait(payload, via)

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        if s.metrics.listen:
            self.http = await start_http(s.metrics.listen, self.metrics, self.readiness)
            log.info("metrics and health on http://%s:%d/", self.http.host, self.http.port)
        link_task = asyncio.ensure_future(self._supervise_link(stop))
        sync_task = asyncio.ensure_future(self._sync_metrics_forever())
        bridge_task = asyncio.ensure_future(self._start_bridge(stop))
        try:
            await stop.wait()
        finally:
            log.info("stopping: finishing in-flight messages")
            bridge_task.cancel()
            with contextlib.suppress(Exception):
                await self.bridge.stop()
            await self.link.stop()
            for t in (link_task, sync_task):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await self.transport.aclose()
            self._sync_metrics()
            if self.http is not None:
                await self.http.stop()
            if self.keysource is not None:
                await self.keysource.aclose()
            log.info("stopped")

    def readiness(self) -> tuple[bool, str]:
        """Ready: a fresh session with the peer AND a connection to the local broker."""
        ok, why = self.link.readiness()
        if ok and not self.bridge.connected:
            return False, "not connected to the local broker"
        return ok, why

    async def _supervise_link(self, stop: asyncio.Event) -> None:
        """Run the peer link; if it ever fails (a bug), log it and start it again."""
        while not stop.is_set():
            try:
                await self.link.run()
            except Exception:
                log.exception("peer link failed; restarting it in 1 s")
                await asyncio.sleep(1.0)
            else:
                return

    async def _start_bridge(self, stop: asyncio.Event) -> None:
        """Connect to the local broker, retrying with back-off (the broker may start later)."""
        delay = 0.5
        while not stop.is_set():
            try:
                await self.bridge.start()
            except BrokerUnavailable as exc:
                log.warning(
                    "local broker %s unavailable (%s); retry in %.1f s",
                    self.settings.mqtt.broker,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(BROKER_RETRY_MAX_SECONDS, delay * 2)
            except Exception:
                log.exception("starting the MQTT bridge failed; retry in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(BROKER_RETRY_MAX_SECONDS, delay * 2)
            else:
                log.info("connected to the local broker %s", self.settings.mqtt.broker)
                return

    async def _sync_metrics_forever(self) -> None:
        while True:
            await asyncio.sleep(METRICS_SYNC_SECONDS)
            self._sync_metrics()

    def _delta(self, key: tuple[str, ...], total: int) -> int:
        """How much a cumulative counter grew since the last copy."""
        grown = total - self._seen[key]
        self._seen[key] = total
        return grown

    def _bump(self, key: tuple[str, str, str, str], total: int) -> None:
        rule, direction, result, reason = key
        self.metrics.message(rule, direction, result, reason or None, count=self._delta(key, total))

    def _sync_metrics(self) -> None:
        """Copy the bridge's cumulative counters into Prometheus counters (as deltas)."""
        c = self.bridge.counters
        for i, rc in enumerate(c.rules):
            rule = str(i)
            self._bump((rule, "out", "forwarded", ""), rc.messages_out)
            self._bump((rule, "in", "delivered", ""), rc.messages_in)
            for reason, n in rc.dropped.items():
                self._bump((rule, "out", "dropped", reason), n)
        self.metrics.set_inflight(c.inflight, self.settings.mqtt.inflight)
        t = self.transport
        events = {
            "forward_retry": sum(r.forward_retries for r in c.rules),
            "stale_retry": sum(r.stale_retries for r in c.rules),
            "stale_ack": c.stale_acks,
            "deliver_failure": c.deliver_failures + t.delivery_failures,
            "busy_refusal": t.busy_refusals,
            # bad bytes from the peer, and malformed packets from the local broker
            "decode_error": t.decode_errors + self.bridge.broker_protocol_errors,
            "internal_error": self.link.internal_errors,
        }
        for name, total in events.items():
            self.metrics.bridge_event(name, self._delta(("event", name), total))
        for reason, n in c.dropped.items():
            self._bump(("-", "in", "dropped", reason), n)


def cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    setup_logging(settings.logging.level, settings.logging.format)
    gw = Gateway(settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "qgw %s starting as %s (%s), peer %s, QKD %s",
            settings.gateway.site_id,
            settings.gateway.role.value,
            settings.crypto.suite.value,
            settings.auth.peer_name,
            settings.qkd.mode.value,
        )
        tune_gc()
        await gw.run(stop)

    asyncio.run(main())
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run one gateway",
        description="Run one gateway with the given config until SIGTERM/SIGINT.",
    )
    p.add_argument("--config", "-c", type=Path, required=True, help="path to the TOML config file")
    p.set_defaults(handler=cmd_run)
