"""The fault matrix (issue 8): faults injected into a live three-replica cluster on a real switch
(sdn/clusterbed.py: OVS + Faucet, r1..r3 with SMM, PMM, RM and examples/tcptracker.py --reset,
pico-sdn), under 32 TCP echo connections whose every payload is checked.

Scenarios: SIGKILL and SIGSTOP (held HOLD_S, longer than the 300 ms heartbeat timeout, then
SIGCONT) of each of pico-smm, pico-pmm, pico-rm and the middlebox of r1, of pico-sdn, Faucet and
ovs-vswitchd, at a random moment (the seed is printed; PICO_FAULTS_SEED sets it); the backup
killed mid-checkpoint (r2's SMM SIGSTOPped until r1's RM has an epoch to it in flight, then
SIGKILLed); and a partition of the control network (iptables in the root namespace drops the
TCP traffic of the cluster's own ZeroMQ ports on lo for HOLD_S, then the rule goes).

Every PMM writes its audit log (`pico-pmm --audit`) and every scenario asserts zero
output-commit violations (pmm/audit.py) and no wrong echo; then what the scenario promises
(EXPECT below; docs/reliability.md#fault-matrix says why). Each scenario appends one JSON row to
$PICO_FAULTS_JSON (default: the test's tmp dir): broken/total, lost requests, violations, time
to recover (from the fault until every surviving connection answers again after its longest
stall), the replicas pico-sdn failed. `python tests/test_faults_net.py ROWS.jsonl` prints the
table of docs/reliability.md.

Short form (`make test`): SHORT below. Whole matrix: `make test-faults` (PICO_FAULTS=full).
Root only: namespaces, OVS, Faucet, iptables. Bed index 40, prefix fm<pid % 100>.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sdn.clusterbed import CLIENTS, ECHO_PORT, ECHO_SERVER, HOSTS, Cluster, Lines, client_ips, \
    first_steering  # noqa: E402
from sdn.testbed import SwitchedBed, _nsexec, _pid_alive, _run  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.faults,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, OVS, "
                                 "Faucet and iptables; CI runs as root")]

FULL = os.environ.get("PICO_FAULTS", "") == "full"
SEED = int(os.environ.get("PICO_FAULTS_SEED", "0")) or random.SystemRandom().randrange(1, 10**6)
# The controller's heartbeat timeout. The other net tests use 300 ms; on a loaded 2-core machine
# that fails healthy replicas now and then (a late beat), which the matrix must not mistake for
# the fault's effect. PICO_FAULTS_HB_MS=300 runs it with the tests' usual timeout.
HB_MS = int(os.environ.get("PICO_FAULTS_HB_MS", "1000"))
HOLD_S = 2 * HB_MS / 1000 + 0.5   # a SIGSTOP or a partition lasts this long (> the timeout)
POST_S = 6.0          # traffic goes on this long after the fault (or after the switch is back)
STALL_S = 0.4         # a pause between two answers longer than this is a stall (normal: 50 ms)
PER = 2               # connections per client address (16 addresses)

TARGETS = ("smm", "pmm", "rm", "middlebox", "sdn", "faucet", "ovs-vswitchd")
SCENARIOS = [f"{t}-{s}" for t in TARGETS for s in ("SIGKILL", "SIGSTOP")] + \
    ["backup-mid-checkpoint", "control-partition"]
SHORT = {"smm-SIGKILL", "rm-SIGSTOP", "sdn-SIGKILL", "control-partition"}

# What each scenario promises. failover: pico-sdn must fail exactly r1 over (or r2 for the
# backup), none: it must fail nobody, None: not asserted. broken: the connections allowed to
# break (0, or None: reported, not asserted). Violations and wrong echoes are always 0.
EXPECT = {
    "smm-SIGKILL": ("r1", 0), "smm-SIGSTOP": ("r1", 0),
    "pmm-SIGKILL": ("r1", 0), "pmm-SIGSTOP": ("r1", 0),
    "rm-SIGKILL": ("r1", 0), "rm-SIGSTOP": ("r1", 0),
    "middlebox-SIGKILL": ("r1", 0), "middlebox-SIGSTOP": ("r1", 0),
    "sdn-SIGKILL": ("none", 0), "sdn-SIGSTOP": ("none", 0),
    "faucet-SIGKILL": ("none", 0), "faucet-SIGSTOP": ("none", 0),
    "ovs-vswitchd-SIGKILL": (None, None), "ovs-vswitchd-SIGSTOP": ("none", 0),
    "backup-mid-checkpoint": ("r2", 0),
    # Every replica silent at once: the controller suspects its own partition and fails
    # nobody (sdn/core.py); the groups given up meanwhile are protected again when their
    # backups answer (rm/server.py, the probe).
    "control-partition": ("none", 0),
}

@pytest.fixture
def bed(tmp_path):
    b = SwitchedBed(HOSTS, first_steering, prefix=f"fm{os.getpid() % 100}", base_dir=tmp_path,
                    index=40, ipv6=False)
    b.start()
    try:
        yield b
    finally:
        b.stop()


# ------------------------------------------------------------------------------- helpers

def _tick(line: str) -> float | None:
    return float(line.split()[1]) if line.startswith("tick ") else None


def _until_tick(lines: Lines, at: float, timeout: float = 60.0) -> None:
    lines.expect(lambda s: (_tick(s) or 0.0) >= at, timeout=timeout)


def _await(cond, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True




def _audit(path: Path) -> tuple[int, list[dict]]:
    """Records and output-commit violations of one audit log (a SIGKILLed PMM may leave a
    truncated last line)."""
    from pmm.audit import violations
    recs = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass
    return len(recs), violations(recs)


def _ports(cluster) -> list[int]:
    """The cluster's own ZeroMQ ports: every SMM and RM endpoint and the controller's."""
    cfg = cluster.cfg
    eps = [cfg.control.controller_endpoint]
    for r in ("r1", "r2", "r3"):
        rep = cfg.replica(r)
        eps += [rep.smm_endpoint, rep.rm_endpoint]
    return sorted({int(e.rsplit(":", 1)[1]) for e in eps if e and e.startswith("tcp://")})


def _partition_rule(cluster, tag: str) -> list[str]:
    return ["INPUT", "-i", "lo", "-p", "tcp", "-m", "multiport", "--ports",
            ",".join(map(str, _ports(cluster))), "-m", "comment", "--comment", tag, "-j", "DROP"]


def _heal(rule: list[str]) -> None:
    for _ in range(5):   # every copy of our rule, never anyone else's
        if subprocess.run(["iptables-legacy", "-w", "5", "-D", *rule],
                          capture_output=True).returncode != 0:
            return


def _rm_inflight(cluster, r: str, target: str) -> int:
    from shared import wire
    from shared.control import ControlClient
    try:
        with ControlClient(cluster.cfg.replica(r).rm_endpoint, timeout_ms=300) as c:
            rows = json.loads(c.request(wire.STATS).body)["groups"]
    except Exception:  # noqa: BLE001 - retried by the caller
        return 0
    return sum(g.get("inflight", 0) for g in rows if g.get("target") == target)


def _restart_faucet(bed) -> None:
    old = bed._faucet
    if old is not None and old.poll() is None:
        raise AssertionError("faucet still runs")
    if old is not None:
        old.wait(5)
    if bed._faucet_out is not None:
        bed._faucet_out.close()
    bed._start_faucet(bed._find_faucet())
    bed.wait_dp_up(30)


def _restart_vswitchd(bed) -> None:
    """What a supervisor does: start ovs-vswitchd again on the same database."""
    _run(_nsexec(bed.switch_ns, [
        "ovs-vswitchd", f"unix:{bed.db_sock}", f"--pidfile={bed._pidfile('ovs-vswitchd')}",
        f"--unixctl={bed._ctl('ovs-vswitchd')}",
        f"--log-file={bed.log_dir / 'ovs-vswitchd.log'}", "--detach"]), env=bed.ovs_env)
    bed.started_pids["ovs-vswitchd"] = bed._read_pid(bed._pidfile("ovs-vswitchd"))


def _target_pid(cluster, bed, target: str) -> int:
    procs = cluster.procs["r1"]   # smm, pmm, rm, middlebox (in start order)
    return {"smm": procs[0].pid, "pmm": procs[1].pid, "rm": procs[2].pid,
            "middlebox": procs[3].pid, "sdn": cluster.sdn.pid, "faucet": bed.faucet_pid,
            "ovs-vswitchd": bed.started_pids.get("ovs-vswitchd")}[target]


def _failed(sdn_logs: str) -> list[str]:
    return [line.split("replica ", 1)[1].split(": failing over")[0]
            for line in sdn_logs.splitlines() if "failed (" in line and ": failing over" in line]


def _recovery(results: list[dict], t_fault: float, window: float) -> tuple[float, float]:
    """(time to recover, longest stall): per surviving connection, its longest pause between
    answers that begins from the fault to `window` s later (the fault's own effect, not a
    later hiccup of the loaded machine); it recovered at the answer that ended that pause (at
    once if it is not longer than STALL_S). Time to recover: the latest of those, from the
    fault."""
    recover = stall = 0.0
    for r in results:
        if r["error"]:
            continue
        prev, worst, end = t_fault, 0.0, t_fault
        for a in r["answers"]:
            if prev - t_fault <= window and a - prev > worst:
                worst, end = a - prev, a
            prev = a
        stall = max(stall, worst)
        if worst > STALL_S:
            recover = max(recover, end - t_fault)
    return round(recover, 3), round(stall, 3)


# ------------------------------------------------------------------------------- the run

def _unprotected(cluster) -> list[str]:
    """Groups with traffic that some replica's RM does not protect now (picoctl groups),
    awaited for a few probe periods: "r1/1002"..."""
    def now_unprotected():
        out = []
        for r in ("r1", "r2", "r3"):
            cp = subprocess.run([sys.executable, "-m", "rm.ctl", "--config", str(cluster.path),
                                 "--replica", r, "--json", "groups"], capture_output=True,
                                text=True, timeout=20, cwd=REPO)
            if cp.returncode != 0:
                out.append(f"{r}: picoctl failed: {cp.stderr.strip()[:200]}")
                continue
            for g in json.loads(cp.stdout)["groups"]:
                if g["id"] and g.get("target") not in (None, r) and g.get("rx_packets") \
                        and not g["protected"]:
                    out.append(f"{r}/{g['id']}")
        return out
    deadline = time.monotonic() + 5.0   # (the RM probes a lost backup every second)
    while (got := now_unprotected()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


class SpuriousFailover(AssertionError):
    """pico-sdn failed a replica before the fault (a late heartbeat on a loaded machine)."""


def run_scenario(bed, tmp_path, scenario: str) -> dict:
    rng = random.Random(f"{SEED}/{scenario}")
    tmp_path.mkdir(parents=True, exist_ok=True)
    name = f"fm{os.getpid() % 1000}s{SCENARIOS.index(scenario)}{tmp_path.name[-1]}"
    cluster = Cluster(bed, tmp_path, name, audit=True,
                      heartbeat_timeout_ms=HB_MS)
    srv = cl = None
    stopped: list[int] = []        # PIDs we SIGSTOPped: SIGCONT in any case
    rule = _partition_rule(cluster, f"pico-faults-{os.getpid()}")
    notes: list[str] = []
    try:
        cluster.wait_log("sdn", "controlling 3 replica(s)", timeout=30)
        srv = bed.exec("s1", [sys.executable, "-c", ECHO_SERVER, bed.host_ip("s1"),
                              str(ECHO_PORT)], stdout=subprocess.PIPE, text=True)
        Lines(srv.stdout).expect("listening", timeout=10)
        cl = bed.exec("c1", [sys.executable, "-c", CLIENTS, ",".join(client_ips(bed)),
                             bed.host_ip("s1"), str(ECHO_PORT), str(PER), "0.05", "0"],
                      stdout=subprocess.PIPE, text=True)
        lines = Lines(cl.stdout)
        lines.expect("started", timeout=20)
        at = rng.uniform(2.0, 4.0)          # the random moment: 2..4 s into the traffic
        _until_tick(lines, at)
        time.sleep(rng.uniform(0.0, 0.2))   # (ticks come every 0.2 s)
        target, _, sig = scenario.rpartition("-")
        if "failing over" in cluster.log_text("sdn"):
            raise SpuriousFailover(cluster.log_text("sdn")[-2000:])
        t_fault = time.monotonic()
        cl.send_signal(signal.SIGUSR1)      # the clients mark the fault
        post_from = t_fault
        if scenario == "backup-mid-checkpoint":
            smm2 = cluster.procs["r2"][0]
            os.kill(smm2.pid, signal.SIGSTOP)
            stopped.append(smm2.pid)
            assert _await(lambda: _rm_inflight(cluster, "r1", "r2") > 0, 5.0, 0.005), \
                "r1's RM never had an epoch to r2 in flight"
            os.kill(smm2.pid, signal.SIGKILL)
            notes.append(f"r2 SMM killed {time.monotonic() - t_fault:.3f} s after its stop, "
                         "with an epoch of r1 to r2 in flight")
        elif scenario == "control-partition":
            _run(["iptables-legacy", "-w", "5", "-I", *rule])
            try:
                time.sleep(HOLD_S)
            finally:
                _heal(rule)
        else:
            pid = _target_pid(cluster, bed, target)
            assert pid and _pid_alive(pid), f"{target} is not running"
            if sig == "SIGSTOP":
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
                time.sleep(HOLD_S)
                os.kill(pid, signal.SIGCONT)
                stopped.remove(pid)
            else:
                os.kill(pid, signal.SIGKILL)
                assert _await(lambda: not _pid_alive(pid), 5.0), f"{target} survived SIGKILL"
                if target == "sdn":   # the operator (or a supervisor) starts it again
                    cluster.sdn.wait(5)
                    time.sleep(HOLD_S)
                    cluster.start_sdn()
                    cluster.wait_log("sdn", "controlling 3 replica(s)", timeout=30)
                    notes.append("pico-sdn restarted after %.1f s" % HOLD_S)
                elif target == "faucet":
                    time.sleep(HOLD_S)
                    _restart_faucet(bed)
                    notes.append("Faucet restarted after %.1f s, datapath up %.2f s later"
                                 % (HOLD_S, bed.dp_up_seconds))
                elif target == "ovs-vswitchd":
                    _await(lambda: not bed.dp_is_up(), 5.0)
                    _restart_vswitchd(bed)
                    bed.wait_dp_up(30)
                    post_from = time.monotonic()
                    notes.append("ovs-vswitchd restarted at once; the datapath was back "
                                 f"{post_from - t_fault:.2f} s after the kill")
        # Traffic goes on; then the clients stop and report.
        lines.expect(lambda s: _tick(s) is not None, timeout=30)
        deadline = post_from + POST_S
        while time.monotonic() < deadline:
            lines.expect(lambda s: _tick(s) is not None, timeout=30)
        unprotected = _unprotected(cluster) if scenario == "control-partition" else []
        cl.send_signal(signal.SIGTERM)
        results = lines.records(45.0)
        sdn_logs = "\n".join(p.read_text(errors="replace")
                             for p in sorted(tmp_path.glob("sdn*.log")))
        # No bucket rule left: the switch forwards client <-> server directly, around every
        # middlebox (what pico-sdn does once no replica is left).
        bypassed = "ipv4_src" not in bed.config_path.read_text()
    finally:
        _heal(rule)
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        for p in (cl, srv):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(20)
        cluster.stop()
    audits = {r: _audit(p) for r, p in cluster.audit.items()}
    broken = [r for r in results if r["error"]]
    recover, stall = _recovery(results, t_fault, post_from - t_fault + 3.0)
    alive_at_end = sum(1 for r in results if not r["error"] and r["last"] > deadline - 1.0)
    row = {"scenario": scenario, "seed": SEED, "moment_s": round(at, 2),
           "total": len(results), "broken": len(broken),
           "kinds": sorted({r["kind"] for r in broken}),
           "lost": len(broken), "mismatches": sum(r["kind"] == "mismatch" for r in results),
           "violations": sum(len(v) for _, v in audits.values()),
           "released": {r: n for r, (n, _) in audits.items()},
           "recover_s": recover, "max_stall_s": stall, "answering_at_end": alive_at_end,
           "failed": _failed(sdn_logs), "bypassed": bypassed, "notes": notes,
           "unprotected_at_end": unprotected,
           "errors": sorted({r["error"] for r in broken})[:3]}
    print(f"fault matrix (seed {SEED}): {json.dumps(row)}")
    out = os.environ.get("PICO_FAULTS_JSON") or str(tmp_path / "faults.jsonl")
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


@pytest.mark.timeout(240)
# `make test` collects the short form only (not skips: the rest is `make test-faults`)
@pytest.mark.parametrize("scenario", SCENARIOS if FULL else [s for s in SCENARIOS if s in SHORT])
def test_fault(bed, tmp_path, scenario):
    print(f"fault matrix seed {SEED} (PICO_FAULTS_SEED={SEED} repeats it)")
    try:
        row = run_scenario(bed, tmp_path / "run1", scenario)
    except SpuriousFailover as e:   # once: a fresh cluster on the same bed
        print(f"fault matrix: a replica failed before the fault, running again:\n{e}")
        row = run_scenario(bed, tmp_path / "run2", scenario)
        row["notes"].append("run twice: a replica failed before the fault in the first run")
    assert row["total"] == 16 * PER, row
    assert row["violations"] == 0, row          # output commit held, whatever happened
    assert row["mismatches"] == 0, row          # no wrong data, ever
    assert all(row["released"].values()), row   # every PMM audited released packets
    failover, broken = EXPECT[scenario]
    assert row["bypassed"] == (failover == "all"), row
    if failover == "none":
        assert row["failed"] == [], row
    elif failover == "all":
        assert sorted(f.split()[0] for f in row["failed"]) == ["r1", "r2", "r3"], row
    elif failover is not None:
        assert [f.split()[0] for f in row["failed"]] == [failover], row
    if scenario == "control-partition":      # protection came back with the network
        assert row["unprotected_at_end"] == [], row
    if broken is not None:
        assert row["broken"] <= broken, row
        assert row["answering_at_end"] == row["total"], row
    else:   # every connection either answers again or is reported broken
        assert row["answering_at_end"] + row["broken"] == row["total"], row


def table(rows: list[dict]) -> str:
    out = ["| scenario | broken / total | data lost | violations | time to recover | "
           "longest stall | failed over |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['scenario']} | {r['broken']} / {r['total']} | {r['lost']} | "
                   f"{r['violations']} | {r['recover_s']:.2f} s | {r['max_stall_s']:.2f} s | "
                   f"{', '.join(f.split()[0] for f in r['failed']) or 'none'} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table([json.loads(line) for line in open(sys.argv[1]) if line.strip()]))
