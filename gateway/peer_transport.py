"""Bridge messages over the secure peer link, with end-to-end acknowledgements.

Application payloads inside the protocol's records (docs/protocol.md §6) are::

    PUB  0x01 || u64 id || bridge codec bytes      "please publish this on your broker"
    ACK  0x02 || u64 id || u8 status               0 accepted by the broker, 1 refused for
                                                    good, 2 not now (broker unavailable)

:meth:`SecureTransport.forward` returns only when the peer's ACK says its broker accepted the
message, which is when the bridge may acknowledge the message to its own broker: a crash of
either gateway, or of the link, loses nothing that was acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import struct
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
ACK_OK = 0
ACK_REJECTED = 1
ACK_UNAVAILABLE = 2
FORWARD_TIMEOUT_SECONDS = 30.0
MAX_CONCURRENT_DELIVERIES = 1024


class SecureTransport:
    """PeerTransport over a PeerLink (``send`` coroutine) for one Bridge (``deliver``)."""

    def __init__(
        self,
        send: Callable[[bytes, object | None], Awaitable[None]],
        timeout: float = FORWARD_TIMEOUT_SECONDS,
    ) -> None:
        self._send = send
        self._timeout = timeout
        # Ids start at a random point per process, and every ACK travels on the connection
        # its PUB came on, so an ACK from before a restart can never answer a newer message.
        self._ids = itertools.count(secrets.randbits(62))
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._deliver: Callable[[BridgeMessage], Awaitable[None]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy = 0
        self.busy_refusals = 0
        self.delivery_failures = 0
        self.decode_errors = 0
        self.unknown_acks = 0

    def attach(self, deliver: Callable[[BridgeMessage], Awaitable[None]]) -> None:
        """Set the local bridge's deliver coroutine (messages from the peer go there)."""
        self._deliver = deliver

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

    def link_down(self) -> None:
        """The link broke: every outstanding forward fails (the bridge keeps those unacked)."""
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PeerUnavailable("peer link lost before the acknowledgement"))
        self._pending.clear()

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    # --- inbound ---

    async def on_payload(self, data: bytes, via: object = None) -> None:
        """Handle one payload from the peer (called in order by the link; ``via`` names the
        connection it came on, and its ACK goes back on that connection only)."""
        if len(data) < 9:
            self.decode_errors += 1
            log.debug("short payload from peer (%d bytes) dropped", len(data))
            return
        kind, mid = struct.unpack(">BQ", data[:9])
        if kind == ACK:
            if len(data) != 10:
                self.decode_errors += 1
                return
            fut = self._pending.get(mid)
            if fut is None or fut.done():
                self.unknown_acks += 1
                return
            fut.set_result(data[9])
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
        self.link_down()
