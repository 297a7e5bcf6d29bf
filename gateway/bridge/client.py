"""The bridge's view of its local broker, and the paho-mqtt implementation of it.

The bridge's default client is :class:`gateway.bridge.mqtt5_client.Mqtt5BrokerClient` (a
single-threaded asyncio client over the ``mqtt5`` codec); :class:`PahoBrokerClient` is kept
behind the same interface for comparison measurements (docs/bridge.md, "Choice of MQTT
client").

The bridge needs four things from an MQTT client: subscribe with v5 options (No Local,
Retain As Published, a subscription identifier per rule), receive messages *without*
acknowledging them, acknowledge one message later, and publish with a wait for the broker's
PUBACK and its reason code. :class:`BrokerClient` is that interface; the bridge code does not
know which library sits underneath.

:class:`PahoBrokerClient` uses paho-mqtt 2.x with ``manual_ack=True`` and its threaded
network loop (see docs/bridge.md for the measurements behind the choice). Threading rules:

- paho calls ``on_message`` / ``on_publish`` / ``on_connect`` in its network thread; every
  callback only converts data and hands it to the asyncio loop with
  ``loop.call_soon_threadsafe``. No lock is shared between the two threads.
- ``ack`` and ``publish`` are called from the asyncio thread; paho queues the packet and
  wakes its network thread (paho documents publish/ack as thread-safe).
- Every (re)connect starts a new *generation*. A message is acknowledged only on the
  connection it arrived on: after a reconnect the broker redelivers what we had not acked
  (persistent session), so an ack for the old delivery is dropped instead of being sent as a
  stray PUBACK on the new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.bridge.transport import MessageProps
from gateway.config import MqttSection
from gateway.errors import BrokerRejected, BrokerUnavailable, ConfigError

log = logging.getLogger("qgw.bridge.client")

SESSION_EXPIRY_SECONDS = 7 * 24 * 3600  # the broker keeps our queue for a week of outage
KEEPALIVE_SECONDS = 30
CONNECT_TIMEOUT_SECONDS = 10.0
PUBLISH_TIMEOUT_SECONDS = 20.0  # below the peer's forward timeout (30 s): one delivery per attempt
# PUBACK reason codes that retrying cannot fix (MQTT 5 3.4.2.1): not authorized, topic name
# invalid, payload format invalid. Anything else >= 0x80 is treated as "not now".
PERMANENT_REFUSALS = frozenset({0x87, 0x90, 0x99})
RECONNECT_MIN_SECONDS = 1
RECONNECT_MAX_SECONDS = 30


@dataclass(frozen=True, slots=True)
class Subscription:
    """One subscription the bridge asks for (one per outbound rule)."""

    topic_filter: str
    qos: int
    no_local: bool
    identifier: int  # MQTT v5 subscription identifier (1..268435455): tells which rule matched


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message from the local broker, not yet acknowledged."""

    topic: str
    payload: bytes = field(repr=False)
    qos: int
    retain: bool
    properties: MessageProps
    subscription_ids: tuple[int, ...]
    token: tuple[int, int]  # (connection generation, packet id): opaque to the bridge


class BrokerClient(Protocol):
    """What the bridge needs from an MQTT v5 client with manual acknowledgement."""

    @property
    def connected(self) -> bool: ...

    async def start(
        self, subscriptions: Sequence[Subscription], on_message: Callable[[Incoming], None]
    ) -> None:
        """Connect (persistent session), subscribe, and keep reconnecting until stop().

        ``on_message`` is called in the asyncio thread for every message; the client never
        acknowledges by itself. Raise BrokerUnavailable if the first connect fails in time.
        """
        ...

    def pause(self) -> None:
        """Stop handing new messages to ``on_message`` (they stay unacked at the broker)."""
        ...

    def is_current(self, msg: Incoming) -> bool:
        """False once the connection the message arrived on is gone."""
        ...

    def ack(self, msg: Incoming) -> bool:
        """Acknowledge ``msg``; False if the connection it came on is gone (it will be
        redelivered) -- the caller only counts that."""
        ...

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: MessageProps
    ) -> None:
        """Publish and return after the broker's PUBACK (QoS 1) or once written (QoS 0).
        Raise BrokerUnavailable (not connected, timeout) or BrokerRejected (reason >= 0x80)."""
        ...

    async def stop(self) -> None:
        """Disconnect without acknowledging anything still unacked; the session stays."""
        ...


def _new_props(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho lacks hints here


def props_from_paho(p: Properties | None) -> MessageProps:
    if p is None:
        return MessageProps()
    users = getattr(p, "UserProperty", None) or []
    corr = getattr(p, "CorrelationData", None)
    return MessageProps(
        user_properties=tuple((str(k), str(v)) for k, v in users),
        content_type=getattr(p, "ContentType", None),
        response_topic=getattr(p, "ResponseTopic", None),
        correlation_data=bytes(corr) if corr is not None else None,
        message_expiry_interval=getattr(p, "MessageExpiryInterval", None),
        payload_format_indicator=getattr(p, "PayloadFormatIndicator", None),
    )


def props_to_paho(m: MessageProps) -> Properties:
    p = _new_props(PacketTypes.PUBLISH)
    if m.user_properties:
        p.UserProperty = list(m.user_properties)
    if m.content_type is not None:
        p.ContentType = m.content_type
    if m.response_topic is not None:
        p.ResponseTopic = m.response_topic
    if m.correlation_data is not None:
        p.CorrelationData = m.correlation_data
    if m.message_expiry_interval is not None:
        p.MessageExpiryInterval = m.message_expiry_interval
    if m.payload_format_indicator is not None:
        p.PayloadFormatIndicator = m.payload_format_indicator
    return p


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host:port`` or ``mqtts://host:port`` -> (host, port, tls)."""
    parts = urlsplit(url)
    tls = parts.scheme == "mqtts"
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError([("mqtt.broker", f"not an mqtt:// or mqtts:// URL: {url!r}")])
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError([("mqtt.broker", "bad port")]) from exc
    return parts.hostname, port, tls


class PahoBrokerClient:
    """:class:`BrokerClient` on paho-mqtt 2.x (threaded loop, manual acknowledgement)."""

    def __init__(
        self,
        settings: MqttSection,
        *,
        receive_maximum: int | None = None,
        session_expiry_seconds: int = SESSION_EXPIRY_SECONDS,
        keepalive_seconds: int = KEEPALIVE_SECONDS,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        publish_timeout: float = PUBLISH_TIMEOUT_SECONDS,
    ) -> None:
        self._settings = settings
        self._host, self._port, tls = parse_broker_url(settings.broker)
        self._receive_maximum = max(1, min(65535, receive_maximum or settings.inflight))
        self._session_expiry = session_expiry_seconds
        self._keepalive = keepalive_seconds
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: Callable[[Incoming], None] | None = None
        self._subs: tuple[Subscription, ...] = ()
        self._generation = 0  # written in the asyncio thread only
        self._connected = False
        self._paused = threading.Event()  # set: drop new deliveries (leave them unacked)
        self._first_connect: asyncio.Future[None] | None = None
        self._pending_subacks: set[int] = set()
        self._subscribed: asyncio.Event | None = None
        self._publishes: dict[int, asyncio.Future[None]] = {}

        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        if settings.username is not None:
            pw = settings.password.get_secret_value() if settings.password else None
            c.username_pw_set(settings.username, pw)
        if tls:
            c.tls_set(
                ca_certs=str(settings.tls_ca) if settings.tls_ca else None,
                certfile=str(settings.tls_cert) if settings.tls_cert else None,
                keyfile=str(settings.tls_key) if settings.tls_key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        c.max_inflight_messages_set(min(65535, max(20, settings.inflight)))
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(RECONNECT_MIN_SECONDS, RECONNECT_MAX_SECONDS)
        c.on_connect = self._cb_connect
        c.on_disconnect = self._cb_disconnect
        c.on_message = self._cb_message
        c.on_publish = self._cb_publish
        c.on_subscribe = self._cb_subscribe
        self._client = c

    def __repr__(self) -> str:
        return f"<PahoBrokerClient {self._settings.client_id}@{self._host}:{self._port}>"

    @property
    def connected(self) -> bool:
        return self._connected

    # -- paho network thread: convert and hand over, nothing else -----------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closed between the check and here
            loop.call_soon_threadsafe(fn, *args)

    def _cb_connect(
        self, _c: paho.Client, _u: Any, flags: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        self._post(self._on_connect, bool(getattr(flags, "session_present", False)), rc)

    def _cb_disconnect(self, _c: paho.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self._post(self._on_disconnect, rc)

    def _cb_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if self._paused.is_set():
            return  # not acked: the broker redelivers it to the next session holder
        props = msg.properties
        sub_ids = getattr(props, "SubscriptionIdentifier", None) if props else None
        fields = (
            msg.topic,
            bytes(msg.payload),
            msg.qos,
            bool(msg.retain),
            props_from_paho(props),
            tuple(sub_ids or ()),
        )
        self._post(self._on_incoming, fields, msg.mid)

    def _cb_publish(self, _c: paho.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        self._post(self._on_published, mid, rc.value, str(rc))

    def _cb_subscribe(
        self, _c: paho.Client, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any
    ) -> None:
        self._post(self._on_subscribed, mid, [(r.value, str(r)) for r in rcs])

    # -- asyncio thread -------------------------------------------------------------------

    def _on_connect(self, session_present: bool, rc: ReasonCode) -> None:
        if rc.is_failure:
            log.warning("broker refused the connection: %s", rc)
            if self._first_connect is not None and not self._first_connect.done():
                self._first_connect.set_exception(
                    BrokerUnavailable(f"broker refused the connection: {rc}")
                )
            return
        self._generation += 1
        self._connected = True
        log.info(
            "connected to broker %s:%d (session present: %s)",
            self._host,
            self._port,
            session_present,
        )
        # Subscribe every time: harmless with a present session (Retain Handling 1 sends
        # retained messages only for new subscriptions), needed if the session expired.
        for s in self._subs:
            props = _new_props(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = s.identifier
            opts = SubscribeOptions(
                qos=s.qos,
                noLocal=s.no_local,
                retainAsPublished=True,
                retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB,
            )
            rc2, mid = self._client.subscribe(s.topic_filter, options=opts, properties=props)
            if rc2 == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._pending_subacks.add(mid)
        if not self._pending_subacks and self._subscribed is not None:
            self._subscribed.set()
        if self._first_connect is not None and not self._first_connect.done():
            self._first_connect.set_result(None)

    def _on_disconnect(self, rc: ReasonCode) -> None:
        if self._connected:
            log.warning("disconnected from broker: %s", rc)
        self._connected = False
        self._generation += 1
        self._pending_subacks.clear()

    def _on_incoming(
        self,
        fields: tuple[str, bytes, int, bool, MessageProps, tuple[int, ...]],
        mid: int,
    ) -> None:
        if self._on_message is None or self._paused.is_set():
            return
        self._on_message(Incoming(*fields, token=(self._generation, mid)))

    def _on_published(self, mid: int, rc: int, text: str) -> None:
        fut = self._publishes.pop(mid, None)
        if fut is None or fut.done():
            return
        if rc in PERMANENT_REFUSALS:
            fut.set_exception(BrokerRejected(f"broker refused the publish: {text}", rc))
        elif rc >= 0x80:  # may pass (quota, unspecified, packet id in use): try again later
            fut.set_exception(BrokerUnavailable(f"broker did not take the publish now: {text}"))
        else:
            fut.set_result(None)

    def _on_subscribed(self, mid: int, results: list[tuple[int, str]]) -> None:
        for code, text in results:
            if code >= 0x80:
                log.error("broker refused a bridge subscription: %s", text)
        self._pending_subacks.discard(mid)
        if not self._pending_subacks and self._subscribed is not None:
            self._subscribed.set()

    # -- BrokerClient ---------------------------------------------------------------------

    async def start(
        self, subscriptions: Sequence[Subscription], on_message: Callable[[Incoming], None]
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._subs = tuple(subscriptions)
        self._paused.clear()
        self._first_connect = self._loop.create_future()
        self._subscribed = asyncio.Event()
        props = _new_props(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        props.ReceiveMaximum = self._receive_maximum
        self._client.connect_async(
            self._host,
            self._port,
            keepalive=self._keepalive,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()  # connects and reconnects in paho's thread
        try:
            await asyncio.wait_for(asyncio.shield(self._first_connect), self._connect_timeout)
            await asyncio.wait_for(self._subscribed.wait(), self._connect_timeout)
        except (TimeoutError, BrokerUnavailable) as exc:
            await self.stop()
            if isinstance(exc, BrokerUnavailable):
                raise
            raise BrokerUnavailable(
                f"no connection to broker {self._host}:{self._port} within "
                f"{self._connect_timeout:g} s"
            ) from exc

    def pause(self) -> None:
        self._paused.set()

    def is_current(self, msg: Incoming) -> bool:
        """False once the connection the message came on is gone (the broker redelivers it)."""
        return msg.token[0] == self._generation and self._connected

    def ack(self, msg: Incoming) -> bool:
        if msg.qos == 0:
            return True
        generation, mid = msg.token
        if generation != self._generation or not self._connected:
            return False
        rc = self._client.ack(mid, msg.qos)
        return rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: MessageProps
    ) -> None:
        loop = asyncio.get_running_loop()
        if not self._connected:
            raise BrokerUnavailable("not connected to the local broker")
        try:
            info = self._client.publish(topic, payload, qos, retain, props_to_paho(properties))
        except (ValueError, TypeError) as exc:  # paho validates topic/payload
            raise BrokerRejected(f"publish refused by the client: {exc}", 0x80) from exc
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerUnavailable(f"publish failed: {paho.error_string(info.rc)}")
        fut: asyncio.Future[None] = loop.create_future()
        self._publishes[info.mid] = fut
        try:
            await asyncio.wait_for(fut, self._publish_timeout)
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"no PUBACK from the local broker within {self._publish_timeout:g} s"
            ) from exc
        finally:
            self._publishes.pop(info.mid, None)

    async def stop(self) -> None:
        self._paused.set()
        self._on_message = None
        self._client.disconnect()  # session expiry unchanged: the broker keeps our queue
        await asyncio.to_thread(self._client.loop_stop)
        self._connected = False
        self._generation += 1
        for fut in self._publishes.values():
            if not fut.done():
                fut.set_exception(BrokerUnavailable("bridge client stopped"))
        self._publishes.clear()
