"""The flow table's logic over a plain bytearray (no shared memory, thread locks)."""
import threading

import numpy as np
import pytest

from shared import abi
from shared.errors import FlowIsStandby, FlowLockTimeout, NoTransaction, TableFull
from shared.flowkey import hash_key, make_key
from shared.flowtable import ACTIVE, FREE, STANDBY, TOMBSTONE, FlowTable, Geometry
from shared.locks import ThreadStripeLocks


def table(capacity=64, stripes=4, state_size=16, replica=1, timeout=1.0):
    g = Geometry.plan(capacity, state_size, stripes)
    buf = memoryview(bytearray(g.segment_size))
    locks = ThreadStripeLocks(g.n_stripes, buf, g.stripes_offset, timeout)
    return FlowTable(buf, g, locks, replica)


def key(i, proto=6):
    return make_key(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 1000 + i % 5000,
                    "192.0.2.1", 80, proto)


def keys_in_stripe(t, stripe, n):
    out, i = [], 0
    while len(out) < n:
        k = key(i)
        if hash_key(k) & (t.g.n_stripes - 1) == stripe:
            out.append(k)
        i += 1
    return out


def test_geometry_has_headroom_and_power_of_two_runs():
    g = Geometry.plan(1_000_000, 64, 1024)
    assert g.n_slots == 2_097_152 and g.slots_per_stripe == 2048
    assert g.max_per_stripe * g.n_stripes >= 1_000_000 * 1.5
    assert g.slots_offset % 4096 == 0 and g.segment_size >= g.slots_offset + g.n_slots * g.slot_size


def test_insert_lookup_state_roundtrip():
    t = table()
    k = key(1)
    assert t.get_flow(k) is None
    st = t.get_flow(k, create=True, group=3)
    assert len(st) == 16 and bytes(st) == bytes(16)
    st[:5] = b"hello"
    assert t.put_flow(k, modified=True)
    again = t.get_flow(k)
    assert bytes(again[:5]) == b"hello"
    t.put_flow(k, modified=False)
    idx, status = t.lookup(k)
    s = t.slots[idx]
    assert status == ACTIVE and s["group"] == 3 and s["owner"] == 1
    assert s["version"] == 1 and s["modified"] == 1 and s["refcount"] == 0


def test_refcount_counts_open_transactions():
    t = table()
    k = key(2)
    t.get_flow(k, create=True)
    t.get_flow(k)  # nested, same thread: re-entrant
    idx, _ = t.lookup(k)
    assert t.slots[idx]["refcount"] == 2
    t.put_flow(k, modified=False)
    t.put_flow(k, modified=False)
    assert t.slots[idx]["refcount"] == 0
    with pytest.raises(NoTransaction, match="get_flow"):
        t.put_flow(k)


def test_transaction_excludes_other_threads_of_the_same_stripe():
    t = table(timeout=0.2)
    k = key(3)
    t.get_flow(k, create=True)
    err = []
    th = threading.Thread(target=lambda: err.append(pytest.raises(FlowLockTimeout, t.get_flow, k)))
    th.start()
    th.join()
    assert err and err[0].match("stripe")
    t.put_flow(k)


def test_collisions_in_one_stripe_are_all_found():
    t = table(capacity=64, stripes=4)
    ks = keys_in_stripe(t, 2, t.g.max_per_stripe)
    for i, k in enumerate(ks):
        t.get_flow(k, create=True)[:4] = i.to_bytes(4, "little")
        t.put_flow(k)
    for i, k in enumerate(ks):
        assert int.from_bytes(t.get_flow(k)[:4], "little") == i
        t.put_flow(k, modified=False)
    assert t.stripes[2]["live"] == len(ks)


def test_full_stripe_is_a_clear_error_not_corruption():
    t = table(capacity=64, stripes=4)
    ks = keys_in_stripe(t, 1, t.g.max_per_stripe + 1)
    for k in ks[:-1]:
        t.get_flow(k, create=True)
        t.put_flow(k)
    before = t.slots.copy()
    with pytest.raises(TableFull, match="stripe 1 is full"):
        t.get_flow(ks[-1], create=True)
    assert (t.slots == before).all()
    # The failed insert released the stripe: other operations go on.
    assert t.get_flow(ks[0]) is not None
    t.put_flow(ks[0])


def test_delete_leaves_tombstone_and_lookups_walk_past_it():
    t = table(capacity=64, stripes=4)
    a, b = keys_in_stripe(t, 0, 2)
    for k in (a, b):
        t.get_flow(k, create=True, group=1)
        t.put_flow(k)
    assert t.del_flow(a)
    idx, status = t.lookup(a)
    assert status == TOMBSTONE and t.slots[idx]["modified"] == 1
    assert t.get_flow(a) is None
    assert t.get_flow(b) is not None  # b may sit behind a's tombstone on the probe walk
    t.put_flow(b)
    assert not t.del_flow(a)  # already deleted
    assert t.stripes[0]["tombstones"] == 1 and t.stripes[0]["live"] == 1


def test_delete_inside_a_transaction_ends_it():
    t = table()
    k = key(9)
    t.get_flow(k, create=True, group=1)
    assert t.del_flow(k)
    with pytest.raises(NoTransaction):
        t.put_flow(k)
    assert t.get_flow(k, create=True) is not None  # the stripe was released
    t.put_flow(k)


def test_reinsert_reuses_its_own_tombstone():
    t = table(capacity=64, stripes=4)
    a = key(11)
    t.get_flow(a, create=True, group=1)
    t.put_flow(a)
    idx, _ = t.lookup(a)
    t.del_flow(a)
    t.get_flow(a, create=True, group=1)
    t.put_flow(a)
    assert t.lookup(a) == (idx, ACTIVE)
    assert int(np.count_nonzero(t.slots["status"] != FREE)) == 1


def test_pending_delete_is_not_reused_by_another_key_unless_default_group():
    t = table(capacity=64, stripes=4)
    ks = keys_in_stripe(t, 3, t.g.max_per_stripe)
    for k in ks:
        t.get_flow(k, create=True, group=5)
        t.put_flow(k)
    for k in ks:
        t.del_flow(k)  # pending deletes in a protected group
    # Every slot of the run is now live or a pending tombstone except the 1/8 headroom.
    other = keys_in_stripe(t, 3, len(ks) + t.g.slots_per_stripe)[len(ks):]
    created = 0
    with pytest.raises(TableFull, match="pending deletes"):
        for k in other:
            t.get_flow(k, create=True, group=5)
            t.put_flow(k)
            created += 1
    assert created == t.g.slots_per_stripe - len(ks)
    # Once the RM has shipped the deletes (modified cleared), the tombstones are reusable.
    tomb = t.slots["status"] == TOMBSTONE
    t.slots["modified"][tomb] = 0
    t.get_flow(other[created], create=True, group=5)
    t.put_flow(other[created])


def test_standby_is_invisible_until_activated():
    t = table(replica=2)
    k = key(21)
    assert t.install_standby(k, group=7, owner=1, version=4, epoch=9, state=b"S" * 16) == "installed"
    assert t.get_flow(k) is None
    with pytest.raises(FlowIsStandby, match="activate"):
        t.get_flow(k, create=True)
    assert t.install_standby(k, 7, 1, 5, 10, b"T" * 16) == "updated"
    idx, status = t.lookup(k)
    assert status == STANDBY and t.slots[idx]["ckpt_epoch"] == 10 and t.slots[idx]["owner"] == 1
    assert list(t.standby_indices(owner=1)) == [idx] and list(t.standby_indices(group=8)) == []
    assert t.activate_slots(t.standby_indices(owner=1), new_group=3) == [k]
    st = t.get_flow(k)
    assert bytes(st) == b"T" * 16
    t.put_flow(k, modified=False)
    s = t.slots[idx]
    assert s["owner"] == 2 and s["group"] == 3 and s["modified"] == 1
    assert t.activate_slots([idx]) == []  # already active: nothing to do


def test_standby_never_overwrites_an_active_flow():
    t = table()
    k = key(22)
    t.get_flow(k, create=True)[:2] = b"AA"
    t.put_flow(k)
    assert t.install_standby(k, 1, 2, 1, 1, b"B" * 16) == "conflict"
    assert t.install_standby(k, 1, 2, 1, 2, None) == "conflict"
    assert bytes(t.get_flow(k)[:2]) == b"AA"
    t.put_flow(k)


def test_standby_delete_and_unknown_delete():
    t = table()
    k = key(23)
    assert t.install_standby(k, 1, 2, 1, 1, None) == "absent"
    t.install_standby(k, 1, 2, 1, 1, b"x" * 16)
    assert t.install_standby(k, 1, 2, 2, 2, None) == "deleted"
    assert t.lookup(k)[1] == TOMBSTONE
    assert t.install_standby(k, 1, 2, 3, 3, b"y" * 16) == "installed"


def test_counts_and_describe():
    t = table()
    for i in range(5):
        t.get_flow(key(i), create=True)
        t.put_flow(key(i))
    t.del_flow(key(0))
    c = t.counts()
    assert c["active"] == 4 and c["tombstone"] == 1
    idx, _ = t.lookup(key(1))
    d = t.describe_slot(idx)
    assert d["status"] == "active" and d["flow"].startswith("tcp 10.0.0.1:1001")
    assert abi.STATUS_NAMES[int(t.slots[idx]["status"])] == "active"


def test_stripe_counters_match_a_full_scan_under_random_operations():
    import random
    rng = random.Random(7)
    t = table(capacity=256, stripes=4, replica=1)
    pool = [key(i) for i in range(120)]
    for step in range(3000):
        k = rng.choice(pool)
        op = rng.random()
        try:
            if op < 0.45:
                if t.get_flow(k, create=True, group=rng.choice([0, 1])) is not None:
                    t.put_flow(k)
            elif op < 0.7:
                t.del_flow(k)
            elif op < 0.85:
                t.install_standby(k, 1, 2, step, step, None if rng.random() < 0.3 else b"s" * 16)
            elif op < 0.95:
                idx, status = t.lookup(k)
                if status == STANDBY:
                    t.activate_slots([idx])
            else:  # the RM checkpointed the group's deletes
                t.slots["modified"][t.slots["status"] == TOMBSTONE] = 0
        except (TableFull, FlowIsStandby):
            pass
        if step % 100 == 0:
            c = t.counts()
            assert int(t.stripes["live"].sum()) == c["active"] + c["standby"], step
            assert int(t.stripes["tombstones"].sum()) == c["tombstone"], step
    # One slot per key, always.
    live = t.slots[t.slots["status"] != FREE]
    keys = [bytes(r["key"].tobytes()) for r in live]
    assert len(keys) == len(set(keys))
