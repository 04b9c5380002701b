"""Elastic Pico Chords (paper §5): replicas on a consistent-hashing ring with virtual nodes.

A point on the ring (a steering bucket, below) belongs to the first virtual node at or after it
clockwise: that vnode's replica is the point's PRIMARY. Its BACKUP is the replica of the next
vnode clockwise that belongs to a different replica. So when a replica leaves the ring, every
point it owned falls to the next vnode of a different replica, which is exactly the point's
backup: the replica that already holds the standby state takes the flows over, and no state
moves at failover. Points the leaving replica did not own keep their primary.

Pure: no sockets, no clock. Positions are 64-bit values of a keyed BLAKE2b, stable across
processes and Python versions (never Python's hash()).
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from typing import Iterable


def position(label: str) -> int:
    """A stable 64-bit ring position for a label."""
    return int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8,
                                          person=b"pico-ring").digest(), "big")


@dataclass(frozen=True)
class Placement:
    primary: str
    backup: str | None  # None when the ring holds a single replica


class Ring:
    def __init__(self, replicas: Iterable[str], vnodes: int = 16):
        if vnodes < 1:
            raise ValueError("vnodes must be >= 1")
        self.vnodes = vnodes
        self.replicas = tuple(sorted(set(replicas)))
        if not self.replicas:
            raise ValueError("a ring needs at least one replica")
        points = sorted((position(f"{r}#{i}"), r) for r in self.replicas for i in range(vnodes))
        self._pos = [p for p, _ in points]
        self._owner = [r for _, r in points]

    def place(self, point: int) -> Placement:
        """The primary and backup replicas of a ring position."""
        n = len(self._pos)
        i = bisect.bisect_left(self._pos, point) % n
        primary = self._owner[i]
        for k in range(1, n):
            other = self._owner[(i + k) % n]
            if other != primary:
                return Placement(primary, other)
        return Placement(primary, None)

    def without(self, replica: str) -> "Ring":
        return Ring([r for r in self.replicas if r != replica], self.vnodes)

    def with_replica(self, replica: str) -> "Ring":
        return Ring([*self.replicas, replica], self.vnodes)


def bucket_position(bucket: int) -> int:
    """Where steering bucket `bucket` sits on the ring."""
    return position(f"bucket{bucket}")


def placements(ring: Ring, n_buckets: int) -> list[Placement]:
    """Primary and backup of every steering bucket 0..n_buckets-1."""
    return [ring.place(bucket_position(b)) for b in range(n_buckets)]
