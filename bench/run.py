"""Run every benchmark in this folder (each writes its JSON to bench/results/), then the report.

    .venv/bin/python bench/run.py [--quick] [--only e2e_bench.py,...] [--no-report]

Scripts run one after the other (never two at once: they would measure each other). Each gets
``--quick`` when asked for and when it accepts it (mqtt_clients.py gets fewer messages instead).
Scripts added to this folder later (e.g. flood_bench.py) run too, with ``--quick`` only if
their ``--help`` mentions it. Afterwards bench/report.py regenerates the plots,
docs/benchmarks.md and the README's performance table from the JSON alone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# in this order; the end-to-end benchmark last (the longest)
KNOWN = ["crypto_bench.py", "protocol_bench.py", "mqtt_clients.py", "e2e_bench.py"]
NOT_BENCHMARKS = {"run.py", "report.py", "e2e_schema.py", "__init__.py"}
QUICK_ARGS = {"mqtt_clients.py": ["--messages", "5000", "--rounds", "1"]}


def scripts() -> list[str]:
    extra = sorted(
        p.name for p in HERE.glob("*.py") if p.name not in NOT_BENCHMARKS and p.name not in KNOWN
    )
    return [n for n in KNOWN if (HERE / n).exists()][:-1] + extra + ["e2e_bench.py"]


def quick_args(name: str) -> list[str]:
    if name in QUICK_ARGS:
        return QUICK_ARGS[name]
    try:
        help_text = subprocess.run(
            [sys.executable, str(HERE / name), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except subprocess.TimeoutExpired:
        return []
    return ["--quick"] if "--quick" in help_text else []


def main() -> int:
    ap = argparse.ArgumentParser(description="run every bench/ script, then bench/report.py")
    ap.add_argument("--quick", action="store_true", help="short runs (about 4 minutes in all)")
    ap.add_argument("--only", default="", help="comma-separated script names")
    ap.add_argument("--no-report", action="store_true", help="do not run bench/report.py")
    args = ap.parse_args()
    names = [n for n in scripts() if not args.only or n in args.only.split(",")]
    failed = []
    t_all = time.monotonic()
    for name in names:
        argv = [sys.executable, str(HERE / name), *(quick_args(name) if args.quick else [])]
        print(f"== {name} {' '.join(argv[2:])}", flush=True)
        t = time.monotonic()
        rc = subprocess.call(argv)
        print(f"== {name}: exit {rc}, {time.monotonic() - t:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if not args.no_report:
        print("== report.py", flush=True)
        if subprocess.call([sys.executable, str(HERE / "report.py")]) != 0:
            failed.append("report.py")
    print(
        f"== all done in {time.monotonic() - t_all:.0f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
