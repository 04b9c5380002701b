"""Single-producer single-consumer packet rings over a buffer (pico_abi.h, "Rings").

Free-running u64 counters: the producer owns `tail` (and `full_drops`), the consumer owns
`head`; each sits on its own cache line. The producer writes the packet bytes, then the meta,
then publishes tail + 1; the consumer copies a slot out, then publishes head + 1. No locks.
"""
from __future__ import annotations

import struct
import time
from typing import NamedTuple

from . import abi

# pico_pkt_meta: len flags packet_id group flow_hash epoch ts_ns group_index rsvd key[40] rsvd[40]
META = struct.Struct("IIIIQQQII40s40x")  # native: see shared/words.py
assert META.size == abi.PKT_META_SIZE
from .words import word_views
_TAIL, _DROPS, _HEAD = 0, 8, 64


class Meta(NamedTuple):
    len: int
    flags: int
    packet_id: int
    group: int
    flow_hash: int
    epoch: int
    ts_ns: int
    group_index: int
    key: bytes


class Ring:
    """One ring at `offset` in `buf`. Use it from exactly one producer and one consumer."""

    __slots__ = ("_buf", "_off", "_mask", "slots", "slot_size", "_data_max", "_first", "_w",
                 "_tail", "_head", "_drops")

    def __init__(self, buf: memoryview, offset: int, slots: int, slot_size: int):
        if slots & (slots - 1):
            raise ValueError(f"ring capacity {slots} is not a power of two")
        self._buf = buf
        self._off = offset
        self.slots = slots
        self._mask = slots - 1
        self.slot_size = slot_size
        self._data_max = slot_size - abi.PKT_META_SIZE
        self._first = offset + abi.RING_HEADER_SIZE
        # The counters as u64 words (whole loads and stores, shared/words.py).
        (self._w,) = word_views(buf, "Q")
        self._tail, self._drops, self._head = (offset + _TAIL) >> 3, (offset + _DROPS) >> 3, \
            (offset + _HEAD) >> 3

    # ------------------------------------------------------------------ both sides
    def __len__(self) -> int:
        # Head first: it never passes tail, and tail only grows, so an observer that is neither
        # producer nor consumer never sees a negative length.
        head = self._w[self._head]
        n = self._w[self._tail] - head
        if n < 0:
            raise RuntimeError(f"ring at {self._off}: tail {head + n} behind head {head} "
                               f"(tail now {self._w[self._tail]}): two "
                               "producers or two consumers on one ring")
        return n

    @property
    def full_drops(self) -> int:
        return self._w[self._drops]

    # ------------------------------------------------------------------ producer
    def push(self, data, packet_id: int, flags: int, group: int, flow_hash: int, epoch: int,
             group_index: int, key: bytes, ts_ns: int | None = None) -> bool:
        """Append one packet; False (and full_drops += 1) if the ring is full."""
        buf, w = self._buf, self._w
        n = len(data)
        if n > self._data_max:
            raise ValueError(f"packet of {n} bytes exceeds the ring's MTU {self._data_max}")
        tail = w[self._tail]
        if tail - w[self._head] >= self.slots:
            w[self._drops] = w[self._drops] + 1
            return False
        slot = self._first + (tail & self._mask) * self.slot_size
        buf[slot + abi.PKT_META_SIZE:slot + abi.PKT_META_SIZE + n] = data
        META.pack_into(buf, slot, n, flags, packet_id, group, flow_hash, epoch,
                       time.monotonic_ns() if ts_ns is None else ts_ns, group_index, 0, key)
        w[self._tail] = tail + 1  # publish last
        return True

    # ------------------------------------------------------------------ consumer
    def peek(self) -> Meta | None:
        """The meta of the oldest packet, without consuming it (None if empty)."""
        buf, w = self._buf, self._w
        head = w[self._head]
        if head == w[self._tail]:
            return None
        m = META.unpack_from(buf, self._first + (head & self._mask) * self.slot_size)
        return Meta(*m[:8], m[9])

    def metas(self) -> list[Meta]:
        """The metas of every queued packet, oldest first (a consistent view is not promised:
        the producer may add and the consumer take while we read)."""
        buf, w = self._buf, self._w
        head = w[self._head]
        tail = w[self._tail]
        out = []
        for c in range(head, min(tail, head + self.slots)):
            m = META.unpack_from(buf, self._first + (c & self._mask) * self.slot_size)
            out.append(Meta(*m[:8], m[9]))
        return out

    def pop(self) -> tuple[Meta, bytes] | None:
        """Copy the oldest packet out and consume it (None if empty)."""
        buf, w = self._buf, self._w
        head = w[self._head]
        if head == w[self._tail]:
            return None
        slot = self._first + (head & self._mask) * self.slot_size
        m = META.unpack_from(buf, slot)
        start = slot + abi.PKT_META_SIZE
        data = bytes(buf[start:start + min(m[0], self._data_max)])
        w[self._head] = head + 1  # publish last
        return Meta(*m[:8], m[9]), data

    def skip_all(self) -> int:
        """Consume everything queued (a consumer taking over from a dead one); how many."""
        w = self._w
        tail = w[self._tail]
        n = tail - w[self._head]
        w[self._head] = tail
        return n
