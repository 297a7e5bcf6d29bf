"""``qgw status``: one gateway's state, like ``wg show`` or ``swanctl --list-sas``.

The running gateway serves the document at ``GET /status`` on its metrics listener
(:func:`collect` builds it); ``qgw status`` fetches it and prints it as text or JSON. The
document names peers, epochs, key IDs *counts*, times and reasons — never key material, so it
is safe on the same management address as ``/metrics``.

Exit codes of ``qgw status``: 0 the session is up (established or rekeying); 1 the gateway
answered and the session is down; 2 usage or configuration error; 3 the gateway did not
answer (not running, or the metrics listener is disabled or elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import Settings, rule_label
from gateway.errors import ConfigError
from gateway.metrics import Metrics

EXIT_UP = 0
EXIT_DOWN = 1
EXIT_UNREACHABLE = 3
UP_STATES = ("established", "rekeying")


@dataclass(slots=True)
class LinkView:
    """What the peer link knows (a snapshot of gateway.link.LinkStatus; plain values)."""

    connected: bool
    established: bool
    epoch: int
    epoch_started: float  # monotonic
    suite: str
    qkd_used: bool
    handshakes: int
    resumptions: int
    rekeys: int
    last_rekey: float | None  # monotonic
    qkd_keys: int
    qkd_bits: int
    alarms: dict[str, str]
    last_close: str


def _iso(unix: float | None) -> str | None:
    if unix is None:
        return None
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).isoformat(timespec="seconds")


def collect(
    settings: Settings,
    metrics: Metrics,
    link: LinkView,
    *,
    certificates: dict[str, float],
    now_monotonic: float | None = None,
    tunnels: list[dict[str, Any]] | None = None,
    bridge_enabled: bool = True,
    broker_queue: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``/status`` document (a stable shape: tools read it; add keys, never rename)."""
    mono = time.monotonic() if now_monotonic is None else now_monotonic
    state = metrics.session_state
    up = state in UP_STATES
    age = metrics.epoch_age() if up else None
    interval = settings.rekey.interval_seconds
    last = metrics.last_handshake
    s = settings
    rules = []
    for rule in s.mqtt.rules:
        label = rule_label(rule)
        rules.append(
            {"name": label, "direction": rule.direction.value, **metrics.rule_counts(label)}
        )
    wall = time.time()
    return {
        "version": __version__,
        "site_id": s.gateway.site_id,
        "role": s.gateway.role.value,
        "up": up,
        "peer": {
            "name": s.auth.peer_name,
            "address": s.gateway.peer if s.gateway.role.value == "initiator" else None,
            "listen": s.gateway.listen if s.gateway.role.value == "responder" else None,
            "connected": link.connected,
            "last_close": link.last_close or None,
        },
        "session": {
            "state": state,
            "epoch": metrics.session_epoch if up else None,
            "suite": link.suite or None,
            "epoch_age_seconds": None if age is None else round(age, 1),
            "next_rekey_seconds": None if age is None else round(max(0.0, interval - age), 1),
            "handshakes": link.handshakes,
            "resumptions": link.resumptions,
            "rekeys": link.rekeys,
            "last_rekey_seconds_ago": (
                None if link.last_rekey is None else round(mono - link.last_rekey, 1)
            ),
            "last_handshake": None
            if last is None
            else {"time": _iso(last[0]), "result": last[1], "reason": last[2]},
        },
        "qkd": {
            "policy": s.qkd.mode.value,
            "in_effect": metrics.qkd_mode,
            "qkd_used": link.qkd_used if up else None,
            "source": s.qkd.source.value,
            "kme_url": s.qkd.kme_url if s.qkd.source.value != "static" else None,
            "kme_reachable": metrics.kme_reachable,
            "stored_key_count": metrics.kme_stored_keys,
            "keys_used": link.qkd_keys,
            "key_bits_used": link.qkd_bits,
        },
        "broker": {
            "enabled": bridge_enabled,  # False: tunnel only ([[tunnel]], no [[mqtt.rules]])
            "url": s.mqtt.broker,
            "connected": metrics.broker_connected,
            "inflight": metrics.inflight,
            "inflight_limit": metrics.inflight_limit,
            "queue": _queue(broker_queue, wall),
        },
        "rules": rules,
        "tunnels": tunnels or [],
        "certificates": {
            name: {
                "not_after": _iso(t),
                "days_left": int((t - wall) // 86400),
            }
            for name, t in sorted(certificates.items())
        },
        "alarms": [
            {"name": name, "detail": link.alarms.get(name, "")} for name in metrics.active_alarms
        ],
    }


def _queue(q: dict[str, Any] | None, wall: float) -> dict[str, Any] | None:
    """``broker.queue``: the local broker's $SYS figures (Bridge.broker_queue), or None when
    they cannot be read (no $SYS, an ACL, sys_interval 0, not connected yet)."""
    if q is None:
        return None
    updated = q.get("updated")
    out = {k: v for k, v in q.items() if k != "updated"}  # Bridge.BROKER_QUEUE_KEYS
    out["updated"] = _iso(updated)
    out["age_seconds"] = None if updated is None else round(max(0.0, wall - updated), 1)
    return out


def _queue_text(q: dict[str, Any] | None) -> str:
    if q is None:
        return "  broker queue: not readable ($SYS not published or not allowed for us)"

    def n(key: str) -> str:
        v = q.get(key)
        return "?" if v is None else str(v)

    return (
        f"  broker queue: {n('stored_messages')} messages stored ({n('stored_bytes')} bytes), "
        f"{n('dropped_messages')} dropped since broker start, clients {n('clients_connected')} "
        f"connected / {n('clients_disconnected')} disconnected; $SYS {n('age_seconds')} s ago"
    )


def render_text(doc: dict[str, Any]) -> str:
    """The human form, one fact per line."""
    out: list[str] = []
    p, ss, q, b = doc["peer"], doc["session"], doc["qkd"], doc["broker"]
    out.append(f"gateway: {doc['site_id']} ({doc['role']}), qgw {doc['version']}")
    where = p["address"] or f"listening on {p['listen']}"
    out.append(
        f"  peer: {p['name']} ({where}), {'connected' if p['connected'] else 'not connected'}"
    )
    if not p["connected"] and p["last_close"]:
        out.append(f"  last close: {p['last_close']}")
    if doc["up"]:
        out.append(
            f"  session: {ss['state']}, epoch {ss['epoch']}, {ss['suite']}, "
            f"epoch age {ss['epoch_age_seconds']} s, next rekey in {ss['next_rekey_seconds']} s"
        )
    else:
        out.append(f"  session: {ss['state']}")
    out.append(
        f"  handshakes: {ss['handshakes']} bootstrap, {ss['resumptions']} resumed, "
        f"{ss['rekeys']} rekeys"
    )
    lh = ss["last_handshake"]
    if lh is not None:
        out.append(f"  last handshake: {lh['time']} {lh['result']} ({lh['reason']})")
    kme = "n/a"
    if q["kme_url"]:
        reach = {True: "reachable", False: "UNREACHABLE", None: "not asked yet"}[q["kme_reachable"]]
        stored = "" if q["stored_key_count"] is None else f", {q['stored_key_count']} keys stored"
        kme = f"{q['kme_url']} {reach}{stored}"
    out.append(f"  qkd: policy {q['policy']}, in effect {q['in_effect']}; KME {kme}")
    if b.get("enabled", True):
        out.append(
            f"  broker: {b['url']} {'connected' if b['connected'] else 'NOT CONNECTED'}, "
            f"in flight {b['inflight']}/{b['inflight_limit']}"
        )
        if "queue" in b:  # older gateways do not send it
            out.append(_queue_text(b["queue"]))
    else:
        out.append("  broker: not used (tunnel only)")
    for r in doc["rules"]:
        out.append(
            f"  rule {r['name']}: out {r['out_forwarded']} forwarded / {r['out_dropped']} dropped, "
            f"in {r['in_delivered']} delivered / {r['in_dropped']} dropped"
        )
    for t in doc.get("tunnels", []):
        n = t["streams_active"]
        out.append(
            f"  tunnel {t['name']} ({t['end']} {t['address']}): {n} stream{'' if n == 1 else 's'}"
            f" open, {t['streams_opened']} opened, {t['bytes_sent']} bytes sent / "
            f"{t['bytes_received']} received, {t['refusals']} refused, {t['resets']} reset"
        )
    for name, c in doc["certificates"].items():
        out.append(f"  certificate {name}: valid until {c['not_after']} ({c['days_left']} days)")
    if doc["alarms"]:
        for a in doc["alarms"]:
            out.append(f"  ALARM {a['name']}: {a['detail']}")
    else:
        out.append("  alarms: none")
    return "\n".join(out) + "\n"


def _url_from(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    from gateway.config import load_settings  # noqa: PLC0415

    settings = load_settings(args.config)
    listen = settings.metrics.listen
    if not listen:
        raise ConfigError([("metrics.listen", "is empty: the gateway serves no status; use --url")])
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "", "[::]", "::"):  # noqa: S104 -- a wildcard bind: ask loopback
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def cmd_status(args: argparse.Namespace) -> int:
    url = _url_from(args)
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=args.timeout) as r:  # noqa: S310
            doc = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"qgw status: no answer from {url}/status: {reason}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render_text(doc))
    return EXIT_UP if doc.get("up") else EXIT_DOWN


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="show a running gateway's session, QKD, broker and alarms",
        description="Ask a running gateway (its metrics listener, GET /status) for its state. "
        "Exit 0 when the session is up, 1 when it is down, 3 when the gateway does not answer.",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", "-c", type=Path, help="the gateway's config (finds metrics.listen)")
    g.add_argument("--url", help="base URL of the metrics listener, e.g. http://127.0.0.1:9464")
    p.add_argument("--json", action="store_true", help="print the JSON document")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default 3)")
    p.set_defaults(handler=cmd_status)
