"""Bootstrap authenticators (docs/protocol.md §3): ML-DSA PKI, PSK, or a web of trust (wot).

The core calls these; they own the long-term credentials. Certificate validity needs wall
time, so the PKI authenticator takes a clock; the core itself never reads one.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.core.labels import PSK_LEN, SIG_CONTEXT, AuthModeId
from gateway.crypto import Provider, SigAlg, SigPrivateKey
from gateway.crypto.wot import Verdict
from gateway.errors import AuthenticationError


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    name: str
    fingerprint: str  # short hash of the certificate or "psk"


class Authenticator(Protocol):
    mode: AuthModeId
    identity: str
    certs: tuple[bytes, ...]

    def sign(self, message: bytes) -> bytes: ...

    def verify(
        self, certs: tuple[bytes, ...], expected_name: str, message: bytes, auth: bytes
    ) -> PeerIdentity:
        """Raise AuthenticationError unless ``auth`` proves ``expected_name`` signed ``message``."""
        ...

    def psk(self) -> bytes | None: ...


class PskAuthenticator:
    """PSK mode: the core uses the PSK for the admission MAC, the auth MACs and KS1."""

    mode = AuthModeId.PSK
    certs: tuple[bytes, ...] = ()

    def __init__(self, identity: str, psk: bytes) -> None:
        if len(psk) != PSK_LEN:
            raise AuthenticationError("PSK must be 32 bytes")
        self.identity = identity
        self._psk = psk

    def sign(self, message: bytes) -> bytes:
        raise AuthenticationError("PSK mode has no signatures")

    def verify(
        self, certs: tuple[bytes, ...], expected_name: str, message: bytes, auth: bytes
    ) -> PeerIdentity:
        raise AuthenticationError("PSK mode has no signatures")

    def psk(self) -> bytes | None:
        return self._psk

    def __repr__(self) -> str:
        return f"PskAuthenticator({self.identity!r}, psk=<secret>)"


# (chain DER leaf first, expected name, wall time) -> (name, algorithm, raw public key, fingerprint);
# raises AuthenticationError. gateway.credentials.make_verifier builds one from the site CA.
CertVerifier = Callable[[list[bytes], str, datetime.datetime], tuple[str, SigAlg, bytes, str]]


class _SigningAuthenticator:
    """What pki and wot share: an ML-DSA key that signs the transcript, no PSK."""

    def __init__(
        self,
        identity: str,
        certs: tuple[bytes, ...],
        key: SigPrivateKey,
        provider: Provider,
        clock: Callable[[], datetime.datetime] | None,
    ) -> None:
        self.identity = identity
        self.certs = certs
        self._key = key
        self._provider = provider
        self._clock = clock or (lambda: datetime.datetime.now(datetime.UTC))

    def sign(self, message: bytes) -> bytes:
        return self._provider.sign(self._key, message, SIG_CONTEXT)

    def psk(self) -> bytes | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity!r}, key=<secret>)"


class PkiAuthenticator(_SigningAuthenticator):
    """PKI mode: ML-DSA certificate chain under the site CA; the name is the SAN DNS name."""

    mode = AuthModeId.PKI

    def __init__(
        self,
        identity: str,
        *,
        certs: tuple[bytes, ...],
        key: SigPrivateKey,
        provider: Provider,
        verifier: CertVerifier,
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        super().__init__(identity, certs, key, provider, clock)
        self._verifier = verifier

    def verify(
        self, certs: tuple[bytes, ...], expected_name: str, message: bytes, auth: bytes
    ) -> PeerIdentity:
        if not certs:
            raise AuthenticationError("peer sent no certificate")
        name, alg, public, fingerprint = self._verifier(list(certs), expected_name, self._clock())
        if name != expected_name:
            raise AuthenticationError(
                f"peer certificate is for {name!r}, expected {expected_name!r}"
            )
        if not self._provider.verify(alg, public, message, auth, SIG_CONTEXT):
            raise AuthenticationError("peer signature does not verify")
        return PeerIdentity(name, fingerprint)


class InsufficientTrust(AuthenticationError):
    """wot: the peer's key verified fewer endorsements than the policy needs (alert 21)."""


# (endorsements DER, expected name, wall time) -> Verdict; gateway.credentials.make_wot_evaluator
# builds one from the configured introducers, thresholds and revocation list.
WotEvaluator = Callable[[tuple[bytes, ...], str, datetime.datetime], Verdict]


class WotAuthenticator(_SigningAuthenticator):
    """wot mode: the peer's ML-DSA key is trusted when enough configured introducers vouch for it.

    ``certs`` are this gateway's endorsements (all for the key that signs); the peer's list is
    judged by the injected evaluator (``gateway.crypto.wot.evaluate``), and the key it endorses
    must verify the transcript signature.
    """

    mode = AuthModeId.WOT

    def __init__(
        self,
        identity: str,
        *,
        certs: tuple[bytes, ...],
        key: SigPrivateKey,
        provider: Provider,
        evaluator: WotEvaluator,
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        super().__init__(identity, certs, key, provider, clock)
        self._evaluator = evaluator

    def verify(
        self, certs: tuple[bytes, ...], expected_name: str, message: bytes, auth: bytes
    ) -> PeerIdentity:
        verdict = self._evaluator(certs, expected_name, self._clock())
        # The signature first: endorsements of a key that did not sign prove nothing.
        if not self._provider.verify(verdict.alg, verdict.public_key, message, auth, SIG_CONTEXT):
            raise AuthenticationError("peer signature does not verify under the endorsed key")
        if not verdict.accepted:
            raise InsufficientTrust(f"web of trust: refused: {verdict.summary()}")
        return PeerIdentity(expected_name, verdict.key_fingerprint[:16])
