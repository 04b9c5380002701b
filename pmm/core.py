"""The PMM's decisions, free of NFQUEUE and sockets: what to queue where, what may leave.

Ingress.on_packet parses a packet, finds its flow's group (a cache, then the flow table, then
the policy for a new flow) and queues it on that group's input ring. Releaser.drain walks the
output rings in order and returns the verdicts that output commit allows: a buffered group's
packet leaves only when its epoch tag is <= the group's committed epoch. The shell
(pmm/server.py) carries the verdicts out.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from shared import abi
from shared.packets import PacketSegment

from .classify import Classifier
from .parse import parse

QUEUED, DROP_FULL, DROP_OVERSIZE = 0, 1, 2
ACCEPT, DROP, SEND = "accept", "drop", "send"
FLOW_CACHE_MAX = 1 << 16
from shared.words import word_views


class Verdict(NamedTuple):
    action: str          # ACCEPT (NFQUEUE accept, maybe with new bytes), DROP, SEND (raw socket)
    packet_id: int
    data: bytes | None   # the bytes to send or to set as payload (None: unchanged)
    group: int
    epoch: int           # the epoch tag it carried
    committed: int       # the group's committed epoch when it was released
    buffering: int


class CounterWords:
    """u64 counters of a shared record, each bumped in place by its single writer."""

    def __init__(self, buf, base: int, dtype):
        (self._w,) = word_views(buf, "Q")
        self._at = {name: (base + dtype.fields[name][1]) >> 3 for name in dtype.names}

    def add(self, name: str, n: int) -> None:
        at = self._at[name]
        self._w[at] = self._w[at] + n


class GroupIndex:
    """group id -> table index, refreshed when the table's generation changes."""

    def __init__(self, seg: PacketSegment):
        self.seg = seg
        self.generation = -1
        self.by_id: dict[int, int] = {}
        self.order: list[int] = []
        self.refresh()

    def refresh(self) -> bool:
        gen = self.seg.generation()
        if gen == self.generation:
            return False
        self.generation = gen
        self.by_id = self.seg.active_groups()
        self.order = sorted(self.by_id.values())
        return True


class Ingress:
    """From a raw packet to its group's input ring."""

    def __init__(self, seg: PacketSegment, classifier: Classifier,
                 flow_group: Callable[[bytes, int], int | None]):
        self.seg = seg
        self.classifier = classifier
        self.flow_group = flow_group  # key, hash -> group of an existing flow, or None
        self.index = GroupIndex(seg)
        self.cache: dict[bytes, int] = {}
        self.mtu = seg.g.mtu  # the configured MTU (a slot may hold a little more)
        self.counts = CounterWords(seg.segment.buf, abi.PKT_COUNTERS_OFFSET, abi.PKT_COUNTERS)

    def on_packet(self, packet_id: int, payload: bytes) -> int:
        """Queue the packet; QUEUED, or why it must be dropped now."""
        counts = self.counts
        counts.add("rx_packets", 1)
        counts.add("rx_bytes", len(payload))
        if len(payload) > self.mtu:
            counts.add("input_drops", 1)
            return DROP_OVERSIZE
        p = parse(payload)
        flags = abi.PKT_IPV6 if p.family == 6 else 0
        if not p.flow:
            flags |= abi.PKT_NOFLOW
            if p.malformed:
                counts.add("malformed", 1)
            group = abi.GROUP_DEFAULT
        else:
            if self.index.refresh():
                self.cache.clear()  # groups changed, or the RM moved flows between groups
            group = self.cache.get(p.key)
            if group is None:
                group = self.flow_group(p.key, p.flow_hash)
                if group is None:
                    group = self.classifier.group_of(p.proto, p.src, p.dst, p.sport, p.dport)
                    flags |= abi.PKT_NEW
                if len(self.cache) >= FLOW_CACHE_MAX:
                    self.cache.clear()  # an accelerator only: the flow table is the truth
                self.cache[p.key] = group
        self.index.refresh()
        index = self.index.by_id.get(group)
        if index is None:  # a group deleted under us: its flows fall back to the default
            group, index = abi.GROUP_DEFAULT, self.index.by_id[abi.GROUP_DEFAULT]
        if group == abi.GROUP_DEFAULT:
            counts.add("default_group", 1)
        row = self.seg.groups[index]
        if not self.seg.input_ring(index).push(payload, packet_id, flags, group, p.flow_hash, 0,
                                               index, p.key):
            counts.add("input_drops", 1)
            row["input_drops"] = int(row["input_drops"]) + 1
            return DROP_FULL
        row["rx_packets"] = int(row["rx_packets"]) + 1
        row["rx_bytes"] = int(row["rx_bytes"]) + len(payload)
        return QUEUED

    def forget(self, key: bytes) -> None:
        """A flow changed group (the RM moved it): look it up again next time."""
        self.cache.pop(key, None)


class Releaser:
    """Output commit: in-order release of each group's output ring, then the direct ring."""

    def __init__(self, seg: PacketSegment):
        self.seg = seg
        self.index = GroupIndex(seg)

    def drain(self, limit: int = 4096) -> list[Verdict]:
        self.index.refresh()
        out: list[Verdict] = []
        groups = self.seg.groups
        for i in self.index.order:
            row = groups[i]
            ring = self.seg.output_ring(i)
            buffering, committed = int(row["buffering"]), int(row["committed"])
            released = 0
            while len(out) < limit:
                meta = ring.peek()
                if meta is None:
                    break
                if buffering and meta.epoch > committed:
                    break  # held: everything behind it waits too (in order)
                meta, data = ring.pop()
                out.append(self._verdict(meta, data, buffering, committed))
                released += 1
            if released:
                row["released"] = int(row["released"]) + released
            row["held"] = len(ring)
        ring = self.seg.direct_ring
        while len(out) < limit:
            got = ring.pop()
            if got is None:
                break
            meta, data = got
            if meta.flags & abi.PKT_DROP:
                out.append(Verdict(DROP, meta.packet_id, None, meta.group, 0, 0, 0))
            else:
                out.append(self._verdict(meta, data, 0, 0))
        return out

    @staticmethod
    def _verdict(meta, data: bytes, buffering: int, committed: int) -> Verdict:
        if meta.flags & abi.PKT_CREATED or meta.packet_id == 0:
            return Verdict(SEND, 0, data, meta.group, meta.epoch, committed, buffering)
        changed = data if meta.flags & abi.PKT_MODIFIED else None
        return Verdict(ACCEPT, meta.packet_id, changed, meta.group, meta.epoch, committed,
                       buffering)
