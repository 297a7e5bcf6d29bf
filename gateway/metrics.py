"""Prometheus metrics of one gateway.

One :class:`Metrics` object per gateway, each with its own private ``CollectorRegistry`` (never
the process-global one), so two gateways in one process (tests, ``qgw demo``) do not clash.
The runtime calls the small typed methods below; :meth:`Metrics.render` gives the Prometheus
text exposition that ``/metrics`` serves (see ``gateway.health``).

Metric names (all ``qgw_``-prefixed, units in the name)::

    qgw_build_info{version,site}                      gauge, always 1
    qgw_session_state{state}                          gauge, 1 for the current state, 0 others
    qgw_session_epoch                                 gauge, current key epoch (0 = none)
    qgw_session_epoch_age_seconds                     gauge, computed at scrape; NaN without epoch
    qgw_peer_connected                                gauge 0/1
    qgw_handshakes_total{result,reason}               counter
    qgw_rekeys_total{result}                          counter
    qgw_qkd_keys_total{role}                          counter, role = enc | dec
    qgw_qkd_key_bits_total{role}                      counter
    qgw_kme_request_seconds{operation}                histogram
    qgw_kme_errors_total{kind}                        counter
    qgw_qkd_mode_in_effect{mode}                      gauge, 1 for the mode in effect
    qgw_qkd_alarm{reason}                             gauge 0/1 per alarm
    qgw_messages_total{rule,direction,result}         counter, result = forwarded|delivered|dropped
    qgw_messages_dropped_total{rule,direction,reason} counter
    qgw_inflight_messages                             gauge
    qgw_inflight_limit_messages                       gauge
    qgw_broker_stored_messages                        gauge, local broker's $SYS store count; NaN unknown
    qgw_broker_dropped_messages                       gauge, local broker's $SYS dropped count; NaN unknown
    qgw_record_auth_failures_total                    counter
    qgw_records_total{direction}                      counter, direction = sent | received
    qgw_bytes_total{direction}                        counter, record plaintext bytes
    qgw_tunnel_streams_total{tunnel,event}            counter, event = opened | closed
    qgw_tunnel_streams_active{tunnel}                 gauge
    qgw_tunnel_bytes_total{tunnel,direction}          counter, stream bytes, sent | received
    qgw_tunnel_window_stalls_total{tunnel}            counter, send credit used up (peer slower)
    qgw_tunnel_refusals_total{tunnel,reason}          counter, streams not opened
    qgw_tunnel_resets_total{tunnel,reason}            counter, streams aborted
    qgw_tunnel_buffered_bytes{tunnel}                 gauge, held for local sockets (write buffers)
    qgw_tunnel_send_queue_bytes                       gauge, tunnel payloads waiting for the link
    qgw_tunnel_errors_total{kind}                     counter, decode | protocol | stale | send

The ``qgw_tunnel_*`` series are read at scrape from the tunnel service (no copying); their
``tunnel`` label is a configured tunnel name or ``-unknown-`` (names a peer asked for that are
not configured: peer-chosen strings never become label values).

Label cardinality is bounded: labels with a fixed vocabulary (state, direction, result, role,
operation, mode) map anything else to ``"other"``; free-form labels (handshake reason, KME
error kind, alarm, rule, drop reason) are truncated to 64 characters and capped at
:data:`MAX_LABEL_VALUES` distinct values each, after which they are counted as ``"other"``.
Topics must never be used as label values: rules are named by index or configured pattern.
A metrics call never raises on a bad label value: metrics must not take the gateway down.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.errors import (
    KeyExhausted,
    KeyNotFound,
    KmeBadAnswer,
    KmeUnauthorized,
    KmeUnavailable,
)

__all__ = [
    "ALARMS",
    "BRIDGE_EVENTS",
    "CONTENT_TYPE",
    "DIRECTIONS",
    "KME_ERROR_KINDS",
    "KME_OPERATIONS",
    "MAX_LABEL_VALUES",
    "MESSAGE_RESULTS",
    "QKD_MODES",
    "QKD_ROLES",
    "RECORD_DIRECTIONS",
    "SESSION_STATES",
    "Metrics",
    "TunnelReport",
    "TunnelSample",
    "kme_error_kind",
]

#: Content-Type of :meth:`Metrics.render` output (Prometheus text format).
CONTENT_TYPE = CONTENT_TYPE_LATEST

OTHER = "other"
MAX_LABEL_VALUES = 32  # distinct values per free-form label before folding into "other"
MAX_LABEL_LENGTH = 64  # characters

#: Session states, named after what the session is doing (the runtime's vocabulary).
SESSION_STATES = ("down", "connecting", "handshaking", "established", "rekeying", "closing")
#: QKD mode in effect: the configured policy, or "pqc-only" when `preferred` runs without QKD key.
QKD_MODES = ("required", "preferred", "off", "pqc-only")
QKD_ROLES = ("enc", "dec")  # enc: master SAE (enc_keys), dec: slave SAE (dec_keys)
KME_OPERATIONS = ("status", "enc_keys", "dec_keys")
#: Suggested KME error kinds (see :func:`kme_error_kind`); other short names are accepted.
KME_ERROR_KINDS = ("unavailable", "exhausted", "not_found", "bad_answer", "unauthorized", "timeout")
DIRECTIONS = ("out", "in")  # out: local broker -> peer; in: peer -> local broker
MESSAGE_RESULTS = ("forwarded", "delivered", "dropped")
RECORD_DIRECTIONS = ("sent", "received")
HANDSHAKE_RESULTS = ("ok", "failed")
REKEY_RESULTS = ("ok", "failed")
ADMISSION_KINDS = ("resume", "bootstrap")
ADMISSION_RESULTS = ("authenticated", "unauthenticated")  # proof under a secret, or public only
EVICTION_REASONS = (
    "pool_full",
    "pool_busy",
    "address_cap",
    "hello_deadline",
    "shutdown",
    "auth_cap",
)
#: Alarms the runtime is expected to raise (others are accepted, bounded).
ALARMS = ("qkd_unavailable", "qkd_mode_downgrade", "kme_unreachable", "broker-session-lost")
BRIDGE_EVENTS = (
    "forward_retry",
    "stale_retry",
    "stale_ack",
    "deliver_failure",
    "busy_refusal",
    "decode_error",
    "internal_error",
    "redelivery",
)

# KME latency buckets (seconds): a local KME answers in milliseconds; timeouts are seconds.
TUNNEL_REFUSALS = (
    "unknown_tunnel",
    "connect_failed",
    "too_many_streams",
    "going_away",
    "link_down",
)
TUNNEL_RESETS = ("aborted", "protocol_error", "going_away", "internal_error", "link_down")
TUNNEL_ERRORS = ("decode", "protocol", "stale", "send", "refusals_dropped")


@dataclass(frozen=True)
class TunnelSample:
    """What the tunnel service reports for one tunnel name at scrape time."""

    streams_opened: int = 0
    streams_closed: int = 0
    streams_active: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    window_stalls: int = 0
    refusals: Mapping[str, int] = field(default_factory=dict)
    resets: Mapping[str, int] = field(default_factory=dict)
    buffered_bytes: int = 0


@dataclass(frozen=True)
class TunnelReport:
    tunnels: Mapping[str, TunnelSample]
    send_queue_bytes: int = 0
    errors: Mapping[str, int] = field(default_factory=dict)


class _TunnelCollector(Collector):
    """The qgw_tunnel_* families, built from a fresh :class:`TunnelReport` at every scrape."""

    def __init__(self, source: Callable[[], TunnelReport]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        rep = self._source()
        streams = CounterMetricFamily(
            "qgw_tunnel_streams", "Tunnel streams opened and closed.", labels=["tunnel", "event"]
        )
        active = GaugeMetricFamily(
            "qgw_tunnel_streams_active", "Tunnel streams open now.", labels=["tunnel"]
        )
        nbytes = CounterMetricFamily(
            "qgw_tunnel_bytes",
            "Tunnel stream bytes sent to and received from the peer.",
            labels=["tunnel", "direction"],
        )
        stalls = CounterMetricFamily(
            "qgw_tunnel_window_stalls",
            "Times a stream used up the send window the peer granted (the far side is slower).",
            labels=["tunnel"],
        )
        refusals = CounterMetricFamily(
            "qgw_tunnel_refusals",
            "Tunnel streams not opened, by reason.",
            labels=["tunnel", "reason"],
        )
        resets = CounterMetricFamily(
            "qgw_tunnel_resets", "Tunnel streams aborted, by reason.", labels=["tunnel", "reason"]
        )
        buffered = GaugeMetricFamily(
            "qgw_tunnel_buffered_bytes",
            "Bytes the gateway holds for local tunnel sockets (their write buffers).",
            labels=["tunnel"],
        )
        for name, t in rep.tunnels.items():
            label = str(name)[:MAX_LABEL_LENGTH]
            streams.add_metric([label, "opened"], t.streams_opened)
            streams.add_metric([label, "closed"], t.streams_closed)
            active.add_metric([label], t.streams_active)
            nbytes.add_metric([label, "sent"], t.bytes_sent)
            nbytes.add_metric([label, "received"], t.bytes_received)
            stalls.add_metric([label], t.window_stalls)
            for reason in sorted({*TUNNEL_REFUSALS, *t.refusals}):
                refusals.add_metric([label, reason], t.refusals.get(reason, 0))
            for reason in sorted({*TUNNEL_RESETS, *t.resets}):
                resets.add_metric([label, reason], t.resets.get(reason, 0))
            buffered.add_metric([label], t.buffered_bytes)
        queue = GaugeMetricFamily(
            "qgw_tunnel_send_queue_bytes", "Tunnel payloads waiting for the peer link (bytes)."
        )
        queue.add_metric([], rep.send_queue_bytes)
        errors = CounterMetricFamily(
            "qgw_tunnel_errors",
            "Tunnel messages from the peer that were undecodable, broke the stream rules, or "
            "named a stream that is gone; and tunnel payloads the link did not take.",
            labels=["kind"],
        )
        for kind in sorted({*TUNNEL_ERRORS, *rep.errors}):
            errors.add_metric([kind], rep.errors.get(kind, 0))
        yield from (streams, active, nbytes, stalls, refusals, resets, buffered, queue, errors)


_KME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def kme_error_kind(exc: BaseException) -> str:
    """Map a key-source exception to a bounded ``kind`` label for :meth:`Metrics.kme_request`."""
    table: tuple[tuple[type[BaseException], str], ...] = (
        (KmeUnauthorized, "unauthorized"),
        (KmeBadAnswer, "bad_answer"),
        (KeyNotFound, "not_found"),
        (KeyExhausted, "exhausted"),
        (KmeUnavailable, "unavailable"),
        (TimeoutError, "timeout"),
    )
    for cls, kind in table:
        if isinstance(exc, cls):
            return kind
    return OTHER


class _Vocabulary:
    """Maps label values into a bounded set: fixed words, or free-form up to a cap."""

    __slots__ = ("_fixed", "_limit", "_seen")

    def __init__(self, fixed: Sequence[str] | None = None, limit: int = MAX_LABEL_VALUES) -> None:
        self._fixed = frozenset(fixed) if fixed is not None else None
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: object) -> str:
        text = str(value)[:MAX_LABEL_LENGTH] if value is not None else ""
        if not text:
            return OTHER
        if self._fixed is not None:
            return text if text in self._fixed else OTHER
        if text in self._seen:
            return text
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(text)
        return text


class Metrics:
    """All metrics of one gateway, in a private registry.

    ``clock`` is the time source used at scrape for the epoch age; the ``now`` values passed to
    :meth:`set_session` must come from the same clock (default ``time.monotonic``; the asyncio
    runtime can pass ``loop.time``, which is the same clock on Linux).
    """

    def __init__(
        self,
        *,
        site_id: str = "",
        version: str = __version__,
        clock: Callable[[], float] = time.monotonic,
        rules: Iterable[str] = (),
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        # The *_created series double the output and no dashboard uses them. The switch is
        # process-wide in prometheus_client (read at scrape); the gateway owns its process.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._wall = wall_clock
        #: (unix time, result, reason) of the last bootstrap/resumption handshake, for status.
        self.last_handshake: tuple[float, str, str] | None = None
        self.broker_connected = False
        self.kme_stored_keys: int | None = None
        self.kme_reachable: bool | None = None
        self._rule_totals: dict[tuple[str, str, str], int] = {}
        self.inflight = 0
        self.inflight_limit: int | None = None
        self._active_alarms: set[str] = set()
        self._epoch_started: float | None = None
        self._epoch = 0
        self._state = "down"
        self._mode: str | None = None
        r = self.registry

        self._build_info = Gauge(
            "qgw_build_info",
            "Build information of this gateway (always 1).",
            ["version", "site"],
            registry=r,
        )
        self._build_info.labels(version=version, site=site_id).set(1)

        # -- session ---------------------------------------------------------------------
        self._state_v = _Vocabulary(SESSION_STATES)
        self._session_state = Gauge(
            "qgw_session_state",
            "Session state with the peer gateway: 1 for the current state, 0 for the others.",
            ["state"],
            registry=r,
        )
        self._session_epoch = Gauge(
            "qgw_session_epoch",
            "Current key epoch of the session (0 before the first handshake).",
            registry=r,
        )
        self._epoch_age = Gauge(
            "qgw_session_epoch_age_seconds",
            "Seconds since the current epoch's keys were installed (NaN without a session).",
            registry=r,
        )
        self._epoch_age.set_function(self._epoch_age_now)
        self._peer_connected = Gauge(
            "qgw_peer_connected",
            "1 while the transport connection to the peer gateway is up, else 0.",
            registry=r,
        )
        self._peer_info = Gauge(
            "qgw_peer_info",
            "The configured peer gateway (always 1): its identity and address.",
            ["peer", "address"],
            registry=r,
        )
        self._last_handshake = Gauge(
            "qgw_last_handshake_timestamp_seconds",
            "Unix time of the last bootstrap or resumption handshake, by result (ok|failed).",
            ["result"],
            registry=r,
        )
        self._rejection_v = _Vocabulary()
        self._peer_rejections = Counter(
            "qgw_peer_rejections",
            "Handshakes the peer refused, by alert (bad_certificate, wrong_identity, "
            "authentication_failed, admission_failed, *_mismatch, unsupported_version).",
            ["alert"],
            registry=r,
        )
        self._reloads = Counter(
            "qgw_config_reloads",
            "SIGHUP reloads by result (ok|failed; a failed reload keeps the running config).",
            ["result"],
            registry=r,
        )
        for res in ("ok", "failed"):
            self._reloads.labels(result=res)
        self._sessions_lost = Counter(
            "qgw_broker_sessions_lost",
            "Reconnects where the local broker no longer had our persistent session "
            "(messages published meanwhile may have been dropped; alarm broker-session-lost).",
            registry=r,
        )
        self._broker_connected = Gauge(
            "qgw_broker_connected",
            "1 while the gateway's MQTT connection to the local broker is up, else 0.",
            registry=r,
        )
        self._broker_stored = Gauge(
            "qgw_broker_stored_messages",
            "Messages the local broker holds (its $SYS/broker/store/messages/count: queued, "
            "in flight and retained, broker-wide); NaN while $SYS cannot be read.",
            registry=r,
        )
        self._broker_stored.set(math.nan)
        self._broker_dropped = Gauge(
            "qgw_broker_dropped_messages",
            "Messages the local broker dropped since its start, e.g. at a full queue (its "
            "$SYS/broker/publish/messages/dropped); NaN while $SYS cannot be read.",
            registry=r,
        )
        self._broker_dropped.set(math.nan)
        self._cert_expiry = Gauge(
            "qgw_certificate_expiry_timestamp_seconds",
            "Unix time at which a certificate this gateway uses expires "
            "(certificate: bootstrap = auth.cert, kme_client = qkd.cert).",
            ["certificate"],
            registry=r,
        )

        # -- handshakes and rekeys -------------------------------------------------------
        self._hs_result_v = _Vocabulary(HANDSHAKE_RESULTS)
        self._hs_reason_v = _Vocabulary()
        self._handshakes = Counter(
            "qgw_handshakes",
            "Bootstrap handshakes by result (ok|failed) and reason (error class or 'ok').",
            ["result", "reason"],
            registry=r,
        )
        self._rekey_result_v = _Vocabulary(REKEY_RESULTS)
        self._rekeys = Counter(
            "qgw_rekeys",
            "QKD-authenticated rekeys by result (ok|failed).",
            ["result"],
            registry=r,
        )

        # -- admission (docs/protocol.md §3.5, §7) ------------------------------------------
        self._adm_kind_v = _Vocabulary(ADMISSION_KINDS)
        self._adm_result_v = _Vocabulary(ADMISSION_RESULTS)
        self._admissions = Counter(
            "qgw_admissions",
            "Connections admitted after a valid HELLO, by kind (resume|bootstrap) and result "
            "(authenticated: proof under the chain key or PSK; unauthenticated: pki bootstrap).",
            ["kind", "result"],
            registry=r,
        )
        self._evict_v = _Vocabulary(EVICTION_REASONS)
        self._evictions = Counter(
            "qgw_admission_evictions",
            "Connections the responder closed before a valid HELLO, by reason: pool_full (an "
            "older pending one evicted), pool_busy / address_cap (a new one refused at accept), "
            "hello_deadline, auth_cap (a PSK-proven bootstrap beyond the cap of such connections).",
            ["reason"],
            registry=r,
        )
        self._refusal_v = _Vocabulary()
        self._refusals = Counter(
            "qgw_admission_refusals",
            "Connections refused before they were authenticated, by alert name "
            "(e.g. admission_failed, no_session, decode_error, rate_limited).",
            ["reason"],
            registry=r,
        )
        self._budget_refusals = Counter(
            "qgw_admission_budget_refusals",
            "Unauthenticated bootstrap INITs refused by the global budget on KME calls and "
            "signatures (pki mode).",
            registry=r,
        )
        self._pending = Gauge(
            "qgw_admission_pending_connections",
            "Connections waiting for a valid HELLO (the bounded pending pool).",
            registry=r,
        )

        # -- QKD and the KME -------------------------------------------------------------
        self._role_v = _Vocabulary(QKD_ROLES)
        self._qkd_keys = Counter(
            "qgw_qkd_keys",
            "QKD keys consumed, by role (enc: fetched as master SAE, dec: as slave SAE).",
            ["role"],
            registry=r,
        )
        self._qkd_bits = Counter(
            "qgw_qkd_key_bits",
            "QKD key bits consumed, by role.",
            ["role"],
            registry=r,
        )
        self._kme_op_v = _Vocabulary(KME_OPERATIONS)
        self._kme_seconds = Histogram(
            "qgw_kme_request_seconds",
            "Duration of ETSI GS QKD 014 requests to the local KME, by operation.",
            ["operation"],
            buckets=_KME_BUCKETS,
            registry=r,
        )
        self._kme_stored = Gauge(
            "qgw_kme_stored_keys",
            "Keys the local KME holds for this SAE pair (ETSI 014 status stored_key_count; "
            "NaN until the first successful status call or while the KME is unreachable).",
            registry=r,
        )
        self._kme_stored.set(math.nan)
        self._kme_kind_v = _Vocabulary()
        self._kme_errors = Counter(
            "qgw_kme_errors",
            "Failed KME requests by kind (unavailable, exhausted, not_found, bad_answer, ...).",
            ["kind"],
            registry=r,
        )
        self._mode_v = _Vocabulary(QKD_MODES)
        self._qkd_mode = Gauge(
            "qgw_qkd_mode_in_effect",
            "QKD mode of the current session: 1 for the mode in effect "
            "(required|preferred|off, or pqc-only when 'preferred' runs without QKD key).",
            ["mode"],
            registry=r,
        )
        self._alarm_v = _Vocabulary()
        self._alarm = Gauge(
            "qgw_qkd_alarm",
            "1 while an alarm is active (e.g. qkd_unavailable, qkd_mode_downgrade), else 0.",
            ["reason"],
            registry=r,
        )

        # -- MQTT messages ---------------------------------------------------------------
        self._rule_v = _Vocabulary()
        self._dir_v = _Vocabulary(DIRECTIONS)
        self._msg_result_v = _Vocabulary(MESSAGE_RESULTS)
        self._drop_reason_v = _Vocabulary()
        self._messages = Counter(
            "qgw_messages",
            "MQTT messages by rule, direction (out|in) and result (forwarded|delivered|dropped).",
            ["rule", "direction", "result"],
            registry=r,
        )
        self._dropped = Counter(
            "qgw_messages_dropped",
            "MQTT messages dropped, by rule, direction and reason.",
            ["rule", "direction", "reason"],
            registry=r,
        )
        self._inflight = Gauge(
            "qgw_inflight_messages",
            "Messages sent to the peer and not yet acknowledged by the peer's broker.",
            registry=r,
        )
        self._inflight_limit = Gauge(
            "qgw_inflight_limit_messages",
            "Configured in-flight window (backpressure above it).",
            registry=r,
        )

        self._events = Counter(
            "qgw_bridge_events",
            "Delivery events worth watching during an outage: forward_retry, stale_retry "
            "(copy dropped, the broker redelivers), stale_ack, deliver_failure, busy_refusal, "
            "decode_error, internal_error, redelivery (the local broker sent a QoS 1 message "
            "again, DUP = 1: it may reach the peer twice).",
            ["event"],
            registry=r,
        )
        for ev in BRIDGE_EVENTS:
            self._events.labels(event=ev).inc(0)

        # -- record layer ----------------------------------------------------------------
        self._auth_failures = Counter(
            "qgw_record_auth_failures",
            "Records that failed authentication (AEAD) or sequence checks; each closes the session.",
            registry=r,
        )
        self._rec_dir_v = _Vocabulary(RECORD_DIRECTIONS)
        self._rec_children: dict[str, tuple[Counter, Counter]] = {}
        self._records = Counter(
            "qgw_records",
            "Records by direction (sent|received).",
            ["direction"],
            registry=r,
        )
        self._bytes = Counter(
            "qgw_bytes",
            "Record plaintext bytes by direction (sent|received).",
            ["direction"],
            registry=r,
        )

        # Series that should exist at 0 from the start, so rate() and alerts see them.
        for s in SESSION_STATES:
            self._session_state.labels(state=s).set(1 if s == self._state else 0)
        for role in QKD_ROLES:
            self._qkd_keys.labels(role=role)
            self._qkd_bits.labels(role=role)
        for res in REKEY_RESULTS:
            self._rekeys.labels(result=res)
        for k in ADMISSION_KINDS:
            for res in ADMISSION_RESULTS:
                self._admissions.labels(kind=k, result=res)
        for reason in EVICTION_REASONS:
            self._evictions.labels(reason=reason)
        for d in RECORD_DIRECTIONS:
            self._records.labels(direction=d)
            self._bytes.labels(direction=d)
        for m in QKD_MODES:
            self._qkd_mode.labels(mode=m).set(0)
        for a in ALARMS:
            self._alarm.labels(reason=self._alarm_v(a)).set(0)
        self.declare_rules(rules)

    # -- exposition ----------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (serve with :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    # -- session -------------------------------------------------------------------------

    def set_session(self, state: str, epoch: int | None = None, now: float | None = None) -> None:
        """Record the session state; a new ``epoch`` restarts the epoch age at ``now``.

        ``now`` defaults to the metrics clock. States other than established/rekeying/closing
        mean there are no session keys: the epoch age becomes NaN and the epoch 0.
        """
        label = self._state_v(state)
        if label != self._state:
            self._session_state.labels(state=self._state).set(0)
            self._session_state.labels(state=label).set(1)
            self._state = label
        if label in ("down", "connecting", "handshaking"):
            self._epoch = 0
            self._epoch_started = None
        elif epoch is not None and (epoch != self._epoch or self._epoch_started is None):
            self._epoch = epoch
            self._epoch_started = self._clock() if now is None else now
        self._session_epoch.set(self._epoch)

    @property
    def session_epoch(self) -> int:
        """The epoch last given to :meth:`set_session` (0 without session keys)."""
        return self._epoch

    @property
    def session_state(self) -> str:
        """The state last given to :meth:`set_session` (as labelled)."""
        return self._state

    def epoch_age(self) -> float | None:
        """Seconds since the current epoch began, or None without session keys."""
        if self._epoch_started is None:
            return None
        return max(0.0, self._clock() - self._epoch_started)

    def _epoch_age_now(self) -> float:
        age = self.epoch_age()
        return math.nan if age is None else age

    def set_peer_connected(self, connected: bool) -> None:
        self._peer_connected.set(1 if connected else 0)

    def handshake(self, result: str, reason: str = "ok") -> None:
        """Count a bootstrap handshake: ``result`` ok|failed, ``reason`` e.g. an error class name."""
        res = self._hs_result_v(result)
        self._handshakes.labels(result=res, reason=self._hs_reason_v(reason)).inc()
        now = self._wall()
        self._last_handshake.labels(result=res).set(now)
        self.last_handshake = (now, res, reason)

    def set_peer(self, name: str, address: str) -> None:
        """Declare the configured peer (``qgw_peer_info``)."""
        self._peer_info.labels(peer=name, address=address).set(1)

    def peer_rejection(self, alert: str) -> None:
        """Count a handshake the peer refused with ``alert`` (e.g. bad_certificate)."""
        self._peer_rejections.labels(alert=self._rejection_v(alert)).inc()

    def config_reload(self, result: str) -> None:
        """Count a SIGHUP reload: ``result`` ok|failed."""
        self._reloads.labels(result="ok" if result == "ok" else "failed").inc()

    def broker_session_lost(self, count: int = 1) -> None:
        """Count CONNACKs where the local broker had forgotten our persistent session."""
        self._sessions_lost.inc(count)

    def set_broker_connected(self, connected: bool) -> None:
        self.broker_connected = connected
        self._broker_connected.set(1 if connected else 0)

    def set_broker_queue(self, stored: int | None, dropped: int | None) -> None:
        """The local broker's $SYS figures (``None``: not known)."""
        self._broker_stored.set(math.nan if stored is None else stored)
        self._broker_dropped.set(math.nan if dropped is None else dropped)

    def set_certificate_expiry(self, certificate: str, unix_time: float) -> None:
        """``certificate`` bootstrap|kme_client; ``unix_time`` its not-after."""
        self._cert_expiry.labels(certificate=certificate).set(unix_time)

    def set_kme_status(self, stored_keys: int | None) -> None:
        """The last ETSI 014 status answer (``None``: the KME did not answer)."""
        self.kme_reachable = stored_keys is not None
        self.kme_stored_keys = stored_keys
        self._kme_stored.set(math.nan if stored_keys is None else stored_keys)

    def admission(self, kind: str, authenticated: bool) -> None:
        """Count one admitted connection (AD4)."""
        self._admissions.labels(
            kind=self._adm_kind_v(kind),
            result=self._adm_result_v("authenticated" if authenticated else "unauthenticated"),
        ).inc()

    def admission_eviction(self, reason: str, count: int = 1) -> None:
        self._evictions.labels(reason=self._evict_v(reason)).inc(count)

    def admission_refusal(self, reason: str) -> None:
        self._refusals.labels(reason=self._refusal_v(reason)).inc()

    def admission_budget_refusal(self, count: int = 1) -> None:
        self._budget_refusals.inc(count)

    def set_pending_connections(self, n: int) -> None:
        self._pending.set(n)

    def rekey(self, result: str) -> None:
        """Count a rekey: ``result`` ok|failed."""
        self._rekeys.labels(result=self._rekey_result_v(result)).inc()

    # -- QKD -----------------------------------------------------------------------------

    def qkd_key(self, role: str, bits: int) -> None:
        """Count one QKD key of ``bits`` bits consumed as ``role`` enc|dec."""
        label = self._role_v(role)
        self._qkd_keys.labels(role=label).inc()
        if bits > 0:
            self._qkd_bits.labels(role=label).inc(bits)

    def kme_request(self, operation: str, seconds: float, error_kind: str | None = None) -> None:
        """Observe one KME request (``operation`` status|enc_keys|dec_keys) and its error, if any.

        Use :func:`kme_error_kind` to turn a caught exception into ``error_kind``.
        """
        self._kme_seconds.labels(operation=self._kme_op_v(operation)).observe(max(0.0, seconds))
        if error_kind is not None:
            self._kme_errors.labels(kind=self._kme_kind_v(error_kind)).inc()

    def set_qkd_mode(self, mode: str) -> None:
        """Set the QKD mode in effect (required|preferred|off|pqc-only); one label is 1."""
        label = self._mode_v(mode)
        if self._mode is not None and self._mode != label:
            self._qkd_mode.labels(mode=self._mode).set(0)
        self._qkd_mode.labels(mode=label).set(1)
        self._mode = label

    @property
    def qkd_mode(self) -> str | None:
        """The mode last given to :meth:`set_qkd_mode`."""
        return self._mode

    def set_alarm(self, name: str, active: bool) -> None:
        """Raise (``active=True``) or clear an alarm, e.g. ``qkd_unavailable``."""
        label = self._alarm_v(name)
        self._alarm.labels(reason=label).set(1 if active else 0)
        if active:
            self._active_alarms.add(label)
        else:
            self._active_alarms.discard(label)

    @property
    def active_alarms(self) -> list[str]:
        return sorted(self._active_alarms)

    # -- MQTT ----------------------------------------------------------------------------

    def declare_rules(self, rules: Iterable[str]) -> None:
        """Create the per-rule message series at 0 (rule labels: index or pattern, never topics)."""
        for rule in rules:
            label = self._rule_v(rule)
            for d in DIRECTIONS:
                for res in MESSAGE_RESULTS:
                    self._messages.labels(rule=label, direction=d, result=res)

    def message(
        self, rule: str, direction: str, result: str, reason: str | None = None, count: int = 1
    ) -> None:
        """Count one MQTT message: ``direction`` out|in, ``result`` forwarded|delivered|dropped.

        For ``dropped``, ``reason`` (e.g. too_large, no_rule, decode) also counts it in
        ``qgw_messages_dropped_total``.
        """
        r, d, res = self._rule_v(rule), self._dir_v(direction), self._msg_result_v(result)
        if count <= 0:
            return
        self._messages.labels(rule=r, direction=d, result=res).inc(count)
        self._rule_totals[(r, d, res)] = self._rule_totals.get((r, d, res), 0) + count
        if res == "dropped":
            self._dropped.labels(
                rule=r, direction=d, reason=self._drop_reason_v(reason or "unspecified")
            ).inc(count)

    def rule_counts(self, rule: str) -> dict[str, int]:
        """Totals for one rule label: ``{"out_forwarded": n, "in_delivered": n, ...}``."""
        label = self._rule_v(rule)
        return {
            f"{d}_{res}": self._rule_totals.get((label, d, res), 0)
            for d in DIRECTIONS
            for res in MESSAGE_RESULTS
        }

    def set_inflight(self, n: int, limit: int | None = None) -> None:
        """Set the number of messages in flight to the peer (and the window, if given)."""
        self.inflight = max(0, n)
        if limit is not None:
            self.inflight_limit = limit
        self._inflight.set(max(0, n))
        if limit is not None:
            self._inflight_limit.set(limit)

    # -- record layer --------------------------------------------------------------------

    def bridge_event(self, event: str, count: int = 1) -> None:
        """Count ``count`` bridge events (see BRIDGE_EVENTS; anything else counts as other)."""
        if count > 0:
            self._events.labels(event=event if event in BRIDGE_EVENTS else "other").inc(count)

    def record_auth_failure(self) -> None:
        self._auth_failures.inc()

    def records(self, direction: str, count: int = 1, nbytes: int = 0) -> None:
        """Count ``count`` records of ``nbytes`` plaintext bytes in total, ``direction`` sent|received."""
        children = self._rec_children.get(direction)
        if children is None:  # the labelled children, looked up once (this runs per flush)
            label = self._rec_dir_v(direction)
            children = (self._records.labels(direction=label), self._bytes.labels(direction=label))
            self._rec_children[direction] = children
        if count > 0:
            children[0].inc(count)
        if nbytes > 0:
            children[1].inc(nbytes)

    # -- tunnels -------------------------------------------------------------------------

    def attach_tunnels(self, source: Callable[[], TunnelReport]) -> None:
        """Serve the qgw_tunnel_* families from ``source``, called at every scrape."""
        self.registry.register(_TunnelCollector(source))

    # -- readiness -----------------------------------------------------------------------

    def readiness(self, max_epoch_age_seconds: float) -> tuple[bool, str]:
        """A ready check from what the metrics know: established and keys younger than the limit.

        ``gateway.health.start_http`` takes a callable; the runtime can pass
        ``lambda: metrics.readiness(2 * rekey_interval)`` or its own, better-informed check.
        """
        if self._state not in ("established", "rekeying"):
            return False, f"session {self._state}"
        age = self.epoch_age()
        if age is None:
            return False, "no session keys"
        if age > max_epoch_age_seconds:
            return False, f"keys stale: epoch age {age:.0f} s > {max_epoch_age_seconds:.0f} s"
        return True, "ok"
