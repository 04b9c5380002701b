"""Internet checksums for packets the middlebox rewrote (the kernel does not fix them after an
NFQUEUE payload change). Sums run over memoryview casts, in C, not Python loops.

RFC 1071's byte-order independence lets us sum native (little-endian) 16-bit words and swap
the folded result once.
"""
from __future__ import annotations

import sys

_LITTLE = sys.byteorder == "little"


def _sum16(data: bytes | bytearray | memoryview) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\0"
    return sum(memoryview(data).cast("H"))


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    csum = ~total & 0xFFFF
    if _LITTLE:
        csum = ((csum & 0xFF) << 8) | (csum >> 8)
    return csum  # in network order, ready for int.to_bytes(2, "big")


def internet_checksum(data) -> int:
    return _fold(_sum16(data))


def fix_checksums(pkt: bytes) -> bytes:
    """Recompute the IPv4 header checksum and the TCP/UDP/ICMP(v6) checksum of one packet.

    Packets that are not plain, unfragmented IPv4/IPv6 TCP/UDP/ICMP are returned unchanged
    apart from the IPv4 header checksum. Never raises: a broken packet (IHL under 20 or past
    the end, a total length shorter than the header) is returned unchanged.
    """
    b = bytearray(pkt)
    version = b[0] >> 4 if b else 0
    if version == 4 and len(b) >= 20:
        ihl = (b[0] & 0x0F) * 4
        total = min(int.from_bytes(b[2:4], "big"), len(b))
        if ihl < 20 or total < ihl:  # (fuzzing: total - ihl went negative and raised)
            return bytes(b)
        b[10:12] = b"\0\0"
        b[10:12] = internet_checksum(b[:ihl]).to_bytes(2, "big")
        if int.from_bytes(b[6:8], "big") & 0x3FFF:
            return bytes(b)  # a fragment: the L4 checksum spans other fragments
        proto, l4 = b[9], ihl
        pseudo = b[12:20] + bytes([0, proto]) + (total - ihl).to_bytes(2, "big")
        end = total
    elif version == 6 and len(b) >= 40:
        proto, l4 = b[6], 40
        end = min(40 + int.from_bytes(b[4:6], "big"), len(b))
        pseudo = b[8:40] + (end - 40).to_bytes(4, "big") + bytes([0, 0, 0, proto])
    else:
        return bytes(b)
    offsets = {6: 16, 17: 6, 1: 2, 58: 2}
    if proto not in offsets or end - l4 < offsets[proto] + 2:
        return bytes(b)
    at = l4 + offsets[proto]
    if proto == 17 and version == 4 and b[at:at + 2] == b"\0\0":
        return bytes(b)  # UDP over IPv4 without a checksum stays without one
    b[at:at + 2] = b"\0\0"
    segment = b[l4:end]
    total_sum = _sum16(segment) + (0 if proto == 1 else _sum16(pseudo))
    csum = _fold(total_sum)
    if proto == 17 and csum == 0:
        csum = 0xFFFF
    b[at:at + 2] = csum.to_bytes(2, "big")
    return bytes(b)
