"""Key rate versus distance: the analytic bound and, optionally, the pipeline's own numbers.

Used by ``qgw kme keyrate``, ``bench/bb84_bench.py`` and the plot in docs/keysource.md.

- Analytic: [LMC05] eq. (1) with infinitely many decoys, symmetric BB84 (q = 1/2), at the
  signal intensity that maximises it (:func:`keysource.bb84_physics.optimal_mu`); an
  intercept-resend attacker on a fraction F of the pulses enters as the error of the intercepted
  photons, e_det/2 + 1/4 instead of e_det (the same channel the Monte Carlo draws from), i.e. an
  effective misalignment e_det (1 - F/2) + F/4.
- Simulated (``simulate_seconds`` > 0): that much link time at the preset's configured
  intensities and basis bias, cut into blocks of ``block_sifted_bits`` sifted Z bits (one
  shorter block when the time holds less than one), each run through the whole pipeline
  (sifting, estimation, abort, Cascade, verification, finite-key length [Lim14], Toeplitz PA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from keysource.bb84_physics import Bb84Params, draw_block, optimal_mu, pulses_for_sifted_z
from keysource.bb84_physics import max_distance_km as _max_distance_km
from keysource.bb84_post import BlockResult, PostParams, process_block

MAX_SIMULATED_BLOCKS = 256  # per distance: longer runs use bigger blocks, not more of them


def with_intercept_resend(p: Bb84Params, fraction: float) -> Bb84Params:
    """The channel seen by the analytic formula with intercept-resend on ``fraction``."""
    e_eff = p.e_det * (1 - fraction / 2) + fraction / 4
    return p.with_(e_det=min(e_eff, 0.4999))


def asymptotic(p: Bb84Params, eve_fraction: float = 0.0) -> tuple[float, float]:
    """(optimal mu, bits per pulse) of the [LMC05] infinite-decoy bound, q = 1/2."""
    return optimal_mu(with_intercept_resend(p, eve_fraction), q=0.5)


def max_distance(p: Bb84Params, eve_fraction: float = 0.0) -> float:
    return _max_distance_km(with_intercept_resend(p, eve_fraction), q=0.5)


@dataclass(frozen=True, slots=True)
class SimResult:
    seconds: float
    blocks: int
    sifted_bits: int
    secret_bits: int
    qber: float | None  # X-basis estimate, weighted over the blocks
    ec_efficiency: float | None  # leak / (n h2(Q)) over the blocks that ran Cascade
    pa_ratio: float | None  # secret / sifted over the blocks that gave key
    aborted: bool  # some block gave no key for a reason in its estimate
    abort_reason: str


def simulate(
    p: Bb84Params,
    seconds: float,
    rng: np.random.Generator,
    post: PostParams | None = None,
    block_sifted_bits: int = 1 << 17,
) -> SimResult:
    """``seconds`` of link time through the pipeline, block by block."""
    post = post or PostParams()
    quiet = p.with_(eve_ir_fraction=0.0, eve_pns_fraction=0.0)
    total = max(1, round(seconds * p.pulse_rate_hz))
    per_block = pulses_for_sifted_z(quiet, block_sifted_bits)
    n_blocks = min(max(1, math.floor(total / per_block)), MAX_SIMULATED_BLOCKS)
    per_block = total // n_blocks if total >= per_block else total
    results: list[BlockResult] = []
    for _ in range(n_blocks):
        raw = draw_block(p, per_block, rng)
        results.append(process_block(raw, p, post, rng))
    used = n_blocks * per_block / p.pulse_rate_hz
    sx = sum(r.sifted_x for r in results)
    ran = [r for r in results if r.leak_ec and math.isfinite(r.ec_efficiency)]
    keyed = [r for r in results if r.secret_bits]
    aborts = [r for r in results if not r.secret_bits and "verification" not in r.abort_reason]
    return SimResult(
        seconds=used,
        blocks=n_blocks,
        sifted_bits=sum(r.sifted_z for r in results),
        secret_bits=sum(r.secret_bits for r in results),
        qber=sum(r.qber_x * r.sifted_x for r in results) / sx if sx else None,
        ec_efficiency=(
            sum(r.ec_efficiency * r.sifted_z for r in ran) / sum(r.sifted_z for r in ran)
            if ran
            else None
        ),
        pa_ratio=(
            sum(r.secret_bits for r in keyed) / sum(r.sifted_z for r in keyed) if keyed else None
        ),
        aborted=bool(aborts),
        abort_reason=aborts[-1].abort_reason if aborts else "",
    )


def row(
    p: Bb84Params,
    distance_km: float,
    *,
    eve_fraction: float = 0.0,
    simulate_seconds: float = 0.0,
    rng: np.random.Generator | None = None,
    block_sifted_bits: int = 1 << 17,
) -> dict[str, Any]:
    """One row of ``qgw kme keyrate --json`` (keys named in issue 13)."""
    at = p.with_(distance_km=distance_km)
    mu, bpp = asymptotic(at, eve_fraction)
    out: dict[str, Any] = {
        "distance_km": distance_km,
        "mu": round(mu, 6),
        "asymptotic_bits_per_pulse": bpp,
        "asymptotic_bps": bpp * at.pulse_rate_hz,
    }
    if simulate_seconds > 0:
        sim = simulate(
            at.with_(eve_ir_fraction=eve_fraction),
            simulate_seconds,
            rng if rng is not None else np.random.default_rng(),
            block_sifted_bits=block_sifted_bits,
        )
        out.update(
            {
                "qber": None if sim.qber is None else round(sim.qber, 6),
                "sifted_bps": sim.sifted_bits / sim.seconds,
                "secret_bps": sim.secret_bits / sim.seconds,
                "ec_efficiency": None if sim.ec_efficiency is None else round(sim.ec_efficiency, 4),
                "pa_ratio": None if sim.pa_ratio is None else round(sim.pa_ratio, 6),
                "aborted": sim.aborted,
                "simulated_seconds": sim.seconds,
                "blocks": sim.blocks,
            }
        )
    return out
