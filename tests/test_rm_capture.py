"""Capturing a group's checkpoint from the flow table (pure, over a bytearray table)."""
import numpy as np

from rm.capture import capture as capture_groups, mark_captured, open_transactions
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


def capture(t, group, full=False):
    return capture_groups(t, [group], [group] if full else [])[group]


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
    assert int(t.stripes["dirty"].sum()) >= 1  # group 6's hint survives our read
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
    assert open_transactions(t) == {5: 1}
    t.put_flow(key(1))
    assert open_transactions(t) == {}


def test_one_pass_captures_several_groups_and_keeps_other_hints():
    t = table()
    for i in range(30):
        put(t, i, 5 + i % 3, bytes([i]))
    got = capture_groups(t, [5, 6, 9])
    assert sorted(got) == [5, 6, 9] and len(got[9].records) == 0
    assert {bytes(r["key"]) for r in got[5].records} == {key(i) for i in range(0, 30, 3)}
    for c in got.values():
        mark_captured(t, c.slots, 1)
    # group 7 was not taken: its flows are still found through the hints
    assert {bytes(r["key"]) for r in capture(t, 7).records} == {key(i) for i in range(2, 30, 3)}
    assert len(capture(t, 5).records) == 0


def test_a_writer_after_the_read_leaves_its_hint_set():
    t = table()
    put(t, 1, 5, b"a")
    mark_captured(t, capture(t, 5).slots, 1)
    assert not t.stripes["dirty"].any()
    put(t, 1, 5, b"b")
    assert t.stripes["dirty"].any() and len(capture(t, 5).records) == 1


def test_a_full_capture_carries_every_active_flow_and_pending_deletes():
    t = table()
    for i in range(6):
        put(t, i, 5, bytes([i]))
    mark_captured(t, capture(t, 5).slots, 1)
    t.del_flow(key(0))
    recs = capture(t, 5, full=True).records
    ops = {bytes(r["key"]): int(r["op"]) for r in recs}
    assert ops == {key(0): wire.OP_DELETE, **{key(i): wire.OP_UPSERT for i in range(1, 6)}}


def test_the_one_group_fast_path_captures_what_the_general_path_does():
    """capture() of one group skips the set test and the sort; on random tables (upserts,
    deletes, several groups, FULL or not) it must give the same records and slots, and leave
    the same hints, as the general path (the same group captured next to a group with no
    flows)."""
    rng = np.random.default_rng(7)
    for case in range(40):
        t = table()
        for i in range(int(rng.integers(0, 120))):
            put(t, int(rng.integers(0, 200)), int(rng.integers(5, 8)), bytes([i % 256]))
        for i in rng.integers(0, 200, size=int(rng.integers(0, 20))):
            if t.lookup(key(int(i)))[1] == 1:
                t.del_flow(key(int(i)))
        full = bool(rng.integers(0, 2))
        hints = t.stripes["dirty"].copy()
        modified = t.slots["modified"].copy()
        fast = capture_groups(t, [5], [5] if full else [])[5]
        hints_fast = t.stripes["dirty"].copy()
        t.stripes["dirty"][:] = hints                  # the same table again...
        t.slots["modified"][:] = modified
        slow = capture_groups(t, [5, 99], [5] if full else [])[5]   # ...through the sort
        assert sorted(fast.slots.tolist()) == sorted(slow.slots.tolist()), case
        order_f, order_s = np.argsort(fast.slots), np.argsort(slow.slots)
        for field in fast.records.dtype.names:            # (fields: padding is not data)
            assert (fast.records[order_f][field] == slow.records[order_s][field]).all(), case
        assert (hints_fast == t.stripes["dirty"]).all(), case
    empty = capture_groups(table(), [5])[5]            # nothing marked: the early exit
    assert len(empty.records) == 0 and len(empty.slots) == 0
    assert empty.records.dtype == wire.record_dtype(16)
