"""The evaluation's pure parts (bench/evaluation.py): the fig11 group layout classifies each
flow into the group the figure says, the fig9 classes go to their groups, the statistics, and
the charts are valid PNGs. The runs themselves are root-only (tests/test_evaluation_net.py)."""
from __future__ import annotations

import struct
import zlib

import pytest

from bench import evaluation as ev
from pmm.classify import Classifier
from shared import abi
from shared.config import parse_config

BASE = """version: 1
cluster: {name: evtest}
packets: {max_groups: 80}
replicas:
  r1: {id: 1, smm_endpoint: "tcp://127.0.0.1:7111", rm_endpoint: "tcp://127.0.0.1:7211"}
  r2: {id: 2, smm_endpoint: "tcp://127.0.0.1:7112", rm_endpoint: "tcp://127.0.0.1:7212"}
  r3: {id: 3, smm_endpoint: "tcp://127.0.0.1:7113", rm_endpoint: "tcp://127.0.0.1:7213"}
"""
TCP = 6


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64])
def test_fig11_layout_spreads_the_flows_evenly_over_n_groups(n):
    cfg = parse_config(BASE + ev.groups_yaml(n))
    assert len(cfg.groups) == n
    assert all(g.frequency_hz == 1000 for g in cfg.groups.values())
    c = Classifier(cfg)
    got = [c.group_of(TCP, 0x0A000001, 0x0A000002, ev.SPORT_11 + k, 8000)
           for k in range(ev.FLOWS_11)]
    assert got == [1 + k * n // ev.FLOWS_11 for k in range(ev.FLOWS_11)]
    # a flow outside the figure's ports is not protected
    assert c.group_of(TCP, 1, 2, ev.SPORT_11 - 1, 8000) == abi.GROUP_DEFAULT


def test_fig9_classes_go_to_their_groups_three_low_to_one_high():
    cfg = parse_config(BASE + ev.STREAMS_9)
    c = Classifier(cfg)
    conns = ev._conns9(40, 20000)
    assert sum(1 for x in conns if x["cls"] == "low") == 3 * sum(1 for x in conns
                                                                   if x["cls"] == "high")
    for x in conns:
        g = c.group_of(TCP, 1, 2, x["sport"], x["dport"])
        want = cfg.groups["high" if x["cls"] == "high" else "low"]
        assert g == want.id
    assert cfg.groups["high"].frequency_hz == 1000 and cfg.groups["low"].frequency_hz == 100


def test_stats_percentiles_rates_and_classes():
    recs = [{"cls": "a", "n": 100, "lat_ms": [float(i) for i in range(1, 101)], "bytes": 10**6,
             "error": None},
            {"cls": "b", "n": 1, "lat_ms": [1000.0], "bytes": 0, "error": "ConnectionError: x"}]
    a = ev._stats(recs, 10.0, "a")
    assert a["txn_per_s"] == 10.0 and a["errors"] == 0
    assert a["p50_ms"] == pytest.approx(50.5) and a["p95_ms"] == pytest.approx(95.05)
    assert a["mbit_per_s"] == pytest.approx(0.8)
    both = ev._stats(recs, 10.0)
    assert both["errors"] == 1 and both["transactions"] == 101
    assert ev._stats([], 1.0)["p95_ms"] != ev._stats([], 1.0)["p95_ms"]  # NaN: no samples


def test_cpu_shares_are_percent_of_one_core_and_replication_is_rm_plus_backup_smms():
    run = {"window_s": 2.0, "cpu": {"r1-rm": 0.5, "r2-smm": 0.25, "r3-smm": 0.25, "r1-pmm": 1.0}}
    c = ev._cpu(run)
    assert c["pico_cpu_pct"] == pytest.approx(100.0)
    assert c["replication_cpu_pct"] == pytest.approx(50.0)


def test_chart_is_a_valid_png(tmp_path):
    from sdn.plot import chart
    p = tmp_path / "c.png"
    chart([{"title": "t", "y": "ms", "x": [1, 2, 3],
            "series": [{"name": "a", "values": [1.0, None, 3.0]},
                       {"name": "b", "values": [float("nan"), 2.0, 2.5]}]}], p, width=300,
          panel_h=120)
    data = p.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (300, 130)
    n = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41:41 + n])
    assert len(raw) == h * (1 + 3 * w)
    assert len(set(raw)) > 3  # something was drawn


def test_invalid_runs_are_counted_wherever_they_sit():
    raw = {"modes": {"a": {"runs": [{"valid": True}, {"valid": False}]},
                     "b": {20: {"valid": False, "high": {}}, 40: {"valid": True}}}}
    assert ev._count_invalid(raw) == 2
    got = {"failovers": 1, "unprotected": [3]}
    v = ev._valid(got, "x")
    assert v["valid"] is False and "failover" in v["invalid_because"] \
        and "[3]" in v["invalid_because"]
    assert ev._valid({"failovers": 0, "unprotected": []}, "x") == {"valid": True,
                                                                    "invalid_because": ""}


def test_results_tables_put_each_figure_beside_its_baseline(tmp_path):
    import json

    from bench import tables
    run = {"txn_per_s_mean": 100.0, "txn_per_s_std": 5.0, "p95_ms_mean": 10.0,
           "p50_ms_mean": 5.0, "pico_cpu_pct": 50.0, "errors": 0}
    t3 = {"modes": {"no-ha": run, "pico-1000hz": dict(run, txn_per_s_mean=97.0,
                                                       p95_ms_mean=11.0)}}
    (tmp_path / "table3-raw.json").write_text(json.dumps(t3))
    st = {"p50_ms": 1.0, "p95_ms": 2.0, "pico_cpu_pct": 10.0, "replication_cpu_pct": 1.0,
          "geomean_ms": 1.5, "valid": True}
    f11 = {"groups": [1, 64], "results": {"0": st, "1": st, "64": dict(st, valid=False)}}
    (tmp_path / "fig11-raw.json").write_text(json.dumps(f11))
    out = __import__("io").StringIO()
    import contextlib
    with contextlib.redirect_stdout(out):
        tables.main([str(tmp_path)])
    text = out.getvalue()
    assert "| Pico, chords, 1000 Hz | 97 ± 5 | 0.97x | 11.0 ms | 1.10x |" in text
    assert "### fig11" in text and "| 64 |" in text and "INVALID" in text
    assert "### fig9" not in text  # (no file: no table)
