"""The PMM's decisions, free of NFQUEUE and sockets: what to queue where, what may leave.

Ingress.on_packet parses a packet, finds its flow's group (a cache, then the flow table, then
the policy for a new flow) and queues it on that group's input ring. A packet of a flow that is
STANDBY in this replica's table (a failed replica's flow that the backup has not activated yet)
is held instead (StandbyHold) until the flow is activated, or dropped at the hold's deadline.
Releaser.drain walks the output rings in order and returns the verdicts that output commit
allows: a buffered group's packet leaves only when its epoch tag is <= the group's committed
epoch. The shell (pmm/server.py) carries the verdicts out.
"""
from __future__ import annotations

import math
import time
from collections import Counter, deque
from typing import Callable, NamedTuple

from shared import abi
from shared.packets import PacketSegment
from shared.words import word_views

from .classify import Classifier
from .parse import Parsed, parse, problem_kind

QUEUED, DROP_FULL, DROP_OVERSIZE, HELD, DROP_HOLD_FULL = 0, 1, 2, 3, 4
ACCEPT, DROP, SEND = "accept", "drop", "send"
FLOW_CACHE_MAX = 1 << 16
# What Ingress's flow_group callback answers for a flow that is STANDBY in this replica's flow
# table: its packets are held, not queued (the middlebox's get_flow(create=True) would raise
# FlowIsStandby on them).
FLOW_STANDBY = -1
# At most this many packets held at once, over all standby flows; a packet beyond it is dropped
# at once and counted in standby_drops. (The kernel's NFQUEUE, packets.queue_maxlen, holds them
# meanwhile: keep this well below it.)
STANDBY_HOLD_MAX = 4096


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


class Held(NamedTuple):
    """A packet waiting for its flow's activation."""
    packet_id: int
    payload: bytes
    parsed: Parsed
    since: float         # when it was held (the shell's monotonic clock, seconds)


class HoldActions(NamedTuple):
    queue: list[Held]    # the flow is no longer STANDBY: classify and queue these, in this order
    drop: list[Held]     # held past the deadline: drop these


class StandbyHold:
    """Packets of STANDBY flows, held per flow in arrival order. Pure: no clock, no table.

    add() holds a packet (False when the bound is reached: the caller drops it). poll(now,
    activated, still_standby) decides what happens to the held packets:
      - it asks still_standby(key, flow_hash) about every held flow, but only when `activated`
        (the flow segment's counter the SMM bumps on every ACTIVATE) differs from the value it
        saw last, and about a flow whose oldest packet reached its deadline;
      - a flow that is no longer STANDBY (activated, or its standby copy deleted) gives all its
        packets back, in arrival order, to be queued;
      - a flow still STANDBY loses the packets held for hold_s or more (dropped), and keeps the
        newer ones.
    While a flow has held packets, every new packet of that flow must be held behind them
    (`key in hold`), so no packet overtakes an older one of its flow.
    """

    def __init__(self, hold_s: float, limit: int = STANDBY_HOLD_MAX):
        if hold_s <= 0 or limit < 1:
            raise ValueError("hold_s must be > 0 and limit >= 1")
        self.hold_s = hold_s
        self.limit = limit
        self.flows: dict[bytes, deque[Held]] = {}
        self.count = 0
        self.seen: int | None = None  # `activated` at the last re-check
        self.next_due = math.inf      # the earliest deadline of a held packet

    def __len__(self) -> int:
        return self.count

    def __contains__(self, key: bytes) -> bool:
        return key in self.flows

    def add(self, key: bytes, held: Held) -> bool:
        """Hold one packet behind the others of its flow; False if the hold is full."""
        if self.count >= self.limit:
            return False
        q = self.flows.get(key)
        if q is None:
            q = self.flows[key] = deque()
        q.append(held)
        self.count += 1
        due = held.since + self.hold_s
        if due < self.next_due:
            self.next_due = due
        return True

    def poll(self, now: float, activated: int,
             still_standby: Callable[[bytes, int], bool]) -> HoldActions:
        """What to queue and what to drop now (see the class docstring)."""
        changed = activated != self.seen
        self.seen = activated
        if not self.count or (not changed and now < self.next_due):
            return HoldActions([], [])
        queue: list[Held] = []
        drop: list[Held] = []
        hold_s = self.hold_s  # a packet is due at since + hold_s (as next_due computes it)
        next_due = math.inf
        for key in list(self.flows):
            q = self.flows[key]
            if ((changed or q[0].since + hold_s <= now)
                    and not still_standby(key, q[0].parsed.flow_hash)):
                queue.extend(q)
                del self.flows[key]
                continue
            while q and q[0].since + hold_s <= now:
                drop.append(q.popleft())
            if q:
                next_due = min(next_due, q[0].since + hold_s)
            else:
                del self.flows[key]
        self.count -= len(queue) + len(drop)
        self.next_due = next_due
        return HoldActions(queue, drop)


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
    """From a raw packet to its group's input ring (or to the standby hold)."""

    def __init__(self, seg: PacketSegment, classifier: Classifier,
                 flow_group: Callable[[bytes, int], int | None],
                 hold: StandbyHold | None = None):
        self.seg = seg
        self.classifier = classifier
        # key, hash -> group of an existing flow, FLOW_STANDBY for a standby copy, or None
        self.flow_group = flow_group
        self.hold = hold if hold is not None else StandbyHold(0.5)
        self.index = GroupIndex(seg)
        self.cache: dict[bytes, int] = {}
        self.mtu = seg.g.mtu  # the configured MTU (a slot may hold a little more)
        self.counts = CounterWords(seg.segment.buf, abi.PKT_COUNTERS_OFFSET, abi.PKT_COUNTERS)
        # Packets no flow key could be derived from, by (problem kind, malformed): broken ones
        # (also in the segment's `malformed` counter) and merely unsupported ones (fragments,
        # other protocols). This process's own tally, exported as pico_pmm_noflow_packets.
        self.noflow: Counter = Counter()
        self.last_protected = False  # the last QUEUED packet's group is protected

    def on_packet(self, packet_id: int, payload: bytes, now: float | None = None) -> int:
        """Queue the packet; QUEUED, HELD (its flow is STANDBY here: the verdict waits), or why
        it must be dropped now. `now` (monotonic seconds) stamps a held packet."""
        counts = self.counts
        counts.add("rx_packets", 1)
        counts.add("rx_bytes", len(payload))
        if len(payload) > self.mtu:
            counts.add("input_drops", 1)
            return DROP_OVERSIZE
        return self._route(packet_id, payload, parse(payload),
                           time.monotonic() if now is None else now, True)

    def poll_hold(self, now: float, activated: int) -> HoldActions:
        """The hold's decisions now (StandbyHold.poll); counts the drops. The caller queues
        `queue` with requeue(), in order, and gives `drop` their drop verdicts."""
        if not self.hold.count:
            self.hold.seen = activated
            return HoldActions([], [])
        actions = self.hold.poll(now, activated, self._still_standby)
        if actions.drop:
            self.counts.add("standby_drops", len(actions.drop))
        return actions

    def requeue(self, held: Held, now: float) -> int:
        """Queue a packet the hold gave back: QUEUED, HELD again (standby once more), or a drop
        reason. It was counted in rx_packets when it arrived."""
        return self._route(held.packet_id, held.payload, held.parsed, now, False)

    def _still_standby(self, key: bytes, h: int) -> bool:
        return self.flow_group(key, h) == FLOW_STANDBY

    def _hold(self, packet_id: int, payload: bytes, p: Parsed, now: float, first: bool) -> int:
        if not self.hold.add(p.key, Held(packet_id, payload, p, now)):
            self.counts.add("standby_drops", 1)
            return DROP_HOLD_FULL
        if first:
            self.counts.add("standby_held", 1)
        return HELD

    def _route(self, packet_id: int, payload: bytes, p: Parsed, now: float, first: bool) -> int:
        counts = self.counts
        flags = abi.PKT_IPV6 if p.family == 6 else 0
        if not p.flow:
            flags |= abi.PKT_NOFLOW
            if first:
                if p.malformed:
                    counts.add("malformed", 1)
                self.noflow[(problem_kind(p.problem), p.malformed)] += 1
            group = abi.GROUP_DEFAULT
        else:
            if self.hold.count and p.key in self.hold:
                # Older packets of this flow are held: this one waits behind them.
                return self._hold(packet_id, payload, p, now, first)
            if self.index.refresh():
                self.cache.clear()  # groups changed, or the RM moved flows between groups
            group = self.cache.get(p.key)
            if group is None:
                group = self.flow_group(p.key, p.flow_hash)
                if group == FLOW_STANDBY:
                    # Not cached: its group is known once the SMM activates it.
                    return self._hold(packet_id, payload, p, now, first)
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
        # (the shell wakes a sleeping RM only for a group it checkpoints: pico_abi.h, .rm)
        self.last_protected = bool(row["protected_"])
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
