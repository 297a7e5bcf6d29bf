"""The formal models (formal/) and their receipt (formal/results.json).

- Every model file's SHA-256 must equal the one recorded in the receipt: a model edited without
  re-running it (``python formal/run.py``) fails here.
- Every recorded result must equal the expected column of the table in formal/README.md (and
  the README's "obtained" column must say what the receipt says).
- When ``proverif`` is on PATH, the ProVerif models are run for real and must give the expected
  results (ProVerif is not packaged; CI checks the receipt instead).
- spin (installed by scripts/setup.sh) checks the Promela models for real (the epoch slots,
  key-ID reuse): each model must pass and each sanity variant must produce a counterexample.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORMAL = ROOT / "formal"


def _load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qgw_formal_run", FORMAL / "run.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


run = _load_runner()


def _receipt() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FORMAL / "results.json").read_text())
    return data


def _table() -> dict[str, dict[str, str]]:
    """The README's table of queries: id -> {model, expected, obtained}."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] | None = None
    for line in (FORMAL / "README.md").read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if not {"id", "model", "expected", "obtained"} <= set(header) or set(cells[0]) <= {"-"}:
            continue
        row = dict(zip(header, cells, strict=False))
        qid = row["id"].strip("`")
        assert qid not in rows, f"{qid} twice in formal/README.md"
        rows[qid] = {k: row[k].strip("`") for k in ("model", "expected", "obtained")}
    return rows


def _recorded() -> dict[str, tuple[str, str]]:
    """id -> (model file, result) from the receipt, ProVerif queries and spin runs."""
    out: dict[str, tuple[str, str]] = {}
    for model, entry in _receipt()["proverif"]["models"].items():
        for q in entry["queries"]:
            out[q["id"]] = (model, q["result"])
    for model, entry in _receipt()["spin"].items():
        for r in entry["runs"]:
            out[r["id"]] = (Path(model).name, r["outcome"])
    return out


def test_every_model_file_matches_its_recorded_hash() -> None:
    receipt = _receipt()
    pv = receipt["proverif"]
    recorded = {("proverif/" + m): e["sha256"] for m, e in pv["models"].items()}
    recorded.update({("proverif/" + m): h for m, h in pv["lib"].items()})
    recorded.update({m: e["sha256"] for m, e in receipt["spin"].items()})
    on_disk = {
        str(p.relative_to(FORMAL))
        for p in [*FORMAL.glob("proverif/*.pv"), *FORMAL.glob("proverif/*.pvl")]
    } | {str(p.relative_to(FORMAL)) for p in FORMAL.glob("spin/*.pml")}
    assert on_disk == set(recorded), "model files and receipt differ: run python formal/run.py"
    assert set(pv["models"]) == set(run.PROVERIF_MODELS)
    assert set(receipt["spin"]) == set(run.SPIN_MODELS)
    for rel, digest in sorted(recorded.items()):
        assert run.sha256(FORMAL / rel) == digest, f"{rel} changed since its recorded run"
    if pv["models"]:
        assert pv["version"] == "2.05"


def test_recorded_results_are_the_expected_table() -> None:
    table, recorded = _table(), _recorded()
    assert set(table) == set(recorded), "formal/README.md table and results.json name other ids"
    for qid, (model, result) in sorted(recorded.items()):
        row = table[qid]
        assert row["model"] == model, qid
        assert row["obtained"] == result, f"{qid}: README says {row['obtained']}, receipt {result}"
        assert row["expected"] == result, f"{qid}: expected {row['expected']}, obtained {result}"
    # Not vacuous: every sanity variant is expected to find its attack.
    sanity = [q for q in table if "SANITY" in q]
    assert sanity
    assert all(table[q]["expected"] in ("false", "counterexample") for q in sanity)


def test_query_markers_match_the_receipt() -> None:
    for model, entry in _receipt()["proverif"]["models"].items():
        ids = run.query_ids(FORMAL / "proverif" / model)
        assert ids == [q["id"] for q in entry["queries"]], model


@pytest.mark.parametrize("model", run.PROVERIF_MODELS)
def test_proverif_model_results(model: str) -> None:
    """ProVerif for real when it is on PATH; without it (CI) the receipt stands in."""
    proverif = shutil.which("proverif")
    if proverif is None:
        entry = _receipt()["proverif"]["models"][model]
    else:
        entry = run.run_proverif(model, proverif)
        assert entry["sha256"] == _receipt()["proverif"]["models"][model]["sha256"]
    table = _table()
    for q in entry["queries"]:
        assert q["result"] == table[q["id"]]["expected"], q["id"]


@pytest.mark.parametrize(("run_id", "model", "defines", "expected"), run.SPIN_RUNS)
def test_spin_models(
    run_id: str, model: str, defines: list[str], expected: str, tmp_path: Path
) -> None:
    """epochs.pml (the epoch slots) and keyids.pml (key-ID reuse), for real."""
    result = run.run_spin(model, defines, tmp_path)
    assert result["outcome"] == expected, (run_id, result)
    assert _table()[run_id]["expected"] == expected
