"""The ``bb84`` link model: the key pool both KMEs serve is the output of a BB84 pipeline.

Sans-I/O like :mod:`keysource.link`: every call takes ``now`` (seconds, any monotonic origin),
randomness comes only from the injected ``numpy.random.Generator``.

Link time turns into pulses at ``pulse_rate_hz`` while the link is up. Whenever a block's worth
of pulses (enough for about ``block_sifted_bits`` sifted Z-basis bits without Eve) has passed,
one block runs through the whole pipeline (:func:`keysource.bb84_physics.draw_block` then
:func:`keysource.bb84_post.process_block`): sifting, estimation, abort above the QBER
threshold, Cascade, Toeplitz verification, finite-key length [Lim14], Toeplitz privacy
amplification. Alice's final key goes to KME A's pool, Bob's to KME B's pool; they are two
separate byte strings, compared on every take (a pipeline that let them differ fails loudly
instead of serving unequal keys).

Blocks are *claimed* (link time consumed, a child generator drawn from the injected one, the
parameters snapshotted), *computed* (pure: may run in a worker thread) and *absorbed* (pools and
statistics updated). :meth:`Bb84Link.advance` does the three inline; the simulator claims and
absorbs on its event loop and computes in a thread. At most ``max_blocks_per_advance`` blocks
are claimed per call: link time beyond that is skipped and counted (a simulator that was
starved of CPU says so instead of falling further behind).

Key already in the pools stays usable after an abort (as in real KMEs); ``flush`` empties both.
The keys are only as unpredictable as numpy's PCG64 seeded from the OS: a simulator, not a KME.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from keysource.bb84_physics import Bb84Params, draw_block, preset, pulses_for_sifted_z
from keysource.bb84_post import BlockResult, PostParams, process_block
from keysource.link import LinkExhausted, LinkPoolsDiffer

STATS_WINDOW_BLOCKS = 8  # rates in the snapshot: the last this many blocks
PRECOMPUTE_MAX_BLOCKS = 64  # initial_keys: at most this many blocks at construction


Bb84LinkError = LinkPoolsDiffer  # the two pools disagree (never in a correct run)


@dataclass(frozen=True, slots=True)
class Bb84Settings:
    """What ``[link.bb84]`` in kme.toml configures (docs/keysource.md section 3.7)."""

    preset: str = "gys"
    overrides: tuple[tuple[str, float], ...] = ()  # Bb84Params fields changed from the preset
    block_sifted_bits: int = 1 << 17
    eps_sec: float = 1e-9
    eps_cor: float = 1e-15
    max_blocks_per_advance: int = 8
    seed: int | None = None  # reproducible runs (tests); None: seeded from the OS

    def __post_init__(self) -> None:
        if not 4096 <= self.block_sifted_bits <= 1 << 22:
            raise ValueError("block_sifted_bits must be between 4096 and 4194304")
        if self.max_blocks_per_advance < 1:
            raise ValueError("max_blocks_per_advance must be >= 1")
        PostParams(self.eps_sec, self.eps_cor)  # range checks
        self.physics()  # unknown preset or inconsistent overrides raise ValueError here

    def physics(self) -> Bb84Params:
        base = preset(self.preset).params
        try:
            return base.with_(**dict(self.overrides))
        except TypeError as exc:
            raise ValueError(f"unknown bb84 parameter: {exc}") from None


@dataclass(frozen=True, slots=True)
class ClaimedBlock:
    """One block to compute: a pure function of these fields."""

    index: int
    pulses: int
    link_seconds: float
    phys: Bb84Params
    post: PostParams
    rng: np.random.Generator
    generation: int = 0  # flush generation at claim time: a later flush drops its key

    def __repr__(self) -> str:
        return f"ClaimedBlock(index={self.index}, pulses={self.pulses})"


def compute_block(claim: ClaimedBlock) -> BlockResult:
    """Quantum phase and post-processing of one claimed block (no shared state touched)."""
    raw = draw_block(claim.phys, claim.pulses, claim.rng)
    return process_block(raw, claim.phys, claim.post, claim.rng)


@dataclass(frozen=True, slots=True)
class _Stat:
    link_seconds: float
    sifted_z: int
    secret_bits: int
    qber_x: float
    ec_efficiency: float
    leak_ec: int
    outcome: str  # "key", "abort", "discarded"


def _is_security_abort(res: BlockResult) -> bool:
    """No key for a reason found in the estimate: QBER threshold or finite length <= 0."""
    return res.abort_reason.startswith(("QBER", "finite-key", "no sifted"))


class Bb84Link:
    """The two KMEs' key pools, filled block by block from the BB84 pipeline."""

    def __init__(self, params: Any, now: float, rng: np.random.Generator | None = None) -> None:
        settings: Bb84Settings | None = params.bb84
        if settings is None:
            raise ValueError("the bb84 link model needs [link.bb84] settings")
        self.params = params
        self.settings = settings
        self._rng = rng if rng is not None else np.random.default_rng(settings.seed)
        self.phys = settings.physics()
        self.post = PostParams(settings.eps_sec, settings.eps_cor, params.qber_abort_threshold)
        self.up = True
        # False when a driver (the simulator's ticker) claims and absorbs blocks: then reading
        # the pools or the snapshot never runs a block inline
        self.auto_advance = True
        self._last = now
        self._pulse_credit = 0.0
        self._pool_a = bytearray()
        self._pool_b = bytearray()
        self._stats: deque[_Stat] = deque(maxlen=STATS_WINDOW_BLOCKS)
        self._next_index = 0
        self._pending: list[ClaimedBlock] = []
        self._generation = 0  # + 1 on every flush
        self.blocks = 0
        self.aborts = 0
        self.blocks_discarded = 0  # verification mismatch
        self.blocks_skipped = 0  # link time not simulated (CPU starved)
        self.bits_generated = 0  # handed out
        self.bits_overflow = 0  # distilled while the pools were full (dropped)
        self.bits_flushed = 0  # distilled from blocks claimed before a flush (dropped)
        self.last_abort_reason = ""
        self.last_qber: float | None = None
        self.last_seconds: dict[str, float] = {}
        self._block_pulses = self._compute_block_pulses()
        need = params.initial_keys * params.key_size
        for _ in range(PRECOMPUTE_MAX_BLOCKS):
            if len(self._pool_a) * 8 >= need:
                break
            claim = self._claim_one(count_time=False)
            self.absorb(claim, compute_block(claim))

    # --- configuration ------------------------------------------------------------------------

    def _compute_block_pulses(self) -> int:
        quiet = self.phys.with_(eve_ir_fraction=0.0, eve_pns_fraction=0.0)
        return pulses_for_sifted_z(quiet, self.settings.block_sifted_bits)

    @property
    def block_pulses(self) -> int:
        return self._block_pulses

    @property
    def block_seconds(self) -> float:
        return self._block_pulses / self.phys.pulse_rate_hz

    @property
    def capacity_bits(self) -> int:
        return int(self.params.max_key_count * self.params.key_size)

    @property
    def eavesdropper(self) -> bool:
        return self.phys.eve_ir_fraction > 0 or self.phys.eve_pns_fraction > 0

    @property
    def aborted(self) -> bool:
        """The most recent block gave no key for a reason in its estimate."""
        return bool(self._stats) and self._stats[-1].outcome == "abort"

    # --- the three steps ----------------------------------------------------------------------

    def _claim_one(self, count_time: bool = True) -> ClaimedBlock:
        seed = int(self._rng.integers(0, 2**63 - 1))
        claim = ClaimedBlock(
            index=self._next_index,
            pulses=self._block_pulses,
            link_seconds=self.block_seconds,
            phys=self.phys,
            post=self.post,
            rng=np.random.default_rng(seed),
            generation=self._generation,
        )
        self._next_index += 1
        if count_time:
            self._pulse_credit -= self._block_pulses
        return claim

    def claim(self, now: float) -> list[ClaimedBlock]:
        """Consume link time up to ``now``; the blocks now due (a clock going back: none)."""
        dt = now - self._last
        if dt <= 0:
            return []
        self._last = now
        if not self.up:
            return []
        self._pulse_credit += dt * self.phys.pulse_rate_hz
        due = int(self._pulse_credit // self._block_pulses)
        out = [self._claim_one() for _ in range(min(due, self.settings.max_blocks_per_advance))]
        if due > len(out):
            self.blocks_skipped += due - len(out)
            self._pulse_credit -= (due - len(out)) * self._block_pulses
        return out

    def absorb(self, claim: ClaimedBlock, res: BlockResult) -> None:
        """Record one computed block; its keys go to the pools (up to their capacity)."""
        self.blocks += 1
        self.last_qber = res.qber_x if res.sifted_x else None
        self.last_seconds = dict(res.seconds)
        if res.secret_bits:
            outcome = "key"
            self.last_abort_reason = ""
            flushed = claim.generation != self._generation
            room = 0 if flushed else max(0, self.capacity_bits - len(self._pool_a) * 8) // 8
            ka, kb = np.packbits(res.key_a).tobytes(), np.packbits(res.key_b).tobytes()
            self._pool_a += ka[:room]
            self._pool_b += kb[:room]
            dropped = (len(ka) - min(room, len(ka))) * 8
            if flushed:
                self.bits_flushed += dropped
            else:
                self.bits_overflow += dropped
        elif _is_security_abort(res):
            outcome = "abort"
            self.aborts += 1
            self.last_abort_reason = res.abort_reason
        else:
            outcome = "discarded"
            self.blocks_discarded += 1
            self.last_abort_reason = res.abort_reason
        self._stats.append(
            _Stat(
                link_seconds=claim.link_seconds,
                sifted_z=res.sifted_z,
                secret_bits=res.secret_bits,
                qber_x=res.qber_x,
                ec_efficiency=res.ec_efficiency,
                leak_ec=res.leak_ec,
                outcome=outcome,
            )
        )

    def _claim_all(self, now: float) -> None:
        self._pending.extend(self.claim(now))

    def drain_pending(self) -> list[ClaimedBlock]:
        """Blocks claimed by :meth:`set` for the driver to compute (then :meth:`absorb`)."""
        out, self._pending = self._pending, []
        return out

    def advance(self, now: float) -> None:
        """Run every block due by ``now`` inline (claim, compute, absorb)."""
        for c in self.claim(now):
            self.absorb(c, compute_block(c))

    # --- the pools ----------------------------------------------------------------------------

    def available_bits(self, now: float) -> int:
        if self.auto_advance:
            self.advance(now)
        return len(self._pool_a) * 8

    def stored_key_count(self, now: float) -> int:
        return self.available_bits(now) // int(self.params.key_size)

    def reason(self) -> str:
        if not self.up:
            return "QKD link is down"
        if self.aborted:
            return f"QKD link aborted: {self.last_abort_reason}"
        return "keys are exhausted"

    def take_pairs(self, now: float, number: int, size_bits: int) -> list[tuple[bytes, bytes]]:
        """``number`` keys of ``size_bits``: (KME A's copy, KME B's copy) from the two pools."""
        if number < 1 or size_bits < 8 or size_bits % 8:
            raise ValueError("number >= 1 and size a positive multiple of 8")
        if self.available_bits(now) < number * size_bits:
            raise LinkExhausted(self.reason())
        n = size_bits // 8
        out = []
        for i in range(number):
            a = bytes(self._pool_a[i * n : (i + 1) * n])
            b = bytes(self._pool_b[i * n : (i + 1) * n])
            out.append((a, b))
        if any(a != b for a, b in out):
            # never hand out unequal keys; drop both pools (their alignment is lost)
            self._pool_a.clear()
            self._pool_b.clear()
            raise Bb84LinkError("the pipeline gave KME A and KME B different keys")
        del self._pool_a[: number * n]
        del self._pool_b[: number * n]
        self.bits_generated += number * size_bits
        return out

    def take(self, now: float, number: int, size_bits: int) -> list[bytes]:
        return [a for a, _ in self.take_pairs(now, number, size_bits)]

    # --- admin --------------------------------------------------------------------------------

    def set(
        self,
        now: float,
        *,
        up: bool | None = None,
        eavesdropper: bool | None = None,
        flush: bool = False,
        eve_ir_fraction: float | None = None,
        eve_pns_fraction: float | None = None,
        distance_km: float | None = None,
        qber: float | None = None,
        rate_bps: float | None = None,
    ) -> None:
        """Change the link at run time. Blocks due before ``now`` use the old state."""
        if qber is not None or rate_bps is not None:
            raise ValueError(
                "qber and rate_bps belong to the rate model; the bb84 model derives them "
                "(change distance_km, eve_ir_fraction or eve_pns_fraction)"
            )
        changes: dict[str, float] = {}
        if eavesdropper is not None:
            changes["eve_ir_fraction"] = 1.0 if eavesdropper else 0.0
            if not eavesdropper:
                changes["eve_pns_fraction"] = 0.0
        if eve_ir_fraction is not None:
            changes["eve_ir_fraction"] = float(eve_ir_fraction)
        if eve_pns_fraction is not None:
            changes["eve_pns_fraction"] = float(eve_pns_fraction)
        if distance_km is not None:
            changes["distance_km"] = float(distance_km)
        phys = replace(self.phys, **changes) if changes else self.phys  # validates
        if self.auto_advance:
            self.advance(now)
        else:
            self._claim_all(now)  # blocks due before the change keep the old state
        self.phys = phys
        if distance_km is not None:
            self._block_pulses = self._compute_block_pulses()
        if up is not None:
            self.up = up
        if flush:  # also the key of blocks claimed but not yet absorbed
            self._pool_a.clear()
            self._pool_b.clear()
            self._generation += 1

    # --- views --------------------------------------------------------------------------------

    def window(self) -> dict[str, Any]:
        """Rates over the last blocks (link time), EC efficiency and PA ratio of keyed blocks."""
        st = list(self._stats)
        secs = sum(s.link_seconds for s in st)
        keyed = [s for s in st if s.outcome == "key"]
        sifted = sum(s.sifted_z for s in keyed)
        effs = [s.ec_efficiency for s in keyed if math.isfinite(s.ec_efficiency)]
        return {
            "sifted_bps": sum(s.sifted_z for s in st) / secs if secs else 0.0,
            "secret_bps": sum(s.secret_bits for s in st) / secs if secs else 0.0,
            "ec_efficiency": sum(effs) / len(effs) if effs else None,
            "pa_ratio": sum(s.secret_bits for s in keyed) / sifted if sifted else None,
        }

    def snapshot(self, now: float) -> dict[str, Any]:
        """A JSON-ready view for status_extension and the admin endpoint (no key bytes)."""
        if self.auto_advance:
            self.advance(now)
        w = self.window()
        p = self.phys

        def r(x: float | None, nd: int = 6) -> float | None:
            return None if x is None else round(x, nd)

        bits = len(self._pool_a) * 8
        return {
            "model": "bb84",
            "preset": self.settings.preset,
            "link_up": self.up,
            "eavesdropper": self.eavesdropper,
            "eve_ir_fraction": p.eve_ir_fraction,
            "eve_pns_fraction": p.eve_pns_fraction,
            "distance_km": p.distance_km,
            "pulse_rate_hz": p.pulse_rate_hz,
            "qber": r(self.last_qber),
            "qber_abort_threshold": self.params.qber_abort_threshold,
            "aborted": self.aborted,
            "abort_reason": self.last_abort_reason,
            "sifted_bps": r(w["sifted_bps"], 3),
            "secret_bps": r(w["secret_bps"], 3),
            "rate_bps": r(w["secret_bps"], 3),
            "ec_efficiency": r(w["ec_efficiency"], 4),
            "pa_ratio": r(w["pa_ratio"], 6),
            "block_sifted_bits": self.settings.block_sifted_bits,
            "block_seconds": round(self.block_seconds, 6),
            "blocks": self.blocks,
            "aborts": self.aborts,
            "blocks_discarded": self.blocks_discarded,
            "blocks_skipped": self.blocks_skipped,
            "available_bits": bits,
            "stored_key_count": bits // self.params.key_size,
            "bits_generated": self.bits_generated,
            "bits_overflow": self.bits_overflow,
            "bits_flushed": self.bits_flushed,
        }
