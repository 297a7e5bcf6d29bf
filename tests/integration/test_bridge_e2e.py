"""End to end through two real gateways on loopback: topic rules, QoS, retained, v5 properties,
loop prevention. One set of processes per module (brokers, KME simulator, both gateways,
ML-DSA PKI, QKD required); every test uses its own topics and client ids.

Rules (A's local topic -> wire topic -> B's local topic)::

    0  A out  a-out/up/#    -> wire-up/up/#     -> B in  b-in/up/#
    1  B out  b-out/down/#  -> wire-down/down/# -> A in  a-in/down/#
    2  both   site/sync/#   <-> shared/sync/#   <->      site/sync/#   (prefixes on both sides)
    3  A out  a-out0/lowq/# -> wire-low/lowq/#  -> B in  b-in0/lowq/#  (A's rule is QoS 0)
    4  both   plain/#       <-> plain/#         <->      plain/#       (no prefixes)
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.sites import Received, TwoSites, publish_properties, rule

pytestmark = pytest.mark.integration

RULES_A = [
    rule("up/#", "out", 1, local_prefix="a-out/", remote_prefix="wire-up/"),
    rule("down/#", "in", 1, local_prefix="a-in/", remote_prefix="wire-down/"),
    rule("sync/#", "both", 1, local_prefix="site/", remote_prefix="shared/"),
    rule("lowq/#", "out", 0, local_prefix="a-out0/", remote_prefix="wire-low/"),
    rule("plain/#", "both", 1),
]
RULES_B = [
    rule("up/#", "in", 1, local_prefix="b-in/", remote_prefix="wire-up/"),
    rule("down/#", "out", 1, local_prefix="b-out/", remote_prefix="wire-down/"),
    rule("sync/#", "both", 1, local_prefix="site/", remote_prefix="shared/"),
    rule("lowq/#", "in", 1, local_prefix="b-in0/", remote_prefix="wire-low/"),
    rule("plain/#", "both", 1),
]
SETTLE_SECONDS = 1.0  # after the expected messages arrived, wait this long for extra ones
N = 20

_ids = itertools.count()


def uid() -> str:
    return f"{uuid.uuid4().hex[:8]}-{next(_ids)}"


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoSites]:
    s = TwoSites(Path(tmp_path_factory.mktemp("e2e")), rules={"a": RULES_A, "b": RULES_B})
    try:
        s.start()
        yield s
    finally:
        s.close()


def with_token(token: str) -> Callable[[Received], bool]:
    return lambda m: token.encode() in m.payload


# (publishing site, topic there, receiving site, topic there); {t} is the test's token
ROUTES = {
    "out-A/in-B": ("a", "a-out/up/{t}/x", "b", "b-in/up/{t}/x"),
    "out-B/in-A": ("b", "b-out/down/{t}/x", "a", "a-in/down/{t}/x"),
    "both-A-to-B": ("a", "site/sync/{t}/x", "b", "site/sync/{t}/x"),
    "both-B-to-A": ("b", "site/sync/{t}/x", "a", "site/sync/{t}/x"),
}


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("route", list(ROUTES))
def test_round_trip_with_prefix_mapping(sites: TwoSites, route: str, qos: int) -> None:
    src, src_topic, dst, dst_topic = ROUTES[route]
    t = uid()
    sub = sites.client(dst, f"sub-{t}")
    sub.subscribe("#", qos=1)  # everything: a message on a wrong topic would show up too
    pub = sites.client(src, f"pub-{t}")
    payloads = {json.dumps({"t": t, "n": n}).encode() for n in range(N)}
    for p in sorted(payloads):
        pub.publish(src_topic.format(t=t), p, qos=qos)
    got = sub.wait_for(N, timeout=15, match=with_token(t))
    time.sleep(SETTLE_SECONDS)
    got = [m for m in sub.snapshot() if t.encode() in m.payload]
    assert len(got) == N, f"{len(got)} messages for {N} published (duplicates?)"
    assert {m.payload for m in got} == payloads
    assert {m.topic for m in got} == {dst_topic.format(t=t)}
    assert {m.qos for m in got} == {qos}  # min(published QoS, rule QoS) = published here
    assert not any(m.retain for m in got)


def test_rule_qos_caps_the_message_qos(sites: TwoSites) -> None:
    t = uid()
    sub = sites.client("b", f"sub-{t}")
    sub.subscribe(f"b-in0/lowq/{t}", qos=1)
    pub = sites.client("a", f"pub-{t}")
    pub.publish(f"a-out0/lowq/{t}", b"capped", qos=1)
    (m,) = sub.wait_for(1, timeout=15)
    assert m.payload == b"capped"
    assert m.qos == 0  # A's rule subscribes with QoS 0


def test_nothing_crosses_without_a_rule(sites: TwoSites) -> None:
    t = uid()
    sub = sites.client("b", f"sub-{t}")
    sub.subscribe("#", qos=1)
    pub = sites.client("a", f"pub-{t}")
    # topics outside every rule at A, and one with the wire prefix but at the wrong site
    for topic in (f"other/{t}", f"b-in/up/{t}", f"wire-up/up/{t}", f"a-in/down/{t}"):
        pub.publish(topic, t.encode(), qos=1)
    pub.publish(f"a-out/up/{t}", f"marker {t}".encode(), qos=1)  # this one crosses
    sub.wait_for(1, timeout=15, match=with_token(t))
    time.sleep(SETTLE_SECONDS)
    got = [m for m in sub.snapshot() if t.encode() in m.payload]
    assert [(m.topic, m.payload) for m in got] == [(f"b-in/up/{t}", f"marker {t}".encode())]


def test_retained_set_update_clear_and_late_subscribers(sites: TwoSites) -> None:
    t = uid()
    a_topic, b_topic = f"a-out/up/ret/{t}", f"b-in/up/ret/{t}"
    live = sites.client("b", f"live-{t}")
    live.subscribe(b_topic)
    pub = sites.client("a", f"pub-{t}")

    def late(name: str) -> list[Received]:
        c = sites.client("b", f"{name}-{t}")
        c.subscribe(b_topic)
        time.sleep(SETTLE_SECONDS)  # a retained message comes right after the SUBACK
        msgs = c.snapshot()
        c.close()
        return msgs

    pub.publish(a_topic, b"r1", qos=1, retain=True)
    live.wait_for(1, timeout=15, match=lambda m: m.payload == b"r1")
    (m,) = late("late1")
    assert (m.payload, m.retain, m.topic) == (b"r1", True, b_topic)

    pub.publish(a_topic, b"r2", qos=1, retain=True)
    live.wait_for(1, timeout=15, match=lambda m: m.payload == b"r2")
    (m,) = late("late2")
    assert (m.payload, m.retain) == (b"r2", True)

    pub.publish(a_topic, b"", qos=1, retain=True)  # clears the retained message at A ...
    live.wait_for(1, timeout=15, match=lambda m: m.payload == b"")  # ... and, carried, at B
    assert late("late3") == []
    # the retained message at A is cleared too
    c = sites.client("a", f"late-a-{t}")
    c.subscribe(a_topic)
    time.sleep(SETTLE_SECONDS)
    assert c.snapshot() == []


def test_v5_properties_preserved(sites: TwoSites) -> None:
    t = uid()
    sub = sites.client("b", f"sub-{t}")
    sub.subscribe(f"b-in/up/props/{t}")
    pub = sites.client("a", f"pub-{t}")
    users = [("k1", "v1"), ("k1", "v2"), ("k2", ""), ("ключ", "значение ✓")]
    props = publish_properties(
        user_properties=users,
        content_type="application/json; charset=utf-8",
        response_topic=f"replies/{t}",
        correlation_data=b"\x00\x01\xfecorr",
        message_expiry_interval=3600,
        payload_format_indicator=1,
    )
    pub.publish(f"a-out/up/props/{t}", '{"ok": "✓"}'.encode(), qos=1, properties=props)
    (m,) = sub.wait_for(1, timeout=15)
    assert m.payload == '{"ok": "✓"}'.encode()
    mine = [kv for kv in m.user_properties if kv[0] != "qgw-origin"]
    assert mine == users  # order and repeated keys kept
    assert ("qgw-origin", "site-a") in m.user_properties
    assert m.content_type == "application/json; charset=utf-8"
    assert m.response_topic == f"replies/{t}"
    assert m.correlation_data == b"\x00\x01\xfecorr"
    assert m.payload_format_indicator == 1
    assert m.message_expiry_interval is not None
    assert 3600 - 60 < m.message_expiry_interval <= 3600  # what is left, as brokers do

    # a message without properties arrives without them (only the origin marker)
    pub.publish(f"a-out/up/props/{t}", b"bare", qos=1)
    (m2,) = sub.wait_for(1, timeout=15, match=lambda x: x.payload == b"bare")
    assert m2.user_properties == (("qgw-origin", "site-a"),)
    assert m2.content_type is None
    assert m2.response_topic is None
    assert m2.correlation_data is None
    assert m2.message_expiry_interval is None


@pytest.mark.parametrize("prefix", ["plain/", "site/sync/"])
def test_both_on_both_sides_does_not_loop(sites: TwoSites, prefix: str) -> None:
    t = uid()
    topic = f"{prefix}loop/{t}"
    subs = {site: sites.client(site, f"sub-{site}-{t}") for site in ("a", "b")}
    for s in subs.values():
        s.subscribe(topic + "/#")
    pubs = {site: sites.client(site, f"pub-{site}-{t}") for site in ("a", "b")}
    for src in ("a", "b"):
        for n in range(N):
            pubs[src].publish(f"{topic}/{src}", json.dumps({"src": src, "n": n}), qos=1)
    for s in subs.values():
        s.wait_for(2 * N, timeout=15)
    time.sleep(2 * SETTLE_SECONDS)
    for site, s in subs.items():
        got = s.snapshot()
        # exactly N from each side: the local ones once, the peer's once, no echo
        assert len(got) == 2 * N, f"site {site}: {len(got)} messages, expected {2 * N}"
        by_src = {
            src: sorted(json.loads(m.payload)["n"] for m in got if m.topic.endswith("/" + src))
            for src in ("a", "b")
        }
        assert by_src == {"a": list(range(N)), "b": list(range(N))}


@pytest.mark.parametrize("size", [200 * 1024, 1 << 20])
def test_large_payloads_cross_over_several_records(sites: TwoSites, size: int) -> None:
    """Payloads up to mqtt.max_payload_bytes (default 1 MiB) are fragmented over records
    (60 KiB each) and reassembled byte for byte; one byte more is dropped and counted."""
    t = uid()
    sub = sites.client("b", f"sub-{t}")
    sub.subscribe(f"b-in/up/big/{t}", qos=1)
    pub = sites.client("a", f"pub-{t}")
    body = (t.encode() + bytes(range(256)) * (size // 256 + 1))[:size]
    pub.publish(f"a-out/up/big/{t}", body, qos=1)
    (m,) = sub.wait_for(1, timeout=30)
    assert len(m.payload) == size
    assert m.payload == body


def test_oversize_payload_is_dropped_and_counted(sites: TwoSites) -> None:
    t = uid()
    before = (
        sites.metric(
            "a",
            "qgw_messages_dropped_total",
            rule="out:a-out/up/#",
            direction="out",
            reason="oversize",
        )
        or 0.0
    )
    sub = sites.client("b", f"sub-{t}")
    sub.subscribe(f"b-in/up/huge/{t}", qos=1)
    pub = sites.client("a", f"pub-{t}")
    pub.publish(f"a-out/up/huge/{t}", b"x" * ((1 << 20) + 1), qos=1)
    pub.publish(f"a-out/up/huge/{t}", b"small " + t.encode(), qos=1)
    (m,) = sub.wait_for(1, timeout=15)
    assert m.payload == b"small " + t.encode()  # the oversize one never arrives
    sites.wait_metric(
        "a",
        "qgw_messages_dropped_total",
        lambda v: v == before + 1,
        timeout=10,
        rule="out:a-out/up/#",
        direction="out",
        reason="oversize",
    )


def test_no_secret_in_any_log(sites: TwoSites) -> None:
    """The PSK and every private key of the setup appear in no process log (gateways, KME,
    brokers), in hex, base64 or PEM body form. Runs last in this module, after all the traffic."""
    import base64

    secrets: list[bytes] = [(sites.root / "psk").read_bytes()]
    for key_file in sorted(sites.root.rglob("*.key")):
        pem = key_file.read_text()
        body = "".join(line for line in pem.splitlines() if "-----" not in line)
        secrets.append(base64.b64decode(body))
    forms = set()
    for sec in secrets:
        forms |= {sec.hex(), base64.b64encode(sec).decode()[:40], sec.hex()[:32]}
    logs = sorted(sites.root.rglob("*.log"))
    assert logs, "no logs found"
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    assert "session bootstrap with site-b" in text  # the logs are the real ones
    leaked = [f for f in forms if f in text]
    assert leaked == []
