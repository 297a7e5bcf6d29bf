"""auth.mode = "wot" with real processes: two gateways, the KME simulator over mTLS, mosquitto.

The wot credentials are the ``qgw init-demo --auth wot`` set (four introducers: one full, three
marginal; each gateway's key endorsed by all four). The revocation list is re-read on SIGHUP.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from gateway.crypto import wot
from gateway.wot import write_demo_wot
from tests.conftest import run_qgw
from tests.integration.test_reload import wait_log
from tests.support.sites import TwoSites, rule


def _wot_sites(tmp_path: Path, **kw: Any) -> TwoSites:
    rules = [rule("wot/#", "both")]
    s = TwoSites(tmp_path, rules={"a": rules, "b": rules}, **kw)
    keys = write_demo_wot(s.root, ["site-a", "site-b"])
    for site in ("a", "b"):

        def change(d: dict[str, Any], site: str = site) -> None:
            d["auth"] = {"peer_name": d["auth"]["peer_name"], **keys[f"site-{site}"]}

        s.edit_site(site, change)
    return s


def test_wot_gateways_bootstrap_and_deliver(tmp_path: Path) -> None:
    with _wot_sites(tmp_path) as s:
        r = run_qgw("check-config", "--strict", "--config", str(s.site_config("b")))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "auth: wot, 4 introducer(s)" in r.stdout + r.stderr
        s.start()
        assert s.metric("a", "qgw_handshakes_total", result="ok", reason="bootstrap") == 1
        sub = s.client("b", "wot-sub")
        sub.subscribe("wot/#")
        pub = s.client("a", "wot-pub")
        for n in range(20):
            pub.publish(f"wot/{n}", f"m{n}".encode(), qos=1)
        got = sub.wait_for(20)
        assert sorted(m.payload for m in got) == sorted(f"m{n}".encode() for n in range(20))


def test_revocation_reloaded_on_sighup_refuses_the_next_bootstrap(tmp_path: Path) -> None:
    """A revokes the full and one marginal endorsement of B's key (2 marginal left < 3) and
    reloads: the live session continues; the next bootstrap (B restarted) is refused by A with
    alert 21, counted and logged with who vouched and who is missing; clearing the list and
    reloading again lets the next bootstrap through."""
    env = {"QGW_GATEWAY__RECONNECT_MAX_SECONDS": "1"}
    with _wot_sites(tmp_path, env=env) as s:
        s.start()
        ends = wot.load_endorsements((s.root / "wot" / "site-b.endorsements.pem").read_bytes())
        revoked = s.root / "wot" / "revoked.txt"
        revoked.write_text(
            "".join(f"{wot.endorsement_fingerprint(d)}  # revoked by the test\n" for d in ends[:2])
        )
        s.signal_gateway("a", signal.SIGHUP)
        s.wait_metric("a", "qgw_config_reloads_total", lambda v: v == 1, result="ok")
        assert s.established("a")  # the live session keeps its QKD-authenticated keys

        s.kill_gateway("b")
        s.start_gateway("b")
        s.wait_metric(
            "a",
            "qgw_handshakes_total",
            lambda v: v >= 1,
            result="failed",
            reason="insufficient_trust",
        )
        log = wait_log(s, "a", "web of trust: refused")
        assert "vouched: marginal-2 (marginal), marginal-3 (marginal)" in log
        assert "missing: full-1 (full), marginal-1 (marginal)" in log
        assert "revoked (on the local revocation list)" in log
        assert not s.established("a")

        revoked.write_text("# nothing revoked\n")
        s.signal_gateway("a", signal.SIGHUP)
        s.wait_metric("a", "qgw_config_reloads_total", lambda v: v == 2, result="ok")
        s.wait_established()
        sub = s.client("b", "wot-sub")
        sub.subscribe("wot/#")
        pub = s.client("a", "wot-pub")
        pub.publish("wot/after", b"back", qos=1)
        sub.wait_for(1)
