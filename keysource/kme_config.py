"""``kme.toml``: the KME simulator's configuration (pydantic, unknown keys refused).

Layout (docs/keysource.md shows a complete file)::

    [link]        the QKD link model (keysource.link.LinkParams): model = "rate" | "bb84"
    [link.bb84]   the decoy-state BB84 link when model = "bb84" (keysource.bb84_link)
    [sync]        CA of the KME-to-KME channel (two-process mode)
    [kme_a]       KME A: its ETSI 014 API, optional SKIP API, admin, sync endpoint, attached SAEs
    [kme_b]       KME B: the same

Relative paths are relative to the folder of the file. In two-process mode (``--kme A`` and
``--kme B``) both processes read the same file (or copies of it): KME A owns the link model and
pushes key material to KME B over the sync channel; KME B serves only keys it received.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import ConfigError
from keysource.link import DEFAULT_ABORT_QBER, LinkParams

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"


def split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT with a port from 0 to 65535")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_BB84_PHYSICS = (
    "distance_km",
    "pulse_rate_hz",
    "loss_db_per_km",
    "eta_bob",
    "y0",
    "e_det",
    "f_ec",
    "mu",
    "nu",
    "omega",
    "p_mu",
    "p_nu",
    "p_omega",
    "p_z",
    "eve_ir_fraction",
    "eve_pns_fraction",
)


class Bb84Section(_Section):
    """``[link.bb84]``: a decoy-state BB84 link; unset physics keys take the preset's value."""

    preset: Literal["gys", "metro", "long"] = Field("gys", description="Parameter preset.")
    distance_km: float | None = Field(None, ge=0, le=1000, description="Fibre length (km).")
    pulse_rate_hz: float | None = Field(None, gt=0, le=1e10, description="Source clock (Hz).")
    loss_db_per_km: float | None = Field(None, ge=0, le=10, description="Fibre loss (dB/km).")
    eta_bob: float | None = Field(None, gt=0, le=1, description="Receiver efficiency.")
    y0: float | None = Field(None, ge=0, lt=0.5, description="Dark-count probability/pulse.")
    e_det: float | None = Field(None, ge=0, lt=0.5, description="Misalignment error.")
    f_ec: float | None = Field(
        None, ge=1, le=3, description="EC inefficiency of the analytic rate."
    )
    mu: float | None = Field(None, gt=0, le=2, description="Signal intensity.")
    nu: float | None = Field(None, gt=0, le=2, description="Weak decoy intensity.")
    omega: float | None = Field(None, ge=0, le=2, description="Weakest decoy (0: vacuum).")
    p_mu: float | None = Field(None, gt=0, lt=1, description="Probability of mu.")
    p_nu: float | None = Field(None, gt=0, lt=1, description="Probability of nu.")
    p_omega: float | None = Field(None, gt=0, lt=1, description="Probability of omega.")
    p_z: float | None = Field(None, gt=0, lt=1, description="Z (key) basis probability.")
    eve_ir_fraction: float = Field(0.0, ge=0, le=1, description="Intercept-resend fraction.")
    eve_pns_fraction: float = Field(0.0, ge=0, le=1, description="Photon-number splitting.")
    block_sifted_bits: int = Field(
        131072, ge=4096, le=1 << 22, description="Sifted Z bits per post-processing block."
    )
    eps_sec: float = Field(1e-9, gt=0, lt=1, description="Secrecy parameter [Lim14].")
    eps_cor: float = Field(1e-15, gt=0, lt=1, description="Correctness parameter [Lim14].")
    max_blocks_per_advance: int = Field(
        8, ge=1, le=1024, description="Most blocks run at once; older link time is skipped."
    )
    seed: int | None = Field(
        None, ge=0, description="Seed of the simulation (reproducible runs; tests only)."
    )

    def settings(self) -> Any:
        from keysource.bb84_link import Bb84Settings  # noqa: PLC0415 -- numpy only when used

        overrides = tuple(
            (k, float(v)) for k in _BB84_PHYSICS if (v := getattr(self, k)) is not None
        )
        return Bb84Settings(
            preset=self.preset,
            overrides=overrides,
            block_sifted_bits=self.block_sifted_bits,
            eps_sec=self.eps_sec,
            eps_cor=self.eps_cor,
            max_blocks_per_advance=self.max_blocks_per_advance,
            seed=self.seed,
        )


class LinkSection(_Section):
    """The simulated QKD link shared by the two KMEs."""

    model: Literal["rate", "bb84"] = Field(
        "rate", description="rate: key at rate_bps; bb84: key from a BB84 pipeline ([link.bb84])."
    )
    bb84: Bb84Section | None = Field(None, description="The BB84 link (model = 'bb84').")

    rate_bps: float = Field(
        100_000.0, ge=0, description="Secret key rate at the configured qber (bits/s)."
    )
    key_size: int = Field(256, ge=8, multiple_of=8, description="Default key size (bits).")
    min_key_size: int = Field(64, ge=8, multiple_of=8, description="Smallest key served (bits).")
    max_key_size: int = Field(8192, ge=8, multiple_of=8, description="Largest key served (bits).")
    max_key_count: int = Field(
        1000, ge=1, description="Pool capacity in keys of key_size; accrual stops when full."
    )
    max_key_per_request: int = Field(128, ge=1, description="Most keys in one enc_keys request.")
    qber: float = Field(0.02, ge=0, lt=0.5, description="Quantum bit error rate without Eve.")
    qber_abort_threshold: float = Field(
        DEFAULT_ABORT_QBER, gt=0, le=0.5, description="Above this QBER the link aborts."
    )
    initial_keys: int = Field(
        0, ge=0, description="Keys of key_size in the pool at start (<= max_key_count)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> LinkSection:
        self.params()  # cross-field checks (rate model and bb84 physics), reported as link.*
        return self

    def params(self) -> LinkParams:
        """The link model's parameters (raises ValueError on inconsistent values)."""
        fields = self.model_dump(exclude={"bb84"})
        if self.model == "bb84":
            fields["bb84"] = (self.bb84 or Bb84Section()).settings()
        return LinkParams(**fields)


class SyncSection(_Section):
    """The KME-to-KME channel (mutual TLS; used only in two-process mode)."""

    ca: Path = Field(..., description="CA that signs both KMEs' sync certificates (PEM).")
    timeout_seconds: float = Field(5.0, gt=0, le=60, description="Timeout of one sync call.")


class KmeSection(_Section):
    """One KME."""

    kme_id: str = Field(..., pattern=_ID_PATTERN, description="KME ID (source/target_KME_ID).")
    sae_ids: list[str] = Field(..., min_length=1, description="SAE IDs attached to this KME.")
    listen: str = Field(..., description="HOST:PORT of the ETSI 014 API (HTTPS, mutual TLS).")
    skip_listen: str | None = Field(
        None,
        description="HOST:PORT of the Cisco SKIP API (HTTPS, mutual TLS, same certificates and "
        "key pool as the ETSI 014 API); unset: SKIP is not served.",
    )
    cert: Path = Field(..., description="Server certificate of the API (PEM).")
    key: Path = Field(..., description="Its private key (PEM, mode 0600).")
    ca: Path = Field(..., description="CA that signs SAE client certificates (PEM).")
    admin_listen: str = Field(
        ..., description="HOST:PORT of the admin endpoint (plain HTTP; loopback only)."
    )
    admin_allow_remote: bool = Field(
        False,
        description="Allow a non-loopback admin_listen (it has no authentication: test rigs only).",
    )
    sync_listen: str = Field(..., description="HOST:PORT of the KME-to-KME sync endpoint (mTLS).")
    sync_url: str | None = Field(
        None,
        description="URL the other KME uses to reach sync_listen (default https://sync_listen).",
    )
    sync_cert: Path = Field(..., description="KME-to-KME certificate, CN = kme_id (PEM).")
    sync_key: Path = Field(..., description="Its private key (PEM, mode 0600).")

    @field_validator("listen", "admin_listen", "sync_listen", "skip_listen")
    @classmethod
    def _hostport(cls, v: str | None) -> str | None:
        if v is not None:
            split_hostport(v)
        return v

    @field_validator("sae_ids")
    @classmethod
    def _sae_ids(cls, v: list[str]) -> list[str]:
        for s in v:
            if not re.match(_ID_PATTERN, s):
                raise ValueError(f"SAE ID {s!r} has characters outside [A-Za-z0-9._:@-]")
        if len(set(v)) != len(v):
            raise ValueError("duplicate SAE ID")
        return v

    @model_validator(mode="after")
    def _admin_loopback(self) -> KmeSection:
        host, _ = split_hostport(self.admin_listen)
        if not self.admin_allow_remote and not is_loopback(host):
            raise ValueError(
                "admin_listen must be a loopback address (the admin endpoint has no "
                "authentication); set admin_allow_remote = true only in a closed test rig"
            )
        return self

    def effective_sync_url(self) -> str:
        if self.sync_url:
            return self.sync_url.rstrip("/")
        host, port = split_hostport(self.sync_listen)
        if host in ("0.0.0.0", "::"):  # noqa: S104 -- a wildcard listen: reach it on loopback
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"https://{host}:{port}"


class KmeConfig(_Section):
    """The whole simulator: one link, two KMEs."""

    link: LinkSection = Field(default_factory=LinkSection, description="QKD link model.")
    sync: SyncSection = Field(..., description="KME-to-KME channel.")
    kme_a: KmeSection = Field(..., description="KME A (owns the link model in two-process mode).")
    kme_b: KmeSection = Field(..., description="KME B.")

    @model_validator(mode="after")
    def _consistent(self) -> KmeConfig:
        a, b = self.kme_a, self.kme_b
        if a.kme_id == b.kme_id:
            raise ValueError("kme_a.kme_id and kme_b.kme_id must differ")
        saes = a.sae_ids + b.sae_ids
        if len(set(saes)) != len(saes):
            raise ValueError("an SAE ID is attached to both KMEs")
        if {a.kme_id, b.kme_id} & set(saes):
            raise ValueError("an SAE ID equals a KME ID")
        self.link.params()  # cross-field checks of the link model
        return self


def _resolve(base: Path, section: KmeSection | SyncSection) -> Any:
    updates = {}
    for name in type(section).model_fields:
        v = getattr(section, name)
        if isinstance(v, Path) and not v.is_absolute():
            updates[name] = base / v.expanduser()
    return section.model_copy(update=updates)


def kme_config_from_dict(data: dict[str, Any], base: Path) -> KmeConfig:
    try:
        cfg = KmeConfig(**data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            key = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append((key, msg.removeprefix("Value error, ")))
        raise ConfigError(problems) from None
    return cfg.model_copy(
        update={
            "sync": _resolve(base, cfg.sync),
            "kme_a": _resolve(base, cfg.kme_a),
            "kme_b": _resolve(base, cfg.kme_b),
        }
    )


def load_kme_config(path: Path | str) -> KmeConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError([("", f"cannot read {path}: {exc.strerror}")]) from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([("", f"{path} is not valid TOML: {exc}")]) from exc
    return kme_config_from_dict(data, path.resolve().parent)
