"""pico-bench table3 | fig9 | fig10 | fig11: the paper's evaluation (§6.2-6.4) through MBServ on
the namespace cluster (bench/evalbed.py), each figure beside its baseline from the same run.

table3  HTTP-style transactions (closed loop; request sizes lognormal, mean 10 KB, sigma 1.0,
        capped at 100 KB; 1 KB responses; fixed seed) for No HA, Pico (Elastic Pico Chords,
        1000 Hz, a group per backup), Pico with one group at 1000 Hz to r2, and whole-box (one group holding every flow, 100 Hz: what VM replication does,
        without its suspend/resume cost): transactions/s (mean and standard deviation over
        runs) and latency p95, with the ratios to No HA.
fig9    Differentiated Pico Streams: low and high priority flows 3:1 (by server port), low at
        100 Hz to r3, high at 1000 Hz to r2, paced (high flows 4x the low flows' rate), at
        growing flow counts; per-class latency and Pico's CPU, beside No HA.
fig10   one group at 100, 200, 500, 1000, 2000 Hz, at rising paced load (1 KB requests); the
        same cluster with the group unprotected is the baseline: latency and CPU.
fig11   1 to 64 replication groups (flows spread by source port) at a fixed paced load, 1000 Hz;
        No HA at the same load is the baseline: latency (p50, p95, geometric mean) and CPU.
Each writes its rows (--json), its raw figures (<name>-raw.json) and a PNG (<name>.png), the
last two beside the --json file.
Root only.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.report import result

SEED = 2013
HTTP_REQ = {"mean": 10240, "sigma": 1.0, "max": 102400}
RESP = 1024


def _stats(records: list[dict], window: float, cls: str | None = None) -> dict:
    recs = [r for r in records if cls is None or r["cls"] == cls]
    lat = np.array([v for r in recs for v in r["lat_ms"]], dtype=np.float64)
    n = int(sum(r["n"] for r in recs))
    out = {"connections": len(recs), "transactions": n, "txn_per_s": n / window,
           "errors": sum(1 for r in recs if r["error"]),
           "mbit_per_s": sum(r["bytes"] for r in recs) * 8 / window / 1e6}
    if lat.size:
        out.update(p50_ms=float(np.percentile(lat, 50)), p95_ms=float(np.percentile(lat, 95)),
                   p99_ms=float(np.percentile(lat, 99)),
                   geomean_ms=float(np.exp(np.mean(np.log(np.maximum(lat, 1e-3))))))
    else:
        out.update(p50_ms=math.nan, p95_ms=math.nan, p99_ms=math.nan, geomean_ms=math.nan)
    return out


def _cpu(run: dict) -> dict:
    """Pico's CPU in the window, % of one core: all its processes, and replication's share
    (r1's RM and the backups' SMMs, which install the checkpoints)."""
    w = run["window_s"]
    cpu = run["cpu"]
    return {"pico_cpu_pct": 100 * sum(cpu.values()) / w,
            "replication_cpu_pct": 100 * sum(v for k, v in cpu.items()
                                             if k in ("r1-rm", "r2-smm", "r3-smm")) / w,
            "by_role_pct": {k: round(100 * v / w, 1) for k, v in sorted(cpu.items())}}


def _valid(got: dict, what: str) -> dict:
    """A run is a measurement of its configuration only if nothing failed over and every
    protected group stayed protected; otherwise it is reported, flagged, never hidden."""
    bad = []
    if got["failovers"]:
        bad.append(f"{got['failovers']} failover(s) by pico-sdn")
    if got["unprotected"]:
        bad.append(f"group(s) {got['unprotected']} lost protection")
    if bad:
        _say(f"WARNING: {what}: {'; '.join(bad)}: this run does not measure its configuration")
    return {"valid": not bad, "invalid_because": "; ".join(bad)}


def _say(msg: str) -> None:
    print(f"pico-bench: {msg}", file=sys.stderr, flush=True)


def _bed(tmp: Path, name: str, ha: bool, groups: str = "", frequency_hz: int = 1000):
    from bench.evalbed import EvalBed
    _say(f"starting cluster {name} (OVS + Faucet, 3 replicas with MBServ, pico-sdn)")
    return EvalBed(tmp, f"{name}{os.getpid() % 1000}", ha=ha, frequency_hz=frequency_hz,
                   groups=groups)


def _conns(n: int, base_sport: int, **kw) -> list[dict]:
    return [dict(sport=base_sport + k, dport=8000, cls="all", rate=0, **kw) for k in range(n)]


# ---------------------------------------------------------------- table3
WHOLE_BOX_100 = """groups:
  box: {id: 1, target: r2, frequency_hz: 100}
policies:
  - {group: box, proto: tcp}
"""


def table3(quick: bool) -> tuple[list[dict], dict]:
    runs, secs, warmup, nconn = (2, 4.0, 1.5, 16) if quick else (3, 10.0, 2.0, 16)
    modes = [("no-ha", dict(ha=False)), ("pico-1000hz", dict(ha=True, frequency_hz=1000)),
             ("pico-1group-1000hz", dict(ha=False, groups=ONE_GROUP)),
             ("whole-box-100hz", dict(ha=False, groups=WHOLE_BOX_100))]
    raw = {}
    for k, (mode, kw) in enumerate(modes):
        with tempfile.TemporaryDirectory(prefix="pico-bench-t3-") as tmp:
            bed = _bed(Path(tmp), f"t3m{k}", **kw)
            try:
                per_run = []
                for i in range(runs):
                    got = bed.run(_conns(nconn, 20000 + 1000 * i), secs, warmup, SEED,
                                  HTTP_REQ, RESP)
                    s = _stats(got["records"], got["window_s"])
                    s.update(_cpu(got))
                    s.update(_valid(got, f"table3 {mode} run {i + 1}"))
                    per_run.append(s)
                    _say(f"table3 {mode} run {i + 1}/{runs}: {s['txn_per_s']:.0f} txn/s, "
                         f"p95 {s['p95_ms']:.1f} ms, errors {s['errors']}")
            finally:
                bed.stop()
        tps = [s["txn_per_s"] for s in per_run]
        raw[mode] = {"runs": per_run, "txn_per_s_mean": float(np.mean(tps)),
                     "txn_per_s_std": float(np.std(tps, ddof=1)) if len(tps) > 1 else 0.0,
                     "p95_ms_mean": float(np.mean([s["p95_ms"] for s in per_run])),
                     "p50_ms_mean": float(np.mean([s["p50_ms"] for s in per_run])),
                     "pico_cpu_pct": float(np.mean([s["pico_cpu_pct"] for s in per_run])),
                     "errors": sum(s["errors"] for s in per_run)}
    base = raw["no-ha"]
    rows = []
    for mode, _ in modes:
        m = raw[mode]
        rows += [
            result(f"table3 {mode}: transactions/s (mean of {runs})", m["txn_per_s_mean"],
                   "txn/s", base["txn_per_s_mean"], "no HA", std=round(m["txn_per_s_std"], 1)),
            result(f"table3 {mode}: latency p95", m["p95_ms_mean"], "ms", base["p95_ms_mean"],
                   "no HA"),
            result(f"table3 {mode}: latency p50", m["p50_ms_mean"], "ms", base["p50_ms_mean"],
                   "no HA"),
            result(f"table3 {mode}: Pico CPU (% of a core)", m["pico_cpu_pct"], "%",
                   base["pico_cpu_pct"], "no HA"),
            result(f"table3 {mode}: broken connections", m["errors"], "conns",
                   base["errors"], "no HA"),
        ]
    return rows, {"connections": nconn, "runs": runs, "secs": secs, "warmup": warmup,
                  "request": HTTP_REQ, "response": RESP, "seed": SEED, "modes": raw}


# ---------------------------------------------------------------- fig9
STREAMS_9 = """groups:
  high: {id: 1, target: r2, frequency_hz: 1000}
  low: {id: 2, target: r3, frequency_hz: 100}
policies:
  - {group: high, proto: tcp, dport: 8001}
  - {group: low, proto: tcp, dport: 8000}
"""
LOW_RATE, HIGH_RATE, REQ_9 = 4.0, 16.0, 4096  # txn/s per flow of 4 KB: 131 and 524 kbit/s


def _conns9(n: int, base_sport: int) -> list[dict]:
    out = []
    for k in range(n):
        high = k % 4 == 3
        out.append({"sport": base_sport + k, "dport": 8001 if high else 8000,
                    "cls": "high" if high else "low", "rate": HIGH_RATE if high else LOW_RATE})
    return out


def fig9(quick: bool) -> tuple[list[dict], dict]:
    counts, secs, warmup = ((20, 60), 4.0, 1.5) if quick else ((20, 40, 60, 80, 100), 8.0, 2.0)
    raw: dict = {}
    for mode, kw in (("no-ha", dict(ha=False)), ("streams", dict(ha=False, groups=STREAMS_9))):
        with tempfile.TemporaryDirectory(prefix="pico-bench-f9-") as tmp:
            bed = _bed(Path(tmp), f"f9{mode[0]}", **kw)
            try:
                for i, n in enumerate(counts):
                    got = bed.run(_conns9(n, 20000 + 1000 * i), secs, warmup, SEED,
                                  {"fixed": REQ_9}, 256)
                    row = {c: _stats(got["records"], got["window_s"], c) for c in ("high", "low")}
                    row.update(_cpu(got))
                    row.update(_valid(got, f"fig9 {mode} {n} flows"))
                    raw.setdefault(mode, {})[n] = row
                    _say(f"fig9 {mode} {n} flows: high p95 {row['high']['p95_ms']:.1f} ms, "
                         f"low p95 {row['low']['p95_ms']:.1f} ms, cpu "
                         f"{row['pico_cpu_pct']:.0f}%")
            finally:
                bed.stop()
    rows = []
    for n in counts:
        s, b = raw["streams"][n], raw["no-ha"][n]
        for c in ("high", "low"):
            rows.append(result(f"fig9 {n} flows: {c} priority latency p95", s[c]["p95_ms"], "ms",
                               b[c]["p95_ms"], "no HA"))
            rows.append(result(f"fig9 {n} flows: {c} priority latency p50", s[c]["p50_ms"], "ms",
                               b[c]["p50_ms"], "no HA"))
        rows.append(result(f"fig9 {n} flows: Pico CPU (% of a core)", s["pico_cpu_pct"], "%",
                           b["pico_cpu_pct"], "no HA"))
        rows.append(result(f"fig9 {n} flows: broken connections",
                           s["high"]["errors"] + s["low"]["errors"], "conns",
                           b["high"]["errors"] + b["low"]["errors"], "no HA"))
    return rows, {"flows": list(counts), "low_rate": LOW_RATE, "high_rate": HIGH_RATE,
                  "request": REQ_9, "secs": secs, "modes": raw}


# ---------------------------------------------------------------- fig10
ONE_GROUP = """groups:
  all: {id: 1, target: r2, frequency_hz: 1000}
policies:
  - {group: all, proto: tcp}
"""


def fig10(quick: bool) -> tuple[list[dict], dict]:
    freqs = (100, 1000, 2000) if quick else (100, 200, 500, 1000, 2000)
    loads, secs, warmup, nconn = ((200, 600), 4.0, 1.5, 32) if quick else \
        ((200, 400, 800), 6.0, 2.0, 32)
    raw: dict = {}
    run_no = 0
    with tempfile.TemporaryDirectory(prefix="pico-bench-f10-") as tmp:
        bed = _bed(Path(tmp), "f10", ha=False, groups=ONE_GROUP)
        try:
            for f in (0, *freqs):  # 0: the group unprotected, the baseline
                if f:
                    bed.picoctl("r1", "group", "set", "1", "--target", "r2",
                                "--frequency", str(f))
                else:
                    bed.picoctl("r1", "group", "set", "1", "--target", "none")
                for load in loads:
                    conns = _conns(nconn, 20000 + 1000 * run_no, )
                    run_no += 1
                    for c in conns:
                        c["rate"] = load / nconn
                    got = bed.run(conns, secs, warmup, SEED, {"fixed": 1024}, 256)
                    row = _stats(got["records"], got["window_s"])
                    row.update(_cpu(got))
                    row.update(_valid(got, f"fig10 {f} Hz {load} txn/s") if f else
                               {"valid": not got["failovers"]})
                    if f:
                        g = [g for g in bed.picoctl("r1", "groups").get("groups", [])
                             if g.get("id") == 1]
                        row["achieved_hz"] = g[0].get("achieved_hz") if g else None
                    raw.setdefault(f, {})[load] = row
                    _say(f"fig10 {f or 'unprotected'} Hz, {load} txn/s: p95 "
                         f"{row['p95_ms']:.2f} ms, cpu {row['pico_cpu_pct']:.0f}%")
        finally:
            bed.stop()
    rows = []
    for f in freqs:
        for load in loads:
            s, b = raw[f][load], raw[0][load]
            rows += [result(f"fig10 {f} Hz @{load} txn/s: latency p95", s["p95_ms"], "ms",
                            b["p95_ms"], "unprotected"),
                     result(f"fig10 {f} Hz @{load} txn/s: latency p50", s["p50_ms"], "ms",
                            b["p50_ms"], "unprotected"),
                     result(f"fig10 {f} Hz @{load} txn/s: Pico CPU (% of a core)",
                            s["pico_cpu_pct"], "%", b["pico_cpu_pct"], "unprotected"),
                     result(f"fig10 {f} Hz @{load} txn/s: achieved transactions/s",
                            s["txn_per_s"], "txn/s", b["txn_per_s"], "unprotected")]
    return rows, {"frequencies": list(freqs), "loads": list(loads), "connections": nconn,
                  "secs": secs, "request": 1024,
                  "results": {str(f): v for f, v in raw.items()}}


# ---------------------------------------------------------------- fig11
FLOWS_11, RATE_11, REQ_11, SPORT_11 = 64, 8.0, 4096, 40000  # 64 flows x 8 txn/s of 4 KB


def groups_yaml(n: int) -> str:
    """n groups at 1000 Hz, targets alternating r2/r3; flow k (sport SPORT_11 + k) joins group
    k * n // FLOWS_11."""
    per = FLOWS_11 // n
    g = "\n".join(f"  g{i}: {{id: {i + 1}, target: {'r2' if i % 2 == 0 else 'r3'}, "
                  f"frequency_hz: 1000}}" for i in range(n))
    p = "\n".join(f"  - {{group: g{i}, proto: tcp, sport: \"{SPORT_11 + i * per}-"
                  f"{SPORT_11 + (i + 1) * per - 1}\"}}" for i in range(n))
    return f"groups:\n{g}\npolicies:\n{p}\n"


def fig11(quick: bool) -> tuple[list[dict], dict]:
    counts, secs, warmup = ((1, 8, 64), 4.0, 1.5) if quick else \
        ((1, 2, 4, 8, 16, 32, 64), 8.0, 2.0)
    raw: dict = {}
    for n in (0, *counts):
        with tempfile.TemporaryDirectory(prefix="pico-bench-f11-") as tmp:
            bed = _bed(Path(tmp), f"f11g{n}", ha=False, groups=groups_yaml(n) if n else "")
            try:
                conns = _conns(FLOWS_11, SPORT_11)
                for c in conns:
                    c["rate"] = RATE_11
                got = bed.run(conns, secs, warmup, SEED, {"fixed": REQ_11}, 256)
                row = _stats(got["records"], got["window_s"])
                row.update(_cpu(got))
                row.update(_valid(got, f"fig11 {n} groups"))
                if n:
                    gs = bed.picoctl("r1", "groups").get("groups", [])
                    hz = [g.get("achieved_hz") or 0 for g in gs if 1 <= g.get("id", 0) <= n]
                    row["achieved_hz_min"] = min(hz) if hz else None
                    row["groups_seen"] = len(hz)
                raw[n] = row
                _say(f"fig11 {n or 'no HA'} groups: p95 {row['p95_ms']:.2f} ms, geomean "
                     f"{row['geomean_ms']:.2f} ms, cpu {row['pico_cpu_pct']:.0f}%")
            finally:
                bed.stop()
    b = raw[0]
    rows = []
    for n in counts:
        s = raw[n]
        rows += [result(f"fig11 {n} groups: latency geometric mean", s["geomean_ms"], "ms",
                        b["geomean_ms"], "no HA"),
                 result(f"fig11 {n} groups: latency p95", s["p95_ms"], "ms", b["p95_ms"],
                        "no HA"),
                 result(f"fig11 {n} groups: Pico CPU (% of a core)", s["pico_cpu_pct"], "%",
                        b["pico_cpu_pct"], "no HA"),
                 result(f"fig11 {n} groups: replication CPU (r1 RM + backup SMMs)",
                        s["replication_cpu_pct"], "%", b["replication_cpu_pct"], "no HA")]
    return rows, {"groups": list(counts), "flows": FLOWS_11, "rate_per_flow": RATE_11,
                  "request": REQ_11, "secs": secs,
                  "results": {str(n): v for n, v in raw.items()}}


def _count_invalid(doc) -> int:
    if isinstance(doc, dict):
        return (doc.get("valid") is False) + sum(_count_invalid(v) for v in doc.values())
    if isinstance(doc, list):
        return sum(_count_invalid(v) for v in doc)
    return 0


FIGURES = {"table3": table3, "fig9": fig9, "fig10": fig10, "fig11": fig11}


def run(name: str, quick: bool, out_dir: Path | None) -> list[dict]:
    if os.geteuid() != 0:
        print(f"pico-bench {name}: needs root (namespaces, OVS, Faucet); skipped",
              file=sys.stderr)
        return []
    plot = (out_dir / f"{name}.png") if out_dir else None
    rows, raw = FIGURES[name](quick)
    if plot:
        from bench.plots import PLOTS
        PLOTS[name](raw, plot)
    invalid = _count_invalid(raw)
    rows.append(result(f"{name}: runs that failed over or lost protection", invalid, "runs",
                       0, "expected"))
    if out_dir:
        (out_dir / f"{name}-raw.json").write_text(json.dumps({"quick": quick, **raw},
                                                             indent=1) + "\n")
        _say(f"wrote {plot} and {out_dir / (name + '-raw.json')}")
    return rows
