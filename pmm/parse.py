"""Parsing a raw IP packet into its flow: pure functions, no I/O.

parse(packet) never raises on bad input: a packet that cannot be read as a flow comes back with
`flow=False` and a `problem` naming why (truncated header, bad IHL, bogus length, fragment,
unsupported protocol...). The PMM sends such packets to the default group and counts them.
"""
from __future__ import annotations

import re
from typing import NamedTuple

from shared.flowkey import hash_key, make_key_packed

V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
_V6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options: (len + 1) * 8 bytes
_V6_FRAG, _V6_AH = 44, 51
_NO_KEY = bytes(40)


class Parsed(NamedTuple):
    flow: bool          # a flow key could be derived
    key: bytes          # canonical key (zeros if not flow)
    flow_hash: int
    family: int         # 4, 6 or 0
    proto: int
    src: int            # 128-bit address (IPv4-mapped for IPv4), as an int for policy masks
    dst: int
    sport: int
    dport: int
    malformed: bool     # broken rather than merely unsupported
    problem: str


_DETAIL = re.compile(r"\s*\([^)]*\)|\s+-?\d+")


def problem_kind(problem: str) -> str:
    """The problem without its numbers, a stable label for counting: "bad IHL 8" -> "bad IHL",
    "bogus IPv4 total length 30 (packet has 20 bytes)" -> "bogus IPv4 total length"."""
    return _DETAIL.sub("", problem) or "unknown"


def _noflow(problem: str, malformed: bool = True, family: int = 0, proto: int = 0,
            src: int = 0, dst: int = 0) -> Parsed:
    return Parsed(False, _NO_KEY, 0, family, proto, src, dst, 0, 0, malformed, problem)


def _ports(pkt: bytes, off: int, end: int, proto: int, v6: bool) -> tuple[int, int] | str:
    """(sport, dport) of the L4 header at off, or a problem string."""
    if proto == TCP:
        if end - off < 20:
            return "truncated TCP header"
        if (pkt[off + 12] >> 4) * 4 < 20:
            return "bad TCP data offset"
        return int.from_bytes(pkt[off:off + 2], "big"), int.from_bytes(pkt[off + 2:off + 4], "big")
    if proto == UDP:
        if end - off < 8:
            return "truncated UDP header"
        return int.from_bytes(pkt[off:off + 2], "big"), int.from_bytes(pkt[off + 2:off + 4], "big")
    if proto == (ICMP6 if v6 else ICMP):
        if end - off < 8:
            return "truncated ICMP header"
        echo = (128, 129) if v6 else (8, 0)
        if pkt[off] in echo:  # request and reply share the echo id: one flow
            ident = int.from_bytes(pkt[off + 4:off + 6], "big")
            return ident, ident
        return 0, 0
    return "unsupported protocol"


def parse(pkt: bytes) -> Parsed:
    n = len(pkt)
    if n < 1:
        return _noflow("empty packet")
    version = pkt[0] >> 4
    if version == 4:
        if n < 20:
            return _noflow("truncated IPv4 header")
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < 20 or ihl > n:
            return _noflow(f"bad IHL {ihl}")
        total = int.from_bytes(pkt[2:4], "big")
        if total < ihl or total > n:
            return _noflow(f"bogus IPv4 total length {total} (packet has {n} bytes)")
        proto = pkt[9]
        src16, dst16 = V4_MAPPED + pkt[12:16], V4_MAPPED + pkt[16:20]
        src, dst = int.from_bytes(src16, "big"), int.from_bytes(dst16, "big")
        if int.from_bytes(pkt[6:8], "big") & 0x3FFF:  # MF set or a non-zero fragment offset
            return _noflow("IPv4 fragment", False, 4, proto, src, dst)
        ports = _ports(pkt, ihl, total, proto, False)
        family = 4
    elif version == 6:
        if n < 40:
            return _noflow("truncated IPv6 header")
        total = 40 + int.from_bytes(pkt[4:6], "big")
        if total > n:
            return _noflow(f"bogus IPv6 payload length {total - 40} (packet has {n} bytes)")
        src16, dst16 = pkt[8:24], pkt[24:40]
        src, dst = int.from_bytes(src16, "big"), int.from_bytes(dst16, "big")
        proto, off = pkt[6], 40
        for _ in range(8):  # a bounded walk over extension headers
            if proto in _V6_EXT or proto == _V6_AH:
                if total - off < 8:
                    return _noflow("truncated IPv6 extension header", True, 6, proto, src, dst)
                hlen = (pkt[off + 1] + 2) * 4 if proto == _V6_AH else (pkt[off + 1] + 1) * 8
                proto, off = pkt[off], off + hlen
            elif proto == _V6_FRAG:
                if total - off < 8:
                    return _noflow("truncated IPv6 fragment header", True, 6, proto, src, dst)
                if int.from_bytes(pkt[off + 2:off + 4], "big") & 0xFFF9:  # offset or M flag
                    return _noflow("IPv6 fragment", False, 6, pkt[off], src, dst)
                proto, off = pkt[off], off + 8
            else:
                break
        if off > total:
            return _noflow("IPv6 extension headers run past the packet", True, 6, proto, src, dst)
        ports = _ports(pkt, off, total, proto, True)
        family = 6
    else:
        return _noflow(f"not IP (version {version})")
    if isinstance(ports, str):
        return _noflow(ports, ports != "unsupported protocol", family, proto, src, dst)
    sport, dport = ports
    key = make_key_packed(src16, sport, dst16, dport, proto, family)
    return Parsed(True, key, hash_key(key), family, proto, src, dst, sport, dport, False, "")
