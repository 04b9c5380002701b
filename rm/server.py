"""The RM's shell: carries out GroupEpochs' actions against the real parts.

- the group table's control line (shared.packets.GroupControl): suspend, resume, open the next
  epoch, commit, and the protection settings;
- the flow table (a FlowClient): capture the drained groups' dirty flows;
- the target replicas' SMMs over ZeroMQ (shared.control.AsyncControl): INSTALL_BATCH, whose
  reply rows acknowledge each group's epochs cumulatively;
- the controller (rm.events): a group left unprotected, or protected again.

One thread serves every group. A pass steps each group that is due (deadlines sit on a grid,
so groups of one frequency are due together), then captures every group that drained in ONE
read of the table, then sends one INSTALL_BATCH per target. Sends never wait: replies are
collected at the next pass, so a slow or dead backup delays none of the other groups, and
epochs are pipelined. Operator changes (rm.admin) run between passes.
"""
from __future__ import annotations

import signal
import threading
import time

import numpy as np

from shared import log as pico_log
from shared import wire
from shared.api import attach_replica
from shared.control import AsyncControl
from shared import abi
from shared.packets import attach_control, pkt_segment_name
from shared.security import CONTROLLER, Keyring
from shared.segment import process_alive

from .capture import capture, mark_captured, open_transactions
from .epochs import (RUNNING, Capture, Commit, GroupEpochs, OpenEpoch, Resume, Send, Stuck, Suspend,
                     Unprotect)
from .events import ControllerEvents

IDLE_MAX_S = 0.1  # an idle group still takes an epoch this often
PROBE_S = 1.0     # a group that lost its backup asks it this often whether it is back


class RmServer:
    def __init__(self, config, replica: str, metrics: bool = True):
        self.log = pico_log.get_logger("rm", replica=replica)
        self.config = config
        self.replica = config.replica(replica)
        self.keyring = Keyring(config, replica)  # the replica's key pair (security.curve)
        self.gate = None  # the rm_endpoint's Gatekeeper, set by run()
        c = config.cluster
        # Started together with the SMM and the PMM (honcho): wait for their segments.
        self.flows = attach_replica(config, replica, timeout=30.0, name="pico-rm", wait=True)
        self.seg, self.ctl = attach_control(pkt_segment_name(c.shm_prefix, c.name, replica),
                                            timeout=30.0, wait=True, sleeper=True)
        self.max_bytes = config.control.max_message_bytes
        self.clients: dict[int, AsyncControl] = {}     # target replica id -> its SMM
        self.groups: dict[int, GroupEpochs] = {}       # the groups this RM protects
        self.targets: dict[int, int] = {}              # group -> target replica id
        self.buffering: dict[int, bool] = {}           # wanted while protected
        self.captured: dict[int, dict[int, tuple]] = {}  # group -> epoch -> (records, full)
        self.sent: dict[tuple[int, int], float] = {}   # (target, request seq) -> sent at
        self.outbox: dict[int, list[bytes]] = {}       # target -> INSTALL bodies of this pass
        self.moved_out: dict[int, list[tuple[bytes, int]]] = {}  # group -> (key, version)
        self.operator_suspended: set[int] = set()      # picoctl suspend: epochs must not resume
        self._last_read: dict[int, int] = {}   # group -> pkts_read when its last epoch was taken
        self._last_epoch: dict[int, float] = {}
        # Groups whose last due deadline found nothing to checkpoint. When every group is,
        # the RM sleeps on its doorbell (ABI 1.3) instead of waking every period to look.
        self._dormant: set[int] = set()
        self.bell_sleeps = 0
        # Groups unprotected because their backup stopped answering (not by an operator or a
        # view): group -> (target, frequency). The backup is probed (PING) every PROBE_S while
        # the view still has it alive; when it answers, the group is protected again (a FULL
        # snapshot first). A partition that heals thus heals protection too.
        self.lost: dict[int, tuple[int, int]] = {}
        self.probes: dict[tuple[int, int], float] = {}  # (target, seq) -> sent at
        self.next_probe = 0.0
        self.reprotected_total = 0
        self._mb_progress: dict[int, tuple[int, float]] = {}  # group -> (pkts_read, since)
        self.held: set[int] = set()  # an operator change holds the group: epochs run, no resume
        self.unprotected_total = 0
        self.events = ControllerEvents(config.control.controller_endpoint, self.log,
                                       retry_s=config.control.request_timeout_ms / 1000.0,
                                       curve=self.keyring.client(CONTROLLER)
                                       if config.control.controller_endpoint else None)
        self._mb_seen = False
        self.beat_s = config.control.heartbeat_interval_ms / 1000.0
        self.next_beat = 0.0
        self.view = self.seg.membership()[0]
        self._smm_beat = self.flows.segment.view(abi.FLOW_COUNTERS, abi.FLOW_COUNTERS_OFFSET)
        now = time.monotonic()
        for gid, index in self.seg.active_groups().items():
            row = self.seg.groups[index]
            target = int(row["target"])
            self.buffering[gid] = bool(int(row["buffering"]))
            if gid and target and target != self.replica.id and int(row["protected_"]):
                self.protect(gid, target, int(row["frequency_hz"]), now)
        self.metrics = None
        if metrics:
            from .metrics import RmMetrics, port_for
            self.metrics = RmMetrics(replica, port_for(self.replica.metrics_port), self)

    # ---------------------------------------------------------------- protection
    def client(self, target: int) -> AsyncControl:
        if target not in self.clients:
            peer = self.config.replica_by_id(target)
            self.clients[target] = AsyncControl(peer.smm_endpoint,
                                                curve=self.keyring.client(peer.name))
        return self.clients[target]

    def forget(self, group: int) -> GroupEpochs | None:
        """Stop running the group's epochs (its protection words are the caller's)."""
        ge = self.groups.pop(group, None)
        self.targets.pop(group, None)
        self.captured.pop(group, None)
        self.moved_out.pop(group, None)
        if ge is not None and ge.state != RUNNING and group not in self.held \
                and group not in self.operator_suspended:
            self.ctl.resume(group)  # it was suspended mid-drain
        return ge

    def protect(self, group: int, target: int, frequency_hz: int, now: float) -> GroupEpochs:
        """Start (or restart) checkpointing `group` to replica `target`. The first epoch is
        a FULL snapshot: we do not know what the target holds."""
        self.forget(group)
        self.lost.pop(group, None)
        self.client(target)
        row = self.seg.groups[self.ctl.index(group)]
        ge = GroupEpochs(group, frequency_hz, now, epoch=int(row["epoch"]),
                         committed=int(row["committed"]), resync=True,
                         ack_timeout=self.config.control.request_timeout_ms / 1000.0)
        self.groups[group], self.targets[group] = ge, target
        self.ctl.set_control(group, target=target, protected_=1)
        return ge

    def _unprotect(self, ge: GroupEpochs, reason: str) -> None:
        """Release the group's held output, stop holding it, mark it unprotected, tell the
        controller. It stays unprotected until an operator gives it a (new) target."""
        g = ge.group
        target = self.targets.get(g, 0)
        self.ctl.set_buffering(g, False)
        self.ctl.commit(g, ge.epoch)          # everything written so far may leave
        self.ctl.set_control(g, protected_=0)
        self.forget(g)
        self.unprotected_total += 1
        if target:
            self.lost[g] = (target, ge.frequency_hz)
        peer = self.config.replica_by_id(target) if target else None
        self.log.error(f"group={g} unprotected: {reason}; held output released")
        self.events.report("group_unprotected", replica=self.replica.name, group=g,
                           target=peer.name if peer else None, epoch=ge.epoch,
                           committed=ge.committed, reason=reason)

    # ---------------------------------------------------------------- the pass
    def run_once(self, now: float | None = None) -> None:
        """One pass: acks in, due groups stepped, drained groups captured together, sends out."""
        now = time.monotonic() if now is None else now
        self._collect_acks()
        self._probe_lost(now)
        self.events.pump(now)
        if now >= self.next_beat:
            self.next_beat = now + self.beat_s
            self.events.beat(self.health())
        # 1. groups whose epoch ends are suspended now (stored and fenced in _apply)...
        draining = []
        for ge in list(self.groups.values()):
            if ge.state == RUNNING:
                if now < ge.next_due and now < ge.timeout_at:
                    continue
                if now >= ge.next_due and not ge.inflight and self._idle(ge, now):
                    ge.skip(now)  # nothing to checkpoint, no output to release
                    self._dormant.add(ge.group)
                    continue
                self._dormant.discard(ge.group)
                acts = ge.step(now)  # a suspending step judges nothing (rm/epochs.py)
                if acts:
                    self._apply(ge, acts)
            if ge.state != RUNNING and ge.group in self.groups:
                draining.append(ge)
        # 2. ...so every draining group, those included, is observed after its suspension
        plans = []
        if draining:
            txns = open_transactions(self.flows.table)
            for ge in draining:
                acts = ge.step(now, self.ctl.quiescent(ge.group), txns.get(ge.group, 0))
                if acts:
                    plans.append((ge, acts))
        takes = [a for _, acts in plans for a in acts if isinstance(a, Capture)]
        if takes:
            got = capture(self.flows.table, [a.group for a in takes],
                          [a.group for a in takes if a.full])
            for a in takes:
                i = self.ctl.index(a.group)
                self._last_read[a.group] = int(self.seg.groups[i]["pkts_read"])
                self._last_epoch[a.group] = now
                recs, slots = got[a.group]
                mark_captured(self.flows.table, slots, a.epoch)
                self.captured.setdefault(a.group, {})[a.epoch] = (self._with_moves(a.group, recs),
                                                                  a.full)
        for ge, acts in plans:
            self._apply(ge, acts)
        self._flush()
        self.ctl.ring_bells()  # one wake-up for the PMM and the middlebox per pass

    def _idle(self, ge: GroupEpochs, now: float) -> bool:
        """No packet read from the group since its last epoch, no output waiting, no move
        pending, and an epoch within IDLE_MAX_S: an epoch now would carry nothing (a
        middlebox that changes state without packets is still checkpointed every IDLE_MAX_S).
        Idle groups then cost no suspension, no capture and no message."""
        g = ge.group
        if g in self.held or self.moved_out.get(g) or ge.resync:
            return False
        i = self.ctl.index(g)
        read = int(self.seg.groups[i]["pkts_read"])
        last = self._last_read.get(g)
        if last is None or read != last or len(self.seg.output_ring(i)) or \
                len(self.seg.input_ring(i)) or now - self._last_epoch.get(g, 0.0) >= IDLE_MAX_S:
            return False
        return True

    def _may_sleep(self) -> bool:
        """Every group's last deadline found it idle, none has an epoch in flight or a drain
        under way: only the doorbell, an ack timeout or IDLE_MAX_S can give it work."""
        return (self.ctl.rm_bell is not None and bool(self.groups)
                and all(g in self._dormant and ge.state == RUNNING and not ge.inflight
                        for g, ge in self.groups.items()))

    def _with_moves(self, group: int, recs):
        """Flows moved out of the group since its last epoch leave its backup as deletes."""
        moved = self.moved_out.pop(group, None)
        if not moved:
            return recs
        out = np.zeros(len(recs) + len(moved), dtype=recs.dtype)  # (np.concatenate would
        out[:len(recs)] = recs                                       # pack the padded dtype)
        for i, (key, version) in enumerate(moved, start=len(recs)):
            out[i]["key"] = np.frombuffer(key, np.uint8)
            out[i]["op"] = wire.OP_DELETE
            out[i]["version"] = version
        return out

    def _apply(self, ge: GroupEpochs, actions) -> None:
        g = ge.group
        for a in actions:
            if isinstance(a, Suspend):
                self.ctl.suspend(g)
            elif isinstance(a, OpenEpoch):
                self.ctl.open_epoch(g, a.epoch)
            elif isinstance(a, Resume):
                if g not in self.operator_suspended and g not in self.held:
                    self.ctl.resume(g, ring=False)
            elif isinstance(a, Send):
                self._queue(ge, a)
            elif isinstance(a, Commit):
                self.ctl.commit(g, a.epoch, ring=False)
                kept = self.captured.get(g)
                if kept:
                    for e in [e for e in kept if e <= a.epoch]:
                        del kept[e]
            elif isinstance(a, Stuck):
                self.log.warning(f"group={g} epoch {a.epoch} not taken: the group did not drain "
                                 f"in {ge.drain_timeout:g} s ({a.open_transactions} open "
                                 f"transaction(s), quiescent={a.quiescent})")
            elif isinstance(a, Unprotect):
                peer = self.config.replica_by_id(self.targets[g])
                self._unprotect(ge, f"backup {peer.name} did not acknowledge epoch {a.epoch} "
                                f"after {ge.max_retries} retries")

    def _queue(self, ge: GroupEpochs, a: Send) -> None:
        got = self.captured.get(a.group, {}).get(a.epoch)
        if got is None:
            return
        recs, full = got
        if a.retry:
            self.log.warning(f"group={a.group} epoch {a.epoch}: no ack from replica "
                             f"{self.targets[a.group]}, resending (try {a.retry})")
        body = wire.encode_install(self.replica.id, a.group, a.epoch, a.base,
                                   self.flows.state_size, recs,
                                   flags=wire.INSTALL_FULL if full else 0)
        ge.bytes_last = len(body)
        self.outbox.setdefault(self.targets[a.group], []).append(body)

    def _flush(self) -> None:
        """One INSTALL_BATCH per target (split to stay under max_message_bytes)."""
        limit = self.max_bytes // 2
        for target, bodies in self.outbox.items():
            batch, size = [], 0
            for body in bodies + [None]:
                if body is None or (batch and size + len(body) > limit):
                    seq = self.clients[target].send(wire.INSTALL_BATCH,
                                                    wire.encode_install_batch(batch))
                    if seq is not None:  # else the peer's queue is full: the retry resends
                        self.sent[(target, seq)] = time.monotonic()  # seqs are per socket
                    batch, size = [], 0
                if body is not None:
                    batch.append(body)
                    size += len(body) + 4
        self.outbox.clear()

    def _collect_acks(self) -> None:
        if len(self.sent) > 4096:  # requests a dead backup will never answer (retries resend)
            old = time.monotonic() - 10 * self.config.control.request_timeout_ms / 1000.0
            self.sent = {k: t for k, t in self.sent.items() if t > old}
        for target, client in self.clients.items():
            for reply in client.poll():
                if self.probes.pop((target, reply.seq), None) is not None:
                    if reply.status == wire.OK:
                        self._backup_back(target)
                    continue
                if self.sent.pop((target, reply.seq), None) is None:
                    continue  # a late reply to a request already answered or given up on
                if reply.status != wire.OK:
                    self.log.warning(f"INSTALL_BATCH refused by replica {target}: "
                                     f"{wire.ERROR_NAMES.get(reply.status, reply.status)}")
                    continue
                now = time.monotonic()
                for group, status, fields in wire.decode_batch_reply(reply.body):
                    ge = self.groups.get(group)
                    if ge is None or self.targets.get(group) != target:
                        continue
                    if status == wire.OK:
                        self._apply(ge, ge.on_ack(fields[2], now))
                    # (bells are rung at the end of the pass)
                    elif status == wire.ERR_EPOCH_GAP:
                        self.log.warning(f"group={group} replica {target} lost the stream "
                                         "(restarted?): resending the whole group")
                        ge.on_gap(now)
                    else:
                        self.log.warning(f"group={group} INSTALL refused by replica {target}: "
                                         f"{wire.ERROR_NAMES.get(status, status)}")

    def _probe_lost(self, now: float) -> None:
        """PING the backups of groups that lost them, if the view still counts them alive
        (a backup the controller failed is replaced through the VIEW instead)."""
        if not self.lost or now < self.next_probe:
            return
        self.next_probe = now + PROBE_S
        _, mask = self.seg.membership()
        for g in [g for g in self.lost if g not in self.seg.active_groups()]:
            del self.lost[g]  # (deleted meanwhile)
        self.probes = {k: t for k, t in self.probes.items() if now - t < 10 * PROBE_S}
        for target in {t for t, _ in self.lost.values()}:
            if mask and not mask >> (target - 1) & 1:
                continue
            seq = self.client(target).send(wire.PING)
            if seq is not None:
                self.probes[(target, seq)] = now

    def _backup_back(self, target: int) -> None:
        now = time.monotonic()
        peer = self.config.replica_by_id(target)
        for g, (t, freq) in list(self.lost.items()):
            if t != target or g in self.groups:
                continue
            self.protect(g, target, freq, now)  # (a FULL snapshot first)
            self.ctl.set_buffering(g, self.buffering.get(g, True))
            self.reprotected_total += 1
            self.log.warning(f"group={g} protected again: backup {peer.name} answers again "
                             "(a full snapshot first)")
            self.events.report("group_protected", replica=self.replica.name, group=g,
                               target=peer.name, reason="backup answers again")

    def health(self) -> dict:
        """This replica as the controller should see it: every process alive and beating. A
        process that hangs while its link stays up is found here (fate-sharing stops the
        others when one dies)."""
        # stale: later than the controller's own silence timeout (a loaded machine delays a
        # beat now and then; a hung process stays stale)
        sdn_s = self.config.sdn.heartbeat_timeout_ms / 1000.0 if self.config.sdn else 0.0
        now_ns, stale_ns = time.monotonic_ns(), int(max(3 * self.beat_s, sdn_s) * 1e9)
        problems = []
        for who, ns in (("smm", int(self._smm_beat["heartbeat_ns"])),
                        ("pmm", int(self.seg.counters["heartbeat_ns"]))):
            if ns and now_ns - ns > stale_ns:  # (0: it has not beaten yet, it is starting)
                problems.append(f"{who} heartbeat {(now_ns - ns) / 1e9:.3f} s old")
        mb = int(self.seg.desc["consumer_pid"])
        if mb and process_alive(mb):
            self._mb_seen = True
            stalled = self._middlebox_stalled(now_ns / 1e9, stale_ns / 1e9)
            if stalled:
                problems.append(stalled)
        elif self._mb_seen:  # (before the first one attaches, the replica is starting)
            problems.append("the middlebox is gone")
        view, mask = self.seg.membership()
        alive = [r.name for r in self.config.replicas.values() if mask >> (r.id - 1) & 1]
        return {"replica": self.replica.name, "healthy": not problems,
                "why": "; ".join(problems), "view": view, "alive": alive}

    def _middlebox_stalled(self, now: float, stale_s: float) -> str | None:
        """A middlebox that is alive but reads nothing while input waits (hung, stopped) is
        found here: a group with packets queued whose pkts_read has not moved for stale_s.
        Groups held on purpose (suspended: an epoch, an operator, a freeze) do not count."""
        seen = self._mb_progress
        for g, i in self.seg.active_groups().items():
            row = self.seg.groups[i]
            read, queued = int(row["pkts_read"]), len(self.seg.input_ring(i))
            last = seen.get(g)
            if last is None or last[0] != read or not queued or int(row["suspended"]):
                seen[g] = (read, now)
                continue
            if now - last[1] > stale_s:
                return (f"the middlebox has read nothing of group {g} for "
                        f"{now - last[1]:.3f} s with {queued} packet(s) queued (hung?)")
        return None

    def next_wakeup(self, now: float) -> float:
        """Seconds until some group needs us (an epoch ends, or an ack may have timed out)."""
        groups = list(self.groups.values())
        if any(g.state != RUNNING for g in groups):
            return 0.0002  # draining: look again soon
        if self._may_sleep():  # (woken early by the doorbell: a packet for a group)
            soonest = min((min(self._last_epoch.get(g.group, now) + IDLE_MAX_S, g.timeout_at)
                           for g in groups), default=now + 0.5)
        else:
            soonest = min((min(g.next_due, g.timeout_at) for g in groups), default=now + 0.5)
        if self.events.pending:
            soonest = min(soonest, now + 0.05)
        if self.lost:
            soonest = min(soonest, self.next_probe)
        if self.events.client is not None:
            soonest = min(soonest, self.next_beat)
        return max(0.0, min(soonest - now, 0.5))

    def wait(self, extra: list | None = None) -> dict:
        """Sleep until the next pass is due, an ack arrives, or a socket in `extra` (the
        control endpoint) is readable; the ready sockets."""
        import zmq
        now = time.monotonic()
        wait = self.next_wakeup(now)
        bell = self.ctl.rm_bell if self._may_sleep() else None
        if bell is not None:
            bell.prepare()  # rm_waiting = 1 and a fence; then one more look (pico_abi.h)
            if not all(self._idle(ge, now) for ge in self.groups.values()):
                bell.clear()
                return {}
            self.bell_sleeps += 1
        elif wait < 0.001:  # zmq polls in whole milliseconds: sleep the short waits
            time.sleep(wait)
            wait = 0.0
        poller = zmq.Poller()
        for sock in [c._sock for c in self.clients.values()] + (extra or []):
            poller.register(sock, zmq.POLLIN)
        if bell is not None:
            poller.register(bell.fd, zmq.POLLIN)
        ms = int(wait * 1000)
        if bell is not None and wait > 0:
            ms = max(1, ms)  # (asleep, a beat a fraction of a millisecond late costs nothing)
        try:
            return dict(poller.poll(ms))
        finally:
            if bell is not None:
                bell.clear()

    def close(self) -> None:
        for g, ge in self.groups.items():  # never leave a group suspended mid-drain
            if (ge.state != RUNNING or g in self.held) and g not in self.operator_suspended:
                self.ctl.resume(g)
        if self.metrics is not None:
            self.metrics.close()
        self._smm_beat = None
        for c in self.clients.values():
            c.close()
        self.events.close()
        self.ctl.close()
        self.seg.release_views()
        self.seg.segment.close()
        self.flows.close()


def run(config, replica: str) -> int:
    import zmq
    from shared.auth import gatekeeper
    from .control import RmControl
    server = RmServer(config, replica)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    control = RmControl(server, config.control.max_message_bytes)
    server.control = control  # (its request and error counts are in the RM's metrics)
    ctx = zmq.Context()
    sock = None
    if server.replica.rm_endpoint:  # picoctl's peer
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # As the SMM's: libzmq drops a peer whose message is over this (no reply); between
        # max_message_bytes and it, the peer gets TOO_LARGE (docs/protocol.md 6).
        sock.setsockopt(zmq.MAXMSGSIZE, config.control.max_message_bytes * 4 + 4096)
        server.gate = gatekeeper(ctx, server.keyring, server.log)
        if server.gate is not None:
            server.gate.protect(sock, server.replica.rm_endpoint)
        sock.bind(server.replica.rm_endpoint)
    server.log.info(f"protecting {len(server.groups)} group(s): "
                    + ", ".join(f"{g}->r{server.targets[g]} at {ge.frequency_hz} Hz"
                                for g, ge in server.groups.items()))
    try:
        while not stop.is_set():
            server.run_once()
            ready = server.wait([sock] if sock is not None else [])
            if sock is not None and sock in ready:
                parts = sock.recv_multipart()
                envelope = [b""] if len(parts) > 2 and parts[1] == b"" else []
                body = parts[1 + len(envelope):]
                reply = (control.handle(body[0]) if len(body) == 1 else
                         control.bad_envelope(len(body)))
                sock.send_multipart([parts[0], *envelope, reply])
    finally:
        if sock is not None:
            sock.close(linger=0)
        if server.gate is not None:
            server.gate.close()
        ctx.term()
        server.close()
    return 0
