"""The stable shape of bench/results/e2e.json (issue 8), which other tools read.

    {"machine": {...}, "date": "<ISO 8601>",
     "rows": [{"system": "mosquitto-tls-bridge" | "qgw-tunnel" | "qgw-bridge",
               "payload_bytes": int, "qos": int,
               "max_lossless_msgs_per_s": number,
               "latency_ms": {"<offered msg/s>": {"p50": ms, "p99": ms, "p999": ms, ...}},
               "cpu_us_per_msg": {"<process>": us},
               "idle_cpu_percent": {"<process>": percent of one core}, ...}]}

Keys may be added (docs/benchmarks.md lists the ones the harness adds); these are never renamed
or dropped. :func:`validate_e2e` returns the list of problems (empty: the document conforms).
Plain Python, no dependency, so that any tool (and tests/test_bench_schema.py) can use it.
"""

from __future__ import annotations

from typing import Any

SYSTEMS = ("mosquitto-tls-bridge", "qgw-tunnel", "qgw-bridge")
ROW_KEYS = (
    "system",
    "payload_bytes",
    "qos",
    "max_lossless_msgs_per_s",
    "latency_ms",
    "cpu_us_per_msg",
    "idle_cpu_percent",
)
PERCENTILES = ("p50", "p99", "p999")


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _num_map(where: str, m: Any, problems: list[str]) -> None:
    if not isinstance(m, dict):
        problems.append(f"{where}: expected an object of process -> number")
        return
    for k, v in m.items():
        if not isinstance(k, str) or not k:
            problems.append(f"{where}: process names must be non-empty strings")
        if not _is_num(v) or v < 0:
            problems.append(f"{where}.{k}: expected a number >= 0, got {v!r}")


def validate_e2e(doc: Any) -> list[str]:
    """Every way ``doc`` differs from the e2e.json schema (empty list: it conforms)."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        return ["document: expected an object"]
    for key in ("machine", "date", "rows"):
        if key not in doc:
            problems.append(f"{key}: missing")
    if "machine" in doc and not isinstance(doc["machine"], dict | str):
        problems.append("machine: expected an object (or a string)")
    if "date" in doc and not isinstance(doc["date"], str):
        problems.append("date: expected an ISO 8601 string")
    rows = doc.get("rows", [])
    if not isinstance(rows, list):
        return [*problems, "rows: expected a list"]
    for i, row in enumerate(rows):
        w = f"rows[{i}]"
        if not isinstance(row, dict):
            problems.append(f"{w}: expected an object")
            continue
        for key in ROW_KEYS:
            if key not in row:
                problems.append(f"{w}.{key}: missing")
        if "system" in row and row["system"] not in SYSTEMS:
            problems.append(f"{w}.system: {row['system']!r} is not one of {', '.join(SYSTEMS)}")
        for key in ("payload_bytes", "qos"):
            if key in row and (not isinstance(row[key], int) or isinstance(row[key], bool)):
                problems.append(f"{w}.{key}: expected an integer")
        if (
            "payload_bytes" in row
            and isinstance(row["payload_bytes"], int)
            and row["payload_bytes"] <= 0
        ):
            problems.append(f"{w}.payload_bytes: expected > 0")
        if "qos" in row and row["qos"] not in (0, 1, 2):
            problems.append(f"{w}.qos: expected 0, 1 or 2")
        rate = row.get("max_lossless_msgs_per_s", 0)
        if not _is_num(rate) or rate < 0:
            problems.append(f"{w}.max_lossless_msgs_per_s: expected a number >= 0")
        lat = row.get("latency_ms", {})
        if not isinstance(lat, dict):
            problems.append(f"{w}.latency_ms: expected an object")
            lat = {}
        for load, pcts in lat.items():
            if not (isinstance(load, str) and load.isdigit() and int(load) > 0):
                problems.append(f"{w}.latency_ms: key {load!r} is not an offered load in msg/s")
            if not isinstance(pcts, dict):
                problems.append(f"{w}.latency_ms.{load}: expected an object")
                continue
            for p in PERCENTILES:
                if not _is_num(pcts.get(p)) or pcts[p] < 0:
                    problems.append(f"{w}.latency_ms.{load}.{p}: expected a number >= 0 (ms)")
        for key in ("cpu_us_per_msg", "idle_cpu_percent"):
            if key in row:
                _num_map(f"{w}.{key}", row[key], problems)
    return problems
