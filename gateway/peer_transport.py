"""Bridge messages over the secure peer link, with end-to-end acknowledgements.

Application payloads inside the protocol's records (docs/protocol.md §6a, "Application
payloads", specifies every byte)::

    PUB        0x01 || u64 id || bridge codec bytes      "please publish this on your broker"
    ACK        0x02 || u64 id || u8 status               0 accepted by the broker, 1 refused
                                                          for good, 2 not now (unavailable)
    PUB_BATCH  0x03 || u16 n || n x (u64 id || u32 len || bridge codec bytes)
    ACK_BATCH  0x04 || u16 n || n x (u64 id || u8 status)

A message is done only when the peer's ACK says its broker accepted it, which is when the
bridge may acknowledge the message to its own broker: a crash of either gateway, or of the
link, loses nothing that was acknowledged.

Two paths share the ids and the pending table:

- :meth:`SecureTransport.forward` (a coroutine, one PUB per message) for callers that await;
- :meth:`SecureTransport.forward_nowait` (callback, no Task/Future/timer per message): the
  messages of one event-loop iteration go out as PUB_BATCH payloads, the peer answers each
  batch with ACK_BATCH payloads, and forward timeouts are checked by one sweep per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable

from gateway.bridge.codec import decode, encode
from gateway.bridge.transport import BridgeMessage
from gateway.errors import (
    BrokerRejected,
    DecodeError,
    GatewayError,
    LocalProtocolError,
    PeerRejected,
    PeerUnavailable,
)

log = logging.getLogger("qgw.transport")

PUB = 0x01
ACK = 0x02
PUB_BATCH = 0x03
ACK_BATCH = 0x04
ACK_OK = 0
ACK_REJECTED = 1
ACK_UNAVAILABLE = 2
FORWARD_TIMEOUT_SECONDS = 30.0
MAX_CONCURRENT_DELIVERIES = 1024
# A sender closes a PUB_BATCH at this many messages or bytes (a larger message travels alone);
# a receiver accepts any count 1..65535 that parses.
BATCH_MAX_MESSAGES = 256
BATCH_MAX_BYTES = 64 * 1024
SWEEP_SECONDS = 1.0  # forward timeouts are checked once per second, not with a timer each

_PUB_HEAD = struct.Struct(">QI")
_ACK_ENTRY = struct.Struct(">QB")
_KIND_COUNT = struct.Struct(">BH")

# The outcome of one forward: None accepted by the peer's broker, else the error to raise.
ForwardDone = Callable[[GatewayError | None], None]
DeliverDone = Callable[[GatewayError | None], None]
SendNowait = Callable[[bytes, object | None], None]


def encode_pub_batch(entries: list[tuple[int, bytes]]) -> bytes:
    """PUB_BATCH payload for (id, bridge codec bytes) entries (1..65535 of them)."""
    if not 1 <= len(entries) <= 0xFFFF:
        raise LocalProtocolError("a PUB_BATCH carries 1..65535 messages")
    parts = [_KIND_COUNT.pack(PUB_BATCH, len(entries))]
    for mid, body in entries:
        parts.append(_PUB_HEAD.pack(mid, len(body)))
        parts.append(body)
    return b"".join(parts)


def decode_pub_batch(data: bytes) -> list[tuple[int, bytes]]:
    """(id, bridge codec bytes) entries of a PUB_BATCH payload; DecodeError if malformed."""
    if len(data) < 3 or data[0] != PUB_BATCH:
        raise DecodeError("not a PUB_BATCH payload")
    count = int.from_bytes(data[1:3], "big")
    if count == 0:
        raise DecodeError("empty PUB_BATCH")
    pos, n = 3, len(data)
    out: list[tuple[int, bytes]] = []
    for _ in range(count):
        if n - pos < 12:
            raise DecodeError("PUB_BATCH truncated in an entry header")
        mid, size = _PUB_HEAD.unpack_from(data, pos)
        pos += 12
        if n - pos < size:
            raise DecodeError("PUB_BATCH truncated in a message")
        out.append((mid, data[pos : pos + size]))
        pos += size
    if pos != n:
        raise DecodeError(f"{n - pos} trailing bytes after PUB_BATCH")
    return out


def encode_ack_batch(entries: list[tuple[int, int]]) -> bytes:
    """ACK_BATCH payload for (id, status) entries (1..65535 of them)."""
    if not 1 <= len(entries) <= 0xFFFF:
        raise LocalProtocolError("an ACK_BATCH carries 1..65535 acknowledgements")
    return _KIND_COUNT.pack(ACK_BATCH, len(entries)) + b"".join(
        _ACK_ENTRY.pack(mid, status) for mid, status in entries
    )


def decode_ack_batch(data: bytes) -> list[tuple[int, int]]:
    """(id, status) entries of an ACK_BATCH payload; DecodeError if malformed."""
    if len(data) < 3 or data[0] != ACK_BATCH:
        raise DecodeError("not an ACK_BATCH payload")
    count = int.from_bytes(data[1:3], "big")
    if count == 0 or len(data) != 3 + 9 * count:
        raise DecodeError("ACK_BATCH length does not match its count")
    return [_ACK_ENTRY.unpack_from(data, 3 + 9 * i) for i in range(count)]


def _status_error(status: int) -> GatewayError | None:
    if status == ACK_OK:
        return None
    if status == ACK_REJECTED:
        return PeerRejected("the peer's broker refused the message")
    return PeerUnavailable("the peer's broker is unavailable")  # 2, and unknown codes


class SecureTransport:
    """PeerTransport over a PeerLink (``send`` coroutine) for one Bridge (``deliver``)."""

    def __init__(
        self,
        send: Callable[[bytes, object | None], Awaitable[None]],
        timeout: float = FORWARD_TIMEOUT_SECONDS,
        *,
        send_nowait: SendNowait | None = None,
    ) -> None:
        self._send = send
        self._send_nowait = send_nowait  # PeerLink.send_nowait: the batched path
        self._timeout = timeout
        # Ids start at a random point per process, and every ACK travels on the connection
        # its PUB came on, so an ACK from before a restart can never answer a newer message.
        self._ids = itertools.count(secrets.randbits(62))
        self._pending: dict[int, asyncio.Future[int]] = {}
        # forward_nowait: id -> (deadline, done), in sending order (so oldest first)
        self._waiting: dict[int, tuple[float, ForwardDone]] = {}
        self._batch: list[tuple[int, bytes]] = []
        self._batch_bytes = 0
        self._batch_scheduled = False
        self._acks: dict[object, list[tuple[int, int]]] = {}
        self._acks_scheduled = False
        self._sweep: asyncio.TimerHandle | None = None
        self._deliver: Callable[[BridgeMessage], Awaitable[None]] | None = None
        self._deliver_nowait: Callable[[BridgeMessage, DeliverDone], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy = 0
        self.busy_refusals = 0
        self.delivery_failures = 0
        self.decode_errors = 0
        self.unknown_acks = 0
        self.batches_sent = 0

    def attach(self, deliver: Callable[[BridgeMessage], Awaitable[None]]) -> None:
        """Set the local bridge's deliver coroutine (messages from the peer go there)."""
        self._deliver = deliver

    def attach_nowait(self, deliver_nowait: Callable[[BridgeMessage, DeliverDone], None]) -> None:
        """Set the bridge's callback-style deliver (used for PUB_BATCH messages)."""
        self._deliver_nowait = deliver_nowait

    @property
    def batched(self) -> bool:
        """True if :meth:`forward_nowait` sends batches on the link without awaiting."""
        return self._send_nowait is not None

    # --- outbound ---

    async def forward(self, msg: BridgeMessage) -> None:
        mid = next(self._ids)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        try:
            try:
                data = struct.pack(">BQ", PUB, mid) + encode(msg)
            except LocalProtocolError as exc:  # cannot be carried, now or ever
                raise PeerRejected(f"message cannot be encoded: {exc}") from exc
            await self._send(data, None)
            try:
                status = await asyncio.wait_for(fut, self._timeout)
            except TimeoutError as exc:
                raise PeerUnavailable("peer did not acknowledge in time") from exc
        finally:
            self._pending.pop(mid, None)
        if status == ACK_REJECTED:
            raise PeerRejected("the peer's broker refused the message")
        if status != ACK_OK:
            raise PeerUnavailable("the peer's broker is unavailable")

    def forward_nowait(self, msg: BridgeMessage, done: ForwardDone) -> None:
        """Forward without a Task or Future: ``done(None)`` once the peer's broker accepted
        ``msg``, ``done(error)`` otherwise (PeerRejected: for good; PeerUnavailable: link
        down, no answer within the timeout, or the peer's broker not available now).
        ``done`` is never called before this method returns unless the message cannot be
        carried at all. Requires ``send_nowait``."""
        send_nowait = self._send_nowait
        if send_nowait is None:
            raise LocalProtocolError("forward_nowait needs a send_nowait link")
        try:
            body = encode(msg)
        except LocalProtocolError as exc:  # cannot be carried, now or ever
            done(PeerRejected(f"message cannot be encoded: {exc}"))
            return
        mid = next(self._ids)
        self._waiting[mid] = (time.monotonic() + self._timeout, done)
        size = len(body) + 12
        if self._batch and (
            len(self._batch) >= BATCH_MAX_MESSAGES or self._batch_bytes + size > BATCH_MAX_BYTES
        ):
            self._flush_batch()
        self._batch.append((mid, body))
        self._batch_bytes += size
        if not self._batch_scheduled:
            self._batch_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_batch)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._do_sweep)

    def _flush_batch(self) -> None:
        """Send the messages gathered in this loop iteration as one PUB_BATCH."""
        self._batch_scheduled = False
        entries = self._batch
        if not entries:
            return
        self._batch = []
        self._batch_bytes = 0
        assert self._send_nowait is not None
        err: GatewayError
        try:
            self._send_nowait(encode_pub_batch(entries), None)
        except PeerRejected as exc:  # too large for the record layer
            err = exc if len(entries) == 1 else PeerUnavailable(str(exc))
        except GatewayError as exc:  # link down, or no record budget until the rekey
            err = exc
        else:
            self.batches_sent += 1
            return
        for mid, _ in entries:
            w = self._waiting.pop(mid, None)
            if w is not None:
                w[1](err)

    def _do_sweep(self) -> None:
        """Fail the forwards that waited longer than the timeout (one pass per second)."""
        self._sweep = None
        now = time.monotonic()
        waiting = self._waiting
        while waiting:
            mid, (deadline, done) = next(iter(waiting.items()))
            if deadline > now:
                break
            del waiting[mid]
            done(PeerUnavailable("peer did not acknowledge in time"))
        if waiting:
            self._sweep = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._do_sweep)

    def link_down(self) -> None:
        """The link broke: every outstanding forward fails (the bridge keeps those unacked)."""
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PeerUnavailable("peer link lost before the acknowledgement"))
        self._pending.clear()
        waiting = list(self._waiting.values())
        self._waiting.clear()
        self._batch = []
        self._batch_bytes = 0
        for _, done in waiting:
            done(PeerUnavailable("peer link lost before the acknowledgement"))

    @property
    def outstanding(self) -> int:
        return len(self._pending) + len(self._waiting)

    def _answer(self, mid: int, status: int) -> None:
        w = self._waiting.pop(mid, None)
        if w is not None:
            w[1](_status_error(status))
            return
        fut = self._pending.get(mid)
        if fut is None or fut.done():
            self.unknown_acks += 1
            return
        fut.set_result(status)

    # --- inbound ---

    def handle_now(self, data: bytes, via: object = None) -> bool:
        """Handle a PUB_BATCH or ACK_BATCH at once (they never wait: no task, no await per
        payload); False for any other kind, which :meth:`on_payload` handles."""
        kind = data[0] if data else -1
        if kind == ACK_BATCH:
            try:
                answers = decode_ack_batch(data)
            except DecodeError as exc:
                self.decode_errors += 1
                log.debug("malformed ACK_BATCH from peer dropped: %s", exc)
                return True
            for mid, status in answers:
                self._answer(mid, status)
            return True
        if kind == PUB_BATCH:
            self._on_pub_batch(data, via)
            return True
        return False

    async def on_payload(self, data: bytes, via: object = None) -> None:
        """Handle one payload from the peer (called in order by the link; ``via`` names the
        connection it came on, and its ACK goes back on that connection only)."""
        if self.handle_now(data, via):
            return
        if len(data) < 9:
            self.decode_errors += 1
            log.debug("short payload from peer (%d bytes) dropped", len(data))
            return
        kind, mid = struct.unpack(">BQ", data[:9])
        if kind == ACK:
            if len(data) != 10:
                self.decode_errors += 1
                return
            self._answer(mid, data[9])
            return
        if kind != PUB:
            self.decode_errors += 1
            log.debug("unknown payload kind %d from peer dropped", kind)
            return
        try:
            msg = decode(data[9:])
        except DecodeError as exc:
            self.decode_errors += 1
            log.warning("undecodable message from peer refused: %s", exc)
            await self._ack(mid, ACK_REJECTED, via)
            return
        if self._busy >= MAX_CONCURRENT_DELIVERIES:
            # Never wait here: this runs in the link's read loop (ACKs, keepalives, rekeys
            # behind it). The peer keeps the message and tries again.
            self.busy_refusals += 1
            await self._ack(mid, ACK_UNAVAILABLE, via)
            return
        # Start the delivery now, in arrival order; the broker publish is issued before the
        # task first yields, so the order of messages on the local broker is kept.
        self._busy += 1
        task = asyncio.ensure_future(self._deliver_and_ack(mid, msg, via))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_pub_batch(self, data: bytes, via: object) -> None:
        try:
            entries = decode_pub_batch(data)
        except DecodeError as exc:
            # Framing broken: no id can be trusted, so nothing is answered; the sender's
            # forwards time out and are retried.
            self.decode_errors += 1
            log.warning("malformed PUB_BATCH from peer dropped: %s", exc)
            return
        for mid, body in entries:
            try:
                msg = decode(body)
            except DecodeError as exc:
                self.decode_errors += 1
                log.warning("undecodable message from peer refused: %s", exc)
                self._queue_ack(mid, ACK_REJECTED, via)
                continue
            if self._busy >= MAX_CONCURRENT_DELIVERIES:
                self.busy_refusals += 1
                self._queue_ack(mid, ACK_UNAVAILABLE, via)
                continue
            self._busy += 1
            deliver_nowait = self._deliver_nowait
            if deliver_nowait is not None:
                deliver_nowait(msg, _Delivered(self, mid, via))
            else:
                task = asyncio.ensure_future(self._deliver_then(msg, _Delivered(self, mid, via)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _deliver_then(self, msg: BridgeMessage, done: DeliverDone) -> None:
        err: GatewayError | None = None
        try:
            if self._deliver is None:
                err = PeerUnavailable("no bridge attached")
            else:
                await self._deliver(msg)
        except GatewayError as exc:
            err = exc
        done(err)

    def _delivered(self, mid: int, via: object, err: GatewayError | None) -> None:
        self._busy -= 1
        if err is None:
            status = ACK_OK
        elif isinstance(err, PeerRejected | BrokerRejected):
            status = ACK_REJECTED
        else:
            log.debug("delivery to the local broker failed: %s", err)
            self.delivery_failures += 1
            status = ACK_UNAVAILABLE
        self._queue_ack(mid, status, via)

    def _queue_ack(self, mid: int, status: int, via: object) -> None:
        """Answers of one loop iteration leave as one ACK_BATCH per connection."""
        acks = self._acks.get(via)
        if acks is None:
            acks = self._acks[via] = []
        acks.append((mid, status))
        if not self._acks_scheduled:
            self._acks_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._acks_scheduled = False
        pending, self._acks = self._acks, {}
        for via, acks in pending.items():
            for i in range(0, len(acks), BATCH_MAX_MESSAGES * 16):
                payload = encode_ack_batch(acks[i : i + BATCH_MAX_MESSAGES * 16])
                if self._send_nowait is not None:
                    with contextlib.suppress(GatewayError):  # that connection is gone
                        self._send_nowait(payload, via)
                else:
                    task = asyncio.ensure_future(self._send_quietly(payload, via))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def _send_quietly(self, payload: bytes, via: object) -> None:
        with contextlib.suppress(GatewayError):
            await self._send(payload, via)

    async def _deliver_and_ack(self, mid: int, msg: BridgeMessage, via: object) -> None:
        try:
            if self._deliver is None:
                status = ACK_UNAVAILABLE
            else:
                await self._deliver(msg)
                status = ACK_OK
        except (PeerRejected, BrokerRejected):
            status = ACK_REJECTED
        except GatewayError as exc:
            log.debug("delivery to the local broker failed: %s", exc)
            self.delivery_failures += 1
            status = ACK_UNAVAILABLE
        finally:
            self._busy -= 1
        await self._ack(mid, status, via)

    async def _ack(self, mid: int, status: int, via: object) -> None:
        with contextlib.suppress(GatewayError):
            await self._send(struct.pack(">BQB", ACK, mid, status), via)

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self.link_down()


class _Delivered:
    """The callback of one delivery from a PUB_BATCH (a slotted object, cheaper than a
    closure or functools.partial on this path)."""

    __slots__ = ("mid", "transport", "via")

    def __init__(self, transport: SecureTransport, mid: int, via: object) -> None:
        self.transport = transport
        self.mid = mid
        self.via = via

    def __call__(self, err: GatewayError | None) -> None:
        self.transport._delivered(self.mid, self.via, err)
