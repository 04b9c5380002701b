"""The evaluation bed end to end (bench/evalbed.py, the harness of pico-bench table3/fig9-11):
a cluster with MBServ and two groups classified by source port, HTTP-style transactions through
r1. Every connection completes transactions, none breaks, both groups commit checkpoints at
their backups, and the CPU accounting sees r1's packet path and its RM working.

Root only: namespaces, OVS, Faucet. Bed index 43 (pico-bench uses 44)."""
from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, OVS and "
                                 "Faucet; CI runs as root")]

TWO_GROUPS = """groups:
  a: {id: 1, target: r2, frequency_hz: 1000}
  b: {id: 2, target: r3, frequency_hz: 200}
policies:
  - {group: a, proto: tcp, sport: "41000-41003"}
  - {group: b, proto: tcp, sport: "41004-41007"}
"""


def test_transactions_cross_r1_and_both_groups_commit(tmp_path):
    from bench.evalbed import EvalBed
    from bench.evaluation import HTTP_REQ, _cpu, _stats
    bed = EvalBed(tmp_path, f"evt{os.getpid() % 1000}", ha=False, groups=TWO_GROUPS,
                  index=43)
    try:
        conns = [{"sport": 41000 + k, "dport": 8000, "cls": "a" if k < 4 else "b", "rate": 0}
                 for k in range(8)]
        got = bed.run(conns, secs=2.0, warmup=1.0, seed=1, req=HTTP_REQ, resp=1024)
        groups = {g["id"]: g for g in bed.picoctl("r1", "groups")["groups"]}
    finally:
        bed.stop()
    assert got["failovers"] == 0 and got["unprotected"] == []
    recs = got["records"]
    assert len(recs) == 8
    assert [r["error"] for r in recs] == [None] * 8
    assert all(r["n"] > 0 for r in recs), [r["n"] for r in recs]
    for cls in ("a", "b"):
        s = _stats(recs, got["window_s"], cls)
        assert s["transactions"] > 0 and s["p95_ms"] >= s["p50_ms"] > 0
    for g, target in ((1, "r2"), (2, "r3")):
        assert groups[g]["protected"] and groups[g]["target"] == target, groups[g]
        assert groups[g]["committed"] > 0, groups[g]
    cpu = _cpu(got)["by_role_pct"]
    assert cpu["r1-pmm"] > 0 and cpu["r1-mbserv"] > 0 and cpu["r1-rm"] > 0, cpu
