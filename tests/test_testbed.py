"""sdn.testbed against the real stack: namespaces, NFQUEUE in the replica, OVS + Faucet.

Root only. Every bed uses its own short prefix (t<3 base-36 digits of the pid><letter>) and is torn down in a
finally/fixture, so a failing test leaves nothing behind.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest

from sdn.testbed import (LinearBed, SwitchedBed, TestbedError, _pid_alive, cleanup_prefix,
                         list_namespaces, parse_nfqueue_stats)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces; CI "
                       "runs as root"),
]


def _base36(n: int, width: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    return "".join(digits[(n // 36 ** i) % 36] for i in reversed(range(width)))


PID3 = _base36(os.getpid(), 3)  # parallel pytest runs (other sessions) get other prefixes

# Accept-all NetfilterQueue handler, run inside the replica namespace.
HANDLER = """
import sys
from netfilterqueue import NetfilterQueue
q = NetfilterQueue()
q.bind(int(sys.argv[1]), lambda pkt: pkt.accept(), max_len=1024)
print("bound", flush=True)
q.run()
"""


def prefix(letter: str) -> str:
    return f"t{PID3}{letter}"  # 5 chars, so interface names stay <= 15


def our_namespaces(p: str) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(p)]


def start_handler(bed: LinearBed, role: str = "replica", queue: int = 1) -> subprocess.Popen:
    proc = bed.exec(role, [sys.executable, "-c", HANDLER, str(queue)], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "bound":
        proc.kill()
        pytest.fail(f"NFQUEUE handler did not bind: {line!r} {proc.stderr.read()}")
    return proc


def pings(bed: LinearBed, count: int = 3) -> tuple[bool, bool]:
    """IPv4 and IPv6 ping client -> server, run in parallel; (v4 ok, v6 ok)."""
    procs = [bed.exec("client", ["ping", fam, "-n", "-q", "-c", str(count), "-i", "0.2", "-W",
                                 "1", dst], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for fam, dst in (("-4", bed.server_ip), ("-6", bed.server_ip6))]
    return tuple(p.wait(15) == 0 for p in procs)


@pytest.fixture
def linear():
    beds: list[LinearBed] = []

    def make(letter: str, **kw) -> LinearBed:
        bed = LinearBed(prefix(letter), **kw)
        beds.append(bed)
        return bed.up()

    yield make
    for bed in beds:
        bed.down()
        assert our_namespaces(bed.prefix) == []


def test_nfqueue_rule_is_real_and_handler_forwards_ipv4_ipv6(linear):
    bed = linear("a", index=11, nfqueue=1)
    assert bed.up_seconds < 5
    assert bed.client_ip == "10.211.0.1" and bed.server_ip == "10.211.1.1"
    assert bed.client_ip6 == "fd00:b::1" and bed.server_ip6 == "fd00:b:0:1::1"
    assert bed.replica_ip() == "10.211.0.254" and bed.replica_ip(side="server") == "10.211.1.254"
    assert sorted(our_namespaces(bed.prefix)) == sorted(bed.namespaces)

    # no handler, no bypass: the queue drops everything, so the rule is really in the path
    assert pings(bed, count=2) == (False, False)
    assert bed.nfqueue_stats() == {}

    handler = start_handler(bed)
    assert pings(bed) == (True, True)
    stats = bed.nfqueue_stats()
    assert set(stats) == {1}
    q = stats[1]
    assert q["queue_num"] == 1 and q["portid"] != 0 and q["copy_mode"] == 2
    assert q["id_sequence"] >= 12  # 3 echo requests + 3 replies, IPv4 and IPv6

    # the handler dies: without bypass, traffic stops again; removing the rule restores it
    handler.kill()
    handler.wait(5)
    assert pings(bed, count=2) == (False, False)
    bed.set_nfqueue(False)
    assert pings(bed, count=2) == (True, True)
    bed.set_nfqueue(True)
    bed.set_nfqueue(True)  # idempotent: still one rule per family
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        rules = bed.run("replica", [tool, "-w", "5", "-S", "FORWARD"], check=True).stdout
        assert rules.count("-j NFQUEUE --queue-num 1") == 1, rules


def test_queue_bypass_without_handler_passes(linear):
    bed = linear("b", index=12, nfqueue=3, queue_bypass=True)
    rules = bed.run("replica", ["iptables-legacy", "-w", "5", "-S", "FORWARD"]).stdout
    assert "-A FORWARD -j NFQUEUE --queue-num 3 --queue-bypass" in rules
    assert pings(bed) == (True, True)


def test_failover_between_two_replicas(linear):
    bed = linear("c", index=13, replicas=2, nfqueue=1)
    start_handler(bed, "replica2")  # only replica 2 forwards
    assert bed.active == 1
    assert pings(bed, count=2) == (False, False)
    bed.set_active(2)
    assert pings(bed) == (True, True)
    assert bed.nfqueue_stats(2)[1]["id_sequence"] >= 12
    assert bed.nfqueue_stats(1) == {}


def test_down_is_complete_and_up_recovers_from_a_crash():
    p = prefix("d")
    crashed = LinearBed(p, index=14, nfqueue=1)
    crashed.up()
    # something started outside the bed's bookkeeping, as a crashed run would leave it
    stray = subprocess.Popen(["ip", "netns", "exec", crashed.replica_ns, "sleep", "60"])
    try:
        assert len(our_namespaces(p)) == 3
        bed = LinearBed(p, index=14, nfqueue=None)  # a new run: the old object is gone
        bed.up()
        try:
            assert stray.wait(5) is not None  # killed by PID when its namespace was removed
            assert pings(bed) == (True, True)
            assert bed.nfqueue_stats() == {}
            rules = bed.run("replica", ["iptables-legacy", "-w", "5", "-S", "FORWARD"]).stdout
            assert "NFQUEUE" not in rules
            sleeper = bed.exec("server", ["sleep", "60"])
        finally:
            bed.down()
        assert sleeper.poll() is not None
        assert our_namespaces(p) == []
        assert p not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                       text=True).stdout
        bed.down()  # idempotent
        assert bed.down_seconds < 1

        # cleanup_prefix: crash recovery without a bed object
        LinearBed(p, index=14, replicas=2, nfqueue=None).up()
        assert sorted(cleanup_prefix(p)) == sorted([f"{p}c", f"{p}r1", f"{p}r2", f"{p}s"])
        assert our_namespaces(p) == []
    finally:
        if stray.poll() is None:
            stray.kill()
        cleanup_prefix(p)


def test_bad_arguments_and_stats_parser():
    with pytest.raises(TestbedError, match="prefix"):
        LinearBed("Bad-name")
    with pytest.raises(TestbedError, match="prefix"):
        LinearBed("abcdefghi")  # 9 chars
    with pytest.raises(TestbedError, match="host name"):
        SwitchedBed({"averylonghostname": 1}, "", "tx", "/tmp/unused")
    with pytest.raises(TestbedError, match="share"):
        SwitchedBed({"h1": 1, "h2": 1}, "", "tx", "/tmp/unused")
    with pytest.raises(TestbedError, match="index"):
        LinearBed("tx", index=99)
    with pytest.raises(TestbedError, match="role"):
        LinearBed("tx").exec("router", ["true"])
    text = "    1  12345     0 2  4016     0     0       42  1\n    7      0     3 2   512     5     1        9  1\n"
    stats = parse_nfqueue_stats(text)
    assert stats[1] == {"queue_num": 1, "portid": 12345, "queue_total": 0, "copy_mode": 2,
                        "copy_range": 4016, "queue_dropped": 0, "user_dropped": 0,
                        "id_sequence": 42}
    assert stats[7]["queue_dropped"] == 5 and stats[7]["user_dropped"] == 1


FAUCET_YAML = """
vlans:
  office:
    vid: 100
dps:
  sw1:
    dp_id: 0x{dpid:x}
    hardware: "Open vSwitch"
    interfaces:
      1: {{name: h1, native_vlan: office}}
      2: {{name: h2, native_vlan: office}}
      3: {{name: h3, native_vlan: office}}
"""


def test_switched_bed_faucet_ovs(tmp_path):
    p = prefix("e")
    dpid = 0x2A
    cfg = tmp_path / "faucet.yaml"
    cfg.write_text(FAUCET_YAML.format(dpid=dpid))
    hosts = {"h1": 1, "h2": 2, "h3": 3}
    base = tmp_path / "sw"
    crashed = SwitchedBed(hosts, cfg, p, base, index=15, dpid=dpid)
    bed = SwitchedBed(hosts, cfg, p, base, index=15, dpid=dpid)
    try:
        # a first bed is started and "crashes" (never stopped); the second one takes over
        crashed.start()
        old_pids = dict(crashed.started_pids)
        bed.start()
        assert all(not _pid_alive(pid) for pid in old_pids.values()), old_pids
        assert bed.dp_up_seconds < 15
        pids = dict(bed.started_pids)
        assert set(pids) == {"ovsdb-server", "ovs-vswitchd", "faucet"}
        assert all(_pid_alive(pid) for pid in pids.values())
        assert bed.host_ip("h2") == "10.215.2.2" and bed.host_mac("h3") == "0e:00:0f:00:00:03"

        assert bed.ping("h1", "h2")
        assert bed.ping("h1", "h3", ipv6=True)
        assert 'dp_status{dp_id="0x2a",dp_name="sw1"} 1.0' in bed.metrics()
        assert "priority" in bed.ofctl("dump-flows")

        # reload: SIGHUP + poke is seen by faucet
        def reloads() -> float:
            for line in bed.metrics().splitlines():
                if line.startswith("faucet_config_reload_requests_total"):
                    return float(line.split()[-1])
            return 0.0
        before = reloads()
        bed.reload()
        deadline = time.monotonic() + 5
        while reloads() <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reloads() > before
        # the system's root namespace saw nothing: the tap devices are in the switch namespace
        root_links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
        assert bed.bridge not in root_links
    finally:
        bed.stop()
        crashed.stop()
    assert all(not _pid_alive(pid) for pid in pids.values()), pids
    assert our_namespaces(p) == []
    assert not (base / "ovs" / "run" / "ovs-vswitchd.pid").exists()
