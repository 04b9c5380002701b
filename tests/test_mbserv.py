"""MBServ's pure parts: the TCP state machine, inspection, routing, config, and the packet loop
over fake segments (the real packet path is in test_mbserv_net.py)."""
from __future__ import annotations

import ipaddress
import json
import struct
from pathlib import Path

import pytest

import mbserv
from mbserv import state as S
from mbserv.config import MBServConfig, load_config, parse_config
from mbserv.core import Core
from mbserv.inspect import Inspector
from mbserv.main import run
from mbserv.route import Router, Rule, parse_request
from mbserv.state import FlowState
from mbserv.tcp import (ACK, DROP, FIN, FORWARD, PSH, RST, SYN, BadSegment, parse_segment,
                        reset_for, step)
from shared.errors import ConfigError
from shared.flowkey import make_key
from shared.packets import Packet

FLAGS = {"F": FIN, "S": SYN, "R": RST, "P": PSH, "A": ACK}
C4, S4 = "10.0.0.1", "10.0.1.1"
C6, S6 = "fd00::1", "fd00:0:0:1::1"


def tcp(src, dst, sport, dport, seq, ack=0, flags="A", win=65535, payload=b"", wscale=None):
    fl = sum(FLAGS[c] for c in flags)
    opts = b"" if wscale is None else bytes([1, 3, 3, wscale])
    l4 = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                     (5 + len(opts) // 4) << 4, fl, win, 0, 0) + opts + payload
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if len(s) == 4:
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, 6, 0, s, d) + l4
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), 6, 64, s, d) + l4


class Conn:
    """A client and a server talking through a Core; each side's next sequence number is kept,
    so send() builds what a real TCP would send unless told otherwise."""

    def __init__(self, core=None, v6=False, cisn=1000, sisn=50000, cport=40000, sport=80,
                 wscale=None, swscale=None, client=None, server=None):
        self.core = core or Core()
        self.addr = {"c": (client or (C6 if v6 else C4), cport),
                     "s": (server or (S6 if v6 else S4), sport)}
        self.nxt = {"c": cisn, "s": sisn}
        self.ws = {"c": wscale, "s": swscale}
        self.state = bytes(S.STATE_SIZE)
        self.now = 1000.0

    def packet(self, who, flags="A", payload=b"", seq=None, ack=None, win=65535):
        other = "s" if who == "c" else "c"
        (src, sp), (dst, dp) = self.addr[who], self.addr[other]
        return tcp(src, dst, sp, dp, self.nxt[who] if seq is None else seq,
                   self.nxt[other] if ack is None else ack, flags, win, payload,
                   self.ws[who] if "S" in flags else None)

    def send(self, who, flags="A", payload=b"", seq=None, ack=None, win=65535):
        seg = parse_segment(self.packet(who, flags, payload, seq, ack, win))
        self.now += 0.01
        res = self.core.process(self.state, seg, self.now)
        if res.changed:
            self.state = res.state
        if res.verdict == FORWARD and seq is None:
            self.nxt[who] = (self.nxt[who] + seg.seg_len) & 0xFFFFFFFF
        return res

    def handshake(self):
        assert self.send("c", "S", ack=0).verdict == FORWARD
        assert self.send("s", "SA").verdict == FORWARD
        assert self.send("c", "A").verdict == FORWARD
        assert self.st.tcp == S.ESTABLISHED
        return self

    @property
    def st(self) -> FlowState:
        return FlowState.unpack(self.state)


# ------------------------------------------------------------------ state layout
def test_state_is_64_packed_bytes_at_documented_offsets():
    st = FlowState()
    st.version, st.tcp, st.flags, st.backend = 1, S.ESTABLISHED, 0x05, 2
    st.last_seen, st.tag = 7, 0xBEEF
    st.c.end, st.c.maxend, st.c.maxwin, st.c.wscale = 0x11111111, 0x22222222, 0x33333333, 7
    st.s.end, st.s.wscale = 0x44444444, S.NO_WSCALE
    st.c.packets, st.s.packets, st.c.bytes, st.s.bytes = 3, 4, 1 << 40, 5
    st.c.node, st.s.node = 9, 10
    b = st.pack()
    assert len(b) == S.STATE_SIZE == 64
    assert b[0:4] == bytes([1, S.ESTABLISHED, 0x05, 2])
    assert int.from_bytes(b[4:8], "little") == 7
    assert int.from_bytes(b[8:12], "little") == 0x11111111
    assert int.from_bytes(b[16:20], "little") == 0x33333333
    assert int.from_bytes(b[20:24], "little") == 0x44444444
    assert b[32:34] == bytes([7, 0xFF]) and int.from_bytes(b[34:36], "little") == 0xBEEF
    assert int.from_bytes(b[44:52], "little") == 1 << 40
    assert int.from_bytes(b[60:62], "little") == 9 and int.from_bytes(b[62:64], "little") == 10
    assert FlowState.unpack(b).pack() == b
    assert FlowState.unpack(bytes(64)).version == 0


# ------------------------------------------------------------------ parsing
def test_parse_ipv4_and_ipv6_segments():
    seg = parse_segment(tcp(C4, S4, 40000, 80, 7, 9, "SA", 1234, b"hi", wscale=7))
    assert (seg.family, seg.sport, seg.dport, seg.seq, seg.ack) == (4, 40000, 80, 7, 9)
    assert seg.flags == SYN | ACK and seg.window == 1234 and seg.wscale == 7
    assert seg.payload == b"hi" and seg.seg_len == 3 and seg.src_is_a
    seg6 = parse_segment(tcp(S6, C6, 80, 40000, 1, 2, "FA", payload=b"x"))
    assert seg6.family == 6 and seg6.seg_len == 2 and seg6.wscale == S.NO_WSCALE
    assert not seg6.src_is_a  # fd00:0:0:1::1 > fd00::1
    # the direction agrees with the canonical flow key
    assert make_key(C6, 40000, S6, 80, 6)[:16] == ipaddress.ip_address(C6).packed


def test_parse_non_tcp_and_broken_tcp():
    udp = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 17, 0, bytes(4), bytes(4)) + bytes(8)
    assert parse_segment(udp) is None
    assert parse_segment(b"") is None and parse_segment(b"\x10abc") is None
    good = bytearray(tcp(C4, S4, 1, 2, 0))
    frag = bytearray(good)
    frag[6:8] = (0x2000).to_bytes(2, "big")  # MF
    with pytest.raises(BadSegment, match="fragment"):
        parse_segment(bytes(frag))
    with pytest.raises(BadSegment, match="truncated"):
        parse_segment(bytes(good[:30]).replace(good[2:4], (30).to_bytes(2, "big"), 1))
    bad = bytearray(good)
    bad[32] = 0x20  # data offset 8 bytes
    with pytest.raises(BadSegment, match="data offset"):
        parse_segment(bytes(bad))


# ------------------------------------------------------------------ the TCP state machine
@pytest.mark.parametrize("v6", [False, True])
def test_handshake_data_both_ways_and_counters(v6):
    c = Conn(v6=v6)
    assert c.send("c", "S", ack=0).reason == "SYN: new connection"
    assert c.st.tcp == S.SYN_SENT
    assert c.send("s", "SA").reason == "SYN-ACK"
    assert c.st.tcp == S.SYN_RCVD
    assert c.send("c", "A").reason == "handshake complete"
    assert c.st.tcp == S.ESTABLISHED
    for i in range(5):
        assert c.send("c", "PA", b"q" * 100).verdict == FORWARD
        assert c.send("s", "PA", b"r" * 1000).verdict == FORWARD
    st = c.st
    assert (st.c.packets, st.c.bytes, st.s.packets, st.s.bytes) == (7, 500, 6, 5000)
    assert st.c.end == 1000 + 1 + 500 and st.s.end == 50000 + 1 + 5000
    assert st.last_seen == int(c.now)


def test_the_client_is_the_side_that_sent_the_syn_whatever_its_address():
    c = Conn(client="10.9.9.9", server="10.0.0.1")  # the client is side b of the key
    c.handshake()
    assert not c.st.flags & S.F_CLIENT_IS_A
    c.send("s", "PA", b"hello")
    assert c.st.s.bytes == 5 and c.st.c.bytes == 0


def test_no_state_drops_everything_but_an_opening_syn():
    c = Conn()
    for flags in ("A", "PA", "SA", "FA", "R", "SF"):
        res = c.send("c", flags, b"data" if "P" in flags else b"")
        assert (res.verdict, res.kind) == (DROP, "no_state"), flags
        assert res.reason == "no flow state" and not res.changed
    res = c.send("s", "A")
    assert res.kind == "no_state"


def test_retransmissions_are_accepted():
    c = Conn().handshake()
    first = c.packet("c", "PA", b"a" * 1000)
    c.send("c", "PA", b"a" * 1000)
    c.send("c", "PA", b"b" * 1000)
    end = c.st.c.end
    for pkt in (first, c.packet("c", "PA", b"b" * 1000, seq=1001 + 1000)):
        res = c.core.process(c.state, parse_segment(pkt), c.now)  # old: sent again
        assert res.verdict == FORWARD, res
        c.state = res.state
    assert c.st.c.end == end  # an old segment does not move the stream
    # a retransmitted SYN and SYN-ACK are fine too
    assert c.send("c", "S", seq=1000, ack=0).verdict == FORWARD
    assert c.send("s", "SA", seq=50000, ack=1001).verdict == FORWARD
    # a keepalive probe (seq one below the next, no data)
    assert c.send("c", "A", seq=c.nxt["c"] - 1).verdict == FORWARD


def test_out_of_window_segments_are_dropped_and_leave_the_state_alone():
    c = Conn().handshake()
    c.send("c", "PA", b"x" * 100)
    before = c.state
    cases = [
        (dict(seq=c.nxt["c"] + 200000), "beyond the receiver's window"),
        (dict(seq=c.nxt["c"] - 300000), "older than the receiver's window"),
        (dict(ack=c.nxt["s"] + 5000), "acknowledges data never sent"),
        (dict(ack=c.nxt["s"] - 200000), "acknowledgement older than a window"),
    ]
    for kw, why in cases:
        res = c.send("c", "PA", b"y" * 10, **kw)
        assert (res.verdict, res.kind, res.reason) == (DROP, "nonconforming", why), kw
        assert c.state == before
    # segments from the middle of the window are fine
    assert c.send("c", "PA", b"z", seq=c.nxt["c"] + 1000).verdict == FORWARD


def test_the_window_is_the_one_the_receiver_advertised():
    c = Conn().handshake()
    c.send("s", "A", win=1000)  # the server now allows nxt + 1000 at least (max stays 65535)
    assert c.send("c", "PA", b"a" * 60000).verdict == FORWARD
    # 65535 from the SYN-ACK: beyond it is out of window
    res = c.send("c", "PA", b"b" * 6000)
    assert res.verdict == DROP and res.reason == "beyond the receiver's window"


def test_window_scaling_applies_only_when_both_sides_offer_it():
    c = Conn(wscale=7, swscale=7).handshake()
    assert c.st.flags & S.F_WSCALE
    c.send("s", "A", win=1000)  # 1000 << 7 = 128000 bytes
    for _ in range(100):
        assert c.send("c", "PA", b"a" * 1200).verdict == FORWARD
    assert c.st.s.maxwin == 128000
    d = Conn(wscale=7, swscale=None).handshake()
    assert not d.st.flags & S.F_WSCALE
    d.send("s", "A", win=1000)
    assert d.send("c", "PA", b"a" * 1200).verdict == FORWARD
    for _ in range(60):
        d.send("c", "PA", b"a" * 1200)
    assert d.send("c", "PA", b"a" * 1200).reason == "beyond the receiver's window"


def test_sequence_numbers_wrap():
    c = Conn(cisn=0xFFFFFF00, sisn=0xFFFFFFF0).handshake()
    for _ in range(3):
        assert c.send("c", "PA", b"w" * 200).verdict == FORWARD
        assert c.send("s", "PA", b"v" * 200).verdict == FORWARD
    assert c.st.c.end == (0xFFFFFF00 + 1 + 600) & 0xFFFFFFFF
    assert c.send("c", "PA", b"old", seq=0xFFFFFF01).verdict == FORWARD  # before the wrap


def test_fin_handshake_then_time_wait():
    c = Conn().handshake()
    c.send("c", "PA", b"request")
    assert c.send("c", "FA").reason == "FIN"
    assert c.st.tcp == S.FIN_WAIT and c.st.flags & S.F_FIN_C
    assert c.send("s", "PA", b"more data after the client's FIN").verdict == FORWARD
    res = c.send("c", "PA", b"data after my own FIN", seq=c.nxt["c"])
    assert (res.verdict, res.reason) == (DROP, "data after FIN")
    c.send("s", "FA")
    assert c.st.tcp == S.CLOSING
    res = c.send("c", "A")
    assert c.st.tcp == S.TIME_WAIT and res.terminal
    # the last ACK was lost downstream: the server retransmits its FIN, the client re-acks
    assert c.send("s", "FA", seq=c.nxt["s"] - 1).verdict == FORWARD
    assert c.send("c", "A").verdict == FORWARD
    # a new connection on the same ports reuses the flow
    c.nxt["c"] += 100000
    res = c.send("c", "S", ack=0)
    assert res.reason == "SYN: new connection on a closed flow" and c.st.tcp == S.SYN_SENT
    assert c.st.c.packets == 1


def test_rst_closes_and_nothing_but_a_new_syn_passes_after_it():
    c = Conn().handshake()
    assert c.send("s", "R", seq=c.nxt["s"] + 10**6).reason == "beyond the receiver's window"
    res = c.send("c", "RA")
    assert res.verdict == FORWARD and c.st.tcp == S.CLOSED and res.terminal
    res = c.send("c", "PA", b"late")
    assert (res.verdict, res.kind, res.reason) == (DROP, "nonconforming", "connection was reset")
    assert c.send("c", "S", ack=0).verdict == FORWARD


def test_refused_connection_and_bad_handshakes():
    c = Conn()
    c.send("c", "S", ack=0)
    assert c.send("s", "SA", ack=12345).reason == \
        "server segment that does not acknowledge the SYN"
    assert c.send("c", "PA", b"early").reason == "client segment before the SYN-ACK"
    assert c.send("s", "S", ack=0).kind == "nonconforming"
    assert c.send("s", "RA").reason == "RST: connection refused"
    assert c.st.tcp == S.CLOSED
    d = Conn().handshake()
    assert d.send("c", "SF", ack=0).reason == "SYN with FIN or RST"


def test_step_returns_bytes_and_keeps_them_on_a_drop():
    syn = parse_segment(tcp(C4, S4, 40000, 80, 1000, 0, "S"))
    verdict, new, why = step(b"", syn, 5.0)
    assert verdict == FORWARD and len(new) == 64 and FlowState.unpack(new).tcp == S.SYN_SENT
    ack = parse_segment(tcp(C4, S4, 40000, 80, 1001, 99, "A"))
    verdict2, same, why2 = step(new, ack, 6.0)
    assert (verdict2, same, why2) == (DROP, new, "client segment before the SYN-ACK")
    assert step(bytes(64), ack, 6.0)[::2] == (DROP, "no flow state")
    other = bytearray(new)
    other[0] = 9
    assert step(bytes(other), ack, 6.0)[2] == "state written by another layout (version 9)"


@pytest.mark.parametrize("v6", [False, True])
def test_reset_for_answers_the_sender(v6):
    a, b = (C6, S6) if v6 else (C4, S4)
    with_ack = parse_segment(reset_for(tcp(a, b, 40000, 80, 1000, 777, "PA", payload=b"xyz")))
    assert (with_ack.sport, with_ack.dport, with_ack.seq, with_ack.flags) == (80, 40000, 777, RST)
    assert with_ack.src == ipaddress.ip_address(b).packed
    no_ack = parse_segment(reset_for(tcp(a, b, 40000, 80, 1000, 0, "S")))
    assert (no_ack.seq, no_ack.ack, no_ack.flags) == (0, 1001, RST | ACK)
    assert reset_for(tcp(a, b, 40000, 80, 1, 0, "R")) is None


# ------------------------------------------------------------------ inspection
def test_inspector_finds_a_string_in_one_payload_and_across_segments():
    insp = Inspector([b"EVIL", b"/etc/passwd"])
    assert insp.scan(0, b"GET /etc/passwd HTTP/1.0") == (b"/etc/passwd", 0)
    hit, node = insp.scan(0, b"xx/etc/pa")
    assert hit is None and insp.prefix_of(node) == b"/etc/pa"
    assert insp.scan(node, b"sswd")[0] == b"/etc/passwd"
    hit, node = insp.scan(0, b"E")
    hit, node = insp.scan(node, b"V")
    hit, node = insp.scan(node, b"I")
    assert hit is None and insp.prefix_of(node) == b"EVI"
    assert insp.scan(node, b"L!")[0] == b"EVIL"
    assert insp.scan(node, b"x")[0] is None  # "EVIx"
    assert insp.scan(insp.scan(0, b"EV")[1], b"xIL") == (None, 0)


def test_inspector_ignore_case_and_tags():
    insp = Inspector([b"Evil"], ignore_case=True)
    assert insp.scan(0, b"an eVIL thing")[0] == b"Evil"
    assert insp.scan(insp.scan(0, b"..EV")[1], b"il")[0] == b"Evil"
    assert Inspector([b"Evil"]).scan(0, b"evil")[0] is None
    assert Inspector([b"a", b"b"]).tag != Inspector([b"a", b"c"]).tag
    assert Inspector([b"a", b"b"]).tag == Inspector([b"a", b"b"]).tag
    with pytest.raises(ValueError):
        Inspector([b""])
    assert Inspector([]).scan(0, b"anything") == (None, 0)


def test_a_malicious_string_drops_the_segment_and_blocks_the_flow():
    core = Core(Inspector([b"EVIL-PAYLOAD"]))
    c = Conn(core).handshake()
    assert c.send("c", "PA", b"hello ").verdict == FORWARD
    res = c.send("c", "PA", b"here is EVIL-PAYLOAD, bye")
    assert (res.verdict, res.kind, res.hit) == (DROP, "malicious", b"EVIL-PAYLOAD")
    assert c.st.blocked and c.st.c.packets == 3  # SYN, ACK, hello: the dropped one is not counted
    nxt = c.nxt["c"]
    res = c.send("c", "PA", b"harmless")
    assert (res.verdict, res.kind) == (DROP, "blocked")
    assert c.send("s", "PA", b"reply").kind == "blocked"  # both directions
    assert c.nxt["c"] == nxt
    res = c.send("c", "RA")
    assert res.verdict == FORWARD and c.st.tcp == S.CLOSED  # a reset still tears it down
    c.nxt["c"] += 10**6
    assert c.send("c", "S", ack=0).verdict == FORWARD and not c.st.blocked  # a new connection


def test_a_string_split_across_segments_is_caught_in_order_only():
    core = Core(Inspector([b"EVIL-PAYLOAD"]))
    c = Conn(core).handshake()
    assert c.send("c", "PA", b"xxxEVIL-").verdict == FORWARD
    assert c.send("s", "PA", b"PAYLOAD").verdict == FORWARD  # the other direction: no match
    assert c.send("c", "PA", b"PAY").verdict == FORWARD
    res = c.send("c", "PA", b"LOAD-and-more")
    assert res.kind == "malicious" and res.hit == b"EVIL-PAYLOAD"
    # a retransmission of an earlier, harmless segment does not disturb the context
    d = Conn(core).handshake()
    d.send("c", "PA", b"aaaa")
    d.send("c", "PA", b"bbEVIL")
    assert d.send("c", "PA", b"aaaa", seq=1001).verdict == FORWARD
    assert d.send("c", "PA", b"-PAYLOAD").kind == "malicious"
    # a retransmission that carries the whole string is caught on its own
    e = Conn(core).handshake()
    e.send("c", "PA", b"EVIL-PAY")
    res = e.send("c", "PA", b"EVIL-PAYLOAD", seq=1001)
    assert res.kind == "malicious"


def test_server_payloads_are_inspected_too():
    c = Conn(Core(Inspector([b"secret-key"]))).handshake()
    c.send("c", "PA", b"GET / HTTP/1.0\r\n\r\n")
    c.send("s", "PA", b"...secr")
    assert c.send("s", "PA", b"et-key...").kind == "malicious"


def test_a_tag_from_another_pattern_list_restarts_the_context():
    c = Conn(Core(Inspector([b"EVIL-PAYLOAD"]))).handshake()
    c.send("c", "PA", b"EVIL-PAY")
    assert c.st.c.node != 0
    c.core = Core(Inspector([b"EVIL-PAYLOAD", b"other"]))  # a replica with another list
    assert c.send("c", "PA", b"LOAD").verdict == FORWARD  # the old context is not trusted
    assert c.st.tag == c.core.inspector.tag


# ------------------------------------------------------------------ routing
def test_parse_request():
    r = parse_request(b"GET /api/v1?q=1 HTTP/1.1\r\nUser-Agent: x\r\n"
                      b"HOST: Example.COM:8080\r\n\r\n")
    assert (r.method, r.path, r.host) == (b"GET", b"/api/v1?q=1", b"example.com")
    r = parse_request(b"GET http://h.example/x/y HTTP/1.0\r\n\r\n")
    assert (r.path, r.host) == (b"/x/y", b"h.example")
    assert parse_request(b"\x16\x03\x01 tls hello") is None
    assert parse_request(b"GET /no-version\r\n") is None
    assert parse_request(b"POST / HTTP/1.1\r\nHost: [fd00::1]:80\r\n\r\n").host == b"[fd00::1]"


def test_router_rules_and_default():
    router = Router(["web", "api", "static", "rpc"], [
        Rule("api", path_prefix="/api/"),
        Rule("static", host="*.static.example"),
        Rule("static", host="cdn.example", path_prefix="/img/"),
        Rule("rpc", prefix=b"RPC1 "),
    ], default="web")
    req = b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n"
    assert router.classify(req % (b"/api/users", b"x")) == 1
    assert router.classify(req % (b"/apix", b"x")) == 0
    assert router.classify(req % (b"/", b"a.static.example")) == 2
    assert router.classify(req % (b"/", b"static.example")) == 0  # the wildcard needs a label
    assert router.classify(req % (b"/img/1.png", b"cdn.example")) == 2
    assert router.classify(req % (b"/css/1.css", b"cdn.example")) == 0  # both must hold
    assert router.classify(b"RPC1 call()") == 3
    assert router.classify(b"\x00\x01binary") == 0
    assert Router(["a", "b"]).classify(b"anything") == 0
    with pytest.raises(ValueError):
        Router(["a"], [Rule("b", prefix=b"x")])
    with pytest.raises(ValueError):
        Rule("a")


def test_the_first_request_routes_the_connection_once():
    router = Router(["web", "api"], [Rule("api", path_prefix="/api/")], default="web")
    c = Conn(Core(router=router)).handshake()
    assert c.send("s", "PA", b"220 server banner").routed is None  # the server does not route
    res = c.send("c", "PA", b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert res.routed == 1 and c.st.backend == 1 and c.st.flags & S.F_ROUTED
    assert c.send("c", "PA", b"GET /other HTTP/1.1\r\n\r\n").routed is None  # decided already
    assert c.st.backend == 1
    d = Conn(Core(router=router), cport=40001).handshake()
    assert d.send("c", "PA", b"GET / HTTP/1.1\r\n\r\n").routed == 0


# ------------------------------------------------------------------ config
def test_config_parses_everything(tmp_path):
    cfg = load_config(Path(mbserv.__file__).parent / "example.yaml")
    assert b"/etc/passwd" in cfg.malicious and b"\x90" * 8 in cfg.malicious
    assert cfg.ignore_case and cfg.backends == ("web", "api", "static")
    assert cfg.router().classify(b"GET /api/ HTTP/1.1\r\n\r\n") == 1
    assert cfg.inspector().scan(0, b"<SCRIPT>alert(1)")[0] == b"<script>alert("
    empty = parse_config("")
    assert empty == MBServConfig(path="<string>") and empty.router() is None
    p = tmp_path / "m.yaml"
    p.write_text("malicious: [abc]\nreset_on_violation: true\ntime_wait_s: 0.5\n")
    cfg = load_config(p)
    assert cfg.malicious == (b"abc",) and cfg.reset_on_violation and cfg.time_wait_s == 0.5


@pytest.mark.parametrize("text,key,what", [
    ("malicous: [x]", "malicous", "unknown key"),
    ("malicious: x", "malicious", "expected a list"),
    ("malicious: [x, 3]", "malicious[1]", "expected a string"),
    ("malicious: ['']", "malicious[0]", "empty"),
    ("malicious: [{hex: zz}]", "malicious[0].hex", "not hexadecimal"),
    ("ignore_case: yes please", "ignore_case", "true or false"),
    ("time_wait_s: -1", "time_wait_s", "0..86400"),
    ("routing: {backends: []}", "routing.backends", "non-empty list"),
    ("routing: {backends: [a, a]}", "routing.backends[1]", "listed twice"),
    ("routing: {backends: [a], default: b}", "routing.default", "not one of"),
    ("routing: {backends: [a], rules: [{backend: b, prefix: x}]}", "routing.rules[0].backend",
     "not one of"),
    ("routing: {backends: [a], rules: [{backend: a}]}", "routing.rules[0]", "at least one"),
    ("routing: {backends: [a], rules: [{backend: a, path_prefix: api}]}",
     "routing.rules[0].path_prefix", "starts with '/'"),
    ("routing: {backends: [a], rules: [{backend: a, hots: x}]}", "routing.rules[0].hots",
     "unknown key"),
    ("routing: {backend: [a]}", "routing.backend", "unknown key"),
])
def test_config_errors_name_the_file_and_key(tmp_path, text, key, what):
    p = tmp_path / "bad.yaml"
    p.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.file == str(p) and e.value.key == key and what in str(e.value)
    assert str(e.value).startswith(f"{p}: {key}: ")


def test_config_file_and_syntax_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("malicious: [a\nb: c\n")
    with pytest.raises(ConfigError, match="YAML syntax error") as e:
        load_config(p)
    assert e.value.file == str(p) and e.value.line
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


# ------------------------------------------------------------------ the packet loop, faked
class FakeIO:
    def __init__(self, packets):
        self.queue = list(packets)
        self.written, self.dropped, self.created = [], [], []

    def pkt_read(self, timeout=None):
        return self.queue.pop(0) if self.queue else None

    def pkt_write(self, pkt, data=None):
        self.written.append(pkt.data)
        return True

    def pkt_drop(self, pkt):
        self.dropped.append(pkt.data)
        return True

    def pkt_create(self, data, group=0, key=bytes(40), flow_hash=0):
        self.created.append((data, group))
        return True


class FakeFlows:
    """get_flow/put_flow/del_flow over a dict, checking that every transaction is ended."""
    state_size = 64

    def __init__(self):
        self.table, self.open, self.groups = {}, set(), {}

    def get_flow(self, key, create=False, group=0):
        assert key not in self.open
        if key not in self.table:
            if not create:
                return None
            self.table[key] = bytearray(self.state_size)
            self.groups[key] = group
        self.open.add(key)
        return memoryview(self.table[key])

    def put_flow(self, key, modified=True):
        self.open.remove(key)
        return True

    def del_flow(self, key):
        self.open.discard(key)
        return self.table.pop(key, None) is not None


def pkts(*datas, group=2):
    out = []
    for d in datas:
        try:
            seg = parse_segment(d)
        except BadSegment:
            seg = None
        key = make_key(seg.src if len(seg.src) == 16 else ipaddress.ip_address(seg.src),
                       seg.sport, seg.dst if len(seg.dst) == 16 else ipaddress.ip_address(seg.dst),
                       seg.dport, 6) if seg else bytes(40)
        out.append(Packet(d, 1, 0, group, 0, 0, key, 0))
    return out


def run_loop(datas, cfg=MBServConfig(), reset=False, flows=None):
    io, flows = FakeIO(pkts(*datas)), flows or FakeFlows()
    core = Core(cfg.inspector(), cfg.router())
    counts = run(io, flows, core, cfg, reset, False, lambda: not io.queue)
    assert not flows.open
    json.dumps(counts)
    return counts, io, flows


def test_the_loop_forwards_drops_counts_and_routes():
    cfg = parse_config("malicious: [EVIL]\nrouting: {backends: [web, api], rules: "
                       "[{backend: api, path_prefix: /api/}]}\n")
    c = Conn()
    datas = [c.packet("c", "S", ack=0)]
    c.nxt["c"] += 1
    datas.append(c.packet("s", "SA"))
    c.nxt["s"] += 1
    datas += [c.packet("c", "A"), c.packet("c", "PA", b"GET /api/1 HTTP/1.1\r\n\r\n")]
    c.nxt["c"] += 23
    datas += [c.packet("c", "PA", b"...EV"), c.packet("c", "PA", b"IL", seq=c.nxt["c"] + 5),
              c.packet("c", "PA", b"after", seq=c.nxt["c"] + 7)]
    stray = Conn(cport=41000).packet("c", "PA", b"no state")
    udp = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 17, 0, bytes(4), bytes(4)) + bytes(8)
    counts, io, flows = run_loop(datas + [stray, udp], cfg)
    assert counts["packets"] == 9 and counts["forwarded"] == 5 and counts["passed"] == 1
    assert counts["dropped_malicious"] == 1 and counts["hits"] == {"EVIL": 1}
    assert counts["dropped_blocked"] == 1 and counts["dropped_no_state"] == 1
    assert counts["requests"] == {"web": 0, "api": 1} and counts["flows_created"] == 1
    assert counts["reasons"] == {"no flow state": 1} and counts["errors"] == 0
    assert len(io.written) == 6 and len(io.dropped) == 3 and io.created == []
    (state,) = flows.table.values()
    st = FlowState.unpack(state)
    assert st.blocked and st.backend == 1 and st.tcp == S.ESTABLISHED


def test_the_loop_resets_stateless_and_nonconforming_segments():
    c = Conn()
    stray = c.packet("c", "PA", b"after a failover without state")
    counts, io, _ = run_loop([stray], reset=True)
    assert counts["resets"] == 1 and counts["dropped_no_state"] == 1
    (rst, group), = io.created
    seg = parse_segment(rst)
    assert seg.flags == RST and seg.seq == c.nxt["s"] and group == 2 and seg.dport == 40000
    # an RST is never answered with an RST; non-conforming segments are answered too
    counts, io, _ = run_loop([c.packet("c", "R")], reset=True)
    assert counts["resets"] == 0
    d = Conn(cport=40500)
    syn = d.packet("c", "S", ack=0)
    bad = d.packet("c", "PA", b"before the SYN-ACK", seq=d.nxt["c"] + 1)
    counts, io, _ = run_loop([syn, bad], reset=True)
    assert counts["dropped_nonconforming"] == 1 and counts["resets"] == 1
    assert counts["reasons"] == {"client segment before the SYN-ACK": 1}


def test_closed_flows_are_deleted_after_time_wait_while_their_group_is_in_hand():
    cfg = MBServConfig(time_wait_s=0)
    c = Conn()
    datas = [c.packet("c", "S", ack=0)]
    c.nxt["c"] += 1
    datas.append(c.packet("s", "SA"))
    c.nxt["s"] += 1
    datas.append(c.packet("c", "RA"))
    other = Conn(cport=42000).packet("c", "S", ack=0)  # a packet of the same group
    counts, io, flows = run_loop(datas + [other], cfg)
    assert counts["flows_deleted"] == 1 and counts["flows_created"] == 2
    assert len(flows.table) == 1  # only the new connection's flow is left
    counts, io, flows = run_loop(datas + [other], MBServConfig(time_wait_s=30))
    assert counts["flows_deleted"] == 0 and len(flows.table) == 2


def test_the_loop_drops_broken_tcp_and_survives_table_errors():
    from shared.errors import TableFull

    class Full(FakeFlows):
        def get_flow(self, key, create=False, group=0):
            raise TableFull("stripe 3 is full")

    frag = bytearray(Conn().packet("c", "S", ack=0))
    frag[6:8] = (0x2000).to_bytes(2, "big")
    counts, io, _ = run_loop([bytes(frag), Conn().packet("c", "S", ack=0)], flows=Full())
    assert counts["dropped_nonconforming"] == 1 and counts["errors"] == 1
    assert counts["reasons"] == {"IPv4 fragment": 1} and len(io.dropped) == 2
