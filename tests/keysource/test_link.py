"""The QKD link model, driven by an explicit clock (no sleeping)."""

from __future__ import annotations

import pytest

from keysource.link import EVE_QBER, LinkExhausted, LinkParams, QkdLink, secret_fraction


def link(**kw: object) -> QkdLink:
    params = {"rate_bps": 1000.0, "key_size": 800, "max_key_count": 10, **kw}
    return QkdLink(LinkParams(**params), now=0.0, rng=lambda n: b"\x01" * n)  # type: ignore[arg-type]


def test_accrues_at_rate_up_to_capacity_and_ignores_clock_going_back() -> None:
    ln = link(key_size=1000)  # 1000 bits
    assert ln.stored_key_count(0.0) == 0
    assert ln.available_bits(2.5) == 2500
    assert ln.available_bits(1.0) == 2500  # clock back: nothing happens
    assert ln.stored_key_count(1000.0) == 10  # capped at max_key_count


def test_take_consumes_bits_and_refuses_when_short() -> None:
    ln = link(key_size=800)
    ln.advance(8.0)  # 8000 bits
    keys = ln.take(8.0, 3, 256)
    assert [len(k) for k in keys] == [32, 32, 32]
    assert ln.available_bits(8.0) == 8000 - 768
    with pytest.raises(LinkExhausted, match="exhausted"):
        ln.take(8.0, 100, 256)
    assert ln.available_bits(8.0) == 8000 - 768  # a refused request takes nothing


def test_eavesdropper_aborts_and_stops_accrual_and_says_why() -> None:
    ln = link(key_size=800)
    ln.set(1.0, eavesdropper=True)
    assert ln.effective_qber == EVE_QBER
    assert ln.aborted
    assert ln.aborts == 1
    bits = ln.available_bits(1.0)
    assert ln.available_bits(1000.0) == bits  # no accrual while aborted
    with pytest.raises(LinkExhausted, match="aborted"):
        ln.take(1000.0, bits // 8 + 1, 8)
    ln.set(1000.0, eavesdropper=False)
    assert ln.available_bits(1001.0) == bits + 1000


def test_qber_scales_rate_by_secret_fraction_and_aborts_above_threshold() -> None:
    ln = link(qber=0.02)
    ln.set(0.0, qber=0.05)
    expected = 1000.0 * secret_fraction(0.05) / secret_fraction(0.02)
    assert ln.current_rate_bps == pytest.approx(expected)
    assert 0 < expected < 1000
    ln.set(0.0, qber=0.12)
    assert ln.aborted
    assert ln.current_rate_bps == 0.0


def test_link_down_and_flush() -> None:
    ln = link(key_size=800)
    ln.advance(5.0)
    ln.set(5.0, up=False)
    assert ln.available_bits(50.0) == 5000
    with pytest.raises(LinkExhausted, match="down"):
        ln.take(50.0, 1, 8000)
    ln.set(50.0, flush=True)
    assert ln.available_bits(50.0) == 0
    ln.set(50.0, up=True)
    assert ln.available_bits(51.0) == 1000


def test_snapshot_has_no_key_material_and_reports_state() -> None:
    ln = link()
    snap = ln.snapshot(3.0)
    assert snap["available_bits"] == 3000
    assert snap["link_up"] is True
    assert set(snap) >= {"qber", "aborted", "rate_bps", "stored_key_count"}


@pytest.mark.parametrize(
    "bad",
    [
        {"key_size": 12},
        {"min_key_size": 512, "key_size": 256},
        {"qber": 0.2},
        {"qber": 0.06, "qber_abort_threshold": 0.05},
        {"max_key_count": 0},
        {"initial_keys": 11, "max_key_count": 10},
        {"rate_bps": -1.0},
    ],
)
def test_bad_params(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- each case has its own message
        LinkParams(**bad)  # type: ignore[arg-type]
