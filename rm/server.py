"""The RM's shell (issue 4, first cut): carries out GroupEpochs' actions against the real parts.

- the group table's control line (shared.packets.GroupControl): suspend, resume, open the next
  epoch, commit;
- the flow table (a FlowClient): capture a group's dirty flows after it drained;
- the target replica's SMM over ZeroMQ (shared.control.ControlClient): INSTALL, whose reply
  acknowledges epochs cumulatively.
One thread serves every group in deadline order (rm.epochs.due_order). Sends do not wait:
INSTALLs go out on one asynchronous socket per target and their replies are collected at each
pass, so a slow or dead backup delays none of the other groups, and epochs are pipelined.
"""
from __future__ import annotations

import signal
import threading
import time

from shared import log as pico_log
from shared import wire
from shared.api import attach_replica
from shared.control import AsyncControl
from shared.packets import attach_control, pkt_segment_name

from .capture import capture, mark_captured, open_transactions
from .epochs import (RUNNING, Capture, Commit, GroupEpochs, OpenEpoch, Resume, Send, Stuck, Suspend,
                     Unprotect, due_order)


class RmServer:
    def __init__(self, config, replica: str):
        self.log = pico_log.get_logger("rm", replica=replica)
        self.config = config
        self.replica = config.replica(replica)
        c = config.cluster
        # Started together with the SMM and the PMM (honcho): wait for their segments.
        self.flows = attach_replica(config, replica, timeout=30.0, name="pico-rm", wait=True)
        self.seg, self.ctl = attach_control(pkt_segment_name(c.shm_prefix, c.name, replica),
                                            timeout=30.0, wait=True)
        self.clients: dict[int, AsyncControl] = {}
        self.groups: dict[int, GroupEpochs] = {}
        self.captured: dict[tuple[int, int], object] = {}  # (group, epoch) -> records
        self.sent: dict[int, int] = {}  # request seq -> group
        self.operator_suspended: set[int] = set()  # picoctl suspend: epochs must not resume it
        timeout_ms = config.control.request_timeout_ms
        now = time.monotonic()
        for gid, index in self.seg.active_groups().items():
            row = self.seg.groups[index]
            target = int(row["target"])
            if gid == 0 or not target or not int(row["protected_"]):
                continue
            if target == self.replica.id:
                continue  # the config lists every group in every replica: ours back up others
            if target not in self.clients:
                peer = config.replica_by_id(target)
                self.clients[target] = AsyncControl(peer.smm_endpoint)
            self.groups[gid] = GroupEpochs(gid, int(row["frequency_hz"]), now,
                                           epoch=int(row["epoch"]),
                                           committed=int(row["committed"]),
                                           ack_timeout=timeout_ms / 1000.0)
        self.targets = {gid: int(self.seg.groups[self.seg.active_groups()[gid]]["target"])
                        for gid in self.groups}

    def run_once(self, now: float | None = None) -> None:
        """One pass over the groups that are due; carries out their actions."""
        now = time.monotonic() if now is None else now
        self._collect_acks()
        table = self.flows.table
        for ge in due_order(list(self.groups.values())):
            if ge.state == RUNNING and now < ge.next_due and not ge.inflight:
                continue  # (the list is in deadline order, but in-flight groups need timeouts)
            if ge.state == RUNNING:
                acts = ge.step(now)  # a suspending step judges nothing (rm/epochs.py)
            else:  # draining: observe only now, after the suspension was stored
                acts = ge.step(now, self.ctl.quiescent(ge.group),
                               open_transactions(table, ge.group))
            self._apply(ge, acts)

    def _apply(self, ge: GroupEpochs, actions) -> None:
        g = ge.group
        for a in actions:
            if isinstance(a, Suspend):
                self.ctl.suspend(g)
            elif isinstance(a, Capture):
                recs, slots = capture(self.flows.table, g)
                mark_captured(self.flows.table, slots, a.epoch)
                self.captured[(g, a.epoch)] = recs
            elif isinstance(a, OpenEpoch):
                self.ctl.open_epoch(g, a.epoch)
            elif isinstance(a, Resume):
                if g not in self.operator_suspended:
                    self.ctl.resume(g)
            elif isinstance(a, Send):
                self._send(ge, a)
            elif isinstance(a, Commit):
                self.ctl.commit(g, a.epoch)
                for key in [k for k in self.captured if k[0] == g and k[1] <= a.epoch]:
                    del self.captured[key]
            elif isinstance(a, Stuck):
                self.log.warning(f"group={g} epoch {a.epoch} not taken: the group did not drain "
                                 f"in {ge.drain_timeout:g} s ({a.open_transactions} open "
                                 f"transaction(s), quiescent={a.quiescent})")
            elif isinstance(a, Unprotect):
                self.log.error(f"group={g} backup replica {self.targets[g]} does not answer: "
                               "group unprotected, held output released")
                self.ctl.set_buffering(g, False)
                self.ctl.commit(g, ge.epoch)

    def _send(self, ge: GroupEpochs, a: Send) -> None:
        recs = self.captured.get((a.group, a.epoch))
        if recs is None:
            return
        if a.retry:
            self.log.warning(f"group={a.group} epoch {a.epoch}: no ack from replica "
                             f"{self.targets[a.group]}, resending (try {a.retry})")
        body = wire.encode_install(self.replica.id, a.group, a.epoch, a.base,
                                   self.flows.state_size, recs)
        ge.bytes_last = len(body)
        seq = self.clients[self.targets[a.group]].send(wire.INSTALL, body)
        if seq is not None:
            self.sent[seq] = a.group

    def _collect_acks(self) -> None:
        for client in self.clients.values():
            for reply in client.poll():
                group = self.sent.pop(reply.seq, None)
                if group is None or group not in self.groups:
                    continue  # a late reply to a request already answered or given up on
                if reply.status != wire.OK:
                    self.log.warning(f"group={group} INSTALL refused: "
                                     f"{wire.ERROR_NAMES.get(reply.status, reply.status)}")
                    continue
                acked = wire.INSTALL_REPLY.unpack(reply.body)[2]
                ge = self.groups[group]
                self._apply(ge, ge.on_ack(acked, time.monotonic()))

    def next_wakeup(self, now: float) -> float:
        """Seconds until some group needs us (an epoch ends, or an ack may have timed out)."""
        if not self.groups:
            return 0.5
        soonest = min(g.next_due for g in self.groups.values() if g.protected) \
            if any(g.protected for g in self.groups.values()) else now + 0.5
        if any(g.state != RUNNING for g in self.groups.values()):
            return 0.0002  # draining: look again soon
        return max(0.0, min(soonest - now, 0.5))

    def close(self) -> None:
        for g, ge in self.groups.items():  # never leave a group suspended mid-drain
            if ge.state != RUNNING and g not in self.operator_suspended:
                self.ctl.resume(g)
        for c in self.clients.values():
            c.close()
        self.ctl.close()
        self.seg.release_views()
        self.seg.segment.close()
        self.flows.close()


def run(config, replica: str) -> int:
    import zmq
    from .control import RmControl
    server = RmServer(config, replica)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    control = RmControl(server, config.control.max_message_bytes)
    ctx = zmq.Context()
    sock = None
    if server.replica.rm_endpoint:  # picoctl's peer
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(server.replica.rm_endpoint)
    server.log.info(f"protecting {len(server.groups)} group(s): "
                    + ", ".join(f"{g}->r{server.targets[g]} at {ge.frequency_hz} Hz"
                                for g, ge in server.groups.items()))
    try:
        while not stop.is_set():
            server.run_once()
            wait = server.next_wakeup(time.monotonic())
            if sock is None:
                stop.wait(wait)
            elif sock.poll(int(wait * 1000), zmq.POLLIN):
                parts = sock.recv_multipart()
                envelope = [b""] if len(parts) > 2 and parts[1] == b"" else []
                body = parts[1 + len(envelope):]
                reply = (control.handle(body[0]) if len(body) == 1 else
                         wire.error_reply(0, wire.ERR_BAD_ENVELOPE, "send one frame"))
                sock.send_multipart([parts[0], *envelope, reply])
    finally:
        if sock is not None:
            sock.close(linger=0)
        ctx.term()
        server.close()
    return 0
