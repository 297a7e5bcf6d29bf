"""Cost of judging a peer at bootstrap: pki chain verification vs the wot trust decision.

Measures, in one process and one run (compare the rows with each other, not across runs), the
median CPU time of the peer check that B6/B8 do before the signature: ``x509.verify_peer`` on a
pki leaf under an ML-DSA-87 CA, and ``wot.evaluate`` on 1 and on 4 endorsements (ML-DSA-87
introducers, ML-DSA-65 gateway key), plus the bytes each adds to RESP/CONFIRM (the ``certs``
field). Writes bench/results/wot.json.

Run: .venv/bin/python bench/wot_bench.py [--quick]
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.core.wire import encode_certs
from gateway.credentials import ALLOWED_PEER_ALGS
from gateway.crypto import wot, x509


def _median_ms(fn: Callable[[], object], n: int) -> float:
    fn()  # warm up
    samples = []
    for _ in range(n):
        t = time.process_time_ns()
        fn()
        samples.append((time.process_time_ns() - t) / 1e6)
    return round(statistics.median(samples), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "wot.json")
    args = ap.parse_args()
    n = 20 if args.quick else 200
    now = datetime.datetime.now(datetime.UTC)

    ca_cert, ca_key = x509.create_ca("bench CA")
    leaf, _ = x509.issue_cert(ca_cert, ca_key, "site-a")
    chain = x509.load_cert_chain(leaf)

    intros = [wot.create_introducer(f"i{k}") for k in range(4)]
    trusts = [wot.Trust.FULL] + [wot.Trust.MARGINAL] * 3
    configured = tuple(wot.load_introducer(c, t) for (c, _), t in zip(intros, trusts, strict=True))
    _, pub = wot.create_gateway_key()
    ends = [x509.load_cert_chain(wot.endorse(c, k, "site-a", pub))[0] for c, k in intros]

    def judge(certs: list[bytes]) -> Callable[[], object]:
        def run() -> object:
            v = wot.evaluate(certs, configured, "site-a", now, allowed_algs=ALLOWED_PEER_ALGS)
            assert v.accepted
            return v

        return run

    rows: dict[str, Any] = {
        "pki_chain_verify": {
            "median_ms": _median_ms(
                lambda: x509.verify_peer(chain, ca_cert, "site-a", now, ALLOWED_PEER_ALGS), n
            ),
            "certs_bytes": len(encode_certs(tuple(chain))),
        },
        "wot_1_full_endorsement": {
            "median_ms": _median_ms(judge(ends[:1]), n),
            "certs_bytes": len(encode_certs(tuple(ends[:1]))),
        },
        "wot_3_marginal_endorsements": {
            "median_ms": _median_ms(judge(ends[1:]), n),
            "certs_bytes": len(encode_certs(tuple(ends[1:]))),
        },
        "wot_4_endorsements": {
            "median_ms": _median_ms(judge(ends), n),
            "certs_bytes": len(encode_certs(tuple(ends))),
        },
    }
    result = {
        "what": "CPU time (process_time) of the peer check before the handshake signature; "
        "median of n runs, one process, same run; certs_bytes = size of the certs field",
        "n": n,
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other work)",
        "python": platform.python_version(),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
