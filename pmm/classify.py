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
    """Policies first; then, under chords placement, the flow's bucket; else the default.
    `membership()` returns the packet segment's alive_mask (0: no view yet, all alive)."""

    def __init__(self, config, replica: str | None = None, membership=None):
        self.chords = (ChordsPlacer(config, replica) if replica and config.sdn is not None
                       and config.sdn.placement == "chords" else None)
        self.membership = membership or (lambda: 0)
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
        if self.chords is not None:
            g = self.chords.group_of(src, dst, self.membership())
            if g is not None:
                return g
        return abi.GROUP_DEFAULT


class ChordsPlacer:
    """Elastic Pico Chords (sdn.placement: chords): a new flow joins the group `to-<backup>` of
    its bucket's backup replica, on the ring of the replicas alive in the current view (the RM
    writes it into the packet segment for the controller). The bucket is the low bits of the
    client's address: the end of the flow inside sdn.client_subnet (IPv4). Pure."""

    def __init__(self, config, replica: str):
        from sdn.ring import Ring, bucket_position
        sdn = config.sdn
        self._ring_cls, self._bucket_position = Ring, bucket_position
        self.me = replica
        self.buckets, self.vnodes = sdn.buckets, sdn.vnodes
        self.subnet = _net(sdn.client_subnet)
        self.names = {r.id: name for name, r in config.replicas.items()}
        # before any view: the configured members (default: every replica)
        members = set(sdn.members or config.replicas)
        self.default_mask = sum(1 << (r.id - 1) for n, r in config.replicas.items()
                                if n in members)
        self.group_ids = {name: sdn.CHORD_GROUP_BASE + r.id for name, r in config.replicas.items()}
        self._table: tuple[int, list[int | None]] | None = None

    def _ring(self, alive_mask: int):
        mask = alive_mask or self.default_mask
        alive = [n for rid, n in self.names.items() if mask >> (rid - 1) & 1]
        if self.me not in alive:
            alive.append(self.me)  # we are alive, whatever an old view says
        return self._ring_cls(alive, self.vnodes)

    def primary(self, src: int, dst: int, alive_mask: int) -> str | None:
        """The replica the switch steers this flow's bucket to (None: not a client flow)."""
        client = self._client(src, dst)
        if client is None:
            return None
        return self._ring(alive_mask).place(
            self._bucket_position(client & (self.buckets - 1))).primary

    def _client(self, src: int, dst: int) -> int | None:
        if self.subnet is None:
            return None
        base, mask = self.subnet
        return src if src & mask == base else dst if dst & mask == base else None

    def _groups(self, alive_mask: int) -> list[int | None]:
        ring = self._ring(alive_mask)
        out = []
        for b in range(self.buckets):
            pl = ring.place(self._bucket_position(b))
            backup = pl.backup if pl.primary == self.me else (
                pl.primary if pl.primary != self.me else pl.backup)
            out.append(self.group_ids[backup] if backup else None)
        return out

    def group_of(self, src: int, dst: int, alive_mask: int) -> int | None:
        """The group of a new flow from src to dst (128-bit, IPv4-mapped), or None: not a
        client flow of this cluster (let the policies decide)."""
        client = self._client(src, dst)
        if client is None:
            return None
        if self._table is None or self._table[0] != alive_mask:
            self._table = (alive_mask, self._groups(alive_mask))
        return self._table[1][client & (self.buckets - 1)]
