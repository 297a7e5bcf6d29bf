"""Load bootstrap credentials from the configured files and build the core's authenticator."""

from __future__ import annotations

import datetime
from collections.abc import Callable

from gateway.config import AuthMode, Settings, require_files
from gateway.core.auth import Authenticator, CertVerifier, PkiAuthenticator, PskAuthenticator
from gateway.core.labels import PSK_LEN
from gateway.crypto import Provider, SigAlg, x509
from gateway.errors import ConfigError, CryptoError
from gateway.logs import register_secret

ALLOWED_PEER_ALGS = frozenset({SigAlg.MLDSA65, SigAlg.MLDSA87})


def make_verifier(ca_pems: bytes) -> CertVerifier:
    def verify(
        chain: list[bytes], expected_name: str, now: datetime.datetime
    ) -> tuple[str, SigAlg, bytes, str]:
        peer = x509.verify_peer(chain, ca_pems, expected_name, now, ALLOWED_PEER_ALGS)
        return peer.name, peer.alg, peer.public_key, peer.fingerprint[:16]

    return verify


def load_authenticator(
    settings: Settings,
    provider: Provider,
    clock: Callable[[], datetime.datetime] | None = None,
) -> Authenticator:
    """Read the key, certificate and CA (pki) or the PSK (psk); refuse unsafe files."""
    require_files(settings)
    a = settings.auth
    if a.mode is AuthMode.PSK:
        assert a.psk_file is not None
        psk = a.psk_file.read_bytes()
        if len(psk) != PSK_LEN:
            raise ConfigError(
                [
                    (
                        "auth.psk_file",
                        f"must hold exactly {PSK_LEN} bytes (got {len(psk)}); create one with `qgw pki psk`",
                    )
                ]
            )
        register_secret(psk)
        return PskAuthenticator(settings.gateway.site_id, psk)
    assert a.cert is not None
    assert a.key is not None
    assert a.ca is not None
    try:
        chain = x509.load_cert_chain(a.cert.read_bytes())
        key = x509.load_signing_key(a.key.read_bytes())
        ca = a.ca.read_bytes()
        identity = x509.certificate_name(chain[0])
    except CryptoError as exc:
        raise ConfigError([("auth", str(exc))]) from exc
    if identity == a.peer_name:
        raise ConfigError(
            [
                (
                    "auth.peer_name",
                    "equals our own certificate name (a gateway cannot peer with itself)",
                )
            ]
        )
    return PkiAuthenticator(
        identity,
        certs=tuple(chain),
        key=key,
        provider=provider,
        verifier=make_verifier(ca),
        clock=clock,
    )
