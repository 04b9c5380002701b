"""pico-demo: the paper's Figure 8 on a real switch, three modes one after another.

10 TCP connections of steady request/response traffic cross replica r1 (the flows' client
addresses are chosen in r1's steering buckets); a third of the way in, r1's processes are
SIGKILLed and its link taken down; pico-sdn fails it over. The modes:
  no-ha      no replication: the survivors have no state for r1's flows, and the middlebox,
             MBServ (mbserv/, with --reset), resets them;
  whole-box  one group holding every flow, checkpointed to r2 at 40 Hz (the way VM
             replication checkpoints a whole box): output waits up to 25 ms for each commit;
  pico       Elastic Pico Chords: r1's flows in one group per backup (r2 and r3) at 1000 Hz.
Prints progress and a per-mode summary (broken connections, failover gap, latency before and
after), writes fig8.png and fig8.json into --out, and tears everything down (bed, processes,
shared memory). Cluster-wide settings (replica names, flow table size) come from --config
(configs/demo.yaml); the network specifics (ports, MACs, Faucet's files) from the test bed.
PICO_DEMO_QUICK=1 (or --quick): a short run with a small flow table, for CI.
Root only: network namespaces, Open vSwitch and Faucet.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from shared.config import DEFAULT_CONFIG, load_config

MODES = ("no-ha", "whole-box", "pico")
FLOWS = 10
DEMO_CAPACITY = 65536
INTERVAL = 0.05

WHOLE_BOX = """groups:
  box: {id: 1, target: r2, frequency_hz: 40}
policies:
  - {group: box, proto: tcp}
"""


def _say(msg: str) -> None:
    print(f"pico-demo: {msg}", flush=True)


def _sources(bed, mode: str) -> list[str]:
    """FLOWS client addresses whose bucket r1 leads (whole-box: and whose backup is r2, the
    whole box's standby)."""
    from sdn.clusterbed import REPLICAS, client_ips
    from sdn.ring import Ring, placements
    from sdn.steering import bucket_of
    pl = placements(Ring(list(REPLICAS), 16), 16)
    ips = [ip for ip in client_ips(bed, 128) if pl[bucket_of(ip, 16)].primary == "r1" and
           (mode != "whole-box" or pl[bucket_of(ip, 16)].backup == "r2")]
    if len(ips) < FLOWS:
        raise RuntimeError(f"only {len(ips)} client addresses lead to r1 for {mode}")
    return ips[:FLOWS]


def run_mode(mode: str, base, tmp: Path, secs: float, capacity: int, index: int) -> dict:
    from sdn.clusterbed import (CLIENTS, ECHO_PORT, ECHO_SERVER, HOSTS, Cluster, Lines,
                                client_ips, first_steering)
    from sdn.testbed import SwitchedBed
    bed = SwitchedBed(HOSTS, first_steering, prefix=f"pd{os.getpid() % 100}", base_dir=tmp,
                      index=index, ipv6=False)
    _say(f"[{mode}] starting the switch (OVS + Faucet)")
    bed.start()
    cluster = srv = cl = None
    try:
        srcs = _sources(bed, mode)
        _say(f"[{mode}] starting 3 replicas (SMM, PMM, RM, middlebox) and pico-sdn")
        cluster = Cluster(bed, tmp, f"{base.cluster.name[:8]}{mode[0]}{os.getpid() % 1000}",
                          shm_prefix=base.cluster.shm_prefix, ha=(mode == "pico"),
                          frequency_hz=1000, groups=WHOLE_BOX if mode == "whole-box" else "",
                          capacity=capacity, middlebox="mbserv")
        cluster.wait_log("sdn", "controlling 3 replica(s)", timeout=60)
        for ip in client_ips(bed, 128)[16:]:  # the bed aliases 16 addresses; we use up to 128
            bed.run("c1", ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
        srv = bed.exec("s1", [sys.executable, "-c", ECHO_SERVER, bed.host_ip("s1"),
                              str(ECHO_PORT)], stdout=subprocess.PIPE, text=True)
        Lines(srv.stdout).expect("listening", timeout=10)
        cl = bed.exec("c1", [sys.executable, "-c", CLIENTS, ",".join(srcs), bed.host_ip("s1"),
                             str(ECHO_PORT), "1", str(INTERVAL), str(secs), "samples"],
                      stdout=subprocess.PIPE, text=True)
        lines = Lines(cl.stdout)
        lines.expect("started", timeout=30)
        kill_at = secs / 3
        line = lines.expect(lambda s: s.startswith("tick") and float(s.split()[1]) >= kill_at,
                            timeout=secs + 30)
        t_kill = float(line.split()[1])
        _say(f"[{mode}] {FLOWS} connections through r1 for {t_kill:.1f} s: killing r1 "
             "(SIGKILL + link down)")
        cluster.kill_replica("r1")
        cluster.wait_log("sdn", "failover of r1 done", timeout=30)
        _say(f"[{mode}] pico-sdn: " + [ln for ln in cluster.log_text("sdn").splitlines()
                                       if "failover of r1 done" in ln][-1].split("INFO ")[-1])
        results = lines.records(secs + 60)
        return summarize(mode, results, t_kill)
    finally:
        for p in (cl, srv):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)
        if cluster is not None:
            cluster.stop()
        bed.stop()


def summarize(mode: str, results: list[dict], t_kill: float) -> dict:
    broken = [r for r in results if r["error"]]
    before = [v for r in results for t, v in r["samples"] if t < t_kill - 0.2]
    gaps = []  # each surviving connection's longest silence from just before the kill on
    for r in results:
        ts = [t for t, _ in r["samples"] if t >= t_kill - 1.0]
        if len(ts) > 1 and not r["error"]:
            gaps.append(max(b - a for a, b in zip(ts, ts[1:])))
    recovered = [v for r in results if not r["error"] for t, v in r["samples"]
                 if t > t_kill + (max(gaps) if gaps else 0) + 0.5]
    return {"mode": mode, "connections": len(results), "broken": len(broken),
            "errors": sorted({r["error"].split(":")[0] for r in broken}),
            "failover_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
            "latency_before_ms": round(float(np.median(before)), 3) if before else None,
            "latency_after_ms": round(float(np.median(recovered)), 3) if recovered else None,
            "t_kill": t_kill, "series": [r["samples"] for r in results]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pico-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--out", default="demo-out", help="directory for fig8.png and fig8.json")
    ap.add_argument("--quick", action="store_true", default=bool(os.environ.get("PICO_DEMO_QUICK")))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("pico-demo: needs root (network namespaces, Open vSwitch, Faucet); run it as root "
              "(make demo)", file=sys.stderr)
        return 2
    base = load_config(args.config)
    if sorted(base.replicas)[:3] != ["r1", "r2", "r3"]:
        print(f"pico-demo: {args.config} must name replicas r1, r2, r3", file=sys.stderr)
        return 2
    secs = 6.0 if args.quick else 15.0
    # The demo's 10 flows need no million-slot tables; three 335 MB segments per mode would
    # only slow its start on a small machine. The size is capped (DEMO_CAPACITY).
    capacity = 4096 if args.quick else min(base.flow_table.capacity, DEMO_CAPACITY)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for mode in MODES:
        with tempfile.TemporaryDirectory(prefix=f"pico-demo-{mode}-") as tmp:
            summaries.append(run_mode(mode, base, Path(tmp), secs, capacity, 49))
    _say("summary (10 TCP connections through r1; r1 killed at a third of the run)")
    print(f"  {'mode':10} {'broken':>7} {'failover gap':>13} {'latency before':>15} "
          f"{'latency after':>14}")
    for s in summaries:
        gap = "-" if s["failover_gap_ms"] is None else f"{s['failover_gap_ms']:.0f} ms"
        lb = "-" if s["latency_before_ms"] is None else f"{s['latency_before_ms']:.2f} ms"
        la = "-" if s["latency_after_ms"] is None else f"{s['latency_after_ms']:.2f} ms"
        print(f"  {s['mode']:10} {s['broken']:>4}/{s['connections']:<2} {gap:>13} {lb:>15} "
              f"{la:>14}")
    from sdn.plot import figure
    figure([{"title": f"{s['mode']}: {s['broken']} of {s['connections']} broken",
             "series": s["series"], "marks": [s["t_kill"]]} for s in summaries],
           out / "fig8.png")
    (out / "fig8.json").write_text(json.dumps({"quick": args.quick, "modes": summaries},
                                              indent=1) + "\n")
    _say(f"wrote {out / 'fig8.png'} and {out / 'fig8.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
