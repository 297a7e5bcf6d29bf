"""Cost of the cryptographic primitives, as the protocol uses them (not a test: no asserts).

Each operation runs for a fixed number of timed iterations after a warm-up; we report the
median and 95th percentile per operation (time.perf_counter) and, for AEAD, MB/s at the
median. Results go to bench/results/crypto.json and a table on stdout.

    PYTHONPATH=. python bench/crypto_bench.py [--quick] [--provider pyca|oqs]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import crypto as C
from gateway.crypto import CORE_KEMS, KemAlg, SigAlg, get_provider
from gateway.crypto import x509 as gx
from gateway.errors import ProviderUnavailable

RESULTS = ROOT / "bench" / "results" / "crypto.json"


def measure(fn: Callable[[], object], iterations: int, warmup: int = 20) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    p95 = samples[min(len(samples) - 1, int(len(samples) * 0.95))]
    return {
        "iterations": iterations,
        "median_us": statistics.median(samples) * 1e6,
        "p95_us": p95 * 1e6,
        "ops_per_s": 1.0 / statistics.median(samples),
    }


def run(quick: bool, provider_name: str) -> dict[str, Any]:
    n = 200 if quick else 2000
    n_slow = 50 if quick else 500  # signatures, chain verification
    provider = get_provider(provider_name)
    results: dict[str, dict[str, Any]] = {}

    def add(name: str, fn: Callable[[], object], iterations: int, nbytes: int = 0) -> None:
        r = measure(fn, iterations)
        if nbytes:
            r["bytes"] = nbytes
            r["mb_per_s"] = nbytes / (r["median_us"] / 1e6) / 1e6
        results[name] = r
        extra = f"  {r['mb_per_s']:9.1f} MB/s" if nbytes else ""
        print(f"{name:38s} {r['median_us']:10.1f} {r['p95_us']:10.1f}{extra}", flush=True)

    print(f"{'operation':38s} {'median µs':>10s} {'p95 µs':>10s}")
    for alg in sorted(CORE_KEMS if provider.name == "pyca" else KemAlg):
        # FrodoKEM (suite 0x03) exists only with the oqs provider (liboqs); OpenSSL lacks it
        seeds = [os.urandom(64) for _ in range(4)]
        add(
            f"{alg} keygen ({provider.name})",
            lambda a=alg, s=seeds: provider.kem_keygen(a, s[0]),
            n,
        )
        key = provider.kem_keygen(alg, seeds[1])
        pub = key.public_bytes()
        add(f"{alg} encaps ({provider.name})", lambda a=alg, p=pub: provider.encapsulate(a, p), n)
        ct, _ = provider.encapsulate(alg, pub)
        add(f"{alg} decaps ({provider.name})", lambda k=key, c=ct: provider.decapsulate(k, c), n)

    def x25519_ephemeral() -> bytes:
        k = C.X25519PrivateKey(os.urandom(32))
        k.public_bytes()
        return k.exchange(peer_pub)

    peer_pub = C.X25519PrivateKey(os.urandom(32)).public_bytes()
    add("X25519 keygen+public+exchange", x25519_ephemeral, n)

    msg, ctx = os.urandom(48), b"qgw bench"
    for alg in (SigAlg.MLDSA65, SigAlg.MLDSA87):
        skey = provider.sig_keygen(alg, os.urandom(32))
        sig = provider.sign(skey, msg, ctx)
        spub = skey.public_bytes()
        add(f"{alg} sign ({provider.name})", lambda k=skey: provider.sign(k, msg, ctx), n_slow)
        add(
            f"{alg} verify ({provider.name})",
            lambda a=alg, p=spub, s=sig: provider.verify(a, p, msg, s, ctx),
            n_slow,
        )

    ca, ca_key = gx.create_ca("bench CA")
    cert, _ = gx.issue_cert(ca, ca_key, "site-b")
    chain = gx.load_cert_chain(cert)
    now = dt.datetime.now(dt.UTC)
    allowed = {SigAlg.MLDSA65}
    add(
        "cert chain verify (ML-DSA-65 leaf, -87 CA)",
        lambda: gx.verify_peer(chain, ca, "site-b", now, allowed),
        n_slow,
    )
    results["cert chain verify (ML-DSA-65 leaf, -87 CA)"]["leaf_der_bytes"] = len(chain[0])

    prk = C.hkdf_extract(os.urandom(48), os.urandom(32))
    add("HKDF-SHA384 extract (32 B ikm)", lambda: C.hkdf_extract(prk, b"x" * 32), n)
    add("HKDF-SHA384 expand (32 B out)", lambda: C.hkdf_expand(prk, b"qgw label", 32), n)

    aead = C.Aead(os.urandom(32))
    nonce, aad = os.urandom(12), os.urandom(13)
    for size in (64, 1024, 16 * 1024):
        pt = os.urandom(size)
        sealed = aead.seal(nonce, pt, aad)
        add(f"AES-256-GCM seal {size} B", lambda p=pt: aead.seal(nonce, p, aad), n, size)
        add(f"AES-256-GCM open {size} B", lambda s=sealed: aead.open(nonce, s, aad), n, size)

    pkey = os.urandom(32)
    add("Poly1305 one-time tag (256 B msg)", lambda: C.poly1305_tag(pkey, msg * 5 + msg[:16]), n)
    add("HMAC-SHA384 (256 B msg)", lambda: C.hmac_sha384(prk, msg * 5 + msg[:16]), n)

    return {
        "bench": "crypto",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "provider": provider.name,
        "quick": quick,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "results": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument("--provider", default="pyca", choices=["pyca", "oqs"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    try:
        report = run(args.quick, args.provider)
    except ProviderUnavailable as exc:
        print(f"provider {args.provider} unavailable: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
