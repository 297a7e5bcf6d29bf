"""A model of one QKD link's secret key supply (sans-I/O: every call takes ``now``).

What it models (docs/keysource.md has the parameters and realistic presets):

- Secret key accumulates at ``rate_bps`` (the secret key rate after error correction and
  privacy amplification, at the configured ``qber``) into a pool capped at
  ``max_key_count * key_size`` bits.
- The rate scales with the BB84 asymptotic secret fraction ``r(Q) = 1 - 2 h2(Q)`` (Shor and
  Preskill) when the QBER changes at run time: ``rate(Q) = rate_bps * r(Q) / r(qber)``.
- When the QBER exceeds ``qber_abort_threshold`` (default 11 %, where ``r(Q)`` reaches 0) the
  link aborts: no new key accumulates. An intercept-resend eavesdropper on every photon raises
  the QBER to 25 % (``EVE_QBER``), so switching the eavesdropper on aborts the link.
- Link down (fibre cut, device off): no new key either.
- Key already in the pool was distilled before the abort and stays usable, as in real KMEs;
  ``flush`` empties the pool (an operator discarding keys after an alarm).

The model never reads a clock and draws randomness only through the injected ``rng``.

Model selection: ``LinkParams.model`` is ``"rate"`` (this module's :class:`QkdLink`, the fast
default for tests) or ``"bb84"`` (:class:`keysource.bb84_link.Bb84Link`: the pools fill from a
decoy-state BB84 pipeline executed block by block). :func:`make_link` builds either; both offer
``advance``, ``available_bits``, ``stored_key_count``, ``take_pairs`` (KME A's and KME B's copy
of each key), ``take``, ``set``, ``snapshot``, ``reason`` and ``aborted``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keysource.bb84_link import Bb84Link, Bb84Settings

EVE_QBER = 0.25  # intercept-resend on every photon, BB84: 1/2 wrong basis x 1/2 wrong bit
DEFAULT_ABORT_QBER = 0.11  # BB84 asymptotic limit (Shor-Preskill r(Q) = 0 at ~11 %)


def binary_entropy(q: float) -> float:
    if q <= 0.0 or q >= 1.0:
        return 0.0
    return -q * math.log2(q) - (1 - q) * math.log2(1 - q)


def secret_fraction(q: float) -> float:
    """BB84 asymptotic secret fraction 1 - 2 h2(Q), clipped at 0."""
    return max(0.0, 1.0 - 2.0 * binary_entropy(q))


class LinkError(Exception):
    """Base of the link model's refusals (translated to HTTP answers by the simulator)."""


class LinkExhausted(LinkError):
    """Not enough secret key in the pool for this request."""


class LinkPoolsDiffer(LinkError):
    """The bb84 model's two pools disagree: the pipeline produced unequal keys (never served)."""


@dataclass(frozen=True, slots=True)
class LinkParams:
    rate_bps: float = 100_000.0
    key_size: int = 256
    min_key_size: int = 64
    max_key_size: int = 8192
    max_key_count: int = 1000
    max_key_per_request: int = 128
    qber: float = 0.02
    qber_abort_threshold: float = DEFAULT_ABORT_QBER
    initial_keys: int = 0  # keys of key_size in the pool at start
    model: str = "rate"  # "rate" or "bb84"
    bb84: Bb84Settings | None = None  # required when model == "bb84"

    def __post_init__(self) -> None:
        if self.model not in ("rate", "bb84"):
            raise ValueError("model must be 'rate' or 'bb84'")
        if self.model == "bb84" and self.bb84 is None:
            raise ValueError("model 'bb84' needs [link.bb84] settings")
        if self.rate_bps < 0:
            raise ValueError("rate_bps must be >= 0")
        for name in ("key_size", "min_key_size", "max_key_size"):
            v = getattr(self, name)
            if v <= 0 or v % 8:
                raise ValueError(f"{name} must be a positive multiple of 8")
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("need min_key_size <= key_size <= max_key_size")
        if self.max_key_count < 1 or self.max_key_per_request < 1:
            raise ValueError("max_key_count and max_key_per_request must be >= 1")
        if not 0.0 <= self.qber < 0.5 or not 0.0 < self.qber_abort_threshold <= 0.5:
            raise ValueError("qber must be in [0, 0.5) and qber_abort_threshold in (0, 0.5]")
        if self.qber > self.qber_abort_threshold or secret_fraction(self.qber) <= 0.0:
            raise ValueError("the configured qber must be below the abort threshold and 11 %")
        if not 0 <= self.initial_keys <= self.max_key_count:
            raise ValueError("initial_keys must be between 0 and max_key_count")


class QkdLink:
    """The secret key pool of one QKD link, advanced by the caller's clock."""

    def __init__(
        self,
        params: LinkParams,
        now: float,
        rng: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.params = params
        self._rng = rng
        self._last = now
        self._bits = float(params.initial_keys * params.key_size)
        self.up = True
        self.eavesdropper = False
        self.qber = params.qber
        self.rate_bps = params.rate_bps
        self.bits_generated = 0  # handed out, for the admin view
        self.aborts = 0

    # --- state ------------------------------------------------------------------------------

    @property
    def effective_qber(self) -> float:
        return max(self.qber, EVE_QBER) if self.eavesdropper else self.qber

    @property
    def aborted(self) -> bool:
        return self.effective_qber > self.params.qber_abort_threshold

    @property
    def current_rate_bps(self) -> float:
        if not self.up or self.aborted:
            return 0.0
        return (
            self.rate_bps * secret_fraction(self.effective_qber) / secret_fraction(self.params.qber)
        )

    @property
    def capacity_bits(self) -> int:
        return self.params.max_key_count * self.params.key_size

    def advance(self, now: float) -> None:
        """Accumulate key from the last call until ``now`` (a clock going back is ignored)."""
        dt = now - self._last
        if dt <= 0:
            return
        self._last = now
        self._bits = min(float(self.capacity_bits), self._bits + dt * self.current_rate_bps)

    def available_bits(self, now: float) -> int:
        self.advance(now)
        return int(self._bits)

    def stored_key_count(self, now: float) -> int:
        return self.available_bits(now) // self.params.key_size

    # --- operations -------------------------------------------------------------------------

    def take(self, now: float, number: int, size_bits: int) -> list[bytes]:
        """``number`` fresh keys of ``size_bits`` from the pool, or LinkExhausted."""
        if number < 1 or size_bits < 8 or size_bits % 8:
            raise ValueError("number >= 1 and size a positive multiple of 8")
        need = number * size_bits
        if self.available_bits(now) < need:
            raise LinkExhausted(
                "keys are exhausted" if self.up and not self.aborted else self.reason()
            )
        self._bits -= need
        self.bits_generated += need
        return [self._rng(size_bits // 8) for _ in range(number)]

    def take_pairs(self, now: float, number: int, size_bits: int) -> list[tuple[bytes, bytes]]:
        """As :meth:`take`, as (KME A's copy, KME B's copy): one pool here, so equal."""
        return [(k, k) for k in self.take(now, number, size_bits)]

    def reason(self) -> str:
        if not self.up:
            return "QKD link is down"
        if self.aborted:
            return f"QKD link aborted: QBER {self.effective_qber:.1%} above threshold"
        return "keys are exhausted"

    def set(
        self,
        now: float,
        *,
        up: bool | None = None,
        eavesdropper: bool | None = None,
        qber: float | None = None,
        rate_bps: float | None = None,
        flush: bool = False,
        **bb84_only: Any,
    ) -> None:
        """Change the link at run time (admin endpoint). Accrual up to ``now`` uses the old state."""
        if bb84_only:
            raise ValueError(f"{sorted(bb84_only)}: only the bb84 link model has these")
        self.advance(now)
        was_aborted = self.aborted
        if up is not None:
            self.up = up
        if eavesdropper is not None:
            self.eavesdropper = eavesdropper
        if qber is not None:
            if not 0.0 <= qber <= 0.5:
                raise ValueError("qber must be in [0, 0.5]")
            self.qber = qber
        if rate_bps is not None:
            if rate_bps < 0:
                raise ValueError("rate_bps must be >= 0")
            self.rate_bps = rate_bps
        if flush:
            self._bits = 0.0
        if self.aborted and not was_aborted:
            self.aborts += 1

    def snapshot(self, now: float) -> dict[str, Any]:
        """A JSON-ready view for status_extension and the admin endpoint (no key bytes)."""
        self.advance(now)
        return {
            "model": "rate",
            "link_up": self.up,
            "eavesdropper": self.eavesdropper,
            "qber": round(self.effective_qber, 6),
            "qber_abort_threshold": self.params.qber_abort_threshold,
            "aborted": self.aborted,
            "rate_bps": round(self.current_rate_bps, 3),
            "available_bits": int(self._bits),
            "stored_key_count": int(self._bits) // self.params.key_size,
            "bits_generated": self.bits_generated,
            "aborts": self.aborts,
        }


def make_link(
    params: LinkParams, now: float, rng: Callable[[int], bytes] = secrets.token_bytes
) -> QkdLink | Bb84Link:
    """The link model ``params.model`` names (``rng`` is for the rate model; the bb84 model
    seeds its numpy generator from ``[link.bb84] seed`` or the OS)."""
    if params.model == "bb84":
        from keysource.bb84_link import Bb84Link  # noqa: PLC0415 -- numpy only when used

        return Bb84Link(params, now)
    return QkdLink(params, now, rng)
