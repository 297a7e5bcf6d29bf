"""Decoy-state BB84 model and post-processing (keysource/bb84_*.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from keysource.bb84_physics import (
    PRESETS,
    draw_block,
    expected_gains,
    gain,
    max_distance_km,
    optimal_mu,
    pulses_for_sifted_z,
    qber,
)
from keysource.bb84_post import PostParams, cascade, process_block, toeplitz_dense, toeplitz_hash

GYS = PRESETS["gys"].params


@pytest.mark.parametrize("distance", [0.0, 50.0, 100.0])
def test_gain_and_qber_are_lo_ma_chen_eqs(distance: float) -> None:
    p = GYS.with_(distance_km=distance)
    eta = 0.045 * 10 ** (-0.21 * distance / 10)
    q = 1.7e-6 + 1 - math.exp(-eta * p.mu)
    assert gain(p, p.mu) == pytest.approx(q, rel=1e-12)
    assert qber(p, p.mu) == pytest.approx((0.5 * 1.7e-6 + 0.033 * (1 - math.exp(-eta * p.mu))) / q)
    # the photon-number channel used by the Monte Carlo agrees with the closed form
    assert expected_gains(p)[0][0] == pytest.approx(q, rel=1e-4)


def test_gys_max_distance_is_142_km_as_published() -> None:
    # Lo, Ma, Chen, PRL 94, 230504 (2005): about 142 km with GYS and infinite decoys
    assert max_distance_km(GYS) == pytest.approx(142.2, abs=0.5)
    mu, rate = optimal_mu(GYS.with_(distance_km=50.0))
    assert 0.4 < mu < 0.55
    assert rate > 0


def test_toeplitz_fft_matches_dense_matrix() -> None:
    rng = np.random.default_rng(7)
    # m <= 128: row by row on packed bytes (tags); larger m: FFT convolution (PA)
    for n, m in [
        (1, 1),
        (17, 5),
        (1000, 50),
        (999, 128),
        (1000, 129),
        (1000, 333),
        (4096, 2000),
        (4096, 4096),
    ]:
        x = rng.integers(0, 2, n, dtype=np.uint8)
        seed = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
        assert np.array_equal(toeplitz_hash(x, seed, m), toeplitz_dense(x, seed, m))


@pytest.mark.parametrize("q", [0.01, 0.02, 0.04, 0.06, 0.08])
def test_cascade_leaves_no_residual_errors_and_reports_leak(q: float) -> None:
    for seed in range(8):
        rng = np.random.default_rng(seed)
        n = 1 << 15
        a = rng.integers(0, 2, n, dtype=np.uint8)
        e = np.zeros(n, dtype=np.uint8)
        e[rng.choice(n, int(q * n), replace=False)] = 1
        r = cascade(a, a ^ e, q, rng)
        assert np.array_equal(r.corrected, a)
        assert r.errors_corrected == int(q * n)
        h = -q * math.log2(q) - (1 - q) * math.log2(1 - q)
        assert 1.0 < r.leak_bits / (n * h) < 1.5


def test_block_statistics_match_the_model_within_3_sigma() -> None:
    p = GYS.with_(distance_km=25.0)
    rng = np.random.default_rng(3)
    raw = draw_block(p, 20_000_000, rng)
    for k, (q, e) in enumerate(expected_gains(p)):
        sel = raw.intensity == k
        n_k = 20_000_000 * p.probabilities[k]
        det = int(sel.sum())
        assert abs(det - n_k * q) < 3 * math.sqrt(n_k * q) + 3 * math.sqrt(n_k * q * (1 - q))
        same = sel & (raw.basis_a == raw.basis_b)
        m = int(same.sum())
        err = int((raw.bits_a[same] != raw.bits_b[same]).sum())
        assert abs(err - m * e) < 3 * math.sqrt(m * e * (1 - e)) + 1


def test_pipeline_gives_equal_keys_and_intercept_resend_aborts() -> None:
    p = PRESETS["metro"].params
    rng = np.random.default_rng(11)
    raw = draw_block(p, pulses_for_sifted_z(p, 1 << 17), rng)
    res = process_block(raw, p, PostParams(), rng)
    assert res.abort_reason == ""
    assert res.secret_bits > 0
    assert res.secret_bits % 8 == 0
    assert np.array_equal(res.key_a, res.key_b)
    assert res.secret_bits < res.sifted_z - res.leak_ec
    eve = p.with_(eve_ir_fraction=1.0)
    raw = draw_block(eve, pulses_for_sifted_z(eve, 1 << 16), rng)
    res = process_block(raw, eve, PostParams(), rng)
    assert res.qber_x > 0.2
    assert res.secret_bits == 0
    assert "QBER" in res.abort_reason


def test_pns_attack_keeps_qber_but_decoys_deny_the_key() -> None:
    p = PRESETS["metro"].params.with_(distance_km=50.0, eve_pns_fraction=1.0)
    rng = np.random.default_rng(5)
    raw = draw_block(p, pulses_for_sifted_z(p, 1 << 17), rng)
    res = process_block(raw, p, PostParams(), rng)
    assert res.qber_x < 0.05  # the QBER alone would not show it
    assert res.secret_bits == 0
    assert "finite-key" in res.abort_reason
