"""SIGHUP reloads credentials without dropping the live session; a bad config keeps the old one."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

from tests.conftest import run_qgw
from tests.support.sites import TwoSites, rule


def wait_log(s: TwoSites, site: str, text: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = s.gateway_log(site)
        if text in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"gateway {site} never logged {text!r}:\n{s.gateway_log(site)[-3000:]}")


def test_sighup_reloads_credentials_and_keeps_the_session(tmp_path: Path) -> None:
    rules = [rule("rl/#", "both")]
    with TwoSites(tmp_path, rules={"a": rules, "b": rules}) as s:
        s.start()
        sub = s.client("b", "rl-sub")
        sub.subscribe("rl/#")
        pub = s.client("a", "rl-pub")
        pub.publish("rl/0", b"before", qos=1)
        sub.wait_for(1)
        handshakes = s.metric("a", "qgw_handshakes_total", result="ok", reason="bootstrap")

        # 1. A config that does not load: logged, counted, the old one stays, nothing drops.
        cfg = s.site_config("a")
        good = cfg.read_text()
        cfg.write_text(good + "\n[gateway]\nnot toml at all\n")
        s.signal_gateway("a", signal.SIGHUP)
        wait_log(s, "a", "reload of")
        assert "keeping the running configuration" in s.gateway_log("a")
        s.wait_metric("a", "qgw_config_reloads_total", lambda v: v == 1, result="failed")
        cfg.write_text(good)

        # 2. New certificate and key for site-a from a CA that site B does not trust.
        other = tmp_path / "other-ca"
        assert run_qgw("pki", "init-ca", "--out", str(other)).returncode == 0
        issued = tmp_path / "issued"
        r = run_qgw(
            "pki", "issue", "--ca-dir", str(other), "--name", "site-a", "--out", str(issued)
        )
        assert r.returncode == 0, r.stderr
        pki = cfg.parent / "gw-pki"
        for ext in ("crt", "key"):
            shutil.copyfile(issued / f"site-a.{ext}", pki / f"site-a.{ext}")
        (pki / "site-a.key").chmod(0o600)
        s.signal_gateway("a", signal.SIGHUP)
        log = wait_log(s, "a", "reloaded ")
        assert "apply at the next bootstrap" in log
        s.wait_metric("a", "qgw_config_reloads_total", lambda v: v == 1, result="ok")
        assert s.running("gateway-a")

        # The live session was not dropped: no new handshake, and messages still flow.
        pub.publish("rl/1", b"after", qos=1)
        sub.wait_for(2)
        assert s.metric("a", "qgw_handshakes_total", result="ok", reason="bootstrap") == handshakes

        # The new credential is what A presents at its next bootstrap: B (fresh, no chain)
        # refuses a certificate from a CA it does not trust.
        s.kill_gateway("b")
        s.start_gateway("b")
        s.wait_metric(
            "b", "qgw_handshakes_total", lambda v: v >= 1, result="failed", reason="bad_certificate"
        )
