"""Build matching site configs for runtime tests (static QKD keys or a KME, PSK or PKI)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from gateway.config import Settings, settings_from_dict
from keysource.static import write_seed_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def site_pair(
    root: Path,
    qkd_mode: str = "required",
    gw_port: int | None = None,
    rekey_seconds: float = 120.0,
    rules: list[dict[str, Any]] | None = None,
    brokers: tuple[int, int] = (1883, 1883),
    qkd: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two config dicts (site-a initiator, site-b responder) sharing a PSK and a static seed."""
    root.mkdir(parents=True, exist_ok=True)
    psk = root / "psk"
    if not psk.exists():
        fd = os.open(psk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(32))
        os.close(fd)
    seed = root / "seed.toml"
    if not seed.exists():
        write_seed_file(seed)
    port = gw_port or free_port()
    out = []
    for i, (site, other) in enumerate((("site-a", "site-b"), ("site-b", "site-a"))):
        q: dict[str, Any] = {
            "mode": qkd_mode,
            "source": "static",
            "static_file": str(seed),
            "sae_id": "sae-a" if i == 0 else "sae-b",
            "peer_sae_id": "sae-b" if i == 0 else "sae-a",
        }
        if qkd is not None:
            q = qkd[i]
        out.append(
            {
                "gateway": {
                    "site_id": site,
                    "role": "initiator" if i == 0 else "responder",
                    "listen": f"127.0.0.1:{port}",
                    "peer": f"127.0.0.1:{port}",
                    "reconnect_max_seconds": 2.0,
                },
                "auth": {"mode": "psk", "psk_file": str(psk), "peer_name": other},
                "qkd": q,
                "rekey": {"interval_seconds": rekey_seconds},
                "mqtt": {
                    "broker": f"mqtt://127.0.0.1:{brokers[i]}",
                    "client_id": f"qgw-{site}",
                    "rules": rules or [{"pattern": "t/#", "direction": "both", "qos": 1}],
                },
                "metrics": {"listen": "127.0.0.1:0"},
            }
        )
    return out[0], out[1]


def settings(d: dict[str, Any], root: Path) -> Settings:
    return settings_from_dict(d, base=root, environ={})
