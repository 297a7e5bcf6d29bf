"""A peer's refusal is reported as what it is, counted, and backed off; a lost peer is logged."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from tests.conftest import run_qgw
from tests.support.sites import TwoSites


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_rejected_certificate_is_named_counted_and_backed_off(tmp_path: Path) -> None:
    with TwoSites(tmp_path) as s:
        # Site A's certificate and key from a CA that site B does not trust.
        other, issued = tmp_path / "other-ca", tmp_path / "issued"
        assert run_qgw("pki", "init-ca", "--out", str(other)).returncode == 0
        r = run_qgw(
            "pki", "issue", "--ca-dir", str(other), "--name", "site-a", "--out", str(issued)
        )
        assert r.returncode == 0, r.stderr
        pki = s.site_config("a").parent / "gw-pki"
        for ext in ("crt", "key"):
            shutil.copyfile(issued / f"site-a.{ext}", pki / f"site-a.{ext}")
        (pki / "site-a.key").chmod(0o600)
        s.start(wait=False)

        wait_for(
            lambda: s.metric("a", "qgw_peer_rejections_total", alert="bad_certificate") >= 3,
            60,
            "three rejections counted at A",
        )
        log = s.gateway_log("a")
        assert "peer rejected us: bad_certificate (alert 9)" in log
        assert "auth.ca" in log  # says where to look
        # never reported as an established session
        assert "session bootstrap with" not in log
        assert s.metric("a", "qgw_handshakes_total", result="ok", reason="bootstrap") == 0
        # and it backs off instead of looping
        delays = [float(x) for x in re.findall(r"retry with back-off ([0-9.]+) s", log)]
        assert len(delays) >= 3
        assert delays[:3] == sorted(delays[:3])
        assert delays[2] >= 2 * delays[0]


def test_peer_loss_and_restore_are_logged_with_reason(tmp_path: Path) -> None:
    with TwoSites(tmp_path, env={"QGW_LOGGING__FORMAT": "json"}) as s:
        s.start()
        s.kill_gateway("b")
        wait_for(lambda: "session_lost" in s.gateway_log("a"), 30, "A to log the loss")
        s.start_gateway("b")
        s.wait_established()
        wait_for(lambda: "restored after" in s.gateway_log("a"), 30, "A to log the restore")
        events = [
            json.loads(line) for line in s.gateway_log("a").splitlines() if line.startswith("{")
        ]
        lost = [e for e in events if e.get("event") == "session_lost"]
        assert lost
        assert lost[0]["level"] == "warning"
        assert lost[0]["peer"] == "site-b"
        assert lost[0]["reason"]  # e.g. "peer closed the TCP connection"
        up = [e for e in events if e.get("event") == "session_up" and "restored" in e["msg"]]
        assert up
        assert up[0]["level"] == "warning"
        assert isinstance(up[0]["epoch"], int)
