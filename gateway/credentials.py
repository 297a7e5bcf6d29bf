"""Load bootstrap credentials from the configured files and build the core's authenticator.

``qgw run`` and ``qgw check-config --strict`` both go through :func:`load_authenticator`, so a
file that ``check-config`` accepts is a file ``run`` can use, read as the same user. Every
problem is a :class:`ConfigError` naming the config key and the file, never a traceback.
"""

from __future__ import annotations

import datetime
import getpass
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

from gateway.config import AuthMode, QkdMode, Settings, require_files
from gateway.core.auth import (
    Authenticator,
    CertVerifier,
    PkiAuthenticator,
    PskAuthenticator,
    WotAuthenticator,
    WotEvaluator,
)
from gateway.core.labels import PSK_LEN
from gateway.crypto import Provider, SigAlg, wot, x509
from gateway.errors import ConfigError, CryptoError
from gateway.logs import register_secret

ALLOWED_PEER_ALGS = frozenset({SigAlg.MLDSA65, SigAlg.MLDSA87})
EXPIRY_WARNING = datetime.timedelta(days=30)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers with a numeric uid)
        return f"uid {os.getuid()}"


def read_file(key: str, path: Path) -> bytes:
    """Read a configured file; an OSError becomes a ConfigError naming the key, file and user."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            [(key, f"cannot read {path} as user {_user()}: {exc.strerror or exc}")]
        ) from None


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


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
    return load_credentials(settings, provider, clock)[0]


def load_credentials(
    settings: Settings,
    provider: Provider,
    clock: Callable[[], datetime.datetime] | None = None,
) -> tuple[Authenticator, x509.OwnCertificate | None]:
    """The authenticator and (pki) what we know of our own certificate."""
    require_files(settings)
    a = settings.auth
    if a.mode is AuthMode.PSK:
        assert a.psk_file is not None
        psk = read_file("auth.psk_file", a.psk_file)
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
        return PskAuthenticator(settings.gateway.site_id, psk), None
    if a.mode is AuthMode.WOT:
        return load_wot(settings, provider, clock), None
    assert a.cert is not None
    assert a.key is not None
    assert a.ca is not None
    cert_pem = read_file("auth.cert", a.cert)
    key_pem = read_file("auth.key", a.key)
    ca = read_file("auth.ca", a.ca)
    chain = _crypto("auth.cert", a.cert, lambda: x509.load_cert_chain(cert_pem))
    key = _crypto("auth.key", a.key, lambda: x509.load_signing_key(key_pem))
    _crypto("auth.ca", a.ca, lambda: x509.load_ca_certificates(ca))
    identity = _crypto("auth.cert", a.cert, lambda: x509.certificate_name(chain[0]))
    if not _crypto("auth.key", a.key, lambda: x509.private_key_matches(key_pem, chain[0])):
        raise ConfigError(
            [("auth.key", f"{a.key} is not the private key of the certificate in {a.cert}")]
        )
    own = x509.check_own_certificate(chain, ca, (clock or _utcnow)())
    now = (clock or _utcnow)()
    if now > own.not_after:
        raise ConfigError(
            [("auth.cert", f"{a.cert} expired on {own.not_after:%Y-%m-%d %H:%M} UTC")]
        )
    if now < own.not_before:
        raise ConfigError(
            [("auth.cert", f"{a.cert} is not valid before {own.not_before:%Y-%m-%d %H:%M} UTC")]
        )
    if identity == a.peer_name:
        raise ConfigError(
            [
                (
                    "auth.peer_name",
                    "equals our own certificate name (a gateway cannot peer with itself)",
                )
            ]
        )
    authenticator = PkiAuthenticator(
        identity,
        certs=tuple(chain),
        key=key,
        provider=provider,
        verifier=make_verifier(ca),
        clock=clock,
    )
    return authenticator, own


@dataclass(frozen=True, slots=True)
class WotPolicy:
    """The configured introducers, thresholds and revocation list (re-read on every reload)."""

    introducers: tuple[wot.Introducer, ...]
    full_needed: int
    marginals_needed: int
    revoked: frozenset[str]


def load_wot_policy(settings: Settings) -> WotPolicy:
    """Read ``[[auth.introducers]]`` and ``auth.revoked``; one introducer key listed twice is an error."""
    a = settings.auth
    intros: list[wot.Introducer] = []
    seen: dict[str, int] = {}
    for n, ref in enumerate(a.introducers):
        key = f"auth.introducers[{n}].file"
        pem = read_file(key, ref.file)
        intro = _crypto(key, ref.file, partial(wot.load_introducer, pem, ref.trust.value))
        if intro.fingerprint in seen:
            raise ConfigError(
                [
                    (
                        key,
                        f"{ref.file}: the same introducer key as auth.introducers[{seen[intro.fingerprint]}]",
                    )
                ]
            )
        seen[intro.fingerprint] = n
        intros.append(intro)
    revoked: frozenset[str] = frozenset()
    if a.revoked is not None:
        text = read_file("auth.revoked", a.revoked)
        revoked = _crypto("auth.revoked", a.revoked, lambda: wot.parse_revocations(text))
    return WotPolicy(tuple(intros), a.full_needed, a.marginals_needed, revoked)


def make_wot_evaluator(policy: WotPolicy) -> WotEvaluator:
    def evaluate(
        certs: tuple[bytes, ...], expected_name: str, now: datetime.datetime
    ) -> wot.Verdict:
        return wot.evaluate(
            certs,
            policy.introducers,
            expected_name,
            now,
            revoked=policy.revoked,
            full_needed=policy.full_needed,
            marginals_needed=policy.marginals_needed,
            allowed_algs=ALLOWED_PEER_ALGS,
        )

    return evaluate


def load_wot(
    settings: Settings,
    provider: Provider,
    clock: Callable[[], datetime.datetime] | None = None,
) -> WotAuthenticator:
    """wot: our key and endorsements (identity = the name they endorse), the peer policy."""
    a = settings.auth
    assert a.key is not None
    assert a.endorsements is not None
    key_pem = read_file("auth.key", a.key)
    end_pem = read_file("auth.endorsements", a.endorsements)
    key = _crypto("auth.key", a.key, lambda: x509.load_signing_key(key_pem))
    chain = _crypto("auth.endorsements", a.endorsements, lambda: wot.load_endorsements(end_pem))
    identity = _crypto(
        "auth.endorsements", a.endorsements, lambda: wot.own_endorsements(chain, key_pem)
    )
    if identity == a.peer_name:
        raise ConfigError(
            [("auth.peer_name", "equals our own endorsed name (a gateway cannot peer with itself)")]
        )
    policy = load_wot_policy(settings)
    return WotAuthenticator(
        identity,
        certs=tuple(chain),
        key=key,
        provider=provider,
        evaluator=make_wot_evaluator(policy),
        clock=clock,
    )


T = TypeVar("T")


def _crypto(key: str, path: Path, load: Callable[[], T]) -> T:
    try:
        return load()
    except CryptoError as exc:
        raise ConfigError([(key, f"{path}: {exc}")]) from None


def kme_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The KME client's mutual-TLS context exactly as the ETSI 014 client builds it."""
    from keysource.tls import client_context  # noqa: PLC0415 -- keysource stays optional here

    q = settings.qkd
    if q.mode is QkdMode.OFF or not q.source.over_tls:
        return None
    assert q.cert is not None
    assert q.key is not None
    assert q.ca is not None
    for k, path in (("qkd.cert", q.cert), ("qkd.key", q.key), ("qkd.ca", q.ca)):
        read_file(k, path)
    try:
        return client_context(q.cert, q.key, q.ca)
    except ssl.SSLError as exc:
        raise ConfigError(
            [("qkd", f"KME client TLS files ({q.cert}, {q.key}, {q.ca}) do not load: {exc.reason}")]
        ) from None
    except OSError as exc:
        raise ConfigError([("qkd", f"KME client TLS files do not load: {exc.strerror}")]) from None


def kme_certificate_not_after(settings: Settings) -> datetime.datetime | None:
    """Expiry of the KME client certificate (None when no ETSI 014 client is configured)."""
    q = settings.qkd
    if q.mode is QkdMode.OFF or not q.source.over_tls or q.cert is None:
        return None
    pem = read_file("qkd.cert", q.cert)
    return _crypto("qkd.cert", q.cert, lambda: x509.certificate_not_after(pem))


@dataclass(slots=True)
class CredentialReport:
    """What ``check-config --strict`` tells the operator beyond "it loads"."""

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def check_credentials(
    settings: Settings, provider: Provider, now: datetime.datetime | None = None
) -> CredentialReport:
    """Load every credential as ``run`` does, then check what the peer and the KME will check."""
    report = CredentialReport()
    now = now or _utcnow()
    _, own = load_credentials(settings, provider, clock=lambda: now)
    if own is not None:
        left = own.not_after - now
        report.lines.append(
            f"auth: certificate {own.name!r} (sha256 {own.fingerprint[:16]}), key matches, "
            f"valid until {own.not_after:%Y-%m-%d %H:%M} UTC ({left.days} days)"
        )
        if own.ca_problem is not None:
            report.problems.append(
                (
                    "auth.ca",
                    (
                        f"our certificate does not verify against {settings.auth.ca}: "
                        f"{own.ca_problem} (the peer checks it against its CA)"
                    ),
                )
            )
        else:
            report.lines.append(f"auth: certificate chain verifies against {settings.auth.ca}")
        if left < EXPIRY_WARNING:
            report.warnings.append(f"auth.cert expires in {left.days} days: renew it")
    elif settings.auth.mode is AuthMode.WOT:
        _wot_report(settings, now, report)
    else:
        report.lines.append(f"auth: PSK loaded from {settings.auth.psk_file} (32 bytes)")
    if kme_tls_context(settings) is not None:
        q = settings.qkd
        report.lines.append(
            f"qkd: {q.source.value} client certificate, key and CA load ({q.kme_url})"
        )
        not_after = kme_certificate_not_after(settings)  # ConfigError naming qkd.cert
        assert not_after is not None
        left = not_after - now
        report.lines.append(
            f"qkd: KME client certificate valid until {not_after:%Y-%m-%d %H:%M} UTC "
            f"({left.days} days)"
        )
        if left < datetime.timedelta(0):
            report.problems.append(("qkd.cert", f"{q.cert} has expired"))
        elif left < EXPIRY_WARNING:
            report.warnings.append(f"qkd.cert expires in {left.days} days: renew it")
    return report


def _wot_report(settings: Settings, now: datetime.datetime, report: CredentialReport) -> None:
    """check-config --strict in wot mode: our endorsements as the peer will judge them."""
    a = settings.auth
    assert a.endorsements is not None
    policy = load_wot_policy(settings)
    chain = wot.load_endorsements(read_file("auth.endorsements", a.endorsements))
    report.lines.append(
        f"auth: wot, {len(policy.introducers)} introducer(s) ("
        + ", ".join(f"{i.label} {i.trust.value}" for i in policy.introducers)
        + f"), needs {policy.full_needed} full or {policy.marginals_needed} in all, "
        f"{len(policy.revoked)} revoked endorsement(s)"
    )
    for n, der in enumerate(chain):
        info = wot.describe(der, n)
        left = info.not_after - now
        report.lines.append(
            f"auth: endorsement {n} by {info.issuer!r} for {', '.join(info.names)} "
            f"(sha256 {info.fingerprint[:16]}), valid until {info.not_after:%Y-%m-%d %H:%M} UTC "
            f"({left.days} days)"
        )
        if left < datetime.timedelta(0):
            report.problems.append(("auth.endorsements", f"endorsement {n} has expired"))
        elif left < EXPIRY_WARNING:
            report.warnings.append(
                f"auth.endorsements: endorsement {n} expires in {left.days} days"
            )
