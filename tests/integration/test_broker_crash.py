"""Broker A crashes (SIGKILL) mid-stream and its publisher reconnects at once: nothing lost.

Before issue 18 the shipped broker config saved its database only at shutdown, so a SIGKILLed
broker A came back without gateway A's session: the publisher's messages were acknowledged with
nobody subscribed and dropped (145 of 3000 in 2 of 3 runs). With the database saved every
AUTOSAVE_SECONDS the session and its subscriptions are on disk, and the broker queues for the
gateway until it is back. A broker that lost the session anyway raises broker-session-lost.
"""

from __future__ import annotations

import time
from pathlib import Path

from gateway.bridge.mosquitto import AUTOSAVE_SECONDS
from tests.support.sites import TwoSites, rule

N = 300


def test_broker_a_sigkill_with_an_eager_publisher_loses_nothing(tmp_path: Path) -> None:
    rules = [rule("crash/#", "out")]
    rules_b = [rule("crash/#", "in")]
    with TwoSites(tmp_path, rules={"a": rules, "b": rules_b}) as s:
        s.start()
        sub = s.client("b", "crash-sub")
        sub.subscribe("crash/#")
        time.sleep(AUTOSAVE_SECONDS + 1.5)  # broker A has saved gateway A's session
        broker_a = s.brokers["a"]
        broker_a.kill()
        broker_a.start()
        pub = s.client("a", "crash-pub")  # at once, before gateway A is back
        for i in range(N):
            pub.publish(f"crash/{i}", str(i).encode(), qos=1)
        got = sub.wait_for(N, timeout=60)
        seqs = sorted({int(m.payload) for m in got})
        assert seqs == list(range(N)), f"lost {sorted(set(range(N)) - set(seqs))[:20]}"
        assert s.metric("a", "qgw_broker_sessions_lost_total") == 0


def test_broker_that_lost_our_session_raises_the_alarm(tmp_path: Path) -> None:
    with TwoSites(tmp_path) as s:
        s.start()
        broker_a = s.brokers["a"]
        broker_a.kill()
        for db in broker_a.workdir.glob("*.db"):
            db.unlink()  # the broker's disk is gone: it comes back without any session
        broker_a.start()
        s.wait_metric("a", "qgw_broker_sessions_lost_total", lambda v: v == 1, timeout=30)
        s.wait_metric(
            "a", "qgw_qkd_alarm", lambda v: v == 1, reason="broker-session-lost", timeout=10
        )
        assert "has no session for us (session present = 0)" in s.gateway_log("a")
