"""pico-bench checkpoint: how the RM keeps up. For 1, 4, 16 and 64 groups at 1000 Hz, and one
group at 100 to 5000 Hz: the achieved checkpoint frequency, the commit latency (capture ->
INSTALL on the backup's SMM -> ack) p50/p99, and the RM's CPU per checkpoint. Beside them, in
the same run, the whole-box baseline: one group holding every flow, checkpointed at once.

Real parts: two pico-smm processes (r1 and its backup r2) and the RM's own code (RmServer, one
thread) in this process; a packet segment stands in for r1's PMM. Between passes, flows picked
at random across the groups are marked modified at UPDATES_PER_S, as a middlebox would (this
process is the only writer, so no transaction is open while the RM captures).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import result

REPO = Path(__file__).resolve().parents[1]
FLOWS_PER_GROUP = 100
UPDATES_PER_S = 20000  # flow updates per second: about what one Python middlebox sustains


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp: Path, n_groups: int, freq: int, flows: int) -> Path:
    name = f"bck{os.getpid() % 10000}g{n_groups}f{freq}"
    groups = "\n".join(f"  g{i}: {{id: {i}, target: r2, frequency_hz: {freq}}}"
                       for i in range(1, n_groups + 1))
    path = tmp / f"{name}.yaml"
    path.write_text(f"""version: 1
cluster: {{name: {name}, shm_prefix: picob}}
flow_table: {{capacity: {max(flows * 2, 4096)}, lock_stripes: 256}}
control: {{request_timeout_ms: 1000}}
packets: {{max_groups: {max(n_groups + 1, 2)}, ring_slots: 16}}
replicas:
  r1: {{id: 1, smm_endpoint: "tcp://127.0.0.1:{_port()}"}}
  r2: {{id: 2, smm_endpoint: "tcp://127.0.0.1:{_port()}"}}
groups:
{groups}
""")
    return path


def _run(tmp: Path, n_groups: int, freq: int, seconds: float, flows_per_group: int) -> dict:
    from pmm.store import PacketStore
    from rm.server import RmServer
    from shared.api import attach_replica
    from shared.config import load_config
    from shared.control import wait_until_serving
    path = _config(tmp, n_groups, freq, n_groups * flows_per_group)
    cfg = load_config(path)
    smms = [subprocess.Popen([sys.executable, "-m", "smm", "--config", str(path), "--replica",
                              r], cwd=REPO, stderr=subprocess.DEVNULL) for r in ("r1", "r2")]
    store = rm = flows = None
    try:
        for r, p in zip(("r1", "r2"), smms):
            wait_until_serving(cfg.replica(r).smm_endpoint, p, 30, "pico-smm")
        store = PacketStore(cfg, "r1")
        flows = attach_replica(cfg, "r1")
        from shared.flowkey import make_key
        for g in range(1, n_groups + 1):
            for i in range(flows_per_group):
                k = make_key(f"10.{g}.{i // 250}.{i % 250 + 1}", 1000 + i, "192.0.2.1", 80, 6)
                flows.get_flow(k, create=True, group=g)
                flows.put_flow(k)
        slots, stripes = flows.table.slots, flows.table.stripes
        groups, index = store.seg.groups, store.seg.active_groups()
        sps = flows.table.g.slots_per_stripe
        live = np.flatnonzero(slots["status"] == 1)
        rng = np.random.default_rng(1)
        rm = RmServer(cfg, "r1")
        cpu0, t0 = time.process_time(), time.monotonic()
        marked = t0
        while time.monotonic() - t0 < seconds:
            # flows change at a middlebox's pace (UPDATES_PER_S), whatever the pass rate
            now = time.monotonic()
            n = min(len(live), int((now - marked) * UPDATES_PER_S))
            if n == 0:
                rm.run_once()
                rm.wait()
                continue
            marked = now
            dirty = rng.choice(live, size=n, replace=False)
            slots["modified"][dirty] = 1
            slots["version"][dirty] += 1
            blocks = np.unique(dirty // (sps // 16))   # as put_flow does (pico_abi.h)
            stripes["dirty"][blocks // 16, blocks % 16] = 1
            # ...and as a middlebox reading the packets that made those changes (so the RM
            # does not take the groups for idle: rm.server.RmServer._idle)
            for g in np.unique(slots["group"][dirty]):
                row = groups[index[int(g)]]
                row["pkts_read"] = int(row["pkts_read"]) + 1
                row["pkts_done"] = int(row["pkts_done"]) + 1
            rm.run_once()
            rm.wait()
        cpu = time.process_time() - cpu0
        lat = np.concatenate([np.array(ge.commit_latencies) for ge in rm.groups.values()]) * 1e3
        commits = sum(ge.committed for ge in rm.groups.values())
        hz = np.mean([ge.committed / seconds for ge in rm.groups.values()])
        return {"hz": float(hz), "p50": float(np.percentile(lat, 50)) if len(lat) else 0.0,
                "p99": float(np.percentile(lat, 99)) if len(lat) else 0.0,
                "cpu_us": cpu / max(commits, 1) * 1e6, "commits": commits,
                "bytes": float(np.mean([ge.bytes_last for ge in rm.groups.values()]))}
    finally:
        if rm is not None:
            rm.close()
        if flows is not None:
            flows.close()
        if store is not None:
            store.close()
        for p in smms:
            p.terminate()
            p.wait(10)


def run(quick: bool) -> list[dict]:
    seconds = 1.0 if quick else 3.0
    results = []
    with tempfile.TemporaryDirectory(prefix="pico-bench-ckpt-") as tmp:
        tmp = Path(tmp)
        counts = (1, 4, 16, 64)
        whole = _run(tmp, 1, 1000, seconds, FLOWS_PER_GROUP * max(counts))
        for n in counts:
            r = _run(tmp, n, 1000, seconds, FLOWS_PER_GROUP)
            results.append(result(f"{n} groups @1000 Hz: achieved Hz per group", r["hz"], "Hz",
                                  1000, "configured Hz"))
            for q in (50, 99):
                results.append(result(f"{n} groups @1000 Hz: commit p{q}", r[f"p{q}"], "ms",
                                      whole[f"p{q}"], f"whole-box ({FLOWS_PER_GROUP * max(counts)}"
                                      f" flows, one group) commit p{q}"))
            results.append(result(f"{n} groups @1000 Hz: RM CPU per checkpoint", r["cpu_us"], "us",
                                  whole["cpu_us"], "whole-box CPU per checkpoint"))
        for f in (100, 500, 1000, 2000, 5000):
            r = _run(tmp, 1, f, seconds, FLOWS_PER_GROUP)
            results.append(result(f"1 group @{f} Hz: achieved Hz", r["hz"], "Hz", f,
                                  "configured Hz"))
            results.append(result(f"1 group @{f} Hz: commit p99", r["p99"], "ms", whole["p99"],
                                  "whole-box commit p99"))
    return results
