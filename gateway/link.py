"""The asyncio peer link: TCP between the gateways around the sans-I/O core.

It feeds bytes to :class:`gateway.core.connection.Connection`, writes what the core wants
sent, re-arms the core's one timer, and answers the core's QKD requests from the key source.
The initiator connects (and reconnects with jittered exponential back-off); the responder
listens and keeps the newest authenticated connection. The :class:`Association` (chain key,
epoch, replay caches) outlives connections, so a reconnect resumes with a QKD-authenticated
rekey instead of a new bootstrap.

Application payloads go in with :meth:`PeerLink.send` and come out through ``on_message``.
An empty payload is a keepalive (sent after ``KEEPALIVE_SECONDS`` of silence); a connection
that hears nothing for ``DEAD_PEER_SECONDS`` is closed and re-established.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import QkdMode, Role, Settings, Suite
from gateway.core import labels as L
from gateway.core.admission import Admitted
from gateway.core.auth import Authenticator
from gateway.core.connection import (
    Alarm,
    Association,
    Closed,
    Connection,
    HandshakeComplete,
    MessageReceived,
    NeedQkdKeys,
    NeedQkdKeysById,
    RekeyComplete,
    SessionParams,
    State,
)
from gateway.core.connection import Role as CoreRole
from gateway.core.wire import AlertMsg
from gateway.crypto import Provider
from gateway.errors import (
    GatewayError,
    KeySourceError,
    LocalProtocolError,
    PeerRejected,
    PeerUnavailable,
)
from gateway.logs import RateLimitedSummary
from gateway.metrics import ALARMS, Metrics, kme_error_kind
from keysource.base import KeySource

log = logging.getLogger("qgw.link")

KEEPALIVE_SECONDS = 5.0
DEAD_PEER_SECONDS = 20.0
PRE_AUTH_IDLE_SECONDS = 5.0  # an unauthenticated connection that goes quiet this long is dropped
# Responder admission pool (docs/protocol.md §7): connections that have not sent a valid HELLO.
MAX_PENDING_CONNECTIONS = 64  # in all
MAX_PENDING_PER_ADDRESS = 8  # per source address (TCP has proven it)
HELLO_DEADLINE_SECONDS = 2.0
PRE_HELLO_MAX_BYTES = 1024  # bytes a pending connection may send before its HELLO is valid  # from accept to a valid HELLO (the real peer needs one round trip)
MAX_AUTH_BOOTSTRAPS = 4  # psk bootstraps admitted (PSK proven) but not established, in all
MAX_AUTH_BOOTSTRAPS_PER_ADDRESS = 2  # ... and per source address
TRUSTED_SOURCES = 16  # addresses that recently authenticated: evicted last when the pool is full
LISTEN_BACKLOG = 1024  # asyncio's default of 100 overflows under a connection flood
CONNECT_ATTEMPT_SECONDS = 0.5  # initiator: first TCP connect attempt (then 1 s, 2 s, ...)
ACCEPT_BATCH = 512  # connections accepted per readiness event of the listening socket
SUMMARY_SECONDS = 10.0  # one log line per this many seconds about unauthenticated connections
_RECORD_STATS = (
    ("sent", "records_sent", "bytes_sent"),
    ("received", "records_received", "bytes_received"),
)
REFUSAL_ALERT = AlertMsg(L.Alert.RATE_LIMITED, "rate_limited").encode()  # pool_busy, address_cap
WRITE_HIGH_WATER = 1 << 20  # bytes queued in the socket before send() waits (backpressure)


def source_key(host: str) -> str:
    """The unit of the per-address limits (pool, bootstrap bucket, trusted list, §7): the IPv4
    address, or the /64 of an IPv6 address (one host usually holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


SUITE_IDS = {
    Suite.MLKEM768_X25519: L.SuiteId.MLKEM768_X25519_AES256GCM_SHA384,
    Suite.MLKEM1024_X25519: L.SuiteId.MLKEM1024_X25519_AES256GCM_SHA384,
    Suite.FRODOKEM976AES_X25519: L.SuiteId.FRODOKEM976AES_X25519_AES256GCM_SHA384,
}
POLICY_IDS = {
    QkdMode.REQUIRED: L.QkdPolicyId.REQUIRED,
    QkdMode.PREFERRED: L.QkdPolicyId.PREFERRED,
    QkdMode.OFF: L.QkdPolicyId.OFF,
}


SESSION_UP = "session %s with %s: epoch %d, %s%s%s"

#: What a peer's refusal during the handshake means for the operator (logged, counted).
PEER_REJECTION_HINTS: dict[L.Alert, str] = {
    L.Alert.BAD_CERTIFICATE: "the peer does not accept our certificate (check that its auth.ca "
    "holds the CA that signed our auth.cert, and the certificate's validity)",
    L.Alert.WRONG_IDENTITY: "our identity is not the peer's auth.peer_name",
    L.Alert.AUTHENTICATION_FAILED: "our signature or PSK MAC did not verify at the peer (key not "
    "matching the certificate, or a different PSK)",
    L.Alert.ADMISSION_FAILED: "the peer refused our HELLO proof (different PSK or chain)",
    L.Alert.SUITE_MISMATCH: "crypto.suite differs between the two sites",
    L.Alert.AUTH_MODE_MISMATCH: "auth.mode differs between the two sites",
    L.Alert.QKD_POLICY_MISMATCH: "qkd.mode differs between the two sites",
    L.Alert.UNSUPPORTED_VERSION: "the peer speaks another protocol version",
}


@dataclass
class LinkStatus:
    """What the demo's status line and /readyz show."""

    connected: bool = False
    established: bool = False
    epoch: int = -1
    epoch_started: float = 0.0
    suite: str = ""
    qkd_used: bool = False
    handshakes: int = 0
    resumptions: int = 0
    rekeys: int = 0
    last_rekey: float | None = None
    qkd_keys: int = 0
    qkd_bits: int = 0
    alarms: dict[str, str] = field(default_factory=dict)
    last_close: str = ""


def session_params(settings: Settings, role: CoreRole) -> SessionParams:
    return SessionParams(
        role=role,
        suite=SUITE_IDS[settings.crypto.suite],
        qkd_policy=POLICY_IDS[settings.qkd.mode],
        peer_name=settings.auth.peer_name,
        rekey_interval=settings.rekey.interval_seconds,
        max_records=settings.rekey.max_records,
        max_bytes=settings.rekey.max_bytes,
        max_message_bytes=settings.mqtt.max_payload_bytes + 64 * 1024,  # payload + topic/properties
    )


class _SessionProtocol(asyncio.Protocol):
    """The asyncio protocol under one :class:`_Session`.

    Bytes from the peer go straight into the core from ``data_received``: no task, no stream
    objects and no wake-up of another coroutine per read (the session's own task only runs
    timers, QKD fetches and closes). Write flow control (``pause_writing``) backs
    :meth:`PeerLink.send`.
    """

    def __init__(self) -> None:
        self.session: _Session | None = None
        self.early: list[bytes] = []  # initiator: bytes that came before the session was bound
        self.paused = False
        self.lost = False
        self.lost_exc: Exception | None = None
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters: list[asyncio.Future[None]] = []  # drain() calls

    def bind(self, session: _Session) -> None:
        self.session = session
        early, self.early = self.early, []
        for data in early:
            session.on_data(data)
        if self.lost:
            session.on_lost(self.lost_exc)

    def data_received(self, data: bytes) -> None:
        if self.session is None:
            self.early.append(data)
        else:
            self.session.on_data(data)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost(None) follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost, self.lost_exc = True, exc
        if not self.gone.done():
            self.gone.set_result(None)
        self._release_waiters()
        if self.session is not None:
            self.session.on_lost(exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._release_waiters()

    def _release_waiters(self) -> None:
        for w in self._waiters:
            if not w.done():
                w.set_result(None)
        self._waiters.clear()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        if self.paused and not self.lost:
            w = asyncio.get_running_loop().create_future()
            self._waiters.append(w)
            await w
        if self.lost:
            raise ConnectionResetError("connection lost")


class _Session:
    """One TCP connection driven through one core Connection."""

    def __init__(
        self,
        link: PeerLink,
        conn: Connection,
        transport: asyncio.Transport,
        protocol: _SessionProtocol,
    ) -> None:
        self.link = link
        self.conn = conn
        self.transport = transport
        self.protocol = protocol
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.wake = asyncio.Event()
        self.established = asyncio.Event()
        self.closed = asyncio.Event()
        self.last_rx = self.last_tx = time.monotonic()
        self.tasks: set[asyncio.Task[None]] = set()
        self._flush_scheduled = False
        self._counted: collections.Counter[str] = collections.Counter()
        self._delivering: Awaitable[None] | None = None  # an on_message that did not finish
        self._armed_timer: float | None = None  # the core timer the run loop waits for
        self.lost = False  # the TCP connection is gone
        self.accepted_at = self.last_rx
        self.source = ""
        self.admitted = False  # responder: a valid HELLO arrived (AD4)
        self.authenticated = False  # responder: ... proven with the chain key or the PSK
        self.auth_bootstrap = False  # responder: counted in PeerLink._auth_bootstraps
        self.count_ok: str | None = None  # initiator: handshake reason to count once R confirms
        self.confirmed = False  # initiator: R's first record of the session arrived
        # initiator: the "session up" log line, held until R confirms (level, args, fields)
        self.up_message: tuple[int, tuple[object, ...], dict[str, object]] | None = None
        self.refused_before_admit = False  # initiator: closed by the peer before ADMIT

    def hello_deadline(self) -> float | None:
        """Responder: a connection that has not been admitted by then is closed (§7)."""
        if self.link.role is CoreRole.INITIATOR or self.admitted:
            return None
        return self.accepted_at + HELLO_DEADLINE_SECONDS

    def now(self) -> float:
        return time.monotonic()

    def is_closed(self) -> bool:
        return self.conn.state is State.CLOSED

    def idle_limit(self) -> float:
        """Silence allowed before the connection is dropped."""
        if (
            self.established.is_set()
            or self.tasks
            or self.authenticated
            or self.link.role is CoreRole.INITIATOR
        ):
            return DEAD_PEER_SECONDS  # authenticated, or waiting for our own KME
        return PRE_AUTH_IDLE_SECONDS

    def _count_records(self) -> None:
        """Move the core's record counters (records and plaintext bytes) into the metrics."""
        st = self.conn.stats
        counted = self._counted
        for direction, rk, bk in _RECORD_STATS:
            n, b = st[rk] - counted[rk], st[bk] - counted[bk]
            if n or b:
                self.link.metrics.records(direction, n, b)
                counted[rk], counted[bk] = st[rk], st[bk]

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.transport.is_closing():
            self.transport.write(out)
            self.last_tx = time.monotonic()
        self._count_records()

    # --- from the transport (callbacks, never awaited) ---

    def on_data(self, data: bytes) -> None:
        """Bytes from the peer: through the core, events handled, answers written, at once."""
        conn = self.conn
        if conn.state is State.CLOSED:
            return
        now = time.monotonic()
        self.last_rx = now
        try:
            conn.receive_data(data, now)
            if self.count_ok is not None and conn.stats["records_received"]:
                self.link._confirmed(self)  # R's first record: the session is real
            self.dispatch()
        except Exception as exc:  # noqa: BLE001 -- a bug must cost one connection, never the gateway
            self.abort_internal("session", exc)
        self.flush()
        if conn.state is not State.ESTABLISHED or conn.get_timer() != self._armed_timer:
            self.wake.set()  # closed, handshaking or a new deadline: the run loop looks again

    def on_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        if not self.is_closed():
            self.link.status.last_close = (
                "peer closed the TCP connection"
                if exc is None
                else f"connection lost: {exc.__class__.__name__}"
            )
            self.conn.transport_closed(time.monotonic())  # core: CLOSED (its event is not read)
        self.wake.set()

    # --- the session task: timers, QKD fetches, slow deliveries, the close ---

    async def run(self) -> None:
        try:
            while True:
                if self._delivering is not None:
                    await self._drain_events()  # a handler that had to wait, and what follows
                    self.flush()
                    if not self.lost and not self.transport.is_closing():
                        self.transport.resume_reading()
                    continue
                waiting = self.dispatch()
                self.flush()
                if self.is_closed() or self.lost:
                    break
                if waiting:
                    continue
                now = self.now()
                timers = [self.last_rx + self.idle_limit()]
                if self.conn.state is State.ESTABLISHED:
                    timers.append(self.last_tx + KEEPALIVE_SECONDS)
                self._armed_timer = self.conn.get_timer()
                if self._armed_timer is not None:
                    timers.append(self._armed_timer)
                if (t := self.hello_deadline()) is not None:
                    timers.append(t)
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, min(timers) - now)):
                        await self.wake.wait()
                if self.is_closed() or self.lost:
                    continue
                now = self.now()
                t = self.conn.get_timer()
                if t is not None and now >= t:
                    self.conn.handle_timer(now)
                hello_by = self.hello_deadline()
                if hello_by is not None and now >= hello_by and not self.is_closed():
                    self.link.metrics.admission_eviction("hello_deadline")
                    self.conn.close(now, L.Alert.TIMEOUT, "no valid HELLO in time")
                elif now - self.last_rx >= self.idle_limit():
                    self.conn.close(now, L.Alert.TIMEOUT, "peer silent")
                    self.link.status.last_close = "peer silent (dead-peer timeout)"
                elif (
                    self.conn.state is State.ESTABLISHED and now - self.last_tx >= KEEPALIVE_SECONDS
                ):
                    with contextlib.suppress(LocalProtocolError):
                        self.conn.send_message(b"", now)
            await self._drain_events()
            self.flush()
        except Exception as exc:  # noqa: BLE001 -- a bug must cost one connection, never the gateway
            self.abort_internal("session", exc)
            with contextlib.suppress(Exception):
                await self._drain_events()  # the Closed event: counted like any other close
                self.flush()  # alert 19 to the peer before the socket closes
        finally:
            for task in list(self.tasks):
                task.cancel()
            self.closed.set()
            await self._close_transport()

    async def _drain_events(self) -> None:
        """Handle every queued event, awaiting in order each handler that has to wait."""
        while True:
            if self._delivering is not None:
                d, self._delivering = self._delivering, None
                await d
            if not self.dispatch():
                return

    async def _close_transport(self) -> None:
        """Close after the write buffer drained (the peer gets our last alert), at most 2 s."""
        transport = self.transport
        if not transport.is_closing():
            transport.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.protocol.gone), 2)
        if not self.protocol.lost:
            transport.abort()

    def dispatch(self) -> bool:
        """Handle the core's events, in order. An application message whose handler must wait
        stops here (returns True): reading pauses and the session task goes on once it is
        done."""
        if self._delivering is not None:
            return True
        link = self.link
        conn = self.conn
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, MessageReceived):
                if ev.data:
                    pending = link._deliver(ev.data, self)
                    if pending is not None:
                        self._delivering = pending
                        if not self.transport.is_closing():
                            self.transport.pause_reading()
                        self.wake.set()
                        return True
            elif isinstance(ev, Admitted):
                link._on_admitted(self, ev)
            elif isinstance(ev, NeedQkdKeys):
                self._spawn(self._fetch(ev.count, None), "qkd_fetch")
            elif isinstance(ev, NeedQkdKeysById):
                self._spawn(self._fetch(len(ev.key_ids), ev.key_ids), "qkd_fetch")
            elif isinstance(ev, HandshakeComplete):
                link._on_established(self, ev)
            elif isinstance(ev, RekeyComplete):
                link._on_rekey(self, ev)
            elif isinstance(ev, Alarm):
                link.report_alarm(ev)
            elif isinstance(ev, Closed):
                link._on_closed(self, ev)
        return False

    def _spawn(self, coro: Awaitable[None], where: str) -> None:
        task = asyncio.ensure_future(self._guarded(coro, where))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _guarded(self, coro: Awaitable[None], where: str) -> None:
        """Task boundary: an exception in a session task closes the connection with
        internal_error (alert 19) and is counted -- never a silent hang until the peer's
        handshake timeout, never an unretrieved task exception."""
        try:
            await coro
        except Exception as exc:  # noqa: BLE001 -- any bug here must cost one connection
            self.abort_internal(where, exc)

    def abort_internal(self, where: str, exc: Exception) -> None:
        """Log once (the exception's class and message: no key material reaches exceptions
        in gateway/crypto or the core), count, send alert 19 and close."""
        self.link.internal_errors += 1
        log.error(
            "connection aborted by an internal error in %s: %s: %s",
            where,
            exc.__class__.__name__,
            exc,
            exc_info=log.isEnabledFor(logging.DEBUG),
            extra={"event": "internal_error", "reason": where},
        )
        self.link.status.last_close = f"internal error in {where} (see log)"
        if not self.is_closed():
            with contextlib.suppress(Exception):
                self.conn.close(self.now(), L.Alert.INTERNAL_ERROR, f"internal error in {where}")
        self.wake.set()

    async def _fetch(self, count: int, key_ids: tuple[str, ...] | None) -> None:
        """Answer the core's QKD request from the key source (runs beside the read loop)."""
        link = self.link
        ks = link.keysource
        op = "enc_keys" if key_ids is None else "dec_keys"
        started = time.perf_counter()
        answer: list[tuple[str, bytes]] | None = None
        if ks is not None:
            try:
                if key_ids is None:
                    keys = await ks.enc_keys(
                        link.settings.qkd.peer_sae_id, count, link.settings.qkd.key_size_bits
                    )
                else:
                    keys = await ks.dec_keys(link.settings.qkd.peer_sae_id, list(key_ids))
                answer = [(k.key_id, k.key.expose_secret_bytes()) for k in keys]
                link.metrics.kme_request(op, time.perf_counter() - started, None)
                for k in keys:
                    link.metrics.qkd_key("enc" if key_ids is None else "dec", k.size_bits)
                    link.status.qkd_keys += 1
                    link.status.qkd_bits += k.size_bits
                link.metrics.set_alarm("kme_unreachable", False)
            except KeySourceError as exc:
                kind = kme_error_kind(exc)
                link.metrics.kme_request(op, time.perf_counter() - started, kind)
                link.metrics.set_alarm(
                    "kme_unreachable", kind in ("unavailable", "timeout", "unauthorized")
                )
                log.warning(
                    "QKD key source %s: %s failed (%s): %s",
                    link.settings.qkd.kme_url,
                    op,
                    kind,
                    exc,
                    extra={"event": "kme_error", "reason": kind},
                )
        if self.is_closed():
            return
        try:
            self.conn.provide_qkd_keys(answer, self.now())
        except LocalProtocolError as exc:
            log.error("QKD keys could not be used: %s", exc)  # noqa: TRY400 -- no traceback needed
            self.conn.close(self.now(), L.Alert.INTERNAL_ERROR, "bad QKD key")
        self.wake.set()


def _same(p: _Pending) -> _Pending:
    return p


class _Pending(asyncio.Protocol):
    """Responder: one connection before its HELLO (the pending pool, docs/protocol.md §7).

    No task, no stream objects, one timer: AD1 (CHALLENGE) goes out on accept, bytes go to the
    core until AD3 accepts a HELLO; then the transport is handed to a :class:`_Session` with the
    same core :class:`Connection` (its ADMIT still queued). Anything else closes it, counted.
    """

    def __init__(self, link: PeerLink, source: str) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.conn: Connection | None = None
        self.source = source
        self._timer: asyncio.TimerHandle | None = None
        self._done = False  # closed, evicted or handed over
        self._received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        link = self.link
        self.transport = transport
        if self._done or link.stopping():  # evicted between accept and here, or shutting down
            self._done = True
            link._pool_remove(self)
            transport.abort()
            return
        self.conn = Connection(
            link.params, link.auth, link.provider, link.rng, link.assoc, source=self.source
        )
        transport.write(self.conn.data_to_send())  # AD1: CHALLENGE
        self._timer = asyncio.get_running_loop().call_later(HELLO_DEADLINE_SECONDS, self._expire)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self._done:
            return
        self._received += len(data)
        if self._received > PRE_HELLO_MAX_BYTES:  # a HELLO is < 200 bytes: bound pool memory
            self.close(L.Alert.TOO_LARGE, "too many bytes before a valid HELLO")
            return
        try:
            conn.receive_data(data, time.monotonic())
        except Exception:  # a bug must cost one connection, never the gateway
            log.exception("pending connection aborted by an internal error")
            self.link.internal_errors += 1
            self.close(L.Alert.INTERNAL_ERROR, "internal error")
            return
        if conn.state is State.CLOSED:
            self._finish()
        elif conn.state is not State.R_EXPECT_HELLO:
            if self._over_bootstrap_cap(conn):
                conn.data_to_send()  # drop the queued ADMIT: the refusal comes before it
                self.link.metrics.admission_eviction("auth_cap")
                self.close(L.Alert.RATE_LIMITED, "too many authenticated bootstraps")
                return
            self._upgrade()

    def _over_bootstrap_cap(self, conn: Connection) -> bool:
        """A PSK-proven bootstrap HELLO is never evicted, so such connections are capped (§7)."""
        if self.link.auth.mode is not L.AuthModeId.PSK:
            return False
        if conn.admitted_kind is not L.HelloKind.BOOTSTRAP:
            return False
        counts = self.link._auth_bootstraps
        return (
            sum(counts.values()) >= MAX_AUTH_BOOTSTRAPS
            or counts[self.source] >= MAX_AUTH_BOOTSTRAPS_PER_ADDRESS
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done:
            self._done = True
            self._cancel()
            self.link._pool_remove(self)
            self.link._pending_closed(None)

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def close(self, alert: L.Alert, reason: str) -> None:
        if self._done:
            return
        if self.conn is None:  # accepted, transport not made yet: connection_made aborts it
            self._done = True
            self.link._pool_remove(self)
            return
        self.conn.close(time.monotonic(), alert, reason)
        self._finish()

    def _expire(self) -> None:
        if not self._done:
            self.link.metrics.admission_eviction("hello_deadline")
            self.close(L.Alert.TIMEOUT, "no valid HELLO in time")

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _finish(self) -> None:
        """The core closed the connection before admission: send its alert, count, close."""
        assert self.conn is not None
        assert self.transport is not None
        self._done = True
        self._cancel()
        self.link._pool_remove(self)
        out = self.conn.data_to_send()
        if out and not self.transport.is_closing():
            self.transport.write(out)
        closed = [e for e in iter(self.conn.next_event, None) if isinstance(e, Closed)]
        if self.conn.stats["global_budget_refusals"]:  # AD3 refused by the global budget
            self.link.metrics.admission_budget_refusal(self.conn.stats["global_budget_refusals"])
        self.link._pending_closed(closed[0] if closed else None)
        self.transport.close()

    def _upgrade(self) -> None:
        """AD3 passed: hand the transport and the core over to a full session (AD4 onwards)."""
        assert self.conn is not None
        assert self.transport is not None
        self._done = True
        self._cancel()
        link = self.link
        protocol = _SessionProtocol()
        self.transport.set_protocol(protocol)
        s = _Session(link, self.conn, self.transport, protocol)
        protocol.bind(s)
        s.source = self.source
        s.admitted = True
        link._pool_swap(self, s)  # keeps its place; leaves the pool at AD4 if authenticated
        if link.auth.mode is L.AuthModeId.PSK and self.conn.admitted_kind is L.HelloKind.BOOTSTRAP:
            s.auth_bootstrap = True
            link._auth_bootstraps[s.source] += 1
        task = asyncio.ensure_future(link._serve_admitted(s))
        link._sessions.add(task)
        task.add_done_callback(link._sessions.discard)


class PeerLink:
    """The gateway-to-gateway link of one gateway (initiator or responder)."""

    def __init__(
        self,
        settings: Settings,
        *,
        auth: Authenticator,
        provider: Provider,
        keysource: KeySource | None,
        metrics: Metrics,
        on_message: Callable[[bytes, object], Awaitable[None] | None],
        on_down: Callable[[], None] | None = None,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.provider = provider
        self.keysource = keysource
        self.metrics = metrics
        self.on_message = on_message
        self.on_down = on_down
        self.rng = rng
        self.role = (
            CoreRole.INITIATOR if settings.gateway.role is Role.INITIATOR else CoreRole.RESPONDER
        )
        self.params = session_params(settings, self.role)  # fixed for the process lifetime
        self.assoc = Association()
        self.status = LinkStatus()
        self._current: _Session | None = None
        self._up = asyncio.Event()
        self._stopping = False
        self._listen_port: int | None = None
        self._rebootstrap_next = False
        self._down_since: float | None = None
        self.internal_errors = 0
        # responder: connections without a valid HELLO yet, oldest first (the pending pool, §7)
        self._pending: dict[_Pending | _Session, None] = {}
        self._pending_by_source: collections.Counter[str] = collections.Counter()
        self._listen_socks: list[socket.socket] = []
        self._trusted_sources: collections.OrderedDict[str, None] = collections.OrderedDict()
        # psk bootstraps admitted but not established, per source (capped, §7)
        self._auth_bootstraps: collections.Counter[str] = collections.Counter()
        self.closed_summary = RateLimitedSummary(
            log, "unauthenticated connections closed", interval=SUMMARY_SECONDS
        )
        self.last_load_refusal = False  # initiator: the last connection was refused for load
        self._sessions: set[asyncio.Task[Any]] = set()  # responder: accept and session tasks

    # --- public ---

    @property
    def listen_port(self) -> int | None:
        return self._listen_port

    def stopping(self) -> bool:
        return self._stopping

    def is_up(self) -> bool:
        return self._current is not None and self._current.conn.state is State.ESTABLISHED

    async def wait_up(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def send(self, payload: bytes, via: object | None = None) -> None:
        """Protect and send one application payload; raise PeerUnavailable if the link is down.

        ``via``: the connection token handed to ``on_message``; the payload then goes out on
        that connection only (an answer must not travel on a newer connection)."""
        if len(payload) > self.params.max_message_bytes:
            raise PeerRejected("message too large for the record layer")
        for _ in range(100):
            s = self._current
            if via is not None and s is not via:
                raise PeerUnavailable("the connection this answers has gone")
            if s is None or s.conn.state is not State.ESTABLISHED:
                raise PeerUnavailable("peer link is down")
            if s.conn.can_send():
                try:
                    s.conn.send_message(payload, s.now())
                except LocalProtocolError as exc:
                    raise PeerUnavailable(f"cannot send: {exc}") from exc
                s.schedule_flush()  # records of this loop iteration go out in one write
                if s.protocol.paused:
                    try:
                        await s.protocol.drain()
                    except (ConnectionError, OSError) as exc:
                        raise PeerUnavailable("peer link lost while sending") from exc
                return
            await asyncio.sleep(0.05)  # record budget exhausted: a rekey is under way
        raise PeerUnavailable("record budget exhausted and no rekey completed")

    def can_send_now(self) -> bool:
        """True if :meth:`send_nowait` takes a payload now and the connection's write buffer
        is below its high-water mark (so a sender that checks this needs no await)."""
        s = self._current
        return (
            s is not None
            and s.conn.state is State.ESTABLISHED
            and s.conn.can_send()
            and not s.protocol.paused
        )

    def send_nowait(self, payload: bytes, via: object | None = None) -> None:
        """Like :meth:`send` without waiting: protect one payload now (its records go out
        with the others of this loop iteration); raise PeerUnavailable if the link is down
        or has no record budget until the next rekey, PeerRejected if it is too large.
        No write backpressure here: the callers bound what they have outstanding (the
        bridge's in-flight window)."""
        if len(payload) > self.params.max_message_bytes:
            raise PeerRejected("message too large for the record layer")
        s = self._current
        if via is not None and s is not via:
            raise PeerUnavailable("the connection this answers has gone")
        if s is None or s.conn.state is not State.ESTABLISHED:
            raise PeerUnavailable("peer link is down")
        if not s.conn.can_send():
            raise PeerUnavailable("record budget exhausted until the rekey completes")
        try:
            s.conn.send_message(payload, s.now())
        except LocalProtocolError as exc:
            raise PeerUnavailable(f"cannot send: {exc}") from exc
        s.schedule_flush()

    async def run(self) -> None:
        """Run until stop(): connect (initiator) or listen (responder)."""
        if self.role is CoreRole.INITIATOR:
            await self._run_initiator()
        else:
            await self._run_responder()

    async def stop(self) -> None:
        self._stopping = True
        s = self._current
        if s is not None and s.conn.state is not State.CLOSED:
            s.conn.close(s.now())
            s.flush()
            s.wake.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.closed.wait(), 3)
        self._close_listener()
        for p in list(self._pending):  # responder: connections not (yet) authenticated
            if isinstance(p, _Pending):
                p.close(L.Alert.CLOSE_NOTIFY, "shutting down")
            else:
                p.conn.close(p.now(), L.Alert.CLOSE_NOTIFY, "shutting down")
                p.wake.set()
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.wait(list(self._sessions), timeout=3)
        self.assoc.forget()

    def rekey_now(self) -> None:
        s = self._current
        if s is not None and s.conn.state is State.ESTABLISHED and self.role is CoreRole.INITIATOR:
            s.conn.rekey_now(s.now())
            s.wake.set()

    def readiness(self) -> tuple[bool, str]:
        if not self.is_up():
            return False, "no established session with the peer"
        age = time.monotonic() - self.status.epoch_started
        limit = self.settings.rekey.interval_seconds * 2
        if age > limit:
            return False, f"keys are {age:.0f} s old (limit {limit:.0f} s)"
        return True, "ok"

    # --- initiator ---

    async def _run_initiator(self) -> None:
        host, _, port = self.settings.gateway.peer.rpartition(":")
        host = host.strip("[]")
        delay = 0.5
        cap = self.settings.gateway.reconnect_max_seconds
        while not self._stopping:
            self.metrics.set_session("connecting")
            try:
                transport, protocol = await self._connect(host, int(port))
            except (OSError, TimeoutError) as exc:
                self.status.last_close = f"connect failed: {exc.__class__.__name__}"
                log.info(
                    "connect to peer %s failed (%s); retry in %.1f s",
                    self.settings.gateway.peer,
                    exc.__class__.__name__,
                    delay,
                )
            else:
                self.last_load_refusal = False
                ok = await self._serve_connection(transport, protocol)
                if ok:
                    delay = 0.5
                elif not self.last_load_refusal and not self.stopping():
                    log.info(
                        "no session with the peer (%s); retry with back-off %.1f s",
                        self.status.last_close or "closed",
                        delay,
                        extra={"event": "retry", "reason": self.status.last_close},
                    )
                elif self.last_load_refusal:
                    # refused before ADMIT (alert 17, eviction): the responder is loaded, we
                    # spent no QKD key; retry soon without growing the back-off
                    delay = min(delay, 0.5)
                    await asyncio.sleep(random.uniform(0.05, 0.25))  # noqa: S311 -- jitter
                    continue
            if self.stopping():
                break
            await asyncio.sleep(random.uniform(0.5, 1.0) * delay)  # noqa: S311 -- jitter, not a secret
            delay = min(cap, delay * 2)

    async def _connect(self, host: str, port: int) -> tuple[asyncio.Transport, _SessionProtocol]:
        """TCP connect within ``connect_timeout_seconds``, in attempts of 0.5 s, 1 s, 2 s, ...

        A SYN dropped by a responder whose accept queue a flood has filled would otherwise wait
        for the kernel's exponential SYN back-off (1 s, 3 s, 7 s); a fresh attempt sends a
        fresh SYN sooner."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.gateway.connect_timeout_seconds
        attempt = CONNECT_ATTEMPT_SECONDS
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError("connect timed out")
            try:
                transport, protocol = await asyncio.wait_for(
                    loop.create_connection(_SessionProtocol, host, port), min(attempt, left)
                )
            except TimeoutError:
                attempt *= 2
                continue
            assert isinstance(transport, asyncio.Transport)
            return transport, protocol

    async def _serve_connection(
        self, transport: asyncio.Transport, protocol: _SessionProtocol
    ) -> bool:
        """Run one connection; True if it reached ESTABLISHED (initiator: confirmed by R)."""
        conn = Connection(self.params, self.auth, self.provider, self.rng, self.assoc)
        s = _Session(self, conn, transport, protocol)
        self.status.connected = True
        self.metrics.set_peer_connected(True)
        self.metrics.set_session("handshaking")
        if self.role is CoreRole.INITIATOR:
            self._current = s
            conn.start(s.now())
        protocol.bind(s)  # bytes that arrived before the session existed go in now
        try:
            await s.run()
        finally:
            if self._current is s:
                self._lost()
        if self.role is CoreRole.INITIATOR:
            return s.confirmed  # an unconfirmed session (R refused CONFIRM) must back off
        return s.established.is_set()

    # --- responder ---

    async def _run_responder(self) -> None:
        host, _, port = self.settings.gateway.listen.rpartition(":")
        loop = asyncio.get_running_loop()
        infos = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        bound = int(port)
        seen: set[tuple[int, str | int]] = set()
        for family, stype, proto, _, addr in infos:  # every address, as asyncio's server does
            if (family, addr[0]) in seen:
                continue
            seen.add((family, addr[0]))
            sock = socket.socket(family, stype, proto)
            self._listen_socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and len(infos) > 1:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr[0], bound, *addr[2:]))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            bound = sock.getsockname()[1]  # port 0: the others share the port chosen first
            # Our own accept loop: the pool decision (§7) is made on the bare socket, so refusing
            # a flood connection costs an accept() and a close(), nothing more; only connections
            # that enter the pool get a transport and a bare _Pending protocol (no task).
            loop.add_reader(sock.fileno(), self._on_acceptable, sock)
        self._listen_port = bound
        log.info("listening for the peer gateway on %s:%s", host, self._listen_port)
        self.metrics.set_session("down")
        try:
            while not self._stopping:
                await asyncio.sleep(0.5)
                self.closed_summary.flush()
        finally:
            self.closed_summary.flush(force=True)
            self._close_listener()

    def _close_listener(self) -> None:
        socks, self._listen_socks = self._listen_socks, []
        for sock in socks:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    def _on_acceptable(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        refused: collections.Counter[str] = collections.Counter()
        try:
            for _ in range(ACCEPT_BATCH):
                try:
                    # the raw descriptor: refusing a flood connection then costs no socket object
                    fd, addr = sock._accept()  # type: ignore[attr-defined]
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:  # EMFILE and friends: counted in the summary, retried
                    self.closed_summary.add(f"accept_{exc.__class__.__name__}")
                    return
                source = source_key(str(addr[0])) if isinstance(addr, tuple) and addr else ""
                reason = "shutdown" if self._stopping else self._room_for(source)
                if reason:
                    if reason != "shutdown":
                        # alert 17 before any CHALLENGE: the real initiator retries soon
                        # without growing its back-off (§7); one send() on an empty buffer
                        with contextlib.suppress(OSError):
                            os.write(fd, REFUSAL_ALERT)
                    os.close(fd)
                    refused[reason] += 1
                    continue
                self._take(fd, source, sock, loop)
        finally:
            for reason, n in refused.items():  # one metrics update per batch, not per socket
                self.metrics.admission_eviction(reason, n)

    def _take(
        self, fd: int, source: str, lsock: socket.socket, loop: asyncio.AbstractEventLoop
    ) -> None:
        """A connection enters the pending pool: a transport with a bare _Pending protocol."""
        csock = socket.socket(lsock.family, lsock.type, lsock.proto, fileno=fd)
        csock.setblocking(False)
        pend = _Pending(self, source)
        self._pool_add(pend)
        task = loop.create_task(loop.connect_accepted_socket(functools.partial(_same, pend), csock))
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)

    def _pool_add(self, p: _Pending | _Session) -> None:
        if p not in self._pending:
            self._pending[p] = None
            self._pending_by_source[p.source] += 1
            self.metrics.set_pending_connections(len(self._pending))

    def _pool_swap(self, old: _Pending, new: _Session) -> None:
        """``new`` takes ``old``'s slot in the pending pool, in the same place of the order."""
        if old in self._pending:
            self._pending = dict.fromkeys(new if p is old else p for p in self._pending)

    def _pool_remove(self, p: _Pending | _Session) -> None:
        if self._pending.pop(p, 0) is None:
            self._pending_by_source[p.source] -= 1
            if self._pending_by_source[p.source] <= 0:
                del self._pending_by_source[p.source]
            self.metrics.set_pending_connections(len(self._pending))

    async def _serve_admitted(self, s: _Session) -> None:
        """Run a connection that passed AD3 (its ADMIT is still queued in the core)."""
        try:
            await s.run()
        finally:
            self._pool_remove(s)
            self._release_bootstrap(s)
            if self._current is s:
                self._lost()

    def _release_bootstrap(self, s: _Session) -> None:
        if s.auth_bootstrap:
            s.auth_bootstrap = False
            self._auth_bootstraps[s.source] -= 1
            if self._auth_bootstraps[s.source] <= 0:
                del self._auth_bootstraps[s.source]

    def _make_room(self, source: str) -> bool:
        """:meth:`_room_for` that counts its refusal; True if the connection may be taken."""
        reason = self._room_for(source)
        if reason:
            self.metrics.admission_eviction(reason)
        return not reason

    def _room_for(self, source: str) -> str:
        """The pool decision for a new connection from ``source`` (docs/protocol.md §7).

        Returns the refusal reason, or "" to take the connection (after evicting one pending
        connection if the pool is full). Authenticated connections are not in the
        pool and are never evicted.

        - its address already holds MAX_PENDING_PER_ADDRESS pending: refuse (``address_cap``);
        - pool not full: take it;
        - pool full: the victim is the oldest connection of the address holding the most, among
          addresses that have not recently authenticated (those come last). A newcomer from a
          recently authenticated address always gets a victim; any other newcomer only when the
          victim's address holds at least two more than its own (``pool_full``), else it is
          refused (``pool_busy``): a flat flood from many addresses then costs one accept() and
          one close() per connection instead of churning the pool.
        """
        counts = self._pending_by_source
        same = counts.get(source, 0)
        if same >= MAX_PENDING_PER_ADDRESS:
            return "address_cap"
        if len(self._pending) < MAX_PENDING_CONNECTIONS:
            return ""
        candidates = [a for a in counts if a not in self._trusted_sources] or list(counts)
        most = max(counts[a] for a in candidates)
        if source not in self._trusted_sources and most < same + 2:
            return "pool_busy"
        victim = next(
            p for p in self._pending if p.source in candidates and counts[p.source] == most
        )
        self._evict(victim, "pool_full")
        return ""

    def _evict(self, s: _Pending | _Session, reason: str) -> None:
        self._pool_remove(s)
        self.metrics.admission_eviction(reason)
        if isinstance(s, _Pending):
            s.close(L.Alert.RATE_LIMITED, f"evicted ({reason})")
            return
        s.conn.close(s.now(), L.Alert.RATE_LIMITED, f"evicted ({reason})")
        s.flush()
        s.wake.set()

    def _pending_closed(self, ev: Closed | None) -> None:
        """A pending connection ended before a valid HELLO: count it, summarise it (no WARNING)."""
        reason = "peer_eof" if ev is None else ev.alert.name.lower()
        self.metrics.admission_refusal(reason)
        who = "peer" if ev is None or ev.by_peer else "local"
        self.closed_summary.add(f"{who}_{reason}")

    def _trust_source(self, source: str) -> None:
        self._trusted_sources.pop(source, None)
        self._trusted_sources[source] = None
        while len(self._trusted_sources) > TRUSTED_SOURCES:
            self._trusted_sources.popitem(last=False)

    def _lost(self) -> None:
        if self._up.is_set() and not self._stopping:
            self._down_since = time.monotonic()
            log.warning(
                "lost the session with %s: %s",
                self.settings.auth.peer_name,
                self.status.last_close or "connection closed",
                extra={
                    "event": "session_lost",
                    "peer": self.settings.auth.peer_name,
                    "epoch": self.status.epoch,
                    "reason": self.status.last_close,
                },
            )
        self._current = None
        self._up.clear()
        self.status.connected = self.status.established = False
        self.metrics.set_peer_connected(False)
        self.metrics.set_session("down")
        if self.on_down is not None:
            self.on_down()

    # --- core events ---

    def _on_admitted(self, s: _Session, ev: Admitted) -> None:
        """AD4 on the responder: a valid HELLO; leave the pool if proven with a secret."""
        s.admitted = True
        self.metrics.admission(ev.kind.name.lower(), ev.authenticated)
        if ev.authenticated:
            # A secret was proven: leave the pool. The address is trusted only once a session
            # is established (_on_established), so a PSK alone cannot churn the trusted list.
            s.authenticated = True
            self._pool_remove(s)
        # else pki bootstrap: public proof only; it keeps its slot (evictable) until established

    def _confirmed(self, s: _Session) -> None:
        """Initiator: the responder's first record of the new session arrived: count it now."""
        reason, s.count_ok = s.count_ok, None
        if reason is None:
            return
        s.confirmed = True
        if s.up_message is not None:
            level, args, fields = s.up_message
            log.log(level, SESSION_UP, *args, extra=fields)
            s.up_message = None
        if reason == "resumed":
            self.status.resumptions += 1
        else:
            self.status.handshakes += 1
        self.metrics.handshake("ok", reason)

    def _on_established(self, s: _Session, ev: HandshakeComplete) -> None:
        old = self._current
        if self.role is CoreRole.RESPONDER:
            self._pool_remove(s)
            self._release_bootstrap(s)
            self._trust_source(s.source)
            if old is not None and old is not s:
                if old.conn.state is not State.CLOSED:
                    old.conn.close(
                        old.now(), L.Alert.CLOSE_NOTIFY, "replaced by a newer connection"
                    )
                    old.wake.set()
                if self.on_down is not None:
                    self.on_down()
            self._current = s
        s.established.set()
        st = self.status
        st.connected = st.established = True
        st.epoch, st.epoch_started, st.suite, st.qkd_used = (
            ev.epoch,
            time.monotonic(),
            ev.suite,
            ev.qkd_used,
        )
        reason = (
            "resumed" if ev.resumed else ("rebootstrap" if self._rebootstrap_next else "bootstrap")
        )
        self._rebootstrap_next = False
        if self.role is CoreRole.INITIATOR:
            # Honest counts (§3.5): the initiator counts the session once the responder's first
            # record (EPOCH_CONFIRM) shows that the responder completed it too.
            s.count_ok = reason
            if s.conn.stats["records_received"]:
                self._confirmed(s)
        else:
            if ev.resumed:
                st.resumptions += 1
            else:
                st.handshakes += 1
            self.metrics.handshake("ok", reason)
        self.metrics.set_peer_connected(True)
        self.metrics.set_session("established", ev.epoch, time.monotonic())
        self._set_mode(ev.qkd_used)
        down = None if self._down_since is None else time.monotonic() - self._down_since
        self._down_since = None
        args: tuple[object, ...] = (
            reason,
            ev.peer.name,
            ev.epoch,
            ev.suite,
            "+QKD" if ev.qkd_used else " (no QKD)",
            "" if down is None else f" (restored after {down:.1f} s down)",
        )
        fields: dict[str, object] = {
            "event": "session_up",
            "peer": ev.peer.name,
            "epoch": ev.epoch,
            "reason": reason,
        }
        level = logging.INFO if down is None else logging.WARNING
        if self.role is CoreRole.INITIATOR and s.count_ok is not None:
            s.up_message = (level, args, fields)  # logged when R confirms (honest state)
        else:
            log.log(level, SESSION_UP, *args, extra=fields)
        self._up.set()

    def _on_rekey(self, s: _Session, ev: RekeyComplete) -> None:
        st = self.status
        st.epoch, st.epoch_started, st.qkd_used = ev.epoch, time.monotonic(), ev.qkd_used
        st.rekeys += 1
        st.last_rekey = time.monotonic()
        self.metrics.rekey("ok")
        self.metrics.set_session("established", ev.epoch, time.monotonic())
        self._set_mode(ev.qkd_used)
        log.info("rekey: epoch %d%s", ev.epoch, "" if ev.qkd_used else " (no QKD)")

    def _set_mode(self, qkd_used: bool) -> None:
        mode = self.settings.qkd.mode
        if mode is QkdMode.PREFERRED and not qkd_used:
            self.metrics.set_qkd_mode("pqc-only")
        else:
            self.metrics.set_qkd_mode(mode.value)
        if qkd_used or mode is QkdMode.OFF:
            self.metrics.set_alarm("qkd_unavailable", False)
            self.status.alarms.pop("qkd_unavailable", None)

    def report_alarm(self, ev: Alarm) -> None:
        """Raise or clear an alarm: gauge, ``/status`` detail and the ``alarm NAME:`` log line.
        The core's alarms come here, and so do the runtime's (broker-session-lost)."""
        if ev.kind in ALARMS:  # one name per alarm in events, logs, metrics, docs (§9)
            self.metrics.set_alarm(ev.kind, ev.active)
        if ev.active:
            self.status.alarms[ev.kind] = ev.detail
        else:
            self.status.alarms.pop(ev.kind, None)
        if ev.kind == "rebootstrap":
            self._rebootstrap_next = True
        if ev.kind == "rekey_failed":
            self.metrics.rekey("failed")
        fields = {"event": "alarm" if ev.active else "alarm_cleared", "reason": ev.kind}
        if ev.active:
            log.warning("alarm %s: %s", ev.kind, ev.detail, extra=fields)
        else:
            log.info("alarm %s cleared: %s", ev.kind, ev.detail, extra=fields)

    def _on_closed(self, s: _Session, ev: Closed) -> None:
        st = self.status
        text = f"{'peer' if ev.by_peer else 'local'}: {ev.alert.name.lower()} ({ev.reason})"
        if s.conn.stats["global_budget_refusals"]:
            self.metrics.admission_budget_refusal(s.conn.stats["global_budget_refusals"])
        unauthenticated = (
            self.role is CoreRole.RESPONDER and not s.authenticated and not s.established.is_set()
        )
        if self.role is CoreRole.INITIATOR and not s.established.is_set():
            s.refused_before_admit = (
                ev.by_peer and ev.alert is L.Alert.RATE_LIMITED and ev.before_admit
            )
            self.last_load_refusal = s.refused_before_admit
        if unauthenticated and not s.admitted:
            # never a handshake: count and summarise, one log line per SUMMARY_SECONDS
            self.metrics.admission_refusal(ev.alert.name.lower())
        elif not s.established.is_set():
            self.metrics.handshake("failed", ev.alert.name.lower())
        if ev.alert is L.Alert.RECORD_FAILURE and not ev.by_peer:
            self.metrics.record_auth_failure()
        if ev.alert is L.Alert.NO_SESSION and ev.by_peer:
            # The responder lost its state (restart): bootstrap again, visibly. The core has
            # forgotten the chain and requires QKD key on that bootstrap unless qkd = off (§5).
            self._rebootstrap_next = True
            self.status.alarms["rebootstrap"] = "peer lost its session state; bootstrapping again"
            log.warning("peer has no session for our chain: bootstrapping again (alarm)")
        if ev.alert is L.Alert.QKD_UNAVAILABLE and not ev.by_peer and not unauthenticated:
            self.metrics.set_alarm("qkd_unavailable", True)
            self.status.alarms["qkd_unavailable"] = ev.reason
        if unauthenticated:  # anyone can cause these: no status change, no WARNING each
            self.closed_summary.add(f"{'peer' if ev.by_peer else 'local'}_{ev.alert.name.lower()}")
            log.debug("unauthenticated connection closed: %s", text)
            return
        st.last_close = text
        level = logging.INFO if ev.alert is L.Alert.CLOSE_NOTIFY else logging.WARNING
        fields = {
            "event": "connection_closed",
            "peer": self.settings.auth.peer_name,
            "alert": ev.alert.name.lower(),
            "reason": ev.reason,
        }
        sent = ev.peer_code if ev.by_peer else None
        peer_alert = (
            L.Alert(sent) if sent is not None and sent in L.Alert._value2member_map_ else None
        )
        hint = PEER_REJECTION_HINTS.get(peer_alert) if peer_alert is not None else None
        if hint is not None and (not s.established.is_set() or ev.refused_unconfirmed):
            assert peer_alert is not None
            name = peer_alert.name.lower()
            self.metrics.peer_rejection(name)
            fields.update(event="peer_rejected", alert=name)
            log.warning(
                "peer rejected us: %s (alert %d): %s%s",
                name,
                peer_alert,
                hint,
                "; our side of that bootstrap is discarded" if ev.refused_unconfirmed else "",
                extra=fields,
            )
            return
        log.log(level, "connection closed: %s", st.last_close, extra=fields)

    def _deliver(self, data: bytes, via: _Session) -> Awaitable[None] | None:
        """Hand one application payload to ``on_message``. It may finish at once (returns
        None: the usual case, no task and no await per message) or return an awaitable, which
        the session awaits before it handles anything behind this payload."""
        try:
            pending = self.on_message(data, via)
        except Exception as exc:  # noqa: BLE001 -- counted and logged in _handler_failed
            self._handler_failed(exc)
            return None
        return None if pending is None else self._deliver_later(pending)

    async def _deliver_later(self, pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception as exc:  # noqa: BLE001 -- counted and logged in _handler_failed
            self._handler_failed(exc)

    def _handler_failed(self, exc: Exception) -> None:
        if isinstance(exc, GatewayError):
            log.warning("peer message not handled: %s", exc)
        else:
            self.internal_errors += 1
            log.error("peer message handler failed", exc_info=exc)
