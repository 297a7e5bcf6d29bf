"""MQTT bridge: local broker <-> peer gateway, mosquitto-style topic rules (docs/bridge.md)."""

from __future__ import annotations

from gateway.bridge.bridge import Bridge, BridgeCounters, RuleCounters, topic_matches
from gateway.bridge.codec import decode, encode
from gateway.bridge.transport import ORIGIN_PROPERTY, BridgeMessage, MessageProps, PeerTransport

__all__ = [
    "ORIGIN_PROPERTY",
    "Bridge",
    "BridgeCounters",
    "BridgeMessage",
    "MessageProps",
    "PeerTransport",
    "RuleCounters",
    "decode",
    "encode",
    "topic_matches",
]
