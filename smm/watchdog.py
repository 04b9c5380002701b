"""Recovering what dead processes leave behind: held stripes and unfinished transactions.

`plan_recovery` is pure: given a snapshot of the stripe records, the semaphore values, the
client entries and a liveness test, it returns the actions to take. `Watchdog.run_once` takes
the snapshot from the segment and carries the actions out. Tests drive `plan_recovery` directly.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from shared.segment import process_alive


@dataclass(frozen=True)
class PostStripe:
    stripe: int
    reason: str   # "dead-holder" or "orphaned"
    holder: int


@dataclass(frozen=True)
class PostRegistry:
    """The registry semaphore stayed taken for a whole deadline: its holder died."""


@dataclass(frozen=True)
class ReapClient:
    entry: int
    pid: int


@dataclass
class StripeMemory:
    """What the last pass saw of stripes that looked taken with no holder."""
    suspects: dict[int, tuple[int, float]] = field(default_factory=dict)  # stripe -> (acq, since)
    registry_taken_since: float | None = None


def plan_recovery(now: float, holders: np.ndarray, acquisitions: np.ndarray,
                  sem_values: np.ndarray, clients: list[tuple[int, int, int]],
                  alive, memory: StripeMemory, orphan_after: float,
                  own_pid: int, registry_value: int = 1) -> list:
    """Decide which stripes to post and which clients to reap.

    - a stripe whose holder_pid names a dead process is posted at once;
    - a stripe at semaphore value 0 with no holder and an unchanged acquisition count for
      `orphan_after` seconds lost its holder between sem_wait and writing holder_pid;
    - the registry semaphore (held for microseconds by attach/detach) seen taken at every pass
      for `orphan_after` seconds lost its holder;
    - a client entry whose process is gone (or whose pid was reused) is reaped.
    """
    actions: list = []
    for k in np.flatnonzero(holders):
        pid = int(holders[k])
        if pid != own_pid and not alive(pid, None):
            actions.append(PostStripe(int(k), "dead-holder", pid))
    taken = np.flatnonzero((sem_values == 0) & (holders == 0))
    still = {}
    for k in map(int, taken):
        acq = int(acquisitions[k])
        seen = memory.suspects.get(k)
        if seen is None or seen[0] != acq:
            still[k] = (acq, now)
        elif now - seen[1] >= orphan_after:
            actions.append(PostStripe(k, "orphaned", 0))
        else:
            still[k] = seen
    memory.suspects = still
    if registry_value != 0:
        memory.registry_taken_since = None
    elif memory.registry_taken_since is None:
        memory.registry_taken_since = now
    elif now - memory.registry_taken_since >= orphan_after:
        actions.append(PostRegistry())
        memory.registry_taken_since = None
    for entry, pid, start in clients:
        if pid and not alive(pid, start):
            actions.append(ReapClient(entry, pid))
    return actions


class Watchdog:
    """Runs plan_recovery against a FlowStore and applies it."""

    def __init__(self, store, log, orphan_after: float | None = None):
        self.store = store
        self.log = log
        self.memory = StripeMemory()
        self.orphan_after = orphan_after or max(2 * store.locks.timeout_s, 0.5)
        self.own_pid = os.getpid()

    def run_once(self, now: float | None = None) -> list:
        store = self.store
        now = time.monotonic() if now is None else now
        store.counters["heartbeat_ns"] = time.monotonic_ns()
        stripes = store.table.stripes
        holders = stripes["holder_pid"].copy()
        acq = stripes["acquisitions"].copy()
        values = np.array([store.locks.value(k) for k in range(store.geometry.n_stripes)])
        cl = store.clients
        clients = [(i, int(cl[i]["pid"]), int(cl[i]["start_time"]))
                   for i in np.flatnonzero(cl["pid"])]
        actions = plan_recovery(now, holders, acq, values, clients, process_alive, self.memory,
                                self.orphan_after, self.own_pid, store.locks.registry.value)
        for a in actions:
            if isinstance(a, PostStripe):
                self._post(a)
            elif isinstance(a, PostRegistry):
                store.locks.registry.release()
                store.bump("lock_recoveries")
                self.log.warning("recovered the client registry semaphore (holder died)")
            else:
                self._reap(a)
        return actions

    def _post(self, a: PostStripe) -> None:
        rec = self.store.table.stripes
        # Recheck: the record may have changed since the snapshot (a live holder came along).
        if a.reason == "dead-holder" and int(rec[a.stripe]["holder_pid"]) != a.holder:
            return
        if a.reason == "orphaned" and (self.store.locks.value(a.stripe) != 0 or
                                       int(rec[a.stripe]["holder_pid"]) != 0):
            return
        fixed = 0
        if a.reason == "dead-holder":
            # Every open transaction in this run belongs to the dead holder: nobody else can
            # open one while it holds the stripe. Close them before anyone else gets in.
            sps = self.store.table.g.slots_per_stripe
            run = self.store.table.slots[a.stripe * sps:(a.stripe + 1) * sps]
            open_txn = run["refcount"] > 0
            fixed = int(open_txn.sum())
            run["refcount"][open_txn] = 0
            del run
            if fixed:
                self.store.bump("txn_recoveries", fixed)
        rec[a.stripe]["holder_pid"] = 0
        rec[a.stripe]["recoveries"] = int(rec[a.stripe]["recoveries"]) + 1
        self.store.locks.post(a.stripe)
        self.store.bump("lock_recoveries")
        self.log.warning(f"recovered lock stripe {a.stripe} ({a.reason}, holder pid "
                         f"{a.holder}); closed {fixed} open transaction(s)")

    def _reap(self, a: ReapClient) -> None:
        """Free a dead client's entry. Its open transactions were closed when its stripes were
        recovered (a transaction holds its stripe); any left with its pid are closed here."""
        table = self.store.table
        slots = table.slots
        idx = np.flatnonzero((slots["txn_pid"] == a.pid) & (slots["refcount"] > 0))
        fixed = 0
        sps = table.g.slots_per_stripe
        for stripe in sorted({int(i) // sps for i in idx}):
            self.store.locks.acquire(stripe)
            try:
                for i in idx[(idx // sps) == stripe]:
                    if int(slots[i]["txn_pid"]) == a.pid and int(slots[i]["refcount"]) > 0:
                        slots[i]["refcount"] = 0
                        fixed += 1
            finally:
                self.store.locks.release(stripe)
        reg = self.store.locks.registry
        reg.acquire(self.store.locks.timeout_s)
        try:
            if int(self.store.clients[a.entry]["pid"]) == a.pid:
                self.store.clients[a.entry]["pid"] = 0
        finally:
            reg.release()
        if fixed:
            self.store.bump("txn_recoveries", fixed)
        self.store.bump("client_recoveries")
        self.log.warning(f"client pid {a.pid} died: freed its entry, closed {fixed} open "
                         "transaction(s)")
