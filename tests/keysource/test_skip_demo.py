"""``qgw init-demo --key-source skip`` as a user runs it, and ``qkd.source = "skip"`` in the
gateway's settings: the KMEs serve SKIP on their own ports, the sites point at them, and the
gateway builds the SKIP client from its settings."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway.config import QkdSourceKind, load_settings, settings_from_dict
from gateway.errors import ConfigError
from keysource import from_settings
from keysource.kme_config import load_kme_config
from keysource.skip import SkipClient
from tests.conftest import run_qgw

pytestmark = pytest.mark.timeout(120)


def test_init_demo_key_source_skip_writes_skip_ports_and_sites(tmp_path: Path) -> None:
    d = tmp_path / "d"
    r = run_qgw("init-demo", "--key-source", "skip", "--base-port", "18443", str(d))
    assert r.returncode == 0, r.stderr
    cfg = load_kme_config(d / "kme.toml")
    # appended after the 12 older ports, so the older --base-port layout is unchanged
    assert (cfg.kme_a.listen, cfg.kme_b.listen) == ("127.0.0.1:18443", "127.0.0.1:18444")
    assert (cfg.kme_a.skip_listen, cfg.kme_b.skip_listen) == ("127.0.0.1:18455", "127.0.0.1:18456")
    for site, port in (("site-a", 18455), ("site-b", 18456)):
        qkd = tomllib.loads((d / f"{site}.toml").read_text())["qkd"]
        assert (qkd["source"], qkd["kme_url"]) == ("skip", f"https://127.0.0.1:{port}")
        r = run_qgw("check-config", "--strict", "--config", str(d / f"{site}.toml"))
        assert r.returncode == 0, r.stderr
    settings = load_settings(d / "site-a.toml", environ={})
    assert settings.qkd.source is QkdSourceKind.SKIP
    src = from_settings(settings.qkd)
    assert isinstance(src, SkipClient)
    assert src.base_url == "https://127.0.0.1:18455"


def test_init_demo_default_stays_etsi014_and_bogus_source_is_refused(tmp_path: Path) -> None:
    r = run_qgw("init-demo", "--base-port", "18443", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    qkd = tomllib.loads((tmp_path / "d" / "site-a.toml").read_text())["qkd"]
    assert (qkd["source"], qkd["kme_url"]) == ("etsi014", "https://127.0.0.1:18443")
    assert load_kme_config(tmp_path / "d" / "kme.toml").kme_a.skip_listen == "127.0.0.1:18455"
    r = run_qgw("init-demo", "--key-source", "kmip", str(tmp_path / "e"))
    assert r.returncode == 2
    assert "--key-source" in r.stderr


@pytest.mark.parametrize("missing", ["cert", "key", "ca"])
def test_skip_source_needs_mtls_files_and_https(tmp_path: Path, missing: str) -> None:
    qkd = {
        "source": "skip",
        "kme_url": "https://127.0.0.1:9",
        "cert": "c.pem",
        "key": "k.pem",
        "ca": "ca.pem",
    }
    base = {
        "gateway": {"site_id": "a", "role": "initiator", "listen": "127.0.0.1:1", "peer": "x:2"},
        "auth": {"mode": "psk", "psk_file": "psk", "peer_name": "b"},
        "mqtt": {"broker": "mqtt://127.0.0.1:1883"},
    }
    settings_from_dict({**base, "qkd": qkd}, base=tmp_path, environ={})
    with pytest.raises(ConfigError, match=missing):
        settings_from_dict(
            {**base, "qkd": {k: v for k, v in qkd.items() if k != missing}},
            base=tmp_path,
            environ={},
        )
    with pytest.raises(ConfigError, match="https"):
        settings_from_dict(
            {**base, "qkd": {**qkd, "kme_url": "http://127.0.0.1:9"}}, base=tmp_path, environ={}
        )
