"""``qgw kme serve``: run the KME simulator (one process for both KMEs, or one KME each)."""

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
