"""Capturing a group's checkpoint from the flow table: the modified flows, as INSTALL records.

Called by the RM after it has suspended the group's input and seen the group quiescent
(pkts_done == pkts_read) with no transaction open on its flows (refcount 0), so nothing of the
group changes while we read. Other groups' flows keep changing in other slots: we touch only
the words of our own slots. Pure over a FlowTable: no sockets, no clock.
"""
from __future__ import annotations

import numpy as np

from shared import abi, wire
from shared.flowtable import FlowTable

ACTIVE, TOMBSTONE = abi.STATUS_ACTIVE, abi.STATUS_TOMBSTONE


def open_transactions(table: FlowTable, group: int) -> int:
    """Flows of the group inside a get_flow/put_flow transaction right now."""
    s = table.slots
    return int(np.count_nonzero((s["group"] == group) & (s["refcount"] > 0) &
                                (s["status"] == ACTIVE)))


def capture(table: FlowTable, group: int) -> tuple[np.ndarray, np.ndarray]:
    """The group's flows modified since their last checkpoint, as wire records (upserts for
    ACTIVE flows, deletes for TOMBSTONEs), and their slot indexes. Does not change the table:
    `mark_captured` does, once the records are safely handed to the sender."""
    s = table.slots
    status = s["status"]
    dirty = np.flatnonzero((s["group"] == group) & (s["modified"] == 1) &
                           ((status == ACTIVE) | (status == TOMBSTONE)))
    recs = np.zeros(len(dirty), dtype=wire.record_dtype(table.g.state_size))
    if len(dirty):
        rows = s[dirty]
        recs["key"] = np.frombuffer(rows["key"].tobytes(), np.uint8).reshape(len(dirty), 40)
        recs["op"] = np.where(rows["status"] == TOMBSTONE, wire.OP_DELETE, wire.OP_UPSERT)
        recs["version"] = rows["version"]
        recs["state"] = rows["state"]
        recs["state"][rows["status"] == TOMBSTONE] = 0
    return recs, dirty


def mark_captured(table: FlowTable, slots: np.ndarray, epoch: int) -> None:
    """The captured flows are clean as of `epoch`: modified = 0, ckpt_epoch = epoch. A
    TOMBSTONE whose delete was captured becomes reusable for other keys (pico_abi.h)."""
    if len(slots):
        s = table.slots
        s["ckpt_epoch"][slots] = epoch
        s["modified"][slots] = 0
