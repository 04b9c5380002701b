"""The flow-state hash table over a buffer laid out as pico_abi.h's flow segment.

FlowTable works on any writable buffer (a real shared-memory mapping, or a bytearray in unit
tests) and any lock object with acquire(k)/release(k); it holds no process state beyond that, so
the same code runs in the middlebox binding, the SMM and the tests. The hot path (get/put) uses
struct on the buffer at offsets taken from the numpy dtypes; whole-table scans use numpy views.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from . import abi
from .errors import FlowIsStandby, NoTransaction, TableFull
from .flowkey import KEY_SIZE, describe, hash_key

from .words import word_views

_F = {name: off for name, (_, off) in abi.SLOT_HEADER_DTYPE.fields.items()}
_OFF_STATUS, _OFF_OWNER, _OFF_GROUP = _F["status"], _F["owner"], _F["group"]
_OFF_REF, _OFF_VERSION, _OFF_EPOCH = _F["refcount"], _F["version"], _F["ckpt_epoch"]
_OFF_MOD, _OFF_TXN, _OFF_HASH = _F["modified"], _F["txn_pid"], _F["hash"]
_STRIPE_LIVE, _STRIPE_TOMB = abi.STRIPE.fields["live"][1], abi.STRIPE.fields["tombstones"][1]
_STRIPE_DIRTY = abi.STRIPE.fields["dirty"][1]
DIRTY_BLOCKS = 16  # PICO_DIRTY_BLOCKS: hint bytes per run

FREE, ACTIVE, STANDBY, TOMBSTONE = (abi.STATUS_FREE, abi.STATUS_ACTIVE, abi.STATUS_STANDBY,
                                    abi.STATUS_TOMBSTONE)


@dataclass(frozen=True)
class Geometry:
    """Sizes and offsets of one flow segment (the pico_flow_desc fields that matter)."""
    n_slots: int
    n_stripes: int
    slots_per_stripe: int
    max_per_stripe: int
    state_size: int
    slot_size: int
    capacity: int
    stripes_offset: int
    slots_offset: int
    clients_offset: int
    segment_size: int

    @classmethod
    def plan(cls, capacity: int, state_size: int, n_stripes: int) -> "Geometry":
        """The layout for a table of `capacity` flows: 4/3 headroom, runs of >= 16 slots."""
        n_slots = 1
        while n_slots < max(-(-capacity * 4 // 3), n_stripes * 16):
            n_slots <<= 1
        sps = n_slots // n_stripes
        lay = abi.flow_layout(n_slots, n_stripes, state_size)
        # A run may fill to 7/8: probe walks stay short and a FREE slot always ends them.
        return cls(n_slots, n_stripes, sps, sps - sps // 8, state_size, lay["slot_size"],
                   capacity, lay["stripes_offset"], lay["slots_offset"],
                   lay["clients_offset"], lay["segment_size"])

    @classmethod
    def from_desc(cls, desc: np.ndarray, segment_size: int) -> "Geometry":
        d = {name: int(desc[name]) for name in ("n_slots", "n_stripes", "slots_per_stripe",
                                                 "max_per_stripe", "state_size", "slot_size",
                                                 "capacity", "stripes_offset", "slots_offset",
                                                 "clients_offset")}
        return cls(segment_size=segment_size, **d)

    def check(self, where: str) -> None:
        """Raise SegmentCorrupt if these numbers cannot describe a real table."""
        from .errors import SegmentCorrupt
        pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
        problems = []
        if not pow2(self.n_stripes) or not pow2(self.slots_per_stripe):
            problems.append("stripes and slots per stripe must be powers of two")
        if self.n_stripes * self.slots_per_stripe != self.n_slots:
            problems.append("n_stripes * slots_per_stripe != n_slots")
        if self.slot_size != abi.slot_size(self.state_size):
            problems.append(f"slot_size {self.slot_size} != {abi.slot_size(self.state_size)}")
        if self.slots_offset + self.n_slots * self.slot_size > self.segment_size:
            problems.append("slots run past the end of the segment")
        if not 0 < self.max_per_stripe <= self.slots_per_stripe:
            problems.append("max_per_stripe out of range")
        if not problems:  # the offsets must be pico_abi.h's layout (fuzzing: a wild offset
            lay = abi.flow_layout(self.n_slots, self.n_stripes, self.state_size)  # crashed
            for name in ("clients_offset", "stripes_offset", "slots_offset"):     # numpy)
                if getattr(self, name) != lay[name]:
                    problems.append(f"{name} {getattr(self, name)} != {lay[name]}")
        if problems:
            raise SegmentCorrupt(f"flow segment {where}: " + "; ".join(problems) +
                                 ": restart its SMM to rebuild it")


def write_desc(desc: np.ndarray, g: Geometry, sem_prefix: str, lock_timeout_ms: int) -> None:
    """Fill a pico_flow_desc record (the SMM, before publishing the segment)."""
    for name in ("n_slots", "capacity", "slot_size", "state_size", "n_stripes",
                 "slots_per_stripe", "max_per_stripe", "clients_offset", "stripes_offset",
                 "slots_offset"):
        desc[name] = getattr(g, name)
    desc["lock_timeout_ms"] = lock_timeout_ms
    desc["sem_prefix"] = sem_prefix.encode()


class FlowTable:
    """Insert, look up, delete flows; the middlebox transactions; SMM standby operations."""

    def __init__(self, buf, geometry: Geometry, locks, replica_id: int):
        self.g = geometry
        self.locks = locks
        self.replica_id = replica_id
        self._buf = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
        # Shared words through typed views: whole-word loads and stores (shared/words.py).
        self._w16, self._w32, self._wi32, self._w64 = word_views(self._buf, "HIiQ")
        self._pid = os.getpid()
        self._local = threading.local()
        self._stripe_mask = geometry.n_stripes - 1
        self._run_mask = geometry.slots_per_stripe - 1
        # Plain ints for the hot path (attribute chains cost more than the arithmetic).
        self._sps = geometry.slots_per_stripe
        self._slots_off = geometry.slots_offset
        self._slot_size = geometry.slot_size
        self._state_size = geometry.state_size
        self.slots = np.ndarray((geometry.n_slots,), dtype=abi.slot_dtype(geometry.state_size),
                                buffer=self._buf, offset=geometry.slots_offset)
        self.stripes = np.ndarray((geometry.n_stripes,), dtype=abi.STRIPE, buffer=self._buf,
                                  offset=geometry.stripes_offset)

    # ------------------------------------------------------------------ probing (lock held)
    def _slot_off(self, idx: int) -> int:
        return self.g.slots_offset + idx * self.g.slot_size

    def _walk(self, key: bytes, h: int) -> tuple[int, int, int]:
        """(match index or -1, its status, first reusable index or -1), stripe lock held.

        A key has at most one slot: a TOMBSTONE with the same key is its match, and an insert
        reuses exactly that slot, so an upsert never coexists with a pending delete. The cached
        hash is compared before the key bytes: most mismatches cost one 8-byte load.
        """
        buf, sps, mask = self._buf, self._sps, self._run_mask
        base = (h & self._stripe_mask) * sps
        home = (h >> 32) & mask
        slots_off, slot_size = self._slots_off, self._slot_size
        w32, w64 = self._w32, self._w64
        reuse = -1
        for i in range(sps):
            idx = base + ((home + i) & mask)
            off = slots_off + idx * slot_size
            status = w32[(off + _OFF_STATUS) >> 2]
            if status == FREE:
                return -1, FREE, (reuse if reuse >= 0 else idx)
            if w64[(off + _OFF_HASH) >> 3] == h and buf[off:off + KEY_SIZE] == key:
                return idx, status, idx
            if (status == TOMBSTONE and reuse < 0 and
                    (w32[(off + _OFF_MOD) >> 2] == 0 or
                     w32[(off + _OFF_GROUP) >> 2] == abi.GROUP_DEFAULT)):
                reuse = idx
        return -1, FREE, reuse

    def _stripe_add(self, stripe: int, live: int, tomb: int) -> None:
        off = self.g.stripes_offset + stripe * 64
        if live:
            self._w32[(off + _STRIPE_LIVE) >> 2] = self._w32[(off + _STRIPE_LIVE) >> 2] + live
        if tomb:
            self._w32[(off + _STRIPE_TOMB) >> 2] = self._w32[(off + _STRIPE_TOMB) >> 2] + tomb

    def _mark_dirty(self, off: int) -> None:
        """The RM's hint that the slot at `off` is modified (after modified is stored)."""
        idx = (off - self.g.slots_offset) // self.g.slot_size
        sps = self.g.slots_per_stripe
        block = (idx & (sps - 1)) * DIRTY_BLOCKS // sps
        self._buf[self.g.stripes_offset + (idx // sps) * 64 + _STRIPE_DIRTY + block] = 1

    def _claim(self, key: bytes, h: int, idx: int, status: int, group: int, owner: int) -> int:
        """Fill slot idx for key (stripe lock held) and publish its status last."""
        stripe = h & self._stripe_mask
        if self.stripes[stripe]["live"] >= self.g.max_per_stripe:
            raise TableFull(f"flow table stripe {stripe} is full ({self.g.max_per_stripe} "
                            f"flows; table capacity {self.g.capacity}) while adding "
                            f"{describe(key)}: raise flow_table.capacity in the config")
        off = self._slot_off(idx)
        buf = self._buf
        old_status = self._w32[(off + _OFF_STATUS) >> 2]  # FREE, or a reused TOMBSTONE
        buf[off:off + KEY_SIZE] = key
        self._w16[(off + _OFF_OWNER) >> 1] = owner
        self._w32[(off + _OFF_GROUP) >> 2] = group
        self._w32[(off + _OFF_REF) >> 2] = 0
        self._w64[(off + _OFF_VERSION) >> 3] = 0
        self._w64[(off + _OFF_EPOCH) >> 3] = 0
        self._w32[(off + _OFF_MOD) >> 2] = 1
        self._wi32[(off + _OFF_TXN) >> 2] = 0
        self._w64[(off + _OFF_HASH) >> 3] = h
        state = off + abi.SLOT_HEADER
        buf[state:state + self.g.state_size] = bytes(self.g.state_size)
        self._w32[(off + _OFF_STATUS) >> 2] = status  # publish last
        if status == ACTIVE:
            self._mark_dirty(off)
        self._stripe_add(stripe, 1, -1 if old_status == TOMBSTONE else 0)
        return off

    def _no_room(self, key: bytes, h: int) -> TableFull:
        stripe = h & self._stripe_mask
        return TableFull(f"flow table stripe {stripe} has no reusable slot for {describe(key)} "
                         "(live flows and pending deletes fill it): the RM must checkpoint the "
                         "deletes, or raise flow_table.capacity")

    # ------------------------------------------------------------------ middlebox API
    # A transaction holds its flow's stripe from get_flow to put_flow (or del_flow), so two
    # processes or threads updating the same flow serialise and no update is lost. Stripes are
    # re-entrant per thread: a thread may hold several flows, even of one stripe, at once.
    def _txns(self) -> dict:
        t = self._local.__dict__.get("open")
        if t is None:
            t = self._local.open = {}
            self._local.held = {}
        return t

    def _hold(self, stripe: int) -> None:
        held = self._local.__dict__.get("held")
        if held is None:
            self._txns()
            held = self._local.held
        n = held.get(stripe, 0)
        if n == 0:
            self.locks.acquire(stripe)
        held[stripe] = n + 1

    def _unhold(self, stripe: int) -> None:
        held = self._local.held
        n = held[stripe] - 1
        if n:
            held[stripe] = n
        else:
            del held[stripe]
            self.locks.release(stripe)

    def get_flow(self, key: bytes, create: bool = False, group: int = abi.GROUP_DEFAULT,
                 h: int | None = None) -> memoryview | None:
        """Begin a transaction on key's ACTIVE flow: a writable view of its state, or None.

        The flow stays locked until put_flow(key) or del_flow(key). STANDBY flows are invisible
        (None); create=True on one raises FlowIsStandby. With create=True an absent flow is
        inserted (state zeroed) in `group`.
        """
        txns = self._txns()
        if h is None:
            h = hash_key(key)
        stripe = h & self._stripe_mask
        buf = self._buf
        self._hold(stripe)
        try:
            idx, status, reuse = self._walk(key, h)
            if status == ACTIVE:
                off = self._slot_off(idx)
            elif status == STANDBY:
                if create:
                    raise FlowIsStandby(f"{describe(key)} is a standby copy on replica "
                                        f"{self.replica_id}: activate it (SMM activate) before "
                                        "processing its packets")
                self._unhold(stripe)
                return None
            elif not create:
                self._unhold(stripe)
                return None
            elif reuse < 0:
                raise self._no_room(key, h)
            else:
                off = self._claim(key, h, reuse, ACTIVE, group, self.replica_id)
        except BaseException:
            self._unhold(stripe)
            raise
        self._w32[(off + _OFF_REF) >> 2] = self._w32[(off + _OFF_REF) >> 2] + 1
        self._wi32[(off + _OFF_TXN) >> 2] = self._pid
        txn = txns.get(key)
        if txn is None:
            txns[key] = [stripe, off, 1]
        else:
            txn[2] += 1
        state = off + abi.SLOT_HEADER
        return buf[state:state + self.g.state_size]

    def _end(self, key: bytes) -> tuple[int, int]:
        txns = self._txns()
        txn = txns.get(key)
        if txn is None:
            raise NoTransaction(f"no open transaction on {describe(key)} in this thread: call "
                                "get_flow(key) first, and end it once")
        stripe, off, depth = txn
        if depth == 1:
            del txns[key]
        else:
            txn[2] = depth - 1
        return stripe, off

    def put_flow(self, key: bytes, modified: bool = True) -> bool:
        """End the transaction get_flow opened; modified=True marks the flow for the next
        checkpoint. False if the flow vanished meanwhile (deleted in a nested transaction)."""
        stripe, off = self._end(key)
        try:
            if self._w32[(off + _OFF_STATUS) >> 2] != ACTIVE:
                return False
            if modified:
                self._w32[(off + _OFF_MOD) >> 2] = 1
                self._w64[(off + _OFF_VERSION) >> 3] = self._w64[(off + _OFF_VERSION) >> 3] + 1
                self._mark_dirty(off)
            # refcount falls last: an RM that sees 0 also sees modified (pico_abi.h)
            ref = self._w32[(off + _OFF_REF) >> 2]
            if ref:
                self._w32[(off + _OFF_REF) >> 2] = ref - 1
            return True
        finally:
            self._unhold(stripe)

    def del_flow(self, key: bytes, h: int | None = None) -> bool:
        """Delete an ACTIVE flow (ending this thread's transaction on it, if one is open).

        It stays a TOMBSTONE until its delete is checkpointed. False if it was not active.
        """
        txns = self._txns()
        if key in txns:
            stripe, off = self._end(key)
            try:
                if self._w32[(off + _OFF_STATUS) >> 2] != ACTIVE:
                    return False
                self._tombstone(off, stripe)
                return True
            finally:
                self._unhold(stripe)
        if h is None:
            h = hash_key(key)
        stripe = h & self._stripe_mask
        self._hold(stripe)
        try:
            idx, status, _ = self._walk(key, h)
            if status != ACTIVE:
                return False
            self._tombstone(self._slot_off(idx), stripe)
            return True
        finally:
            self._unhold(stripe)

    def _tombstone(self, off: int, stripe: int) -> None:
        # modified before status, refcount last: an RM never sees a finished, unmarked delete
        self._w32[(off + _OFF_MOD) >> 2] = 1
        self._w64[(off + _OFF_VERSION) >> 3] = self._w64[(off + _OFF_VERSION) >> 3] + 1
        self._mark_dirty(off)
        self._w32[(off + _OFF_STATUS) >> 2] = TOMBSTONE
        self._w32[(off + _OFF_REF) >> 2] = 0
        self._stripe_add(stripe, -1, 1)

    def set_group(self, key: bytes, group: int) -> int | None:
        """Move an ACTIVE flow to another group (the RM, with both groups quiescent); it is
        marked modified so the new group's next checkpoint carries it. Its old group, or
        None if the flow is not active here."""
        h = hash_key(key)
        stripe = h & self._stripe_mask
        self._hold(stripe)
        try:
            idx, status, _ = self._walk(key, h)
            if status != ACTIVE:
                return None
            off = self._slot_off(idx)
            old = self._w32[(off + _OFF_GROUP) >> 2]
            self._w32[(off + _OFF_GROUP) >> 2] = group
            self._w32[(off + _OFF_MOD) >> 2] = 1
            self._w64[(off + _OFF_VERSION) >> 3] = self._w64[(off + _OFF_VERSION) >> 3] + 1
            self._mark_dirty(off)
            return old
        finally:
            self._unhold(stripe)

    def release_tombstones(self, group: int, to_group: int) -> int:
        """Pending deletes of a group that is going away become reusable (they join
        `to_group`, the default group, whose deletes are never sent); each under its stripe."""
        n = 0
        sps = self.g.slots_per_stripe
        s = self.slots
        for idx in np.flatnonzero((s["group"] == group) & (s["status"] == TOMBSTONE)):
            stripe = int(idx) // sps
            self._hold(stripe)
            try:
                off = self._slot_off(int(idx))
                if (self._w32[(off + _OFF_STATUS) >> 2] == TOMBSTONE and
                        self._w32[(off + _OFF_GROUP) >> 2] == group):
                    self._w32[(off + _OFF_GROUP) >> 2] = to_group
                    n += 1
            finally:
                self._unhold(stripe)
        return n

    def lookup(self, key: bytes) -> tuple[int, int]:
        """(slot index, status) of key, or (-1, FREE); no transaction is counted."""
        h = hash_key(key)
        stripe = h & self._stripe_mask
        self._hold(stripe)
        try:
            idx, status, _ = self._walk(key, h)
            return idx, status
        finally:
            self._unhold(stripe)

    # ------------------------------------------------------------------ SMM: standby records
    def install_standby(self, key: bytes, group: int, owner: int, version: int, epoch: int,
                        state: bytes | memoryview | None) -> str:
        """Install or update one standby record from a remote replica's checkpoint.

        state=None means the flow was deleted at the primary. Returns what happened:
        'installed', 'updated', 'deleted', 'absent' (delete of an unknown flow), or 'conflict'
        (the key is ACTIVE here: we never overwrite live state with a backup copy).
        """
        h = hash_key(key)
        stripe = h & self._stripe_mask
        self._hold(stripe)
        try:
            idx, status, reuse = self._walk(key, h)
            if status == ACTIVE:
                return "conflict"
            if state is None:
                if status != STANDBY:
                    return "absent"
                off = self._slot_off(idx)
                if self._w32[(off + _OFF_GROUP) >> 2] != group:
                    return "absent"  # a flow moved to another group: that group's copy stays
                self._w32[(off + _OFF_STATUS) >> 2] = TOMBSTONE
                # Backup-side tombstones carry nothing to checkpoint: reusable at once.
                self._w32[(off + _OFF_MOD) >> 2] = 0
                self._stripe_add(stripe, -1, 1)
                return "deleted"
            if status == STANDBY:
                off, result = self._slot_off(idx), "updated"
            elif reuse < 0:
                raise self._no_room(key, h)
            else:
                off = self._claim(key, h, reuse, STANDBY, group, owner)
                result = "installed"
            buf = self._buf
            self._w32[(off + _OFF_GROUP) >> 2] = group
            self._w16[(off + _OFF_OWNER) >> 1] = owner
            self._w64[(off + _OFF_VERSION) >> 3] = version
            self._w64[(off + _OFF_EPOCH) >> 3] = epoch
            self._w32[(off + _OFF_MOD) >> 2] = 0
            n = min(len(state), self.g.state_size)
            s = off + abi.SLOT_HEADER
            buf[s:s + n] = state[:n]
            return result
        finally:
            self._unhold(stripe)

    def activate_slots(self, indices: Iterable[int], new_group: int | None = None) -> list[bytes]:
        """STANDBY -> ACTIVE for these slots (rechecked under their stripe lock); their keys.

        Activated flows become owned by this replica and marked modified, so that a group that
        replicates them to a new backup re-protects them at its next checkpoint.
        """
        by_stripe: dict[int, list[int]] = {}
        for idx in indices:
            by_stripe.setdefault(int(idx) // self.g.slots_per_stripe, []).append(int(idx))
        keys, buf = [], self._buf
        for stripe, idxs in sorted(by_stripe.items()):
            self._hold(stripe)
            try:
                for idx in idxs:
                    off = self._slot_off(idx)
                    if self._w32[(off + _OFF_STATUS) >> 2] != STANDBY:
                        continue
                    self._w16[(off + _OFF_OWNER) >> 1] = self.replica_id
                    if new_group is not None:
                        self._w32[(off + _OFF_GROUP) >> 2] = new_group
                    self._w32[(off + _OFF_REF) >> 2] = 0
                    self._w32[(off + _OFF_MOD) >> 2] = 1
                    self._w32[(off + _OFF_STATUS) >> 2] = ACTIVE
                    self._mark_dirty(off)
                    keys.append(bytes(buf[off:off + KEY_SIZE]))
            finally:
                self._unhold(stripe)
        return keys

    def standby_indices(self, owner: int | None = None, group: int | None = None) -> np.ndarray:
        """Slots holding STANDBY copies, optionally of one owner replica and/or group."""
        mask = self.slots["status"] == STANDBY
        if owner is not None:
            mask &= self.slots["owner"] == owner
        if group is not None:
            mask &= self.slots["group"] == group
        return np.flatnonzero(mask)

    def key_indices(self, keys: Iterable[bytes]) -> list[int]:
        out = []
        for key in keys:
            idx, status = self.lookup(key)
            if status == STANDBY:
                out.append(idx)
        return out

    # ------------------------------------------------------------------ introspection
    def counts(self) -> dict[str, int]:
        status = self.slots["status"]
        return {name: int(np.count_nonzero(status == code))
                for code, name in abi.STATUS_NAMES.items()}

    def describe_slot(self, idx: int) -> dict:
        s = self.slots[idx]
        key = bytes(self._buf[self._slot_off(idx):self._slot_off(idx) + KEY_SIZE])
        return {"slot": int(idx), "flow": describe(key), "key": key.hex(),
                "status": abi.STATUS_NAMES.get(int(s["status"]), str(int(s["status"]))),
                "owner": int(s["owner"]), "group": int(s["group"]),
                "refcount": int(s["refcount"]), "version": int(s["version"]),
                "ckpt_epoch": int(s["ckpt_epoch"]), "modified": int(s["modified"])}

    def release_views(self) -> None:
        """Drop the numpy views so the underlying mapping can be closed."""
        self.slots = self.stripes = None
        for view in (self._w16, self._w32, self._wi32, self._w64):
            view.release()
        self._buf = None
