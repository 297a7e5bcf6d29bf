"""Decoy-state BB84 over fibre: the analytic model and per-block Monte-Carlo counts (sans-I/O).

Sources (docs/keysource.md section 3.6 has the equations):

- [LMC05] H.-K. Lo, X. Ma, K. Chen, "Decoy state quantum key distribution",
  Phys. Rev. Lett. 94, 230504 (2005): gains, error rates, GLLP key rate with an infinite
  number of decoys, and the GYS parameters (Gobby, Yuan, Shields, APL 84, 3762 (2004)).
- [Ma05] X. Ma, B. Qi, Y. Zhao, H.-K. Lo, "Practical decoy state for quantum key
  distribution", Phys. Rev. A 72, 012326 (2005): vacuum + weak decoy bounds.
- [Lim14] C. C. W. Lim, M. Curty, N. Walenta, F. Xu, H. Zbinden, "Concise security bounds for
  practical decoy-state quantum key distribution", Phys. Rev. A 89, 022307 (2014).

Nothing here reads a clock or draws randomness except through the ``numpy.random.Generator``
the caller passes in.

The channel is described per photon number n (a phase-randomised weak coherent pulse of
intensity k has Poisson photon statistics P_n(k) = e^-k k^n / n!):

- without Eve: yield Y_n = 1 - (1 - Y0)(1 - eta)^n and error e_n Y_n = e0 Y0 + e_det (Y_n - Y0),
  eta = eta_Bob 10^(-alpha L / 10)  [LMC05 eqs. (4)-(8)];
- intercept-resend on a fraction F of the pulses: the intercepted photons reach Bob in Eve's
  basis, half of the time the wrong one, so their error becomes e_det/2 + 1/4 (QBER -> 25 %);
- photon-number splitting on a fraction F: Eve keeps one photon of every multi-photon pulse and
  sends the rest to Bob over a lossless channel (yield 1 - (1 - eta_Bob)^(n-1)), and passes
  just enough single photons that the *signal* gain looks normal.  The decoy gains then no
  longer fit the channel, which is what the decoy bounds see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

E0 = 0.5  # error rate of a dark count (random bit) [LMC05]
N_PHOTONS = 24  # photon numbers summed (P_n(1.0) for n >= 24 is < 1e-23)


def h2(x: float) -> float:
    """Binary entropy (bits)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0
    return -x * math.log2(x) - (1.0 - x) * math.log2(1.0 - x)


@dataclass(frozen=True, slots=True)
class Bb84Params:
    """One decoy-state BB84 link: source, fibre, receiver, protocol choices.

    Intensities are mean photon numbers per pulse: ``mu`` signal, ``nu`` weak decoy, ``omega``
    the weakest decoy (0 = vacuum), chosen with probabilities ``p_mu``, ``p_nu``, ``p_omega``.
    ``p_z`` is the probability that Alice, and independently Bob, picks the Z (key) basis; 0.5
    is the symmetric protocol of [LMC05], larger is the efficient (biased) variant of [Lim14].
    """

    pulse_rate_hz: float = 2.0e6
    distance_km: float = 50.0
    loss_db_per_km: float = 0.21
    eta_bob: float = 0.045
    y0: float = 1.7e-6
    e_det: float = 0.033
    f_ec: float = 1.22  # error-correction inefficiency assumed by the analytic rate
    mu: float = 0.45
    nu: float = 0.15
    omega: float = 0.0
    p_mu: float = 0.5
    p_nu: float = 0.25
    p_omega: float = 0.25
    p_z: float = 0.5
    eve_ir_fraction: float = 0.0  # intercept-resend on this fraction of the pulses
    eve_pns_fraction: float = 0.0  # photon-number splitting on this fraction of the pulses

    def __post_init__(self) -> None:
        checks = [
            (self.pulse_rate_hz > 0, "pulse_rate_hz must be > 0"),
            (self.distance_km >= 0, "distance_km must be >= 0"),
            (self.loss_db_per_km >= 0, "loss_db_per_km must be >= 0"),
            (0 < self.eta_bob <= 1, "eta_bob must be in (0, 1]"),
            (0 <= self.y0 < 0.5, "y0 must be in [0, 0.5)"),
            (0 <= self.e_det < 0.5, "e_det must be in [0, 0.5)"),
            (self.f_ec >= 1.0, "f_ec must be >= 1"),
            (self.mu > self.nu + self.omega, "need mu > nu + omega [Lim14]"),
            (self.nu > self.omega >= 0, "need nu > omega >= 0"),
            (min(self.p_mu, self.p_nu, self.p_omega) > 0, "intensity probabilities must be > 0"),
            (abs(self.p_mu + self.p_nu + self.p_omega - 1) < 1e-9, "p_mu+p_nu+p_omega must be 1"),
            (0 < self.p_z < 1, "p_z must be in (0, 1)"),
            (0 <= self.eve_ir_fraction <= 1, "eve_ir_fraction must be in [0, 1]"),
            (0 <= self.eve_pns_fraction <= 1, "eve_pns_fraction must be in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def intensities(self) -> tuple[float, float, float]:
        return (self.mu, self.nu, self.omega)

    @property
    def probabilities(self) -> tuple[float, float, float]:
        return (self.p_mu, self.p_nu, self.p_omega)

    @property
    def eta(self) -> float:
        """Overall transmittance eta = eta_Bob 10^(-alpha L / 10) [LMC05]."""
        return float(self.eta_bob * 10.0 ** (-self.loss_db_per_km * self.distance_km / 10.0))

    def with_(self, **changes: Any) -> Bb84Params:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    params: Bb84Params
    source: str
    default_distances_km: tuple[float, ...] = field(default=(0, 25, 50, 75, 100, 125, 140))


PRESETS: dict[str, Preset] = {
    "gys": Preset(
        "gys",
        Bb84Params(),
        "GYS: Gobby, Yuan, Shields, APL 84, 3762 (2004), as used by Lo, Ma, Chen, PRL 94, "
        "230504 (2005), Table I: 1550 nm, 0.21 dB/km, e_det 3.3 %, Y0 1.7e-6, eta_Bob 4.5 %, "
        "f 1.22; 2 MHz clock",
    ),
    "metro": Preset(
        "metro",
        Bb84Params(
            pulse_rate_hz=1.0e9,
            distance_km=25.0,
            loss_db_per_km=0.2,
            eta_bob=0.2,
            y0=1.0e-6,
            e_det=0.015,
            f_ec=1.16,
            mu=0.45,
            nu=0.15,
            omega=0.0,
            p_mu=0.5,
            p_nu=0.25,
            p_omega=0.25,
            p_z=0.7,
        ),
        "metro: a GHz-clocked, self-differencing InGaAs receiver, representative of Lucamarini "
        "et al., Opt. Express 21, 24550 (2013) and of DESIGN.md section 5 (<= 10 dB, QBER "
        "1-3 %): 1 GHz, 0.2 dB/km, eta_Bob 20 %, Y0 1e-6, e_det 1.5 %, efficient BB84 p_Z 0.7",
        (0, 10, 25, 50, 75, 100, 150),
    ),
    "long": Preset(
        "long",
        Bb84Params(
            pulse_rate_hz=2.5e9,
            distance_km=150.0,
            loss_db_per_km=0.17,
            eta_bob=0.6,
            y0=1.0e-8,
            e_det=0.01,
            f_ec=1.16,
            mu=0.45,
            nu=0.15,
            omega=0.0,
            p_mu=0.5,
            p_nu=0.25,
            p_omega=0.25,
            p_z=0.7,
        ),
        "long: ultra-low-loss fibre and superconducting detectors, representative of Boaron "
        "et al., PRL 121, 190502 (2018): 2.5 GHz, 0.17 dB/km, eta_Bob 60 %, Y0 1e-8, e_det 1 %",
        (50, 100, 150, 200, 250, 300),
    ),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


# --- analytic model [LMC05] ------------------------------------------------------------------


def gain(p: Bb84Params, k: float) -> float:
    """Q_k = Y0 + 1 - exp(-eta k)  [LMC05 eq. (5)], no eavesdropper."""
    return p.y0 + 1.0 - math.exp(-p.eta * k)


def qber(p: Bb84Params, k: float) -> float:
    """E_k = (e0 Y0 + e_det (1 - exp(-eta k))) / Q_k  [LMC05 eq. (6)], no eavesdropper."""
    return (E0 * p.y0 + p.e_det * (1.0 - math.exp(-p.eta * k))) / gain(p, k)


def single_photon(p: Bb84Params) -> tuple[float, float]:
    """(Y1, e1): Y1 ~ Y0 + eta, e1 = (e0 Y0 + e_det eta) / Y1  [LMC05 eqs. (4), (7)]."""
    y1 = p.y0 + p.eta
    return y1, (E0 * p.y0 + p.e_det * p.eta) / y1


def asymptotic_rate(p: Bb84Params, mu: float | None = None, q: float = 0.5) -> float:
    """GLLP with infinitely many decoys, bits per pulse [LMC05 eq. (1)]:

    R = q { -Q_mu f(E_mu) H2(E_mu) + Q_1 [1 - H2(e_1)] },  Q_1 = Y_1 mu e^-mu,
    clipped at 0; q = 1/2 for symmetric BB84.
    """
    m = p.mu if mu is None else mu
    y1, e1 = single_photon(p)
    q_mu, e_mu = gain(p, m), qber(p, m)
    q1 = y1 * m * math.exp(-m)
    return max(0.0, q * (-q_mu * p.f_ec * h2(e_mu) + q1 * (1.0 - h2(e1))))


def optimal_mu(p: Bb84Params, q: float = 0.5) -> tuple[float, float]:
    """(mu*, R(mu*)): the signal intensity that maximises :func:`asymptotic_rate`."""
    grid = np.linspace(0.005, 1.5, 300)
    rates = [asymptotic_rate(p, float(m), q) for m in grid]
    i = int(np.argmax(rates))
    if rates[i] <= 0.0:
        return 0.0, 0.0
    lo, hi = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
    g = (math.sqrt(5) - 1) / 2  # golden section on the bracket
    a, b = lo, hi
    for _ in range(60):
        c, d = b - g * (b - a), a + g * (b - a)
        if asymptotic_rate(p, c, q) >= asymptotic_rate(p, d, q):
            b = d
        else:
            a = c
    m = (a + b) / 2
    return m, asymptotic_rate(p, m, q)


def max_distance_km(p: Bb84Params, q: float = 0.5, hi: float = 1000.0) -> float:
    """The distance where the optimised asymptotic rate reaches 0 (bisection, 1e-6 km)."""
    lo = 0.0
    if optimal_mu(p.with_(distance_km=lo), q)[1] <= 0.0:
        return 0.0
    if optimal_mu(p.with_(distance_km=hi), q)[1] > 0.0:
        return hi
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        if optimal_mu(p.with_(distance_km=mid), q)[1] > 0.0:
            lo = mid
        else:
            hi = mid
    return lo


# --- photon-number channel with eavesdroppers (used by the Monte Carlo) ------------------


def _poisson(k: float) -> np.ndarray[Any, np.dtype[np.float64]]:
    n = np.arange(N_PHOTONS)
    logf = np.array([math.lgamma(i + 1) for i in n])
    if k == 0.0:
        out = np.zeros(N_PHOTONS)
        out[0] = 1.0
        return out
    return np.asarray(np.exp(-k + n * math.log(k) - logf), dtype=np.float64)


def channel(p: Bb84Params) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(Y_n, e_n Y_n) for n = 0 .. N_PHOTONS-1 with the configured eavesdroppers mixed in."""
    n = np.arange(N_PHOTONS)
    y = 1.0 - (1.0 - p.y0) * (1.0 - p.eta) ** n
    ey = E0 * p.y0 + p.e_det * (y - p.y0)
    f_ir, f_pns = p.eve_ir_fraction, p.eve_pns_fraction
    if f_ir > 0:
        # same yield, photons resent in Eve's basis: error e_det/2 + 1/4 on the photon part
        ey_ir = E0 * p.y0 + (p.e_det / 2 + 0.25) * (y - p.y0)
        ey = (1 - f_ir) * ey + f_ir * ey_ir
    if f_pns > 0:
        y_eve = 1.0 - (1.0 - p.y0) * (1.0 - p.eta_bob) ** np.maximum(n - 1, 0)
        pm = _poisson(p.mu)
        target = float(np.dot(pm[1:], y[1:] - p.y0))  # the normal signal gain (photon part)
        multi = float(np.dot(pm[2:], y_eve[2:] - p.y0))
        if multi >= target:  # even blocking every single photon leaves too much: thin multis
            s, scale = 0.0, target / multi
        else:
            s, scale = (target - multi) / pm[1], 1.0
        y_eve = p.y0 + scale * (y_eve - p.y0)
        y_eve[1] = p.y0 + s
        ey_eve = E0 * p.y0 + p.e_det * (y_eve - p.y0)
        y = (1 - f_pns) * y + f_pns * y_eve
        ey = (1 - f_pns) * ey + f_pns * ey_eve
    return y, ey


def expected_gains(p: Bb84Params) -> list[tuple[float, float]]:
    """Per intensity (mu, nu, omega): (Q_k, E_k) from the photon-number channel."""
    y, ey = channel(p)
    out = []
    for k in p.intensities:
        pn = _poisson(k)
        q = float(np.dot(pn, y))
        out.append((q, float(np.dot(pn, ey)) / q))
    return out


# --- one block, drawn -------------------------------------------------------------------


@dataclass(slots=True)
class RawBlock:
    """What both sides hold after the quantum phase of one block (per detected pulse).

    Alice knows ``intensity``, ``basis_a``, ``bits_a``; Bob knows ``basis_b``, ``bits_b``.
    Undetected pulses carry no information and are not stored.
    """

    pulses: int
    intensity: np.ndarray[Any, np.dtype[np.int8]]  # 0 mu, 1 nu, 2 omega
    basis_a: np.ndarray[Any, np.dtype[np.bool_]]  # True = Z
    basis_b: np.ndarray[Any, np.dtype[np.bool_]]
    bits_a: np.ndarray[Any, np.dtype[np.uint8]]
    bits_b: np.ndarray[Any, np.dtype[np.uint8]]


def draw_block(p: Bb84Params, pulses: int, rng: np.random.Generator) -> RawBlock:
    """One block of ``pulses`` pulses: detections and errors per intensity from the model.

    Pulses split over intensities (multinomial); detections ~ Binomial(n_k, Q_k); each detection
    gets independent basis choices; where the bases agree Bob's bit is Alice's XOR an error
    pattern of weight ~ Binomial(m, E_k); where they differ Bob's bit is random.
    """
    n_k = rng.multinomial(pulses, p.probabilities)
    parts_i, parts_ba, parts_bb, parts_a, parts_b = [], [], [], [], []
    for idx, ((q, e), n) in enumerate(zip(expected_gains(p), n_k, strict=True)):
        d = int(rng.binomial(int(n), min(q, 1.0)))
        ba = rng.random(d) < p.p_z
        bb = rng.random(d) < p.p_z
        a = rng.integers(0, 2, d, dtype=np.uint8)
        same = np.flatnonzero(ba == bb)
        err = np.zeros(d, dtype=np.uint8)
        w = int(rng.binomial(len(same), e))
        err[rng.choice(same, size=w, replace=False)] = 1
        b = a ^ err
        diff = np.flatnonzero(ba != bb)
        b[diff] = rng.integers(0, 2, len(diff), dtype=np.uint8)
        parts_i.append(np.full(d, idx, dtype=np.int8))
        parts_ba.append(ba)
        parts_bb.append(bb)
        parts_a.append(a)
        parts_b.append(b)
    order = rng.permutation(sum(len(x) for x in parts_i))  # detections in time order
    return RawBlock(
        pulses,
        np.concatenate(parts_i)[order],
        np.concatenate(parts_ba)[order],
        np.concatenate(parts_bb)[order],
        np.concatenate(parts_a)[order],
        np.concatenate(parts_b)[order],
    )


def pulses_for_sifted_z(p: Bb84Params, sifted_z_bits: int) -> int:
    """Pulses needed for about ``sifted_z_bits`` sifted Z-basis detections."""
    per_pulse = sum(pk * q for pk, (q, _) in zip(p.probabilities, expected_gains(p), strict=True))
    return max(1, math.ceil(sifted_z_bits / (per_pulse * p.p_z * p.p_z)))
