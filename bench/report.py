"""Benchmark result records, percentiles, machine description and a plain-text table."""
from __future__ import annotations

import os
import platform
import subprocess

import numpy as np


def percentiles(samples_ns, ps=(50, 99)) -> dict[int, float]:
    arr = np.asarray(samples_ns, dtype=np.float64)
    return {p: float(np.percentile(arr, p)) for p in ps}


def result(metric: str, value: float, unit: str, baseline: float | None,
           baseline_metric: str | None = None, **extra) -> dict:
    """One figure with its same-run baseline; ratio = value / baseline."""
    r = {"metric": metric, "value": round(value, 3), "unit": unit,
         "baseline": None if baseline is None else round(baseline, 3),
         "ratio": None if not baseline else round(value / baseline, 3)}
    if baseline_metric:
        r["baseline_metric"] = baseline_metric
    r.update(extra)
    return r


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    try:
        kernel = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
    except OSError:
        kernel = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "kernel": kernel, "machine": platform.machine()}


def table(results: list[dict]) -> str:
    rows = [("metric", "value", "unit", "baseline", "ratio")]
    for r in results:
        rows.append((r["metric"], f"{r['value']:g}", r["unit"],
                     "" if r["baseline"] is None else f"{r['baseline']:g}",
                     "" if r["ratio"] is None else f"{r['ratio']:g}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
