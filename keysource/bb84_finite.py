"""Finite-key length of decoy-state BB84 (three intensities, efficient or symmetric bases).

[Lim14] C. C. W. Lim, M. Curty, N. Walenta, F. Xu, H. Zbinden, "Concise security bounds for
practical decoy-state quantum key distribution", Phys. Rev. A 89, 022307 (2014), eqs. (1)-(5),
checked term by term against the published text (their key basis X is our Z: the key comes
from Z, the phase error from X; the plain "log 2" in gamma read as ln 2, beside its log2):

    n±_k  = (e^k / p_k) (n_k ± sqrt(n / 2 ln(21/eps_sec)))          (Hoeffding, per basis)
    tau_j = sum_k p_k e^-k k^j / j!
    s_0  >= tau_0 (mu2 n-_mu3 - mu3 n+_mu2) / (mu2 - mu3)
    s_1  >= tau_1 mu1 [n-_mu2 - n+_mu3 - (mu2^2 - mu3^2)/mu1^2 (n+_mu1 - s_0/tau_0)]
            / (mu1 (mu2 - mu3) - mu2^2 + mu3^2)
    v_X1 <= tau_1 (m+_mu2 - m-_mu3) / (mu2 - mu3)                   (X-basis errors m_k)
    phi_Z <= v_X1/s_X1 + gamma(eps_sec, v_X1/s_X1, s_Z1, s_X1)
    gamma(a, b, c, d) = sqrt((c+d)(1-b)b / (c d ln 2) log2((c+d) / (c d (1-b) b) 21^2 / a^2))
    l = floor(s_Z0 + s_Z1 (1 - h(phi_Z)) - lambda_EC - 6 log2(21/eps_sec) - log2(2/eps_cor))

with mu1 = mu > mu2 + mu3, mu2 = nu > mu3 = omega >= 0.  The protocol is eps_sec-secret and
eps_cor-correct; lambda_EC is every bit disclosed by error correction, and the log2(2/eps_cor)
term pays for the verification tag.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from keysource.bb84_physics import h2


@dataclass(frozen=True, slots=True)
class DecoyBounds:
    s0: float  # lower bound on vacuum detections in the basis
    s1: float  # lower bound on single-photon detections in the basis


@dataclass(frozen=True, slots=True)
class KeyLength:
    length: int  # secret bits (<= 0: no key from this block)
    s_z0: float
    s_z1: float
    s_x1: float
    v_x1: float
    phi_z: float  # upper bound on the single-photon phase error rate (0.5: none)


def _tau(j: int, mus: Sequence[float], ps: Sequence[float]) -> float:
    return sum(p * math.exp(-m) * m**j / math.factorial(j) for m, p in zip(mus, ps, strict=True))


def _pm(
    counts: Sequence[int], mus: Sequence[float], ps: Sequence[float], eps_sec: float
) -> tuple[list[float], list[float]]:
    n = sum(counts)
    d = math.sqrt(n / 2 * math.log(21 / eps_sec))
    plus = [math.exp(m) / p * (c + d) for c, m, p in zip(counts, mus, ps, strict=True)]
    minus = [math.exp(m) / p * (c - d) for c, m, p in zip(counts, mus, ps, strict=True)]
    return plus, minus


def decoy_bounds(
    counts: Sequence[int], mus: Sequence[float], ps: Sequence[float], eps_sec: float
) -> DecoyBounds:
    """[Lim14] eqs. (2), (3) for one basis: counts per intensity (mu, nu, omega)."""
    m1, m2, m3 = mus
    plus, minus = _pm(counts, mus, ps, eps_sec)
    t0, t1 = _tau(0, mus, ps), _tau(1, mus, ps)
    s0 = max(0.0, t0 * (m2 * minus[2] - m3 * plus[1]) / (m2 - m3))
    num = minus[1] - plus[2] - (m2**2 - m3**2) / m1**2 * (plus[0] - s0 / t0)
    s1 = max(0.0, t1 * m1 * num / (m1 * (m2 - m3) - m2**2 + m3**2))
    return DecoyBounds(s0, s1)


def phase_error_bound(
    errors_x: Sequence[int], mus: Sequence[float], ps: Sequence[float], eps_sec: float
) -> float:
    """v_X1 <= tau_1 (m+_mu2 - m-_mu3) / (mu2 - mu3)  [Lim14 eq. (4)]."""
    _, m2, m3 = mus
    plus, minus = _pm(errors_x, mus, ps, eps_sec)
    return max(0.0, _tau(1, mus, ps) * (plus[1] - minus[2]) / (m2 - m3))


def gamma(a: float, b: float, c: float, d: float) -> float:
    """[Lim14] eq. (5): the random-sampling correction of the phase error rate."""
    if b <= 0.0 or b >= 1.0 or c <= 0 or d <= 0:
        return 0.0 if b <= 0.0 else 1.0
    inner = (c + d) / (c * d * (1 - b) * b) * 21**2 / a**2
    return math.sqrt((c + d) * (1 - b) * b / (c * d * math.log(2)) * math.log2(inner))


def key_length(
    *,
    counts_z: Sequence[int],
    counts_x: Sequence[int],
    errors_x: Sequence[int],
    mus: Sequence[float],
    ps: Sequence[float],
    leak_ec: int,
    eps_sec: float,
    eps_cor: float,
) -> KeyLength:
    """The secret length of one block [Lim14 eq. (1)]; ``length <= 0`` means no key."""
    z = decoy_bounds(counts_z, mus, ps, eps_sec)
    x = decoy_bounds(counts_x, mus, ps, eps_sec)
    v = phase_error_bound(errors_x, mus, ps, eps_sec)
    if z.s1 <= 0 or x.s1 <= 0:
        phi = 0.5  # no bound on the phase error: no single-photon entropy credited
    else:
        b = min(v / x.s1, 0.5)
        phi = min(0.5, b + gamma(eps_sec, b, z.s1, x.s1))
    ell = (
        z.s0 + z.s1 * (1 - h2(phi)) - leak_ec - 6 * math.log2(21 / eps_sec) - math.log2(2 / eps_cor)
    )
    return KeyLength(math.floor(ell), z.s0, z.s1, x.s1, v, phi)
