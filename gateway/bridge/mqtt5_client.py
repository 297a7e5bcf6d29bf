"""The bridge's MQTT v5 client: a thin asyncio ``Protocol`` over the ``mqtt5`` codec.

``mqtt5`` (PyPI, Rust) parses and writes MQTT v5 packets and does no I/O. This module frames
packets on the socket, keeps the session rules in our hands and implements
:class:`gateway.bridge.client.BrokerClient` (docs/bridge.md, "Choice of MQTT client"):

- one thread, no hand-off: ``data_received`` parses whole packets and calls the bridge's
  ``on_message`` directly; acknowledgements and publishes are appended to a per-connection
  output buffer that is written once per event-loop iteration;
- manual acknowledgement: a PUBACK goes out only when the bridge calls :meth:`ack`, and only
  on the connection (*generation*) the PUBLISH arrived on. The output buffer belongs to one
  connection object, so an ack for a message of an earlier connection can never be written on
  a newer one (the broker redelivers that message on the new connection instead);
- our publishes respect the broker's Receive Maximum (CONNACK) and queue beyond it; PUBACK
  reason codes are parsed (0x87, 0x90, 0x99 are permanent refusals, other codes >= 0x80 are
  "not now"); one timeout sweep per second while publishes are outstanding, not a timer per
  message;
- persistent session (clean start false, session expiry), one SUBSCRIBE per rule with a
  subscription identifier, No Local, Retain As Published, Retain Handling 1; keepalive with
  PINGREQ; reconnect with exponential back-off (1 .. 30 s);
- with ``broker_stats=True`` (the bridge's client), once the rules are subscribed, one more
  SUBSCRIBE at QoS 0 for a few ``$SYS/broker/...`` topics (:data:`SYS_TOPICS`, identifier
  :data:`SYS_SUBSCRIPTION_ID`): their latest values are kept in :attr:`broker_stats` for
  ``qgw status`` and never reach the bridge. A refusal (ACL) or a broker that drops the
  connection over it turns the subscription off for this process; nothing else changes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import mqtt5

from gateway.bridge.client import (
    CONNECT_TIMEOUT_SECONDS,
    KEEPALIVE_SECONDS,
    PERMANENT_REFUSALS,
    PUBLISH_TIMEOUT_SECONDS,
    RECONNECT_MAX_SECONDS,
    RECONNECT_MIN_SECONDS,
    SESSION_EXPIRY_SECONDS,
    Incoming,
    Subscription,
    parse_broker_url,
)
from gateway.bridge.transport import MessageProps
from gateway.config import MqttSection
from gateway.errors import BrokerRejected, BrokerUnavailable, GatewayError

log = logging.getLogger("qgw.bridge.client")

SWEEP_SECONDS = 1.0  # publish timeouts are checked once per second, not per message
#: The $SYS subscription's identifier: MQTT 5's largest (3.8.2.1.2); rules use 1..len(rules).
SYS_SUBSCRIPTION_ID = 268_435_455
#: mosquitto's $SYS topics worth showing in `qgw status` (published every `sys_interval`,
#: default 10 s, retained; each value only when it changed, uptime every time) -> our name.
SYS_TOPICS = {
    "$SYS/broker/store/messages/count": "stored_messages",  # all messages held, broker-wide
    "$SYS/broker/messages/stored": "stored_messages",  # the same, mosquitto 1.x name
    "$SYS/broker/store/messages/bytes": "stored_bytes",
    "$SYS/broker/publish/messages/dropped": "dropped_messages",  # queue limits reached
    "$SYS/broker/clients/connected": "clients_connected",
    "$SYS/broker/clients/disconnected": "clients_disconnected",  # persistent sessions held
    "$SYS/broker/uptime": "uptime_seconds",
    "$SYS/broker/version": "version",
}
#: A connection lost within SYS_GRACE_SECONDS of the $SYS subscribe is a strike against it
#: (a broker that drops clients over a forbidden subscription or its traffic); after
#: SYS_STRIKES strikes in a row we stop asking, so the bridge can never loop on it.
SYS_GRACE_SECONDS = 5.0
SYS_STRIKES = 2
MAX_SYS_TEXT = 100  # characters kept of a text value (version)
MAX_PACKET_BYTES = 268_435_455 + 5  # MQTT's largest remaining length plus the fixed header

_QOS = (mqtt5.QoS.AT_MOST_ONCE, mqtt5.QoS.AT_LEAST_ONCE)
_NO_PROPS = MessageProps()

# (reason code or None for "connection gone / timed out", text) -> None
PublishDone = Callable[[int | None, str], None]


def _outcome_error(code: int | None, text: str) -> GatewayError | None:
    """The exception for a publish outcome (None: accepted)."""
    if code is None:
        return BrokerUnavailable(text)
    if code in PERMANENT_REFUSALS:
        return BrokerRejected(f"broker refused the publish: {text}", code)
    if code >= 0x80:  # quota, unspecified, packet id in use: may pass later
        return BrokerUnavailable(f"broker did not take the publish now: {text}")
    return None


def props_from_packet(p: mqtt5.PublishPacket) -> MessageProps:
    users = p.user_properties
    ct, rt, cd, mei = (
        p.content_type,
        p.response_topic,
        p.correlation_data,
        p.message_expiry_interval,
    )
    pfi = p.payload_format_indicator
    if not users and ct is None and rt is None and cd is None and mei is None and not pfi:
        return _NO_PROPS
    return MessageProps(
        user_properties=tuple(users),
        content_type=ct,
        response_topic=rt,
        correlation_data=cd,
        message_expiry_interval=mei,
        # 0 (unspecified bytes) is what an absent indicator means (MQTT 5 3.3.2.3.2); the
        # codec cannot tell them apart, so both travel as absent.
        payload_format_indicator=pfi or None,
    )


def _packet_end(buf: bytearray, pos: int, n: int) -> int:
    """End of the packet starting at ``pos`` (fixed header: one type/flags byte, then a 1..4
    byte variable-length remaining length), or -1 if it has not fully arrived."""
    length = 0
    shift = 0
    i = pos + 1
    while True:
        if i >= n:
            return -1
        b = buf[i]
        length |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            break
        shift += 7
        if shift > 21:
            raise ValueError("remaining length longer than 4 bytes")
    end = i + length
    return end if end <= n else -1


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to the broker: framing, parsing, coalesced writes."""

    def __init__(self, client: Mqtt5BrokerClient, generation: int) -> None:
        self.client = client
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._out = bytearray()
        self._flush_scheduled = False
        self.lost = False
        self.established = False  # CONNACK success received
        self.last_rx = self.last_tx = time.monotonic()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        buf = self._buf
        buf += data
        n = len(buf)
        pos = 0
        handle = self.client._handle_packet
        try:
            while n - pos >= 2:
                end = _packet_end(buf, pos, n)
                if end < 0:
                    break  # partial packet: wait for more bytes
                packet, used = mqtt5.read(memoryview(buf)[pos:end])
                if used != end - pos:
                    raise ValueError("packet length mismatch")  # noqa: TRY301 -- same handler
                pos = end
                handle(self, packet)
                if self.lost:
                    return
        except (ValueError, IndexError) as exc:
            self.client.protocol_errors += 1
            log.warning("malformed packet from the broker (%s); reconnecting", exc)
            self.abort()
            return
        except Exception:  # a bug must cost one broker connection, never the gateway
            self.client.protocol_errors += 1
            log.exception("internal error on a packet from the broker; reconnecting")
            self.abort()
            return
        finally:
            if pos:
                del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._out.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        self.client._connection_lost(self, exc)

    # -- writing ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue bytes for this connection; they go out at the end of this loop iteration."""
        if self.lost:
            return
        self._out += data
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self.lost and self.transport is not None:
            self.transport.write(bytes(self._out))
            self.last_tx = time.monotonic()
        self._out.clear()

    def abort(self) -> None:
        self._out.clear()
        if self.transport is not None:
            self.transport.abort()


class _Pending:
    __slots__ = ("deadline", "done")

    def __init__(self, deadline: float, done: PublishDone) -> None:
        self.deadline = deadline
        self.done = done


# an outgoing QoS 1 publish: topic, payload, retain, properties, pending
_Job = tuple[str, bytes, bool, MessageProps, _Pending]


class Mqtt5BrokerClient:
    """:class:`gateway.bridge.client.BrokerClient` on the ``mqtt5`` codec (single thread)."""

    def __init__(
        self,
        settings: MqttSection,
        *,
        receive_maximum: int | None = None,
        session_expiry_seconds: int = SESSION_EXPIRY_SECONDS,
        keepalive_seconds: int = KEEPALIVE_SECONDS,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        publish_timeout: float = PUBLISH_TIMEOUT_SECONDS,
        broker_stats: bool = False,
    ) -> None:
        self._settings = settings
        self._host, self._port, self._tls = parse_broker_url(settings.broker)
        self._receive_maximum = max(1, min(65535, receive_maximum or settings.inflight))
        self._session_expiry = session_expiry_seconds
        self._keepalive = keepalive_seconds  # what we ask for in CONNECT
        self._effective_keepalive = keepalive_seconds  # the broker's Server Keep Alive wins
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout
        self._on_message: Callable[[Incoming], None] | None = None
        self._subs: tuple[Subscription, ...] = ()
        self._conn: _Connection | None = None  # the current connection, once CONNACKed
        self._connecting: _Connection | None = None
        self._generation = 0
        self._had_session = False  # a CONNACK succeeded before (the broker holds our session)
        self.sessions_lost = 0  # CONNACKs without our session after we had one
        self._connected = False
        self._paused = False
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None  # first CONNACK + SUBACKs
        self._pending_subacks: set[int] = set()
        # our QoS 1 publishes: packet id -> pending; beyond the broker's Receive Maximum
        # they wait in _queue (packet not yet built with an id)
        self._inflight: dict[int, _Pending] = {}
        self._queue: collections.deque[_Job] = collections.deque()
        self._send_quota = 65535  # the broker's Receive Maximum (CONNACK)
        self._next_id = 1
        self._sweep: asyncio.TimerHandle | None = None
        self._keepalive_timer: asyncio.TimerHandle | None = None
        # $SYS (broker_stats): latest values by our name, and when the last one arrived
        self._sys_wanted = broker_stats
        self._sys_pid: int | None = None  # SUBACK outstanding for the $SYS subscription
        self._sys_sent_at: float | None = None  # monotonic time of this connection's subscribe
        self._sys_strikes = 0
        self.broker_stats: dict[str, int | str] = {}
        self.broker_stats_updated: float | None = None  # time.time() of the last $SYS value
        self.protocol_errors = 0
        self.redeliveries = 0  # QoS 1 deliveries with DUP = 1: the broker sent them before
        self.unacked_incoming = 0  # QoS 1 deliveries handed to the bridge, not yet acked
        self.receive_max_exceeded = 0  # deliveries beyond our Receive Maximum (broker's fault)

    def __repr__(self) -> str:
        return f"<Mqtt5BrokerClient {self._settings.client_id}@{self._host}:{self._port}>"

    @property
    def connected(self) -> bool:
        return self._connected

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(
        self, subscriptions: Sequence[Subscription], on_message: Callable[[Incoming], None]
    ) -> None:
        loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._subs = tuple(subscriptions)
        self._paused = False
        self._stopping = False
        self._ready = loop.create_future()
        self._runner = loop.create_task(self._run())
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self._connect_timeout)
        except (TimeoutError, BrokerUnavailable) as exc:
            await self.stop()
            if isinstance(exc, BrokerUnavailable):
                raise
            raise BrokerUnavailable(
                f"no connection to broker {self._host}:{self._port} within "
                f"{self._connect_timeout:g} s"
            ) from exc

    def pause(self) -> None:
        self._paused = True

    async def stop(self) -> None:
        """Disconnect (session expiry unchanged: the broker keeps our queue); nothing more is
        acknowledged."""
        self._paused = True
        self._stopping = True
        self._on_message = None
        conn = self._conn or self._connecting
        if conn is not None and not conn.lost:
            conn.write(mqtt5.DisconnectPacket().write())
            conn.flush()
            # Let the broker close first: it has then read our last PUBACKs. Closing at once
            # can lose them (measured: mosquitto redelivered acked messages).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.closed), 2)
            conn.abort()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        self._set_disconnected("bridge client stopped")

    async def _run(self) -> None:
        delay = float(RECONNECT_MIN_SECONDS)
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._generation += 1
            try:
                ctx = self._ssl_context() if self._tls else None
                _, conn = await asyncio.wait_for(
                    loop.create_connection(self._new_connection, self._host, self._port, ssl=ctx),
                    self._connect_timeout,
                )
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                log.info("connect to broker %s:%d failed: %s", self._host, self._port, exc)
            else:
                conn.write(self._connect_packet())
                await conn.closed
                if conn.established:  # it had been up: the next attempt starts from 1 s again
                    delay = float(RECONNECT_MIN_SECONDS)
            if self._stopped():
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, float(RECONNECT_MAX_SECONDS))

    def _stopped(self) -> bool:
        return self._stopping

    def _new_connection(self) -> _Connection:
        conn = _Connection(self, self._generation)
        self._connecting = conn
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        s = self._settings
        ctx = ssl.create_default_context(cafile=str(s.tls_ca) if s.tls_ca else None)
        if s.tls_cert:
            ctx.load_cert_chain(str(s.tls_cert), str(s.tls_key) if s.tls_key else None)
        return ctx

    def _connect_packet(self) -> bytes:
        s = self._settings
        pw = s.password.get_secret_value().encode() if s.password is not None else None
        return mqtt5.ConnectPacket(
            s.client_id,
            username=s.username,
            password=pw,
            clean_start=False,
            keep_alive=self._keepalive,
            session_expiry_interval=self._session_expiry,
            receive_max=self._receive_maximum,
            topic_alias_max=0,
        ).write()

    # -- packets from the broker ----------------------------------------------------------------

    def _handle_packet(self, conn: _Connection, p: Any) -> None:
        if isinstance(p, mqtt5.PublishPacket):
            self._on_publish(conn, p)
        elif isinstance(p, mqtt5.PubAckPacket):
            self._on_puback(p.packet_id, int(p.reason_code), p.reason_str)
        elif isinstance(p, mqtt5.ConnAckPacket):
            self._on_connack(conn, p)
        elif isinstance(p, mqtt5.SubAckPacket):
            self._on_suback(p)
        elif isinstance(p, mqtt5.PingRespPacket):
            pass
        elif isinstance(p, mqtt5.DisconnectPacket):
            log.warning("broker disconnected us: %s", p.reason_code.name)
            conn.abort()
        else:
            self.protocol_errors += 1
            log.warning("unexpected %s from the broker; reconnecting", type(p).__name__)
            conn.abort()

    def _on_connack(self, conn: _Connection, p: mqtt5.ConnAckPacket) -> None:
        if p.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            text = f"broker refused the connection: {p.reason_code.name}"
            log.warning("%s", text)
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(BrokerUnavailable(text))
            conn.abort()
            return
        conn.established = True
        self._conn = conn
        self._connecting = None
        self._connected = True
        self._send_quota = max(1, p.receive_max)
        if self._had_session and not p.session_present:
            # The broker forgot our persistent session (restart without it on disk, expiry):
            # messages published for us while we were away may have been dropped (issue 18).
            self.sessions_lost += 1
            log.warning(
                "broker %s:%d has no session for us (session present = 0): messages published "
                "while we were disconnected may be lost (alarm broker-session-lost; persist "
                "the broker's sessions, docs/bridge.md)",
                self._host,
                self._port,
            )
        self._had_session = True
        self.unacked_incoming = 0
        log.info(
            "connected to broker %s:%d (session present: %s)",
            self._host,
            self._port,
            p.session_present,
        )
        # MQTT 5 3.2.2.3.14: a Server Keep Alive in the CONNACK replaces ours
        ska = p.server_keep_alive
        self._effective_keepalive = self._keepalive if ska is None else ska
        self._arm_keepalive()
        # Subscribe every time: harmless with a present session (Retain Handling 1 sends
        # retained messages only for new subscriptions), needed if the session expired.
        self._pending_subacks.clear()
        self._sys_pid = None
        self._sys_sent_at = None
        for s in self._subs:
            pid = self._take_id()
            self._pending_subacks.add(pid)
            conn.write(
                mqtt5.SubscribePacket(
                    pid,
                    [
                        mqtt5.TopicFilter(
                            s.topic_filter,
                            max_qos=_QOS[s.qos],
                            no_local=s.no_local,
                            retain_as_published=True,
                            retain_handling=mqtt5.RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS,
                        )
                    ],
                    subscription_id=s.identifier,
                ).write()
            )
        if not self._pending_subacks:
            self._became_ready()
            self._subscribe_sys(conn)
        self._send_queued()

    def _on_suback(self, p: mqtt5.SubAckPacket) -> None:
        if p.packet_id == self._sys_pid:
            self._on_sys_suback(p)
            return
        for code in p.reason_codes:
            if int(code) >= 0x80:
                log.error("broker refused a bridge subscription: %s", code.name)
        self._pending_subacks.discard(p.packet_id)
        if not self._pending_subacks:
            self._became_ready()
            if self._conn is not None:
                self._subscribe_sys(self._conn)

    # -- $SYS: the broker's own statistics, for `qgw status` ------------------------------------

    def _subscribe_sys(self, conn: _Connection) -> None:
        """After the rules' SUBACKs (so it can never delay or break them): $SYS at QoS 0."""
        if not self._sys_wanted or self._sys_pid is not None or conn.lost:
            return
        pid = self._take_id()
        self._sys_pid = pid
        self._sys_sent_at = time.monotonic()
        filters = [
            mqtt5.TopicFilter(
                topic,
                max_qos=mqtt5.QoS.AT_MOST_ONCE,
                retain_as_published=True,
                retain_handling=mqtt5.RetainHandling.SEND_ALWAYS,  # current values at once
            )
            for topic in SYS_TOPICS
        ]
        conn.write(mqtt5.SubscribePacket(pid, filters, subscription_id=SYS_SUBSCRIPTION_ID).write())

    def _on_sys_suback(self, p: mqtt5.SubAckPacket) -> None:
        self._sys_pid = -1  # answered (not None: no second SUBSCRIBE on this connection)
        refused = [c for c in p.reason_codes if int(c) >= 0x80]
        if refused and len(refused) == len(p.reason_codes):
            self._sys_wanted = False
            log.info(
                "the broker does not let us read $SYS (%s): `qgw status` shows no broker "
                "queue; the bridge is not affected",
                refused[0].name,
            )

    def _on_sys_publish(self, p: mqtt5.PublishPacket) -> None:
        """Keep one $SYS value; anything unparsable is ignored (not counted as bad input)."""
        name = SYS_TOPICS.get(p.topic)
        if name is None:
            return
        text = bytes(p.payload[:MAX_SYS_TEXT]).decode("utf-8", "replace").strip()
        value: int | str
        if name == "version":
            value = "".join(ch for ch in text if ch.isprintable())
        else:
            word = text.split(" ", 1)[0]  # "1234 seconds" for the uptime
            if not word.isdigit():
                return
            value = int(word)
        self.broker_stats[name] = value
        self.broker_stats_updated = time.time()

    def _became_ready(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def _on_publish(self, conn: _Connection, p: mqtt5.PublishPacket) -> None:
        sids = p.subscription_ids
        if SYS_SUBSCRIPTION_ID in sids:
            self._on_sys_publish(p)
            if int(p.qos) and len(sids) == 1:  # we asked for QoS 0; ack a broker that upgraded
                conn.write(mqtt5.PubAckPacket(p.packet_id or 0).write())
            if len(sids) == 1:
                return  # only ours: never handed to the bridge, never forwarded
        on_message = self._on_message
        if on_message is None or self._paused:
            return  # not acked: the broker redelivers it to the next session holder
        qos = int(p.qos)
        if qos == 2:  # we never subscribe at QoS 2; a broker that sends it is broken
            self.protocol_errors += 1
            log.warning("QoS 2 PUBLISH from the broker (subscribed at <= 1); reconnecting")
            conn.abort()
            return
        pid = p.packet_id or 0
        if qos:
            if p.duplicate:  # sent before (an earlier connection, or before a broker restart)
                self.redeliveries += 1
            self.unacked_incoming += 1
            if self.unacked_incoming > self._receive_maximum:
                # mosquitto 2.0.x sends past our Receive Maximum once acks flow; the bridge's
                # own window bounds the work, so count it rather than disconnect.
                self.receive_max_exceeded += 1
        on_message(
            Incoming(
                p.topic,
                p.payload,
                qos,
                p.retain,
                props_from_packet(p),
                tuple(sids),
                (conn.generation, pid),
            )
        )

    def _on_puback(self, pid: int, code: int, reason: str | None) -> None:
        pend = self._inflight.pop(pid, None)
        if pend is None:
            return  # late (timed out) or unknown: nothing waits for it
        pend.done(code, reason or f"reason code 0x{code:02x}")
        self._send_queued()

    # -- the BrokerClient surface ---------------------------------------------------------------

    def is_current(self, msg: Incoming) -> bool:
        """False once the connection the message came on is gone (the broker redelivers it)."""
        conn = self._conn
        return conn is not None and not conn.lost and msg.token[0] == conn.generation

    def ack(self, msg: Incoming) -> bool:
        if msg.qos == 0:
            return True
        conn = self._conn
        generation, pid = msg.token
        if conn is None or conn.lost or generation != conn.generation:
            return False  # that connection is gone: the broker redelivers on the new one
        conn.write(mqtt5.PubAckPacket(pid).write())
        self.unacked_incoming -= 1
        return True

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        properties: MessageProps,
        done: PublishDone,
    ) -> None:
        """Publish; ``done(code, text)`` is called once: code 0..0x7F accepted, >= 0x80 the
        broker's refusal, None not connected / connection lost / timed out. For QoS 0 it is
        called once the packet is queued for writing."""
        conn = self._conn
        if conn is None or conn.lost or not self._connected:
            done(None, "not connected to the local broker")
            return
        if qos == 0:
            data = self._build(topic, payload, 0, retain, properties, None, done)
            if data is not None:
                conn.write(data)
                done(0, "written")
            return
        pend = _Pending(time.monotonic() + self._publish_timeout, done)
        job = (topic, payload, retain, properties, pend)
        if len(self._inflight) < self._send_quota and not self._queue:
            self._send(conn, job)
        else:
            self._queue.append(job)
        self._arm_sweep()

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: MessageProps
    ) -> None:
        fut: asyncio.Future[GatewayError | None] = asyncio.get_running_loop().create_future()

        def done(code: int | None, text: str) -> None:
            if not fut.done():
                fut.set_result(_outcome_error(code, text))

        self.publish_nowait(
            topic, payload, qos=qos, retain=retain, properties=properties, done=done
        )
        err = await fut
        if err is not None:
            raise err

    # -- internals ------------------------------------------------------------------------------

    def _take_id(self) -> int:
        for _ in range(65536):
            pid = self._next_id
            self._next_id = pid % 65535 + 1
            if (
                pid not in self._inflight
                and pid not in self._pending_subacks
                and pid != self._sys_pid
            ):
                return pid
        raise BrokerUnavailable("no free packet identifier")  # pragma: no cover

    @staticmethod
    def _build(  # noqa: PLR0917 -- one hot-path helper, positional for speed
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        p: MessageProps,
        pid: int | None,
        done: PublishDone,
    ) -> bytes | None:
        try:
            return mqtt5.PublishPacket(
                topic,
                payload,
                qos=_QOS[qos],
                retain=retain,
                packet_id=pid,
                payload_format_indicator=p.payload_format_indicator or 0,
                message_expiry_interval=p.message_expiry_interval,
                content_type=p.content_type,
                response_topic=p.response_topic,
                correlation_data=p.correlation_data,
                user_properties=list(p.user_properties),
            ).write()
        except (ValueError, TypeError, IndexError, OverflowError) as exc:
            done(0x80, f"publish refused by the client: {exc}")
            return None

    def _send(self, conn: _Connection, job: _Job) -> None:
        topic, payload, retain, props, pend = job
        pid = self._take_id()
        data = self._build(topic, payload, 1, retain, props, pid, pend.done)
        if data is not None:
            self._inflight[pid] = pend
            conn.write(data)

    def _send_queued(self) -> None:
        conn = self._conn
        if conn is None or conn.lost:
            return
        q = self._queue
        while q and len(self._inflight) < self._send_quota:
            self._send(conn, q.popleft())

    def _arm_sweep(self) -> None:
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._do_sweep)

    def _do_sweep(self) -> None:
        """One pass per second over outstanding publishes (instead of a timer per message)."""
        self._sweep = None
        now = time.monotonic()
        text = f"no PUBACK from the local broker within {self._publish_timeout:g} s"
        for pid in [k for k, v in self._inflight.items() if v.deadline <= now]:
            self._inflight.pop(pid).done(None, text)
        while self._queue and self._queue[0][4].deadline <= now:
            self._queue.popleft()[4].done(None, text)
        self._send_queued()
        if self._inflight or self._queue:
            self._arm_sweep()

    def _arm_keepalive(self) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
        if self._effective_keepalive > 0:
            self._keepalive_timer = asyncio.get_running_loop().call_later(
                self._effective_keepalive / 2, self._keepalive_tick
            )

    def _keepalive_tick(self) -> None:
        self._keepalive_timer = None
        conn = self._conn
        if conn is None or conn.lost:
            return
        now = time.monotonic()
        keepalive = self._effective_keepalive
        if now - conn.last_rx > keepalive * 1.5:
            log.warning("broker silent for %.0f s; reconnecting", now - conn.last_rx)
            conn.abort()
            return
        if now - conn.last_tx >= keepalive / 2:
            conn.write(mqtt5.PingReqPacket().write())
        self._arm_keepalive()

    def _connection_lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn is self._connecting:
            self._connecting = None
            if self._ready is not None and not self._ready.done() and self._stopping:
                self._ready.set_exception(BrokerUnavailable("bridge client stopped"))
        if conn is not self._conn:
            return
        sent = self._sys_sent_at
        if sent is not None and self._sys_wanted and not self._stopping:
            if time.monotonic() - sent < SYS_GRACE_SECONDS:
                self._sys_strikes += 1
                if self._sys_strikes >= SYS_STRIKES:
                    self._sys_wanted = False
                    log.warning(
                        "the broker closed the connection %d times right after our $SYS "
                        "subscribe; not subscribing to $SYS again (`qgw status` shows no "
                        "broker queue)",
                        self._sys_strikes,
                    )
            else:
                self._sys_strikes = 0  # that connection lived: $SYS was not the problem
        if self._connected and not self._stopping:
            log.warning("disconnected from broker: %s", exc or "closed")
        self._set_disconnected("connection to the local broker lost before its PUBACK")

    def _set_disconnected(self, why: str) -> None:
        self._connected = False
        self._conn = None
        self._pending_subacks.clear()
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        # Outstanding publishes fail now: the peer keeps the message and sends it again.
        pending = [*self._inflight.values(), *(job[4] for job in self._queue)]
        self._inflight.clear()
        self._queue.clear()
        for pend in pending:
            pend.done(None, why)
        if self._sweep is not None and not pending:
            self._sweep.cancel()
            self._sweep = None
