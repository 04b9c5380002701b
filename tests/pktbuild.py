"""Building test packets by hand (no scapy), with a reference checksum written as plainly as
RFC 1071 puts it, independent of pmm/checksum.py."""
from __future__ import annotations

import ipaddress
import struct


def ref_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _l4(proto: int, sport: int, dport: int, payload: bytes, icmp_type: int = 8) -> bytes:
    if proto == 6:
        return struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
    if proto == 17:
        return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    # ICMP / ICMPv6 echo: sport is the echo id
    return struct.pack("!BBHHH", icmp_type, 0, 0, sport, 1) + payload


_CSUM_AT = {6: 16, 17: 6, 1: 2, 58: 2}


def ipv4(src: str, dst: str, proto: int, sport: int = 0, dport: int = 0, payload: bytes = b"",
         icmp_type: int = 8, frag: int = 0) -> bytes:
    l4 = bytearray(_l4(proto, sport, dport, payload, icmp_type))
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    total = 20 + len(l4)
    at = _CSUM_AT[proto]
    pseudo = b"" if proto == 1 else s + d + bytes([0, proto]) + len(l4).to_bytes(2, "big")
    l4[at:at + 2] = ref_checksum(pseudo + bytes(l4)).to_bytes(2, "big")
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, frag, 64, proto, 0, s, d))
    hdr[10:12] = ref_checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + bytes(l4)


def ipv6(src: str, dst: str, proto: int, sport: int = 0, dport: int = 0, payload: bytes = b"",
         icmp_type: int = 128) -> bytes:
    l4 = bytearray(_l4(proto, sport, dport, payload, icmp_type))
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    at = _CSUM_AT[proto]
    pseudo = s + d + len(l4).to_bytes(4, "big") + bytes([0, 0, 0, proto])
    l4[at:at + 2] = ref_checksum(pseudo + bytes(l4)).to_bytes(2, "big")
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, s, d)
    return hdr + bytes(l4)


def checksums_ok(pkt: bytes) -> bool:
    """True if the IP header (v4) and L4 checksums verify."""
    if pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 15) * 4
        if ref_checksum(pkt[:ihl]) != 0:
            return False
        proto, l4, s, d = pkt[9], pkt[ihl:], pkt[12:16], pkt[16:20]
        pseudo = b"" if proto == 1 else s + d + bytes([0, proto]) + len(l4).to_bytes(2, "big")
    else:
        proto, l4 = pkt[6], pkt[40:]
        pseudo = pkt[8:40] + len(l4).to_bytes(4, "big") + bytes([0, 0, 0, proto])
    return ref_checksum(pseudo + l4) == 0


# The flows the packet tests use: web (tcp/80), dns (udp/53) and other (udp/9999, no policy).
def web(i: int, payload: bytes = b"x") -> bytes:
    return ipv4("10.0.0.1", "10.0.1.1", 6, 40000 + i, 80, payload)


def dns(i: int) -> bytes:
    return ipv4("10.0.0.1", "10.0.1.1", 17, 5000 + i, 53, b"q")


def other(i: int) -> bytes:
    return ipv4("10.0.0.1", "10.0.1.1", 17, 7000 + i, 9999, b"o")
