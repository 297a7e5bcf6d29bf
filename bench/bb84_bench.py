"""Cost of the simulated BB84 link (not a test: no asserts).

Three measurements, all written to bench/results/bb84.json:

1. ``stages``: post-processing throughput per stage (sifting, estimation, Cascade,
   verification, privacy amplification), bits/s in and out, per block size, on the metro preset
   at 25 km; each figure is the median over ``--blocks`` blocks of CPU time (time.process_time
   per stage: on a shared machine wall time would mostly measure the other jobs).
2. ``live``: the demo's link (kme.toml written by ``qgw init-demo``: metro, 25 km, 10 MHz,
   262144-bit blocks) run for ``--live-seconds`` of link time: CPU seconds (process time) per
   second of link time = the share of one core the simulator needs to keep up in real time.
3. ``keyrate``: key rate versus distance for the plot in docs/keysource.md: the analytic
   [LMC05] curve and one simulated block of ``--plot-block-bits`` sifted bits per distance.

    PYTHONPATH=. python bench/bb84_bench.py [--quick] [--plot docs/keysource_bb84_keyrate.png]

The machine is shared while this runs: compare figures of one run with each other only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np

from keysource import bb84_keyrate
from keysource.bb84_link import Bb84Link, compute_block
from keysource.bb84_physics import draw_block, preset, pulses_for_sifted_z
from keysource.bb84_post import PostParams, process_block
from keysource.kme_config import Bb84Section
from keysource.link import LinkParams

RESULTS = ROOT / "bench" / "results" / "bb84.json"
STAGES = ("sift", "estimate", "error_correction", "verification", "privacy_amplification")


def stages(block_bits: list[int], blocks: int, seed: int) -> list[dict[str, Any]]:
    p = preset("metro").params.with_(distance_km=25.0)
    post = PostParams()
    rng = np.random.default_rng(seed)
    out = []
    for nz in block_bits:
        pulses = pulses_for_sifted_z(p, nz)
        per: dict[str, list[float]] = {s: [] for s in (*STAGES, "draw")}
        sizes: dict[str, list[int]] = {"detections": [], "sifted_z": [], "secret": []}
        effs = []
        for _ in range(blocks):
            t0 = time.process_time()
            raw = draw_block(p, pulses, rng)
            per["draw"].append(time.process_time() - t0)
            res = process_block(raw, p, post, rng, time.process_time)
            for s in STAGES:
                per[s].append(res.seconds.get(s, float("nan")))
            sizes["detections"].append(res.detections)
            sizes["sifted_z"].append(res.sifted_z)
            sizes["secret"].append(res.secret_bits)
            effs.append(res.ec_efficiency)
        det = statistics.median(sizes["detections"])
        nzm = statistics.median(sizes["sifted_z"])
        sec = statistics.median(sizes["secret"])
        bits_in = {
            "draw": det,
            "sift": det,
            "estimate": det - nzm,
            "error_correction": nzm,
            "verification": nzm,
            "privacy_amplification": nzm,
        }
        bits_out = {
            "draw": det,
            "sift": nzm,
            "estimate": nzm,
            "error_correction": nzm,
            "verification": nzm,
            "privacy_amplification": sec,
        }
        row: dict[str, Any] = {
            "preset": "metro",
            "distance_km": 25.0,
            "block_sifted_bits": nz,
            "blocks": blocks,
            "median_detections": det,
            "median_sifted_z": nzm,
            "median_secret_bits": sec,
            "median_ec_efficiency": statistics.median(effs),
            "stages": {},
        }
        total = 0.0
        for s in ("draw", *STAGES):
            ran = [x for x in per[s] if not math.isnan(x)]  # PA only runs on blocks that gave key
            med = statistics.median(ran) if ran else float("nan")
            total += med
            row["stages"][s] = {
                "blocks_run": len(ran),
                "median_seconds": med,
                "bits_in_per_s": bits_in[s] / med if med > 0 else None,
                "bits_out_per_s": bits_out[s] / med if med > 0 else None,
            }
        row["median_seconds_per_block"] = total
        row["secret_bits_per_cpu_second"] = sec / total
        out.append(row)
        print(
            f"stages  block {nz:>7}: {total * 1e3:7.1f} ms/block, "
            + ", ".join(f"{s} {row['stages'][s]['median_seconds'] * 1e3:.1f} ms" for s in STAGES),
            flush=True,
        )
    return out


def demo_settings() -> Any:
    """The [link.bb84] table qgw init-demo writes (parsed the same way)."""
    import tomllib

    from gateway.initdemo import KME_TOML_BB84

    table = tomllib.loads(KME_TOML_BB84)["link"]["bb84"]
    return Bb84Section(**table).settings()


def live(link_seconds: float, seed: int) -> dict[str, Any]:
    settings = demo_settings()
    params = LinkParams(model="bb84", bb84=settings, max_key_count=100_000)
    link = Bb84Link(params, 0.0, np.random.default_rng(seed))
    n = max(1, round(link_seconds / link.block_seconds))
    claims = []
    for i in range(1, n + 1):
        claims.extend(link.claim(i * link.block_seconds * 1.000001))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for c in claims:
        link.absorb(c, compute_block(c))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    secs = len(claims) * link.block_seconds
    snap = link.snapshot(secs)
    share = cpu / secs
    print(
        f"live    demo link {secs:.1f} s in {cpu:.2f} s CPU: {share:.1%} of one core, "
        f"secret {snap['secret_bps']:.0f} bit/s, QBER {snap['qber']:.2%}",
        flush=True,
    )
    return {
        "link": "qgw init-demo kme.toml [link.bb84]",
        "block_sifted_bits": settings.block_sifted_bits,
        "blocks": len(claims),
        "block_seconds": link.block_seconds,
        "link_seconds": secs,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "cpu_share_of_one_core": share,
        "secret_bps": snap["secret_bps"],
        "sifted_bps": snap["sifted_bps"],
        "qber": snap["qber"],
        "ec_efficiency": snap["ec_efficiency"],
        "pa_ratio": snap["pa_ratio"],
        "full_rate_cores_needed": share * 1e9 / settings.physics().pulse_rate_hz,
    }


def keyrate(names: list[str], block_bits: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for name in names:
        pre = preset(name)
        p = pre.params
        dmax = bb84_keyrate.max_distance(p)
        grid = [float(x) for x in np.linspace(0, dmax, 80)] + [dmax * 0.995, dmax * 0.999]
        curve = [
            {"distance_km": d, "bits_per_pulse": bb84_keyrate.asymptotic(p.with_(distance_km=d))[1]}
            for d in grid
        ]
        points = []
        for d in pre.default_distances_km:
            at = p.with_(distance_km=float(d))
            pulses = pulses_for_sifted_z(at, block_bits)
            res = process_block(draw_block(at, pulses, rng), at, PostParams(), rng)
            points.append(
                {
                    "distance_km": float(d),
                    "block_sifted_bits": res.sifted_z,
                    "link_seconds": pulses / at.pulse_rate_hz,
                    "secret_bits": res.secret_bits,
                    "bits_per_pulse": res.secret_bits / pulses,
                    "qber": res.qber_x,
                    "ec_efficiency": res.ec_efficiency,
                    "abort_reason": res.abort_reason,
                }
            )
            print(
                f"keyrate {name:5} {d:5.0f} km: {res.secret_bits / pulses:.3e} bit/pulse "
                f"(asymptotic {bb84_keyrate.asymptotic(at)[1]:.3e}) {res.abort_reason}",
                flush=True,
            )
        out[name] = {"max_distance_km": dmax, "asymptotic": curve, "simulated": points}
    return out


def plot(data: dict[str, Any], path: Path, block_bits: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    colours = {"gys": "tab:blue", "metro": "tab:orange", "long": "tab:green"}
    for name, d in data.items():
        c = colours.get(name, "black")
        xs = [r["distance_km"] for r in d["asymptotic"] if r["bits_per_pulse"] > 0]
        ys = [r["bits_per_pulse"] for r in d["asymptotic"] if r["bits_per_pulse"] > 0]
        ax.semilogy(xs, ys, color=c, label=f"{name}: asymptotic, infinite decoys [LMC05]")
        px = [r["distance_km"] for r in d["simulated"] if r["bits_per_pulse"] > 0]
        py = [r["bits_per_pulse"] for r in d["simulated"] if r["bits_per_pulse"] > 0]
        ax.semilogy(px, py, "o", color=c, label=f"{name}: simulated block, finite key [Lim14]")
        zx = [r["distance_km"] for r in d["simulated"] if r["bits_per_pulse"] <= 0]
        if zx:
            ax.plot(zx, [2e-8] * len(zx), "x", color=c, label=f"{name}: simulated, no key")
    ax.set_ylim(1e-8, 1e-1)
    ax.set_xlabel("fibre length (km)")
    ax.set_ylabel("secret key rate (bits per pulse)")
    ax.set_title(f"Decoy-state BB84: analytic rate and pipeline output ({block_bits}-bit blocks)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"plot written to {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer blocks (smoke run)")
    ap.add_argument("--blocks", type=int, default=None, help="blocks per stage measurement")
    ap.add_argument("--live-seconds", type=float, default=None, help="link time of the live run")
    ap.add_argument("--plot", type=Path, default=None, help="write the key-rate PNG here")
    ap.add_argument("--plot-block-bits", type=int, default=1 << 20)
    ap.add_argument("--seed", type=int, default=2005)
    args = ap.parse_args()
    blocks = args.blocks or (3 if args.quick else 9)
    live_s = args.live_seconds or (10.0 if args.quick else 60.0)
    sizes = [1 << 17] if args.quick else [1 << 17, 1 << 18, 1 << 20]
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "bb84",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(),
        },
        "note": "machine shared with other jobs while measured: compare within one run",
        "stages": stages(sizes, blocks, args.seed),
        "live": live(live_s, args.seed),
    }
    names = ["gys", "metro"] if args.quick else ["gys", "metro", "long"]
    result["keyrate"] = keyrate(names, args.plot_block_bits, args.seed)
    result["host"]["loadavg_at_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - t0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results written to {RESULTS}")
    if args.plot:
        plot(result["keyrate"], args.plot, args.plot_block_bits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
