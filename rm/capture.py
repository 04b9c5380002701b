"""Capturing checkpoints from the flow table: the modified flows of a set of groups, as INSTALL
records, in one pass over the table.

Called by the RM after it has suspended the groups' input and seen each of them quiescent
(pkts_done == pkts_read) with no transaction open on its flows (refcount 0), so nothing of those
groups changes while we read. Other groups' flows keep changing in other slots: we write only
our own slots' words, and the stripes' dirty hints by their protocol (pico_abi.h, "Dirty
hints"), which is what keeps a pass cheap on a table of millions of slots: only runs that a
writer marked are read. Pure over a FlowTable: no sockets, no clock.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np

from shared import abi, wire
from shared.flowtable import DIRTY_BLOCKS, FlowTable
from shared.packets import fence

ACTIVE, TOMBSTONE = abi.STATUS_ACTIVE, abi.STATUS_TOMBSTONE


class Captured(NamedTuple):
    records: np.ndarray   # wire.record_dtype(state_size)
    slots: np.ndarray     # their slot indexes, for mark_captured


def _runs(table: FlowTable, stripes: np.ndarray) -> np.ndarray:
    """The slot indexes of these stripes' runs."""
    sps = table.g.slots_per_stripe
    return (stripes[:, None] * sps + np.arange(sps)).ravel()


def open_transactions(table: FlowTable) -> dict[int, int]:
    """group -> flows inside a get_flow/put_flow transaction right now. A transaction holds
    its stripe, so only runs with a holder are read."""
    held = np.flatnonzero(table.stripes["holder_pid"] != 0)
    if not len(held):
        return {}
    idx = _runs(table, held)
    s = table.slots
    busy = idx[(s["refcount"][idx] > 0) & (s["status"][idx] == ACTIVE)]
    if not len(busy):
        return {}
    groups, counts = np.unique(s["group"][busy], return_counts=True)
    return dict(zip(groups.tolist(), counts.tolist()))


def _records(table: FlowTable, slots: np.ndarray) -> np.ndarray:
    s = table.slots
    recs = np.zeros(len(slots), dtype=wire.record_dtype(table.g.state_size))
    if len(slots):
        rows = s[slots]
        recs["key"] = np.frombuffer(rows["key"].tobytes(), np.uint8).reshape(len(slots), 40)
        tomb = rows["status"] == TOMBSTONE
        recs["op"] = np.where(tomb, wire.OP_DELETE, wire.OP_UPSERT)
        recs["version"] = rows["version"]
        recs["state"] = rows["state"]
        recs["state"][tomb] = 0
    return recs


def capture(table: FlowTable, groups: Iterable[int], full: Iterable[int] = ()) -> dict[int, Captured]:
    """For each group: its flows modified since their last checkpoint (upserts for ACTIVE
    flows, deletes for TOMBSTONEs), or for a group in `full` every ACTIVE flow plus its pending
    deletes. Clears the dirty hints of the runs it read (re-marking runs that still hold other
    groups' modified flows), so the caller must mark_captured every group returned."""
    groups, full = set(groups), set(full)
    if not groups:
        return {}
    s = table.slots
    hints = table.stripes["dirty"]                  # (n_stripes, 16): a view, one byte per block
    # (a copy first: writers set hints while we look, and np.nonzero on memory that changes
    # under it raises "number of non-zero array elements changed")
    rows, cols = np.nonzero(hints.copy())
    if not len(rows) and not full:  # nothing marked: no flow of any group changed
        recs = _records(table, np.zeros(0, np.int64))
        empty = Captured(recs, np.zeros(0, np.int64))
        return {g: empty for g in groups}
    hints[rows, cols] = 0
    fence()  # the clears are visible before we read modified (pico_abi.h, "Dirty hints")
    block = table.g.slots_per_stripe // DIRTY_BLOCKS
    hinted = rows * DIRTY_BLOCKS + cols             # block numbers; runs are contiguous
    idx = (hinted[:, None] * block + np.arange(block)).ravel()
    status, grp = s["status"][idx], s["group"][idx]
    cand = (s["modified"][idx] == 1) & ((status == ACTIVE) | (status == TOMBSTONE))
    # (one group, the common case: a comparison, not a set test)
    mine = cand & ((grp == next(iter(groups))) if len(groups) == 1 else
                   np.isin(grp, list(groups)))
    others = cand & ~mine
    if others.any():  # hints of groups we did not take are set again (a plain store of 1)
        again = np.unique(idx[others] // block)
        hints[again // DIRTY_BLOCKS, again % DIRTY_BLOCKS] = 1
    chosen, chosen_groups = idx[mine], grp[mine]
    if full:
        # a resync: every ACTIVE flow of the group, wherever it is (one whole-table read)
        everything = np.flatnonzero(np.isin(s["group"], list(full)) & (s["status"] == ACTIVE))
        keep = ~np.isin(chosen, everything)
        chosen = np.concatenate([chosen[keep], everything])
        chosen_groups = np.concatenate([chosen_groups[keep], s["group"][everything]])
    if len(groups) == 1:  # (no sort, no cut: every chosen slot is the group's)
        (g,) = groups
        return {g: Captured(_records(table, chosen), chosen)}
    # one record array for all the groups, cut into per-group slices (views)
    order = np.argsort(chosen_groups, kind="stable")
    chosen, chosen_groups = chosen[order], chosen_groups[order]
    recs = _records(table, chosen)
    empty = Captured(recs[:0], chosen[:0])
    out = {g: empty for g in groups}
    bounds = np.flatnonzero(np.diff(chosen_groups)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(chosen)]
    for lo, hi in zip(starts.tolist(), ends.tolist()):
        if hi > lo:
            g = int(chosen_groups[lo])
            if g in groups:
                out[g] = Captured(recs[lo:hi], chosen[lo:hi])
    return out


def mark_captured(table: FlowTable, slots: np.ndarray, epoch: int) -> None:
    """The captured flows are clean as of `epoch`: modified = 0, ckpt_epoch = epoch. A
    TOMBSTONE whose delete was captured becomes reusable for other keys (pico_abi.h)."""
    if len(slots):
        s = table.slots
        s["ckpt_epoch"][slots] = epoch
        s["modified"][slots] = 0
