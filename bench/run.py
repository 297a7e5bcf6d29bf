"""Run every benchmark in this folder; each writes its JSON to bench/results/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["crypto_bench.py", "protocol_bench.py", "mqtt_clients.py", "e2e_bench.py"]


def main() -> int:
    failed = 0
    for name in SCRIPTS:
        path = HERE / name
        if not path.exists():
            continue
        print(f"== {name}", flush=True)
        rc = subprocess.call([sys.executable, str(path), *sys.argv[1:]])
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
