"""Both gateways get their QKD keys over Cisco SKIP (``qgw init-demo --key-source skip``):
the KME simulator's SKIP API on its own ports, real processes on loopback, QKD required.

The gateways' ``kme_url`` points at the SKIP ports, where the ETSI 014 paths do not exist
(404), so an established session with QKD required means every key came over SKIP; the
rekeys (every 2 s here) fetch more, at both sites, while messages flow both ways.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kme import http_json
from tests.support.sites import TwoSites, wait_until

pytestmark = pytest.mark.integration

N = 20


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[TwoSites]:
    s = TwoSites(tmp_path, key_source="skip", env={"QGW_REKEY__INTERVAL_SECONDS": "2"})
    try:
        yield s
    finally:
        s.close()


def test_both_gateways_get_keys_over_skip_and_messages_flow(sites: TwoSites) -> None:
    s = sites
    for site, port in (("a", s.ports.kme_a_skip), ("b", s.ports.kme_b_skip)):
        qkd = tomllib.loads(s.site_config(site).read_text())["qkd"]
        assert (qkd["source"], qkd["kme_url"]) == ("skip", f"https://127.0.0.1:{port}")
    s.start()
    sub_b, sub_a = s.client("b", "sub-b"), s.client("a", "sub-a")
    sub_b.subscribe("demo/ab/#")
    sub_a.subscribe("demo/ba/#")
    pub_a, pub_b = s.client("a", "pub-a"), s.client("b", "pub-b")
    for i in range(N):
        pub_a.publish(f"demo/ab/{i}", f"a{i}".encode(), qos=1)
        pub_b.publish(f"demo/ba/{i}", f"b{i}".encode(), qos=1)
    got_b = sub_b.wait_for(N)
    got_a = sub_a.wait_for(N)
    assert sorted(m.payload for m in got_b) == sorted(f"a{i}".encode() for i in range(N))
    assert sorted(m.payload for m in got_a) == sorted(f"b{i}".encode() for i in range(N))
    # at least two rekeys: more SKIP keys, fetched by ID at the responder
    s.wait_metric("a", "qgw_qkd_keys_total", lambda v: v >= 3, timeout=30, role="enc")
    s.wait_metric("b", "qgw_qkd_keys_total", lambda v: v >= 3, timeout=30, role="dec")
    assert s.metric("a", "qgw_qkd_mode_in_effect", mode="required") == 1
    assert s.metric("a", "qgw_kme_errors_total") == 0
    assert s.metric("b", "qgw_kme_errors_total") == 0
    # the simulator handed those keys out (both copies: A's and B's)
    for kme, port in (("A", s.ports.kme_a_admin), ("B", s.ports.kme_b_admin)):
        status, state = http_json(f"http://127.0.0.1:{port}/admin/state")
        assert status == 200
        assert state["keys_served"] >= 3, kme
    wait_until(lambda: s.established("a") and s.established("b"), 10, "session still up")
