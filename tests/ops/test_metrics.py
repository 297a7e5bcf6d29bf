from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import KeyExhausted, KmeBadAnswer, KmeUnavailable
from gateway.metrics import MAX_LABEL_VALUES, Metrics, kme_error_kind


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def samples(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float:
    return samples(m)[(name, frozenset(labels.items()))]


def test_every_family_has_help_and_qgw_prefix() -> None:
    m = Metrics(site_id="site-a")
    fams = list(text_string_to_metric_families(m.render().decode()))
    names = {f.name for f in fams}
    expected = {
        "qgw_build_info",
        "qgw_session_state",
        "qgw_session_epoch",
        "qgw_session_epoch_age_seconds",
        "qgw_peer_connected",
        "qgw_handshakes",
        "qgw_rekeys",
        "qgw_qkd_keys",
        "qgw_qkd_key_bits",
        "qgw_kme_request_seconds",
        "qgw_kme_errors",
        "qgw_qkd_mode_in_effect",
        "qgw_qkd_alarm",
        "qgw_messages",
        "qgw_messages_dropped",
        "qgw_inflight_messages",
        "qgw_inflight_limit_messages",
        "qgw_record_auth_failures",
        "qgw_records",
        "qgw_bytes",
    }
    assert expected <= names, expected - names
    for f in fams:
        assert f.name.startswith("qgw_")
        assert f.documentation, f.name
    assert value(m, "qgw_build_info", version="0.1.0", site="site-a") == 1


def test_two_instances_do_not_share_state() -> None:
    a, b = Metrics(), Metrics()
    a.record_auth_failure()
    a.record_auth_failure()
    assert value(a, "qgw_record_auth_failures_total") == 2
    assert value(b, "qgw_record_auth_failures_total") == 0


def test_counters_move() -> None:
    m = Metrics(rules=["0", "sensors/#"])
    assert value(m, "qgw_messages_total", rule="0", direction="out", result="forwarded") == 0
    m.handshake("ok")
    m.handshake("failed", "AuthenticationError")
    m.handshake("failed", "AuthenticationError")
    m.rekey("ok")
    m.qkd_key("enc", 256)
    m.qkd_key("enc", 256)
    m.qkd_key("dec", 512)
    m.message("0", "out", "forwarded")
    m.message("0", "out", "forwarded")
    m.message("sensors/#", "in", "delivered")
    m.message("0", "out", "dropped", "too_large")
    m.records("sent", 3, 300)
    m.records("received", 1, 10)
    m.set_inflight(7, limit=256)
    m.set_peer_connected(True)
    assert value(m, "qgw_handshakes_total", result="ok", reason="ok") == 1
    assert value(m, "qgw_handshakes_total", result="failed", reason="AuthenticationError") == 2
    assert value(m, "qgw_rekeys_total", result="ok") == 1
    assert value(m, "qgw_rekeys_total", result="failed") == 0
    assert value(m, "qgw_qkd_keys_total", role="enc") == 2
    assert value(m, "qgw_qkd_keys_total", role="dec") == 1
    assert value(m, "qgw_qkd_key_bits_total", role="enc") == 512
    assert value(m, "qgw_qkd_key_bits_total", role="dec") == 512
    assert value(m, "qgw_messages_total", rule="0", direction="out", result="forwarded") == 2
    assert value(m, "qgw_messages_total", rule="sensors/#", direction="in", result="delivered") == 1
    assert value(m, "qgw_messages_total", rule="0", direction="out", result="dropped") == 1
    assert (
        value(m, "qgw_messages_dropped_total", rule="0", direction="out", reason="too_large") == 1
    )
    assert value(m, "qgw_records_total", direction="sent") == 3
    assert value(m, "qgw_bytes_total", direction="sent") == 300
    assert value(m, "qgw_bytes_total", direction="received") == 10
    assert value(m, "qgw_inflight_messages") == 7
    assert value(m, "qgw_inflight_limit_messages") == 256
    assert value(m, "qgw_peer_connected") == 1


def test_kme_histogram_and_errors() -> None:
    m = Metrics()
    m.kme_request("enc_keys", 0.003)
    m.kme_request("enc_keys", 0.2, kme_error_kind(KmeUnavailable("down")))
    m.kme_request("dec_keys", 0.001, "exhausted")
    assert value(m, "qgw_kme_request_seconds_count", operation="enc_keys") == 2
    assert value(m, "qgw_kme_request_seconds_sum", operation="enc_keys") == pytest.approx(0.203)
    assert value(m, "qgw_kme_request_seconds_bucket", operation="enc_keys", le="0.005") == 1
    assert value(m, "qgw_kme_errors_total", kind="unavailable") == 1
    assert value(m, "qgw_kme_errors_total", kind="exhausted") == 1


def test_kme_error_kind_mapping() -> None:
    assert kme_error_kind(KeyExhausted("x")) == "exhausted"
    assert kme_error_kind(KmeBadAnswer("x")) == "bad_answer"
    assert kme_error_kind(TimeoutError()) == "timeout"
    assert kme_error_kind(ValueError()) == "other"


def test_session_state_is_one_hot_and_epoch_age_from_clock() -> None:
    clock = FakeClock()
    m = Metrics(clock=clock)
    assert value(m, "qgw_session_state", state="down") == 1
    assert math.isnan(value(m, "qgw_session_epoch_age_seconds"))
    m.set_session("established", epoch=1, now=clock())
    clock.t += 42
    s = samples(m)
    states = {dict(k[1])["state"]: v for k, v in s.items() if k[0] == "qgw_session_state"}
    assert states["established"] == 1
    assert sum(states.values()) == 1
    assert s[("qgw_session_epoch", frozenset())] == 1
    assert s[("qgw_session_epoch_age_seconds", frozenset())] == 42
    m.set_session("rekeying")
    assert value(m, "qgw_session_epoch_age_seconds") == 42  # same epoch, age continues
    m.set_session("established", epoch=2)  # default now = clock
    clock.t += 5
    assert value(m, "qgw_session_epoch") == 2
    assert value(m, "qgw_session_epoch_age_seconds") == 5
    m.set_session("down")
    assert value(m, "qgw_session_epoch") == 0
    assert math.isnan(value(m, "qgw_session_epoch_age_seconds"))
    assert value(m, "qgw_session_state", state="established") == 0


def test_qkd_mode_and_alarm() -> None:
    m = Metrics()
    m.set_qkd_mode("required")
    assert value(m, "qgw_qkd_mode_in_effect", mode="required") == 1
    m.set_qkd_mode("pqc-only")
    assert value(m, "qgw_qkd_mode_in_effect", mode="required") == 0
    assert value(m, "qgw_qkd_mode_in_effect", mode="pqc-only") == 1
    assert value(m, "qgw_qkd_alarm", reason="qkd_unavailable") == 0
    m.set_alarm("qkd_unavailable", True)
    assert value(m, "qgw_qkd_alarm", reason="qkd_unavailable") == 1
    m.set_alarm("qkd_unavailable", False)
    assert value(m, "qgw_qkd_alarm", reason="qkd_unavailable") == 0


def test_label_cardinality_is_bounded() -> None:
    m = Metrics(rules=["0"])  # declared rules keep their label
    for i in range(MAX_LABEL_VALUES * 3):
        m.message(f"sensors/{i}", "out", "forwarded")  # a runtime bug: topics as rule names
        m.handshake("failed", f"reason{i}")
    m.message("0", "sideways", "teleported")  # unknown fixed-vocabulary values
    m.set_session("weird")
    s = samples(m)
    rules = {dict(k[1])["rule"] for k in s if k[0] == "qgw_messages_total"}
    assert len(rules) <= MAX_LABEL_VALUES + 1
    assert "other" in rules
    reasons = {dict(k[1])["reason"] for k in s if k[0] == "qgw_handshakes_total"}
    assert len(reasons) <= MAX_LABEL_VALUES + 1
    assert value(m, "qgw_messages_total", rule="other", direction="out", result="forwarded") > 0
    assert value(m, "qgw_messages_total", rule="0", direction="other", result="other") == 1
    assert value(m, "qgw_session_state", state="down") == 0
    assert m.session_state == "other"
    m.message("x" * 500, "out", "forwarded")
    assert all(len(dict(k[1]).get("rule", "")) <= 64 for k in samples(m))


def test_readiness() -> None:
    clock = FakeClock()
    m = Metrics(clock=clock)
    ok, reason = m.readiness(240)
    assert not ok
    assert "down" in reason
    m.set_session("established", epoch=1)
    assert m.readiness(240) == (True, "ok")
    clock.t += 241
    ok, reason = m.readiness(240)
    assert not ok
    assert "stale" in reason
