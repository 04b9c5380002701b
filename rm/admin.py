"""Operator changes to a live replica's groups (picoctl group create/delete/set, move, flows).

They run on the RM's thread between passes, so they never race a capture; while one waits for
its groups to go quiet it keeps running passes, so other groups stay on time. Every change is
validated whole before anything is touched (a bad `group set` changes nothing).

Moving a flow keeps output commit: the flow's old group is held (suspended, not resumed by its
epochs) and first takes an epoch that still carries the flow, so every output already tagged
for the old group depends only on state its own backup acknowledges; then the flow changes
group (marked modified, so the new group's next epoch carries it), and the old group's next
epoch deletes the old backup's copy.
"""
from __future__ import annotations

import time

import numpy as np

from shared import abi, wire
from shared.errors import WireError
from shared.flowkey import KEY_SIZE, describe

QUIET_TIMEOUT = 2.0  # seconds an operator change waits for its groups to go quiet
ACTIVE = abi.STATUS_ACTIVE


def _bad(text: str) -> WireError:
    return WireError(wire.ERR_BAD_BODY, text)


def _is_id(v) -> bool:
    """A group id as JSON gives it: an integer, not a boolean (true == 1 in Python; fuzzing
    found {"group": true} freezing, handing off or moving to group 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


class Admin:
    def __init__(self, server):
        self.s = server

    # ---------------------------------------------------------------- holding groups
    def _pump_until(self, pred, deadline: float) -> bool:
        while not pred():
            if time.monotonic() >= deadline:
                return False
            self.s.run_once()
            time.sleep(0.0002)
        return True

    def hold(self, groups: set[int]) -> None:
        """Suspend these groups and see them quiet; a protected one first takes an epoch
        while suspended (its output so far is then covered by its own backup)."""
        s, deadline = self.s, time.monotonic() + QUIET_TIMEOUT
        groups = {g for g in groups if g != abi.GROUP_DEFAULT}
        s.held |= groups
        try:
            for g in groups:
                ge = s.groups.get(g)
                if ge is None:
                    s.ctl.suspend(g)
                    ok = self._pump_until(lambda g=g: s.ctl.quiescent(g) and not
                                          self._open_txns(g), deadline)
                else:
                    first = ge.epoch
                    ge.next_due = min(ge.next_due, time.monotonic())
                    ok = self._pump_until(lambda ge=ge, first=first: ge.epoch > first or
                                          s.groups.get(ge.group) is not ge, deadline)
                    if s.groups.get(g) is not ge:  # it lost its backup meanwhile
                        s.ctl.suspend(g)
                        ok = self._pump_until(lambda g=g: s.ctl.quiescent(g) and not
                                              self._open_txns(g), deadline)
                if not ok:
                    raise WireError(wire.ERR_BUSY, f"group {g} did not go quiet within "
                                    f"{QUIET_TIMEOUT:g} s (a stuck middlebox transaction, or a "
                                    "backup that does not answer): nothing was changed; retry")
        except BaseException:
            self.release(groups)
            raise

    def release(self, groups: set[int]) -> None:
        s = self.s
        for g in groups:
            if g in s.held:
                s.held.discard(g)
                if g not in s.operator_suspended and g in s.seg.active_groups():
                    s.ctl.resume(g)

    def _open_txns(self, g: int) -> bool:
        from .capture import open_transactions
        return open_transactions(self.s.flows.table).get(g, 0) > 0

    # ---------------------------------------------------------------- validation
    def _target(self, name) -> int:
        """A target replica name -> id; None/'none' -> 0."""
        if name is None or name == "none":
            return 0
        if not isinstance(name, str):
            raise _bad("'target' must be a replica name or 'none'")
        try:
            rep = self.s.config.replica(name)
        except Exception:
            raise _bad(f"no replica named {name!r}; known: "
                       f"{', '.join(self.s.config.replicas)}") from None
        if rep.id == self.s.replica.id:
            raise _bad(f"replica {name} cannot back up its own groups: choose another target")
        return rep.id

    @staticmethod
    def _frequency(f) -> int:
        if not isinstance(f, int) or isinstance(f, bool) or not 10 <= f <= 20000:
            raise _bad("frequency_hz must be an integer 10..20000")
        return f

    @staticmethod
    def _bool(b, name: str) -> bool:
        if not isinstance(b, bool):
            raise _bad(f"{name} must be true or false")
        return b

    # ---------------------------------------------------------------- changes
    def create(self, group: int, frequency_hz: int = 1000, target=None,
               buffering: bool = True) -> dict:
        s = self.s
        if not isinstance(group, int) or isinstance(group, bool) or not 1 <= group <= 65535:
            raise _bad("'group' must be an integer 1..65535 (0 is the default group)")
        if group in s.seg.active_groups():
            raise _bad(f"group {group} already exists on replica {s.replica.name}")
        freq, tid = self._frequency(frequency_hz), self._target(target)
        buffering = self._bool(buffering, "buffering")
        try:
            s.ctl.add_group(group, freq, tid, buffering and bool(tid))
        except Exception as e:
            raise _bad(str(e)) from None
        s.buffering[group] = buffering
        if tid:
            s.protect(group, tid, freq, time.monotonic())
            s.events.report("group_protected", replica=s.replica.name, group=group,
                            target=target)
        s.log.info(f"group={group} created: {freq} Hz, target {target if tid else 'none'}, "
                   f"buffering {'on' if buffering else 'off'}")
        return {"group": group, "frequency_hz": freq, "target": target if tid else None,
                "buffering": buffering and bool(tid)}

    def _purge_backup(self, g: int, target: int, epoch: int) -> None:
        """Best effort: an empty FULL snapshot makes the old backup drop the group's copies."""
        s = self.s
        body = wire.encode_install(s.replica.id, g, epoch, 0, s.flows.state_size, [],
                                   flags=wire.INSTALL_FULL)
        s.client(target).send(wire.INSTALL_BATCH, wire.encode_install_batch([body]))

    def _stop_protecting(self, g: int) -> None:
        """On the operator's word: the backup's copies are purged, held output released."""
        s = self.s
        target = s.targets.get(g)
        ge = s.forget(g)
        if ge is None:
            return
        s.ctl.set_buffering(g, False)
        s.ctl.commit(g, ge.epoch)
        s.ctl.set_control(g, protected_=0)
        self._purge_backup(g, target, ge.epoch)

    def delete(self, group: int) -> dict:
        """Its flows join the default group (unprotected), its backup forgets them, its held
        output leaves, and the entry is freed once its rings are empty."""
        s = self.s
        if group == abi.GROUP_DEFAULT:
            raise _bad("the default group (0) cannot be deleted")
        if not isinstance(group, int) or group not in s.seg.active_groups():
            raise _bad(f"no group {group} on replica {s.replica.name}")
        self.hold({group})
        try:
            t = s.flows.table
            slots = t.slots
            moved = 0
            for idx in np.flatnonzero((slots["group"] == group) & (slots["status"] == ACTIVE)):
                moved += t.set_group(slots["key"][idx].tobytes(), abi.GROUP_DEFAULT) is not None
            t.release_tombstones(group, abi.GROUP_DEFAULT)  # reusable: no delete to send
            self._stop_protecting(group)
            s.ctl.set_buffering(group, False)
            s.ctl.bump_generation()  # the PMM looks its flows up again: default group now
        finally:
            self.release({group})
        index = s.ctl.index(group)
        inp, out = s.seg.input_ring(index), s.seg.output_ring(index)
        drained = self._pump_until(lambda: not len(inp) and not len(out),
                                   time.monotonic() + QUIET_TIMEOUT)
        left = len(inp) + len(out)
        s.ctl.remove_group(group)
        s.buffering.pop(group, None)
        s.operator_suspended.discard(group)
        if drained:
            s.log.info(f"group={group} deleted: {moved} flow(s) moved to the default group")
        else:  # the PMM drops them at its pending timeout; the entry is reused once empty
            s.log.warning(f"group={group} deleted with {left} packet(s) still in its rings "
                          f"after {QUIET_TIMEOUT:g} s: the PMM drops them when they time out")
        return {"group": group, "deleted": True, "flows_moved": moved, "packets_left": left}

    def set(self, group: int, **req) -> dict:
        s = self.s
        unknown = set(req) - {"frequency_hz", "buffering", "target"}
        if unknown:
            raise _bad(f"group_set: unknown field(s) {sorted(unknown)}; known: frequency_hz, "
                       "buffering, target")
        row = s.seg.groups[s.ctl.index(group)]
        freq = self._frequency(req["frequency_hz"]) if "frequency_hz" in req else None
        tid = self._target(req["target"]) if "target" in req else int(row["target"]) \
            if group in s.groups else 0
        buffering = self._bool(req["buffering"], "buffering") if "buffering" in req else None
        if group == abi.GROUP_DEFAULT:
            raise _bad("the default group (0) is never protected: nothing to set")
        if buffering and not tid:
            raise _bad(f"group {group} has no backup: holding its output would hold it "
                       "forever; give it a target first")
        # validated: now apply, all of it
        now = time.monotonic()
        if freq is not None:
            s.ctl.set_control(group, frequency_hz=freq)
            if group in s.groups:
                s.groups[group].set_frequency(freq, now)
        if buffering is not None:
            s.buffering[group] = buffering
        if "target" in req:
            s.lost.pop(group, None)  # (the operator decides now, not the probe)
        if "target" in req and tid != s.targets.get(group, 0):
            old = s.targets.get(group)
            if tid:
                # Switch streams without letting go: the new backup's first epoch is a FULL
                # snapshot, and its ack is what releases the output held meanwhile.
                if old:
                    self._purge_backup(group, old, int(row["epoch"]))
                s.protect(group, tid, int(row["frequency_hz"]), now)
                s.events.report("group_protected", replica=s.replica.name, group=group,
                                target=req["target"])
            else:
                self._stop_protecting(group)
        if "target" in req and not tid:
            s.ctl.set_control(group, target=0)  # also clears a given-up group's old target
        if group in s.groups:
            s.ctl.set_buffering(group, s.buffering.get(group, True))
        s.log.info(f"group={group} set: " + ", ".join(f"{k}={v}" for k, v in req.items()))
        return {"group": group, **req}

    def apply_view(self, view, alive) -> dict:
        """The controller's new membership view: groups whose backup left stop being protected
        (their held output leaves), and under chords placement the flows this replica took over
        (activated into a group whose backup is itself or gone) move to the group of their
        bucket's new backup. Idempotent: an old or repeated view changes nothing."""
        s = self.s
        if not isinstance(view, int) or isinstance(view, bool) or view < 1:
            raise _bad("'view' must be a positive integer")
        if not isinstance(alive, list) or not alive or not all(isinstance(n, str) for n in alive):
            raise _bad("'alive' must be a non-empty list of replica names")
        unknown = [n for n in alive if n not in s.config.replicas]
        if unknown:
            raise _bad(f"unknown replica(s) in the view: {unknown}")
        if view <= s.view:
            return {"view": s.view, "applied": False, "moved": 0, "unprotected": []}
        ids = {n: s.config.replica(n).id for n in alive}
        s.ctl.set_view(view, ids.values())  # new flows are placed by it from now on
        gone = {r.id for n, r in s.config.replicas.items() if n not in ids}
        unprotected = []
        for g, target in sorted(s.targets.items()):
            if target in gone:
                self._stop_protecting(g)
                unprotected.append(g)
        if s.config.sdn is not None and s.config.sdn.placement == "chords":
            # a chords group whose backup is (back) in the view is protected (again)
            now = time.monotonic()
            for name, rid in ids.items():
                g = s.config.sdn.CHORD_GROUP_BASE + rid
                if rid != s.replica.id and g not in s.groups and g in s.seg.active_groups():
                    s.protect(g, rid, s.config.sdn.frequency_hz, now)
                    s.ctl.set_buffering(g, s.buffering.get(g, True))
        reprotected = self._retarget(ids)
        moved = self._regroup(set(ids.values())) if s.config.sdn is not None and \
            s.config.sdn.placement == "chords" else 0
        s.view = view  # applied whole (a BUSY regroup raises first: a resend retries it)
        s.log.info(f"view {view}: alive {sorted(ids)}; {len(unprotected)} group(s) lost their "
                   f"backup, {moved} flow(s) re-protected")
        return {"view": view, "applied": True, "moved": moved, "unprotected": unprotected,
                "retargeted": reprotected}

    def _retarget(self, alive: dict[str, int]) -> dict[int, str]:
        """Groups of the config (Differentiated Pico Streams) whose configured backup is this
        replica or gone are protected to another live replica: the next one after this one
        in name order, the same choice on every replica. Flows activated here at a failover
        sit in such groups; so do this replica's own flows of a group whose backup failed."""
        s = self.s
        by_id = {g.id: g for g in s.config.groups.values()
                 if s.config.sdn is None or not g.name.startswith("to-")}
        names = sorted(alive)
        if s.replica.name not in names or len(names) < 2:
            return {}
        nxt = names[(names.index(s.replica.name) + 1) % len(names)]
        out = {}
        now = time.monotonic()
        for gid in s.seg.active_groups():
            g = by_id.get(gid)
            if g is None or g.target is None or gid in s.groups:
                continue
            if g.target != s.replica.name and g.target in alive:
                continue
            s.protect(gid, alive[nxt], g.frequency_hz, now)
            s.ctl.set_buffering(gid, g.buffering)
            s.buffering[gid] = g.buffering
            out[gid] = nxt
            s.log.info(f"group={gid} protected to {nxt} (its configured backup "
                       f"{g.target} is {'this replica' if g.target == s.replica.name else 'gone'})")
        return out

    def _regroup(self, alive_ids: set[int]) -> int:
        from pmm.classify import ChordsPlacer
        s = self.s
        sdn = s.config.sdn
        # every flow in a chords group follows the new ring: flows taken over (in a group
        # whose backup is this replica or gone) and flows whose bucket's backup changed, or
        # whose bucket now has another primary (scale-out: they go to the newcomer's group)
        chord = [sdn.CHORD_GROUP_BASE + r.id for r in s.config.replicas.values()]
        slots = s.flows.table.slots
        idx = np.flatnonzero((slots["status"] == ACTIVE) & np.isin(slots["group"], chord))
        if not len(idx):
            return 0
        placer = ChordsPlacer(s.config, s.replica.name)
        mask = sum(1 << (i - 1) for i in alive_ids)
        plan = []
        for i in idx:
            key = slots["key"][i].tobytes()
            a, b = int.from_bytes(key[:16], "big"), int.from_bytes(key[16:32], "big")
            new = placer.group_of(a, b, mask) or abi.GROUP_DEFAULT
            if new != int(slots["group"][i]):
                plan.append((key, int(slots["group"][i]), new))
        if not plan:
            return 0
        involved = {g for _, old, new in plan for g in (old, new)
                    if g in s.seg.active_groups()}
        self.hold(involved)
        moved = 0
        try:
            for key, old, new in plan:
                if new != old and s.flows.table.set_group(key, new) is not None:
                    moved += 1
                    if old in s.groups:  # its old backup's copy goes (as in a move)
                        idx, _ = s.flows.table.lookup(key)
                        s.moved_out.setdefault(old, []).append(
                            (key, int(s.flows.table.slots["version"][idx])))
            s.ctl.bump_generation()
        finally:
            self.release(involved)
        return moved

    def freeze(self, group=None) -> dict:
        """Stop processing `group` (None: every protected group) and checkpoint it to the
        end: held (suspended, epochs go on), and answered once the epoch taken while held is
        acknowledged, so its backup holds exactly the state the outside world has seen."""
        s = self.s
        if group is not None and (not _is_id(group) or group not in s.groups):
            raise _bad(f"group {group} is not protected on replica {s.replica.name}: nothing "
                       "to freeze")
        groups = set(s.groups) if group is None else {group}
        self.hold(groups)  # each takes an epoch while suspended
        want = {g: s.groups[g].epoch - 1 for g in groups if g in s.groups}
        ok = self._pump_until(lambda: all(g not in s.groups or s.groups[g].committed >= e
                                          for g, e in want.items()),
                              time.monotonic() + 2 * QUIET_TIMEOUT)
        if not ok:
            raise WireError(wire.ERR_BUSY, f"the backups of group(s) {sorted(want)} did not "
                            f"acknowledge the last epoch in {2 * QUIET_TIMEOUT:g} s; they stay "
                            "held: retry, or give them up")
        s.log.info(f"frozen: group(s) {sorted(groups)} held, last epochs acknowledged")
        return {"frozen": sorted(groups), "epochs": {str(g): e for g, e in want.items()}}

    def _primaries(self, idx) -> list:
        """The primary replica of each slot's flow under the current view (chords)."""
        from pmm.classify import ChordsPlacer
        s = self.s
        placer = ChordsPlacer(s.config, s.replica.name)
        mask = s.seg.membership()[1]
        out = []
        for i in idx:
            key = s.flows.table.slots["key"][i].tobytes()
            out.append(placer.primary(int.from_bytes(key[:16], "big"),
                                      int.from_bytes(key[16:32], "big"), mask))
        return out

    def takeover(self, group) -> dict:
        """Scale-out, on the newcomer: activate the standby flows of `group` whose bucket
        this replica now leads (the view says so); the others stay standby copies."""
        from shared.control import ControlClient
        s = self.s
        if not _is_id(group):
            raise _bad("'group' must be a group id")
        slots = s.flows.table.slots
        idx = np.flatnonzero((slots["group"] == group) &
                             (slots["status"] == abi.STATUS_STANDBY))
        keys = [slots["key"][i].tobytes() for i, p in zip(idx, self._primaries(idx))
                if p == s.replica.name]
        if not keys:
            return {"group": group, "activated": 0}
        with ControlClient(s.replica.smm_endpoint,
                           timeout_ms=s.config.control.request_timeout_ms,
                           curve=s.keyring.client(s.replica.name)) as smm:
            reply = smm.request(wire.ACTIVATE, wire.encode_activate(wire.SEL_KEYS, 0, keys))
        n = len(wire.decode_key_list(reply.body))
        s.log.info(f"group={group} taken over: {n} flow(s) activated here")
        return {"group": group, "activated": n}

    def handoff(self, group) -> dict:
        """The group's flows whose bucket another replica now leads were activated there and
        rerouted: drop this replica's copies (their deletes reach the backup, which ignores
        them: it holds them active now), and let the group go on."""
        s = self.s
        if not _is_id(group) or group not in s.seg.active_groups():
            raise _bad(f"no group {group} on replica {s.replica.name}")
        t = s.flows.table
        slots = t.slots
        idx = np.flatnonzero((slots["group"] == group) & (slots["status"] == ACTIVE))
        gone = [slots["key"][i].tobytes() for i, p in zip(idx, self._primaries(idx))
                if p is not None and p != s.replica.name]
        # Packets that reached us while the group was frozen belong to flows that now live
        # elsewhere: the middlebox binding drops them (TCP resends them to the new primary)
        # instead of showing them to a middlebox that would find no state, then the copies go.
        s.ctl.set_discard(group, True)
        try:
            self.release({group})
            ring = s.seg.input_ring(s.ctl.index(group))
            self._pump_until(lambda: not len(ring), time.monotonic() + QUIET_TIMEOUT)
            dropped = sum(bool(t.del_flow(key)) for key in gone)
        finally:
            s.ctl.set_discard(group, False)
        s.log.info(f"group={group} handed off: {dropped} flow(s) dropped here")
        return {"group": group, "dropped": dropped}

    def flows(self, group=None, limit: int = 100) -> dict:
        s = self.s
        if not isinstance(limit, int) or not 1 <= limit <= 100000:
            raise _bad("limit must be an integer 1..100000")
        slots = s.flows.table.slots
        sel = slots["status"] == ACTIVE
        if group is not None:
            if not isinstance(group, int) or isinstance(group, bool):
                raise _bad("'group' must be a group id")
            sel &= slots["group"] == group
        idx = np.flatnonzero(sel)
        rows = []
        for i in idx[:limit]:
            r = slots[i]
            key = r["key"].tobytes()
            rows.append({"flow": describe(key), "key": key.hex(), "group": int(r["group"]),
                         "version": int(r["version"]), "modified": int(r["modified"]),
                         "ckpt_epoch": int(r["ckpt_epoch"])})
        return {"replica": s.replica.name, "total": int(len(idx)), "flows": rows}

    def move(self, key_hex, group) -> dict:
        s = self.s
        try:
            key = bytes.fromhex(key_hex)
        except (TypeError, ValueError):
            key = b""
        if len(key) != KEY_SIZE:
            raise _bad(f"'key' must be a {KEY_SIZE}-byte flow key in hex (picoctl makes it from "
                       "'tcp 10.0.0.1:1234 10.0.0.2:80')")
        if not _is_id(group) or (group and group not in s.seg.active_groups()):
            raise _bad(f"no group {group} on replica {s.replica.name}")
        t = s.flows.table
        idx, status = t.lookup(key)
        if status != ACTIVE:
            raise _bad(f"{describe(key)} is not an active flow on replica {s.replica.name}")
        old = int(t.slots[idx]["group"])
        if old == group:
            return {"flow": describe(key), "from": old, "to": group, "moved": False}
        self.hold({old, group})
        try:
            if t.set_group(key, group) is None:
                raise _bad(f"{describe(key)} ended while it was being moved")
            if old in s.groups:
                s.moved_out.setdefault(old, []).append((key, int(t.slots[idx]["version"])))
            s.ctl.bump_generation()  # the PMM looks the flow up again
        finally:
            self.release({old, group})
        s.log.info(f"flow {describe(key)} moved from group {old} to group {group}")
        return {"flow": describe(key), "from": old, "to": group, "moved": True}
