"""The two sites on two "hosts": Linux network namespaces joined by a veth link.

Namespace a: mosquitto A, KME A (``qgw kme serve --kme A``), gateway A, publisher.
Namespace b: mosquitto B, KME B (``--kme B``), gateway B, counter.
The gateways talk over the veth addresses (gateway B listens on 198.18.0.2), and so do the
two KME processes (their sync channel, mutual TLS). MQTT clients run inside the namespaces
(``python -m tests.support.mqtt_tool``) and report through JSON files.

One set of processes serves the module; each test uses its own topic and client ids.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.netns import NetnsPair, require_netns
from tests.support.sites import NetnsSites, wait_until

pytestmark = pytest.mark.integration

INFLIGHT = 64
DUP_BOUND = 4 * INFLIGHT  # see tests/integration/test_resilience.py for the reasoning


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsSites]:
    require_netns()
    with NetnsPair() as net:
        s = NetnsSites(
            Path(tmp_path_factory.mktemp("two-hosts")),
            net=net,
            env={"QGW_MQTT__INFLIGHT": str(INFLIGHT)},
        )
        try:
            s.start()
            yield s
        finally:
            s.close()


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


class Flow:
    """A counter in namespace b and a publisher in namespace a, on topic demo/<name>."""

    def __init__(self, s: NetnsSites, name: str, n: int, rate: float) -> None:
        self.s, self.name, self.n = s, name, n
        self.count_out = s.root / f"{name}-count.json"
        self.pub_out = s.root / f"{name}-publish.json"
        self.counter = s.tool(
            "b",
            "count",
            self.count_out,
            *("--filter", f"demo/{name}", "--expect", str(n)),
            *("--timeout", "120", "--settle", "2", "--client-id", f"count-{name}"),
        )
        wait_until(
            lambda: (read_json(self.count_out) or {}).get("subscribed") is True,
            20,
            f"the counter of {name} to subscribe in namespace b",
        )
        self.publisher = s.tool(
            "a",
            "publish",
            self.pub_out,
            *("--topic", f"demo/{name}", "--count", str(n), "--rate", str(rate)),
            *("--client-id", f"pub-{name}"),
        )

    def received(self) -> int:
        return int((read_json(self.count_out) or {}).get("distinct", 0))

    def published(self) -> int:
        return int((read_json(self.pub_out) or {}).get("published", 0))

    def finish(self, timeout: float = 150) -> dict[str, Any]:
        self.publisher.wait(timeout)
        pub = read_json(self.pub_out)
        assert pub is not None
        assert pub["done"]
        assert pub["error"] is None
        assert pub["acked"] == self.n, f"broker A acknowledged {pub['acked']} of {self.n}"
        self.counter.wait(timeout)
        res = read_json(self.count_out)
        assert res is not None
        assert res["done"]
        return res


def test_messages_flow_between_the_hosts(sites: NetnsSites) -> None:
    f = Flow(sites, "flow", 500, rate=0)
    res = f.finish()
    assert res["missing"] == []
    assert res["distinct"] == 500
    assert res["duplicates"] == 0  # nothing went wrong: exactly once
    # the session runs over the veth with QKD keys from the two KME processes
    assert sites.metric("a", "qgw_qkd_keys_total", role="enc") >= 1
    assert sites.metric("b", "qgw_qkd_keys_total", role="dec") >= 1
    assert (
        sites.metric("a", "qgw_messages_total", rule="demo", direction="out", result="forwarded")
        >= 500
    )


def test_link_cut_and_restore_loses_nothing(sites: NetnsSites) -> None:
    assert sites.net is not None
    net = sites.net
    n = 300
    f = Flow(sites, "cut", n, rate=30)  # about 10 s of traffic
    wait_until(lambda: f.received() >= 50, 30, "traffic before the cut")
    net.cut()
    try:
        time.sleep(1.0)
        during = f.received()
        time.sleep(4.0)
        assert f.received() == during, "messages crossed a link that was down"
        assert f.published() > during, "the publisher did not publish during the cut"
    finally:
        net.restore()
    res = f.finish()
    print(f"\nlink cut 5 s: {res['distinct']} distinct, {res['duplicates']} duplicates")
    assert res["missing"] == []
    assert res["distinct"] == n
    assert res["duplicates"] <= DUP_BOUND
    sites.wait_established()


def test_sigkill_gateway_b_in_its_namespace(sites: NetnsSites) -> None:
    n = 2000
    f = Flow(sites, "killb", n, rate=400)  # about 5 s of traffic
    wait_until(lambda: f.received() >= 400, 30, "traffic before the kill")
    sites.kill_gateway("b", signal.SIGKILL)
    at_kill = f.received()
    sites.start_gateway("b")
    res = f.finish()
    print(
        f"\nkill gateway B (netns) after {at_kill} of {n}: {res['distinct']} distinct, "
        f"{res['duplicates']} duplicates"
    )
    assert at_kill < n
    assert res["missing"] == []
    assert res["distinct"] == n
    assert res["duplicates"] <= DUP_BOUND
    sites.wait_established()
