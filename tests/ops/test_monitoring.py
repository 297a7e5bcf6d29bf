"""The shipped Prometheus alert rules and Grafana dashboard use only metrics the gateway exports.

promtool (Debian package ``prometheus``, installed by scripts/setup.sh) checks the rule file's
syntax and runs its unit tests; the name check needs no tool: it renders a real
:class:`gateway.metrics.Metrics` with every series set once and compares.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import ALARMS, Metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/qgw-alerts.yml"
RULE_TESTS = ROOT / "deploy/prometheus/qgw-alerts.test.yml"
DASHBOARD = ROOT / "deploy/grafana/qgw-dashboard.json"
NAME = re.compile(r"\bqgw_[a-z0-9_]+")


def exported_samples() -> set[str]:
    """Every sample name a gateway's /metrics carries once each code path ran."""
    m = Metrics(site_id="t", rules=["r"])
    m.set_session("established", 1, 0.0)
    m.set_peer("site-b", "127.0.0.1:7443")
    m.handshake("ok", "bootstrap")
    m.rekey("ok")
    m.qkd_key("enc", 256)
    m.kme_request("enc_keys", 0.01, "unavailable")
    m.set_kme_status(5)
    m.set_alarm("qkd_unavailable", True)
    m.message("r", "out", "dropped", "too_large")
    m.set_inflight(1, 8)
    m.bridge_event("decode_error")
    m.record_auth_failure()
    m.records("sent", 1, 10)
    m.set_broker_connected(True)
    m.set_certificate_expiry("bootstrap", 1e9)
    m.config_reload("ok")
    names: set[str] = set()
    for family in text_string_to_metric_families(m.render().decode()):
        names.update(s.name for s in family.samples)
    return names


def expressions_in_dashboard() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_is_valid_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "qgw-gateways"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for p in dash["panels"]:
        assert p["datasource"]["type"] == "prometheus"
        assert p["targets"], p["title"]


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_name_is_exported(source: str) -> None:
    text = RULES.read_text() if source == "rules" else "\n".join(expressions_in_dashboard())
    used = set(NAME.findall(text))
    assert used, "no qgw_* metric referenced"
    exported = exported_samples()
    missing = sorted(n for n in used if n not in exported)
    assert not missing, f"{source} use metrics the gateway does not export: {missing}"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool not found: scripts/setup.sh installs Debian's prometheus package"
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=60, check=False, cwd=RULES.parent
    )


def test_alert_rules_pass_promtool_check() -> None:
    r = promtool("check", "rules", RULES.name)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rules_unit_tests_pass() -> None:
    r = promtool("test", "rules", RULE_TESTS.name)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alarm_names_in_rules_are_the_gateways() -> None:
    """An alert on ``qgw_qkd_alarm{reason="X"}`` fires only if the gateway raises alarm X."""
    used = set(re.findall(r'qgw_qkd_alarm\{reason="([^"]+)"\}', RULES.read_text()))
    assert "broker-session-lost" in used  # issue 18 names this alarm
    assert used <= set(ALARMS), sorted(used - set(ALARMS))
