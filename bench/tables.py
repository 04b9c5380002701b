"""python -m bench.tables DIR: the evaluation's Markdown tables (docs/results.md) from the raw
figures pico-bench wrote into DIR (table3-raw.json, fig9-raw.json, fig10-raw.json,
fig11-raw.json). Missing files are skipped."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(v, nd=1) -> str:
    return "-" if v is None or v != v else f"{v:,.{nd}f}"


def _ratio(v, b) -> str:
    return "-" if not b or v is None or v != v or b != b else f"{v / b:.2f}x"


def table3(d: dict) -> str:
    m = d["modes"]
    base = m["no-ha"]
    out = ["| mode | transactions/s (mean ± sd over runs) | vs No HA | latency p95 | vs No HA |"
           " latency p50 | Pico CPU (% of a core) | broken |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, label in (("no-ha", "No HA"), ("pico-1000hz", "Pico, chords, 1000 Hz"),
                        ("pico-1group-1000hz", "Pico, one group, 1000 Hz"),
                        ("whole-box-100hz", "whole-box, 100 Hz")):
        r = m.get(name)
        if r is None:
            continue
        out.append(f"| {label} | {_f(r['txn_per_s_mean'], 0)} ± {_f(r['txn_per_s_std'], 0)} | "
                   f"{_ratio(r['txn_per_s_mean'], base['txn_per_s_mean'])} | "
                   f"{_f(r['p95_ms_mean'])} ms | {_ratio(r['p95_ms_mean'], base['p95_ms_mean'])} |"
                   f" {_f(r['p50_ms_mean'])} ms | {_f(r['pico_cpu_pct'], 0)} | {r['errors']} |")
    return "\n".join(out)


def fig9(d: dict) -> str:
    out = ["| flows (low:high 3:1) | high p95 (Pico / No HA) | high p50 | low p95 | low p50 |"
           " Pico CPU % (Pico / No HA) | valid |",
           "|---:|---:|---:|---:|---:|---:|---|"]
    s, b = d["modes"]["streams"], d["modes"]["no-ha"]
    for n in s:
        x, y = s[n], b[n]
        out.append(f"| {n} | {_f(x['high']['p95_ms'])} / {_f(y['high']['p95_ms'])} ms | "
                   f"{_f(x['high']['p50_ms'])} / {_f(y['high']['p50_ms'])} ms | "
                   f"{_f(x['low']['p95_ms'])} / {_f(y['low']['p95_ms'])} ms | "
                   f"{_f(x['low']['p50_ms'])} / {_f(y['low']['p50_ms'])} ms | "
                   f"{_f(x['pico_cpu_pct'], 0)} / {_f(y['pico_cpu_pct'], 0)} | "
                   f"{'yes' if x.get('valid', True) and y.get('valid', True) else 'NO'} |")
    return "\n".join(out)


def fig10(d: dict) -> str:
    res, loads = d["results"], d["loads"]
    out = ["| checkpoints | " + " | ".join(f"{ld} txn/s: p50 / p95 ms, CPU %" for ld in loads)
           + " |", "|---|" + "---:|" * len(loads)]
    for f in ["0", *[str(x) for x in d["frequencies"]]]:
        cells = []
        for ld in loads:
            r = res[f][str(ld)]
            cells.append(f"{_f(r['p50_ms'], 2)} / {_f(r['p95_ms'], 2)}, {_f(r['pico_cpu_pct'], 0)}"
                         + ("" if r.get("valid", True) else " (INVALID)"))
        out.append(f"| {'unprotected' if f == '0' else f + ' Hz'} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def fig11(d: dict) -> str:
    res = d["results"]
    b = res["0"]
    out = ["| groups | latency geo. mean | p50 | p95 | Pico CPU % | replication CPU % |"
           " slowest group's achieved Hz |", "|---:|---:|---:|---:|---:|---:|---:|",
           f"| No HA | {_f(b['geomean_ms'], 2)} | {_f(b['p50_ms'], 2)} | {_f(b['p95_ms'], 2)} | "
           f"{_f(b['pico_cpu_pct'], 0)} | {_f(b['replication_cpu_pct'], 0)} | - |"]
    for n in d["groups"]:
        r = res[str(n)]
        out.append(f"| {n} | {_f(r['geomean_ms'], 2)} | {_f(r['p50_ms'], 2)} | "
                   f"{_f(r['p95_ms'], 2)} | {_f(r['pico_cpu_pct'], 0)} | "
                   f"{_f(r['replication_cpu_pct'], 0)} | {_f(r.get('achieved_hz_min'), 0)} |"
                   + ("" if r.get("valid", True) else " INVALID"))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    d = Path(argv[0] if argv else "docs")
    for name, fn in (("table3", table3), ("fig9", fig9), ("fig10", fig10), ("fig11", fig11)):
        p = d / f"{name}-raw.json"
        if p.exists():
            print(f"### {name}\n\n{fn(json.loads(p.read_text()))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
