"""Fuzzing the packet path's parsers with a generated corpus and its mutations.

Corpus: valid IPv4/IPv6 TCP/UDP/ICMP packets (tests/pktbuild.py), with TCP options, IPv4 options
and IPv6 extension headers. Mutations: every truncation, every IHL and TCP data offset, wrong
IPv4 total and IPv6 payload lengths, bad checksums, odd and oversized options, fragments (MF,
offset != 0, IPv6 fragment headers), every version nibble, non-IP garbage, zero length, plus
seeded random byte flips. Every parser must answer each one cleanly:

- pmm.parse.parse: a Parsed, never an exception; no flow -> a problem string (its kind counted
  by Ingress in `noflow` and, if broken, in the segment's `malformed` counter);
- mbserv.tcp.parse_segment: a Segment, None (not TCP), or BadSegment only; reset_for and the
  MBServ core never raise;
- examples/tcptracker.py tcp_flags/reset_for and pmm.checksum.fix_checksums never raise;
- the C and Python trackers (examples/tcptracker.c/.py) behind a real packet segment stay up
  and give every packet a verdict.

Seeds are fixed (SEED); a failure prints the seed, the case and the packet in hex.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections import Counter

import pytest

from pktbuild import checksums_ok, ipv4, ipv6, ref_checksum
from pmm.checksum import fix_checksums
from pmm.core import DROP_OVERSIZE, QUEUED
from pmm.parse import Parsed, parse, problem_kind
from nettools import wait_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20261127
RANDOM_CASES = 4000


def _tracker_py():
    spec = importlib.util.spec_from_file_location("tcptracker_fuzz",
                                                  os.path.join(REPO, "examples", "tcptracker.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TRACKER = _tracker_py()


# ------------------------------------------------------------------------------ the corpus
def _tcp_with_options(opts: bytes, v6: bool = False, flags: int = 0x02) -> bytes:
    """A TCP SYN whose header carries `opts` (padded to 4 bytes), checksums right."""
    opts = opts + bytes(-len(opts) % 4)
    doff = (20 + len(opts)) // 4
    s4, d4 = bytes([10, 1, 0, 1]), bytes([10, 1, 0, 2])
    s6, d6 = bytes.fromhex("fd010000000000000000000000000001"), \
        bytes.fromhex("fd010000000000000000000000000002")
    th = bytearray(struct.pack("!HHIIBBHHH", 40000, 80, 1000, 0, (doff & 15) << 4, flags,
                               65535, 0, 0) + opts + b"data")
    if v6:
        pseudo = s6 + d6 + len(th).to_bytes(4, "big") + bytes([0, 0, 0, 6])
        th[16:18] = ref_checksum(pseudo + bytes(th)).to_bytes(2, "big")
        return struct.pack("!IHBB16s16s", 6 << 28, len(th), 6, 64, s6, d6) + bytes(th)
    pseudo = s4 + d4 + bytes([0, 6]) + len(th).to_bytes(2, "big")
    th[16:18] = ref_checksum(pseudo + bytes(th)).to_bytes(2, "big")
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(th), 1, 0, 64, 6, 0, s4, d4))
    ip[10:12] = ref_checksum(bytes(ip)).to_bytes(2, "big")
    return bytes(ip) + bytes(th)


def _ipv4_options(pkt: bytes, opts: bytes) -> bytes:
    """pkt (IPv4) with IP options inserted (padded to 4 bytes); IHL, length, checksum fixed."""
    opts = opts + bytes(-len(opts) % 4)
    ihl = (pkt[0] & 15) * 4
    b = bytearray(pkt[:ihl] + opts + pkt[ihl:])
    b[0] = 0x40 | ((ihl + len(opts)) // 4 & 15)
    b[2:4] = len(b).to_bytes(2, "big")
    b[10:12] = b"\0\0"
    b[10:12] = ref_checksum(bytes(b[:(b[0] & 15) * 4])).to_bytes(2, "big")
    return bytes(b)


def _ipv6_ext(pkt: bytes, nh: int, ext: bytes) -> bytes:
    """pkt (IPv6) with one extension header of type nh inserted before its payload."""
    inner = pkt[6]
    b = bytearray(pkt[:40] + bytes([inner]) + ext[1:] + pkt[40:])
    b[6] = nh
    b[4:6] = (len(b) - 40).to_bytes(2, "big")
    return bytes(b)


def corpus() -> list[tuple[str, bytes]]:
    c = []
    for proto, name in ((6, "tcp"), (17, "udp"), (1, "icmp")):
        c.append((f"v4 {name}", ipv4("10.0.0.1", "10.0.1.2", proto, 40000, 80, b"hello")))
    for proto, name in ((6, "tcp"), (17, "udp"), (58, "icmp6")):
        c.append((f"v6 {name}", ipv6("fd00::1", "fd00::2", proto, 40000, 80, b"hello")))
    c.append(("v4 icmp other", ipv4("10.0.0.1", "10.0.1.2", 1, 0, 0, b"x", icmp_type=3)))
    c.append(("v4 udp empty", ipv4("10.0.0.1", "10.0.1.2", 17, 5353, 53)))
    # TCP options: the usual SYN set, then odd ones
    mss, ws, sack_ok, ts = b"\x02\x04\x05\xb4", b"\x03\x03\x07", b"\x04\x02", \
        b"\x08\x0a" + bytes(8)
    for tag, opts in (("syn options", mss + ws + sack_ok + ts),
                      ("wscale 200", b"\x03\x03\xc8"),
                      ("option length 0", b"\x03\x00\x07"),
                      ("option length 1", b"\x02\x01"),
                      ("option past end", b"\x02\x28\x05\xb4"),
                      ("kind 255", b"\xff\x04\x00\x00"),
                      ("40 bytes of nops", b"\x01" * 40),
                      ("eol first", b"\x00" + ws)):
        c.append((f"v4 tcp {tag}", _tcp_with_options(opts)))
        c.append((f"v6 tcp {tag}", _tcp_with_options(opts, v6=True)))
    # IPv4 options: NOPs, record route, a 40-byte garbage block
    base = ipv4("10.0.0.1", "10.0.1.2", 6, 40001, 80, b"x")
    c.append(("v4 ip nops", _ipv4_options(base, b"\x01" * 4)))
    c.append(("v4 ip record route", _ipv4_options(base, b"\x07\x0b\x04" + bytes(8))))
    c.append(("v4 ip 40 garbage", _ipv4_options(base, bytes(range(200, 240)))))
    # IPv6 extension headers
    v6 = ipv6("fd00::1", "fd00::2", 17, 1000, 2000, b"data")
    c.append(("v6 hop-by-hop", _ipv6_ext(v6, 0, bytes(8))))
    c.append(("v6 dest opts 16", _ipv6_ext(v6, 60, bytes([0, 1]) + bytes(14))))
    c.append(("v6 routing", _ipv6_ext(v6, 43, bytes(8))))
    c.append(("v6 atomic fragment", _ipv6_ext(v6, 44, bytes(8))))
    c.append(("v6 ah", _ipv6_ext(v6, 51, bytes([0, 1]) + bytes(10))))
    return c


CORPUS = corpus()


def mutations(rng: random.Random):
    """(case, packet) pairs: the systematic mutations of every corpus packet, then random ones."""
    yield "zero length", b""
    for v in range(16):
        yield f"version {v} only", bytes([v << 4])
    for name, pkt in CORPUS:
        yield name, pkt
        for n in range(len(pkt)):
            yield f"{name} cut to {n}", pkt[:n]
        v4 = pkt[0] >> 4 == 4
        for v in range(16):
            b = bytearray(pkt)
            b[0] = (v << 4) | (b[0] & 15)
            yield f"{name} version {v}", bytes(b)
        if v4:
            for ihl in range(16):
                b = bytearray(pkt)
                b[0] = 0x40 | ihl
                yield f"{name} IHL {ihl}", bytes(b)
            ihl = (pkt[0] & 15) * 4
            for total in (0, 1, 19, ihl - 1, ihl, ihl + 1, len(pkt) - 1, len(pkt) + 1,
                          65535):
                b = bytearray(pkt)
                b[2:4] = (total & 0xFFFF).to_bytes(2, "big")
                yield f"{name} total length {total}", bytes(b)
            for frag, what in ((0x2000, "MF"), (0x0001, "offset 8"), (0x3FFF, "MF offset max"),
                               (0x4000, "DF only")):
                b = bytearray(pkt)
                b[6:8] = frag.to_bytes(2, "big")
                yield f"{name} fragment {what}", bytes(b)
            b = bytearray(pkt)
            b[10] ^= 0xFF
            yield f"{name} bad IP checksum", bytes(b)
            l4 = ihl
        else:
            for plen in (0, 1, 7, 8, len(pkt) - 41, len(pkt) - 39, 65535):
                b = bytearray(pkt)
                b[4:6] = (plen & 0xFFFF).to_bytes(2, "big")
                yield f"{name} payload length {plen}", bytes(b)
            for nh in (0, 43, 44, 51, 60, 59, 255):
                b = bytearray(pkt)
                b[6] = nh
                yield f"{name} next header {nh}", bytes(b)
            if pkt[6] == 44:
                for fo in (0x0001, 0x0008, 0xFFF9):
                    b = bytearray(pkt)
                    b[42:44] = fo.to_bytes(2, "big")
                    yield f"{name} fragment offset/M {fo:#x}", bytes(b)
            l4 = 40
        proto = pkt[9] if v4 else pkt[6]
        if proto == 6 and len(pkt) >= l4 + 20:
            for doff in range(16):
                b = bytearray(pkt)
                b[l4 + 12] = (doff << 4) | (b[l4 + 12] & 15)
                yield f"{name} TCP data offset {doff}", bytes(b)
        at = {6: 16, 17: 6, 1: 2, 58: 2}.get(proto)
        if at is not None and len(pkt) >= l4 + at + 2:
            b = bytearray(pkt)
            b[l4 + at] ^= 0x5A
            yield f"{name} bad L4 checksum", bytes(b)
    for i in range(RANDOM_CASES):
        name, pkt = CORPUS[rng.randrange(len(CORPUS))]
        b = bytearray(pkt)
        how = i % 5
        if how == 0:
            for _ in range(rng.randint(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif how == 1:
            b = b[:rng.randrange(len(b))] + bytes(rng.randrange(256)
                                                  for _ in range(rng.randrange(8)))
        elif how == 2:
            b = bytearray(rng.randrange(256) for _ in range(rng.randrange(100)))
        elif how == 3:  # an IP header that is right up to the version, then garbage
            b = bytearray([rng.choice((0x45, 0x4F, 0x60))]) + bytearray(
                rng.randrange(256) for _ in range(rng.randrange(80)))
        else:
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        yield f"random {i} (kind {how}) from {name}", bytes(b)


def _fail(case: str, pkt: bytes, what: str):
    pytest.fail(f"[seed {SEED}] {case}: {what}\npacket {pkt.hex()}")


# ------------------------------------------------------------------------------ pure parsers
def _has_v6_ext(pkt: bytes) -> bool:
    return pkt[0] >> 4 == 6 and pkt[6] in (0, 43, 44, 51, 60)


def test_corpus_is_valid():
    for name, pkt in CORPUS:
        p = parse(pkt)
        assert p.flow and not p.problem, (name, p)
        if not _has_v6_ext(pkt):  # (pktbuild's checker does not walk extension headers)
            assert checksums_ok(pkt), name


def test_pmm_parse_never_raises_and_names_the_problem():
    rng = random.Random(SEED)
    kinds: Counter = Counter()
    n = 0
    for case, pkt in mutations(rng):
        n += 1
        try:
            p = parse(pkt)
        except Exception as e:  # noqa: BLE001
            _fail(case, pkt, f"parse raised {type(e).__name__}: {e}")
        if not isinstance(p, Parsed):
            _fail(case, pkt, f"parse returned {p!r}")
        if p.flow:
            if p.problem or p.malformed or len(p.key) != 40 or p.family not in (4, 6):
                _fail(case, pkt, f"a flow with a problem: {p}")
        else:
            if not p.problem or p.key != bytes(40):
                _fail(case, pkt, f"no flow and no problem: {p}")
            kinds[(problem_kind(p.problem), p.malformed)] += 1
        # Expectations the mutation itself implies:
        if case.endswith(" cut to 0") or case == "zero length":
            assert not p.flow and p.problem == "empty packet", case
        if " fragment MF" in case or " fragment offset 8" in case:
            assert not p.flow and not p.malformed and "fragment" in p.problem, (case, p)
        if " bad L4 checksum" in case or " bad IP checksum" in case:
            # checksums are the endpoints' business: the flow is still keyed
            assert p.flow, (case, p)
    assert n > 5000
    # every kind of trouble was met, each with a stable label
    labels = {k for k, _ in kinds}
    for want in ("empty packet", "truncated IPv4 header", "bad IHL", "bogus IPv4 total length",
                 "IPv4 fragment", "truncated IPv6 header", "bogus IPv6 payload length",
                 "IPv6 fragment", "truncated TCP header", "bad TCP data offset",
                 "truncated UDP header", "unsupported protocol", "not IP"):
        assert want in labels, (want, sorted(labels))
    assert all(not any(ch.isdigit() for ch in k.replace("IPv4", "").replace("IPv6", ""))
               for k in labels), labels


def test_mbserv_parse_segment_and_reset_for():
    from mbserv.state import NO_WSCALE
    from mbserv.tcp import SYN, BadSegment, RST, parse_segment, reset_for
    rng = random.Random(SEED + 1)
    bad = 0
    for case, pkt in mutations(rng):
        try:
            seg = parse_segment(pkt)
        except BadSegment as e:
            bad += 1
            assert str(e), case
            seg = None
        except Exception as e:  # noqa: BLE001
            _fail(case, pkt, f"parse_segment raised {type(e).__name__}: {e}")
        try:
            rst = reset_for(pkt)
        except Exception as e:  # noqa: BLE001
            _fail(case, pkt, f"reset_for raised {type(e).__name__}: {e}")
        if rst is not None:
            r = parse_segment(rst)  # what we send is itself a readable TCP reset
            if r is None or not r.flags & RST or seg is None:
                _fail(case, pkt, f"reset_for built {rst.hex()}")
        if seg is not None and seg.flags & SYN:
            assert 0 <= seg.wscale <= 14 or seg.wscale == NO_WSCALE, (case, seg.wscale)
    assert bad > 100


def test_mbserv_core_on_mutated_segments_and_garbage_state():
    from mbserv.core import Core
    from mbserv.inspect import Inspector
    from mbserv.state import STATE_SIZE
    from mbserv.tcp import BadSegment, parse_segment
    rng = random.Random(SEED + 2)
    core = Core(Inspector([b"evil"]))
    n = 0
    for case, pkt in mutations(rng):
        try:
            seg = parse_segment(pkt)
        except BadSegment:
            continue
        if seg is None:
            continue
        for state in (bytes(STATE_SIZE), bytes(rng.randrange(256) for _ in range(STATE_SIZE))):
            try:
                res = core.process(state, seg, 1000.0 + n)
            except Exception as e:  # noqa: BLE001
                _fail(case, pkt, f"Core.process raised {type(e).__name__}: {e} on state "
                      f"{state.hex()}")
            assert res.verdict in ("forward", "drop") and res.reason is not None, (case, res)
            n += 1
    assert n > 1000


def test_python_tracker_and_checksum_fixer_never_raise():
    rng = random.Random(SEED + 3)
    for case, pkt in mutations(rng):
        try:
            flags = TRACKER.tcp_flags(pkt)
            rst = TRACKER.reset_for(pkt)
            fixed = fix_checksums(pkt)
        except Exception as e:  # noqa: BLE001
            _fail(case, pkt, f"raised {type(e).__name__}: {e}")
        assert flags is None or 0 <= flags <= 255, case
        assert rst is None or len(rst) == 40, case
        assert len(fixed) == len(pkt), case
    # and fix_checksums repairs what a middlebox broke in a valid packet
    for name, pkt in CORPUS:
        if _has_v6_ext(pkt):
            continue
        b = bytearray(pkt)
        if b[0] >> 4 == 4:
            b[10:12] = b"\xde\xad"
        fixed = fix_checksums(bytes(b))
        assert checksums_ok(fixed), name


# ------------------------------------------------------------------------------ Ingress
def _drain_inputs(seg):
    for i in seg.active_groups().values():
        ring = seg.input_ring(i)
        while ring.pop() is not None:
            pass


def test_ingress_counts_every_malformed_packet_by_reason(packet_bed):
    from pmm.metrics import PmmMetrics
    store, ingress, _, _, _, _ = packet_bed
    seg = store.seg
    before = {n: int(seg.counters[n]) for n in ("rx_packets", "malformed", "input_drops",
                                                 "default_group")}
    rng = random.Random(SEED + 4)
    want_malformed = want_oversize = fed = 0
    want_kinds: Counter = Counter()
    for i, (case, pkt) in enumerate(mutations(rng)):
        if i % 3:  # every third case keeps the test quick; the pure tests see them all
            continue
        try:
            r = ingress.on_packet(i + 1, pkt, now=0.0)
        except Exception as e:  # noqa: BLE001
            _fail(case, pkt, f"Ingress.on_packet raised {type(e).__name__}: {e}")
        fed += 1
        if r == DROP_OVERSIZE:
            want_oversize += 1
            continue
        assert r == QUEUED, (case, r)  # never DROP_FULL: the rings are drained each time
        _drain_inputs(seg)
        p = parse(pkt)
        if not p.flow:
            want_kinds[(problem_kind(p.problem), p.malformed)] += 1
            want_malformed += p.malformed
    c = {n: int(seg.counters[n]) - before[n] for n in before}
    assert c["rx_packets"] == fed
    assert c["malformed"] == want_malformed > 100
    assert c["input_drops"] == want_oversize
    assert dict(ingress.noflow) == dict(want_kinds)
    assert c["default_group"] >= sum(want_kinds.values())
    # exported per reason by the PMM's metrics
    m = PmmMetrics("r1", None, seg)
    m.noflow = ingress.noflow
    fams = {f.name: f for f in m.collect()}
    got = {(s.labels["reason"], s.labels["malformed"]): s.value
           for s in fams["pico_pmm_noflow_packets"].samples}
    assert got == {(k, "true" if mal else "false"): v for (k, mal), v in want_kinds.items()}
    assert got[("bad IHL", "true")] > 0
    m.close()


# ------------------------------------------------------------------------------ the trackers


@pytest.mark.cbuild
@pytest.mark.parametrize("lang", ["c", "py"])
def test_trackers_give_every_malformed_packet_a_verdict(packet_bed, smm_factory, cbuild, lang):
    """A sample of the mutations through a real packet segment to the tracker (with --reset,
    so its RST builder sees them too): it stays up and answers every packet."""
    from shared.api import flow_segment_name
    r = subprocess.run(["make", "-s", "-C", os.path.join(REPO, "examples")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    store, ingress, rel, ctl, cfg, _ = packet_bed
    smm_factory(cfg, "r1")
    c = cfg.cluster
    head = [os.path.join(REPO, "examples", "build", "tcptracker")] if lang == "c" else \
        [sys.executable, os.path.join(REPO, "examples", "tcptracker.py")]
    proc = subprocess.Popen([*head, "--reset", store.name,
                             flow_segment_name(c.shm_prefix, c.name, "r1")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ctl.commit(1, 1 << 40)  # the buffered group's output is released as it comes
    rng = random.Random(SEED + 5)
    fed = 0
    try:
        assert wait_line(proc, 15).strip() == "ready", proc.poll()
        for i, (case, pkt) in enumerate(mutations(rng)):
            if i % 25 or len(pkt) > ingress.mtu:
                continue
            assert ingress.on_packet(i + 1, pkt) == QUEUED, case
            store.in_bell.release()
            fed += 1
            got, deadline = [], time.monotonic() + 10
            while not any(v.packet_id == i + 1 for v in got):
                if time.monotonic() > deadline or proc.poll() is not None:
                    _fail(case, pkt, f"no verdict from the {lang} tracker (exit {proc.poll()})")
                got += rel.drain()
                if not got:
                    time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["packets"] == fed > 200, counts


# ------------------------------------------------------------------------------ the real PMM
RAW_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
n = 0
for line in open(sys.argv[1]):
    pkt = bytes.fromhex(line.strip())
    try:
        s.sendto(pkt, (socket.inet_ntoa(pkt[16:20]), 0))
        n += 1
    except OSError:
        pass  # the kernel refuses a few outright
print(n, flush=True)
"""


def _on_the_wire(client_ip: str, server_ip: str, rng: random.Random) -> list[bytes]:
    """IPv4 packets the kernel forwards to NFQUEUE: a sound IP header (raw sockets fill in
    the total length and checksum anyway) over mutated L4 bytes and odd protocols."""
    import socket as _s
    src, dst = _s.inet_aton(client_ip), _s.inet_aton(server_ip)
    out = []
    for name, pkt in CORPUS:
        if pkt[0] >> 4 != 4:
            continue
        ihl = (pkt[0] & 15) * 4
        for case_l4 in range(12):
            l4 = bytearray(pkt[ihl:])
            if case_l4 < 4:
                l4 = l4[:rng.randrange(len(l4))]          # truncated L4 header
            elif case_l4 < 8:
                for _ in range(rng.randint(1, 4)):
                    l4[rng.randrange(len(l4))] = rng.randrange(256)
            elif case_l4 == 8 and pkt[9] == 6:
                l4[12] = rng.randrange(5) << 4              # TCP data offset < 5
            elif case_l4 == 9:
                l4 = bytearray(rng.randrange(256) for _ in range(rng.randrange(40)))
            b = bytearray(pkt[:ihl]) + l4
            b[12:16], b[16:20] = src, dst
            if case_l4 == 10:
                b[9] = rng.choice((0, 4, 41, 47, 132, 253, 255))  # other protocols
            if case_l4 == 11:
                b[6:8] = (0x2000 | rng.randrange(1, 64)).to_bytes(2, "big")  # a fragment
            b[2:4] = len(b).to_bytes(2, "big")
            b[10:12] = b"\0\0"
            b[10:12] = ref_checksum(bytes(b[:ihl])).to_bytes(2, "big")
            out.append(bytes(b))
    return out


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces and "
                    "binds NFQUEUE; CI runs as root")
def test_the_real_pmm_counts_malformed_packets_and_keeps_forwarding(tmp_path, smm_factory,
                                                                     cbuild):
    """A few hundred mutated packets through the real pico-pmm on NFQUEUE (test_pmm_net's
    bed): it stays up, counts the broken ones, leaves none pending, and good traffic after
    them still passes."""
    from conftest import write_config
    from nettools import py
    from test_pmm_net import EXTRA, replica_bed, udp_send, udp_sink
    subprocess.run(["make", "-s", "-C", os.path.join(REPO, "examples")], check=True)
    with replica_bed("fz", write_config(tmp_path, extra=EXTRA), smm_factory, tmp_path) as (
            bed, rep):
        rep.start_middlebox()
        before = rep.counters()
        pkts = _on_the_wire(bed.client_ip, bed.server_ip, random.Random(SEED + 6))
        path = tmp_path / "malformed.hex"
        path.write_text("\n".join(p.hex() for p in pkts) + "\n")
        r = bed.run("client", py(RAW_SEND, path), timeout=60, check=True)
        assert int(r.stdout) > len(pkts) // 2
        _, lines = udp_sink(bed, 9001)
        udp_send(bed, 9001, "after", 3)
        lines.expect("after 2")                      # good traffic still passes
        assert rep.pmm.poll() is None, "pico-pmm died"
        deadline = time.monotonic() + 10
        while rep.counters()["pending"] != 0:
            assert time.monotonic() < deadline, rep.counters()
            time.sleep(0.05)
        c = rep.counters()
        assert c["malformed"] - before["malformed"] >= 20, (before, c)
        assert c["rx_packets"] - before["rx_packets"] >= 40
        assert c["verdict_errors"] == 0
