"""`qgw status` against two real gateways: what an operator runs instead of reading metrics."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tests.conftest import run_qgw
from tests.support.sites import TwoSites, rule


def status(s: TwoSites, site: str, *extra: str) -> tuple[int, str]:
    r = run_qgw("status", "--url", f"http://127.0.0.1:{s.metrics_port(site)}", *extra)
    return r.returncode, r.stdout + r.stderr


def test_status_up_down_and_unreachable(tmp_path: Path) -> None:
    rules = [rule("st/#", "both")]
    with TwoSites(tmp_path, rules={"a": rules, "b": rules}) as s:
        s.start()
        sub = s.client("b", "status-sub")
        sub.subscribe("st/#")
        pub = s.client("a", "status-pub")
        for i in range(5):
            pub.publish(f"st/{i}", b"x", qos=1)
        sub.wait_for(5)
        s.wait_metric(
            "a",
            "qgw_messages_total",
            lambda v: v == 5,
            rule="both:st/#",
            direction="out",
            result="forwarded",
        )
        deadline = time.monotonic() + 10
        while True:  # the KME status poll runs at start; its answer lands within a moment
            code, out = status(s, "a", "--json")
            doc = json.loads(out)
            if doc["qkd"]["stored_key_count"] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert code == 0, out
        assert doc["up"] is True
        assert doc["peer"]["name"] == "site-b"
        assert doc["peer"]["connected"] is True
        assert doc["session"]["state"] == "established"
        assert doc["session"]["epoch"] >= 0
        assert doc["session"]["last_handshake"]["result"] == "ok"
        assert doc["qkd"]["policy"] == "required"
        assert doc["qkd"]["kme_reachable"] is True
        assert isinstance(doc["qkd"]["stored_key_count"], int)
        assert doc["broker"]["connected"] is True
        assert doc["rules"] == [
            {
                "name": "both:st/#",
                "direction": "both",
                "out_forwarded": 5,
                "out_delivered": 0,
                "out_dropped": 0,
                "in_forwarded": 0,
                "in_delivered": 0,
                "in_dropped": 0,
            }
        ]
        assert doc["certificates"]["bootstrap"]["days_left"] > 300
        assert "kme_client" in doc["certificates"]
        assert doc["alarms"] == []
        # No key material: no long hex or base64 run anywhere in the document.
        assert not re.search(r"[0-9a-f]{32}|[A-Za-z0-9+/]{40}", json.dumps(doc))

        # The same facts as metrics, for Prometheus and the alert rules.
        now = time.time()
        assert s.metric("a", "qgw_broker_connected") == 1
        assert s.metric("a", "qgw_kme_stored_keys") >= 0
        assert s.metric("a", "qgw_peer_info", peer="site-b", address=doc["peer"]["address"]) == 1
        assert s.metric("a", "qgw_last_handshake_timestamp_seconds", result="ok") <= now
        expiry = s.metric("a", "qgw_certificate_expiry_timestamp_seconds", certificate="bootstrap")
        assert expiry > now + 300 * 86400

        code, text = status(s, "b")
        assert code == 0
        assert "peer: site-a" in text
        assert "session: established" in text
        assert "alarms: none" in text

        # The same via --config (finds metrics.listen in the site's file).
        r = run_qgw("status", "--config", str(s.site_config("a")))
        assert r.returncode == 0, r.stderr

        s.kill_gateway("b")
        deadline = time.monotonic() + 20
        while (code := status(s, "a")[0]) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert code == 1
        code, text = status(s, "a")
        assert "session: " in text
        assert "not connected" in text

        code, text = status(s, "b")
        assert code == 3
        assert "no answer" in text
