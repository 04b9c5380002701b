"""Flow steering through real Faucet + OVS: sdn.steering's faucet.yaml, applied by
sdn.faucet_driver, watched through sdn.faucet_events.

One SwitchedBed for the module: c1 (client, port 1), s1 (server, port 2), r1 and r2 (replicas
acting as routers, ports 3 and 4). Every packet a replica forwards is counted by rules with no
target in its FORWARD chain (iptables-legacy), one per direction and per probe flow, so the
tests see which replica carried what, in which direction.

Root only. Index 47 and prefix sn<pid % 100> are not used by other tests (pmm_net 0-39,
testbed 11-15, rm_net 40-44, bench 45, procfile 50-55).
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from nettools import TCP_SEND, TCP_SINK, py, spawn
from sdn.faucet_driver import FaucetConfigRejected, FaucetDriver
from sdn.faucet_events import PORT_CHANGE, FaucetEventClient, FaucetEventTimeout
from sdn.steering import ExactFlow, Port, Topology, bucket_of, faucet_config
from sdn.testbed import SwitchedBed, list_namespaces

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces, "
                       "runs OVS and Faucet; CI runs as root"),
]

HOSTS = {"c1": 1, "s1": 2, "r1": 3, "r2": 4}
INDEX = 47
PREFIX = f"sn{os.getpid() % 100}"
BUCKETS = 4
ECHO_PORT = 7000
STREAM_PORT = 7001
SPORT_MOVED, SPORT_STAYS = 40001, 40002  # two UDP flows of c1, same bucket

UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    d, a = s.recvfrom(65536)
    s.sendto(d, a)
"""

# n request/response exchanges from a fixed source port; prints how many came back
UDP_PINGER = r"""
import json, socket, sys
src, sport, dst, dport, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((src, sport)); s.settimeout(1.0)
got = 0
for i in range(n):
    s.sendto(b"q%d" % i, (dst, dport))
    try:
        d, _ = s.recvfrom(100)
        got += d == b"q%d" % i
    except socket.timeout:
        pass
print(json.dumps({"sent": n, "got": got}), flush=True)
"""

# a paced stream: rate datagrams/s for seconds, numbered; prints how many were sent
STREAM_SEND = r"""
import json, socket, sys, time
dst, port, rate, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n = int(rate * secs); t0 = time.monotonic()
print("start", flush=True)
for i in range(n):
    delay = t0 + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    s.sendto(b"%d" % i, (dst, port))
for _ in range(5):
    s.sendto(b"end", (dst, port)); time.sleep(0.01)
print(json.dumps({"sent": n, "secs": time.monotonic() - t0}), flush=True)
"""

# counts the stream; reports the received count and the holes (first seq, length)
STREAM_SINK = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
seen = set()
s.settimeout(30)
while True:
    d, _ = s.recvfrom(100)
    if d == b"end":
        break
    seen.add(int(d))
    s.settimeout(2.0)
top = max(seen) + 1 if seen else 0
holes, start = [], None
for i in range(top + 1):
    if i not in seen and i < top:
        start = i if start is None else start
    elif start is not None:
        holes.append((start, i - start)); start = None
print(json.dumps({"got": len(seen), "top": top, "holes": holes}), flush=True)
"""


def topology(bed: SwitchedBed) -> Topology:
    def port(h: str) -> Port:
        return Port(h, HOSTS[h], bed.host_mac(h))
    return Topology("sw1", bed.dpid, 100, (port("c1"),), (port("s1"),),
                    {"r1": port("r1"), "r2": port("r2")}, buckets=BUCKETS)


class Net:
    """The bed, its steering topology, the event client and the driver."""

    def __init__(self, bed: SwitchedBed):
        self.bed = bed
        self.topo = topology(bed)
        self.c, self.s = bed.host_ip("c1"), bed.host_ip("s1")
        self.bucket = bucket_of(self.c, BUCKETS)
        self.events = FaucetEventClient(bed.event_sock).connect(timeout=10)
        self.driver = FaucetDriver(bed.config_path, lambda: bed.faucet_pid, bed.poke,
                                   self.events, log_path=bed.faucet_log)
        # counting rules (no target: every matching rule counts, the packet goes on)
        c, s = self.c, self.s
        self.rules = {
            "c2s": ["-s", c, "-d", s],
            "s2c": ["-s", s, "-d", c],
            "moved_c2s": ["-s", c, "-d", s, "-p", "udp", "--sport", str(SPORT_MOVED)],
            "moved_s2c": ["-s", s, "-d", c, "-p", "udp", "--dport", str(SPORT_MOVED)],
            "stays_c2s": ["-s", c, "-d", s, "-p", "udp", "--sport", str(SPORT_STAYS)],
            "stays_s2c": ["-s", s, "-d", c, "-p", "udp", "--dport", str(SPORT_STAYS)],
        }
        for r in ("r1", "r2"):
            for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                        "net.ipv4.conf.eth0.send_redirects=0"):
                bed.run(r, ["sysctl", "-w", key], check=True)
            for match in self.rules.values():
                bed.run(r, ["iptables-legacy", "-w", "5", "-A", "FORWARD", *match], check=True)

    def config(self, primaries: list[str], exact: dict | None = None) -> str:
        return faucet_config(self.topo, primaries, exact)

    def apply(self, primaries: list[str], exact: dict | None = None) -> float:
        return self.driver.apply(self.config(primaries, exact), timeout=10)

    def counts(self) -> dict[str, dict[str, int]]:
        """{replica: {rule name: packets}}."""
        out = {}
        for r in ("r1", "r2"):
            text = self.bed.run(r, ["iptables-legacy", "-w", "5", "-nvxL", "FORWARD"],
                                check=True).stdout.splitlines()
            pkts = [int(line.split()[0]) for line in text[2:] if line.strip()]
            assert len(pkts) == len(self.rules), text
            out[r] = dict(zip(self.rules, pkts))
        return out

    def delta(self, before: dict, after: dict | None = None) -> dict[str, dict[str, int]]:
        after = after or self.counts()
        return {r: {k: after[r][k] - before[r][k] for k in self.rules} for r in after}

    def ping(self, count: int = 5) -> str:
        proc = self.bed.run("c1", ["ping", "-4", "-n", "-c", str(count), "-i", "0.05", "-W", "1",
                                   self.s], timeout=15)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def udp_exchange(self, sport: int, n: int = 10) -> dict:
        proc = self.bed.run("c1", py(UDP_PINGER, self.c, sport, self.s, ECHO_PORT, n), timeout=30)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    base = tmp_path_factory.mktemp("sn")
    bed = SwitchedBed(HOSTS, lambda b: faucet_config(topology(b), ["r1"] * BUCKETS), PREFIX,
                      base, index=INDEX, ipv6=False)
    n = None
    try:
        bed.start()
        n = Net(bed)
        _, echo = spawn(bed, "s1", py(UDP_ECHO, n.s, ECHO_PORT))
        echo.expect("listening")
        yield n
    finally:
        if n is not None:
            n.events.close()
        bed.stop()
        assert [ns for ns in list_namespaces() if ns.startswith(PREFIX)] == []


def test_traffic_crosses_the_bucket_replica_both_ways(net):
    net.apply(["r1"] * BUCKETS)
    before = net.counts()
    out = net.ping(10)
    # the reply's TTL is 63: one router (r1) decremented it on the way back
    assert "ttl=63" in out and "ttl=64" not in out, out
    assert net.udp_exchange(SPORT_STAYS, 10) == {"sent": 10, "got": 10}
    sink, lines = spawn(net.bed, "s1", py(TCP_SINK, 5001, 1, net.s))
    lines.expect("listening")
    res = net.bed.run("c1", py(TCP_SEND, net.s, 5001, 300_000), timeout=30)
    assert res.returncode == 0, res.stderr
    tcp = json.loads(res.stdout)
    assert tcp["sent"] == tcp["got"]
    d = net.delta(before)
    print(f"\nforwarded by r1 {d['r1']}, by r2 {d['r2']}")
    # client -> server and server -> client both crossed r1: 10 pings, 10 UDP exchanges,
    # a TCP connection (300 kB one way, ACKs and the digest back; GRO may merge segments)
    assert d["r1"]["c2s"] >= 10 + 10 + 3 and d["r1"]["s2c"] >= 10 + 10 + 2
    assert d["r1"]["stays_c2s"] == 10 and d["r1"]["stays_s2c"] == 10
    assert all(v == 0 for v in d["r2"].values()), d


def test_reroute_to_r2_is_warm_and_loses_little(net):
    net.apply(["r1"] * BUCKETS)
    net.events.poll(0)
    rate, secs = 1000, 3.0
    _, sink = spawn(net.bed, "s1", py(STREAM_SINK, net.s, STREAM_PORT))
    sink.expect("listening")
    _, sender = spawn(net.bed, "c1", py(STREAM_SEND, net.s, STREAM_PORT, rate, secs))
    sender.expect("start")
    time.sleep(1.0)
    before = net.counts()
    seconds = net.apply(["r2"] * BUCKETS)
    at_switch = net.counts()
    last = net.driver.last
    sent = json.loads(sender.expect(lambda line: line.startswith("{"), timeout=15))
    got = json.loads(sink.expect(lambda line: line.startswith("{"), timeout=15))
    end = net.counts()
    lost = sent["sent"] - got["got"]
    print(f"\nreroute r1 -> r2: SIGHUP to success {seconds * 1000:.1f} ms (faucet's event time "
          f"{last.faucet_seconds * 1000:.1f} ms), restart {last.restart_types}; stream "
          f"{sent['sent']} sent in {sent['secs']:.2f} s, {got['got']} received, {lost} lost, "
          f"holes {got['holes']}")
    assert last.restart_types == {net.bed.dpid: "warm"}
    assert lost < 0.05 * sent["sent"], got
    # before the reload r1 carried the stream; after it r2 does and r1 no longer does
    before_d = net.delta(before, at_switch)
    after_d = net.delta(at_switch, end)
    assert before_d["r1"]["c2s"] > 0
    assert after_d["r1"]["c2s"] <= 20, after_d  # at most what was in flight at the switch
    assert after_d["r2"]["c2s"] >= 0.8 * rate * (secs - 1.5), after_d
    # and the replies of new traffic cross r2 too
    before = net.counts()
    assert "ttl=63" in net.ping(5)
    d = net.delta(before)
    assert d["r2"]["c2s"] == 5 and d["r2"]["s2c"] == 5 and d["r1"]["c2s"] == 0 \
        and d["r1"]["s2c"] == 0, d


def test_exact_rule_moves_one_connection(net):
    moved = ExactFlow(17, net.c, SPORT_MOVED, net.s, ECHO_PORT)
    net.apply(["r1"] * BUCKETS)
    net.apply(["r1"] * BUCKETS, {moved: "r2"})
    assert net.driver.last.restart_types == {net.bed.dpid: "warm"}
    before = net.counts()
    assert net.udp_exchange(SPORT_MOVED, 10) == {"sent": 10, "got": 10}
    assert net.udp_exchange(SPORT_STAYS, 10) == {"sent": 10, "got": 10}
    d = net.delta(before)
    print(f"\nexact rule: r1 {d['r1']}, r2 {d['r2']}")
    assert d["r2"]["moved_c2s"] == 10 and d["r2"]["moved_s2c"] == 10, d
    assert d["r1"]["moved_c2s"] == 0 and d["r1"]["moved_s2c"] == 0, d
    assert d["r1"]["stays_c2s"] == 10 and d["r1"]["stays_s2c"] == 10, d
    assert d["r2"]["stays_c2s"] == 0 and d["r2"]["stays_s2c"] == 0, d


def test_rejected_config_keeps_the_old_one(net):
    net.apply(["r1"] * BUCKETS)
    good = net.bed.config_path.read_text()
    bad = net.config(["r2"] * BUCKETS).replace(f"port: {HOSTS['r2']}\n", "port: 9\n")
    assert "port: 9" in bad
    with pytest.raises(FaucetConfigRejected, match="output port undefined") as info:
        net.driver.apply(bad, timeout=10)
    print(f"\nrejected: {info.value}".splitlines()[1])
    assert net.bed.config_path.read_text() == good  # the driver wrote the good text back
    before = net.counts()
    net.ping(3)  # faucet kept the previous flows: still through r1
    d = net.delta(before)
    assert d["r1"]["c2s"] == 3 and d["r1"]["s2c"] == 3 and d["r2"]["c2s"] == 0, d
    # and the next good config goes through
    assert net.apply(["r2"] * BUCKETS) > 0


def test_port_change_events_and_reconnect(net):
    bed = net.bed
    port_no, ifname = HOSTS["r2"], bed.port_name("r2")
    net.events.poll(0)

    def link(state: str) -> None:
        subprocess.run(["ip", "-n", bed.switch_ns, "link", "set", ifname, state], check=True)

    def port_event(up: bool, timeout: float = 5.0, after: int = 0):
        return net.events.wait_for(lambda e: e.kind == PORT_CHANGE and e.port_no == port_no
                                   and e.up is up and e.event_id > after, timeout)

    t0 = time.monotonic()
    link("down")
    down = port_event(False)
    latency = time.monotonic() - t0
    link("up")
    # (a link going down first reports state 0 / status true: no longer LIVE, not yet DOWN;
    # that event comes before the down one, so look for "up" after it)
    up = port_event(True, after=down.event_id)
    print(f"\nPORT_CHANGE down after {latency * 1000:.1f} ms: {down}\nup: {up}")
    assert down.state & 1 and down.status is False and down.reason == "MODIFY"
    assert up.status is True and up.state == 4 and up.live

    # Closing the client: faucet notices only at its next event, which is lost; poll()
    # reconnects and the hole in event_id is reported.
    lost, connects = net.events.lost, net.events.connects
    net.events.poll(0.2)
    net.events.close()
    for _ in range(3):
        link("down")
        try:
            ev = port_event(False, timeout=3, after=net.events.last_event_id or 0)
            break
        except FaucetEventTimeout:
            continue
        finally:
            link("up")
    else:
        pytest.fail("no PORT_CHANGE after reconnecting")
    port_event(True, after=ev.event_id)
    print(f"after reconnect: {ev}; lost {net.events.lost - lost}, connects "
          f"{net.events.connects - connects}, EOFs {net.events.eofs}")
    assert net.events.connects > connects and net.events.lost > lost
