"""pico-bench NAME [--quick] [--json FILE]: Pico's benchmarks, each figure beside a baseline
measured in the same run. NAME: flowtable, pmm, checkpoint, failover, table3, fig9, fig10,
fig11, all."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import report

BENCHES = ["flowtable", "pmm", "checkpoint", "failover", "table3", "fig9", "fig10", "fig11"]


def run_one(name: str, quick: bool, out_dir: Path | None = None) -> list[dict] | None:
    if name == "flowtable":
        from bench.flowtable import run
        return run(quick)
    if name == "pmm":
        from bench.pmm import run
        return run(quick)
    if name == "checkpoint":
        from bench.checkpoint import run
        return run(quick)
    if name == "failover":
        from bench.failover import run
        return run(quick)
    from bench import evaluation  # table3, fig9, fig10, fig11 (writes <name>.png/.json)
    return evaluation.run(name, quick, out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pico-bench", description=__doc__)
    ap.add_argument("name", choices=BENCHES + ["all"])
    ap.add_argument("--quick", action="store_true", help="shorter runs and fewer points")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = ap.parse_args(argv)
    names = BENCHES if args.name == "all" else [args.name]
    results, missing = [], []
    out_dir = Path(args.json).resolve().parent if args.json else Path.cwd()
    for name in names:
        got = run_one(name, args.quick, out_dir)
        if got is None:
            missing.append(name)
        else:
            results.extend(got)
    if results:
        print(report.table(results))
    if args.json:
        doc = {"bench": args.name, "quick": args.quick, "machine": report.machine(),
               "results": results, "not_implemented": missing}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    if not results:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
