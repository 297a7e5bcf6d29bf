"""``qgw kme keyrate``: flags and JSON keys named in issue 13, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.initdemo import DemoPorts, write_kme_config
from keysource.bb84_link import Bb84Link
from keysource.kme_config import load_kme_config
from keysource.link import make_link

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def qgw(*args: str) -> Any:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "kme", "keyrate", *args],
        capture_output=True,
        check=True,
        timeout=100,
        env=env,
    )
    return json.loads(out.stdout)


def test_max_distance_of_gys_is_the_published_142_km() -> None:
    assert qgw("--preset", "gys", "--max-distance", "--json") == {
        "max_distance_km": pytest.approx(142.2, abs=0.3)
    }


def test_rows_have_the_issue_keys_and_the_analytic_values() -> None:
    out = qgw("--preset", "gys", "--distance-km", "0,50,100", "--json")
    assert out["preset"] == "gys"
    rows = out["rows"]
    assert [r["distance_km"] for r in rows] == [0.0, 50.0, 100.0]
    for r in rows:
        assert set(r) == {"distance_km", "mu", "asymptotic_bits_per_pulse", "asymptotic_bps"}
        assert r["asymptotic_bps"] == pytest.approx(r["asymptotic_bits_per_pulse"] * 2e6)
        assert 0.4 < r["mu"] < 0.55  # [LMC05]: mu* ~ 0.5 for GYS
    # the rate falls by ~ the fibre loss: 0.21 dB/km x 50 km = 10.5 dB
    ratio = rows[0]["asymptotic_bits_per_pulse"] / rows[1]["asymptotic_bits_per_pulse"]
    assert 8 < ratio < 16


def test_simulated_rows_and_an_intercept_resend_attacker() -> None:
    base = ["--preset", "metro", "--distance-km", "25", "--simulate", "0.02", "--seed", "3"]
    (row,) = qgw(*base, "--json")["rows"]
    for k in ("qber", "sifted_bps", "secret_bps", "ec_efficiency", "aborted"):
        assert k in row
    assert row["aborted"] is False
    assert 0.005 < row["qber"] < 0.03
    assert 0 < row["secret_bps"] < row["sifted_bps"]
    assert row["secret_bps"] < row["asymptotic_bps"] * 1.5  # finite blocks cost key
    assert 1.0 < row["ec_efficiency"] < 1.5
    (eve,) = qgw(*base, "--eve-fraction", "1", "--json")["rows"]
    assert eve["aborted"] is True
    assert eve["secret_bps"] == 0
    assert eve["qber"] > 0.2
    assert eve["asymptotic_bits_per_pulse"] == 0.0


def test_demo_kme_toml_uses_the_bb84_model_and_keeps_up(tmp_path: Path) -> None:
    path = write_kme_config(tmp_path, DemoPorts.pick(), link_model="bb84")
    p = load_kme_config(path).link.params()
    assert p.model == "bb84"
    link = make_link(p, 0.0)
    assert isinstance(link, Bb84Link)
    assert link.stored_key_count(0.0) >= p.initial_keys  # precomputed by the pipeline
    snap = link.snapshot(0.0)
    assert snap["preset"] == "metro"
    assert snap["secret_bps"] > 1000  # a 10 s rekey needs a few hundred bit/s
    assert 1.0 < snap["block_seconds"] < 5.0  # an eavesdropper shows within seconds
