"""The packet segment in Python: its geometry, the group table, and the middlebox packet API.

    from shared.packets import attach_packets
    with attach_packets("/pico.demo.r1.pkts") as io:
        while True:
            pkt = io.pkt_read(timeout=1.0)       # next packet of a group that is not suspended
            if pkt is None:
                continue
            ...                                  # pkt.key / pkt.flow_hash / pkt.group: the flow
            io.pkt_write(pkt)                    # or pkt_write(pkt, new_bytes), pkt_drop(pkt)

The PMM creates the segment (pmm/store.py); the RM writes the group table's control line
(GroupControl here is what it, or a test standing in for it, uses). pico_abi.h is the spec.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import posix_ipc

from . import abi
from .errors import AttachError, PicoError, SegmentCorrupt
from .rings import Ring
from .segment import Segment, attach_segment, process_alive, wait_for_segment

from .words import word_views
_FENCE = threading.Lock()
IN_WAITING = abi.PKT_DESC_OFFSET + abi.PKT_DESC.fields["in_waiting"][1]
OUT_WAITING = abi.PKT_DESC_OFFSET + abi.PKT_DESC.fields["out_waiting"][1]
RM_WAITING = abi.PKT_COUNTERS_OFFSET + abi.PKT_COUNTERS.fields["rm_waiting"][1]  # (ABI 1.3)


def fence() -> None:
    """A full memory barrier: an uncontended lock is a locked (fencing) instruction on x86."""
    _FENCE.acquire()
    _FENCE.release()


class Doorbell:
    """A semaphore rung only for a sleeper (pico_abi.h, "Doorbells"): the waiting word says
    whether the consumer sleeps, so a busy path costs no system call."""

    def __init__(self, sem: posix_ipc.Semaphore, buf, flag_offset: int):
        self.sem = sem
        (self._w,) = word_views(buf, "I")  # the waiting word, stored whole (shared/words.py)
        self._flag = flag_offset >> 2

    # producer
    def ring(self) -> bool:
        """Post if the consumer sleeps; whether it did."""
        fence()
        if self._w[self._flag]:
            self.sem.release()
            return True
        return False

    def ring_always(self) -> None:
        self.sem.release()

    # consumer
    def prepare(self) -> None:
        """Say we are about to sleep; the caller then scans once more before wait()."""
        self._w[self._flag] = 1
        fence()

    def cancel(self) -> None:
        self._w[self._flag] = 0

    def wait(self, timeout: float | None) -> bool:
        """Sleep until rung or timeout (False); clears the waiting word either way."""
        try:
            self.sem.acquire(timeout)
            return True
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return False
        finally:
            self._w[self._flag] = 0

    def close(self) -> None:
        self.sem.close()


def pkt_segment_name(shm_prefix: str, cluster: str, replica: str) -> str:
    """/<shm_prefix>.<cluster>.<replica>.pkts (pico_abi.h, packet segment)."""
    return f"/{shm_prefix}.{cluster}.{replica}.pkts"


def doorbell_names(sem_prefix: str) -> tuple[str, str]:
    return f"{sem_prefix}.in", f"{sem_prefix}.out"


def rm_doorbell_name(sem_prefix: str) -> str:
    """(ABI 1.3) The RM's doorbell: the PMM posts it when it queues input for a protected
    group while the RM sleeps (rm_waiting = 1)."""
    return f"{sem_prefix}.rm"


class BellRelay:
    """The RM's side of its doorbell, as a file descriptor its ZeroMQ poller can watch: a
    thread waits on the semaphore and writes a byte to a pipe for each post. The RM says it
    sleeps with prepare() (rm_waiting = 1, a fence), scans its groups once more, then polls
    the fd; after waking it calls clear()."""

    def __init__(self, sem: posix_ipc.Semaphore, buf):
        import os
        self.sem = sem
        self.bell = Doorbell(sem, buf, RM_WAITING)
        self.fd, self._wfd = os.pipe()
        os.set_blocking(self.fd, False)
        self._stop = threading.Event()
        self.wakeups = 0
        self._thread = threading.Thread(target=self._relay, name="rm-bell", daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        import os
        while not self._stop.is_set():
            try:
                self.sem.acquire(0.5)  # (a timeout, so close() never waits on a lost post)
            except posix_ipc.BusyError:
                continue
            except (posix_ipc.SignalError, posix_ipc.ExistentialError):
                continue
            if self._stop.is_set():
                return
            try:
                os.write(self._wfd, b"!")
            except OSError:
                return

    def prepare(self) -> None:
        self.bell.prepare()

    def clear(self) -> int:
        """Not sleeping any more; the posts taken since (drained from the pipe)."""
        import os
        self.bell.cancel()
        n = 0
        try:
            while True:
                got = os.read(self.fd, 4096)
                if not got:
                    break
                n += len(got)
        except BlockingIOError:
            pass
        self.wakeups += n
        return n

    def close(self) -> None:
        import os
        self._stop.set()
        try:
            self.sem.release()  # (wake the relay now rather than at its timeout)
        except posix_ipc.ExistentialError:
            pass
        self._thread.join(1.0)
        for fd in (self.fd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.sem.close()


class PacketError(PicoError):
    """A packet call was misused (unknown group, oversized packet...)."""


@dataclass(frozen=True)
class PacketGeometry:
    max_groups: int
    ring_slots: int
    slot_size: int
    mtu: int
    groups_offset: int
    rings_offset: int
    ring_bytes: int
    n_rings: int

    @classmethod
    def from_desc(cls, desc) -> "PacketGeometry":
        return cls(**{f: int(desc[f]) for f in cls.__dataclass_fields__})

    def check(self, where: str, segment_size: int) -> None:
        """Raise SegmentCorrupt unless these numbers are pico_abi.h's layout and fit the
        mapping (fuzzing: wild descriptor values crashed numpy and the rings)."""
        problems = []
        if self.max_groups < 1 or self.mtu < 1:
            problems.append(f"max_groups {self.max_groups} and mtu {self.mtu} must be >= 1")
        elif self.ring_slots < 1 or self.ring_slots & (self.ring_slots - 1):
            problems.append(f"ring_slots {self.ring_slots} is not a power of two")
        else:
            lay = abi.pkt_layout(self.max_groups, self.ring_slots, self.mtu)
            for name in ("groups_offset", "rings_offset", "ring_bytes", "n_rings", "slot_size"):
                if getattr(self, name) != lay[name]:
                    problems.append(f"{name} {getattr(self, name)} != {lay[name]}")
            if lay["segment_size"] > segment_size:
                problems.append(f"needs {lay['segment_size']} bytes, the mapping has "
                                f"{segment_size}")
        if problems:
            raise SegmentCorrupt(f"packet segment {where}: " + "; ".join(problems) +
                                 ": restart its PMM to rebuild it")


def _checked(seg: Segment) -> Segment:
    """An attached packet segment whose descriptor was validated before any view is made
    over it (the owner's own PacketSegment needs no check); closes it on failure."""
    from .api import sem_prefix_of
    try:
        desc = seg.view(abi.PKT_DESC, abi.PKT_DESC_OFFSET)
        PacketGeometry.from_desc(desc).check(seg.name, seg.size)
        sem_prefix_of(desc, seg.name)
        del desc
    except BaseException:
        seg.close()
        raise
    return seg


class PacketSegment:
    """Views over a mapped packet segment: descriptor, counters, group table, rings."""

    def __init__(self, seg: Segment):
        self.segment = seg
        self.desc = seg.view(abi.PKT_DESC, abi.PKT_DESC_OFFSET)
        self.g = PacketGeometry.from_desc(self.desc)
        self.counters = seg.view(abi.PKT_COUNTERS, abi.PKT_COUNTERS_OFFSET)
        self.groups = seg.view(abi.GROUP, self.g.groups_offset, self.g.max_groups)
        self.sem_prefix = bytes(self.desc["sem_prefix"]).split(b"\0", 1)[0].decode()
        self.rings = [Ring(seg.buf, self.g.rings_offset + i * self.g.ring_bytes,
                           self.g.ring_slots, self.g.slot_size) for i in range(self.g.n_rings)]

    def input_ring(self, index: int) -> Ring:
        return self.rings[2 * index]

    def output_ring(self, index: int) -> Ring:
        return self.rings[2 * index + 1]

    @property
    def direct_ring(self) -> Ring:
        return self.rings[2 * self.g.max_groups]

    def active_groups(self) -> dict[int, int]:
        """group id -> table index of the entries in use."""
        idx = np.flatnonzero(self.groups["state"] == abi.GROUP_ACTIVE)
        return {int(self.groups["id"][i]): int(i) for i in idx}

    def generation(self) -> int:
        return int(self.desc["groups_generation"])

    def membership(self) -> tuple[int, int]:
        """(view, alive_mask) as the RM last wrote them; (0, 0) before any view."""
        return int(self.desc["view"]), int(self.desc["alive_mask"])

    def bump(self, counter: str, n: int = 1) -> None:
        self.counters[counter] = int(self.counters[counter]) + n

    def group_stats(self) -> list[dict]:
        out = []
        for gid, i in sorted(self.active_groups().items()):
            row = self.groups[i]
            d = {"id": gid, "index": i}
            for f in abi.GROUP_CONTROL[2:] + ["epoch", "committed"] + abi.GROUP_PMM + abi.GROUP_MB:
                d[f.rstrip("_")] = int(row[f])
            d["input_queued"] = len(self.input_ring(i))
            d["output_queued"] = len(self.output_ring(i))
            out.append(d)
        return out

    def release_views(self) -> None:
        self.desc = self.counters = self.groups = None
        self.rings = []


class Packet:
    """A packet handed to the middlebox: a private copy of its bytes and where it belongs."""

    __slots__ = ("data", "packet_id", "flags", "group", "group_index", "flow_hash", "key",
                 "ts_ns")

    def __init__(self, data: bytes, packet_id: int, flags: int, group: int, group_index: int,
                 flow_hash: int, key: bytes, ts_ns: int):
        self.data, self.packet_id, self.flags, self.group = data, packet_id, flags, group
        self.group_index, self.flow_hash, self.key, self.ts_ns = group_index, flow_hash, key, ts_ns

    @property
    def is_new_flow(self) -> bool:
        return bool(self.flags & abi.PKT_NEW)

    @property
    def has_flow(self) -> bool:
        return not self.flags & abi.PKT_NOFLOW

    def __repr__(self) -> str:
        return (f"Packet(id={self.packet_id}, group={self.group}, len={len(self.data)}, "
                f"flags={self.flags:#x})")


class PacketClient:
    """The middlebox side: the single consumer of input rings, producer of output rings."""

    def __init__(self, seg: Segment):
        self.seg = PacketSegment(seg)
        desc = self.seg.desc
        pid = int(desc["consumer_pid"])
        if pid and pid != os.getpid() and process_alive(pid):
            self.seg.release_views()
            raise AttachError(f"packet segment {seg.name} already has a middlebox (pid {pid}); "
                              "input rings have a single consumer: stop it first")
        desc["consumer_pid"] = os.getpid()
        in_name, out_name = doorbell_names(self.seg.sem_prefix)
        try:
            buf = seg.buf
            self._in_bell = Doorbell(posix_ipc.Semaphore(in_name), buf, IN_WAITING)
            self._out_bell = Doorbell(posix_ipc.Semaphore(out_name), buf, OUT_WAITING)
        except posix_ipc.ExistentialError:
            desc["consumer_pid"] = 0
            self.seg.release_views()
            raise AttachError(f"packet segment {seg.name}: doorbell semaphores {in_name}/"
                              f"{out_name} are missing: is the PMM running?") from None
        self._generation = -1
        self._order: list[int] = []
        self._rr = 0
        self._refresh()
        # Packets a previous middlebox took but never finished are abandoned: the PMM drops
        # them when they time out. Start the counts even so checkpoints are not blocked.
        for i in self._order:
            row = self.seg.groups[i]
            row["pkts_done"] = int(row["pkts_read"])

    def _refresh(self) -> None:
        gen = self.seg.generation()
        if gen != self._generation:
            self._generation = gen
            self._by_id = self.seg.active_groups()
            self._order = sorted(self._by_id.values())
            self._rr = 0

    def _count(self, index: int, field: str) -> None:
        row = self.seg.groups[index]
        row[field] = int(row[field]) + 1

    # ------------------------------------------------------------------ reading
    def _try_read(self) -> Packet | None:
        self._refresh()
        groups = self.seg.groups
        order, n = self._order, len(self._order)
        for k in range(n):
            i = order[(self._rr + k) % n]
            if groups[i]["suspended"]:
                continue
            ring = self.seg.input_ring(i)
            if not len(ring):
                continue
            # Count the read before taking the packet, then look at `suspended` again: the RM
            # sets suspended, fences, then compares pkts_read with pkts_done, so either it sees
            # this read (and waits for it) or we see the suspension (pico_abi.h, output commit).
            self._count(i, "pkts_read")
            fence()
            if groups[i]["suspended"]:
                self._count(i, "pkts_done")  # the read that did not happen
                continue
            got = ring.pop()
            if got is not None:
                self._rr = (self._rr + k + 1) % n
                m, data = got
                pkt = Packet(data, m.packet_id, m.flags, m.group, i, m.flow_hash, m.key,
                             m.ts_ns)
                if groups[i]["discard"]:  # handed off to another replica (pico_abi.h)
                    self.pkt_drop(pkt)
                    continue
                return pkt
        return None

    def pkt_read(self, timeout: float | None = None) -> Packet | None:
        """The next packet of a group that is not suspended, round robin over groups so no
        group starves another; blocks (no spinning) up to `timeout` s (None: forever). A signal
        ends the wait early (None), like EINTR, so the caller can look at its flags."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pkt = self._try_read()
            if pkt is not None:
                return pkt
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return None
            self._in_bell.prepare()
            pkt = self._try_read()  # a packet queued before the PMM saw our waiting word
            if pkt is not None:
                self._in_bell.cancel()
                return pkt
            if not self._in_bell.wait(wait):
                return None

    # ------------------------------------------------------------------ writing
    def _index(self, group: int) -> int:
        self._refresh()
        try:
            return self._by_id[group]
        except KeyError:
            raise PacketError(f"group {group} does not exist in {self.seg.segment.name}; "
                              f"known: {sorted(self._by_id)}") from None

    def _emit(self, ring: Ring, pkt: Packet, data, flags: int, epoch: int) -> bool:
        ok = ring.push(data, pkt.packet_id, flags, pkt.group, pkt.flow_hash, epoch,
                       pkt.group_index, pkt.key)
        self._out_bell.ring()
        return ok

    def _check_size(self, pkt: Packet, data) -> None:
        """An oversized rewrite is the caller's bug, but the packet still gets finished (and
        dropped), so the group's counts stay balanced and checkpoints do not stall."""
        if data is not None and len(data) > self.seg.g.slot_size - abi.PKT_META_SIZE:
            self.pkt_drop(pkt)
            raise PacketError(f"packet of {len(data)} bytes exceeds the MTU {self.seg.g.mtu} of "
                              f"{self.seg.segment.name}: it was dropped")

    def pkt_write(self, pkt: Packet, data: bytes | None = None) -> bool:
        """Queue the packet (or `data`, its rewritten bytes) for release once the checkpoint
        of the group's current epoch is acknowledged. False if the output ring was full (the
        packet is dropped and counted)."""
        self._check_size(pkt, data)
        i = pkt.group_index
        flags = pkt.flags & ~(abi.PKT_DIRECT | abi.PKT_DROP)
        if data is not None and data != pkt.data:
            flags |= abi.PKT_MODIFIED
        else:
            data = pkt.data
        ok = self._emit(self.seg.output_ring(i), pkt, data, flags,
                        int(self.seg.groups[i]["epoch"]))
        if not ok and pkt.packet_id:  # dropped: ask for its drop verdict now, not at timeout
            self.seg.direct_ring.push(b"", pkt.packet_id, pkt.flags | abi.PKT_DROP, pkt.group,
                                      pkt.flow_hash, 0, i, pkt.key)
            self._out_bell.ring()
        self._finish(i, "written" if ok else "output_full", pkt)
        return ok

    def pkt_write_direct(self, pkt: Packet, data: bytes | None = None) -> bool:
        """Release at once, bypassing output commit (the paper's pkt_write_direct)."""
        self._check_size(pkt, data)
        flags = (pkt.flags | abi.PKT_DIRECT) & ~abi.PKT_DROP
        if data is not None and data != pkt.data:
            flags |= abi.PKT_MODIFIED
        else:
            data = pkt.data
        ok = self._emit(self.seg.direct_ring, pkt, data, flags, 0)
        self._finish(pkt.group_index, "written_direct" if ok else "output_full", pkt)
        return ok

    def pkt_drop(self, pkt: Packet) -> bool:
        """Drop the packet now (its NFQUEUE verdict is given at once)."""
        ok = True
        if not pkt.flags & abi.PKT_CREATED:
            ok = self._emit(self.seg.direct_ring, pkt, b"", pkt.flags | abi.PKT_DROP, 0)
        self._finish(pkt.group_index, "dropped", pkt)
        return ok

    def pkt_create(self, data: bytes, group: int = abi.GROUP_DEFAULT, key: bytes = bytes(40),
                   flow_hash: int = 0) -> bool:
        """Emit a packet the middlebox made (a full IP packet), into `group`'s output ring; the
        PMM sends it through a raw socket once released."""
        i = self._index(group)
        pkt = Packet(b"", 0, abi.PKT_CREATED, group, i, flow_hash, key, 0)
        ok = self._emit(self.seg.output_ring(i), pkt, data, abi.PKT_CREATED,
                        int(self.seg.groups[i]["epoch"]))
        self._count(i, "created" if ok else "output_full")
        return ok

    def _finish(self, index: int, field: str, pkt: Packet) -> None:
        row = self.seg.groups[index]
        row[field] = int(row[field]) + 1
        if pkt.packet_id or not pkt.flags & abi.PKT_CREATED:
            row["pkts_done"] = int(row["pkts_done"]) + 1

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self.seg.desc is not None and int(self.seg.desc["consumer_pid"]) == os.getpid():
            self.seg.desc["consumer_pid"] = 0
        self._in_bell.close()
        self._out_bell.close()
        self.seg.release_views()
        self.seg.segment.close()

    def __enter__(self) -> "PacketClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GroupControl:
    """The writer of the group table's control line: the RM (tests stand in for it)."""

    def __init__(self, seg: PacketSegment, sleeper: bool = False):
        """sleeper: this is the replica's RM, which sleeps on the RM doorbell when its groups
        are idle (one sleeper per semaphore: a second would take the first one's posts)."""
        self.seg = seg
        in_name, out_name = doorbell_names(seg.sem_prefix)
        try:
            self._in_bell = posix_ipc.Semaphore(in_name)
            self._out_bell = posix_ipc.Semaphore(out_name)
        except posix_ipc.ExistentialError:
            raise AttachError(f"packet segment {seg.segment.name}: doorbell semaphores "
                              f"{in_name}/{out_name} are missing: is the PMM running?") from None
        self._generation = -1
        self._by_id: dict[int, int] = {}
        self._words: dict[tuple[int, str], int] = {}
        self._w32, self._w64 = word_views(seg.segment.buf, "IQ")
        self._ring_in = self._ring_out = False
        self.rm_bell: BellRelay | None = None
        if sleeper:
            try:  # (ABI 1.3; a PMM that does not create it leaves the RM polling each period)
                self.rm_bell = BellRelay(posix_ipc.Semaphore(rm_doorbell_name(seg.sem_prefix)),
                                         seg.segment.buf)
            except posix_ipc.ExistentialError:
                pass

    def _word(self, group: int, field: str) -> int:
        """Index of the group's word `field` in the matching word view (_w32 or _w64)."""
        at = self._words.get((group, field))
        if at is None or self.seg.generation() != self._generation:
            dtype, off = abi.GROUP.fields[field][:2]
            at = self.seg.g.groups_offset + self.index(group) * abi.GROUP.itemsize + off
            at >>= 3 if dtype.itemsize == 8 else 2
            self._words[(group, field)] = at
        return at

    def index(self, group: int) -> int:
        gen = self.seg.generation()
        if gen != self._generation:  # one dict per change, not per call
            self._by_id, self._generation = self.seg.active_groups(), gen
            self._words = {}
        idx = self._by_id.get(group)
        if idx is None:
            raise PacketError(f"no group {group} in {self.seg.segment.name}; known: "
                              f"{sorted(self._by_id)}")
        return idx

    def _row(self, group: int):
        return self.seg.groups[self.index(group)]

    def bump_generation(self) -> None:
        """After a change readers must see: a group added or removed, flows moved."""
        fence()
        self.seg.desc["groups_generation"] = int(self.seg.desc["groups_generation"]) + 1
        self._out_bell.release()

    def add_group(self, group: int, frequency_hz: int, target: int, buffering: bool) -> int:
        """A new entry (pico_abi.h: control line first, state written last); its index."""
        if group == abi.GROUP_DEFAULT or group in self.seg.active_groups():
            raise PacketError(f"group {group} already exists in {self.seg.segment.name}")
        free = [i for i in np.flatnonzero(self.seg.groups["state"] == abi.GROUP_FREE)
                if i > 0 and not len(self.seg.input_ring(i)) and not len(self.seg.output_ring(i))]
        if not free:
            raise PacketError(f"the group table of {self.seg.segment.name} is full "
                              f"({self.seg.g.max_groups} entries): delete a group, or raise "
                              "packets.max_groups in the config and restart the replica")
        i = int(free[0])  # (an entry whose rings still hold a deleted group's packets waits)
        row = self.seg.groups[i]
        for f in abi.GROUP_PMM + abi.GROUP_MB:
            row[f] = 0
        row["id"], row["frequency_hz"], row["target"] = group, frequency_hz, target
        row["buffering"], row["suspended"], row["discard"] = int(buffering), 0, 0
        row["protected_"] = int(bool(target))
        row["epoch"], row["committed"] = 1, 0
        fence()
        row["state"] = abi.GROUP_ACTIVE  # publish last
        self.bump_generation()
        return i

    def remove_group(self, group: int) -> None:
        """Free the entry (state written first). Its rings must be empty: the caller drained
        them."""
        if group == abi.GROUP_DEFAULT:
            raise PacketError("the default group cannot be removed")
        i = self.index(group)
        self.seg.groups[i]["state"] = abi.GROUP_FREE
        self.bump_generation()

    def set_discard(self, group: int, on: bool) -> None:
        """Have the middlebox binding drop what it reads from the group's input ring."""
        self._w32[self._word(group, "discard")] = int(on)
        fence()

    def set_view(self, view: int, alive_ids) -> None:
        """The controller's membership view, for the PMM's placement: mask first, view last."""
        mask = 0
        for rid in alive_ids:
            mask |= 1 << (rid - 1)
        self._w64[(abi.PKT_DESC_OFFSET + abi.PKT_DESC.fields["alive_mask"][1]) >> 3] = mask
        fence()
        self._w64[(abi.PKT_DESC_OFFSET + abi.PKT_DESC.fields["view"][1]) >> 3] = view

    def set_control(self, group: int, **words: int) -> None:
        """frequency_hz, target, protected_: the line's plain settings."""
        row = self._row(group)
        for name, value in words.items():
            if name not in ("frequency_hz", "target", "protected_"):
                raise PacketError(f"set_control: {name} is not a plain setting")
            row[name] = int(value)

    def suspend(self, group: int) -> None:
        """Stop the middlebox reading the group; then wait for quiescent() before copying."""
        if group == abi.GROUP_DEFAULT:
            raise PacketError("the default group is never suspended (its flows are unprotected)")
        self._w32[self._word(group, "suspended")] = 1
        fence()  # the store must be visible before quiescent() reads the middlebox's counts

    def resume(self, group: int, ring: bool = True) -> None:
        self._w32[self._word(group, "suspended")] = 0
        if ring:
            self._in_bell.release()  # wake a middlebox that found only suspended input
        else:
            self._ring_in = True

    def set_buffering(self, group: int, on: bool) -> None:
        if group == abi.GROUP_DEFAULT and on:
            raise PacketError("the default group's output is never held")
        self._w32[self._word(group, "buffering")] = int(on)
        self._out_bell.release()

    def open_epoch(self, group: int, epoch: int) -> None:
        self._w64[self._word(group, "epoch")] = epoch

    def commit(self, group: int, epoch: int, ring: bool = True) -> None:
        """The backup acknowledged `epoch`: output tagged <= epoch may leave. ring=False
        defers the PMM's doorbell to ring_bells() (one wake-up per pass, not per group)."""
        self._w64[self._word(group, "committed")] = epoch
        if ring:
            self._out_bell.release()
        else:
            self._ring_out = True

    def ring_bells(self) -> None:
        """The pass's deferred doorbells, rung only for a sleeper (pico_abi.h, "Doorbells"):
        the resumes and commits are stored, a fence, then the waiting words. A busy PMM or
        middlebox sees them in its own loop; waking it 1000 times a second for nothing cost
        it a system call and a rescan each time."""
        if not (self._ring_out or self._ring_in):
            return
        fence()
        if self._ring_out:
            self._ring_out = False
            if self._w32[OUT_WAITING >> 2]:
                self._out_bell.release()
        if self._ring_in:
            self._ring_in = False
            if self._w32[IN_WAITING >> 2]:
                self._in_bell.release()

    def quiescent(self, group: int) -> bool:
        """Every packet the middlebox read from the group is finished (pico_abi.h, output
        commit): one of the RM's two conditions before copying a checkpoint."""
        return self._w64[self._word(group, "pkts_done")] == self._w64[self._word(group, "pkts_read")]

    def close(self) -> None:
        self._w32 = self._w64 = None  # views must go before the mapping closes
        self._in_bell.close()
        self._out_bell.close()
        if self.rm_bell is not None:
            self.rm_bell.bell = None  # (its word view goes with the mapping)
            self.rm_bell.close()


def attach_packets(segment_name: str, timeout: float = 2.0, wait: bool = False) -> PacketClient:
    """Attach a middlebox to a replica's packet segment (wait=True: wait up to `timeout` for
    the PMM to create it)."""
    seg = _checked(wait_for_segment(segment_name, abi.SEG_PACKETS, timeout) if wait else
                   attach_segment(segment_name, abi.SEG_PACKETS, timeout))
    try:
        return PacketClient(seg)
    except BaseException:
        seg.close()
        raise


def attach_control(segment_name: str, timeout: float = 2.0, wait: bool = False,
                   sleeper: bool = False) -> tuple[PacketSegment, GroupControl]:
    """Attach as the group table's control writer (the RM, or a test in its place);
    sleeper: see GroupControl."""
    seg = PacketSegment(_checked(wait_for_segment(segment_name, abi.SEG_PACKETS, timeout) if wait
                                 else attach_segment(segment_name, abi.SEG_PACKETS, timeout)))
    try:
        return seg, GroupControl(seg, sleeper)
    except BaseException:
        seg.release_views()
        seg.segment.close()
        raise
