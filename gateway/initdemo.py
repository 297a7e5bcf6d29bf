"""``qgw init-demo DIR``: a complete, self-contained two-site demo setup on one machine.

Writes (paths inside the configs are relative to DIR)::

    DIR/kme.toml            KME simulator config (qgw kme serve --config DIR/kme.toml)
    DIR/kme-pki/            ECDSA P-256 TLS PKI of the KME links (gateway.crypto.tlspki):
        ca.crt ca.key           CA of KME server and SAE client certificates
        kme-a.crt/.key          KME A server certificate (SAN localhost, 127.0.0.1, ::1)
        kme-b.crt/.key          KME B server certificate
        sae-a.crt/.key          SAE client certificate, CN = sae-a (gateway A at KME A)
        sae-b.crt/.key          SAE client certificate, CN = sae-b (gateway B at KME B)
        sync-ca.crt sync-ca.key CA of the KME-to-KME channel (two-process mode)
        kme-a-sync.crt/.key     KME-to-KME certificate of KME A (CN = its KME ID)
        kme-b-sync.crt/.key     KME-to-KME certificate of KME B
    DIR/psk                 32 random bytes, the bootstrap pre-shared key (auth.mode = "psk")
    DIR/wot/                with --auth wot: four introducers (one full, three marginal),
                            each gateway's ML-DSA key and its four endorsements (gateway.wot)
    DIR/site-a.toml         gateway A: initiator, master SAE sae-a at KME A
    DIR/site-b.toml         gateway B: responder, slave SAE sae-b at KME B

Private keys and the PSK are mode 0600. Ports are chosen free on 127.0.0.1 at init time, or a
fixed layout from ``--base-port`` (see :class:`DemoPorts`).

Extending: the site configs are built as plain dicts of sections (:func:`site_sections`);
functions in :data:`EXTRA_STEPS` run with ``(dir, sites)`` before the site files are written
and may write more files and change sections (e.g. switch ``auth`` to ML-DSA PKI).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from gateway.config import settings_from_dict, to_toml
from gateway.errors import ConfigError
from gateway.pki import write_gateway_pki
from keysource.kme_config import load_kme_config

KME_PKI = "kme-pki"
KME_IDS = ("KME-A", "KME-B")
SAE_IDS = ("sae-a", "sae-b")
SITES = ("site-a", "site-b")

Sections = dict[str, Any]
Sites = dict[str, Sections]  # "site-a" -> {"gateway": {...}, "auth": {...}, ...}
ExtraStep = Callable[[Path, Sites], None]

# Later issues append here (e.g. the ML-DSA gateway PKI in DIR/gw-pki/).
EXTRA_STEPS: list[ExtraStep] = []


@dataclass(frozen=True, slots=True)
class DemoPorts:
    """Every loopback port of the demo. ``--base-port N`` gives N, N+1, ... in this order."""

    kme_a: int
    kme_b: int
    kme_a_admin: int
    kme_b_admin: int
    kme_a_sync: int
    kme_b_sync: int
    gw_a: int
    gw_b: int
    mqtt_a: int
    mqtt_b: int
    metrics_a: int
    metrics_b: int
    kme_a_skip: int  # Cisco SKIP API of KME A (appended last: older --base-port layouts hold)
    kme_b_skip: int

    @classmethod
    def pick(cls, base_port: int | None = None) -> DemoPorts:
        n = len(fields(cls))
        if base_port is not None:
            if not 1024 <= base_port <= 65535 - n:
                raise ConfigError([("--base-port", f"must be between 1024 and {65535 - n}")])
            return cls(*range(base_port, base_port + n))
        return cls(*free_ports(n))


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that are free right now (held open together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_kme_pki(root: Path, kme_hosts: tuple[str, ...] = ()) -> dict[str, Path]:
    """Issue the KME-link PKI into ``root/kme-pki``; returns name -> path relative to ``root``.

    ``kme_hosts``: extra DNS names / IP addresses for the KME server and sync certificates
    (e.g. when the KMEs run on other hosts or in network namespaces).
    """
    from gateway.crypto import tlspki  # noqa: PLC0415 -- `qgw --help` need not load cryptography

    dns = list(tlspki.DEFAULT_DNS)
    ips = list(tlspki.DEFAULT_IPS)
    for h in kme_hosts:
        try:
            ipaddress.ip_address(h)
            ips.append(h)
        except ValueError:
            dns.append(h)
    pki = root / KME_PKI
    out: dict[str, Path] = {}

    def put(name: str, issued: tlspki.Issued) -> None:
        tlspki.write_issued(issued, pki / f"{name}.crt", pki / f"{name}.key")
        out[f"{name}.crt"] = Path(KME_PKI) / f"{name}.crt"
        out[f"{name}.key"] = Path(KME_PKI) / f"{name}.key"

    ca = tlspki.new_ca("qgw demo KME CA")
    put("ca", ca)
    for kme, name in zip(KME_IDS, ("kme-a", "kme-b"), strict=True):
        put(name, tlspki.issue_server(ca, kme, dns=dns, ips=ips))
    for sae in SAE_IDS:
        put(sae, tlspki.issue_client(ca, sae))
    sync_ca = tlspki.new_ca("qgw demo KME-to-KME CA")
    put("sync-ca", sync_ca)
    for kme, name in zip(KME_IDS, ("kme-a-sync", "kme-b-sync"), strict=True):
        put(name, tlspki.issue_peer(sync_ca, kme, dns=dns, ips=ips))
    return out


KME_TOML = """\
# KME simulator for the qgw demo: qgw kme serve --config kme.toml [--kme A|B|both]
# Format and presets: docs/keysource.md. Paths are relative to this file.

[link]                          # the simulated QKD link shared by KME A and KME B
# model: "rate" (key accrues at rate_bps, QBER qber) or "bb84" (key from a simulated
# decoy-state BB84 link, [link.bb84] below; rate_bps and qber are then not used)
model = "{model}"
rate_bps = 100000.0             # secret key rate at the qber below (metro link: 1e5 .. 2e6)
key_size = 256                  # default key size (bits)
min_key_size = 64
max_key_size = 8192
max_key_count = 1000            # pool capacity in keys of key_size
max_key_per_request = 128
qber = 0.02                     # quantum bit error rate without an eavesdropper
qber_abort_threshold = 0.11     # above this the link aborts (eavesdropper: ~25 %)
initial_keys = 100              # keys in the pool at start

{bb84}[sync]                          # KME-to-KME channel (two-process mode only), mutual TLS
ca = "kme-pki/sync-ca.crt"
timeout_seconds = 5.0

[kme_a]
kme_id = "{kme_a_id}"
sae_ids = ["{sae_a}"]
listen = "127.0.0.1:{p.kme_a}"        # ETSI GS QKD 014 API, HTTPS with client certificates
skip_listen = "127.0.0.1:{p.kme_a_skip}"  # Cisco SKIP API: same certificates, same key pool
cert = "kme-pki/kme-a.crt"
key = "kme-pki/kme-a.key"
ca = "kme-pki/ca.crt"                  # CA of the SAE client certificates
admin_listen = "127.0.0.1:{p.kme_a_admin}"  # plain HTTP admin, loopback only
sync_listen = "127.0.0.1:{p.kme_a_sync}"
sync_cert = "kme-pki/kme-a-sync.crt"
sync_key = "kme-pki/kme-a-sync.key"

[kme_b]
kme_id = "{kme_b_id}"
sae_ids = ["{sae_b}"]
listen = "127.0.0.1:{p.kme_b}"
skip_listen = "127.0.0.1:{p.kme_b_skip}"
cert = "kme-pki/kme-b.crt"
key = "kme-pki/kme-b.key"
ca = "kme-pki/ca.crt"
admin_listen = "127.0.0.1:{p.kme_b_admin}"
sync_listen = "127.0.0.1:{p.kme_b_sync}"
sync_cert = "kme-pki/kme-b-sync.crt"
sync_key = "kme-pki/kme-b-sync.key"
"""


KME_TOML_BB84 = """\
[link.bb84]                     # decoy-state BB84 link (model = "bb84"; docs/keysource.md 3.7)
preset = "metro"                # gys | metro | long; keys below override the preset
distance_km = 25.0              # fibre length
pulse_rate_hz = 1.0e7           # metro's 1 GHz scaled to 10 MHz: post-processing keeps up live
block_sifted_bits = 262144      # sifted Z bits per block (~3.3 s of link time here)
eve_ir_fraction = 0.0           # intercept-resend on this fraction of the pulses
eve_pns_fraction = 0.0          # photon-number splitting on this fraction
eps_sec = 1e-9                  # finite-key secrecy parameter (Lim et al. 2014)
eps_cor = 1e-15                 # correctness parameter (verification tag)

"""


def write_kme_config(root: Path, ports: DemoPorts, link_model: str = "rate") -> Path:
    """Write ``root/kme.toml`` and check that it loads (``link_model``: "rate" or "bb84")."""
    if link_model not in ("rate", "bb84"):
        raise ValueError("link_model must be 'rate' or 'bb84'")
    text = KME_TOML.format(
        p=ports,
        kme_a_id=KME_IDS[0],
        kme_b_id=KME_IDS[1],
        sae_a=SAE_IDS[0],
        sae_b=SAE_IDS[1],
        model=link_model,
        bb84=KME_TOML_BB84 if link_model == "bb84" else "",
    )
    path = root / "kme.toml"
    path.write_text(text, encoding="utf-8")
    load_kme_config(path)
    return path


def write_psk(root: Path, name: str = "psk") -> Path:
    """32 random bytes, mode 0600 from creation."""
    from gateway.crypto.tlspki import write_file  # noqa: PLC0415 -- as in write_kme_pki

    path = root / name
    write_file(path, secrets.token_bytes(32), private=True)
    return path


KEY_SOURCES = ("etsi014", "skip")
AUTH_MODES = ("pki", "psk", "wot")


def site_sections(ports: DemoPorts, key_source: str = "etsi014") -> Sites:
    """The two site configs as plain dicts (complete for ``qgw check-config``).

    ``key_source``: ``etsi014`` (the KMEs' ETSI GS QKD 014 API) or ``skip`` (their Cisco SKIP
    API); the same certificates either way.
    """
    if key_source not in KEY_SOURCES:
        raise ConfigError([("--key-source", f"must be one of {', '.join(KEY_SOURCES)}")])
    kme_ports = (
        (ports.kme_a_skip, ports.kme_b_skip) if key_source == "skip" else (ports.kme_a, ports.kme_b)
    )
    sites: Sites = {}
    for i, site in enumerate(SITES):
        me, other = i, 1 - i
        gw = (ports.gw_a, ports.gw_b)
        sites[site] = {
            "gateway": {
                "site_id": site,
                "role": "initiator" if i == 0 else "responder",
                "listen": f"127.0.0.1:{gw[me]}",
                "peer": f"127.0.0.1:{gw[other]}",
            },
            "auth": {
                "mode": "pki",
                "cert": f"gw-pki/{site}.crt",
                "key": f"gw-pki/{site}.key",
                "ca": "gw-pki/ca.crt",
                "peer_name": SITES[other],
                "psk_file": "psk",  # QGW_AUTH__MODE=psk switches to the PSK
            },
            "qkd": {
                "mode": "required",
                "source": key_source,
                "kme_url": f"https://127.0.0.1:{kme_ports[me]}",
                "sae_id": SAE_IDS[me],
                "peer_sae_id": SAE_IDS[other],
                "cert": f"{KME_PKI}/{SAE_IDS[me]}.crt",
                "key": f"{KME_PKI}/{SAE_IDS[me]}.key",
                "ca": f"{KME_PKI}/ca.crt",
                "key_size_bits": 256,
                "timeout_seconds": 5.0,
            },
            "mqtt": {
                "broker": f"mqtt://127.0.0.1:{(ports.mqtt_a, ports.mqtt_b)[me]}",
                "client_id": f"qgw-{site}",
                "rules": [
                    {
                        "name": "demo",
                        "pattern": "demo/#",
                        "direction": "both",
                        "qos": 1,
                        "local_prefix": "",
                        "remote_prefix": "",
                    }
                ],
            },
            "metrics": {"listen": f"127.0.0.1:{(ports.metrics_a, ports.metrics_b)[me]}"},
            "logging": {"level": "info", "format": "text"},
        }
    return sites


def write_site_configs(root: Path, sites: Sites) -> list[Path]:
    """Validate each site's sections with the gateway's settings model, then write DIR/<site>.toml."""
    paths = []
    for site, sections in sites.items():
        settings_from_dict(sections, base=root, environ={})  # raises ConfigError if incomplete
        path = root / f"{site}.toml"
        header = (
            f"# qgw {site}: written by `qgw init-demo`. Paths are relative to this file.\n"
            "# Every key is documented in config.example.toml.\n\n"
        )
        path.write_text(header + to_toml(sections), encoding="utf-8")
        paths.append(path)
    return paths


@dataclass(frozen=True, slots=True)
class DemoResult:
    root: Path
    ports: DemoPorts
    kme_config: Path
    site_configs: list[Path]


def init_demo(
    root: Path,
    base_port: int | None = None,
    force: bool = False,
    kme_hosts: tuple[str, ...] = (),
    key_source: str = "etsi014",
    *,
    link_model: str = "rate",
    auth: str = "pki",
) -> DemoResult:
    """Write the whole demo set into ``root`` (refuses to overwrite unless ``force``).

    ``key_source``: how the gateways fetch QKD keys from the simulator (``etsi014`` or ``skip``).
    ``link_model`` of kme.toml: "rate" (fast; what tests use) or "bb84" (``qgw init-demo`` and
    ``qgw demo``: the keys come from a simulated BB84 link).
    ``auth``: the bootstrap mode the site configs use (``pki``, ``psk`` or ``wot``).
    """
    if auth not in AUTH_MODES:
        raise ConfigError([("--auth", f"must be one of {', '.join(AUTH_MODES)}")])
    root = Path(root)
    ours = ["kme.toml", "psk", *(f"{s}.toml" for s in SITES), KME_PKI, "gw-pki", "wot"]
    existing = [n for n in ours if (root / n).exists()]
    if existing and not force:
        raise ConfigError(
            [("", f"{root} already has {', '.join(existing)}; use --force to overwrite")]
        )
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    ports = DemoPorts.pick(base_port)
    write_kme_pki(root, kme_hosts)
    kme = write_kme_config(root, ports, link_model)
    write_psk(root)
    write_gateway_pki(root, list(SITES), force=force)
    sites = site_sections(ports, key_source)
    if auth == "psk":
        for site in SITES:
            sites[site]["auth"]["mode"] = "psk"
    elif auth == "wot":
        from gateway.wot import write_demo_wot  # noqa: PLC0415 -- only for --auth wot

        for site, keys in write_demo_wot(root, list(SITES), force=force).items():
            sites[site]["auth"] = {"peer_name": sites[site]["auth"]["peer_name"], **keys}
    for step in EXTRA_STEPS:
        step(root, sites)
    return DemoResult(root, ports, kme, write_site_configs(root, sites))


def cmd_init_demo(args: argparse.Namespace) -> int:
    res = init_demo(
        args.dir,
        args.base_port,
        args.force,
        tuple(args.kme_host),
        args.key_source,
        link_model=args.link_model,
        auth=args.auth,
    )
    print(f"demo written to {res.root}")
    for k, v in asdict(res.ports).items():
        print(f"  {k:12} 127.0.0.1:{v}")
    print(
        f"next:\n  qgw kme serve --config {res.root / 'kme.toml'}\n"
        f"  qgw check-config --config {res.site_configs[0]}"
    )
    return 0


def register(sub: Any) -> None:
    """Add ``qgw init-demo`` to the CLI."""
    p = sub.add_parser(
        "init-demo",
        help="write a complete two-site demo setup (PKI, kme.toml, site configs) into DIR",
        description="Write DIR/kme.toml, DIR/kme-pki/ (ECDSA TLS PKI of the KME links), DIR/psk "
        "and DIR/site-a.toml, DIR/site-b.toml. Private keys are mode 0600.",
    )
    p.add_argument("dir", type=Path, help="output folder (created)")
    p.add_argument(
        "--base-port",
        type=int,
        default=None,
        help="fixed port layout from this port (KME A, KME B, admins, syncs, gateways, brokers, "
        "metrics); default: free ports chosen now",
    )
    p.add_argument(
        "--kme-host",
        action="append",
        default=[],
        help="extra DNS name or IP for the KME certificates (repeatable)",
    )
    p.add_argument(
        "--key-source",
        choices=KEY_SOURCES,
        default="etsi014",
        help="how the gateways get QKD keys from the KME simulator: its ETSI GS QKD 014 API "
        "(default) or its Cisco SKIP API (draft-cisco-skip); kme.toml serves both",
    )
    p.add_argument(
        "--auth",
        choices=AUTH_MODES,
        default="pki",
        help="bootstrap authentication of the site configs: ML-DSA PKI (default), the PSK, or "
        "the web of trust (DIR/wot/: one full and three marginal introducers)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing demo in DIR")
    p.add_argument(
        "--link-model",
        choices=["bb84", "rate"],
        default="bb84",
        help="QKD link model in kme.toml: bb84 (keys from a simulated decoy-state BB84 link, "
        "default) or rate (a bare key rate; fast)",
    )
    p.set_defaults(handler=cmd_init_demo)
