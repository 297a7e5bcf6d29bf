"""Run every formal model of qgw/1 and write the receipt ``formal/results.json``.

    python formal/run.py              # ProVerif (if on PATH) and spin; writes results.json
    python formal/run.py --spin-only  # only the Promela models (what CI can run)
    python formal/run.py --proverif-only [MODEL.pv ...]
    python formal/run.py --only MODEL.pv [--only MODEL.pv ...]   # just these ProVerif files

Running a subset rewrites only those files' entries of the receipt; the entries of every other
file are kept (they stay valid as long as that file and qgw.pvl are unchanged, which the receipt
test checks by hash).

ProVerif is not packaged in Debian, PyPI or npm: formal/README.md says how to build it. Each
ProVerif query in a model file is preceded by a marker comment ``(*@ ID *)``; the results are
read from ProVerif's "Verification summary" in file order and named by those markers. ProVerif
prints no per-query time, so a query's ``seconds`` is the wall time from the previous result
line (or from the start) to its own result line, read from ProVerif's output as it streams. ProVerif's whole output (with the attack traces of
false queries) is kept in ``$TMPDIR/qgw-proverif-logs/MODEL.log``.

Each Promela model (``SPIN_RUNS``: model file, defines) is run by spin as ``spin [-D...] -a``, ``gcc -O2 -DSAFETY pan.c``,
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
from typing import Any

HERE = Path(__file__).resolve().parent
RECEIPT = HERE / "results.json"
PROVERIF_DIR = HERE / "proverif"
LIB = "qgw.pvl"
# The model files, in the order the README's table lists them.
PROVERIF_MODELS = [
    "bootstrap_pki.pv",
    "bootstrap_pki_auth.pv",
    "bootstrap_psk.pv",
    "sanity_nosig.pv",
    "rekey.pv",
    "resume.pv",
    "resume_fixed.pv",
    "bootstrap_off.pv",
    "admission.pv",
    "downgrade.pv",
    "rekey2.pv",
    "rekey2_pref_sec.pv",
    "rekey2_pref_auth.pv",
    "reflect.pv",
    "reflect_rk.pv",
]
SPIN_MODELS = ["spin/epochs.pml", "spin/keyids.pml"]
# (id, model, spin -D defines, expected outcome)
SPIN_RUNS = [
    ("S-EPOCHS", "spin/epochs.pml", [], "pass"),
    ("S-SANITY-NO-NEXT", "spin/epochs.pml", ["-DNO_NEXT"], "counterexample"),
    ("S-SANITY-FORGET-NEXT", "spin/epochs.pml", ["-DFORGET_NEXT"], "counterexample"),
    ("S-KEYIDS", "spin/keyids.pml", [], "pass"),
    ("S-KEYIDS-SET-ONLY", "spin/keyids.pml", ["-DKME_REPEATS", "-DRESTARTS=0"], "pass"),
    ("S-KEYIDS-KME-ONLY", "spin/keyids.pml", ["-DNO_USED_SET", "-DRESTARTS=0"], "pass"),
    (
        "S-SANITY-KEYIDS-NO-SET",
        "spin/keyids.pml",
        ["-DKME_REPEATS", "-DNO_USED_SET", "-DRESTARTS=0"],
        "counterexample",
    ),
    ("S-SANITY-KEYIDS-RESTART", "spin/keyids.pml", ["-DKME_REPEATS"], "counterexample"),
    (
        "S-SANITY-KEYIDS-EVICT",
        "spin/keyids.pml",
        ["-DKME_REPEATS", "-DRESTARTS=0", "-DCAP=2"],
        "counterexample",
    ),
]
PROVERIF_TIMEOUT = 3600.0
# ProVerif's full output (attack traces included) goes here, outside the repository.
LOGS = Path(tempfile.gettempdir()) / "qgw-proverif-logs"
SPIN_TIMEOUT = 300.0
MARKER = re.compile(r"\(\*@\s*([A-Za-z0-9_-]+)\s*\*\)")
RESULT = re.compile(r"^RESULT (.*) is (true|false|cannot be proved)\.\s*$")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def query_ids(model: Path) -> list[str]:
    """The ``(*@ ID *) query`` markers of a model file, in order."""
    return MARKER.findall(model.read_text())


def run_proverif(model: str, proverif: str) -> dict[str, Any]:
    """Run one model; return its receipt entry (hash, per-query result and time)."""
    path = PROVERIF_DIR / model
    digest = sha256(path)  # the file as it is run
    ids = query_ids(path)
    start = last = time.monotonic()
    results: list[tuple[str, float]] = []
    LOGS.mkdir(exist_ok=True)
    log = (LOGS / (model + ".log")).open("w")
    with (
        log,
        subprocess.Popen(  # noqa: S603 -- the proverif found on PATH, our model files
            [proverif, "-lib", LIB, model],
            cwd=PROVERIF_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
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
        "sha256": digest,
        "seconds": round(last - start, 2),
        "queries": [
            {"id": qid, "result": res, "seconds": secs}
            for qid, (res, secs) in zip(ids, results, strict=True)
        ],
    }


def run_spin(model: str, defines: list[str], workdir: Path) -> dict[str, object]:
    """spin -a, gcc, ./pan in ``workdir``; the outcome and pan's state count."""
    src = HERE / model
    shutil.copy(src, workdir / src.name)
    start = time.monotonic()
    subprocess.run(  # noqa: S603 -- spin and gcc from PATH (setup.sh), our model
        ["spin", *defines, "-a", src.name],  # noqa: S607
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
    found = re.search(r"(\d+\.\d+)", out[0]) if out else None
    return found.group(1) if found else "unknown"


def spin_all() -> dict[str, object]:
    """Every spin run, grouped by model file: {model: {sha256, version, runs}}."""
    out: dict[str, object] = {}
    version = spin_version()
    for model in SPIN_MODELS:
        runs = []
        for run_id, run_model, defines, expected in SPIN_RUNS:
            if run_model != model:
                continue
            with tempfile.TemporaryDirectory(prefix="qgw-spin-") as tmp:
                r = run_spin(model, defines, Path(tmp))
            runs.append({"id": run_id, "defines": defines, "expected": expected, **r})
            print(f"{model} {' '.join(defines) or '(default)'}: {r['outcome']}", flush=True)
        out[model] = {"sha256": sha256(HERE / model), "version": version, "runs": runs}
    return out


def save(update: dict[str, Any]) -> None:
    """Merge one result into the receipt as it is now (several runs may go on at once)."""
    receipt = json.loads(RECEIPT.read_text()) if RECEIPT.exists() else {}
    receipt.setdefault("proverif", {"version": None, "lib": {}, "models": {}})
    if "spin" in update:
        receipt["spin"] = update["spin"]
    if "model" in update:
        pv = receipt["proverif"]
        if pv["lib"] != update["lib"]:  # the library changed: other models' results are stale
            pv["models"] = {}
        pv["version"], pv["lib"] = update["version"], update["lib"]
        pv["models"][update["model"]] = update["entry"]
    RECEIPT.write_text(json.dumps(receipt, indent=2, sort_keys=True) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spin-only", action="store_true")
    ap.add_argument("--proverif-only", action="store_true")
    ap.add_argument("models", nargs="*", help="ProVerif model files (default: all)")
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="MODEL.pv",
        help="run just this ProVerif model file (repeatable); implies --proverif-only",
    )
    args = ap.parse_args()
    if args.only:
        unknown = sorted(set(args.only) - set(PROVERIF_MODELS))
        if unknown:
            ap.error(f"not a model of PROVERIF_MODELS: {', '.join(unknown)}")
        args.proverif_only = True
        args.models = [*args.models, *args.only]
    if not args.proverif_only:
        save({"spin": spin_all()})
    if args.spin_only:
        return 0
    proverif = shutil.which("proverif")
    if proverif is None:
        print("proverif not on PATH: see formal/README.md", file=sys.stderr)
        return 2
    version = proverif_version(proverif)
    lib = {LIB: sha256(PROVERIF_DIR / LIB)}
    for model in args.models or PROVERIF_MODELS:
        entry = run_proverif(model, proverif)
        save({"model": model, "entry": entry, "version": version, "lib": lib})
        for q in entry["queries"]:
            print(f"{model} {q['id']}: {q['result']} ({q['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
