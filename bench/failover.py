"""pico-bench failover: the kill of a replica, from the clients' side and the controller's.

Real parts (sdn/clusterbed.py, root only): OVS + Faucet, three replicas each with SMM, PMM (on
NFQUEUE), RM and the tcptracker middlebox (it resets connections it has no state for),
pico-sdn, and clients holding TCP echo connections from 16 addresses. About N of them cross r1;
r1's processes are SIGKILLed and its link taken down. Reported per N (10, 100, 1000; --quick:
10, 100): the failover gap of r1's connections (kill to their first answer after it: the first of them,
p50, max; each connection asks every total/1500 s, so p50 and max include that wait),
the controller's split (detection, activation, reroute, re-protection), and broken connections.
Beside it, in the same run, the same kill with no replication (no groups: nothing
checkpointed): its moved connections break.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from bench.report import result

RATE = 1500.0  # echo exchanges per second, all connections together


def _run(n_on_r1: int, ha: bool, tmp: Path) -> dict:
    from sdn.clusterbed import (CLIENTS, ECHO_PORT, ECHO_SERVER, HOSTS, REPLICAS, Cluster,
                                Lines, client_ips, first_steering)
    from sdn.core import Controller
    from sdn.steering import bucket_of
    from sdn.testbed import SwitchedBed
    primaries = Controller(list(REPLICAS), 0.0, vnodes=16, buckets=16).primaries()
    bed = SwitchedBed(HOSTS, first_steering, prefix=f"bf{os.getpid() % 100}", base_dir=tmp,
                      index=45, ipv6=False)
    bed.start()
    cluster = srv = cl = None
    try:
        ips = client_ips(bed)
        r1_ips = [ip for ip in ips if primaries[bucket_of(ip, 16)] == "r1"]
        per = max(1, round(n_on_r1 / len(r1_ips)))
        total = per * len(ips)
        interval = max(0.02, total / RATE)
        cluster = Cluster(bed, tmp, f"bf{os.getpid() % 1000}{'h' if ha else 'n'}{n_on_r1}",
                          shm_prefix="picob", ha=ha)
        cluster.wait_log("sdn", "controlling 3 replica(s)")
        srv = bed.exec("s1", [sys.executable, "-c", ECHO_SERVER, bed.host_ip("s1"),
                              str(ECHO_PORT)], stdout=subprocess.PIPE, text=True)
        Lines(srv.stdout).expect("listening", timeout=10)
        cl = bed.exec("c1", [sys.executable, "-c", CLIENTS, ",".join(ips), bed.host_ip("s1"),
                             str(ECHO_PORT), str(per), str(interval), "20"],
                      stdout=subprocess.PIPE, text=True)
        lines = Lines(cl.stdout)
        lines.expect("started", timeout=60)
        lines.expect(lambda s: s.startswith("tick 3."), timeout=60)
        t_kill, wall_kill = time.monotonic(), time.time()
        cl.send_signal(10)  # SIGUSR1: the clients mark the moment
        cluster.kill_replica("r1")
        if ha:
            cluster.wait_log("sdn", "failover of r1 done", timeout=30)
        else:
            cluster.wait_log("sdn", "failover of r1 done", timeout=30)
        time.sleep(3.0)  # the moved connections' retransmissions reach their new replica
        cl.terminate()
        out = lines.records(60)
        moved = [r for r in out if r["src"] in r1_ips]
        gaps = [r["first_after_mark"] - t_kill for r in moved
                if r["first_after_mark"] and not r["error"]]
        log = cluster.log_text("sdn")
        m = re.search(r"failover of r1 done .*detected in (-?\d+) ms, activation (-?\d+) ms, "
                      r"reroute (-?\d+) ms, re-protection (-?\d+) ms", log)
        f = re.search(r"^(\S+ \S+) pico.sdn ERROR replica r1 failed", log, re.M)
        detect = (datetime.strptime(f[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - wall_kill) \
            if f else float("nan")
        errors = {}
        for r in out:
            if r["error"]:
                kind = r["error"].split(":")[0] + (" (r1)" if r["src"] in r1_ips else "")
                errors[kind] = errors.get(kind, 0) + 1
        return {"moved": len(moved), "total": len(out), "errors": errors,
                "first": min(gaps) if gaps else float("nan"),
                "broken": sum(1 for r in moved if r["error"]),
                "broken_other": sum(1 for r in out if r["error"] and r["src"] not in r1_ips),
                "gap_p50": float(np.percentile(gaps, 50)) if gaps else float("nan"),
                "gap_max": max(gaps) if gaps else float("nan"),
                "detect": detect * 1000,
                "activation": float(m[2]) if m else float("nan"),
                "reroute": float(m[3]) if m else float("nan"),
                "reprotect": float(m[4]) if m else float("nan")}
    finally:
        for p in (cl, srv):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)
        if cluster is not None:
            cluster.stop()
        bed.stop()


def run(quick: bool) -> list[dict]:
    if os.geteuid() != 0:
        print("pico-bench failover: needs root (namespaces, OVS, Faucet); skipped",
              file=sys.stderr)
        return []
    results = []
    for n in ((10, 100) if quick else (10, 100, 1000)):
        with tempfile.TemporaryDirectory(prefix="pico-bench-fo-") as tmp:
            ha = _run(n, True, Path(tmp))
        with tempfile.TemporaryDirectory(prefix="pico-bench-fo-") as tmp:
            base = _run(n, False, Path(tmp))
        label = f"{ha['moved']} flows on r1"
        results += [
            result(f"{label}: broken connections", ha["broken"], "conns", base["broken"],
                   f"no replication: broken of {base['moved']}"),
            result(f"{label}: first moved connection answering (kill to answer)",
                   ha["first"] * 1000, "ms", base["first"] * 1000,
                   "no replication (none answers)"),
            result(f"{label}: failover gap p50 (kill to first answer)", ha["gap_p50"] * 1000,
                   "ms", base["gap_p50"] * 1000, "no replication (survivors only)"),
            result(f"{label}: failover gap max", ha["gap_max"] * 1000, "ms",
                   base["gap_max"] * 1000, "no replication (survivors only)"),
            result(f"{label}: detection (kill to decision)", ha["detect"], "ms",
                   base["detect"], "no replication"),
            result(f"{label}: activation", ha["activation"], "ms", base["activation"],
                   "no replication"),
            result(f"{label}: reroute (Faucet warm reload)", ha["reroute"], "ms",
                   base["reroute"], "no replication"),
            result(f"{label}: re-protection", ha["reprotect"], "ms", base["reprotect"],
                   "no replication"),
            result(f"{label}: broken connections not on r1", ha["broken_other"], "conns",
                   base["broken_other"], "no replication"),
        ]
    return results
