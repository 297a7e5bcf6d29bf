"""Protocol benchmarks: handshake cost per side (PKI, PSK) and record-layer throughput next to
raw AES-256-GCM measured in the same run. Writes bench/results/protocol.json.

Run: .venv/bin/python bench/protocol_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.core import labels as L
from gateway.core.auth import PkiAuthenticator
from gateway.core.connection import (
    Association,
    Connection,
    NeedQkdKeys,
    NeedQkdKeysById,
    Role,
    SessionParams,
)
from gateway.credentials import make_verifier
from gateway.crypto import Aead, get_provider, x509
from tests.core.pair import FakeKme, psk_auths

PROVIDER = get_provider("pyca")


def pki_auths() -> tuple[PkiAuthenticator, PkiAuthenticator]:
    ca_cert, ca_key = x509.create_ca("bench CA")
    out = []
    for name in ("site-a", "site-b"):
        cert, key = x509.issue_cert(ca_cert, ca_key, name)
        chain = x509.load_cert_chain(cert)
        out.append(
            PkiAuthenticator(
                name,
                certs=tuple(chain),
                key=x509.load_signing_key(key),
                provider=PROVIDER,
                verifier=make_verifier(ca_cert),
            )
        )
    return out[0], out[1]


def one_handshake(auths: tuple[Any, Any], policy: L.QkdPolicyId) -> tuple[float, float]:
    """Return CPU seconds spent in the initiator's and the responder's core calls."""
    kme = FakeKme(int.from_bytes(os.urandom(4), "big"))
    mk = lambda role, peer: SessionParams(role, L.SuiteId(1), policy, peer_name=peer)  # noqa: E731
    i = Connection(mk(Role.INITIATOR, "site-b"), auths[0], PROVIDER, os.urandom, Association())
    r = Connection(mk(Role.RESPONDER, "site-a"), auths[1], PROVIDER, os.urandom, Association())
    spent = {"i": 0.0, "r": 0.0}

    def timed(side: str, fn: Any, *a: Any) -> None:
        t = time.perf_counter()
        fn(*a)
        spent[side] += time.perf_counter() - t

    timed("i", i.start, 0.0)
    for _ in range(10):
        for side, c in (("i", i), ("r", r)):
            while (ev := c.next_event()) is not None:
                if isinstance(ev, NeedQkdKeys):
                    timed(side, c.provide_qkd_keys, kme.enc_keys(ev.count), 0.0)
                elif isinstance(ev, NeedQkdKeysById):
                    timed(side, c.provide_qkd_keys, kme.dec_keys(ev.key_ids), 0.0)
        out = i.data_to_send()
        if out:
            timed("r", r.receive_data, out, 0.0)
        out = r.data_to_send()
        if out:
            timed("i", i.receive_data, out, 0.0)
    assert i.can_send(), "handshake did not complete"
    return spent["i"], spent["r"]


def stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "median_ms": statistics.median(s) * 1e3,
        "p95_ms": s[int(len(s) * 0.95) - 1] * 1e3,
        "n": len(s),
    }


def bench_handshakes(n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, auths in (("psk", psk_auths()), ("pki", pki_auths())):
        for policy in (L.QkdPolicyId.REQUIRED, L.QkdPolicyId.OFF):
            one_handshake(auths, policy)  # warm-up
            ii, rr = [], []
            for _ in range(n):
                a, b = one_handshake(auths, policy)
                ii.append(a)
                rr.append(b)
            out[f"{name}/qkd={policy.name.lower()}"] = {
                "initiator": stats(ii),
                "responder": stats(rr),
            }
    return out


def bench_rekey(n: int) -> dict[str, Any]:
    from tests.core.pair import Pair

    p = Pair(auth="psk")
    p.handshake()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        p.i.conn.rekey_now(p.now)
        p.pump()
        samples.append(time.perf_counter() - t)
    return {"both_sides": stats(samples)}


def bench_records(seconds: float) -> dict[str, Any]:
    from tests.core.pair import Pair

    p = Pair(auth="psk", policy=L.QkdPolicyId.OFF)
    p.handshake()
    key, iv = os.urandom(32), os.urandom(12)
    raw = Aead(key)
    out: dict[str, Any] = {}
    for size in (64, 1024, 16384, 60 * 1024):
        msg = os.urandom(size)
        # raw AES-256-GCM seal + open (the floor)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(200):
                raw.open(iv, raw.seal(iv, msg, b"h" * 17), b"h" * 17)
            n += 200
        raw_rate = n / (time.perf_counter() - t0)
        # through the core: send_message -> bytes -> receive_data -> event
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(200):
                p.i.conn.send_message(msg, 0.0)
                p.r.conn.receive_data(p.i.conn.data_to_send(), 0.0)
                p.r.conn.next_event()
            n += 200
        core_rate = n / (time.perf_counter() - t0)
        out[str(size)] = {
            "raw_aesgcm_msgs_per_s": raw_rate,
            "raw_aesgcm_MB_per_s": raw_rate * size / 1e6,
            "core_msgs_per_s": core_rate,
            "core_MB_per_s": core_rate * size / 1e6,
            "core_vs_raw": core_rate / raw_rate,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 5 if args.quick else 40
    result = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
        "handshake_cpu_per_side": bench_handshakes(n),
        "rekey_cpu_both_sides": bench_rekey(n),
        "records_seal_and_open": bench_records(0.3 if args.quick else 1.5),
    }
    out = Path(__file__).resolve().parent / "results" / "protocol.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
