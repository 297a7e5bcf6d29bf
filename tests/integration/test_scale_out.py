"""Horizontal scale-out (DESIGN §7, docs/scaling.md): two gateway pairs share the same two
brokers through MQTT v5 shared subscriptions ($share/qgw/...). Each pair has its own gateway
certificates, its own SAE IDs at the KMEs and its own QKD keys. Every message crosses exactly
once, both pairs carry part of the load, and `both` rules do not loop even though No Local
cannot be used on shared subscriptions."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.crypto import tlspki
from gateway.pki import issue
from tests.support.sites import TwoSites, wait_until

pytestmark = pytest.mark.integration

N = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rules(share: str) -> list[dict[str, Any]]:
    return [
        {"pattern": "sensors/#", "direction": "out", "qos": 1, "share_group": share},
        {"pattern": "sensors-back/#", "direction": "in", "qos": 1},
        {"pattern": "sync/#", "direction": "both", "qos": 1, "share_group": share},
    ]


def _rules_b(share: str) -> list[dict[str, Any]]:
    return [
        {"pattern": "sensors/#", "direction": "in", "qos": 1},
        {"pattern": "sensors-back/#", "direction": "out", "qos": 1, "share_group": share},
        {"pattern": "sync/#", "direction": "both", "qos": 1, "share_group": share},
    ]


class TwoPairs(TwoSites):
    """TwoSites plus a second gateway pair ("a2"/"b2") on the same brokers and KMEs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.extra_metrics = {"a2": _free_port(), "b2": _free_port()}
        root = self.root
        gw = root / "gw-pki"
        issue(gw, "site-a-2", gw)
        issue(gw, "site-b-2", gw)
        ca = tlspki.load_issued(root / "kme-pki" / "ca.crt", root / "kme-pki" / "ca.key")
        for sae in ("sae-a2", "sae-b2"):
            tlspki.write_issued(
                tlspki.issue_client(ca, sae),
                root / "kme-pki" / f"{sae}.crt",
                root / "kme-pki" / f"{sae}.key",
            )

        def add_saes(d: dict[str, Any]) -> None:
            d["kme_a"]["sae_ids"].append("sae-a2")
            d["kme_b"]["sae_ids"].append("sae-b2")

        self.edit_kme(add_saes)
        port2 = _free_port()
        for one, two, me, peer, sae, peer_sae in (
            ("a", "a2", "site-a-2", "site-b-2", "sae-a2", "sae-b2"),
            ("b", "b2", "site-b-2", "site-a-2", "sae-b2", "sae-a2"),
        ):
            text = self.site_config(one).read_text()
            self.site_config(two).write_text(text)

            def change(
                d: dict[str, Any],
                me: str = me,
                peer: str = peer,
                sae: str = sae,
                peer_sae: str = peer_sae,
                two: str = two,
            ) -> None:
                d["gateway"]["site_id"] = me
                d["gateway"]["listen"] = f"127.0.0.1:{port2}"
                d["gateway"]["peer"] = f"127.0.0.1:{port2}"
                d["auth"].update(cert=f"gw-pki/{me}.crt", key=f"gw-pki/{me}.key", peer_name=peer)
                d["qkd"].update(
                    sae_id=sae,
                    peer_sae_id=peer_sae,
                    cert=f"kme-pki/{sae}.crt",
                    key=f"kme-pki/{sae}.key",
                )
                d["mqtt"]["client_id"] = f"qgw-{me}"
                d["metrics"]["listen"] = f"127.0.0.1:{self.extra_metrics[two]}"

            self.edit_site(two, change)

    def metrics_port(self, site: str) -> int:
        if site in ("a2", "b2"):
            return self.extra_metrics[site]
        return super().metrics_port(site)

    def mqtt_port(self, site: str) -> int:
        return super().mqtt_port(site[0])

    def start(self, *, kme: bool = True, wait: bool = True) -> TwoPairs:
        super().start(kme=kme, wait=wait)
        self.start_gateway("b2")
        self.start_gateway("a2")
        wait_until(
            lambda: self.established("a2") and self.established("b2"), 60, "pair 2 established"
        )
        return self


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoPairs]:
    p = TwoPairs(
        Path(tmp_path_factory.mktemp("scale")),
        rules={"a": _rules("qgw"), "b": _rules_b("qgw")},
    )
    try:
        p.start()
        yield p
    finally:
        p.close()


def _forwarded(p: TwoPairs, site: str, rule: str) -> float:
    return p.metric(site, "qgw_messages_total", rule=rule, direction="out", result="forwarded")


def test_two_pairs_split_the_load_and_each_message_crosses_once(pairs: TwoPairs) -> None:
    sub = pairs.client("b", "scale-sub")
    sub.subscribe("sensors/#")
    pub = pairs.client("a", "scale-pub")
    for n in range(N):
        pub.publish(f"sensors/{n % 7}", f"m{n}".encode(), qos=1)
    sub.wait_for(N, timeout=60)
    wait_until(
        lambda: (
            _forwarded(pairs, "a", "out:sensors/#") + _forwarded(pairs, "a2", "out:sensors/#") >= N
        ),
        15,
        "metrics",
    )
    got = sorted(m.payload for m in sub.snapshot())
    assert got == sorted(f"m{n}".encode() for n in range(N))  # exactly once each
    one, two = _forwarded(pairs, "a", "out:sensors/#"), _forwarded(pairs, "a2", "out:sensors/#")
    assert one + two == N
    assert one > 0
    assert two > 0  # both pairs carried part of it


def test_both_rules_on_shared_subscriptions_do_not_loop(pairs: TwoPairs) -> None:
    sub_b = pairs.client("b", "sync-sub-b")
    sub_b.subscribe("sync/#")
    sub_a = pairs.client("a", "sync-sub-a")
    sub_a.subscribe("sync/#")
    pub = pairs.client("a", "sync-pub")
    for n in range(N // 4):
        pub.publish(f"sync/{n % 3}", f"s{n}".encode(), qos=1)
    sub_b.wait_for(N // 4, timeout=60)
    import time

    time.sleep(2.0)  # give a loop the time to show
    assert len(sub_b.snapshot()) == N // 4  # no duplicates at B
    assert len(sub_a.snapshot()) == N // 4  # only the originals at A: nothing came back
