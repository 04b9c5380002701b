"""Capturing a group's checkpoint from the flow table (pure, over a bytearray table)."""
import numpy as np

from rm.capture import capture, mark_captured, open_transactions
from shared import wire
from shared.flowkey import make_key
from shared.flowtable import TOMBSTONE, FlowTable, Geometry
from shared.locks import ThreadStripeLocks


def table():
    g = Geometry.plan(256, 16, 8)
    buf = memoryview(bytearray(g.segment_size))
    return FlowTable(buf, g, ThreadStripeLocks(g.n_stripes, buf, g.stripes_offset), 1)


def key(i):
    return make_key("10.0.0.1", 1000 + i, "10.0.0.2", 80, 6)


def put(t, i, group, data):
    st = t.get_flow(key(i), create=True, group=group)
    st[:len(data)] = data
    t.put_flow(key(i), modified=True)


def test_captures_only_modified_flows_of_the_group():
    t = table()
    put(t, 1, 5, b"a")
    put(t, 2, 5, b"b")
    put(t, 3, 6, b"c")  # another group
    recs, slots = capture(t, 5)
    assert sorted(bytes(r["key"]) for r in recs) == sorted([key(1), key(2)])
    assert all(r["op"] == wire.OP_UPSERT for r in recs)
    by_key = {bytes(r["key"]): bytes(r["state"][:1]) for r in recs}
    assert by_key == {key(1): b"a", key(2): b"b"}
    mark_captured(t, slots, 1)
    assert len(capture(t, 5)[0]) == 0            # clean now: unmodified flows are not sent
    t.get_flow(key(1))
    t.put_flow(key(1), modified=False)
    assert len(capture(t, 5)[0]) == 0            # a read-only transaction changes nothing
    put(t, 2, 5, b"B")
    recs, _ = capture(t, 5)
    assert [bytes(r["key"]) for r in recs] == [key(2)] and bytes(recs[0]["state"][:1]) == b"B"
    idx, _ = t.lookup(key(1))
    assert int(t.slots[idx]["ckpt_epoch"]) == 1


def test_deletes_travel_as_tombstones_and_free_the_slot_after():
    t = table()
    put(t, 1, 5, b"x")
    mark_captured(t, capture(t, 5)[1], 1)
    t.del_flow(key(1))
    recs, slots = capture(t, 5)
    assert [(bytes(r["key"]), int(r["op"])) for r in recs] == [(key(1), wire.OP_DELETE)]
    assert not recs["state"].any()
    idx, status = t.lookup(key(1))
    assert status == TOMBSTONE and int(t.slots[idx]["modified"]) == 1  # pending delete
    mark_captured(t, slots, 2)
    assert int(t.slots[idx]["modified"]) == 0  # reusable now


def test_records_round_trip_through_the_wire_format():
    t = table()
    for i in range(10):
        put(t, i, 5, bytes([i]) * 16)
    recs, _ = capture(t, 5)
    body = wire.encode_install(1, 5, 3, 2, 16, recs)
    inst = wire.decode_install(body)
    assert inst.epoch == 3 and len(inst.records) == 10
    assert np.array_equal(inst.records["state"], recs["state"])


def test_open_transactions_counts_the_groups_flows_in_flight():
    t = table()
    put(t, 1, 5, b"x")
    t.get_flow(key(1))
    assert open_transactions(t, 5) == 1 and open_transactions(t, 6) == 0
    t.put_flow(key(1))
    assert open_transactions(t, 5) == 0
