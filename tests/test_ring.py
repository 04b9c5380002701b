"""Elastic Pico Chords: the consistent-hashing ring's placement rules (pure)."""
from collections import Counter

import pytest

from sdn.ring import Ring, placements, position

REPLICAS = ["r1", "r2", "r3", "r4"]


def test_positions_are_stable_and_spread():
    assert position("r1#0") == position("r1#0") != position("r1#1")
    # pinned: a ring must place flows identically in every process and release
    assert position("bucket0") == 0x87F4ECD2453BEE6E
    assert position("r1#0") == 0x9E3A40EFE2AC319D


def test_backup_is_another_replica_and_primaries_are_balanced():
    got = placements(Ring(REPLICAS, vnodes=64), 4096)
    assert all(p.backup is not None and p.backup != p.primary for p in got)
    load = Counter(p.primary for p in got)
    assert set(load) == set(REPLICAS)
    assert max(load.values()) < 1.5 * 4096 / len(REPLICAS)  # vnodes even the load out


@pytest.mark.parametrize("failed", REPLICAS)
def test_after_a_failure_each_flow_goes_to_its_backup_and_others_stay(failed):
    ring = Ring(REPLICAS, vnodes=16)
    before = placements(ring, 1024)
    after = placements(ring.without(failed), 1024)
    for b, (old, new) in enumerate(zip(before, after)):
        if old.primary == failed:
            assert new.primary == old.backup, b      # the replica holding the standby state
        else:
            assert new.primary == old.primary, b     # nothing else moves
        assert new.backup != failed and new.backup != new.primary


def test_scale_out_moves_only_what_the_new_replica_takes():
    ring = Ring(["r1", "r2", "r3"], vnodes=16)
    before = placements(ring, 1024)
    after = placements(ring.with_replica("r4"), 1024)
    moved = [b for b, (o, n) in enumerate(zip(before, after)) if o.primary != n.primary]
    assert moved and all(after[b].primary == "r4" for b in moved)
    assert 0.1 < len(moved) / 1024 < 0.4                 # about a quarter


def test_a_single_replica_has_no_backup():
    assert placements(Ring(["r1"]), 4) == [placements(Ring(["r1"]), 1)[0]] * 4
    assert placements(Ring(["r1"]), 1)[0].backup is None
    with pytest.raises(ValueError):
        Ring([])
