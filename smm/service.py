"""The SMM's request handling, free of sockets: bytes in, bytes out (shared/wire.py format).

SmmService.handle(frame) decodes one control message, applies it to the flow table, and returns
the reply frame. Bad input of any kind becomes an error reply and a counted event; the table is
only touched after a message has been fully validated.
"""
from __future__ import annotations

import os
import time
from collections import Counter

import numpy as np

from shared import abi, wire
from shared.errors import TableFull, WireError
from shared.flowkey import describe


class SmmService:
    def __init__(self, store, log, max_bytes: int):
        self.store = store
        self.table = store.table
        self.log = log
        self.max_bytes = max_bytes
        self.started = time.monotonic()
        # (owner replica id, group) -> last epoch installed. Lives with the table: an SMM that
        # restarts starts empty, answers EPOCH_GAP, and the primary resends a full snapshot.
        self.epochs: dict[tuple[int, int], int] = {}
        self.requests: Counter = Counter()
        self.errors: Counter = Counter()
        self.install_results: Counter = Counter()
        # Only this SMM creates and removes STANDBY slots, so it can count them; ACTIVE and
        # TOMBSTONE totals come from the per-stripe counters. No 2M-slot scan on a hot loop.
        self.standby = 0

    # ---------------------------------------------------------------- entry point
    def handle(self, frame: bytes) -> bytes:
        seq = wire.peek_seq(frame)
        try:
            msg = wire.decode(frame, self.max_bytes)
            handler = self._handlers().get(msg.type)
            if handler is None:
                raise WireError(wire.ERR_UNKNOWN_TYPE, f"unknown request type {msg.type}; "
                                "known: " + ", ".join(f"{t} {n}" for t, n in
                                                      wire.TYPE_NAMES.items() if t != wire.ERROR))
            self.requests[wire.TYPE_NAMES[msg.type]] += 1
            return wire.encode(msg.type | wire.REPLY_BIT, msg.seq, handler(msg.body))
        except WireError as e:
            return self._error(seq, e.code, str(e))
        except TableFull as e:
            return self._error(seq, wire.ERR_TABLE_FULL, str(e))
        except Exception as e:  # a bug must not take the SMM down with a half-done reply
            self.log.exception("internal error handling a request")
            return self._error(seq, wire.ERR_INTERNAL, f"internal error: {type(e).__name__}: {e}")

    def bad_envelope(self, parts: int) -> bytes:
        return self._error(0, wire.ERR_BAD_ENVELOPE, f"expected one message frame after the "
                           f"envelope, got {parts}: send a single frame")

    def _error(self, seq: int, code: int, text: str) -> bytes:
        name = wire.ERROR_NAMES.get(code, str(code))
        self.errors[name] += 1
        self.log.warning(f"rejected request seq={seq}: {name}: {text}")
        return wire.error_reply(seq, code, text)

    def _handlers(self):
        return {wire.PING: self._ping, wire.INSTALL: self._install,
                wire.INSTALL_BATCH: self._install_batch,
                wire.ACTIVATE: self._activate, wire.DUMP: self._dump, wire.STATS: self._stats}

    # ---------------------------------------------------------------- requests
    def _ping(self, body: bytes) -> bytes:
        return wire.json_body({"replica": self.store.replica.name, "pid": os.getpid(),
                               "uptime_s": round(time.monotonic() - self.started, 3)})

    def _install(self, body: bytes) -> bytes:
        inst = wire.decode_install(body)
        if inst.state_size != self.table.g.state_size:
            raise WireError(wire.ERR_STATE_SIZE, f"records carry {inst.state_size}-byte states, "
                            f"this table holds {self.table.g.state_size}: both replicas need the "
                            "same flow_table.state_size")
        if inst.owner == self.store.replica.id:
            raise WireError(wire.ERR_BAD_BODY, f"standby records from replica {inst.owner} "
                            "sent to itself: the group's target must be another replica")
        stream = (inst.owner, inst.group)
        last = self.epochs.get(stream, 0)
        counts = Counter()
        full = bool(inst.flags & wire.INSTALL_FULL)
        if not full and inst.epoch <= last:
            disposition = wire.DUPLICATE   # a retry of something already applied: ack again
        elif not full and inst.base_epoch != last:
            raise WireError(wire.ERR_EPOCH_GAP, f"epoch {inst.epoch} of replica {inst.owner} "
                            f"group {inst.group} builds on epoch {inst.base_epoch}, but the last "
                            f"installed is {last}: resend from {last} or send a full snapshot")
        else:
            # A FULL snapshot restarts the stream (a restarted primary may count from 1 again)
            # and replaces the group's standby set: copies it does not carry are removed.
            disposition = wire.APPLIED
            recs = inst.records
            keys = [recs["key"][i].tobytes() for i in range(len(recs))]
            for i, key in enumerate(keys):
                state = None if recs["op"][i] == wire.OP_DELETE else recs["state"][i].data
                result = self.table.install_standby(key, inst.group, inst.owner,
                                                    int(recs["version"][i]), inst.epoch, state)
                counts[result] += 1
                if result == "conflict":
                    self.log.warning(f"standby record for {describe(key)} from replica "
                                     f"{inst.owner} ignored: the flow is active here")
            if full:
                counts["deleted"] += self._purge(inst.owner, inst.group, set(keys), inst.epoch)
            self.epochs[stream] = inst.epoch
            last = inst.epoch
            self.install_results.update(counts)
            self.standby += counts["installed"] - counts["deleted"]
            changed = counts["installed"] + counts["updated"] + counts["deleted"]
            if changed:
                self.store.bump("standby_installed", changed)
        return wire.INSTALL_REPLY.pack(disposition, 0, last, counts["installed"],
                                       counts["updated"], counts["deleted"], counts["conflict"])

    def _install_batch(self, body: bytes) -> bytes:
        """Each section is an INSTALL on its own: a refused one (gap, bad body, full table)
        is answered in its row and counted, and the others are applied."""
        rows = []
        for section in wire.split_install_batch(body):
            group = wire.INSTALL_HEADER.unpack_from(section)[1] \
                if len(section) >= wire.INSTALL_HEADER.size else 0
            try:
                rows.append((group, wire.OK, self._install(section)))
            except WireError as e:
                rows.append((group, e.code, b""))
                self._count_refusal(e.code, f"INSTALL_BATCH section for group {group}: {e}")
            except TableFull as e:
                rows.append((group, wire.ERR_TABLE_FULL, b""))
                self._count_refusal(wire.ERR_TABLE_FULL, str(e))
        return wire.encode_batch_reply(rows)

    def _count_refusal(self, code: int, text: str) -> None:
        name = wire.ERROR_NAMES.get(code, str(code))
        self.errors[name] += 1
        self.log.warning(f"refused {name}: {text}")

    def _purge(self, owner: int, group: int, keep: set[bytes], epoch: int) -> int:
        """Remove the standby copies of (owner, group) that a full snapshot left out."""
        removed = 0
        for idx in self.table.standby_indices(owner=owner, group=group):
            key = self.table.slots["key"][idx].tobytes()
            if key not in keep and self.table.install_standby(key, group, owner, 0, epoch,
                                                              None) == "deleted":
                removed += 1
        return removed

    def _activate(self, body: bytes) -> bytes:
        selector, arg, new_group, keys = wire.decode_activate(body)
        if selector == wire.SEL_REPLICA:
            idx = self.table.standby_indices(owner=arg)
        elif selector == wire.SEL_GROUP:
            idx = self.table.standby_indices(group=arg)
        else:
            idx = self.table.key_indices(keys)
        group = None if new_group == wire.KEEP_GROUP else new_group
        activated = self.table.activate_slots(idx, group)
        if activated:
            self.standby -= len(activated)
            self.store.bump("activated", len(activated))
            self.log.info(f"activated {len(activated)} standby flow(s) (selector {selector}, "
                          f"arg {arg})")
        return wire.encode_key_list(activated)

    def _dump(self, body: bytes) -> bytes:
        req = wire.parse_json_body(body)
        limit = req.get("limit", 1000)
        status = req.get("status")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= 100000:
            raise WireError(wire.ERR_BAD_BODY, "dump: limit must be an integer 0..100000")
        codes = {v: k for k, v in abi.STATUS_NAMES.items()}
        if status is not None and status not in codes:
            raise WireError(wire.ERR_BAD_BODY, f"dump: status must be one of {sorted(codes)}")
        slots = self.table.slots
        mask = slots["status"] != abi.STATUS_FREE if status is None else \
            slots["status"] == codes[status]
        if "group" in req:
            group = req["group"]
            if not isinstance(group, int) or isinstance(group, bool) or not 0 <= group < 2**32:
                raise WireError(wire.ERR_BAD_BODY, "dump: group must be an integer 0..2^32-1")
            mask &= slots["group"] == group
        idx = np.flatnonzero(mask)
        flows = [self.table.describe_slot(int(i)) for i in idx[:limit]]
        return wire.json_body({"replica": self.store.replica.name, "total": int(len(idx)),
                               "flows": flows})

    def _stats(self, body: bytes) -> bytes:
        return wire.json_body(self.stats())

    def flow_counts(self) -> dict[str, int]:
        """Flows by status from the stripe counters (O(stripes), not O(slots))."""
        stripes = self.table.stripes
        live, tomb = int(stripes["live"].sum()), int(stripes["tombstones"].sum())
        return {"active": live - self.standby, "standby": self.standby, "tombstone": tomb,
                "free": self.table.g.n_slots - live - tomb}

    def stats(self) -> dict:
        from smm.store import clients_snapshot
        g = self.table.g
        return {"replica": self.store.replica.name, "segment": self.store.name,
                "capacity": g.capacity, "slots": g.n_slots, "stripes": g.n_stripes,
                "state_size": g.state_size, "flows": self.flow_counts(),
                "counters": self.store.counter_values(),
                "requests": dict(self.requests), "errors": dict(self.errors),
                "install_results": dict(self.install_results),
                "epochs": {f"{o}/{gr}": e for (o, gr), e in sorted(self.epochs.items())},
                "clients": clients_snapshot(self.store.clients)}
