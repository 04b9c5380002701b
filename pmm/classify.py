"""Classifying a new flow into a replication group by the config's policy rules: pure logic.

Rules match the first packet of a flow as it arrives (so `dport: 80` means "flows opened to
port 80"); the first matching rule wins; no match means the default, unprotected group.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from shared import abi
from shared.config import PROTOCOLS

_V4_MAPPED_BASE = 0xFFFF << 32


def _net(spec: str | None) -> tuple[int, int] | None:
    """(network, mask) over 128-bit addresses; IPv4 prefixes become IPv4-mapped ones."""
    if spec is None:
        return None
    net = ipaddress.ip_network(spec, strict=False)
    if net.version == 4:
        base = _V4_MAPPED_BASE | int(net.network_address)
        mask = ((1 << 128) - 1) ^ ((1 << (32 - net.prefixlen)) - 1)
    else:
        base = int(net.network_address)
        mask = ((1 << 128) - 1) ^ ((1 << (128 - net.prefixlen)) - 1)
    return base & mask, mask


def _ports(spec: int | str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    if isinstance(spec, int):
        return spec, spec
    lo, hi = spec.split("-")
    return int(lo), int(hi)


@dataclass(frozen=True)
class CompiledRule:
    group: int
    proto: int | None
    src: tuple[int, int] | None
    dst: tuple[int, int] | None
    sport: tuple[int, int] | None
    dport: tuple[int, int] | None

    def matches(self, proto: int, src: int, dst: int, sport: int, dport: int) -> bool:
        return ((self.proto is None or proto == self.proto)
                and (self.src is None or src & self.src[1] == self.src[0])
                and (self.dst is None or dst & self.dst[1] == self.dst[0])
                and (self.sport is None or self.sport[0] <= sport <= self.sport[1])
                and (self.dport is None or self.dport[0] <= dport <= self.dport[1]))


class Classifier:
    def __init__(self, config):
        ids = {name: g.id for name, g in config.groups.items()}
        ids["default"] = abi.GROUP_DEFAULT
        self.rules = [CompiledRule(ids[r.group],
                                   PROTOCOLS.get(r.proto, r.proto) if r.proto is not None else None,
                                   _net(r.src), _net(r.dst), _ports(r.sport), _ports(r.dport))
                      for r in config.policies]

    def group_of(self, proto: int, src: int, dst: int, sport: int, dport: int) -> int:
        for rule in self.rules:
            if rule.matches(proto, src, dst, sport, dport):
                return rule.group
        return abi.GROUP_DEFAULT
