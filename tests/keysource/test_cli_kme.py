"""`qgw init-demo` and `qgw kme serve` as a user runs them: real subprocesses, real mTLS."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import subprocess
from pathlib import Path

import aiohttp
import pytest

from keysource.etsi014 import Etsi014Client, RetryPolicy
from keysource.kme_config import load_kme_config
from keysource.tls import client_context
from keysource.wire import STATUS_FIELDS
from tests.conftest import run_qgw
from tests.support.kme import KmeSetup, admin_set, kme_process

pytestmark = pytest.mark.timeout(120)


def init_demo(tmp_path: Path) -> KmeSetup:
    d = tmp_path / "demo"
    r = run_qgw("init-demo", str(d), "--link-model", "rate")  # rate: admin changes act at once
    assert r.returncode == 0, r.stderr
    return KmeSetup(d, d / "kme.toml", load_kme_config(d / "kme.toml"))


def test_init_demo_writes_complete_private_files_and_valid_configs(tmp_path: Path) -> None:
    setup = init_demo(tmp_path)
    d = setup.root
    for name in ("ca.crt", "kme-a.crt", "kme-b.crt", "sae-a.crt", "sae-b.crt", "sync-ca.crt"):
        assert (d / "kme-pki" / name).is_file()
    secrets = [*(d / "kme-pki").glob("*.key"), d / "psk"]
    assert len(secrets) == 9
    for p in secrets:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert len((d / "psk").read_bytes()) == 32
    for site in ("site-a", "site-b"):
        r = run_qgw("check-config", "--strict", "--config", str(d / f"{site}.toml"))
        assert r.returncode == 0, r.stderr
        assert "kme-pki/sae-" in (d / f"{site}.toml").read_text()  # relative paths
    r = run_qgw("init-demo", str(d))
    assert r.returncode == 2
    assert "--force" in r.stderr


def test_init_demo_base_port_gives_a_fixed_layout(tmp_path: Path) -> None:
    r = run_qgw("init-demo", "--base-port", "18443", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    cfg = load_kme_config(tmp_path / "d" / "kme.toml")
    assert (cfg.kme_a.listen, cfg.kme_b.listen) == ("127.0.0.1:18443", "127.0.0.1:18444")
    assert 'kme_url = "https://127.0.0.1:18443"' in (tmp_path / "d" / "site-a.toml").read_text()


async def _status(setup: KmeSetup, kme: str, sae: str, peer: str) -> dict[str, object]:
    cert, key = setup.sae(sae)
    ctx = client_context(cert, key, setup.ca)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
        s.get(
            f"{setup.api_url(kme)}/api/v1/keys/{peer}/status",
            timeout=aiohttp.ClientTimeout(total=10),
        ) as r,
    ):
        assert r.status == 200
        return dict(await r.json())


async def test_kme_serve_status_with_sae_a_certificate_has_every_table_9_field(
    tmp_path: Path,
) -> None:
    setup = init_demo(tmp_path)
    with kme_process(setup, "both") as kp:
        st = await _status(setup, "A", "sae-a", "sae-b")
        for f in STATUS_FIELDS:
            assert f in st, f
        assert st["source_KME_ID"] == "KME-A"
        assert st["master_SAE_ID"] == "sae-a"
        assert st["key_size"] == 256
        curl = shutil.which("curl")
        if curl:  # the same request as in docs/keysource.md
            pki = setup.root / "kme-pki"
            out = await asyncio.to_thread(
                subprocess.run,
                [
                    curl,
                    "-sS",
                    "--max-time",
                    "10",
                    "--cacert",
                    str(pki / "ca.crt"),
                    "--cert",
                    str(pki / "sae-a.crt"),
                    "--key",
                    str(pki / "sae-a.key"),
                    f"{setup.api_url('A')}/api/v1/keys/sae-b/status",
                ],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            assert set(STATUS_FIELDS) <= set(json.loads(out.stdout)), out.stderr
    assert kp.proc.returncode == 0  # SIGTERM -> clean exit


async def test_two_processes_one_per_kme_stay_in_sync(tmp_path: Path) -> None:
    setup = init_demo(tmp_path)
    policy = RetryPolicy(base_seconds=0.01, cap_seconds=0.05, deadline_seconds=3, max_attempts=3)
    with kme_process(setup, "A"), kme_process(setup, "B"):
        ca, ka = setup.sae("sae-a")
        cb, kb = setup.sae("sae-b")
        a = Etsi014Client(
            setup.api_url("A"), "sae-a", client_context(ca, ka, setup.ca), retry=policy
        )
        b = Etsi014Client(
            setup.api_url("B"), "sae-b", client_context(cb, kb, setup.ca), retry=policy
        )
        try:
            sent = await a.enc_keys("sae-b", number=2)
            got = await b.dec_keys("sae-a", [k.key_id for k in sent])
            assert [k.key.expose_secret_bytes() for k in got] == [
                k.key.expose_secret_bytes() for k in sent
            ]
            back = await b.enc_keys("sae-a")
            got = await a.dec_keys("sae-b", [back[0].key_id])
            assert got[0].key.expose_secret_bytes() == back[0].key.expose_secret_bytes()
            view = await asyncio.to_thread(admin_set, setup.admin_url("A"), eavesdropper=True)
            assert view["link"]["aborted"] is True
            st = await b.status("sae-a")
            assert st.status_extension is not None
            assert st.status_extension["qgw_simulator"]["eavesdropper"] is True
        finally:
            await a.aclose()
            await b.aclose()


def test_kme_serve_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "kme.toml"
    cfg.write_text("[link]\nrate_bpz = 1\n")
    r = run_qgw("kme", "serve", "--config", str(cfg))
    assert r.returncode == 2
    assert "link.rate_bpz: unknown key" in r.stderr
    assert "Traceback" not in r.stderr
