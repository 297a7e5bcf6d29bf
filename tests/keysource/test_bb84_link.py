"""The ``bb84`` link model: the pools both KMEs serve are the BB84 pipeline's output.

Sans-I/O tests drive the clock by hand; the ETSI 014 tests run the simulator's HTTP apps over
mutual TLS in this process (so that a test can break a pipeline stage and watch the key
delivery fail end to end).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from gateway.errors import ConfigError, KeyExhausted
from keysource import bb84_post
from keysource.bb84_link import Bb84Link, Bb84LinkError, Bb84Settings, compute_block
from keysource.bb84_physics import draw_block
from keysource.bb84_post import process_block
from keysource.etsi014 import Etsi014Client
from keysource.kme_config import kme_config_from_dict, load_kme_config
from keysource.link import LinkExhausted, LinkParams, make_link
from keysource.simulator import SimulatorRunner
from keysource.tls import client_context
from tests.keysource.harness import FAST_RETRY, FakeClock
from tests.support.kme import write_kme_setup

pytestmark = pytest.mark.timeout(120)

# A short metro link with a 10 MHz clock and small blocks: ~0.33 s of link time and ~0.1 s of
# CPU per block, a few thousand secret bits each.
FAST = {
    "preset": "metro",
    "distance_km": 10.0,
    "pulse_rate_hz": 1e7,
    "p_z": 0.5,
    "block_sifted_bits": 1 << 15,
}


def settings(seed: int = 7, **kw: Any) -> Bb84Settings:
    base = {**FAST, **kw}
    physics = {k: float(v) for k, v in base.items() if k not in ("preset", "block_sifted_bits")}
    return Bb84Settings(
        preset=str(base["preset"]),
        overrides=tuple(physics.items()),
        block_sifted_bits=int(base["block_sifted_bits"]),
        seed=seed,
    )


def params(seed: int = 7, initial_keys: int = 0, **kw: Any) -> LinkParams:
    return LinkParams(
        model="bb84",
        bb84=settings(seed, **kw),
        key_size=256,
        max_key_count=200,
        max_key_per_request=16,
        initial_keys=initial_keys,
    )


def new_link(seed: int = 7, **kw: Any) -> Bb84Link:
    ln = make_link(params(seed, **kw), now=0.0)
    assert isinstance(ln, Bb84Link)
    return ln


def test_served_keys_are_the_privacy_amplification_output_of_each_block() -> None:
    ln = new_link(seed=11)
    ln.advance(ln.block_seconds * 2.5)  # two blocks due
    assert ln.blocks == 2
    # the same two blocks, recomputed here from the documented seeding
    rng = np.random.default_rng(11)
    expect_a, expect_b = b"", b""
    for _ in range(2):
        child = np.random.default_rng(int(rng.integers(0, 2**63 - 1)))
        raw = draw_block(ln.phys, ln.block_pulses, child)
        res = process_block(raw, ln.phys, ln.post, child)
        assert res.secret_bits > 0
        assert res.verified
        expect_a += np.packbits(res.key_a).tobytes()
        expect_b += np.packbits(res.key_b).tobytes()
    assert expect_a == expect_b
    n = len(expect_a) // 32
    pairs = ln.take_pairs(ln.block_seconds * 2.5, n, 256)
    assert b"".join(a for a, _ in pairs) == expect_a[: n * 32]
    assert all(a == b for a, b in pairs)
    snap = ln.snapshot(ln.block_seconds * 2.5)
    assert snap["model"] == "bb84"
    assert snap["blocks"] == 2
    assert snap["aborts"] == 0
    assert 0.005 < snap["qber"] < 0.03  # metro e_det 1.5 %
    assert snap["secret_bps"] > 0
    assert snap["sifted_bps"] > snap["secret_bps"]
    assert 1.0 < snap["ec_efficiency"] < 1.6
    assert 0 < snap["pa_ratio"] < 1
    assert snap["bits_generated"] == n * 256
    assert "key" not in json.dumps(snap).replace("key_", "")  # no key material, only counts


def test_intercept_resend_aborts_from_the_estimate_and_keeps_old_key() -> None:
    ln = new_link()
    ln.advance(ln.block_seconds * 1.01)
    before = ln.available_bits(ln.block_seconds * 1.01)
    assert before > 0
    assert not ln.aborted
    t = ln.block_seconds * 1.01
    ln.set(t, eavesdropper=True)
    assert not ln.aborted  # no flag: only the next block's estimate can abort
    ln.advance(t + ln.block_seconds)
    snap = ln.snapshot(t + ln.block_seconds)
    assert snap["aborted"]
    assert snap["aborts"] == 1
    assert snap["qber"] > 0.2  # intercept-resend on every pulse: QBER -> 25 %
    assert "QBER" in snap["abort_reason"]
    assert snap["available_bits"] == before  # key distilled before the abort stays usable
    ln.set(t + ln.block_seconds, eavesdropper=False)
    ln.advance(t + 2 * ln.block_seconds)
    assert not ln.aborted
    assert ln.available_bits(t + 2 * ln.block_seconds) > before


def test_pns_attack_is_denied_key_by_the_decoy_bound() -> None:
    ln = new_link(distance_km=50.0, block_sifted_bits=1 << 16)
    ln.advance(ln.block_seconds * 1.01)
    assert ln.snapshot(ln.block_seconds * 1.01)["available_bits"] > 0  # key without Eve
    ln.set(ln.block_seconds * 1.01, flush=True, eve_pns_fraction=1.0)
    ln.advance(ln.block_seconds * 2.02)
    snap = ln.snapshot(ln.block_seconds * 2.02)
    assert snap["qber"] < 0.05  # the QBER alone would not notice
    assert snap["aborted"]
    assert "finite-key length" in snap["abort_reason"]
    assert snap["available_bits"] == 0


def test_broken_error_correction_yields_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_correction(alice: Any, bob: Any, q: float, rng: Any) -> bb84_post.EcResult:
        return bb84_post.EcResult(bob.copy(), 100, 0, 1)

    monkeypatch.setattr(bb84_post, "cascade", no_correction)
    ln = new_link()
    ln.advance(ln.block_seconds * 2.01)
    assert ln.blocks == 2
    assert ln.blocks_discarded == 2
    with pytest.raises(LinkExhausted):
        ln.take_pairs(ln.block_seconds * 2.01, 1, 256)


def break_bobs_privacy_amplification(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bob's side of PA uses a different output bit 0 (tags are left alone)."""
    real = bb84_post.toeplitz_hash
    calls = {"n": 0}

    def flipped(x: Any, seed: Any, m: int) -> Any:
        out = real(x, seed, m)
        if m > 64:  # PA, not the verification tag
            calls["n"] += 1
            if calls["n"] % 2 == 0:  # the second PA call of a block is Bob's
                out = out.copy()
                out[0] ^= 1
        return out

    monkeypatch.setattr(bb84_post, "toeplitz_hash", flipped)


def test_unequal_pools_are_never_served(monkeypatch: pytest.MonkeyPatch) -> None:
    break_bobs_privacy_amplification(monkeypatch)
    ln = new_link()
    ln.advance(ln.block_seconds * 1.01)
    assert ln.available_bits(ln.block_seconds * 1.01) > 0
    with pytest.raises(Bb84LinkError):
        ln.take_pairs(ln.block_seconds * 1.01, 1, 256)
    assert ln.available_bits(ln.block_seconds * 1.01) == 0  # both pools dropped


def test_down_link_and_clock_going_back_run_no_blocks_and_starvation_is_counted() -> None:
    ln = new_link()
    ln.set(0.0, up=False)
    ln.advance(100 * ln.block_seconds)
    assert ln.blocks == 0
    assert ln.reason() == "QKD link is down"
    ln.set(100 * ln.block_seconds, up=True)
    ln.advance(50 * ln.block_seconds)  # back in time
    assert ln.blocks == 0
    ln.advance(100 * ln.block_seconds + 20.5 * ln.block_seconds)  # 20 due, 8 run
    assert ln.blocks == ln.settings.max_blocks_per_advance
    assert ln.blocks_skipped == 20 - ln.settings.max_blocks_per_advance


def test_flush_also_drops_the_key_of_blocks_still_being_computed() -> None:
    ln = new_link()
    ln.auto_advance = False  # as under the simulator's ticker
    (claim,) = ln.claim(ln.block_seconds * 1.01)
    res = compute_block(claim)  # "in the worker thread"
    ln.set(ln.block_seconds * 1.01, flush=True, eavesdropper=True)
    ln.absorb(claim, res)
    assert res.secret_bits > 0
    assert ln.available_bits(ln.block_seconds * 1.01) == 0
    assert ln.snapshot(ln.block_seconds * 1.01)["bits_flushed"] == res.secret_bits
    (later,) = ln.drain_pending() or ln.claim(ln.block_seconds * 2.02)
    ln.absorb(later, compute_block(later))
    assert ln.aborted  # claimed after the change: Eve's block


def test_initial_keys_are_precomputed_by_the_pipeline() -> None:
    ln = make_link(params(initial_keys=20), now=0.0)
    assert isinstance(ln, Bb84Link)
    assert ln.stored_key_count(0.0) >= 20
    assert ln.blocks >= 1


def test_admin_refuses_rate_model_fields_and_bad_values() -> None:
    ln = new_link()
    with pytest.raises(ValueError, match="rate model"):
        ln.set(0.0, qber=0.05)
    with pytest.raises(ValueError, match="eve_ir_fraction"):
        ln.set(0.0, eve_ir_fraction=1.5)
    rate = make_link(LinkParams(), now=0.0)
    with pytest.raises(ValueError, match="bb84"):
        rate.set(0.0, eve_ir_fraction=0.5)


# --- kme.toml -----------------------------------------------------------------------------


def bb84_toml(setup_path: Path, extra: str = "") -> Path:
    text = setup_path.read_text()
    assert 'model = "rate"' in text
    text = text.replace('model = "rate"', 'model = "bb84"', 1)
    text += "\n[link.bb84]\n" + "\n".join(
        f"{k} = {json.dumps(v)}" for k, v in {**FAST, "seed": 5}.items()
    )
    setup_path.write_text(text + "\n" + extra)
    return setup_path


def test_kme_toml_bb84_keys(tmp_path: Path) -> None:
    setup = write_kme_setup(tmp_path, zero_ports=True)
    cfg = load_kme_config(bb84_toml(setup.config_path))
    p = cfg.link.params()
    assert p.model == "bb84"
    assert p.bb84 is not None
    phys = p.bb84.physics()
    assert (phys.distance_km, phys.pulse_rate_hz, phys.p_z) == (10.0, 1e7, 0.5)
    assert phys.eta_bob == 0.2  # from the metro preset
    data = cfg.model_dump(mode="json")
    for bad, where in [
        ({"preset": "nope"}, "link.bb84.preset"),
        ({"colour": 1}, "link.bb84.colour"),
        ({"eve_ir_fraction": 2}, "link.bb84.eve_ir_fraction"),
        ({"mu": 0.1, "nu": 0.2}, "link"),  # mu must exceed nu + omega
    ]:
        d = json.loads(json.dumps(data))
        d["link"]["bb84"].update(bad)
        with pytest.raises(ConfigError) as exc:
            kme_config_from_dict(d, tmp_path)
        assert any(k.startswith(where) for k, _ in exc.value.problems), exc.value.problems


# --- ETSI 014 end to end ----------------------------------------------------------------------


@pytest.fixture
def bb84_setup(tmp_path: Path) -> Iterator[Any]:
    setup = write_kme_setup(tmp_path, {"max_key_count": 200, "initial_keys": 0}, zero_ports=True)
    bb84_toml(setup.config_path)
    return replace(setup, config=load_kme_config(setup.config_path))


async def wait_blocks(link: Bb84Link, n: int) -> None:
    """The simulator's ticker runs blocks in a worker thread: wait (bounded) for ``n``."""
    async with asyncio.timeout(30):
        while link.blocks < n:
            await asyncio.sleep(0.02)


async def etsi_round(setup: Any, runner: SimulatorRunner) -> tuple[bytes, bytes]:
    ctx_a = client_context(*setup.sae("sae-a"), setup.ca)
    ctx_b = client_context(*setup.sae("sae-b"), setup.ca)
    a = Etsi014Client(
        f"https://127.0.0.1:{runner.endpoints['A'].api[1]}", "sae-a", ctx_a, retry=FAST_RETRY
    )
    b = Etsi014Client(
        f"https://127.0.0.1:{runner.endpoints['B'].api[1]}", "sae-b", ctx_b, retry=FAST_RETRY
    )
    try:
        (ka,) = await a.enc_keys("sae-b", 1, 256)
        (kb,) = await b.dec_keys("sae-a", [ka.key_id])
        return ka.key.expose_secret_bytes(), kb.key.expose_secret_bytes()
    finally:
        await a.aclose()
        await b.aclose()


async def test_etsi014_keys_come_from_the_pipeline(bb84_setup: Any) -> None:
    clock = FakeClock()
    runner = SimulatorRunner(bb84_setup.config, "both", clock)
    await runner.start()
    try:
        link = runner.link
        assert isinstance(link, Bb84Link)
        clock.t += link.block_seconds * 1.01
        await wait_blocks(link, 1)
        # the same block, computed here: the first 32 bytes of its PA output are the key
        twin = make_link(bb84_setup.config.link.params(), 0.0)
        assert isinstance(twin, Bb84Link)
        (claim,) = twin.claim(twin.block_seconds * 1.01)
        res = compute_block(claim)
        expected = np.packbits(res.key_a).tobytes()[:32]
        ka, kb = await etsi_round(bb84_setup, runner)
        assert ka == kb == expected
        st = await link_status(bb84_setup, runner)
        ext = st["qgw_simulator"]
        assert ext["model"] == "bb84"
        assert ext["blocks"] == 1
        assert ext["distance_km"] == 10.0
        assert ext["secret_bps"] > 0
        assert ext["qber"] is not None
    finally:
        await runner.stop()


async def link_status(setup: Any, runner: SimulatorRunner) -> dict[str, Any]:
    ctx = client_context(*setup.sae("sae-a"), setup.ca)
    c = Etsi014Client(f"https://127.0.0.1:{runner.endpoints['A'].api[1]}", "sae-a", ctx)
    try:
        st = await c.status("sae-b")
    finally:
        await c.aclose()
    assert st.status_extension is not None
    return st.status_extension


@pytest.mark.parametrize("stage", ["error_correction", "privacy_amplification"])
async def test_etsi014_delivery_fails_when_a_pipeline_stage_is_broken(
    bb84_setup: Any, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    if stage == "error_correction":
        monkeypatch.setattr(
            bb84_post, "cascade", lambda a, b, q, rng: bb84_post.EcResult(b.copy(), 100, 0, 1)
        )
    else:
        break_bobs_privacy_amplification(monkeypatch)
    clock = FakeClock()
    runner = SimulatorRunner(bb84_setup.config, "both", clock)
    await runner.start()
    try:
        link = runner.link
        assert isinstance(link, Bb84Link)
        clock.t += link.block_seconds * 1.01
        await wait_blocks(link, 1)
        with pytest.raises(KeyExhausted):
            await etsi_round(bb84_setup, runner)
    finally:
        await runner.stop()


async def test_admin_endpoint_switches_the_eavesdropper_and_reports_the_abort(
    bb84_setup: Any,
) -> None:
    clock = FakeClock()
    runner = SimulatorRunner(bb84_setup.config, "both", clock)
    await runner.start()
    try:
        link = runner.link
        assert isinstance(link, Bb84Link)
        admin = f"http://127.0.0.1:{runner.endpoints['B'].admin[1]}"
        async with aiohttp.ClientSession() as s:
            async with s.post(admin + "/admin/link", json={"eve_ir_fraction": "x"}) as r:
                assert r.status == 400
            async with s.post(admin + "/admin/link", json={"eve_ir_fraction": 1.0}) as r:
                assert r.status == 200
                assert (await r.json())["link"]["eve_ir_fraction"] == 1.0
            clock.t += link.block_seconds * 1.01
            await wait_blocks(link, 1)
            async with s.get(admin + "/admin/state") as r:
                view = (await r.json())["link"]
        assert view["aborted"] is True
        assert view["aborts"] == 1
        assert view["qber"] > 0.2
        assert view["secret_bps"] == 0
        assert "QBER" in view["abort_reason"]
        ext = (await link_status(bb84_setup, runner))["qgw_simulator"]
        assert ext["aborted"] is True
        with pytest.raises(KeyExhausted, match="aborted"):
            await etsi_round(bb84_setup, runner)
    finally:
        await runner.stop()
