"""The evaluation's PNG plots, drawn from its raw figures (what pico-bench writes into
<name>-raw.json), so they can be drawn again without a run: python -m bench.plots DIR."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sdn.plot import chart


def _at(d: dict, k):
    """d[k] for an int key, whether d came from memory (int keys) or from JSON (strings)."""
    return d[k] if k in d else d[str(k)]


def table3(raw: dict, path) -> None:
    labels = {"no-ha": "NO HA", "pico-1000hz": "PICO 1000HZ",
              "pico-1group-1000hz": "1 GROUP 1000HZ", "whole-box-100hz": "WHOLE-BOX 100HZ"}
    names = [m for m in labels if m in raw["modes"]]
    m = raw["modes"]
    chart([{"title": "Table 3: transactions per second (mean of runs)", "y": "txn/s",
            "x": [labels[n] for n in names],
            "series": [{"name": "txn/s", "values": [m[n]["txn_per_s_mean"] for n in names]}]},
           {"title": "Table 3: latency", "y": "ms", "x": [labels[n] for n in names],
            "series": [{"name": "p95", "values": [m[n]["p95_ms_mean"] for n in names]},
                       {"name": "p50", "values": [m[n]["p50_ms_mean"] for n in names]}]}],
          path)


def fig9(raw: dict, path) -> None:
    counts, m = raw["flows"], raw["modes"]
    chart([{"title": "Fig 9: latency p95 per class", "y": "ms", "x": counts,
            "series": [{"name": f"{c} {mode}", "values": [_at(m[mode], n)[c]["p95_ms"]
                                                         for n in counts]}
                       for c in ("high", "low") for mode in ("streams", "no-ha")]},
           {"title": "Fig 9: Pico CPU", "y": "% of a core", "x": counts,
            "series": [{"name": mode, "values": [_at(m[mode], n)["pico_cpu_pct"]
                                                 for n in counts]}
                       for mode in ("streams", "no-ha")]}], path)


def fig10(raw: dict, path) -> None:
    freqs, loads, res = raw["frequencies"], raw["loads"], raw["results"]
    names = {0: "unprotected", **{f: f"{f} HZ" for f in freqs}}
    xs = [f"{ld}/S" for ld in loads]
    chart([{"title": "Fig 10a: latency p95 vs offered load", "y": "ms", "x": xs,
            "series": [{"name": names[f], "values": [_at(_at(res, f), ld)["p95_ms"]
                                                     for ld in loads]} for f in (0, *freqs)]},
           {"title": "Fig 10b: Pico CPU", "y": "% of a core", "x": xs,
            "series": [{"name": names[f], "values": [_at(_at(res, f), ld)["pico_cpu_pct"]
                                                     for ld in loads]} for f in (0, *freqs)]}],
          path)


def fig11(raw: dict, path) -> None:
    counts, res = raw["groups"], raw["results"]
    b = _at(res, 0)
    chart([{"title": "Fig 11a: latency at 1000 HZ (geometric mean, p95)", "y": "ms",
            "x": counts,
            "series": [{"name": "geomean", "values": [_at(res, n)["geomean_ms"] for n in counts]},
                       {"name": "p95", "values": [_at(res, n)["p95_ms"] for n in counts]},
                       {"name": "no HA geomean", "values": [b["geomean_ms"]] * len(counts)},
                       {"name": "no HA p95", "values": [b["p95_ms"]] * len(counts)}]},
           {"title": "Fig 11b: CPU vs number of groups", "y": "% of a core", "x": counts,
            "series": [{"name": "pico", "values": [_at(res, n)["pico_cpu_pct"] for n in counts]},
                       {"name": "replication", "values": [_at(res, n)["replication_cpu_pct"]
                                                          for n in counts]},
                       {"name": "no HA", "values": [b["pico_cpu_pct"]] * len(counts)}]}],
          path)


PLOTS = {"table3": table3, "fig9": fig9, "fig10": fig10, "fig11": fig11}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    d = Path(argv[0] if argv else "docs")
    for name, fn in PLOTS.items():
        p = d / f"{name}-raw.json"
        if p.exists():
            fn(json.loads(p.read_text()), d / f"{name}.png")
            print(f"wrote {d / (name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
