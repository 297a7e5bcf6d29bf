"""The gateway's one typed settings model.

Sources, highest precedence first:

1. environment variables ``QGW_<SECTION>__<KEY>`` (e.g. ``QGW_REKEY__INTERVAL_SECONDS=60``),
2. the TOML file given with ``--config``,
3. the defaults below.

Unknown keys are errors in both the file and the environment (``QGW_GATEWAY__SITE_IDD`` is
refused like ``gateway.site_idd``). Relative paths are relative to the folder of the config
file, whichever source they came from.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.errors import ConfigError

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_hostport(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT with a port from 0 to 65535")
    return value


HostPort = str  # checked by _check_hostport in each section's validator (message in words)


class Role(StrEnum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class GatewaySection(Section):
    """This gateway and how it reaches its peer."""

    site_id: str = Field(
        "site-a", pattern=_NAME_PATTERN, description="Name of this site; shown in logs and metrics."
    )
    role: Role = Field(
        Role.INITIATOR,
        description="initiator connects to the peer and is the ETSI 014 master SAE; "
        "responder listens and is the slave SAE. Exactly one of the two sites is initiator.",
    )
    listen: HostPort = Field(
        "0.0.0.0:7443", description="HOST:PORT the responder listens on for the peer gateway."
    )
    peer: HostPort = Field(
        "127.0.0.1:7443", description="HOST:PORT of the peer gateway (used by the initiator)."
    )
    connect_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="Timeout for one TCP connect and one handshake."
    )
    reconnect_max_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Upper bound of the jittered exponential reconnect back-off.",
    )

    @field_validator("listen", "peer")
    @classmethod
    def _hostport(cls, v: str) -> str:
        return _check_hostport(v)


class AuthMode(StrEnum):
    PKI = "pki"
    PSK = "psk"
    WOT = "wot"


class IntroducerTrust(StrEnum):
    FULL = "full"
    MARGINAL = "marginal"


# The handshake's certificate list carries at most 4 endorsements (docs/protocol.md §3.2).
WOT_MAX_ENDORSEMENTS = 4


class IntroducerRef(Section):
    """wot: one introducer this gateway trusts to vouch for the peer's ML-DSA key."""

    file: Path = Field(
        ...,
        description="The introducer's self-signed ML-DSA certificate (PEM, `qgw wot init-introducer`).",
    )
    trust: IntroducerTrust = Field(
        ..., description="full: one endorsement suffices (by default); marginal: three are needed."
    )


class AuthSection(Section):
    """Bootstrap authentication (first handshake only; rekeys are QKD-authenticated)."""

    mode: AuthMode = Field(
        AuthMode.PKI,
        description="pki: ML-DSA X.509 certificates; psk: pre-shared key; wot: web of trust "
        "(the peer's ML-DSA key endorsed by enough configured introducers).",
    )
    cert: Path | None = Field(None, description="pki: this gateway's ML-DSA certificate (PEM).")
    key: Path | None = Field(
        None, description="pki and wot: this gateway's ML-DSA private key (PEM, mode 0600)."
    )
    ca: Path | None = Field(
        None, description="pki: the site CA certificate(s) trusted for the peer (PEM)."
    )
    peer_name: str = Field(
        "site-b",
        pattern=_NAME_PATTERN,
        description="Identity the peer must prove: the DNS name in its certificate SAN (pki) "
        "or its site_id (psk). Must differ from our own identity.",
    )
    psk_file: Path | None = Field(
        None, description="psk: file with the 32-byte pre-shared key (mode 0600)."
    )
    endorsements: Path | None = Field(
        None,
        description="wot: this gateway's endorsements (PEM, 1 to 4 certificates issued by "
        "introducers for auth.key's public key, `qgw wot endorse`); sent to the peer.",
    )
    introducers: list[IntroducerRef] = Field(
        default_factory=list,
        description="wot: the introducers whose endorsements of the peer count, each with a trust level.",
    )
    full_needed: int = Field(
        1,
        ge=1,
        le=WOT_MAX_ENDORSEMENTS,
        description="wot: the peer's key is trusted when at least this many distinct full "
        "introducers endorse it (GnuPG's completes-needed) ...",
    )
    marginals_needed: int = Field(
        3,
        ge=1,
        le=WOT_MAX_ENDORSEMENTS,
        description="wot: ... or when at least this many distinct introducers of any trust level "
        "endorse it (GnuPG's marginals-needed; a full endorsement counts here too).",
    )
    revoked: Path | None = Field(
        None,
        description="wot: revocation list (one endorsement SHA-256 fingerprint per line, "
        "`#` comments); re-read on reload (SIGHUP).",
    )

    @model_validator(mode="after")
    def _mode_fields(self) -> AuthSection:
        missing: list[str] = []
        if self.mode is AuthMode.PKI:
            missing = [n for n in ("cert", "key", "ca") if getattr(self, n) is None]
        elif self.mode is AuthMode.WOT:
            missing = [n for n in ("key", "endorsements") if getattr(self, n) is None]
            if not self.introducers:
                missing.append("at least one [[auth.introducers]]")
        elif self.psk_file is None:
            missing = ["psk_file"]
        if missing:
            raise ValueError(f"auth.mode = {self.mode.value!r} needs {', '.join(missing)}")
        return self


class QkdMode(StrEnum):
    REQUIRED = "required"
    PREFERRED = "preferred"
    OFF = "off"


class QkdSourceKind(StrEnum):
    ETSI014 = "etsi014"
    SKIP = "skip"
    STATIC = "static"

    @property
    def over_tls(self) -> bool:
        """The source talks to a KME / key provider over mutual TLS (cert, key, ca needed)."""
        return self is not QkdSourceKind.STATIC


class QkdSection(Section):
    """Where QKD keys come from and what to do without them."""

    mode: QkdMode = Field(
        QkdMode.REQUIRED,
        description="required: no traffic without a QKD key (fail closed, alarm, retry); "
        "preferred: continue on ML-KEM+X25519 with an alarm, absence recorded in the transcript; "
        "off: PQC only.",
    )
    source: QkdSourceKind = Field(
        QkdSourceKind.ETSI014,
        description="etsi014: the site's KME over ETSI GS QKD 014; skip: the site's key "
        "provider over Cisco SKIP (draft-cisco-skip); static: a key file (tests only).",
    )
    kme_url: str = Field(
        "https://127.0.0.1:8443",
        description="Base URL of the site's KME (ETSI GS QKD 014 or SKIP API, HTTPS); for skip, "
        "sae_id and peer_sae_id are the SKIP system IDs (peer_sae_id = remoteSystemID).",
    )
    sae_id: str = Field("sae-a", min_length=1, max_length=128, description="Our SAE ID at the KME.")
    peer_sae_id: str = Field(
        "sae-b", min_length=1, max_length=128, description="The peer gateway's SAE ID."
    )
    cert: Path | None = Field(None, description="Client certificate for mTLS to the KME (PEM).")
    key: Path | None = Field(
        None, description="Client private key for mTLS to the KME (PEM, mode 0600)."
    )
    ca: Path | None = Field(None, description="CA that signs the KME's server certificate (PEM).")
    key_size_bits: int = Field(
        256, ge=256, le=8192, multiple_of=8, description="Size of each QKD key requested (bits)."
    )
    static_file: Path | None = Field(
        None, description="static source: file of keys shared by both sites (tests and labs only)."
    )
    timeout_seconds: float = Field(5.0, gt=0, le=120, description="Timeout of one KME request.")

    @model_validator(mode="after")
    def _source_fields(self) -> QkdSection:
        if self.mode is QkdMode.OFF:
            return self
        if self.source.over_tls:
            missing = [n for n in ("cert", "key", "ca") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"qkd.source = '{self.source.value}' needs {', '.join(missing)}")
            if not self.kme_url.startswith("https://"):
                raise ValueError(
                    "qkd.kme_url must be https:// (ETSI GS QKD 014 and SKIP require TLS)"
                )
        elif self.static_file is None:
            raise ValueError("qkd.source = 'static' needs static_file")
        if self.sae_id == self.peer_sae_id:
            raise ValueError("qkd.sae_id and qkd.peer_sae_id must differ")
        return self


class Suite(StrEnum):
    MLKEM768_X25519 = "mlkem768-x25519-aes256gcm-sha384"
    MLKEM1024_X25519 = "mlkem1024-x25519-aes256gcm-sha384"
    # Conservative: FrodoKEM (plain LWE, no ring/module structure) in the KEM slot. OpenSSL has
    # no FrodoKEM, so this suite needs crypto.provider = "oqs" (liboqs). 15.6 KB key + 15.8 KB
    # ciphertext per bootstrap and rekey.
    FRODOKEM976AES_X25519 = "frodokem976aes-x25519-aes256gcm-sha384"


class CryptoSection(Section):
    """Algorithm suite (a fixed menu; both sites must agree, no negotiation downwards)."""

    suite: Suite = Field(
        Suite.MLKEM768_X25519,
        description="Key exchange + record suite. Both sites must configure the same.",
    )
    provider: Literal["pyca", "oqs"] = Field(
        "pyca",
        description="PQC provider: pyca (cryptography, default) or oqs (liboqs-python, extra [oqs]).",
    )

    @model_validator(mode="after")
    def _suite_needs_provider(self) -> CryptoSection:
        if self.suite is Suite.FRODOKEM976AES_X25519 and self.provider != "oqs":
            raise ValueError(
                f"crypto.suite = {self.suite.value!r} needs crypto.provider = 'oqs' "
                "(OpenSSL, hence the pyca provider, has no FrodoKEM; see docs/crypto-providers.md)"
            )
        return self


class RekeySection(Section):
    """When a new epoch is negotiated (whichever limit comes first)."""

    interval_seconds: float = Field(
        120.0,
        ge=1,
        le=86400,
        description="Rekey period in seconds (120 s as WireGuard and Rosenpass).",
    )
    max_records: int = Field(
        2**24,
        ge=16,
        le=2**24 + 2**23,
        description="Records per key before a forced rekey (RFC 8446 5.5: AES-GCM limit ~2^24.5).",
    )
    max_bytes: int = Field(
        2**36, ge=2**16, le=2**40, description="Plaintext bytes per key before a forced rekey."
    )


class Direction(StrEnum):
    OUT = "out"
    IN = "in"
    BOTH = "both"


class Rule(Section):
    """One topic rule, like a mosquitto bridge ``topic`` line."""

    name: str = Field(
        "",
        pattern=r"^$|" + _NAME_PATTERN[1:],
        description="Name in metrics and `qgw status` (default: '<direction>:<local_prefix>"
        "<pattern>').",
    )
    pattern: str = Field(
        ..., min_length=1, description="MQTT topic filter (after the prefix), e.g. 'sensors/#'."
    )
    direction: Direction = Field(
        Direction.OUT, description="out: local -> peer; in: peer -> local; both."
    )
    qos: Literal[0, 1] = Field(1, description="QoS used on both brokers for this rule.")
    local_prefix: str = Field("", description="Prefix of the topic on the local broker.")
    remote_prefix: str = Field("", description="Prefix of the topic on the peer's broker.")
    share_group: str = Field(
        "",
        pattern=r"^[A-Za-z0-9_-]{0,64}$",
        description="If set, subscribe as the MQTT v5 shared subscription "
        "'$share/<group>/<local_prefix><pattern>' so that several gateway pairs split the "
        "messages (horizontal scale-out, docs/scaling.md).",
    )

    @field_validator("pattern")
    @classmethod
    def _filter(cls, v: str) -> str:
        parts = v.split("/")
        for i, p in enumerate(parts):
            if "#" in p and (p != "#" or i != len(parts) - 1):
                raise ValueError("'#' must be a whole last level")
            if "+" in p and p != "+":
                raise ValueError("'+' must be a whole level")
        return v


class MqttSection(Section):
    """The local broker."""

    broker: str = Field(
        "mqtt://127.0.0.1:1883",
        pattern=r"^mqtts?://",
        description="Local broker URL, mqtt:// or mqtts://.",
    )
    client_id: str = Field(
        "qgw-site-a",
        min_length=1,
        max_length=64,
        description="MQTT client id (persistent session).",
    )
    username: str | None = Field(None, description="Broker user name.")
    password: SecretStr | None = Field(
        None, description="Broker password (never printed; prefer the environment)."
    )
    tls_ca: Path | None = Field(None, description="CA for mqtts:// (PEM).")
    tls_cert: Path | None = Field(None, description="Client certificate for mqtts:// (PEM).")
    tls_key: Path | None = Field(None, description="Client key for mqtts:// (PEM, mode 0600).")
    max_payload_bytes: int = Field(
        1 << 20,
        ge=1024,
        le=256 << 20,
        description="Largest payload carried (larger ones are counted and dropped).",
    )
    inflight: int = Field(
        256, ge=1, le=65535, description="Messages in flight to the peer before backpressure."
    )
    rules: list[Rule] = Field(default_factory=list, description="Topic rules ([[mqtt.rules]]).")
    # -- sizing the local broker's queue (checked by `qgw check-config`, docs/operations.md) --
    outage_tolerance_seconds: float = Field(
        300.0,
        ge=0,
        description="How long a WAN, peer or gateway outage must be survived without loss: the "
        "local broker must queue this many seconds of `expected_rate`.",
    )
    expected_rate: float | None = Field(
        None,
        ge=0,
        description="Messages per second this site publishes towards the peer, summed over the "
        "out/both rules. Unset: the queue limit is not checked.",
    )
    broker_max_queued_messages: int | None = Field(
        None,
        ge=0,
        description="The local broker's per-client queue limit in messages (0 = unlimited). "
        "Unset: read from `broker_config`.",
    )
    broker_config: Path | None = Field(
        None,
        description="The local mosquitto's mosquitto.conf, read by `check-config` for "
        "max_queued_messages / max_queued_bytes (mosquitto's default: 1000 messages).",
    )

    @model_validator(mode="after")
    def _unique_rule_names(self) -> MqttSection:
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            label = rule_label(rule)
            if label in seen:
                raise ValueError(
                    f"rules {seen[label]} and {i} are both named {label!r} in metrics; "
                    "give one of them a distinct `name`"
                )
            seen[label] = i
        return self


def rule_label(rule: Rule) -> str:
    """A rule's label in metrics and status: its ``name``, else direction and filter."""
    return rule.name or f"{rule.direction.value}:{rule.local_prefix}{rule.pattern}"


class MetricsSection(Section):
    """Health and Prometheus metrics over HTTP."""

    listen: str = Field(
        "127.0.0.1:9464",
        description="HOST:PORT for /healthz, /readyz, /metrics; empty string disables.",
    )

    @field_validator("listen")
    @classmethod
    def _hostport(cls, v: str) -> str:
        return v if v == "" else _check_hostport(v)


def _check_tunnel_address(value: str, key: str) -> str:
    """``host:port`` of a tunnel end, with a message in words (IPv6 as ``[::1]:port``)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f'{key} = {value!r} is not HOST:PORT (e.g. "127.0.0.1:1884")')
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"{key} = {value!r}: an IPv6 address is written [ADDRESS]:PORT")
    elif ":" in host:
        raise ValueError(f"{key} = {value!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
    if any(c.isspace() for c in host):
        raise ValueError(f"{key} = {value!r}: the host contains white space")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{key} = {value!r}: the port must be a number from 0 to 65535")
    return value


def split_address(value: str) -> tuple[str, int]:
    """A validated tunnel ``host:port`` as (host without brackets, port)."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class TunnelSection(Section):
    """One ``[[tunnel]]``: a TCP service carried between the sites as streams (docs/tunnel.md).

    The same ``name`` is configured on both gateways: on one with ``listen`` (local clients
    connect there), on the other with ``connect`` (the local destination dialled for each
    stream the peer opens by this name). A peer can only name tunnels; it never chooses an
    address."""

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9._-]{1,63}$",
        description="Tunnel name, the same on both gateways ([A-Za-z0-9._-], 1 to 63 characters).",
    )
    listen: str | None = Field(
        None,
        description="HOST:PORT where this gateway accepts local TCP clients for this tunnel.",
    )
    connect: str | None = Field(
        None,
        description="HOST:PORT this gateway dials for each stream the peer opens by this name.",
    )

    @model_validator(mode="after")
    def _one_end(self) -> TunnelSection:
        if (self.listen is None) == (self.connect is None):
            raise ValueError(
                f"tunnel {self.name!r} needs exactly one of listen (this gateway accepts local "
                "clients) or connect (this gateway dials the local destination)"
            )
        if self.listen is not None:
            _check_tunnel_address(self.listen, "listen")
        if self.connect is not None:
            _check_tunnel_address(self.connect, "connect")
            if split_address(self.connect)[1] == 0:
                raise ValueError(f"tunnel {self.name!r}: connect needs a port other than 0")
        return self


class LoggingSection(Section):
    """Logging. Secrets are never logged; a filter redacts anything that looks like one."""

    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    format: Literal["text", "json"] = Field(
        "text", description="text or json (one object per line)."
    )


class Settings(BaseSettings):
    """Complete configuration of one gateway."""

    model_config = SettingsConfigDict(
        env_prefix="QGW_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    gateway: GatewaySection = Field(
        default_factory=GatewaySection, description="This gateway and its peer."
    )
    auth: AuthSection = Field(..., description="Bootstrap authentication (required section).")
    qkd: QkdSection = Field(..., description="QKD key source and policy (required section).")
    crypto: CryptoSection = Field(default_factory=CryptoSection, description="Algorithm suite.")
    rekey: RekeySection = Field(default_factory=RekeySection, description="Rekey limits.")
    mqtt: MqttSection = Field(
        default_factory=MqttSection, description="Local broker and topic rules."
    )
    metrics: MetricsSection = Field(default_factory=MetricsSection, description="Metrics HTTP.")
    logging: LoggingSection = Field(default_factory=LoggingSection, description="Logging.")
    tunnel: list[TunnelSection] = Field(
        default_factory=list,
        description="Tunnels ([[tunnel]]): TCP services carried between the sites as streams.",
    )

    @field_validator("tunnel")
    @classmethod
    def _unique_tunnels(cls, v: list[TunnelSection]) -> list[TunnelSection]:
        seen: set[str] = set()
        for t in v:
            if t.name in seen:
                raise ValueError(f"tunnel name {t.name!r} is used twice; names must be unique")
            seen.add(t.name)
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (passed as init values); no dotenv, no secrets dir.
        return (env_settings, init_settings)


@dataclass(frozen=True, slots=True)
class FileRef:
    """A file the configuration points at."""

    key: str  # dotted key path, e.g. "auth.key"
    path: Path
    secret: bool  # private key / PSK: must not be readable by group or others


def _format_loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts)


_PATTERN_WORDS = {
    r"^$|" + _NAME_PATTERN[1:]: "must be empty or 1 to 63 characters: letters, digits, '.', "
    "'_' or '-', starting with a letter or digit",
    _NAME_PATTERN: "must be 1 to 63 characters: letters, digits, '.', '_' or '-', "
    "starting with a letter or digit",
    r"^[A-Za-z0-9_-]{0,64}$": "must be at most 64 letters, digits, '_' or '-'",
    r"^mqtts?://": "must be a URL starting with mqtt:// or mqtts://",
}


def _problems_from(exc: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = tuple(x for x in err["loc"] if x not in ("function-after",))
        key = _format_loc(loc)
        if err["type"] == "extra_forbidden":
            problems.append((key, "unknown key"))
            continue
        msg = err["msg"]
        if err["type"] == "string_pattern_mismatch":
            pattern = str((err.get("ctx") or {}).get("pattern", ""))
            msg = _PATTERN_WORDS.get(pattern, "has a value of the wrong form")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append((key, msg))
    return problems


def _resolve(base: Path, value: Path | None) -> Path | None:
    if value is None:
        return None
    value = value.expanduser()
    return value if value.is_absolute() else (base / value)


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    def fix(section: BaseModel) -> BaseModel:
        updates: dict[str, Any] = {
            name: _resolve(base, val)
            for name in type(section).model_fields
            if isinstance(val := getattr(section, name), Path)
        }
        if isinstance(section, AuthSection) and section.introducers:
            updates["introducers"] = [fix(i) for i in section.introducers]
        return section.model_copy(update=updates) if updates else section

    return settings.model_copy(
        update={name: fix(getattr(settings, name)) for name in ("auth", "qkd", "mqtt")}
    )


def load_settings(path: Path | str, environ: dict[str, str] | None = None) -> Settings:
    """Load a config file (TOML) with environment overrides; raise ConfigError on any problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([("", f"cannot read config file {path}: {exc.strerror}")]) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([("", f"{path} is not valid TOML: {exc}")]) from exc
    return settings_from_dict(data, base=path.resolve().parent, environ=environ)


# QGW_* names that are not configuration: used by the project's own scripts and tests.
NON_CONFIG_ENV = frozenset(
    {
        "QGW_UID",  # deploy/compose.yaml's host-side variables
        "QGW_GID",
        "QGW_DEMO_DIR",
        "QGW_IMAGE",
        "QGW_MQTT_IMAGE",
        "QGW_MQTT_A_PORT",
        "QGW_MQTT_B_PORT",
        "QGW_METRICS_A_PORT",
        "QGW_METRICS_B_PORT",
        "QGW_HEALTH_PORT",  # the KME simulator's health listener in the containers
        "QGW_ALLOW_NO_NETNS",  # tests
        "QGW_TEST_KEY_SOURCE",
    }
)


def unknown_env_problems(environ: dict[str, str] | os._Environ[str]) -> list[tuple[str, str]]:
    """Every ``QGW_*`` variable that names no setting (pydantic-settings would ignore it).

    Accepted shapes: ``QGW_<SECTION>__<KEY>`` and ``QGW_<SECTION>`` (a whole section as JSON).
    An unknown key inside a known section is reported by the model itself ("unknown key").
    """
    problems: list[tuple[str, str]] = []
    sections = Settings.model_fields
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("QGW_") or upper in NON_CONFIG_ENV:
            continue
        parts = upper[4:].lower().split("__")
        section = parts[0]
        if section not in sections:
            hint = ""
            for known in sections:
                if section.startswith(known + "_"):
                    key = section[len(known) + 1 :].upper()
                    hint = f"; did you mean QGW_{known.upper()}__{key} (two underscores)?"
                    break
            problems.append((name, f"unknown environment variable: no section {section!r}{hint}"))
            continue
        if len(parts) > 2:
            problems.append(
                (name, "unknown environment variable: use QGW_<SECTION>__<KEY> (one level)")
            )
            continue
    return problems


def settings_from_dict(
    data: dict[str, Any], base: Path, environ: dict[str, str] | None = None
) -> Settings:
    """Build settings from an already parsed mapping (used by tests and ``init-demo``)."""
    env_problems = unknown_env_problems(os.environ if environ is None else environ)
    if env_problems:
        raise ConfigError(env_problems)
    saved: dict[str, str] | None = None
    if environ is not None:
        # pydantic-settings reads os.environ; swap in the given mapping for this call.
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(environ)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_problems_from(exc)) from None
    finally:
        if saved is not None:
            os.environ.clear()
            os.environ.update(saved)
    return _resolve_paths(settings, base)


def referenced_files(s: Settings) -> list[FileRef]:
    """Every file the configuration points at, in the sections that are in effect."""
    refs: list[FileRef] = []

    def add(key: str, path: Path | None, secret: bool) -> None:
        if path is not None:
            refs.append(FileRef(key, path, secret))

    if s.auth.mode is AuthMode.PKI:
        add("auth.cert", s.auth.cert, False)
        add("auth.key", s.auth.key, True)
        add("auth.ca", s.auth.ca, False)
    elif s.auth.mode is AuthMode.WOT:
        add("auth.key", s.auth.key, True)
        add("auth.endorsements", s.auth.endorsements, False)
        for n, intro in enumerate(s.auth.introducers):
            add(f"auth.introducers[{n}].file", intro.file, False)
        add("auth.revoked", s.auth.revoked, False)
    else:
        add("auth.psk_file", s.auth.psk_file, True)
    if s.qkd.mode is not QkdMode.OFF:
        if s.qkd.source.over_tls:
            add("qkd.cert", s.qkd.cert, False)
            add("qkd.key", s.qkd.key, True)
            add("qkd.ca", s.qkd.ca, False)
        else:
            add("qkd.static_file", s.qkd.static_file, True)
    add("mqtt.tls_ca", s.mqtt.tls_ca, False)
    add("mqtt.tls_cert", s.mqtt.tls_cert, False)
    add("mqtt.tls_key", s.mqtt.tls_key, True)
    return refs


@dataclass(frozen=True, slots=True)
class FileCheck:
    missing: list[FileRef]
    problems: list[tuple[str, str]]


def check_files(s: Settings) -> FileCheck:
    """Check that referenced files exist, are regular files, and secrets are mode 0600 (or stricter)."""
    missing: list[FileRef] = []
    problems: list[tuple[str, str]] = []
    for ref in referenced_files(s):
        try:
            st = ref.path.stat()
        except FileNotFoundError:
            missing.append(ref)
            continue
        except OSError as exc:
            problems.append((ref.key, f"cannot access {ref.path}: {exc.strerror}"))
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append((ref.key, f"{ref.path} is not a regular file"))
            continue
        if ref.secret and st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            msg = (
                f"{ref.path} is readable by group or others (mode {mode:04o}); refusing to use "
                f"a secret file that is not private: chmod 600 {ref.path}"
            )
            problems.append((ref.key, msg))
    return FileCheck(missing, problems)


def require_files(s: Settings) -> None:
    """Raise ConfigError unless every referenced file exists with safe permissions (for ``run``)."""
    fc = check_files(s)
    problems = list(fc.problems) + [(m.key, f"file not found: {m.path}") for m in fc.missing]
    if problems:
        raise ConfigError(problems)


def redacted_dump(s: Settings) -> dict[str, Any]:
    """The effective configuration as plain data, secrets replaced by ``"<redacted>"``."""
    data = s.model_dump(mode="json")
    if s.mqtt.password is not None:
        data["mqtt"]["password"] = "<redacted>"  # noqa: S105 -- the placeholder, not a secret
    return data


def to_toml(data: dict[str, Any]) -> str:
    """Render plain data as TOML (enough for the configuration shape: tables, arrays of tables)."""
    out: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        raise TypeError(type(v).__name__)

    for section, body in data.items():
        if isinstance(body, list):  # a top-level array of tables, e.g. [[tunnel]]
            for row in body:
                out.append(f"[[{section}]]")
                out.extend(f"{rk} = {scalar(rv)}" for rk, rv in row.items() if rv is not None)
                out.append("")
            continue
        tables = {
            k: v for k, v in body.items() if isinstance(v, list) and v and isinstance(v[0], dict)
        }
        out.append(f"[{section}]")
        for k, v in body.items():
            if k in tables or v is None:
                continue
            out.append(f"{k} = {scalar(v)}")
        out.append("")
        for k, rows in tables.items():
            for row in rows:
                out.append(f"[[{section}.{k}]]")
                out.extend(f"{rk} = {scalar(rv)}" for rk, rv in row.items() if rv is not None)
                out.append("")
    return "\n".join(out)
