"""bench/results/e2e.json keeps the stable shape of issue 8 (bench/e2e_schema.py).

No timing here: the numbers are whatever the last `make bench` measured; only the shape counts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from bench.e2e_schema import validate_e2e

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "e2e.json"

GOOD: dict[str, Any] = {
    "machine": {"cpu": "x", "cores": 2},
    "date": "2026-12-01T14:00:00+00:00",
    "rows": [
        {
            "system": "qgw-bridge",
            "payload_bytes": 100,
            "qos": 1,
            "max_lossless_msgs_per_s": 2900.5,
            "latency_ms": {"200": {"p50": 1.4, "p99": 2.1, "p999": 3.0, "extra": "kept"}},
            "cpu_us_per_msg": {"gateway-a": 250.0, "loadgen-pub": 11.0},
            "idle_cpu_percent": {"gateway-a": 0.4},
            "added_key": [1, 2],
        }
    ],
}


def test_good_document_conforms() -> None:
    assert validate_e2e(GOOD) == []


def test_committed_results_conform() -> None:
    doc = json.loads(RESULTS.read_text())
    assert validate_e2e(doc) == []
    assert doc["rows"], "the committed e2e.json has no rows"


def _drop(doc: dict[str, Any], path: tuple[Any, ...]) -> None:
    for p in path[:-1]:
        doc = doc[p]
    del doc[path[-1]]


@pytest.mark.parametrize(
    "path",
    [
        ("machine",),
        ("date",),
        ("rows",),
        ("rows", 0, "system"),
        ("rows", 0, "payload_bytes"),
        ("rows", 0, "qos"),
        ("rows", 0, "max_lossless_msgs_per_s"),
        ("rows", 0, "latency_ms"),
        ("rows", 0, "cpu_us_per_msg"),
        ("rows", 0, "idle_cpu_percent"),
        ("rows", 0, "latency_ms", "200", "p50"),
        ("rows", 0, "latency_ms", "200", "p99"),
        ("rows", 0, "latency_ms", "200", "p999"),
    ],
)
def test_missing_key_is_reported(path: tuple[Any, ...]) -> None:
    doc = copy.deepcopy(GOOD)
    _drop(doc, path)
    assert validate_e2e(doc), f"dropping {path} went unnoticed"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("system", "mosquitto_tls_bridge"),  # renamed system
        ("payload_bytes", "100"),
        ("payload_bytes", 0),
        ("qos", True),
        ("qos", 3),
        ("max_lossless_msgs_per_s", "fast"),
        ("max_lossless_msgs_per_s", -1),
        ("latency_ms", {"fast": {"p50": 1, "p99": 1, "p999": 1}}),
        ("latency_ms", {"200": [1, 2, 3]}),
        ("latency_ms", {"200": {"p50": "1", "p99": 1, "p999": 1}}),
        ("cpu_us_per_msg", [250.0]),
        ("cpu_us_per_msg", {"gateway-a": None}),
        ("idle_cpu_percent", {"gateway-a": -0.5}),
    ],
)
def test_wrong_shape_is_reported(key: str, value: Any) -> None:
    doc = copy.deepcopy(GOOD)
    doc["rows"][0][key] = value
    assert validate_e2e(doc), f"{key} = {value!r} went unnoticed"


def test_not_an_object() -> None:
    assert validate_e2e([]) != []
    assert validate_e2e({**GOOD, "rows": {}}) != []
    assert validate_e2e({**GOOD, "rows": [1]}) != []
