"""Failover on a real switch: three replicas behind OVS + Faucet, a stateful middlebox that
drops segments of connections it has no state for, clients holding TCP connections that echo
checked payloads. SIGKILL all of r1's processes and take its link down: every connection
survives. Reroute before activation (and no standby hold): connections through r1 break.

Root only: namespaces, OVS, Faucet. Bed index 48, prefix fo<pid % 100>.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

from sdn.clusterbed import (CLIENTS, ECHO_PORT, ECHO_SERVER, HOSTS, Cluster, client_ips,
                     first_steering)
from sdn.clusterbed import Lines
from sdn.steering import bucket_of
from sdn.testbed import SwitchedBed

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, OVS and "
                                 "Faucet; CI runs as root")]


@pytest.fixture
def bed(tmp_path):
    b = SwitchedBed(HOSTS, first_steering, prefix=f"fo{os.getpid() % 100}", base_dir=tmp_path,
                    index=48, ipv6=False)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def _clients(bed, per: int, secs: float):
    srv = bed.exec("s1", [sys.executable, "-c", ECHO_SERVER, bed.host_ip("s1"), str(ECHO_PORT)],
                   stdout=__import__("subprocess").PIPE, text=True)
    Lines(srv.stdout).expect(lambda line: "listening" in line, timeout=10)
    cl = bed.exec("c1", [sys.executable, "-c", CLIENTS, ",".join(client_ips(bed)),
                         bed.host_ip("s1"), str(ECHO_PORT), str(per), "0.05", str(secs)],
                  stdout=__import__("subprocess").PIPE, text=True)
    lines = Lines(cl.stdout)
    lines.expect(lambda line: "started" in line, timeout=20)
    return srv, cl, lines




def _on_r1(cluster, bed) -> set[str]:
    primaries = cluster.sdn_primaries_at_start
    return {ip for ip in client_ips(bed) if primaries[bucket_of(ip, 16)] == "r1"}


def run_failover(bed, tmp_path, order: str, hold_ms: int, delay_ms: int = 0,
                 hang: bool = False):
    from sdn.core import Controller
    from sdn.clusterbed import REPLICAS
    cluster = Cluster(bed, tmp_path, f"fo{os.getpid() % 1000}{order[0]}", order=order,
                      hold_ms=hold_ms, activate_delay_ms=delay_ms)
    cluster.sdn_primaries_at_start = Controller(list(REPLICAS), 0.0, vnodes=16,
                                                buckets=16).primaries()
    srv = cl = None
    try:
        cluster.wait_log("sdn", "controlling 3 replica(s)")
        srv, cl, lines = _clients(bed, per=2, secs=12.0)
        lines.expect(lambda s: s.startswith("tick 2."), timeout=20)   # 2 s of traffic
        t_kill = time.monotonic()
        if hang:
            cluster.hang_replica("r1")
        else:
            cluster.kill_replica("r1")
        cluster.wait_log("sdn", "failover of r1 done", timeout=20)
        results = lines.records(40.0)
        return cluster, results, t_kill
    finally:
        for p in (cl, srv):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)
        cluster.stop()


def test_killing_a_replica_breaks_no_connection(bed, tmp_path):
    cluster, results, t_kill = run_failover(bed, tmp_path, "activate-first", 500, delay_ms=500)
    r1 = _on_r1(cluster, bed)
    assert r1, "no client bucket was steered to r1: the test would prove nothing"
    assert len(results) == 32
    broken = [r for r in results if r["error"]]
    assert broken == [], [(r["src"], r["k"], r["done"], r["error"]) for r in broken]
    for r in results:   # every connection, r1's included, kept answering after the failover
        assert r["done"] > 100 and r["last"] > t_kill + 2.0, r
    sdn_log = cluster.log_text("sdn")
    assert "replica r1 failed" in sdn_log and "failover of r1 done" in sdn_log


def test_a_hung_replica_with_its_link_up_is_found_by_heartbeat(bed, tmp_path):
    cluster, results, t_kill = run_failover(bed, tmp_path, "activate-first", 500, hang=True)
    assert _on_r1(cluster, bed)
    assert [r for r in results if r["error"]] == []
    assert all(r["last"] > t_kill + 2.0 for r in results)
    log = cluster.log_text("sdn")
    assert "replica r1 failed (no heartbeat" in log and "link down" not in log


def test_rerouting_before_activation_breaks_connections(bed, tmp_path):
    """The same kill with the steps swapped, and no standby hold in the PMMs (as HA setups
    without one): r1's connections reach their backups before their state is active, the
    middlebox resets them. Connections that never crossed r1 are untouched. (Here activation
    takes 4 ms, shorter than TCP's first retransmission; a delay of 500 ms stands in for the
    activation of many flows, so retransmissions land in the gap.)"""
    cluster, results, t_kill = run_failover(bed, tmp_path, "reroute-first", 0, delay_ms=500)
    r1 = _on_r1(cluster, bed)
    assert r1
    reset = [r for r in results if r["error"] and "reset" in r["error"].lower()]
    assert reset and {r["src"] for r in reset} <= r1, [(r["src"], r["error"]) for r in reset]
    assert all(not r["error"] for r in results if r["src"] not in r1)


def test_a_restarted_controller_adopts_the_view_and_still_fails_over(bed, tmp_path):
    """r1 fails over; pico-sdn is SIGKILLed and restarted mid-traffic (the switch keeps
    forwarding); it adopts the replicas' view without touching the steering; then r2 fails
    and the restarted controller moves everything to r3. No connection breaks."""
    from sdn.clusterbed import REPLICAS
    from sdn.core import Controller
    cluster = Cluster(bed, tmp_path, f"fr{os.getpid() % 1000}")
    cluster.sdn_primaries_at_start = Controller(list(REPLICAS), 0.0, vnodes=16,
                                                buckets=16).primaries()
    srv = cl = None
    try:
        cluster.wait_log("sdn", "controlling 3 replica(s)")
        srv, cl, lines = _clients(bed, per=2, secs=16.0)
        lines.expect(lambda s: s.startswith("tick 2."), timeout=20)
        cluster.kill_replica("r1")
        cluster.wait_log("sdn", "failover of r1 done", timeout=20)
        cluster.kill_sdn()
        cluster.start_sdn()
        cluster.wait_log("sdn", "adopting view 2", timeout=20)
        cluster.wait_log("sdn", "steering for view 2", timeout=20)
        first = cluster.log_text("sdn")
        assert "failing over" not in first and "failover of" not in first  # nothing redone
        assert "unchanged" in first and "not reloading" in first          # steering untouched
        lines.expect(lambda s: s.startswith("tick 8."), timeout=30)
        t_kill = time.monotonic()
        cluster.kill_replica("r2")
        cluster.wait_log("sdn", "failover of r2 done", timeout=20)
        results = lines.records(40.0)
    finally:
        for p in (cl, srv):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)
        cluster.stop()
    assert len(results) == 32
    assert [r for r in results if r["error"]] == []
    assert all(r["last"] > t_kill + 2.0 for r in results)       # all on r3 now, all alive


def _scale(cluster, op: str, replica: str) -> None:
    from rm.ctl import main as picoctl
    assert picoctl(["--config", str(cluster.path), f"scale-{op}", replica]) == 0
    cluster.wait_log("sdn", f"scale-{op} of {replica} done", timeout=30)


def _traffic_around(bed, cluster, action, secs=10.0):
    srv = cl = None
    try:
        cluster.wait_log("sdn", "controlling 3 replica(s)")
        srv, cl, lines = _clients(bed, per=2, secs=secs)
        lines.expect(lambda s: s.startswith("tick 2."), timeout=20)
        t = time.monotonic()
        action()
        return lines.records(40.0), t
    finally:
        for p in (cl, srv):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)


def _group_states(cluster, replicas) -> dict:
    """Each replica's group table as its RM reports it (for failure messages)."""
    from shared import wire
    from shared.control import ControlClient
    out = {}
    for r in replicas:
        try:
            with ControlClient(cluster.cfg.replica(r).rm_endpoint, timeout_ms=1000) as c:
                rows = json.loads(c.request(wire.STATS).body)["groups"]
            out[r] = [{k: g.get(k) for k in ("id", "suspended", "buffering", "protected",
                                             "held", "input_queued", "output_queued",
                                             "committed", "epoch")} for g in rows]
        except Exception as e:  # noqa: BLE001 - a diagnostic only
            out[r] = repr(e)
    return out


def test_scale_in_moves_a_replicas_flows_live_and_breaks_nothing(bed, tmp_path):
    cluster = Cluster(bed, tmp_path, f"si{os.getpid() % 1000}")
    try:
        def leave():
            _scale(cluster, "in", "r1")
            cluster.kill_replica("r1")       # gone for good: nobody fails it over again
        results, t = _traffic_around(bed, cluster, leave)
        log = cluster.log_text("sdn")
        assert "replica r1 failed" not in log and "r1 frozen" in log
        states = _group_states(cluster, ["r2", "r3"])
    finally:
        cluster.stop()
    assert len(results) == 32
    assert [(r["src"], r["error"]) for r in results if r["error"]] == [], states
    assert all(r["last"] > t + 2.0 for r in results)


def test_scale_out_moves_buckets_to_the_newcomer_live(tmp_path):
    from sdn.clusterbed import first_steering as steer
    b = SwitchedBed(HOSTS, lambda bed: steer(bed, ["r1", "r2"]),
                    prefix=f"fo{os.getpid() % 100}", base_dir=tmp_path, index=48, ipv6=False)
    b.start()
    cluster = None
    try:
        cluster = Cluster(b, tmp_path, f"so{os.getpid() % 1000}", members=["r1", "r2"])
        results, t = _traffic_around(b, cluster, lambda: _scale(cluster, "out", "r3"))
        from shared.api import attach_replica
        from shared.flowtable import ACTIVE
        with attach_replica(cluster.cfg, "r3") as r3:
            taken = int((r3.table.slots["status"] == ACTIVE).sum())
        assert taken > 0, cluster.log_text("sdn")   # r3 serves moved connections now
        assert "r3 took over" in cluster.log_text("sdn")
    finally:
        if cluster is not None:
            cluster.stop()
        b.stop()
    assert len(results) == 32
    assert [(r["src"], r["error"]) for r in results if r["error"]] == []
    assert all(r["last"] > t + 2.0 for r in results)
