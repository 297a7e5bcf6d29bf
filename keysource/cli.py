"""``qgw kme serve``: run the KME simulator (one process for both KMEs, or one KME each).

``qgw kme keyrate``: key rate versus distance of a BB84 preset (analytic bound [LMC05] and,
with ``--simulate``, what the simulator's pipeline achieved); see docs/keysource.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_kme_serve(args: argparse.Namespace) -> int:
    # Lazy: `qgw --help` must not import aiohttp and the simulator.
    import asyncio  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from gateway.logs import setup_logging  # noqa: PLC0415
    from keysource.kme_config import load_kme_config  # noqa: PLC0415
    from keysource.simulator import serve_forever  # noqa: PLC0415

    cfg = load_kme_config(args.config)
    setup_logging(args.log_level)
    which = {"a": "A", "b": "B", "both": "both"}[args.kme.lower()]

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_forever(cfg, which, stop)  # type: ignore[arg-type]

    asyncio.run(main())
    return 0


def _distances(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("distances: comma-separated numbers (km)") from None
    if not out or any(not 0 <= d <= 1000 for d in out):
        raise argparse.ArgumentTypeError("distances: 1 or more values from 0 to 1000 km")
    return out


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a number from 0 to 1") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError("a number from 0 to 1")
    return v


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def cmd_kme_keyrate(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415 -- numpy only for this command and the bb84 model

    from keysource import bb84_keyrate  # noqa: PLC0415
    from keysource.bb84_physics import preset  # noqa: PLC0415

    pre = preset(args.preset)
    if args.max_distance:
        d = bb84_keyrate.max_distance(pre.params, args.eve_fraction)
        if args.json:
            print(json.dumps({"max_distance_km": round(d, 3)}))
        else:
            print(f"{pre.name}: asymptotic decoy-state rate reaches 0 at {d:.1f} km")
        return 0
    rng = np.random.default_rng(args.seed)
    distances = args.distance_km or list(pre.default_distances_km)
    rows = [
        bb84_keyrate.row(
            pre.params,
            float(d),
            eve_fraction=args.eve_fraction,
            simulate_seconds=args.simulate,
            rng=rng,
            block_sifted_bits=args.block_bits,
        )
        for d in distances
    ]
    if args.json:
        print(json.dumps({"preset": pre.name, "rows": rows}))
        return 0
    print(f"preset {pre.name}: {pre.source}")
    head = f"{'km':>7} {'mu*':>6} {'bits/pulse':>11} {'asym. bit/s':>12}"
    if args.simulate:
        head += f" | {'QBER':>7} {'sifted bit/s':>12} {'secret bit/s':>12} {'f_EC':>6} {'PA':>7}"
    print(head)
    for r in rows:
        line = (
            f"{r['distance_km']:7.1f} {r['mu']:6.3f} {r['asymptotic_bits_per_pulse']:11.3e} "
            f"{r['asymptotic_bps']:12.4g}"
        )
        if args.simulate:
            line += (
                f" | {_fmt(r['qber'], '7.2%')} {r['sifted_bps']:12.4g} {r['secret_bps']:12.4g} "
                f"{_fmt(r['ec_efficiency'], '6.3f')} {_fmt(r['pa_ratio'], '7.4f')}"
                + ("  ABORTED" if r["aborted"] else "")
            )
        print(line)
    return 0


def register(sub: Any) -> None:
    """Add ``qgw kme serve`` to the CLI."""
    p = sub.add_parser(
        "kme",
        help="KME simulator (ETSI GS QKD 014 over mutual TLS, with a QKD link model)",
        description="KME simulator for tests and demos. See docs/keysource.md.",
    )
    ksub = p.add_subparsers(dest="kme_command", metavar="SUBCOMMAND", required=True)
    s = ksub.add_parser(
        "serve",
        help="serve KME A and/or KME B as configured in kme.toml",
        description="Serve the ETSI 014 API of KME A and KME B (--kme both, one process) or of "
        "one KME (--kme A / --kme B, two processes kept in sync over the KME-to-KME mTLS "
        "channel; KME A owns the link model). Prints 'ready' on stdout once listening. "
        "Stop with SIGINT or SIGTERM.",
    )
    s.add_argument("--config", "-c", type=Path, required=True, help="kme.toml")
    s.add_argument(
        "--kme",
        choices=["A", "B", "both", "a", "b"],
        default="both",
        help="which KME this process serves (default both)",
    )
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    s.set_defaults(handler=cmd_kme_serve)
    k = ksub.add_parser(
        "keyrate",
        help="key rate vs distance of a decoy-state BB84 preset (analytic and simulated)",
        description="Per distance: the asymptotic decoy-state key rate (Lo-Ma-Chen 2005, "
        "infinitely many decoys, symmetric BB84) in bits/pulse and bits/s at the preset's "
        "pulse rate, and the optimal signal intensity; with --simulate SECONDS, the rate, "
        "QBER, EC efficiency and PA ratio the simulator's pipeline achieved over that much "
        'link time. --json prints {"preset": ..., "rows": [...]}.',
    )
    k.add_argument("--preset", required=True, choices=["gys", "metro", "long"])
    k.add_argument(
        "--distance-km",
        type=_distances,
        default=None,
        metavar="D1,D2,...",
        help="fibre lengths (default: the preset's list)",
    )
    k.add_argument(
        "--eve-fraction",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="intercept-resend attacker on this fraction of the pulses (default 0)",
    )
    k.add_argument(
        "--simulate",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also run SECONDS of link time through the pipeline at each distance",
    )
    k.add_argument(
        "--max-distance",
        action="store_true",
        help='print where the asymptotic rate reaches 0 ({"max_distance_km": ...} with --json)',
    )
    k.add_argument("--json", action="store_true", help="machine-readable output")
    k.add_argument("--seed", type=int, default=None, help="seed of the simulation")
    k.add_argument(
        "--block-bits",
        type=int,
        default=1 << 17,
        help="sifted Z bits per post-processing block in --simulate (default 131072)",
    )
    k.set_defaults(handler=cmd_kme_keyrate)
