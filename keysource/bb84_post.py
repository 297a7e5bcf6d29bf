"""BB84 post-processing, executed on both sides' bits (sans-I/O; randomness injected).

Steps of one block, labelled as in docs/keysource.md section 3.6:

- PP1 sifting: both announce bases, keep detections where they agree (Z: key, X: test).
- PP2 parameter estimation: Alice discloses every X-basis bit; the X error counts per
  intensity, the detection counts per basis and intensity feed the decoy bounds [Lim14].
  QBER above ``qber_abort`` -> abort the block before error correction.
- PP3 error correction: Cascade (Brassard, Salvail, EUROCRYPT '93) with parallel bisection;
  every parity Alice discloses is counted in ``leak_ec``; f = leak_ec / (n h2(Q)).
- PP4 verification: a Toeplitz hash tag (2-universal, collision <= 2^-t) of both strings under
  a fresh shared seed; a mismatch discards the block.
- PP5 privacy amplification: Toeplitz hashing to the finite-key length [Lim14] with a fresh
  shared seed; computed by FFT convolution, checked in tests against a dense GF(2) matrix.

Alice and Bob are two arrays here; what one sends the other (bases, parities, seeds, tags)
is what the code reads across, and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from keysource.bb84_finite import KeyLength, key_length
from keysource.bb84_physics import Bb84Params, RawBlock, expected_gains, h2

Bits = np.ndarray[Any, np.dtype[np.uint8]]

CASCADE_PASSES = 6  # 4 in the original; two cheap extra passes make residual errors rarer
CASCADE_K1 = 0.73  # first block size 0.73 / Q (Brassard-Salvail)
TOEPLITZ_ROWS_DIRECT = 128  # up to this many output bits: row by row, else FFT
CASCADE_MAX_ROUNDS = 64  # re-check rounds per pass; more only if a step is wrong (then stop)


# --- Toeplitz hashing (PP4, PP5) --------------------------------------------------------


def toeplitz_hash(x: Bits, seed: Bits, m: int) -> Bits:
    """y = T x over GF(2), T[i, j] = seed[i - j + n - 1] (m x n, seed of n + m - 1 bits).

    y_i = sum_j seed[i + n - 1 - j] x_j: the full convolution of seed and x, entries n-1 ..
    n+m-2, mod 2. Computed with a float FFT; every sum is an integer <= n < 2^31, and the
    rounding error is checked.
    """
    n = len(x)
    if m <= 0:
        return np.zeros(0, dtype=np.uint8)
    if len(seed) != n + m - 1:
        raise ValueError("Toeplitz seed must have n + m - 1 bits")
    if m <= TOEPLITZ_ROWS_DIRECT:
        return _toeplitz_rows(x, seed, m)
    # a circular convolution of size >= n + m - 1 leaves entries n-1 .. n+m-2 unaliased (the
    # wrapped terms y[k + size] lie beyond the linear convolution's last index 2n + m - 3)
    size = 1 << (n + m - 2).bit_length()
    conv = np.fft.irfft(
        np.fft.rfft(seed.astype(np.float64), size) * np.fft.rfft(x.astype(np.float64), size), size
    )[n - 1 : n - 1 + m]
    rounded = np.rint(conv)
    if len(conv) and float(np.max(np.abs(conv - rounded))) > 0.25:
        raise ArithmeticError("FFT rounding error too large for an exact GF(2) product")
    out: Bits = (rounded.astype(np.int64) & 1).astype(np.uint8)
    return out


def _toeplitz_rows(x: Bits, seed: Bits, m: int) -> Bits:
    """Few output bits (verification tags): y_i = parity(seed[i : i+n] AND reversed x), row by
    row on packed bytes; cheaper than an FFT of length 2n for m <= TOEPLITZ_ROWS_DIRECT."""
    n = len(x)
    xr = np.packbits(x[::-1])
    out = np.zeros(m, dtype=np.uint8)
    for i in range(m):
        folded = int(np.bitwise_xor.reduce(np.packbits(seed[i : i + n]) & xr))
        out[i] = folded.bit_count() & 1
    return out


def toeplitz_dense(x: Bits, seed: Bits, m: int) -> Bits:
    """Reference: build the m x n matrix and multiply over GF(2) (tests only; O(m n) memory)."""
    n = len(x)
    i = np.arange(m)[:, None]
    j = np.arange(n)[None, :]
    t = seed[i - j + n - 1].astype(np.int64)
    out: Bits = ((t @ x.astype(np.int64)) & 1).astype(np.uint8)
    return out


# --- Cascade (PP3) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EcResult:
    corrected: Bits  # Bob's string after correction
    leak_bits: int  # parities disclosed by Alice
    errors_corrected: int
    passes: int


def _prefix(bits: Bits) -> np.ndarray[Any, np.dtype[np.int64]]:
    out = np.zeros(len(bits) + 1, dtype=np.int64)
    np.cumsum(bits, out=out[1:])
    return out


def cascade(alice: Bits, bob: Bits, qber_estimate: float, rng: np.random.Generator) -> EcResult:
    """Cascade: pass i has blocks of k1 2^i bits under a fresh shared permutation.

    After each pass every earlier pass's blocks are re-checked (the cascade effect) until all
    block parities agree; all odd blocks are bisected in parallel. Only Bob's string changes.
    """
    n = len(alice)
    b = bob.copy()
    if n == 0:
        return EcResult(b, 0, 0, 0)
    k1 = max(4, int(CASCADE_K1 / max(qber_estimate, 1e-3)))
    perms: list[np.ndarray[Any, Any]] = []
    pre_a: list[np.ndarray[Any, Any]] = []
    sizes: list[int] = []
    leak = 0
    flips = 0
    passes = 0
    for i in range(CASCADE_PASSES):
        k = k1 << i
        perm = np.arange(n) if i == 0 else rng.permutation(n)  # Alice picks, sends to Bob
        perms.append(perm)
        pre_a.append(_prefix(alice[perm]))
        sizes.append(k)
        leak += -(-n // k)  # Alice discloses one parity per block
        passes += 1
        for _round in range(CASCADE_MAX_ROUNDS):
            odd_pass, odd_lo, odd_hi = [], [], []
            pre_b = [_prefix(b[p]) for p in perms]
            for j, k_j in enumerate(sizes):
                starts = np.arange(0, n, k_j)
                ends = np.minimum(starts + k_j, n)
                pa = (pre_a[j][ends] - pre_a[j][starts]) & 1
                pb = (pre_b[j][ends] - pre_b[j][starts]) & 1
                odd = np.flatnonzero(pa != pb)
                odd_pass.append(np.full(len(odd), j))
                odd_lo.append(starts[odd])
                odd_hi.append(ends[odd])
            which = np.concatenate(odd_pass)
            if len(which) == 0:
                break
            lo, hi = np.concatenate(odd_lo), np.concatenate(odd_hi)
            pa_all, pb_all = np.stack(pre_a), np.stack(pre_b)
            while True:
                active = hi - lo > 1
                if not active.any():
                    break
                mid = (lo + hi) // 2
                pa = (pa_all[which, mid] - pa_all[which, lo]) & 1
                pb = (pb_all[which, mid] - pb_all[which, lo]) & 1
                leak += int(active.sum())  # Alice discloses the left half's parity
                left = (pa != pb) & active
                right = (pa == pb) & active
                hi = np.where(left, mid, hi)
                lo = np.where(right, mid, lo)
            positions = np.unique(np.stack(perms)[which, lo])
            b[positions] ^= 1
            flips += len(positions)
    return EcResult(b, leak, flips, passes)


# --- one block through PP1..PP5 ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PostParams:
    eps_sec: float = 1e-9
    eps_cor: float = 1e-15
    qber_abort: float = 0.11

    def __post_init__(self) -> None:
        if not 0 < self.eps_sec < 1 or not 0 < self.eps_cor < 1:
            raise ValueError("eps_sec and eps_cor must be in (0, 1)")
        if not 0 < self.qber_abort <= 0.5:
            raise ValueError("qber_abort must be in (0, 0.5]")

    @property
    def tag_bits(self) -> int:
        return max(32, math.ceil(math.log2(1 / self.eps_cor)))


@dataclass(frozen=True, slots=True)
class BlockResult:
    """One block's outcome. ``key_a``/``key_b`` are the final keys (empty when no key)."""

    pulses: int
    detections: int
    sifted_z: int
    sifted_x: int
    qber_x: float  # PP2 estimate from the disclosed X-basis bits
    qber_z: float  # errors Cascade corrected / sifted_z (nan when not run)
    leak_ec: int
    ec_efficiency: float  # leak_ec / (n h2(qber_z)); nan when not run
    verified: bool
    finite: KeyLength | None
    key_a: Bits
    key_b: Bits
    abort_reason: str  # "" when the block gave key
    seconds: dict[str, float]  # per stage, filled by the caller when timing

    @property
    def secret_bits(self) -> int:
        return len(self.key_a)

    def __repr__(self) -> str:
        return (
            f"BlockResult(sifted_z={self.sifted_z}, qber_x={self.qber_x:.4f}, "
            f"secret_bits={self.secret_bits}, abort_reason={self.abort_reason!r}, key=<secret>)"
        )


_EMPTY: Bits = np.zeros(0, dtype=np.uint8)


def process_block(
    raw: RawBlock,
    phys: Bb84Params,
    post: PostParams,
    rng: np.random.Generator,
    clock: Any = None,
) -> BlockResult:
    """PP1..PP5 on one block. ``clock`` (optional, e.g. time.perf_counter) times the stages."""
    t: dict[str, float] = {}
    now = clock or (lambda: 0.0)
    t0 = now()
    # PP1 sifting
    same = raw.basis_a == raw.basis_b
    zi = np.flatnonzero(same & raw.basis_a)
    xi = np.flatnonzero(same & ~raw.basis_a)
    inten_z, inten_x = raw.intensity[zi], raw.intensity[xi]
    counts_z = [int(np.count_nonzero(inten_z == k)) for k in range(3)]
    counts_x = [int(np.count_nonzero(inten_x == k)) for k in range(3)]
    t1 = now()
    t["sift"] = t1 - t0
    # PP2 parameter estimation: all X bits disclosed and compared
    err_x = raw.bits_a[xi] != raw.bits_b[xi]
    errors_x = [int(np.count_nonzero(err_x & (inten_x == k))) for k in range(3)]
    qber_x = sum(errors_x) / len(xi) if len(xi) else 1.0
    a, b = raw.bits_a[zi], raw.bits_b[zi]
    t2 = now()
    t["estimate"] = t2 - t1
    base = BlockResult(
        pulses=raw.pulses,
        detections=len(raw.intensity),
        sifted_z=len(zi),
        sifted_x=len(xi),
        qber_x=qber_x,
        qber_z=math.nan,
        leak_ec=0,
        ec_efficiency=math.nan,
        verified=False,
        finite=None,
        key_a=_EMPTY,
        key_b=_EMPTY,
        abort_reason="",
        seconds=t,
    )
    if len(zi) == 0:
        return replace(base, abort_reason="no sifted key bits")
    if qber_x > post.qber_abort:
        return replace(
            base, abort_reason=f"QBER {qber_x:.1%} above threshold {post.qber_abort:.1%}"
        )
    # PP3 error correction
    ec = cascade(a, b, qber_x, rng)
    n = len(a)
    qber_z = ec.errors_corrected / n
    f = ec.leak_bits / (n * h2(qber_z)) if 0 < qber_z < 1 else math.inf
    t3 = now()
    t["error_correction"] = t3 - t2
    # PP4 verification (Alice sends her tag and the seed)
    tb = post.tag_bits
    vseed = rng.integers(0, 2, n + tb - 1, dtype=np.uint8)
    verified = bool(
        np.array_equal(toeplitz_hash(a, vseed, tb), toeplitz_hash(ec.corrected, vseed, tb))
    )
    t4 = now()
    t["verification"] = t4 - t3
    finite = key_length(
        counts_z=counts_z,
        counts_x=counts_x,
        errors_x=errors_x,
        mus=phys.intensities,
        ps=phys.probabilities,
        leak_ec=ec.leak_bits,
        eps_sec=post.eps_sec,
        eps_cor=post.eps_cor,
    )
    base = replace(
        base, qber_z=qber_z, leak_ec=ec.leak_bits, ec_efficiency=f, verified=verified, finite=finite
    )
    if not verified:
        return replace(base, abort_reason="verification tag mismatch (residual errors)")
    ell = finite.length - finite.length % 8  # whole bytes into the pool
    if ell <= 0:
        return replace(
            base,
            abort_reason=(
                f"finite-key length {finite.length} <= 0 "
                f"(single-photon bound s_Z1 {finite.s_z1:.0f}, phase error {finite.phi_z:.1%})"
            ),
        )
    # PP5 privacy amplification (Alice sends the seed)
    pseed = rng.integers(0, 2, n + ell - 1, dtype=np.uint8)
    key_a = toeplitz_hash(a, pseed, ell)
    key_b = toeplitz_hash(ec.corrected, pseed, ell)
    t["privacy_amplification"] = now() - t4
    return replace(base, key_a=key_a, key_b=key_b)


def expected_length(phys: Bb84Params, post: PostParams, sifted_z: int, f_ec: float) -> KeyLength:
    """The finite-key length of a block with the *expected* counts (no Monte Carlo)."""
    gains = expected_gains(phys)
    pz2, px2 = phys.p_z**2, (1 - phys.p_z) ** 2
    pulses = sifted_z / (
        pz2 * sum(p * q for p, (q, _) in zip(phys.probabilities, gains, strict=True))
    )
    det = [pulses * p * q for p, (q, _) in zip(phys.probabilities, gains, strict=True)]
    counts_z = [round(d * pz2) for d in det]
    counts_x = [round(d * px2) for d in det]
    errors_x = [round(c * e) for c, (_, e) in zip(counts_x, gains, strict=True)]
    e_z = sum(c * e for c, (_, e) in zip(counts_z, gains, strict=True)) / max(1, sum(counts_z))
    return key_length(
        counts_z=counts_z,
        counts_x=counts_x,
        errors_x=errors_x,
        mus=phys.intensities,
        ps=phys.probabilities,
        leak_ec=math.ceil(f_ec * sum(counts_z) * h2(e_z)),
        eps_sec=post.eps_sec,
        eps_cor=post.eps_cor,
    )
