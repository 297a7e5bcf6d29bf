"""Run every formal model of qgw/1 and write the receipt ``formal/results.json``.

    python formal/run.py              # ProVerif (if on PATH) and spin; writes results.json
    python formal/run.py --spin-only  # only the Promela model (what CI can run)

ProVerif is not packaged in Debian, PyPI or npm: formal/README.md says how to build it. Each
ProVerif query in a model file is preceded by a marker comment ``(*@ ID *)``; the results are
read from ProVerif's "Verification summary" in file order and named by those markers. ProVerif
prints no per-query time, so a query's ``seconds`` is the wall time from the previous result
line (or from the start) to its own result line, read from ProVerif's output as it streams.

The Promela model is run by spin as ``spin [-D...] -a``, ``gcc -O2 -DSAFETY pan.c``,
``./pan -m200000`` in a temporary folder; a run ``passes`` when pan reports ``errors: 0`` and
a full search, and ``fails`` (a counterexample) when it reports errors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECEIPT = HERE / "results.json"
PROVERIF_DIR = HERE / "proverif"
LIB = "qgw.pvl"
# The model files, in the order the README's table lists them.
PROVERIF_MODELS: list[str] = []
SPIN_MODEL = "spin/epochs.pml"
# (id, spin -D defines, expected outcome)
SPIN_RUNS = [
    ("S-EPOCHS", [], "pass"),
    ("S-SANITY-NO-NEXT", ["-DNO_NEXT"], "counterexample"),
    ("S-SANITY-FORGET-NEXT", ["-DFORGET_NEXT"], "counterexample"),
]
PROVERIF_TIMEOUT = 900.0
SPIN_TIMEOUT = 300.0
MARKER = re.compile(r"\(\*@\s*([A-Za-z0-9_-]+)\s*\*\)\s*query\b")
RESULT = re.compile(r"^RESULT (.*) is (true|false|cannot be proved)\.\s*$")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def query_ids(model: Path) -> list[str]:
    """The ``(*@ ID *) query`` markers of a model file, in order."""
    return MARKER.findall(model.read_text())


def run_proverif(model: str, proverif: str) -> dict[str, object]:
    """Run one model; return its receipt entry (hash, per-query result and time)."""
    path = PROVERIF_DIR / model
    ids = query_ids(path)
    start = last = time.monotonic()
    results: list[tuple[str, float]] = []
    with subprocess.Popen(  # noqa: S603 -- the proverif found on PATH, our model files
        [proverif, "-lib", LIB, model],
        cwd=PROVERIF_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = RESULT.match(line.strip())
            if m:
                now = time.monotonic()
                results.append((m.group(2), round(now - last, 2)))
                last = now
            if time.monotonic() - start > PROVERIF_TIMEOUT:
                proc.kill()
                break
        rc = proc.wait()
    if rc != 0 or len(results) != len(ids):
        raise SystemExit(
            f"{model}: proverif exit {rc}, {len(results)} results for {len(ids)} queries"
        )
    return {
        "sha256": sha256(path),
        "seconds": round(last - start, 2),
        "queries": [
            {"id": qid, "result": res, "seconds": secs}
            for qid, (res, secs) in zip(ids, results, strict=True)
        ],
    }


def run_spin(defines: list[str], workdir: Path) -> dict[str, object]:
    """spin -a, gcc, ./pan in ``workdir``; the outcome and pan's state count."""
    src = HERE / SPIN_MODEL
    shutil.copy(src, workdir / "epochs.pml")
    start = time.monotonic()
    subprocess.run(  # noqa: S603 -- spin and gcc from PATH (setup.sh), our model
        ["spin", *defines, "-a", "epochs.pml"],  # noqa: S607
        cwd=workdir,
        check=True,
        capture_output=True,
        timeout=SPIN_TIMEOUT,
    )
    subprocess.run(
        ["gcc", "-O2", "-DSAFETY", "-o", "pan", "pan.c"],  # noqa: S607
        cwd=workdir,
        check=True,
        capture_output=True,
        timeout=SPIN_TIMEOUT,
    )
    out = subprocess.run(
        ["./pan", "-m200000"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=SPIN_TIMEOUT,
        check=False,
    ).stdout
    errors = re.search(r"errors: (\d+)", out)
    states = re.search(r"(\d+) states, stored", out)
    if errors is None or states is None:
        raise RuntimeError("pan printed no result:\n" + out)
    if int(errors.group(1)) > 0:
        outcome = "counterexample"
    elif "Search not completed" in out or "max search depth too small" in out:
        outcome = "incomplete"
    else:
        outcome = "pass"
    return {
        "outcome": outcome,
        "states": int(states.group(1)),
        "seconds": round(time.monotonic() - start, 2),
    }


def spin_version() -> str:
    out = subprocess.run(
        ["spin", "-V"],  # noqa: S607 -- spin from PATH (setup.sh)
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return out.strip()


def proverif_version(proverif: str) -> str:
    out = subprocess.run(  # noqa: S603 -- the proverif found on PATH
        [proverif, "-help"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return out[0].split(".")[0] + "." + out[0].split(".")[1] if out else "unknown"


def spin_all() -> dict[str, object]:
    runs = []
    for run_id, defines, expected in SPIN_RUNS:
        with tempfile.TemporaryDirectory(prefix="qgw-spin-") as tmp:
            r = run_spin(defines, Path(tmp))
        runs.append({"id": run_id, "defines": defines, "expected": expected, **r})
        print(f"{SPIN_MODEL} {' '.join(defines) or '(default)'}: {r['outcome']}", flush=True)
    return {"sha256": sha256(HERE / SPIN_MODEL), "version": spin_version(), "runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spin-only", action="store_true")
    ap.add_argument("models", nargs="*", help="ProVerif model files (default: all)")
    args = ap.parse_args()
    receipt = json.loads(RECEIPT.read_text()) if RECEIPT.exists() else {}
    receipt.setdefault("proverif", {"version": None, "lib": {}, "models": {}})
    receipt["spin"] = {SPIN_MODEL: spin_all()}
    proverif = shutil.which("proverif")
    if not args.spin_only:
        if proverif is None:
            print("proverif not on PATH: see formal/README.md", file=sys.stderr)
            return 2
        pv = receipt["proverif"]
        pv["version"] = proverif_version(proverif)
        pv["lib"] = {LIB: sha256(PROVERIF_DIR / LIB)} if PROVERIF_MODELS else {}
        for model in args.models or PROVERIF_MODELS:
            entry = run_proverif(model, proverif)
            pv["models"][model] = entry
            for q in entry["queries"]:  # type: ignore[attr-defined]
                print(f"{model} {q['id']}: {q['result']} ({q['seconds']} s)", flush=True)
    RECEIPT.write_text(json.dumps(receipt, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
