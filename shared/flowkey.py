"""Canonical bidirectional flow keys and the table hash (pico_abi.h, "Flow key" and "Hash").

A key is 40 bytes: addr_a[16] addr_b[16] port_a<u2 port_b<u2 proto family pad[2]. Both directions
of a connection produce the same bytes, so a connection is one flow. IPv4 addresses are stored
IPv4-mapped (::ffff:a.b.c.d) so one layout serves both families.
"""
from __future__ import annotations

import ipaddress
import struct

KEY_SIZE = 40
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
_KEY = struct.Struct("<16s16sHHBB2x")
_WORDS = struct.Struct("<5Q")
_M64 = (1 << 64) - 1


def _addr16(addr: bytes | str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[bytes, int]:
    if isinstance(addr, str):
        addr = ipaddress.ip_address(addr)
    if isinstance(addr, ipaddress.IPv4Address):
        return _V4_MAPPED + addr.packed, 4
    if isinstance(addr, ipaddress.IPv6Address):
        return addr.packed, 6
    if len(addr) == 4:
        return _V4_MAPPED + bytes(addr), 4
    if len(addr) == 16:
        return bytes(addr), 6
    raise ValueError(f"flow key: address must be 4 or 16 bytes, got {len(addr)}")


def make_key(src, sport: int, dst, dport: int, proto: int) -> bytes:
    """The canonical key of a packet from (src, sport) to (dst, dport).

    Addresses may be strings, ipaddress objects or packed bytes (4 or 16); both must be of
    the same family.
    """
    a, fam_a = _addr16(src)
    b, fam_b = _addr16(dst)
    if fam_a != fam_b:
        raise ValueError(f"flow key: mixed address families {fam_a} and {fam_b}")
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF and 0 <= proto <= 0xFF):
        raise ValueError(f"flow key: port or protocol out of range ({sport}, {dport}, {proto})")
    if (b, dport) < (a, sport):
        a, sport, b, dport = b, dport, a, sport
    return _KEY.pack(a, b, sport, dport, proto, fam_a)


def make_key_packed(src16: bytes, sport: int, dst16: bytes, dport: int, proto: int,
                    family: int) -> bytes:
    """Fast path for the packet parser: addresses already 16 bytes (IPv4-mapped for IPv4)."""
    if (dst16, dport) < (src16, sport):
        return _KEY.pack(dst16, src16, dport, sport, proto, family)
    return _KEY.pack(src16, dst16, sport, dport, proto, family)


def hash_key(key: bytes) -> int:
    """pico_hash_key: a 64-bit mix of the key's five little-endian words (same in C)."""
    h = 0x9E3779B97F4A7C15
    for w in _WORDS.unpack(key):
        h = ((h ^ w) * 0xFF51AFD7ED558CCD) & _M64
        h ^= h >> 33
    h ^= h >> 29
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    return h ^ (h >> 32)


def describe(key: bytes) -> str:
    """Human form, e.g. 'tcp 10.0.0.1:1234 <-> 10.0.0.2:80'."""
    a, b, pa, pb, proto, fam = _KEY.unpack(key)
    if fam == 4:
        sa, sb = str(ipaddress.IPv4Address(a[12:])), str(ipaddress.IPv4Address(b[12:]))
    else:
        sa, sb = f"[{ipaddress.IPv6Address(a)}]", f"[{ipaddress.IPv6Address(b)}]"
    pname = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp6"}.get(proto, f"proto{proto}")
    return f"{pname} {sa}:{pa} <-> {sb}:{pb}"


def parse_key_spec(spec: str) -> bytes:
    """Parse 'tcp 10.0.0.1:1234 10.0.0.2:80' (as used by CLIs and test tools)."""
    parts = spec.split()
    if len(parts) != 3:
        raise ValueError(f"flow spec {spec!r}: expected 'PROTO SRC:PORT DST:PORT'")
    protos = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58}
    proto = protos[parts[0]] if parts[0] in protos else int(parts[0])

    def endpoint(s: str) -> tuple[str, int]:
        host, _, port = s.rpartition(":")
        return host.strip("[]"), int(port)

    (sa, sp), (da, dp) = endpoint(parts[1]), endpoint(parts[2])
    return make_key(sa, sp, da, dp, proto)
