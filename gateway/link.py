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
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.config import QkdMode, Role, Settings, Suite
from gateway.core import labels as L
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
from gateway.crypto import Provider
from gateway.errors import (
    GatewayError,
    KeySourceError,
    LocalProtocolError,
    PeerRejected,
    PeerUnavailable,
)
from gateway.metrics import ALARMS, Metrics, kme_error_kind
from keysource.base import KeySource

log = logging.getLogger("qgw.link")

KEEPALIVE_SECONDS = 5.0
DEAD_PEER_SECONDS = 20.0
PRE_AUTH_IDLE_SECONDS = 5.0  # an unauthenticated connection that goes quiet this long is dropped
MAX_PENDING_CONNECTIONS = 4  # responder: half-open handshakes at once
READ_CHUNK = 256 * 1024
WRITE_HIGH_WATER = 1 << 20  # bytes queued in the socket before send() waits (backpressure)

SUITE_IDS = {
    Suite.MLKEM768_X25519: L.SuiteId.MLKEM768_X25519_AES256GCM_SHA384,
    Suite.MLKEM1024_X25519: L.SuiteId.MLKEM1024_X25519_AES256GCM_SHA384,
}
POLICY_IDS = {
    QkdMode.REQUIRED: L.QkdPolicyId.REQUIRED,
    QkdMode.PREFERRED: L.QkdPolicyId.PREFERRED,
    QkdMode.OFF: L.QkdPolicyId.OFF,
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


class _Session:
    """One TCP connection driven through one core Connection."""

    def __init__(
        self,
        link: PeerLink,
        conn: Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.link = link
        self.conn = conn
        self.reader = reader
        self.writer = writer
        self.wake = asyncio.Event()
        self.established = asyncio.Event()
        self.closed = asyncio.Event()
        self.last_rx = self.last_tx = time.monotonic()
        self.tasks: set[asyncio.Task[None]] = set()
        self._flush_scheduled = False
        self._counted: collections.Counter[str] = collections.Counter()

    def now(self) -> float:
        return time.monotonic()

    def is_closed(self) -> bool:
        return self.conn.state is State.CLOSED

    def idle_limit(self) -> float:
        """Silence allowed before the connection is dropped."""
        if self.established.is_set() or self.tasks or self.link.role is CoreRole.INITIATOR:
            return DEAD_PEER_SECONDS  # authenticated, or waiting for our own KME
        return PRE_AUTH_IDLE_SECONDS

    def _count_records(self) -> None:
        """Move the core's record counters (records and plaintext bytes) into the metrics."""
        st = self.conn.stats
        for direction, rk, bk in (
            ("sent", "records_sent", "bytes_sent"),
            ("received", "records_received", "bytes_received"),
        ):
            n, b = st[rk] - self._counted[rk], st[bk] - self._counted[bk]
            if n or b:
                self.link.metrics.records(direction, n, b)
                self._counted[rk], self._counted[bk] = st[rk], st[bk]

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.writer.is_closing():
            self.writer.write(out)
            self.last_tx = self.now()
        self._count_records()

    async def run(self) -> None:
        read_task: asyncio.Task[bytes] | None = None
        try:
            while self.conn.state is not State.CLOSED:
                await self._handle_events()
                self.flush()
                await self.writer.drain()
                if self.is_closed():
                    break
                now = self.now()
                timers = [self.last_rx + self.idle_limit()]
                if self.conn.state is State.ESTABLISHED:
                    timers.append(self.last_tx + KEEPALIVE_SECONDS)
                if (t := self.conn.get_timer()) is not None:
                    timers.append(t)
                timeout = max(0.0, min(timers) - now)
                if read_task is None:
                    read_task = asyncio.ensure_future(self.reader.read(READ_CHUNK))
                wake = asyncio.ensure_future(self.wake.wait())
                done, _ = await asyncio.wait(
                    {read_task, wake}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                wake.cancel()
                self.wake.clear()
                now = self.now()
                if read_task in done:
                    data = read_task.result()
                    read_task = None
                    if not data:
                        self.link.status.last_close = "peer closed the TCP connection"
                        break
                    self.last_rx = now
                    self.conn.receive_data(data, now)
                    self._count_records()
                t = self.conn.get_timer()
                if t is not None and now >= t:
                    self.conn.handle_timer(now)
                if now - self.last_rx >= self.idle_limit():
                    self.conn.close(now, L.Alert.TIMEOUT, "peer silent")
                    self.link.status.last_close = "peer silent (dead-peer timeout)"
                elif (
                    self.conn.state is State.ESTABLISHED and now - self.last_tx >= KEEPALIVE_SECONDS
                ):
                    with contextlib.suppress(LocalProtocolError):
                        self.conn.send_message(b"", now)
            await self._handle_events()
            self.flush()
            with contextlib.suppress(ConnectionError, OSError):
                await asyncio.wait_for(self.writer.drain(), 2)
        except (ConnectionError, OSError) as exc:
            self.link.status.last_close = f"connection lost: {exc.__class__.__name__}"
        except Exception:  # a bug must cost one connection, never the gateway
            log.exception("connection aborted by an internal error")
            self.link.status.last_close = "internal error (see log)"
            self.link.internal_errors += 1
        finally:
            if read_task is not None:
                read_task.cancel()
            for task in list(self.tasks):
                task.cancel()
            self.closed.set()
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 2)

    async def _handle_events(self) -> None:
        link = self.link
        while (ev := self.conn.next_event()) is not None:
            if isinstance(ev, NeedQkdKeys):
                self._spawn(self._fetch(ev.count, None))
            elif isinstance(ev, NeedQkdKeysById):
                self._spawn(self._fetch(len(ev.key_ids), ev.key_ids))
            elif isinstance(ev, HandshakeComplete):
                link._on_established(self, ev)
            elif isinstance(ev, RekeyComplete):
                link._on_rekey(self, ev)
            elif isinstance(ev, MessageReceived):
                if ev.data:
                    await link._deliver(ev.data, self)
            elif isinstance(ev, Alarm):
                link._on_alarm(ev)
            elif isinstance(ev, Closed):
                link._on_closed(self, ev)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

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
                log.warning("QKD key source: %s failed (%s): %s", op, kind, exc)
        if self.is_closed():
            return
        try:
            self.conn.provide_qkd_keys(answer, self.now())
        except LocalProtocolError as exc:
            log.error("QKD keys could not be used: %s", exc)  # noqa: TRY400 -- no traceback needed
            self.conn.close(self.now(), L.Alert.INTERNAL_ERROR, "bad QKD key")
        self.wake.set()


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
        on_message: Callable[[bytes, object], Awaitable[None]],
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
        self._server: asyncio.Server | None = None
        self._listen_port: int | None = None
        self._rebootstrap_next = False
        self.internal_errors = 0
        self._unauthenticated: list[_Session] = []

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
                if s.writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                    try:
                        await s.writer.drain()
                    except (ConnectionError, OSError) as exc:
                        raise PeerUnavailable("peer link lost while sending") from exc
                return
            await asyncio.sleep(0.05)  # record budget exhausted: a rekey is under way
        raise PeerUnavailable("record budget exhausted and no rekey completed")

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
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 3)
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
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, int(port)),
                    self.settings.gateway.connect_timeout_seconds,
                )
            except (OSError, TimeoutError) as exc:
                self.status.last_close = f"connect failed: {exc.__class__.__name__}"
                log.info(
                    "connect to peer %s failed (%s); retry in %.1f s",
                    self.settings.gateway.peer,
                    exc.__class__.__name__,
                    delay,
                )
            else:
                ok = await self._serve_connection(reader, writer)
                if ok:
                    delay = 0.5
            if self.stopping():
                break
            await asyncio.sleep(random.uniform(0.5, 1.0) * delay)  # noqa: S311 -- jitter, not a secret
            delay = min(cap, delay * 2)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Run one connection; True if it reached ESTABLISHED."""
        conn = Connection(self.params, self.auth, self.provider, self.rng, self.assoc)
        s = _Session(self, conn, reader, writer)
        self.status.connected = True
        self.metrics.set_peer_connected(True)
        self.metrics.set_session("handshaking")
        if self.role is CoreRole.INITIATOR:
            self._current = s
            conn.start(s.now())
        try:
            await s.run()
        finally:
            if self._current is s:
                self._lost()
        return s.established.is_set()

    # --- responder ---

    async def _run_responder(self) -> None:
        host, _, port = self.settings.gateway.listen.rpartition(":")
        self._server = await asyncio.start_server(self._accept, host.strip("[]"), int(port))
        self._listen_port = self._server.sockets[0].getsockname()[1]
        log.info("listening for the peer gateway on %s:%s", host, self._listen_port)
        self.metrics.set_session("down")
        try:
            while not self._stopping:
                await asyncio.sleep(0.5)
        finally:
            self._server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopping:
            writer.close()
            return
        if len(self._unauthenticated) >= MAX_PENDING_CONNECTIONS:
            # Evict the oldest unauthenticated connection rather than refuse the newest, so
            # idle sockets cannot lock the real peer out.
            old = self._unauthenticated.pop(0)
            old.conn.close(old.now(), L.Alert.RATE_LIMITED, "too many unauthenticated connections")
            old.wake.set()
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        conn = Connection(
            self.params, self.auth, self.provider, self.rng, self.assoc, source=source
        )
        s = _Session(self, conn, reader, writer)
        self._unauthenticated.append(s)
        try:
            await s.run()
        finally:
            if s in self._unauthenticated:
                self._unauthenticated.remove(s)
            if self._current is s:
                self._lost()

    def _lost(self) -> None:
        self._current = None
        self._up.clear()
        self.status.connected = self.status.established = False
        self.metrics.set_peer_connected(False)
        self.metrics.set_session("down")
        if self.on_down is not None:
            self.on_down()

    # --- core events ---

    def _on_established(self, s: _Session, ev: HandshakeComplete) -> None:
        old = self._current
        if self.role is CoreRole.RESPONDER:
            if s in self._unauthenticated:
                self._unauthenticated.remove(s)
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
        if ev.resumed:
            st.resumptions += 1
        else:
            st.handshakes += 1
        reason = (
            "resumed" if ev.resumed else ("rebootstrap" if self._rebootstrap_next else "bootstrap")
        )
        self._rebootstrap_next = False
        self.metrics.handshake("ok", reason)
        self.metrics.set_peer_connected(True)
        self.metrics.set_session("established", ev.epoch, time.monotonic())
        self._set_mode(ev.qkd_used)
        log.info(
            "session %s with %s: epoch %d, %s%s",
            reason,
            ev.peer.name,
            ev.epoch,
            ev.suite,
            "+QKD" if ev.qkd_used else " (no QKD)",
        )
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

    def _on_alarm(self, ev: Alarm) -> None:
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
        log.warning("alarm %s: %s", ev.kind, ev.detail)

    def _on_closed(self, s: _Session, ev: Closed) -> None:
        st = self.status
        st.last_close = (
            f"{'peer' if ev.by_peer else 'local'}: {ev.alert.name.lower()} ({ev.reason})"
        )
        if not s.established.is_set():
            self.metrics.handshake("failed", ev.alert.name.lower())
        if ev.alert is L.Alert.RECORD_FAILURE and not ev.by_peer:
            self.metrics.record_auth_failure()
        if ev.alert is L.Alert.NO_SESSION and ev.by_peer:
            # The responder lost its state (restart): bootstrap again, visibly.
            self.assoc.forget()
            self._rebootstrap_next = True
            self.status.alarms["rebootstrap"] = "peer lost its session state; bootstrapping again"
            log.warning("peer has no session for our chain: bootstrapping again (alarm)")
        if ev.alert is L.Alert.QKD_UNAVAILABLE and not ev.by_peer:
            self.metrics.set_alarm("qkd_unavailable", True)
            self.status.alarms["qkd_unavailable"] = ev.reason
        level = logging.INFO if ev.alert is L.Alert.CLOSE_NOTIFY else logging.WARNING
        log.log(level, "connection closed: %s", st.last_close)

    async def _deliver(self, data: bytes, via: _Session) -> None:
        try:
            await self.on_message(data, via)
        except GatewayError as exc:
            log.warning("peer message not handled: %s", exc)
        except Exception:
            self.internal_errors += 1
            log.exception("peer message handler failed")
