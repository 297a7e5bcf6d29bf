"""Regenerate the plots, docs/benchmarks.md's results and the README's performance table from
bench/results/*.json alone (no measurement here; rerun after `make bench`).

    .venv/bin/python bench/report.py [--no-plots]

Writes bench/results/latency.png (latency vs offered load, per payload and system) and
bench/results/throughput.png (max lossless msg/s per system and payload) with matplotlib (the
``bench`` extra), then replaces the text between the marker comments
``<!-- bench:results:begin -->`` / ``<!-- bench:results:end -->`` in docs/benchmarks.md and
``<!-- bench:table:begin -->`` / ``<!-- bench:table:end -->`` in README.md. Missing result
files are reported in the generated text, never guessed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.e2e_schema import SYSTEMS, validate_e2e

RESULTS = HERE / "results"
DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
DOC_MARKERS = ("<!-- bench:results:begin -->", "<!-- bench:results:end -->")
README_MARKERS = ("<!-- bench:table:begin -->", "<!-- bench:table:end -->")
BASELINE = "mosquitto-tls-bridge"
NOISY_LOADAVG = 1.0  # load average at start above which a run is flagged as noisy


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def size_label(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 and n % 1024 == 0 else f"{n} B"


def fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "—"
    return f"{x:,.{digits}f}"


def ms(x: float | None) -> str:
    if x is None or x < 0:
        return "—"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def mbps(x: float) -> str:
    return f"{x / 1000:.1f} GB/s" if x >= 1000 else f"{x:,.0f} MB/s"


def when(name: str) -> str:
    """The date a results file says it was measured (or its absence, said plainly)."""
    d = load(name) or {}
    return str(d.get("when") or d.get("date") or "undated")


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


class E2E:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.rows: list[dict[str, Any]] = doc.get("rows", [])
        self.systems = [s for s in SYSTEMS if any(r["system"] == s for r in self.rows)]
        self.payloads = sorted({r["payload_bytes"] for r in self.rows})

    def row(self, system: str, size: int) -> dict[str, Any] | None:
        for r in self.rows:
            if r["system"] == system and r["payload_bytes"] == size:
                return r
        return None

    def rate(self, system: str, size: int) -> float | None:
        r = self.row(system, size)
        return None if r is None else float(r["max_lossless_msgs_per_s"])

    def ratio(self, system: str, size: int) -> str:
        a, b = self.rate(system, size), self.rate(BASELINE, size)
        if a is None or not b or system == BASELINE:
            return ""
        return f" ({a / b:.2f}x)"

    def skipped(self) -> dict[str, str]:
        return {s["system"]: s["reason"] for s in self.doc.get("skipped", [])}

    def noisy(self) -> bool:
        m = self.doc.get("machine", {})
        la = m.get("loadavg_at_start", 0) if isinstance(m, dict) else 0
        contended = any(
            r.get("machine_cpu_percent", {}).get("other", 0) > CONTENDED_PERCENT for r in self.rows
        )
        return bool(self.doc.get("quick")) or la > NOISY_LOADAVG or contended


# ---------------------------------------------------------------- plots ---------------------


def plots(e: E2E) -> list[str]:
    try:
        import matplotlib as mpl

        mpl.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        print("matplotlib is missing (pip install 'qgw[bench]'): no plots")
        return []
    written = []
    n = max(1, len(e.payloads))
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    for ax, size in zip(axes[0], e.payloads, strict=False):
        for system in e.systems:
            r = e.row(system, size)
            if r is None or not r["latency_ms"]:
                continue
            loads = sorted(r["latency_ms"], key=int)
            xs = [int(x) for x in loads]
            line = ax.plot(
                xs, [r["latency_ms"][x]["p50"] for x in loads], "o-", label=f"{system} p50"
            )
            ax.plot(
                xs,
                [r["latency_ms"][x]["p99"] for x in loads],
                "s--",
                color=line[0].get_color(),
                label=f"{system} p99",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _p: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.set_xlabel("offered load, msg/s (QoS 1)")
        ax.set_ylabel("end-to-end latency, ms")
        ax.set_title(f"payload {size_label(size)}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    noisy = " — noisy run (shared machine or --quick)" if e.noisy() else ""
    fig.suptitle(f"latency vs offered load, p50 and p99 ({e.doc.get('date', '')}){noisy}")
    fig.tight_layout()
    fig.savefig(RESULTS / "latency.png", dpi=90)
    plt.close(fig)
    written.append("latency.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(e.systems))
    for i, system in enumerate(e.systems):
        xs = [j + i * width for j in range(len(e.payloads))]
        ys = [e.rate(system, s) or 0 for s in e.payloads]
        bars = ax.bar(xs, ys, width, label=system)
        ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=7)
    ax.set_xticks([j + width * (len(e.systems) - 1) / 2 for j in range(len(e.payloads))])
    ax.set_xticklabels([size_label(s) for s in e.payloads])
    ax.set_yscale("log")
    ax.set_ylabel("max lossless msg/s (QoS 1, burst, median)")
    ax.set_title(
        f"max lossless throughput ({e.doc.get('date', '')})"
        + ("\nnoisy run (shared machine or --quick)" if e.noisy() else ""),
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput.png", dpi=90)
    plt.close(fig)
    written.append("throughput.png")
    return written


# ---------------------------------------------------------------- docs/benchmarks.md ---------


def machine_lines(e: E2E) -> list[str]:
    m = e.doc.get("machine", {})
    if not isinstance(m, dict):
        m = {"description": str(m)}
    rows = [
        ["date (UTC)", str(e.doc.get("date", "?"))],
        ["mode", "quick (`--quick`)" if e.doc.get("quick") else "full"],
        ["CPU", f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"],
        ["kernel / OS", f"{m.get('kernel', '?')} / {m.get('os', '?')}"],
        ["Python", str(m.get("python", "?"))],
        ["mosquitto", str(m.get("mosquitto", "?"))],
        ["OpenSSL (system, used by mosquitto)", str(m.get("openssl", "?"))],
        ["load average at start", str(m.get("loadavg_at_start", "?"))],
        ["harness run time", f"{e.doc.get('duration_s', '?')} s"],
    ]
    out = table(["machine", ""], rows)
    if e.noisy():
        out += [
            "",
            "**These numbers are noisy**: "
            + ("a quick run; " if e.doc.get("quick") else "")
            + "the machine was shared with other work (load average "
            f"{m.get('loadavg_at_start', '?')} at start on {m.get('cores', '?')} cores). "
            "Compare systems within this run only; rerun `make bench` on a quiet machine for "
            "figures to quote.",
        ]
    return out


def e2e_lines(e: E2E) -> list[str]:
    out: list[str] = []
    skipped = e.skipped()
    if skipped:
        out += ["Not measured in this run:", ""]
        out += [f"- `{s}`: {reason}" for s, reason in skipped.items()]
        out.append("")
    notes = e.doc.get("systems", {})
    if notes:
        out += ["Systems measured:", ""]
        out += [f"- `{s}`: {v.get('note', '')}" for s, v in notes.items()]
        out.append("")
    out += ["### Max lossless throughput (QoS 1, burst, median of the rounds)", ""]
    out += table(
        ["system", *[size_label(s) for s in e.payloads]],
        [
            [f"`{s}`", *[fmt(e.rate(s, p)) + " msg/s" + e.ratio(s, p) for p in e.payloads]]
            for s in e.systems
        ],
    )
    out += [
        "",
        (
            "(x: ratio to `mosquitto-tls-bridge` in the same run.) Each round is a burst of N "
            "messages (sized from a warm-up burst to last a few seconds); a round counts only if "
            "every message arrived. Lost / duplicate counts over all rounds:"
        ),
        "",
    ]
    out += table(
        ["system", *[size_label(s) for s in e.payloads]],
        [
            [f"`{s}`"]
            + [
                f"{r['lost']} / {r['duplicates']} of {len(r.get('rounds', [])) * r.get('burst_messages', 0):,}"
                if (r := e.row(s, p)) and "lost" in r
                else "—"
                for p in e.payloads
            ]
            for s in e.systems
        ],
    )
    cross = []
    for s in e.systems:
        r = e.row(s, e.payloads[0]) if e.payloads else None
        c = r.get("mosquitto_clients_burst") if r else None
        if r is None or not c:
            continue
        ratio = c.get("loadgen_over_clients")
        cross.append(
            [
                f"`{s}`",
                f"{fmt(r['max_lossless_msgs_per_s'])} msg/s",
                c.get("skipped") or f"{fmt(c.get('msgs_per_s'))} msg/s (lost {c.get('lost', 0)})",
                f"{ratio:.2f}" if ratio else "—",
            ]
        )
    if cross:
        out += [
            "",
            (
                "Second instrument, same run: after each loadgen round, the same burst with "
                "Debian's `mosquitto_pub -l` / `mosquitto_sub -C N` (99-byte lines; rate from "
                "the publisher's start to the subscriber's exit, so process start-up is "
                "included). A ratio well below 1 would mean loadgen, not the system, set the rate:"
            ),
            "",
        ]
        out += table(
            [
                "system",
                f"loadgen, {size_label(e.payloads[0])}",
                "mosquitto_pub / mosquitto_sub",
                "loadgen / mosquitto-clients (median of per-round ratios)",
            ],
            cross,
        )
    out += ["", "![max lossless throughput](../bench/results/throughput.png)", ""]

    out += ["### Latency at fixed offered loads, p50 / p99 / p99.9 (ms)", ""]
    for size in e.payloads:
        out += [f"Payload {size_label(size)}:", ""]
        rows = []
        for s in e.systems:
            r = e.row(s, size)
            if r is None:
                continue
            for load in sorted(r["latency_ms"], key=int):
                v = r["latency_ms"][load]
                label = v.get("offered", "")
                rows.append(
                    [
                        f"`{s}`",
                        f"{int(load):,}" + (f" ({label})" if label and label != "fixed" else ""),
                        f"{ms(v['p50'])} / {ms(v['p99'])} / {ms(v['p999'])}",
                        str(v.get("lost", "—")),
                    ]
                )
            for load, why in r.get("latency_skipped", {}).items():
                rows.append([f"`{s}`", f"{int(load):,}", f"not measured: {why}", "—"])
        out += table(["system", "offered msg/s", "p50 / p99 / p99.9 ms", "lost"], rows)
        out.append("")
    out += ["![latency vs offered load](../bench/results/latency.png)", ""]

    out += [
        "### CPU per message (µs, burst, median of the rounds)",
        "",
        (
            "From `/proc/PID/stat` (utime + stime, all threads) before and after each burst, divided "
            "by the messages received; the load generators report their own `getrusage`. "
            "Percent columns: share of one core during the burst (the load generators must stay "
            "far from 100 %, or they, not the system, set the rate)."
        ),
        "",
    ]
    rows = []
    for s in e.systems:
        for size in e.payloads:
            r = e.row(s, size)
            if r is None:
                continue
            per = r["cpu_us_per_msg"]
            pct = r.get("burst_cpu_percent", {})
            rows.append(
                [
                    f"`{s}`",
                    size_label(size),
                    ", ".join(f"{k} {v:,.1f}" for k, v in per.items()),
                    ", ".join(f"{k} {v:.0f} %" for k, v in pct.items()),
                ]
            )
    out += table(["system", "payload", "µs per message", "CPU during the burst"], rows)
    out += ["", "### Are the load generators the bottleneck?", ""]
    out += bottleneck_lines(e)
    out += ["", "### Idle CPU with an established session, and memory", ""]
    rows = []
    for s in e.systems:
        r = e.row(s, e.payloads[-1]) if e.payloads else None
        r0 = e.row(s, e.payloads[0]) if e.payloads else None
        if r is None or r0 is None:
            continue
        rows.append(
            [
                f"`{s}`",
                ", ".join(f"{k} {v:.2f} %" for k, v in r0["idle_cpu_percent"].items()),
                ", ".join(f"{k} {v / 1024:.0f}" for k, v in r.get("peak_rss_kib", {}).items()),
            ]
        )
    out += table(["system", "idle CPU (% of one core)", "peak RSS after all payloads (MiB)"], rows)
    out.append("")
    return out


LOADGEN_LIMIT_PERCENT = 50.0  # a load generator above half a core during a burst is suspect
# CPU used during a burst by processes outside the system under test (from /proc/stat): above
# a quarter of a core they compete with the system and the row's rate is lowered by them
CONTENDED_PERCENT = 25.0


def bottleneck_lines(e: E2E) -> list[str]:
    """Each load generator's share of one core during each system's bursts, with a verdict."""
    rows = []
    worst = 0.0
    for s in e.systems:
        for size in e.payloads:
            r = e.row(s, size)
            if r is None:
                continue
            pct = r.get("burst_cpu_percent", {})
            pub, sub = pct.get("loadgen-pub"), pct.get("loadgen-sub")
            if pub is None or sub is None:
                continue
            worst = max(worst, pub, sub)
            busiest = max(
                ((k, v) for k, v in pct.items() if not k.startswith("loadgen")),
                key=lambda kv: kv[1],
                default=("—", 0.0),
            )
            mc = r.get("machine_cpu_percent", {})
            other = mc.get("other")
            contended = other is not None and other > CONTENDED_PERCENT
            rows.append(
                [
                    f"`{s}`",
                    size_label(size),
                    f"{pub:.0f} % / {sub:.0f} %",
                    f"{busiest[0]} {busiest[1]:.0f} %",
                    "—"
                    if other is None
                    else f"{other:.0f} %" + (" (**contended**)" if contended else ""),
                ]
            )
    out = table(
        [
            "system",
            "payload",
            "loadgen pub / sub, % of one core",
            "busiest process",
            "other work on the machine, % of one core",
        ],
        rows,
    )
    verdict = (
        f"No: every load generator stayed below {LOADGEN_LIMIT_PERCENT:.0f} % of one core "
        f"(at most {worst:.0f} %) during the bursts."
        if worst < LOADGEN_LIMIT_PERCENT
        else f"**Possibly**: a load generator reached {worst:.0f} % of one core; that row's "
        "rate may measure the load generator."
    )
    return [
        *out,
        "",
        verdict,
        "",
        (
            "Other work: whole-machine busy time (`/proc/stat`) minus the measured processes during "
            f"the bursts (median of the rounds); above {CONTENDED_PERCENT:.0f} % of one core the "
            "row is marked contended: another workload competed for the cores and lowered the rate."
        ),
    ]


def other_lines() -> list[str]:
    out: list[str] = []
    p = load("protocol.json")
    if p:
        out += [f"### Protocol core (`protocol.json`, {p.get('when', '?')})", ""]
        rows = []
        for name, sides in p.get("handshake_cpu_per_side", {}).items():
            rows.append(
                [
                    f"bootstrap {name}",
                    f"{sides['initiator']['median_ms']:.2f} / {sides['responder']['median_ms']:.2f} ms",
                ]
            )
        rk = p.get("rekey_cpu_both_sides", {}).get("both_sides")
        if rk:
            rows.append(["QKD-authenticated rekey, both sides", f"{rk['median_ms']:.2f} ms"])
        for size, v in p.get("records_seal_and_open", {}).items():
            rows.append(
                [
                    f"records, seal + frame + open, {size_label(int(size))}",
                    (
                        f"{v['core_msgs_per_s']:,.0f} msg/s, {v['core_MB_per_s']:,.0f} MB/s "
                        f"(raw AES-256-GCM {v['raw_aesgcm_MB_per_s']:,.0f} MB/s)"
                    ),
                ]
            )
        out += table(["what (initiator / responder)", "median"], rows)
        out.append("")
    m = load("mqtt_clients.json")
    if m:
        out += [
            (
                "### MQTT clients, QoS 1 receive from one broker "
                f"(`mqtt_clients.json`, {when('mqtt_clients.json')})"
            ),
            "",
        ]
        out += table(
            ["client", "msg/s (median)"],
            [
                [name, fmt(v.get("msgs_per_s_median"))]
                for name, v in m.get("results", {}).items()
                if isinstance(v, dict)
            ],
        )
        out.append("")
    c = load("crypto.json")
    if c:
        out += [
            (
                f"### Primitives (`crypto.json`, provider {c.get('provider', '?')}, "
                f"{when('crypto.json')})"
            ),
            "",
        ]
        out += table(
            ["operation", "median µs"],
            [
                [name, f"{v.get('median_us', 0):,.1f}"]
                for name, v in c.get("results", {}).items()
                if isinstance(v, dict) and "median_us" in v
            ],
        )
        out.append("")
    return out


def doc_block(e: E2E | None, problems: list[str]) -> list[str]:
    out = [
        "<!-- generated by bench/report.py from bench/results/*.json; edits here are overwritten -->",
        "",
    ]
    if e is None:
        out += ["No valid `bench/results/e2e.json`: " + ("; ".join(problems) or "missing"), ""]
    else:
        out += ["### Machine and run", "", *machine_lines(e), "", *e2e_lines(e)]
    return out + other_lines()


# ---------------------------------------------------------------- README table --------------


def readme_block(e: E2E | None) -> list[str]:
    out = ["<!-- generated by bench/report.py from bench/results/*.json -->", ""]
    if e is None:
        return [*out, "No valid `bench/results/e2e.json` yet: run `make bench`.", ""]
    m = e.doc.get("machine", {})
    m = m if isinstance(m, dict) else {}
    out.append(
        f"Measured {e.doc.get('date', '?')} on {m.get('cpu', '?')} ({m.get('cores', '?')} cores), "
        "C load generators, every system in the same run"
        + (
            " — **noisy: shared machine or quick run**, compare within the run only"
            if e.noisy()
            else ""
        )
        + "; details and plots in [docs/benchmarks.md](docs/benchmarks.md)."
    )
    out.append("")
    rows = []
    qgw = [s for s in e.systems if s != BASELINE]
    for size in e.payloads:
        rows.append(
            [
                f"end to end, QoS 1, {size_label(size)}, max lossless burst (`e2e.json`)",
                "; ".join(f"{s} {fmt(e.rate(s, size))} msg/s{e.ratio(s, size)}" for s in qgw)
                or "—",
                f"{fmt(e.rate(BASELINE, size))} msg/s (mosquitto TLS bridge)",
            ]
        )
    small = e.payloads[0] if e.payloads else 0

    def lat(s: str) -> str:
        r = e.row(s, small)
        v = r["latency_ms"].get("200") if r else None
        return f"{ms(v['p50'])} / {ms(v['p99'])} ms" if v else "—"

    if e.payloads:
        rows.append(
            [
                f"latency at 200 msg/s, {size_label(small)}, p50 / p99",
                "; ".join(f"{s} {lat(s)}" for s in qgw) or "—",
                lat(BASELINE),
            ]
        )

        def cpu(s: str, procs: tuple[str, ...]) -> str:
            r = e.row(s, small)
            if r is None:
                return "—"
            per = r["cpu_us_per_msg"]
            return " / ".join(f"{per[p]:,.0f}" for p in procs if p in per) + " µs"

        rows.append(
            [
                f"CPU per message, gateway A / B ({size_label(small)} burst)",
                "; ".join(f"{s} {cpu(s, ('gateway-a', 'gateway-b'))}" for s in qgw) or "—",
                f"brokers A / B {cpu(BASELINE, ('broker-a', 'broker-b'))}",
            ]
        )

        def idle(s: str) -> str:
            r = e.row(s, small)
            if r is None:
                return "—"
            v = r["idle_cpu_percent"]
            return " / ".join(f"{v[p]:.2f} %" for p in ("gateway-a", "gateway-b") if p in v)

        rows.append(
            [
                "idle CPU per gateway A / B, session established",
                "; ".join(f"{s} {idle(s)}" for s in qgw) or "—",
                "—",
            ]
        )
    for s, why in e.skipped().items():
        rows.append([f"`{s}`", f"not measured: {why}", ""])
    p = load("protocol.json")
    if p:
        hs = p.get("handshake_cpu_per_side", {})
        parts = []
        for key, label in (("psk/qkd=required", "PSK"), ("pki/qkd=required", "PKI")):
            if key in hs:
                parts.append(
                    f"{label} {hs[key]['initiator']['median_ms']:.1f} / {hs[key]['responder']['median_ms']:.1f} ms"
                )
        if parts:
            rows.append(
                [
                    "bootstrap CPU per side, initiator / responder (`protocol.json`)",
                    "; ".join(parts),
                    "—",
                ]
            )
        rk = p.get("rekey_cpu_both_sides", {}).get("both_sides")
        if rk:
            rows.append(["QKD-authenticated rekey, both sides", f"{rk['median_ms']:.1f} ms", "—"])
        rec = p.get("records_seal_and_open", {})
        if rec:
            lo, hi = min(rec, key=int), max(rec, key=int)
            rows.append(
                [
                    "record layer, seal + frame + open through the core",
                    (
                        f"{rec[lo]['core_msgs_per_s']:,.0f} msg/s at {size_label(int(lo))}; "
                        f"{mbps(rec[hi]['core_MB_per_s'])} at {size_label(int(hi))}"
                    ),
                    (
                        f"raw AES-256-GCM {rec[lo]['raw_aesgcm_msgs_per_s']:,.0f} msg/s; "
                        f"{mbps(rec[hi]['raw_aesgcm_MB_per_s'])}"
                    ),
                ]
            )
    mc = load("mqtt_clients.json")
    if mc and isinstance(mc.get("results"), dict):
        items = [
            f"{name} {fmt(v.get('msgs_per_s_median'))}"
            for name, v in mc["results"].items()
            if isinstance(v, dict)
        ]
        rows.append(
            ["QoS 1 receive from one broker, msg/s (`mqtt_clients.json`)", "; ".join(items), "—"]
        )
    out += table(["what", "qgw", "baseline in the same run"], rows)
    dates = [f"`{n}` {when(n)}" for n in ("protocol.json", "mqtt_clients.json") if load(n)]
    if dates:
        out += ["", f"Measured: `e2e.json` {e.doc.get('date', '?')}; " + "; ".join(dates) + "."]
    out.append("")
    return out


def splice(path: Path, markers: tuple[str, str], block: list[str]) -> bool:
    text = path.read_text()
    begin, end = markers
    if begin not in text or end not in text:
        print(f"{path}: markers {begin} ... {end} not found; not changed")
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = head + begin + "\n" + "\n".join(block).rstrip("\n") + "\n" + end + tail
    if new != text:
        path.write_text(new)
    print(f"updated {path.relative_to(ROOT)}")
    return True


def main() -> int:
    ap = argparse.ArgumentParser(
        description="regenerate plots, docs/benchmarks.md and the README table"
    )
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args()
    doc = load("e2e.json")
    problems = validate_e2e(doc) if doc is not None else ["bench/results/e2e.json missing"]
    e = E2E(doc) if doc is not None and not problems else None
    if e is not None and not args.no_plots:
        for name in plots(e):
            print(f"wrote bench/results/{name}")
    ok = splice(DOC, DOC_MARKERS, doc_block(e, problems))
    ok = splice(README, README_MARKERS, readme_block(e)) and ok
    if problems:
        print("e2e.json: " + "; ".join(problems))
    return 0 if ok and not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
