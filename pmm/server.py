"""The PMM process shell: NFQUEUE in, verdicts and a raw socket out.

Two threads, one job each:
- the main thread runs NetfilterQueue's receive loop; its callback hands each packet to
  Ingress (parse, classify, queue) and keeps the packet object until its verdict;
- the release thread waits on the output doorbell, asks Releaser which packets output commit
  lets go, and gives their verdicts (accept with the new bytes, drop, or a raw-socket send). It
  also drops packets the middlebox never wrote in time, and beats the heartbeat.
A crash in either thread stops the whole process (fate-sharing: the replica fails whole).

Packets of a flow that is STANDBY in this replica's flow table are held by the main thread
(Ingress's StandbyHold), their verdict pending, until the SMM activates the flow (the main
thread watches the flow segment's `activated` counter) or packets.standby_hold_ms passes.
"""
from __future__ import annotations

import json
import math
import select
import signal
import socket
import threading
import time


from shared import abi
from shared import log as pico_log
from shared.api import attach_replica
from shared.errors import PicoError
from shared.flowtable import ACTIVE, STANDBY
from shared.packets import IN_WAITING, OUT_WAITING, RM_WAITING, Doorbell
from shared.words import word_views

from .audit import record as audit_record
from .checksum import fix_checksums
from .classify import Classifier
from .core import (DROP, FLOW_STANDBY, HELD, QUEUED, SEND, STANDBY_HOLD_MAX, Ingress,
                   Releaser, StandbyHold)
from .metrics import PmmMetrics, port_for
from .store import PacketStore

SWEEP_INTERVAL_S = 0.05
STOP_POLL_S = 0.2
# While packets are held for a standby flow, the main loop looks at the SMM's `activated`
# counter (one shared word) this often, so a held flow leaves within ~5 ms of its activation.
HOLD_POLL_S = 0.005
# The pending-time mark of a held packet: the pending sweep never takes it for lost (the hold
# has its own deadline). It gets its real time back when the hold queues it.
HELD_SINCE = math.inf
_ACTIVATED = (abi.FLOW_COUNTERS_OFFSET + abi.FLOW_COUNTERS.fields["activated"][1]) >> 3


class RawSender:
    """Sends middlebox-made IP packets (header included) through raw sockets."""

    def __init__(self):
        self._v4 = self._v6 = None

    def send(self, data: bytes) -> None:
        if not data:
            raise ValueError("empty packet")
        if data[0] >> 4 == 4:
            if self._v4 is None:
                self._v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._v4.sendto(data, (socket.inet_ntop(socket.AF_INET, data[16:20]), 0))
        elif data[0] >> 4 == 6:
            if self._v6 is None:
                self._v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._v6.sendto(data, (socket.inet_ntop(socket.AF_INET6, data[24:40]), 0))
        else:
            raise ValueError(f"not an IP packet (version {data[0] >> 4})")

    def close(self) -> None:
        for s in (self._v4, self._v6):
            if s is not None:
                s.close()


class PmmServer:
    def __init__(self, config, replica: str, audit_path: str | None = None):
        self.log = pico_log.get_logger("pmm", replica=replica)
        self.config = config
        self.replica = config.replica(replica)
        self.store = PacketStore(config, replica)
        self.seg = self.store.seg
        try:
            # Prometheus on metrics_port+1 (pmm/metrics.py); a taken port fails the start.
            self.metrics = PmmMetrics(replica, port_for(self.replica.metrics_port), self.seg)
            # The flow table tells which group an existing flow (e.g. one activated at
            # failover) belongs to; the SMM must be up first.
            self.flows = attach_replica(config, replica, timeout=30.0, name="pico-pmm",
                                        wait=True)
        except BaseException:
            self.store.close(unlink=True)  # leave nothing behind for a failed start
            raise
        # standby_hold_ms 0: no hold (a standby flow's packets reach the middlebox, which does
        # not see its state): the behaviour of HA setups without one, for comparisons.
        self.hold_enabled = config.packets.standby_hold_ms > 0
        self.hold = StandbyHold(max(config.packets.standby_hold_ms, 1) / 1000.0,
                                STANDBY_HOLD_MAX)
        # (chords placement: the membership view the RM writes decides new flows' groups)
        classifier = Classifier(config, replica, membership=lambda: self.seg.membership()[1])
        self.ingress = Ingress(self.seg, classifier, self._flow_group, self.hold)
        self.metrics.noflow = self.ingress.noflow
        (self._flow_words,) = word_views(self.flows.segment.buf, "Q")
        self.releaser = Releaser(self.seg)
        self.raw = RawSender()
        buf = self.seg.segment.buf
        self.in_bell = Doorbell(self.store.in_bell, buf, IN_WAITING)     # we ring it
        self.out_bell = Doorbell(self.store.out_bell, buf, OUT_WAITING)  # we sleep on it
        self.rm_bell = Doorbell(self.store.rm_bell, buf, RM_WAITING)     # we ring it (ABI 1.3)
        self.pending: dict[int, tuple[object, float]] = {}
        self.pending_timeout = config.packets.pending_timeout_ms / 1000.0
        self._stop = threading.Event()
        self.crashed = False
        self._missing: set[int] = set()
        self._release_lock = threading.Lock()
        self._audit = open(audit_path, "a", buffering=1) if audit_path else None
        self._release_thread = threading.Thread(target=self._release_loop, name="release",
                                                daemon=True)

    # ---------------------------------------------------------------- ingress (main thread)
    def _flow_group(self, key: bytes, h: int) -> int | None:
        table = self.flows.table
        idx, status = table.lookup(key)
        if status == ACTIVE:
            return int(table.slots["group"][idx])
        if status == STANDBY:
            if not self.hold_enabled:
                return int(table.slots["group"][idx])
            return FLOW_STANDBY  # not activated yet: Ingress holds its packets
        return None

    def _activated(self) -> int:
        """The SMM's `activated` counter: it changes on every ACTIVATE that activated a flow,
        after the slots turned ACTIVE."""
        return int(self._flow_words[_ACTIVATED])

    def _on_packet(self, pkt) -> None:
        pid = pkt.id
        now = time.monotonic()
        # Pending first: once queued, the packet may come back for its verdict at once.
        self.pending[pid] = (pkt, now)
        try:
            result = self.ingress.on_packet(pid, pkt.get_payload(), now)
        except Exception:  # never let one packet take the queue down: drop it and go on
            self.log.exception("failed to queue a packet; dropped")
            result = None
        if result == QUEUED:
            self.in_bell.ring()
            if self.ingress.last_protected:
                self.rm_bell.ring()  # (a no-op unless the RM sleeps: its groups were idle)
        elif result == HELD:
            self.pending[pid] = (pkt, HELD_SINCE)  # in no ring, on purpose: not lost
        elif self.pending.pop(pid, None) is not None:
            pkt.drop()

    def _poll_hold(self) -> None:
        """Main thread: queue the held packets whose flow was activated (in arrival order),
        drop those past standby_hold_ms. Cheap when nothing changed: one shared word read."""
        if not self.hold.count:
            return
        now = time.monotonic()
        actions = self.ingress.poll_hold(now, self._activated())
        queued = False
        for held in actions.queue:
            pid = held.packet_id
            entry = self.pending.get(pid)
            if entry is None:
                continue  # decided already (cannot happen: only this thread decides held ones)
            pkt = entry[0]
            # Its pending time restarts now, and before the push: the middlebox may answer at once.
            self.pending[pid] = (pkt, now)
            try:
                result = self.ingress.requeue(held, now)
            except Exception:
                self.log.exception("failed to queue a held packet; dropped")
                result = None
            if result == QUEUED:
                queued = True
            elif result == HELD:
                self.pending[pid] = (pkt, HELD_SINCE)
            elif self.pending.pop(pid, None) is not None:
                pkt.drop()
        if queued:
            self.in_bell.ring()
            self.rm_bell.ring()
        if actions.drop:
            for held in actions.drop:
                entry = self.pending.pop(held.packet_id, None)
                if entry is not None:
                    try:
                        entry[0].drop()
                    except (OSError, RuntimeError):
                        pass
            self.log.warning(f"dropped {len(actions.drop)} packet(s) of standby flows not "
                             f"activated within {self.hold.hold_s:g} s")

    # ---------------------------------------------------------------- release (thread)
    def _release_loop(self) -> None:
        try:
            next_sweep = 0.0
            while not self._stop.is_set():
                if not self._release():
                    self.out_bell.prepare()
                    if self._release():  # output written before the middlebox saw our word
                        self.out_bell.cancel()
                    else:
                        self.out_bell.wait(SWEEP_INTERVAL_S)
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + SWEEP_INTERVAL_S
        except BaseException:
            self.log.exception("release thread crashed: stopping the PMM")
            self.crashed = True
            self._stop.set()

    def _release(self) -> int:
        """Give the verdicts output commit allows now; how many. Either thread may call it:
        the lock keeps the output rings' consumer single."""
        with self._release_lock:
            return self._release_locked()

    def _release_locked(self) -> int:
        total = 0
        while True:
            verdicts = self.releaser.drain()
            if not verdicts:
                return total
            total += len(verdicts)
            released = raw = errors = bad = 0
            for v in verdicts:
                try:
                    if v.action == SEND:
                        self.raw.send(fix_checksums(v.data))
                        raw += 1
                        released += 1
                        continue
                    entry = self.pending.pop(v.packet_id, None)
                    if entry is None:
                        bad += 1  # an id we never queued, or already decided
                        continue
                    pkt = entry[0]
                    if v.action == DROP:
                        pkt.drop()
                    else:
                        if v.data is not None:
                            pkt.set_payload(fix_checksums(v.data))
                        pkt.accept()
                        released += 1
                except (OSError, RuntimeError, ValueError) as e:
                    errors += 1
                    self.log.warning(f"verdict for packet {v.packet_id} failed: {e}")
                if self._audit and v.action != DROP:
                    self._audit.write(json.dumps(audit_record(v)) + "\n")
            c = self.seg.counters
            c["released"] = int(c["released"]) + released
            c["raw_sent"] = int(c["raw_sent"]) + raw
            c["verdict_errors"] = int(c["verdict_errors"]) + errors
            c["output_errors"] = int(c["output_errors"]) + bad

    def _sweep(self, now: float) -> None:
        """Drop packets the middlebox took but never finished; heartbeat; publish counters.

        A packet past the timeout is lost only if it is in no ring: still queued for a
        (maybe suspended) group, or written and held for output commit, it is waiting, not lost.
        """
        stale = [pid for pid, (_, t) in list(self.pending.items())
                 if now - t > self.pending_timeout]
        if stale:
            queued = self._ids_in_rings()
            # A packet the middlebox is moving from input to output is in no ring for an
            # instant: only one missing from the rings at two sweeps in a row is lost.
            missing = {pid for pid in stale if pid not in queued}
            stale, self._missing = list(missing & self._missing), missing
        else:
            self._missing = set()
        for pid in stale:
            entry = self.pending.pop(pid, None)
            if entry is not None:
                try:
                    entry[0].drop()
                except (OSError, RuntimeError):
                    pass
        c = self.seg.counters
        if stale:
            c["unwritten_drops"] = int(c["unwritten_drops"]) + len(stale)
            self.log.warning(f"dropped {len(stale)} packet(s) the middlebox did not write "
                             f"within {self.pending_timeout:g} s")
        c["pending"] = len(self.pending)
        c["heartbeat_ns"] = time.monotonic_ns()
        consumer = int(self.seg.desc["consumer_pid"])
        if consumer and not _alive(consumer):
            self.seg.desc["consumer_pid"] = 0
            self.log.warning(f"middlebox pid {consumer} is gone; waiting for the next one")

    def _ids_in_rings(self) -> set[int]:
        """NFQUEUE ids of every packet sitting in an input, output or direct ring."""
        ids: set[int] = set()
        for ring in self.seg.rings:
            ids.update(m.packet_id for m in ring.metas())
        return ids

    # ---------------------------------------------------------------- lifecycle
    def serve(self) -> None:
        from netfilterqueue import NetfilterQueue
        nfq = NetfilterQueue()
        queue = self.replica.nfqueue
        try:
            nfq.bind(queue, self._on_packet, max_len=self.config.packets.queue_maxlen)
        except OSError as e:
            raise PicoError(f"cannot bind NFQUEUE {queue} ({e}): run as root inside the "
                            "replica's namespace, with no other process bound to it") from None
        self.log.info(f"bound NFQUEUE {queue}; packet segment {self.store.name} ready "
                      f"({self.seg.g.max_groups} groups x {self.seg.g.ring_slots} slots)")
        self._release_thread.start()
        fd = nfq.get_fd()
        try:
            # Our own loop around a non-blocking run(): NetfilterQueue's blocking run() ignores
            # exceptions raised by signal handlers, so SIGTERM could not stop it.
            while not self._stop.is_set():
                ready, _, _ = select.select([fd], [], [],
                                            HOLD_POLL_S if self.hold.count else STOP_POLL_S)
                if ready:
                    nfq.run(block=False)
                self._poll_hold()
                if ready:
                    # Release what the middlebox already wrote, here and now: under load this
                    # saves waking the release thread (and moving the GIL) for every packet.
                    if self._release_lock.acquire(blocking=False):
                        try:
                            self._release_locked()
                        finally:
                            self._release_lock.release()
        finally:
            self._stop.set()
            nfq.unbind()

    def close(self) -> None:
        self._stop.set()
        if self._release_thread.is_alive():
            self._release_thread.join(2)
        for pkt, _ in list(self.pending.values()):
            try:
                pkt.drop()
            except (OSError, RuntimeError):
                pass
        self.pending.clear()
        self.raw.close()
        if self._audit:
            self._audit.close()
        self.metrics.close()
        self._flow_words.release()  # before the flow segment is unmapped
        self.flows.close()
        self.store.close(unlink=True)
        self.log.info("stopped; packet segment removed")


def _alive(pid: int) -> bool:
    from shared.segment import process_alive
    return process_alive(pid)


def run(config, replica: str, audit_path: str | None = None) -> int:
    server = PmmServer(config, replica, audit_path)

    def stop(*_):
        server._stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve()
    finally:
        server.close()
    return 1 if server.crashed else 0
