"""One gateway process: ``qgw run --config F``.

Wires the pieces: credentials -> core authenticator, key source (ETSI 014 client or static),
peer link (asyncio shell around the core), the secure transport (PUB/ACK over the link), the
MQTT bridge, the tunnel streams (``[[tunnel]]``; payload kinds 0x10-0x1F are routed to them,
the rest to the bridge transport), metrics and health HTTP. Stops cleanly on SIGTERM/SIGINT: the bridge stops taking
messages and lets in-flight forwards finish, then the session is closed with an authenticated
CLOSE; whatever was not acknowledged stays at the broker for the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import logging
import signal
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from gateway import sdnotify
from gateway.bridge.bridge import Bridge
from gateway.bridge.queue_check import queue_limit_warnings
from gateway.config import QkdMode, Role, Settings, load_settings, require_files, rule_label
from gateway.core.connection import Alarm
from gateway.credentials import kme_certificate_not_after, kme_tls_context, load_credentials
from gateway.crypto import get_provider
from gateway.crypto.x509 import OwnCertificate
from gateway.errors import BrokerUnavailable, ConfigError, KeySourceError, ProviderUnavailable
from gateway.health import HttpServer, start_http
from gateway.link import PeerLink
from gateway.logs import register_secret, setup_logging
from gateway.metrics import Metrics, kme_error_kind
from gateway.peer_transport import SecureTransport
from gateway.status import LinkView
from gateway.status import collect as collect_status
from gateway.tunnel.messages import is_tunnel_payload
from gateway.tunnel.sockets import TunnelService
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


KME_STATUS_SECONDS = 30.0
#: Raised when the local broker came back without our persistent session (issue 18).
BROKER_SESSION_ALARM = "broker-session-lost"
BROKER_SESSION_DETAIL = (
    "the local broker came back without our persistent session (session present = 0): "
    "messages published while we were disconnected may have been dropped"
)
#: How long the broker-session-lost alarm stays raised after the broker lost our session.
BROKER_SESSION_ALARM_SECONDS = 600.0
BROKER_RETRY_MAX_SECONDS = 10.0


class Gateway:
    """All parts of one gateway; ``await run(stop)`` until ``stop`` is set."""

    def __init__(self, settings: Settings) -> None:
        require_files(settings)
        self.settings = settings
        if settings.mqtt.password is not None:
            register_secret(settings.mqtt.password.get_secret_value())
        try:
            self.provider = get_provider(settings.crypto.provider)
        except ProviderUnavailable as exc:  # a configuration problem: restarting cannot fix it
            raise ConfigError([("crypto.provider", str(exc))]) from None
        self.auth, own_cert = load_credentials(settings, self.provider)
        kme_tls_context(settings)  # file and TLS problems become ConfigError (exit 2), named
        self.keysource: KeySource | None = (
            None if settings.qkd.mode is QkdMode.OFF else from_settings(settings.qkd)
        )
        self.rule_labels = [rule_label(r) for r in settings.mqtt.rules]
        self.metrics = Metrics(site_id=settings.gateway.site_id, rules=self.rule_labels)
        self.metrics.set_qkd_mode(settings.qkd.mode.value)
        g = settings.gateway
        self.metrics.set_peer(
            settings.auth.peer_name, g.peer if g.role.value == "initiator" else ""
        )
        self.certificates: dict[str, float] = {}
        self._set_certificates(own_cert, kme_certificate_not_after(settings))
        self.transport = SecureTransport(self._send, send_nowait=self._send_nowait)
        self.bridge = Bridge(settings.mqtt, settings.gateway.site_id, self.transport)
        self.transport.attach(self.bridge.deliver)
        self.transport.attach_nowait(self.bridge.deliver_nowait)
        # Tunnel mode ([[tunnel]]): always present, so that an OPEN for a name this gateway
        # does not serve is refused and counted even when it has no tunnels at all.
        self.tunnels = TunnelService(
            settings.tunnel,
            initiator=settings.gateway.role is Role.INITIATOR,
            send=self._send,
            is_up=self._link_is_up,
            send_nowait=self._send_nowait,
            can_send_now=self._link_can_send_now,
        )
        self.metrics.attach_tunnels(self.tunnels.report)
        # The MQTT bridge runs when rules are configured, or when there is nothing else to do.
        self.bridge_enabled = bool(settings.mqtt.rules) or not settings.tunnel
        self.link = PeerLink(
            settings,
            auth=self.auth,
            provider=self.provider,
            keysource=self.keysource,
            metrics=self.metrics,
            on_message=self._route,
            on_down=self._link_down,
        )
        self.http: HttpServer | None = None
        self._seen: Counter[tuple[str, ...]] = Counter()
        self._session_lost_at: float | None = None  # monotonic time of the last lost session

    async def _send(self, payload: bytes, via: object | None) -> None:
        await self.link.send(payload, via)

    def _send_nowait(self, payload: bytes, via: object | None) -> None:
        self.link.send_nowait(payload, via)

    def _link_is_up(self) -> bool:
        return self.link.is_up()

    def _link_can_send_now(self) -> bool:
        return self.link.can_send_now()

    def _route(self, payload: bytes, via: object) -> Awaitable[None] | None:
        """Route one application payload by its kind byte: 0x10-0x1F to the tunnel streams,
        everything else (the bridge's 0x01-0x0F) to the bridge transport. Tunnel payloads and
        the bridge's batches are handled at once; a single PUB returns its awaitable."""
        if is_tunnel_payload(payload):
            self.tunnels.on_payload(payload, via)
            return None
        if self.transport.handle_now(payload, via):
            return None
        return self.transport.on_payload(payload, via)

    def _link_down(self) -> None:
        self.transport.link_down()
        self.tunnels.link_down()

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        if self.bridge_enabled:
            for warning in queue_limit_warnings(s.mqtt):  # also in `qgw check-config`
                log.warning("%s", warning)
        if s.metrics.listen:
            self.http = await start_http(
                s.metrics.listen, self.metrics, self.readiness, self.status_document
            )
            log.info("metrics and health on http://%s:%d/", self.http.host, self.http.port)
        try:
            await self.tunnels.start()
        except OSError as exc:
            await self.tunnels.stop()
            if self.http is not None:
                await self.http.stop()
            raise ConfigError(
                [("tunnel", f"cannot listen for a tunnel: {exc.strerror or exc}")]
            ) from exc
        link_task = asyncio.ensure_future(self._supervise_link(stop))
        sync_task = asyncio.ensure_future(self._sync_metrics_forever())
        kme_task = asyncio.ensure_future(self._poll_kme_forever())
        sdnotify.notify("READY=1")  # started (listening, connecting); /readyz tells "session up"
        bridge_task = asyncio.ensure_future(
            self._start_bridge(stop) if self.bridge_enabled else asyncio.sleep(0)
        )
        try:
            await stop.wait()
        finally:
            sdnotify.notify("STOPPING=1")
            log.info("stopping: finishing in-flight messages")
            bridge_task.cancel()
            with contextlib.suppress(Exception):
                await self.bridge.stop()
            with contextlib.suppress(Exception):
                await self.tunnels.stop()  # streams reset (going away) before the CLOSE
            await self.link.stop()
            for t in (link_task, sync_task, kme_task):
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

    def status_document(self) -> dict[str, Any]:
        """What ``GET /status`` serves (``qgw status``): no key material."""
        st = self.link.status
        view = LinkView(**{f: getattr(st, f) for f in LinkView.__slots__})
        return collect_status(
            self.settings,
            self.metrics,
            view,
            certificates=self.certificates,
            tunnels=self.tunnels.status(),
            bridge_enabled=self.bridge_enabled,
            broker_queue=self.bridge.broker_queue() if self.bridge_enabled else None,
        )

    async def _poll_kme_forever(self) -> None:
        """Ask the KME for its key supply (ETSI 014 status) now and then, for metrics/status."""
        ks = self.keysource
        if ks is None:
            return
        while True:
            t0 = time.monotonic()
            try:
                st = await ks.status(self.settings.qkd.peer_sae_id)
            except (KeySourceError, OSError, TimeoutError) as exc:  # counted by kind
                self.metrics.kme_request("status", time.monotonic() - t0, kme_error_kind(exc))
                if self.metrics.kme_reachable is not False:
                    log.warning(
                        "KME %s status failed: %s",
                        self.settings.qkd.kme_url,
                        exc.__class__.__name__,
                    )
                self.metrics.set_kme_status(None)
            else:
                self.metrics.kme_request("status", time.monotonic() - t0)
                self.metrics.set_kme_status(st.stored_key_count)
            await asyncio.sleep(KME_STATUS_SECONDS)

    def readiness(self) -> tuple[bool, str]:
        """Ready: a fresh session with the peer AND a connection to the local broker."""
        ok, why = self.link.readiness()
        if ok and self.bridge_enabled and not self.bridge.connected:
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
        self.metrics.set_broker_connected(self.bridge.connected)
        queue = self.bridge.broker_queue()
        self.metrics.set_broker_queue(
            None if queue is None else queue["stored_messages"],
            None if queue is None else queue["dropped_messages"],
        )
        lost = self._delta(("broker", "sessions_lost"), self.bridge.broker_sessions_lost)
        if lost:
            self.metrics.broker_session_lost(lost)
            self._session_lost_at = time.monotonic()
            self.link.report_alarm(Alarm(BROKER_SESSION_ALARM, BROKER_SESSION_DETAIL))
        elif (
            self._session_lost_at is not None
            and time.monotonic() - self._session_lost_at > BROKER_SESSION_ALARM_SECONDS
        ):
            self._session_lost_at = None
            self.link.report_alarm(
                Alarm(BROKER_SESSION_ALARM, "no further session loss for 10 minutes", active=False)
            )
        for i, rc in enumerate(c.rules):
            rule = self.rule_labels[i]
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
            "redelivery": self.bridge.broker_redeliveries,
        }
        for name, total in events.items():
            self.metrics.bridge_event(name, self._delta(("event", name), total))
        for reason, n in c.dropped.items():
            self._bump(("-", "in", "dropped", reason), n)

    def _set_certificates(
        self, own: OwnCertificate | None, kme_not_after: datetime.datetime | None
    ) -> None:
        """Expiry of the certificates in use, for /status and the expiry gauge."""
        self.certificates = {}
        if own is not None:
            self.certificates["bootstrap"] = own.not_after.timestamp()
        if kme_not_after is not None:
            self.certificates["kme_client"] = kme_not_after.timestamp()
        for name, t in self.certificates.items():
            self.metrics.set_certificate_expiry(name, t)

    # -- reload (SIGHUP) -------------------------------------------------------------------

    def reload(self, path: Path) -> bool:
        """Reload credentials and the log level from ``path``; keep everything on failure.

        New certificates, keys and PSKs apply at the next bootstrap: the live session keeps its
        keys and is QKD-authenticated from here on, so it never needs the bootstrap credential
        again. Any other changed key needs a restart; it is named in the log and not applied.
        """
        try:
            new = load_settings(path)
            auth, own_cert = load_credentials(new, self.provider)
            kme_not_after = kme_certificate_not_after(new)
        except ConfigError as exc:
            why = "; ".join(f"{k}: {m}" if k else m for k, m in exc.problems)
            log.error(  # noqa: TRY400 -- the reasons are in the message; no traceback
                "reload of %s failed, keeping the running configuration: %s", path, why
            )
            self.metrics.config_reload("failed")
            return False
        old = self.settings
        pending = restart_only_changes(old, new)
        self.link.auth = auth
        self.auth = auth
        self._set_certificates(own_cert, kme_not_after)
        logging.getLogger().setLevel(new.logging.level.upper())
        self.settings = old.model_copy(update={"auth": new.auth, "logging": new.logging})
        self.metrics.config_reload("ok")
        log.warning(
            "reloaded %s: %s credentials apply at the next bootstrap (the live session, epoch "
            "%d, continues on its QKD-authenticated keys); log level %s%s",
            path,
            new.auth.mode.value,
            self.metrics.session_epoch,
            new.logging.level,
            f"; NOT applied until restart: {', '.join(pending)}" if pending else "",
        )
        return True


def restart_only_changes(old: Settings, new: Settings) -> list[str]:
    """Dotted keys that differ between ``old`` and ``new`` and that a reload does not apply."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    changed: list[str] = []
    for section in a:
        if a[section] == b[section]:
            continue
        for key in sorted(set(a[section]) | set(b[section])):
            if a[section].get(key) != b[section].get(key):
                dotted = f"{section}.{key}"
                if dotted not in RELOADABLE:
                    changed.append(dotted)
    return changed


#: What SIGHUP applies (file *contents* are re-read even when the paths are the same).
RELOADABLE = frozenset(
    {
        "auth.cert",
        "auth.key",
        "auth.ca",
        "auth.psk_file",
        # wot: introducers, thresholds and the revocation list are re-read with the key
        "auth.endorsements",
        "auth.introducers",
        "auth.full_needed",
        "auth.marginals_needed",
        "auth.revoked",
        "logging.level",
        # read by check-config only (the broker's queue sizing): nothing to apply
        "mqtt.outage_tolerance_seconds",
        "mqtt.expected_rate",
        "mqtt.broker_max_queued_messages",
        "mqtt.broker_config",
    }
)


def cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    setup_logging(settings.logging.level, settings.logging.format)
    gw = Gateway(settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def on_hup() -> None:
            sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            log.info("SIGHUP: reloading %s", args.config)
            gw.reload(args.config)
            sdnotify.notify("READY=1")

        loop.add_signal_handler(signal.SIGHUP, on_hup)
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
