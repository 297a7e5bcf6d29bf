"""Record the key-schedule known-answer vectors (tests/vectors/key_schedule.json).

Run: python -m tests.vectors.make_key_schedule   (rewrites the file; review the diff!)

Inputs are drawn from random.Random(SEED); every intermediate secret of the bootstrap cascade
(KS1..KS6) and of two chained rekeys (RK-KS1..RK-KS4) is recorded. The file is a regression
vector of this implementation, and tests/core/test_vectors.py also recomputes it with an
independent HKDF written from RFC 5869 on top of Python's hmac module.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from gateway.core import schedule

SEED = 20261126


def build() -> dict[str, object]:
    r = random.Random(SEED)
    cases = []
    for name, psk, qkd in (
        ("pki+qkd", None, r.randbytes(32)),
        ("psk+qkd", r.randbytes(32), r.randbytes(32)),
        ("pki, qkd absent", None, None),
        ("psk, qkd absent", r.randbytes(32), None),
    ):
        mlkem, x = r.randbytes(32), r.randbytes(32)
        th3 = r.randbytes(48)
        bs = schedule.bootstrap_secret(psk, qkd, mlkem, x)
        k0 = schedule.epoch_keys(bs["S3"], th3)
        rekeys = []
        chain = k0.chain
        for epoch in (1, 2):
            rq, rm, rx, th = r.randbytes(32), r.randbytes(32), r.randbytes(32), r.randbytes(48)
            rs = schedule.rekey_secret(chain, rq, rm, rx)
            ks = schedule.epoch_keys(rs["R2"], th)
            mac_i, mac_r = schedule.rekey_mac_keys(chain, epoch)
            rekeys.append(
                {
                    "epoch": epoch,
                    "inputs": {
                        "chain_prev": chain.hex(),
                        "qkd": rq.hex(),
                        "mlkem_ss": rm.hex(),
                        "x25519_ss": rx.hex(),
                        "th": th.hex(),
                    },
                    "mac_i": mac_i.hex(),
                    "mac_r": mac_r.hex(),
                    **{k: v.hex() for k, v in rs.items()},
                    **_keys(ks),
                }
            )
            chain = ks.chain
        cases.append(
            {
                "name": name,
                "inputs": {
                    "psk": psk.hex() if psk else None,
                    "qkd": qkd.hex() if qkd else None,
                    "mlkem_ss": mlkem.hex(),
                    "x25519_ss": x.hex(),
                    "th3": th3.hex(),
                },
                **{k: v.hex() for k, v in bs.items()},
                **_keys(k0),
                "rekeys": rekeys,
            }
        )
    return {
        "source": f"recorded from gateway.core.schedule with random.Random({SEED}); "
        "see tests/vectors/make_key_schedule.py and docs/protocol.md section 4",
        "vectors": cases,
    }


def _keys(k: schedule.EpochKeys) -> dict[str, str]:
    return {
        "key_i2r": k.key_i2r.hex(),
        "iv_i2r": k.iv_i2r.hex(),
        "key_r2i": k.key_r2i.hex(),
        "iv_r2i": k.iv_r2i.hex(),
        "chain": k.chain.hex(),
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("key_schedule.json")
    out.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {out}")
