"""The PMM on the real packet path: NFQUEUE in a replica namespace, real traffic from a client
namespace to a server namespace, a pass-through middlebox in Python or C."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nettools import REPO, TCP_SEND, TCP_SINK, UDP_SEND, UDP_SINK, Lines, py, spawn
from pmm.audit import read_audit, violations
from shared.packets import attach_control, pkt_segment_name
from shared.api import flow_segment_name

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network "
                                 "namespaces and binds NFQUEUE; CI runs as root")]

HELD, FREE = 1, 2
EXTRA = """packets: {ring_slots: 1024, pending_timeout_ms: 500}
groups:
  held: {id: 1, target: r2, buffering: true}
  free: {id: 2, buffering: false}
policies:
  - {group: held, proto: udp, dport: 7001}
  - {group: free, proto: udp, dport: 7002}
  - {group: free, proto: tcp, dport: 5001}
"""


class Replica:
    """SMM + PMM (in the replica namespace) + a pass-through middlebox, around one test bed."""

    def __init__(self, bed, cfg, smm_factory, tmp_path):
        self.bed, self.cfg, self.tmp = bed, cfg, tmp_path
        smm_factory(cfg, "r1")
        c = cfg.cluster
        self.pkts = pkt_segment_name(c.shm_prefix, c.name, "r1")
        self.flows = flow_segment_name(c.shm_prefix, c.name, "r1")
        self.audit = str(tmp_path / "audit.jsonl")
        self.pmm = bed.exec("replica", [sys.executable, "-m", "pmm", "--config", str(cfg.path),
                                        "--replica", "r1", "--audit", self.audit],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
        self.pmm_log = Lines(self.pmm.stderr)
        self.pmm_log.expect("bound NFQUEUE", timeout=20)
        self.seg, self.ctl = attach_control(self.pkts)
        self.mb = None

    def start_middlebox(self, kind: str = "python"):
        if kind == "c":
            argv = [str(REPO / "examples" / "build" / "passthrough"), self.pkts, self.flows]
        else:
            argv = [sys.executable, str(REPO / "examples" / "passthrough.py"), self.pkts,
                    self.flows]
        self.mb = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
        self.mb_out = Lines(self.mb.stdout)
        self.mb_out.expect("ready", timeout=15)
        return self.mb

    def counters(self) -> dict:
        return {n: int(self.seg.counters[n]) for n in self.seg.counters.dtype.names
                if n != "reserved"}

    def close(self):
        if self.mb and self.mb.poll() is None:
            self.mb.send_signal(signal.SIGTERM)
            self.mb.wait(10)
        self.ctl.close()
        self.seg.release_views()
        self.seg.segment.close()
        if self.pmm.poll() is None:
            self.pmm.send_signal(signal.SIGTERM)
            self.pmm.wait(10)


@contextlib.contextmanager
def replica_bed(prefix: str, cfg, smm_factory, tmp_path, index: int | None = None):
    """A LinearBed (its index by default this pid's in 0..39: the modules that share that range
    run in turn, each bed in its own namespaces) with r1's SMM, PMM and middlebox slot around
    it: yields (bed, Replica), and stops all of it after."""
    from sdn.testbed import LinearBed
    bed = LinearBed(f"{prefix}{os.getpid() % 100}",
                    index=os.getpid() % 40 if index is None else index, nfqueue=1)
    bed.up()
    rep = None
    try:
        rep = Replica(bed, cfg, smm_factory, tmp_path)
        yield bed, rep
    finally:
        if rep is not None:
            rep.close()
        bed.down()


@pytest.fixture
def net(tmp_path, smm_factory, cbuild):
    from conftest import write_config
    subprocess.run(["make", "-s", "-C", str(REPO / "examples")], check=True)
    with replica_bed("pm", write_config(tmp_path, extra=EXTRA), smm_factory, tmp_path) as got:
        yield got


def udp_sink(bed, port, ip=None):
    proc, lines = spawn(bed, "server", py(UDP_SINK, ip or bed.server_ip, port))
    lines.expect("listening")
    lines.seen.clear()  # from here on, only datagrams
    return proc, lines


def udp_send(bed, port, tag, n, gap=0.002, ip=None):
    bed.run("client", py(UDP_SEND, ip or bed.server_ip, port, tag, n, gap), timeout=60, check=True)


@pytest.mark.parametrize("kind", ["python", "c"])
def test_tcp_and_udp_through_the_pmm(net, kind):
    bed, rep = net
    rep.start_middlebox(kind)
    for ip in (bed.server_ip, bed.server_ip6):
        sink, lines = spawn(bed, "server", py(TCP_SINK, 5001, 1, ip))
        lines.expect("listening")
        r = bed.run("client", py(TCP_SEND, ip, 5001, 2_000_000), timeout=60, check=True)
        got = json.loads(r.stdout)
        assert got["sent"] == got["got"], got  # the content hash survived the round trip
        sink.wait(10)
    _, lines = udp_sink(bed, 9000)
    udp_send(bed, 9000, "u", 200, gap=0.001)
    lines.expect("u 199", 10)
    assert lines.seen == [f"u {i}" for i in range(200)]  # none lost, in order
    c = rep.counters()
    assert c["released"] >= 200 and c["unwritten_drops"] == 0 and c["verdict_errors"] == 0
    rep.mb.send_signal(signal.SIGTERM)
    out = json.loads(rep.mb_out.expect(lambda line: line.startswith("{"), 10))
    # A full output ring drops and counts (TCP retransmits); the hashes above are the proof.
    assert out["packets"] >= 200


def test_output_is_held_until_the_committed_epoch_advances(net):
    bed, rep = net
    rep.start_middlebox()
    _, lines = udp_sink(bed, 7001)
    udp_send(bed, 7001, "h", 10)
    assert lines.drain(quiet=0.7) == []          # held at the replica
    row = rep.seg.groups[rep.seg.active_groups()[HELD]]
    assert int(row["held"]) == 10
    rep.ctl.open_epoch(HELD, 2)
    udp_send(bed, 7001, "k", 3)                   # tagged epoch 2
    rep.ctl.commit(HELD, 1)                        # epoch 1 acknowledged: only those leave
    lines.expect("h 9")
    assert lines.drain(quiet=0.5) == []
    assert [x for x in lines.seen] == [f"h {i}" for i in range(10)]
    rep.ctl.commit(HELD, 2)
    lines.expect("k 2")
    assert lines.seen[10:] == ["k 0", "k 1", "k 2"]
    time.sleep(0.1)  # the audit line is written right after the verdict
    records = [r for r in read_audit(rep.audit) if r["g"] == HELD]
    assert len(records) == 13 and violations(records) == []
    assert [r["e"] for r in records] == [1] * 10 + [2] * 3


def test_suspend_holds_one_group_while_another_flows(net):
    bed, rep = net
    rep.start_middlebox()
    rep.ctl.set_buffering(HELD, False)
    _, held = udp_sink(bed, 7001)
    _, free = udp_sink(bed, 7002)
    rep.ctl.suspend(HELD)
    udp_send(bed, 7001, "s", 5)
    udp_send(bed, 7002, "f", 5)
    free.expect("f 4")
    assert held.drain(quiet=0.7) == []
    assert len(rep.seg.input_ring(rep.seg.active_groups()[HELD])) == 5  # waiting, not lost
    rep.ctl.resume(HELD)
    held.expect("s 4")
    assert held.seen == [f"s {i}" for i in range(5)]


MALFORMED = r"""
import socket, struct, sys
dst = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
src = socket.inet_aton(sys.argv[2]); d = socket.inet_aton(dst)
def ip(proto, payload, frag=0, total=None):
    total = total if total is not None else 20 + len(payload)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 7, frag, 64, proto, 0, src, d) + payload
pkts = [ip(6, b"\x13\x89"),                       # TCP header cut to 2 bytes
        ip(17, b"\x00\x01\x1b\x5a\xff\xff\x00\x00abc"),  # UDP length lies
        ip(17, b"\x00\x01\x1b\x5a\x00\x10\x00\x00" + bytes(8), frag=0x2000),  # a first fragment
        ip(253, b"experimental"),                 # a protocol we do not parse
        ip(6, bytes(20))]                         # TCP with data offset 0
for p in pkts * 4:
    s.sendto(p, (dst, 0))
print(len(pkts) * 4, flush=True)
"""


def test_malformed_packets_neither_crash_nor_leak(net):
    bed, rep = net
    rep.start_middlebox()
    before = rep.counters()
    r = bed.run("client", py(MALFORMED, bed.server_ip, bed.client_ip), timeout=30, check=True)
    sent = int(r.stdout)
    _, lines = udp_sink(bed, 9001)
    udp_send(bed, 9001, "ok", 3)
    lines.expect("ok 2")                           # the path still works
    assert rep.pmm.poll() is None
    deadline = time.monotonic() + 5
    while rep.counters()["pending"] != 0 or rep.counters()["rx_packets"] - before["rx_packets"] < 3:
        assert time.monotonic() < deadline, rep.counters()
        time.sleep(0.05)
    c = rep.counters()
    assert c["malformed"] - before["malformed"] >= 1
    assert c["rx_packets"] - before["rx_packets"] >= 3  # the kernel may drop some bad ones first
    assert c["verdict_errors"] == 0
    del sent


def test_a_killed_middlebox_leaves_the_pmm_up_and_the_next_one_works(net):
    bed, rep = net
    mb = rep.start_middlebox()
    _, lines = udp_sink(bed, 7002)
    udp_send(bed, 7002, "a", 20)
    lines.expect("a 19")
    mb.send_signal(signal.SIGKILL)
    mb.wait(10)
    udp_send(bed, 7002, "b", 5)                   # queued with nobody to read them
    assert lines.drain(quiet=0.7) == []
    assert rep.pmm.poll() is None
    rep.start_middlebox()                          # the next one attaches: the dead pid is no owner
    udp_send(bed, 7002, "c", 5)
    lines.expect("c 4")
    deadline = time.monotonic() + 5
    while rep.counters()["pending"]:
        assert time.monotonic() < deadline, rep.counters()
        time.sleep(0.05)
    row = rep.seg.groups[rep.seg.active_groups()[FREE]]
    assert int(row["pkts_done"]) == int(row["pkts_read"])  # consistent for the RM


def test_a_packet_the_middlebox_makes_leaves_through_the_raw_socket(net):
    import pktbuild
    bed, rep = net
    _, lines = udp_sink(bed, 7003)
    made = pktbuild.ipv4(bed.client_ip, bed.server_ip, 17, 4444, 7003, b"made here")
    tool = REPO / "tests" / "c" / "build" / "pkttool"
    r = subprocess.run([str(tool), rep.pkts, "create", "0", made.hex()], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert lines.expect("made here") == "made here"
    deadline = time.monotonic() + 5  # the counter is bumped just after the send
    while rep.counters()["raw_sent"] != 1:
        assert time.monotonic() < deadline, rep.counters()
        time.sleep(0.01)
