"""The MQTT bridge: local broker <-> :class:`PeerTransport`, mosquitto-style topic rules.

Outbound (local broker -> peer), per ``out``/``both`` rule: subscribe to
``local_prefix + pattern`` (QoS = rule.qos, No Local unless a shared subscription, Retain As
Published, a subscription identifier naming the rule); for each message strip
``local_prefix``, add ``remote_prefix`` and call ``transport.forward``. The message is
acknowledged to the local broker only after ``forward`` returned (end-to-end at-least-once);
while the peer is unavailable it is retried with back-off and stays unacked, so the
broker's persistent session is the store-and-forward queue.

Inbound (peer -> local broker), :meth:`Bridge.deliver`: the first ``in``/``both`` rule whose
``remote_prefix + pattern`` matches maps the topic back (strip ``remote_prefix``, add
``local_prefix``); QoS = min(message QoS, rule QoS); retain flag and properties kept; the
origin marker ``qgw-origin`` is added. Returns after the local broker's PUBACK.

Loop prevention: No Local on our subscriptions (our own republished messages never come
back to us; not allowed on shared subscriptions) and the origin marker: a message carrying
any ``qgw-origin`` entered through a gateway already and is never forwarded again (two
sites, no second hop), and :meth:`deliver` drops a message whose origin is our own site. The
marker is *kept* on the far broker (applications there see one extra user property
``qgw-origin``) and *stripped* from :attr:`BridgeMessage.properties` when taken from a
broker: it travels in :attr:`BridgeMessage.origin` instead.

The data path has no Task, Future or timer per message when the transport offers
``forward_nowait`` and the client ``publish_nowait`` (the gateway's own): callbacks carry a
message from the client to the transport and its outcome back to the acknowledgement, at
most ``mqtt.inflight`` forwards are outstanding and the rest wait in a deque, and only a
failed forward gets a retry timer. Transports and clients that only offer the coroutines
(tests) get one Task per forward attempt instead, with the same rules.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.bridge.client import BrokerClient, Incoming, Subscription
from gateway.bridge.mqtt5_client import Mqtt5BrokerClient, _outcome_error
from gateway.bridge.transport import ORIGIN_PROPERTY, BridgeMessage, MessageProps, PeerTransport
from gateway.config import Direction, MqttSection, Rule
from gateway.errors import ConfigError, GatewayError, PeerRejected, PeerUnavailable

log = logging.getLogger("qgw.bridge")

RETRY_MIN_SECONDS = 0.05
RETRY_MAX_SECONDS = 5.0
STOP_TIMEOUT_SECONDS = 10.0

# Drop reasons (counter keys).
DROP_OVERSIZE = "oversize"  # payload > mqtt.max_payload_bytes: logged, acked locally
DROP_LOOP = "loop"  # origin marker names our own site
DROP_NO_RULE = "no_rule"  # inbound topic matches no in/both rule
DROP_REJECTED = "rejected"  # peer's broker refused it for good (PeerRejected)
DROP_QOS0_UNAVAILABLE = "qos0_peer_unavailable"  # QoS 0 is not retried
DROP_QOS0_OVERFLOW = "qos0_overflow"  # QoS 0 while the window is full
#: What :meth:`Bridge.broker_queue` reports (from the client's $SYS subscription).
BROKER_QUEUE_KEYS = (
    "stored_messages",
    "stored_bytes",
    "dropped_messages",
    "clients_connected",
    "clients_disconnected",
    "uptime_seconds",
    "version",
)
INBOUND_CACHE_TOPICS = 4096  # remembered topic mappings (peer topic -> rule, local topic)
_MISS = object()
_NO_PROPS = MessageProps()


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching ('+' one level, '#' the rest; '$' topics need a literal)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f = topic_filter.split("/")
    t = topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t):
            return False
        if part not in ("+", t[i]):
            return False
    return len(f) == len(t)


@dataclass
class RuleCounters:
    """Counters of one rule (read by the metrics layer)."""

    rule: Rule
    messages_out: int = 0  # taken from the local broker, accepted by the peer's broker
    bytes_out: int = 0
    messages_in: int = 0  # received from the peer, accepted by the local broker
    bytes_in: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> messages
    inflight: int = 0  # forwarded but not yet acknowledged by the peer (gauge)
    forward_retries: int = 0
    stale_retries: int = 0  # retries abandoned because the broker redelivers the message


@dataclass
class BridgeCounters:
    """All bridge counters; ``rules`` is index-aligned with ``settings.rules``."""

    rules: list[RuleCounters]
    dropped: Counter[str] = field(default_factory=Counter)  # drops not tied to a rule
    deliver_failures: int = 0  # deliver() raised (the peer will retry)
    stale_acks: int = 0  # ack skipped: the broker connection changed (redelivery follows)

    @property
    def inflight(self) -> int:
        return sum(r.inflight for r in self.rules)


def _check_rule(i: int, rule: Rule) -> None:
    for name in ("local_prefix", "remote_prefix"):
        value = getattr(rule, name)
        if "+" in value or "#" in value:
            raise ConfigError([(f"mqtt.rules[{i}].{name}", "must not contain wildcards")])


class Bridge:
    """One gateway's MQTT side. ``start()``, then messages flow until ``stop()``."""

    def __init__(
        self,
        settings: MqttSection,
        site_id: str,
        transport: PeerTransport,
        *,
        client: BrokerClient | None = None,
        stop_timeout: float = STOP_TIMEOUT_SECONDS,
    ) -> None:
        for i, rule in enumerate(settings.rules):
            _check_rule(i, rule)
        self.settings = settings
        self.site_id = site_id
        self._transport = transport
        self._client: BrokerClient = client or Mqtt5BrokerClient(settings, broker_stats=True)
        self._stop_timeout = stop_timeout
        self.counters = BridgeCounters(rules=[RuleCounters(r) for r in settings.rules])
        self._window = settings.inflight
        self._inflight = 0  # forwards started and not finished (<= window)
        self._backlog: collections.deque[_Job] = collections.deque()  # waiting for the window
        self._retrying: set[_Job] = set()  # waiting for their retry timer
        self._tasks: set[asyncio.Task[None]] = set()  # forward attempts on coroutine transports
        self._idle = asyncio.Event()  # set when nothing is in flight or waiting
        self._idle.set()
        fn = getattr(transport, "forward_nowait", None)
        batched = bool(getattr(transport, "batched", False))
        self._forward_nowait: Callable[[BridgeMessage, Any], None] | None = (
            fn if callable(fn) and batched else None
        )
        pn = getattr(self._client, "publish_nowait", None)
        self._publish_nowait: Callable[..., None] | None = pn if callable(pn) else None
        self._stopping = asyncio.Event()
        self._stopping_flag = False  # the same, cheaper to test per message
        self._started = False
        self._out_rules = [
            i
            for i, r in enumerate(settings.rules)
            if r.direction in (Direction.OUT, Direction.BOTH)
        ]
        self._out_set = frozenset(self._out_rules)
        self._inbound_cache: dict[str, tuple[int, str] | None] = {}
        self._marker_props: dict[str, MessageProps] = {}
        self._in_rules = [
            i for i, r in enumerate(settings.rules) if r.direction in (Direction.IN, Direction.BOTH)
        ]

    def __repr__(self) -> str:
        return f"<Bridge site={self.site_id} rules={len(self.settings.rules)}>"

    @property
    def connected(self) -> bool:
        return self._client.connected

    @property
    def broker_protocol_errors(self) -> int:
        """Malformed or unexpected packets from the local broker (each cost a reconnect)."""
        return int(getattr(self._client, "protocol_errors", 0))

    @property
    def broker_redeliveries(self) -> int:
        """QoS 1 messages the local broker sent again (DUP = 1): each may reach the peer twice."""
        return int(getattr(self._client, "redeliveries", 0))

    @property
    def broker_sessions_lost(self) -> int:
        """How often the local broker came back without our persistent session."""
        return int(getattr(self._client, "sessions_lost", 0))

    def broker_queue(self) -> dict[str, Any] | None:
        """The local broker's latest ``$SYS`` statistics (``qgw status``), or None while none
        could be read (a broker without $SYS, an ACL that forbids it, not connected yet).

        Keys: ``stored_messages``, ``stored_bytes``, ``dropped_messages``,
        ``clients_connected``, ``clients_disconnected``, ``uptime_seconds`` (int or None),
        ``version`` (str or None) and ``updated`` (Unix time of the last value received).
        """
        stats = getattr(self._client, "broker_stats", None)
        updated = getattr(self._client, "broker_stats_updated", None)
        if not stats or updated is None:
            return None
        out: dict[str, Any] = dict.fromkeys(BROKER_QUEUE_KEYS)
        out.update(stats)
        out["updated"] = updated
        return out

    # -- lifecycle ----------------------------------------------------------------------

    def subscriptions(self) -> list[Subscription]:
        subs = []
        for i in self._out_rules:
            r = self.settings.rules[i]
            topic_filter = r.local_prefix + r.pattern
            if r.share_group:  # several gateway pairs split the messages (docs/scaling.md)
                topic_filter = f"$share/{r.share_group}/{topic_filter}"
            # No Local is a protocol error on shared subscriptions (MQTT 5 3.8.3.1); the
            # origin marker prevents loops there.
            shared = topic_filter.startswith("$share/")
            subs.append(Subscription(topic_filter, r.qos, not shared, i + 1))
        return subs

    async def start(self) -> None:
        """Connect to the local broker and start forwarding (raises BrokerUnavailable)."""
        self._started = True
        await self._client.start(self.subscriptions(), self._on_message)

    async def stop(self, timeout: float | None = None) -> None:
        """Take no new messages, let in-flight forwards finish (up to ``timeout``), then
        disconnect. Unfinished messages are not acknowledged: the broker redelivers them."""
        self._stopping.set()
        self._stopping_flag = True
        self._client.pause()
        self._drop_retries()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._idle.wait(), self._stop_timeout if timeout is None else timeout
            )
        await self._cancel(set(self._tasks))
        await self._client.stop()

    async def abort(self) -> None:
        """Stop at once (like a crash, in process): nothing more is acknowledged."""
        self._stopping.set()
        self._stopping_flag = True
        self._client.pause()
        self._backlog.clear()
        self._drop_retries()
        await self._cancel(set(self._tasks))
        await self._client.stop()

    def _drop_retries(self) -> None:
        """Waiting retries end now, unacknowledged (the broker redelivers them)."""
        jobs = list(self._retrying)
        self._retrying.clear()
        for job in jobs:
            if job.timer is not None:
                job.timer.cancel()
                job.timer = None
            self._finish(job)

    async def _cancel(self, tasks: set[asyncio.Task[None]]) -> None:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    # -- outbound: local broker -> peer -------------------------------------------------

    def _rule_for(self, msg: Incoming) -> int | None:
        sids = msg.subscription_ids
        if len(sids) == 1:  # the common case: one rule matched
            i = sids[0] - 1
            if i in self._out_set:
                return i
        for sid in sorted(sids):
            i = sid - 1
            if i in self._out_set:
                return i
        for i in self._out_rules:  # no identifiers (should not happen with a v5 broker)
            r = self.settings.rules[i]
            if topic_matches(r.local_prefix + r.pattern, msg.topic):
                return i
        return None

    def _on_message(self, msg: Incoming) -> None:
        """Called in the asyncio thread for each message from the local broker."""
        if self._stopping_flag:
            return  # not acked: redelivered to the next session holder
        i = self._rule_for(msg)
        if i is None:
            self.counters.dropped[DROP_NO_RULE] += 1
            self._ack(msg)
            return
        rc = self.counters.rules[i]
        rule = self.settings.rules[i]
        if len(msg.payload) > self.settings.max_payload_bytes:
            rc.dropped[DROP_OVERSIZE] += 1
            log.warning(
                "dropped a message of %d bytes on %r: larger than mqtt.max_payload_bytes = %d",
                len(msg.payload),
                msg.topic,
                self.settings.max_payload_bytes,
            )
            self._ack(msg)
            return
        users = msg.properties.user_properties
        if users and any(k == ORIGIN_PROPERTY for k, _ in users):
            # It entered through a qgw gateway already (ours, or another pair at this site on
            # a shared subscription, where No Local cannot help): two sites, no second hop.
            rc.dropped[DROP_LOOP] += 1
            self._ack(msg)
            return
        if msg.qos == 0 and self._pending >= self.settings.inflight:
            rc.dropped[DROP_QOS0_OVERFLOW] += 1
            return
        # (no marker among the user properties, so the properties travel unchanged)
        bm = BridgeMessage(
            rule.remote_prefix + msg.topic[len(rule.local_prefix) :],
            msg.payload,
            msg.qos,
            msg.retain,
            msg.properties,
            self.site_id,
        )
        job = _Job(self, i, msg, bm)
        if self._inflight < self._window:
            self._start(job)
        else:
            self._backlog.append(job)  # the broker's window is ours too; this is the excess
            self._idle.clear()

    @property
    def _pending(self) -> int:
        """Outbound messages received and not finished (the QoS 0 bound)."""
        return self._inflight + len(self._backlog)

    def _ack(self, msg: Incoming) -> None:
        if not self._client.ack(msg):
            self.counters.stale_acks += 1

    def _start(self, job: _Job) -> None:
        self._inflight += 1
        self._idle.clear()
        self.counters.rules[job.rule].inflight += 1
        self._attempt(job)

    def _attempt(self, job: _Job) -> None:
        msg = job.msg
        if msg.qos and not self._client.is_current(msg):
            # redelivered on the new broker connection: this copy stops here
            self.counters.rules[job.rule].stale_retries += 1
            self._finish(job)
            return
        if self._forward_nowait is not None:
            self._forward_nowait(job.bm, job)
            return
        task = asyncio.get_running_loop().create_task(self._forward_task(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward_task(self, job: _Job) -> None:
        err: GatewayError | None
        try:
            await self._transport.forward(job.bm)
            err = None
        except GatewayError as exc:
            err = exc
        except Exception:  # a transport bug must not kill the bridge
            log.exception("transport.forward raised an unexpected error; retrying")
            err = PeerUnavailable("unexpected transport error")
        self._forwarded(job, err)

    def _forwarded(self, job: _Job, err: GatewayError | None) -> None:
        """The outcome of one forward attempt."""
        rc = self.counters.rules[job.rule]
        msg = job.msg
        if err is None:
            rc.messages_out += 1
            rc.bytes_out += len(job.bm.payload)
            self._ack(msg)
            self._finish(job)
            return
        if isinstance(err, PeerRejected):
            rc.dropped[DROP_REJECTED] += 1
            log.warning("peer refused a message on %r: %s", msg.topic, err)
            self._ack(msg)
            self._finish(job)
            return
        if msg.qos == 0:
            rc.dropped[DROP_QOS0_UNAVAILABLE] += 1
            self._finish(job)
            return
        rc.forward_retries += 1
        if self._stopping.is_set():
            self._finish(job)  # unacked: the broker redelivers it after restart
            return
        delay = job.delay
        log.debug("forward on %r failed (%s); retrying in %.2f s", msg.topic, err, delay)
        job.delay = min(delay * 2, RETRY_MAX_SECONDS)
        job.timer = asyncio.get_running_loop().call_later(delay, self._retry, job)
        self._retrying.add(job)

    def _retry(self, job: _Job) -> None:
        self._retrying.discard(job)
        job.timer = None
        self._attempt(job)

    def _finish(self, job: _Job) -> None:
        self._inflight -= 1
        self.counters.rules[job.rule].inflight -= 1
        backlog = self._backlog
        while backlog and self._inflight < self._window:
            self._start(backlog.popleft())
        if not self._inflight and not backlog:
            self._idle.set()

    # -- inbound: peer -> local broker --------------------------------------------------

    def map_inbound(self, remote_topic: str) -> tuple[int, str] | None:
        """(rule index, local topic) for a topic from the peer, or None."""
        cache = self._inbound_cache
        hit = cache.get(remote_topic, _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        result = self._map_inbound(remote_topic)
        if len(cache) >= INBOUND_CACHE_TOPICS:
            cache.clear()  # many distinct topics: start over rather than grow
        cache[remote_topic] = result
        return result

    def _map_inbound(self, remote_topic: str) -> tuple[int, str] | None:
        for i in self._in_rules:
            r = self.settings.rules[i]
            if remote_topic.startswith(r.remote_prefix):
                rest = remote_topic[len(r.remote_prefix) :]
                if rest and topic_matches(r.pattern, rest):
                    return i, r.local_prefix + rest
        return None

    def _inbound(self, msg: BridgeMessage) -> tuple[int, str, int, MessageProps] | None:
        """(rule index, local topic, QoS, properties) to publish, or None if dropped by
        policy (counted)."""
        if msg.origin == self.site_id:
            self.counters.dropped[DROP_LOOP] += 1
            return None
        mapped = self.map_inbound(msg.topic)
        if mapped is None:
            self.counters.dropped[DROP_NO_RULE] += 1
            log.debug("no in/both rule for %r from the peer; dropped", msg.topic)
            return None
        i, local_topic = mapped
        rule = self.settings.rules[i]
        if len(msg.payload) > self.settings.max_payload_bytes:
            self.counters.rules[i].dropped[DROP_OVERSIZE] += 1
            log.warning(
                "dropped a message of %d bytes from the peer on %r: larger than "
                "mqtt.max_payload_bytes = %d",
                len(msg.payload),
                msg.topic,
                self.settings.max_payload_bytes,
            )
            return None
        p = msg.properties
        if p is _NO_PROPS or p == _NO_PROPS:  # the common case: only the origin marker
            props = self._marker_props.get(msg.origin)
            if props is None:
                props = MessageProps(user_properties=((ORIGIN_PROPERTY, msg.origin),))
                if len(self._marker_props) < 64:
                    self._marker_props[msg.origin] = props
            return i, local_topic, min(msg.qos, rule.qos), props
        users = tuple(kv for kv in p.user_properties if kv[0] != ORIGIN_PROPERTY)
        props = MessageProps(
            user_properties=(*users, (ORIGIN_PROPERTY, msg.origin)),
            content_type=p.content_type,
            response_topic=p.response_topic,
            correlation_data=p.correlation_data,
            message_expiry_interval=p.message_expiry_interval,
            payload_format_indicator=p.payload_format_indicator,
        )
        return i, local_topic, min(msg.qos, rule.qos), props

    async def deliver(self, msg: BridgeMessage) -> None:
        """Publish a message from the peer on the local broker; return after its PUBACK.

        Dropping by policy (no matching rule, our own origin, oversize) counts and returns
        normally, so the peer acknowledges it. Raises BrokerUnavailable / BrokerRejected
        (``GatewayError``) if the local broker did not accept it: the peer must not ack.
        """
        out = self._inbound(msg)
        if out is None:
            return
        i, local_topic, qos, props = out
        try:
            await self._client.publish(local_topic, msg.payload, qos, msg.retain, props)
        except GatewayError:
            self.counters.deliver_failures += 1
            raise
        rc = self.counters.rules[i]
        rc.messages_in += 1
        rc.bytes_in += len(msg.payload)

    def deliver_nowait(
        self, msg: BridgeMessage, done: Callable[[GatewayError | None], None]
    ) -> None:
        """:meth:`deliver` with a callback: ``done(None)`` once the local broker accepted the
        message (or it was dropped by policy), ``done(error)`` if it did not."""
        out = self._inbound(msg)
        if out is None:
            done(None)
            return
        i, local_topic, qos, props = out
        if self._publish_nowait is None:
            task = asyncio.get_running_loop().create_task(self._deliver_task(msg, done))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._publish_nowait(
            local_topic,
            msg.payload,
            qos=qos,
            retain=msg.retain,
            properties=props,
            done=_Published(self.counters, i, len(msg.payload), done),
        )

    async def _deliver_task(
        self, msg: BridgeMessage, done: Callable[[GatewayError | None], None]
    ) -> None:
        try:
            await self.deliver(msg)
        except GatewayError as exc:
            done(exc)
        else:
            done(None)


class _Job:
    """One outbound message from the broker until it is acknowledged or given up; it is also
    the transport's callback for its forward (no closure or Task per message)."""

    __slots__ = ("bm", "bridge", "delay", "msg", "rule", "timer")

    def __init__(self, bridge: Bridge, rule: int, msg: Incoming, bm: BridgeMessage) -> None:
        self.bridge = bridge
        self.rule = rule
        self.msg = msg
        self.bm = bm
        self.delay = RETRY_MIN_SECONDS
        self.timer: asyncio.TimerHandle | None = None

    def __call__(self, err: GatewayError | None) -> None:
        self.bridge._forwarded(self, err)


class _Published:
    """The client's callback for one delivery from the peer."""

    __slots__ = ("counters", "done", "rule", "size")

    def __init__(
        self,
        counters: BridgeCounters,
        rule: int,
        size: int,
        done: Callable[[GatewayError | None], None],
    ) -> None:
        self.counters = counters
        self.rule = rule
        self.size = size
        self.done = done

    def __call__(self, code: int | None, text: str) -> None:
        err = _outcome_error(code, text)
        if err is not None:
            self.counters.deliver_failures += 1
            self.done(err)
            return
        rc = self.counters.rules[self.rule]
        rc.messages_in += 1
        rc.bytes_in += self.size
        self.done(None)
