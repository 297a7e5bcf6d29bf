"""What crosses the peer link, and the one interface the bridge needs from the link.

The bridge does not know how messages reach the peer gateway. It hands each message to a
:class:`PeerTransport` and acknowledges it to the local broker only after
:meth:`PeerTransport.forward` returned, i.e. after the *peer's* broker accepted it. The peer
side calls :meth:`gateway.bridge.bridge.Bridge.deliver` with the decoded message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

ORIGIN_PROPERTY = "qgw-origin"
"""User property that names the site where a message entered the gateway pair."""


@dataclass(frozen=True, slots=True)
class MessageProps:
    """The MQTT v5 PUBLISH properties the bridge carries end to end (None = absent)."""

    user_properties: tuple[tuple[str, str], ...] = ()  # order kept, duplicates allowed
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    message_expiry_interval: int | None = None  # seconds left when the gateway took it
    payload_format_indicator: int | None = None  # 0 bytes, 1 UTF-8


@dataclass(frozen=True, slots=True)
class BridgeMessage:
    """One message on its way to the peer, already mapped to the REMOTE topic name."""

    topic: str
    payload: bytes = field(repr=False)
    qos: int
    retain: bool
    properties: MessageProps
    origin: str  # site_id of the gateway that first took it from its broker

    def __repr__(self) -> str:  # never print payloads (they may be confidential)
        return (
            f"BridgeMessage(topic={self.topic!r}, {len(self.payload)} bytes, qos={self.qos}, "
            f"retain={self.retain}, origin={self.origin!r})"
        )


class PeerTransport(Protocol):
    """How the bridge sends a message to the peer gateway."""

    async def forward(self, msg: BridgeMessage) -> None:
        """Return only when the peer gateway reports that its broker accepted ``msg``
        (PUBACK for QoS 1; for QoS 0 once handed to the peer's broker).

        Raise :class:`gateway.errors.PeerUnavailable` (or another ``GatewayError``) when the
        link is down or the peer did not answer: the bridge keeps the message unacknowledged
        and retries. Raise :class:`gateway.errors.PeerRejected` when the peer's broker refused
        the message for good: the bridge counts it as dropped and acknowledges it locally.
        """
        ...
