"""The C TCP tracker (examples/tcptracker.c) and its Python twin (examples/tcptracker.py) on the
same script of segments, against the PMM's side in this process (packet_bed: a real packet
segment, Ingress and Releaser, no NFQUEUE) and a real SMM's flow segment. Both must give the same
verdicts, the same RSTs, the same counts and the same flow state (four little-endian u64s)."""
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from pktbuild import ref_checksum
from pmm.core import ACCEPT, DROP, QUEUED, SEND
from pmm.parse import parse
from shared.api import attach_replica, flow_segment_name
from nettools import wait_line

pytestmark = pytest.mark.cbuild

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEB = 1  # packet_bed's buffered group: tcp dport 80
SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08
C4, S4 = "10.9.0.1", "10.9.0.2"
C6, S6 = "fd09::1", "fd09::2"


def _tracker_module():
    spec = importlib.util.spec_from_file_location("tcptracker_py",
                                                  os.path.join(REPO, "examples", "tcptracker.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tcp(src, dst, sport, dport, flags, seq=1000, ack=0, payload=b""):
    """A TCP segment (IPv4 or IPv6 by the address) with valid checksums."""
    import ipaddress
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    th = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
                   + payload)
    if len(s) == 4:
        pseudo = s + d + bytes([0, 6]) + len(th).to_bytes(2, "big")
        th[16:18] = ref_checksum(pseudo + bytes(th)).to_bytes(2, "big")
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(th), 1, 0, 64, 6, 0, s, d))
        ip[10:12] = ref_checksum(bytes(ip)).to_bytes(2, "big")
        return bytes(ip) + bytes(th)
    pseudo = s + d + len(th).to_bytes(4, "big") + bytes([0, 0, 0, 6])
    th[16:18] = ref_checksum(pseudo + bytes(th)).to_bytes(2, "big")
    return struct.pack("!IHBB16s16s", 6 << 28, len(th), 6, 64, s, d) + bytes(th)


def udp4(src, dst, sport, dport, payload):
    import ipaddress
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    return struct.pack("!BBHHHBBH4s4sHHHH", 0x45, 0, 28 + len(payload), 1, 0, 64, 17, 0, s, d,
                       sport, dport, 8 + len(payload), 0) + payload


# (name, packet, has state when it comes): the script both trackers see, in this order.
SCRIPT = [
    ("stateless data", tcp(C4, S4, 40000, 80, PSH | ACK, 1000, 5000, b"x" * 10), False),
    ("syn", tcp(C4, S4, 40000, 80, SYN, 999), True),
    ("syn-ack", tcp(S4, C4, 80, 40000, SYN | ACK, 4999, 1000), True),
    ("data", tcp(C4, S4, 40000, 80, PSH | ACK, 1000, 5000, b"y" * 100), True),
    ("fin", tcp(C4, S4, 40000, 80, FIN | ACK, 1100, 5000), True),
    ("udp", udp4(C4, S4, 5353, 80, b"not tcp"), True),
    ("stateless syn-ack", tcp(S4, C4, 80, 40001, SYN | ACK, 0xFFFFFFF0, 77), False),
    ("stateless fin", tcp(C4, S4, 40002, 80, FIN, 0xFFFFFFFE, 0, b"abcde"), False),
    ("stateless rst", tcp(C4, S4, 40003, 80, RST, 7, 0), False),
    ("stateless v6", tcp(C6, S6, 40004, 80, ACK, 1, 1), False),
    ("syn v6", tcp(C6, S6, 40005, 80, SYN, 1), True),
]
STATELESS = [p for _, p, ok in SCRIPT if not ok]
RESET_ANSWERED = ["stateless data", "stateless syn-ack", "stateless fin"]  # IPv4, not a RST


@pytest.fixture(scope="module")
def built(cbuild):
    proc = subprocess.run(["make", "-C", os.path.join(REPO, "examples")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"make -C examples failed:\n{proc.stdout}\n{proc.stderr}"
    return os.path.join(REPO, "examples", "build", "tcptracker")




def drain_until(rel, n, timeout=10.0):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += rel.drain()
        if len(out) < n:
            time.sleep(0.01)
    return out


def run_script(packet_bed, smm_factory, argv_head, reset):
    """Runs SCRIPT through one tracker; (verdicts per step, final counts, stderr)."""
    store, ingress, rel, ctl, cfg, _ = packet_bed
    smm_factory(cfg, "r1")
    c = cfg.cluster
    argv = [*argv_head, store.name, flow_segment_name(c.shm_prefix, c.name, "r1")]
    if reset:
        argv.insert(len(argv_head), "--reset")  # accepted anywhere, as in the Python tracker
    ctl.commit(WEB, 1)  # the epoch every output of this test carries: released as it comes
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    steps = []
    try:
        line = wait_line(proc, 15)
        assert line.strip() == "ready", (line, proc.poll())
        for i, (name, pkt, ok) in enumerate(SCRIPT):
            assert ingress.on_packet(i + 1, pkt) == QUEUED
            store.in_bell.release()
            want = 2 if reset and name in RESET_ANSWERED else 1
            got = drain_until(rel, want)
            assert len(got) == want, (name, got)
            steps.append((name, sorted(got, key=lambda v: v.action)))
        time.sleep(0.2)
        assert rel.drain() == []  # nothing more than expected
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    return steps, json.loads(stdout.strip().splitlines()[-1]), stderr


def read_state(cfg, key):
    with attach_replica(cfg, "r1") as mb:
        st = mb.get_flow(key)
        if st is None:
            return None
        try:
            words = struct.unpack("<4Q", bytes(st[:32]))
        finally:
            mb.put_flow(key, modified=False)
        idx, _ = mb.table.lookup(key)
        return words, int(mb.table.slots[idx]["group"])


@pytest.mark.parametrize("reset", [False, True], ids=["drop", "reset"])
@pytest.mark.parametrize("lang", ["c", "py"])
def test_tracker_script(packet_bed, smm_factory, built, lang, reset):
    argv_head = [built] if lang == "c" else [sys.executable,
                                             os.path.join(REPO, "examples", "tcptracker.py")]
    cfg = packet_bed[4]
    steps, counts, stderr = run_script(packet_bed, smm_factory, argv_head, reset)
    reset_for = _tracker_module().reset_for
    for (name, verdicts), (_, pkt, ok) in zip(steps, SCRIPT):
        if ok:
            assert [(v.action, v.data) for v in verdicts] == [(ACCEPT, None)], name
            continue
        assert verdicts[0].action == DROP, name
        if reset and name in RESET_ANSWERED:
            rst = verdicts[1]
            # into the group of the segment it answers (the stateless SYN-ACK, from port 80,
            # is in the default group; the others are in web)
            assert rst.action == SEND and rst.packet_id == 0, name
            assert rst.group == verdicts[0].group == (0 if "syn-ack" in name else WEB), name
            assert rst.data == reset_for(pkt), name  # byte for byte the Python tracker's RST
    assert counts == {"packets": len(SCRIPT), "dropped_no_state": len(STATELESS),
                      "created": 2, "errors": 0,
                      "resets": len(RESET_ANSWERED) if reset else 0}, stderr

    # The state layout: packets, bytes, SYN seen, FIN/RST seen (little-endian u64s).
    flow = [p for n, p, _ in SCRIPT if n in ("syn", "syn-ack", "data", "fin")]
    words, group = read_state(cfg, parse(flow[0]).key)
    assert words == (4, sum(len(p) for p in flow), 1, 1) and group == WEB
    v6 = dict((n, p) for n, p, _ in SCRIPT)["syn v6"]
    assert read_state(cfg, parse(v6).key) == ((1, len(v6), 1, 0), WEB)
    for pkt in STATELESS[1:]:  # a segment with no state never creates any (the first one's
        assert read_state(cfg, parse(pkt).key) is None  # flow is opened by the SYN after it)


def test_rst_values(built):
    """The RST fields, decoded (RFC 793 "Reset Generation"), as both trackers build them."""
    reset_for = _tracker_module().reset_for
    r = reset_for(SCRIPT[0][1])  # an ACK segment: RST with seq = its ack
    assert r[12:16] == bytes([10, 9, 0, 2]) and r[16:20] == bytes([10, 9, 0, 1])
    assert struct.unpack("!HHIIBB", r[20:34]) == (80, 40000, 5000, 0, 0x50, RST)
    r = reset_for(dict((n, p) for n, p, _ in SCRIPT)["stateless fin"])
    # no ACK: RST|ACK acknowledging seq + 5 bytes + FIN, modulo 2^32
    assert struct.unpack("!HHIIBB", r[20:34]) == (80, 40002, 0, (0xFFFFFFFE + 6) & 0xFFFFFFFF,
                                                  0x50, RST | ACK)


def test_usage_and_missing_segments(built):
    r = subprocess.run([built, "only-one"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "usage" in r.stderr
    r = subprocess.run([built, "a", "b", "c"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "usage" in r.stderr
    # Missing segments: it waits up to 30 s for them (started beside the PMM); SIGTERM ends the
    # wait with exit 1 and a message, never "ready".
    proc = subprocess.Popen([built, "/picot.none.r1.pkts", "/picot.none.r1.flows"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 1 and out == "" and "tcptracker:" in err
