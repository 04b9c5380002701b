"""Packet parsing, classification and checksums: pure logic, fed hand-built and broken packets."""
import random

import pytest

from pmm.checksum import fix_checksums
from pmm.classify import Classifier
from pmm.parse import parse
from pktbuild import checksums_ok, ipv4, ipv6
from shared.config import parse_config
from shared.flowkey import hash_key, make_key


def test_tcp_ipv4_both_directions_one_flow():
    a = parse(ipv4("10.0.0.1", "10.0.1.2", 6, 40000, 80, b"GET /"))
    b = parse(ipv4("10.0.1.2", "10.0.0.1", 6, 80, 40000, b"200 OK"))
    assert a.flow and b.flow and a.key == b.key == make_key("10.0.0.1", 40000, "10.0.1.2", 80, 6)
    assert a.flow_hash == hash_key(a.key) and (a.sport, a.dport, a.family) == (40000, 80, 4)


def test_udp_and_icmp_echo():
    u = parse(ipv4("10.0.0.1", "10.0.1.2", 17, 5353, 53, b"q"))
    assert u.flow and (u.proto, u.sport, u.dport) == (17, 5353, 53)
    req = parse(ipv4("10.0.0.1", "10.0.1.2", 1, 77, icmp_type=8))
    rep = parse(ipv4("10.0.1.2", "10.0.0.1", 1, 77, icmp_type=0))
    assert req.flow and req.key == rep.key  # echo request and reply share a flow


def test_ipv6_tcp_and_icmp6():
    a = parse(ipv6("fd00:1::1", "fd00:2::2", 6, 1234, 443, b"x"))
    b = parse(ipv6("fd00:2::2", "fd00:1::1", 6, 443, 1234))
    assert a.flow and a.key == b.key and a.family == 6
    e = parse(ipv6("fd00:1::1", "fd00:2::2", 58, 9, icmp_type=128))
    r = parse(ipv6("fd00:2::2", "fd00:1::1", 58, 9, icmp_type=129))
    assert e.flow and e.key == r.key


def test_ipv6_extension_headers_are_walked():
    base = ipv6("fd00::1", "fd00::2", 17, 1000, 2000, b"data")
    hop = bytes([17, 0]) + bytes(6)  # hop-by-hop, 8 bytes, next header UDP
    pkt = bytearray(base[:40] + hop + base[40:])
    pkt[6] = 0
    pkt[4:6] = (len(pkt) - 40).to_bytes(2, "big")
    p = parse(bytes(pkt))
    assert p.flow and (p.proto, p.sport, p.dport) == (17, 1000, 2000)


@pytest.mark.parametrize("pkt,problem,malformed", [
    (b"", "empty", True),
    (b"\x45" + bytes(10), "truncated IPv4", True),
    (bytes([0x43]) + ipv4("1.1.1.1", "2.2.2.2", 6, 1, 2)[1:], "bad IHL", True),
    (ipv4("1.1.1.1", "2.2.2.2", 6, 1, 2)[:2] + b"\xff\xff" + ipv4("1.1.1.1", "2.2.2.2", 6, 1, 2)[4:],
     "bogus IPv4 total length", True),
    (ipv4("1.1.1.1", "2.2.2.2", 6, 1, 2)[:30], "bogus IPv4 total length", True),
    (ipv4("1.1.1.1", "2.2.2.2", 17, 1, 2, frag=0x2000), "fragment", False),
    (ipv4("1.1.1.1", "2.2.2.2", 17, 1, 2, frag=0x0010), "fragment", False),
    (b"\x60" + bytes(20), "truncated IPv6", True),
    (b"\x00\x01\x02", "not IP", True),
    (b"\x45\x00\x00\x14" + bytes(5) + b"\x2f" + bytes(10), "unsupported protocol", False),
])
def test_broken_and_unsupported_packets_never_raise(pkt, problem, malformed):
    p = parse(pkt)
    assert not p.flow and problem in p.problem and p.malformed == malformed
    assert p.key == bytes(40)


def test_truncated_l4_is_malformed():
    full = ipv4("1.1.1.1", "2.2.2.2", 6, 1, 2)
    cut = bytearray(full[:30])
    cut[2:4] = (30).to_bytes(2, "big")  # a consistent IPv4 length, but a TCP header cut short
    p = parse(bytes(cut))
    assert not p.flow and p.malformed and "truncated TCP" in p.problem


def test_fuzzed_bytes_never_raise():
    rng = random.Random(3)
    seeds = [ipv4("10.0.0.1", "10.0.0.2", 6, 1, 2, b"abc"), ipv6("::1", "::2", 17, 3, 4, b"d")]
    for _ in range(5000):
        pkt = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 6)):
            pkt[rng.randrange(len(pkt))] = rng.randrange(256)
        parse(bytes(pkt[:rng.randrange(len(pkt) + 1)]))


def test_fix_checksums_after_a_rewrite():
    for pkt in (ipv4("10.0.0.1", "10.0.0.2", 6, 1000, 80, b"hello world"),
                ipv4("10.0.0.1", "10.0.0.2", 17, 1000, 53, b"odd"),
                ipv4("10.0.0.1", "10.0.0.2", 1, 5, payload=b"ping"),
                ipv6("fd00::1", "fd00::2", 6, 1, 2, b"v6 data!"),
                ipv6("fd00::1", "fd00::2", 58, 7, payload=b"p")):
        assert checksums_ok(pkt)
        changed = bytearray(pkt)
        changed[-1] ^= 0xFF
        assert not checksums_ok(bytes(changed))
        assert checksums_ok(fix_checksums(bytes(changed)))


CFG = """
version: 1
cluster: {name: c}
replicas: {r1: {id: 1, smm_endpoint: "tcp://127.0.0.1:1"}, r2: {id: 2, smm_endpoint: "tcp://127.0.0.1:2"}}
groups: {web: {id: 3, target: r2}, dns: {id: 4}, lan: {id: 5}}
policies:
  - {group: web, proto: tcp, dport: 80}
  - {group: web, proto: tcp, dport: 8000-8100}
  - {group: dns, proto: udp, dport: 53}
  - {group: lan, src: 192.168.0.0/16}
  - {group: lan, dst: "fd00:5::/32"}
"""


@pytest.mark.parametrize("pkt,group", [
    (ipv4("10.0.0.1", "10.0.1.2", 6, 40000, 80), 3),
    (ipv4("10.0.0.1", "10.0.1.2", 6, 40000, 8050), 3),
    (ipv4("10.0.0.1", "10.0.1.2", 6, 40000, 8101), 0),
    (ipv4("10.0.0.1", "10.0.1.2", 17, 40000, 53), 4),
    (ipv4("192.168.3.4", "10.0.1.2", 17, 1, 2), 5),
    (ipv6("fd00:9::1", "fd00:5:1::2", 6, 1, 2), 5),
    (ipv6("fd00:9::1", "fd00:6::2", 6, 1, 80), 3),
    (ipv4("10.0.0.1", "10.0.1.2", 1, 9), 0),
])
def test_classifier(pkt, group):
    c = Classifier(parse_config(CFG))
    p = parse(pkt)
    assert c.group_of(p.proto, p.src, p.dst, p.sport, p.dport) == group
