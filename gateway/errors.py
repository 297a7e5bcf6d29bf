"""The project's exception tree.

Every error the gateway raises on purpose is one of these. Errors are translated only at
layer boundaries, always with ``raise New(...) from exc``. No message ever contains key
material: messages name the field or the peer, never secret bytes.

::

    GatewayError
    +-- ConfigError                  bad or missing configuration (CLI exit code 2)
    +-- ProtocolError                anything wrong on the gateway-to-gateway protocol
    |   +-- DecodeError              bytes that do not parse as a message or record
    |   +-- LocalProtocolError       we were asked to do something the state forbids
    |   +-- RemoteProtocolError      the peer sent something the protocol forbids
    |       +-- AuthenticationError  a signature, MAC, tag, certificate or AEAD check failed
    |       +-- ReplayError          a nonce, key ID or sequence number seen before
    +-- CryptoError                  a primitive failed or a provider is unavailable
    |   +-- ProviderUnavailable      e.g. liboqs-python not installed
    +-- KeySourceError               QKD key delivery failed
        +-- KmeUnavailable           KME unreachable, timed out, 5xx
        +-- KeyExhausted             KME has no key now (503 or empty pool)
        +-- KeyNotFound              KME does not know the requested key ID
        +-- KmeBadAnswer             the KME's answer is malformed or not what was asked
        +-- KmeUnauthorized          the KME refused our identity (401)
    +-- BridgeError                  moving a message between a broker and the peer link
        +-- PeerUnavailable          the peer link is down; retry later (message stays unacked)
        +-- PeerRejected             the peer's broker refused this message for good
        +-- BrokerUnavailable        the local broker is not connected or did not answer
        +-- BrokerRejected           the local broker refused a publish (reason code >= 0x80)
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """Configuration is invalid; ``problems`` lists ``(key path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{k}: {m}" if k else m for k, m in problems))


class ProtocolError(GatewayError):
    """Something is wrong on the gateway-to-gateway protocol."""


class DecodeError(ProtocolError):
    """Bytes that do not parse as a protocol message or record."""


class LocalProtocolError(ProtocolError):
    """The local caller asked for something the current state forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class AuthenticationError(RemoteProtocolError):
    """A signature, MAC, one-time tag, certificate or AEAD check failed."""


class ReplayError(RemoteProtocolError):
    """A nonce, QKD key ID or record sequence number was seen before."""


class CryptoError(GatewayError):
    """A cryptographic primitive failed or is unavailable."""


class ProviderUnavailable(CryptoError):
    """A crypto provider (e.g. liboqs-python) is not installed or lacks an algorithm."""


class KeySourceError(GatewayError):
    """QKD key delivery failed."""


class KmeUnavailable(KeySourceError):
    """The KME cannot be reached, timed out or answered with a server error."""


class KeyExhausted(KeySourceError):
    """The KME has no key to deliver right now."""


class KeyNotFound(KeySourceError):
    """The KME does not know (or no longer has) the requested key ID."""


class KmeBadAnswer(KeySourceError):
    """The KME's answer is malformed or not what was asked for."""


class KmeUnauthorized(KeySourceError):
    """The KME refused our SAE identity (HTTP 401)."""


class BridgeError(GatewayError):
    """Moving a message between the local broker and the peer link failed."""


class PeerUnavailable(BridgeError):
    """The peer link is down or the peer did not answer; the message may be retried."""


class PeerRejected(BridgeError):
    """The peer gateway's broker refused this message for good (retrying will not help)."""


class BrokerUnavailable(BridgeError):
    """The local broker is not connected or did not acknowledge in time."""


class BrokerRejected(BridgeError):
    """The local broker refused a publish with an MQTT v5 reason code >= 0x80."""

    def __init__(self, message: str, reason_code: int) -> None:
        self.reason_code = reason_code
        super().__init__(message)
