"""The controller's failure detection and failover order, driven by a fake clock (pure)."""
import pytest

from sdn.core import (ORDER_REROUTE_FIRST, Activate, Controller, Failed, FailoverDone,
                      Reprotect, Reroute)
from sdn.ring import Ring, placements

R = ["r1", "r2", "r3"]


def ctl(**kw):
    return Controller(R, now=0.0, heartbeat_timeout=0.3, buckets=16, **kw)


def beat_all(c, now, but=()):
    for r in R:
        if r not in but:
            c.on_heartbeat(r, now)


def kinds(actions):
    return [type(a).__name__ for a in actions]


def test_start_steers_every_bucket_to_its_ring_primary():
    c = ctl()
    r, *views = c.start()
    want = tuple(p.primary for p in placements(Ring(R, 16), 16))
    assert r == Reroute(want, 1) and set(want) == set(R)
    assert views == [Reprotect(x, tuple(R), 1) for x in R]  # every replica learns the view


def test_silence_past_the_timeout_is_a_failure_and_the_order_is_activate_reroute_reprotect():
    c = ctl()
    t = 0.0
    for _ in range(5):                       # healthy heartbeats: nothing happens
        t += 0.1
        beat_all(c, t)
        assert c.tick(t) == []
    last = t
    for _ in range(3):                       # r1 goes quiet
        t += 0.1
        beat_all(c, t, but=["r1"])
        assert c.tick(t) == []
    t += 0.11
    acts = c.tick(t)
    assert acts[0] == Failed("r1", acts[0].reason, 2) and "no heartbeat" in acts[0].reason
    assert acts[1:] == [Activate("r2", "r1", 2), Activate("r3", "r1", 2)]
    assert c.on_activated("r2", 2, t + 0.01) == []           # waits for every survivor
    (reroute,) = c.on_activated("r3", 2, t + 0.02)
    assert isinstance(reroute, Reroute) and "r1" not in reroute.primaries
    old = placements(Ring(R, 16), 16)
    for b, p in enumerate(old):                               # r1's buckets go to its backups
        assert reroute.primaries[b] == (p.backup if p.primary == "r1" else p.primary)
    acts = c.on_rerouted(2, t + 0.05)
    assert acts == [Reprotect("r2", ("r2", "r3"), 2), Reprotect("r3", ("r2", "r3"), 2)]
    c.on_reprotected("r3", 2, t + 0.06)
    (done,) = c.on_reprotected("r2", 2, t + 0.07)
    assert isinstance(done, FailoverDone) and done.replica == "r1"
    assert done.detected == pytest.approx(t - last)
    assert done.activation == pytest.approx(0.02) and done.reroute == pytest.approx(0.03)
    assert c.phase == "idle" and c.alive == {"r2", "r3"}


def test_link_down_fails_at_once_and_lasting_unhealthiness_at_the_timeout():
    c = ctl()
    acts = c.on_link("r2", False, 0.05)
    assert kinds(acts) == ["Failed", "Activate", "Activate"] and acts[0].reason == "link down"
    assert c.on_link("r2", False, 0.06) == []                # already failed: once only
    c2 = ctl()                      # unhealthy: not refreshed, failed when it stays so
    assert c2.on_heartbeat("r3", 0.1, healthy=False, why="pmm heartbeat 0.8 s old") == []
    for t in (0.1, 0.2, 0.3):
        c2.on_heartbeat("r1", t)
        c2.on_heartbeat("r2", t)
        c2.on_heartbeat("r3", t, healthy=False, why="pmm heartbeat 0.8 s old")
    acts = c2.tick(0.35)
    assert kinds(acts)[0] == "Failed" and "pmm heartbeat" in acts[0].reason
    c3 = ctl()                      # a single late beat of a loaded process is forgiven
    c3.on_heartbeat("r3", 0.1, healthy=False, why="pmm heartbeat 0.31 s old")
    c3.on_heartbeat("r3", 0.15)
    assert c3.tick(0.3) == []


def test_a_silent_survivor_does_not_block_the_failover_forever():
    c = ctl(activation_timeout=0.5)
    c.on_link("r1", False, 1.0)
    c.on_activated("r2", 2, 1.1)
    beat_all(c, 1.3, but=["r1"])
    assert c.tick(1.4) == []
    beat_all(c, 1.55, but=["r1"])                            # alive, but r3 never answers
    acts = c.tick(1.6)
    assert kinds(acts) == ["Reroute"]


def test_late_and_stale_answers_change_nothing():
    c = ctl()
    c.on_link("r1", False, 1.0)
    assert c.on_rerouted(2, 1.0) == []                       # not in that phase
    assert c.on_activated("r2", 99, 1.0) == []               # another view
    assert c.phase == "activating"


def test_a_second_failure_waits_for_the_first_failover():
    c = ctl()
    c.on_link("r1", False, 1.0)
    acts = c.on_link("r2", False, 1.01)
    assert kinds(acts) == ["Failed"]                         # queued behind r1's failover
    c.on_activated("r2", 2, 1.02)                            # (r2 answered before dying)
    (reroute,) = c.on_activated("r3", 2, 1.02)
    assert set(reroute.primaries) == {"r3"}                  # steers around both
    acts = c.on_rerouted(2, 1.03)
    assert acts == [Reprotect("r3", ("r3",), 2)]             # only the live one is asked
    acts = c.on_reprotected("r3", 2, 1.04)
    assert kinds(acts) == ["FailoverDone", "Activate"] and acts[1] == Activate("r3", "r2", 3)
    assert acts[0].replica == "r1"


def test_the_wrong_order_exists_for_the_negative_test():
    c = ctl(order=ORDER_REROUTE_FIRST)
    acts = c.on_link("r1", False, 1.0)
    assert kinds(acts) == ["Failed", "Reroute"]
    acts = c.on_rerouted(2, 1.01)
    assert kinds(acts) == ["Activate", "Activate"]
    with pytest.raises(ValueError):
        Controller(R, 0.0, order="sideways")


def test_the_last_replica_failing_leaves_buckets_unsteered():
    c = Controller(["r1"], now=0.0, buckets=4)
    acts = c.on_link("r1", False, 0.1)
    assert kinds(acts) == ["Failed", "Reroute"]              # no survivor to activate
    assert acts[1].primaries == (None,) * 4


def test_a_replica_is_judged_once_it_has_beaten_or_after_the_startup_grace():
    c = Controller(R, now=0.0, heartbeat_timeout=0.3, startup_grace=5.0)
    for t in (1.0, 2.0, 3.0):                     # r1, r2 up; r3 still starting
        c.on_heartbeat("r1", t)
        c.on_heartbeat("r2", t)
        assert c.tick(t) == []
    c.on_heartbeat("r3", 3.5)                     # r3 is up: from now on it is judged
    c.on_heartbeat("r1", 3.7)
    c.on_heartbeat("r2", 3.7)
    assert [a.replica for a in c.tick(3.75) if isinstance(a, Failed)] == []
    c.on_heartbeat("r1", 4.0)
    c.on_heartbeat("r2", 4.0)
    assert [a.replica for a in c.tick(4.1) if isinstance(a, Failed)] == ["r3"]
    c2 = Controller(R, now=0.0, heartbeat_timeout=0.3, startup_grace=5.0)
    for t in (1.0, 4.0, 5.1):
        c2.on_heartbeat("r1", t)
        c2.on_heartbeat("r2", t)
    acts = c2.tick(5.1)                           # r3 never came up
    assert [a.replica for a in acts if isinstance(a, Failed)] == ["r3"]


def test_a_restarted_controller_adopts_the_clusters_view_without_a_failover():
    c = ctl()
    acts = c.adopt(5, ["r2", "r3"], 0.1)
    assert c.view == 5 and c.alive == {"r2", "r3"}
    (reroute,) = acts
    assert reroute == Reroute(c.primaries(), 5) and "r1" not in reroute.primaries
    assert c.adopt(4, ["r1", "r2", "r3"], 0.2) == []         # older: ignored
    assert not any(isinstance(a, Failed) for a in c.on_link("r1", False, 0.3))  # not ours


GROUPS = {"r1": 1001, "r2": 1002, "r3": 1003, "r4": 1004}


def test_scale_in_freezes_then_activates_reroutes_and_reprotects():
    from sdn.core import Freeze
    c = Controller(R, now=0.0, chord_groups=GROUPS)
    acts = c.scale_in("r1", 1.0)
    assert acts == [Freeze("r1", None, 2)]                  # no Failed: it is leaving
    acts = c.on_frozen("r1", 2, 1.2)
    assert acts == [Activate("r2", "r1", 2), Activate("r3", "r1", 2)]
    c.on_activated("r2", 2, 1.21)
    (rr,) = c.on_activated("r3", 2, 1.22)
    assert "r1" not in rr.primaries
    c.on_rerouted(2, 1.3)
    c.on_reprotected("r2", 2, 1.31)
    (done,) = c.on_reprotected("r3", 2, 1.32)
    assert done.kind == "scale-in" and c.alive == {"r2", "r3"}
    assert c.on_heartbeat("r1", 5.0) == [] and c.tick(9.0 - 8.7) == []  # r1 is not judged
    assert Controller(["r1"], 0.0).scale_in("r1", 1.0) == []            # never the last one


def test_scale_out_moves_the_newcomers_buckets_live():
    from sdn.core import Freeze, Handoff
    c = Controller(["r1", "r2", "r3", "r4"], now=0.0, members=R, chord_groups=GROUPS)
    assert "r4" not in c.primaries()
    acts = c.scale_out("r4", 1.0)
    assert [type(a).__name__ for a in acts] == ["Reprotect"] * 4 and acts[0].view == 2
    assert acts[0].alive == ("r1", "r2", "r3", "r4")
    for i, r in enumerate(["r1", "r2", "r3", "r4"]):
        acts = c.on_reprotected(r, 2, 1.1 + i / 100)
    assert acts == [Freeze(r, 1004, 2) for r in R]          # the old members hold to-r4
    for r in R:
        acts = c.on_frozen(r, 2, 1.2)
    assert acts == [Activate("r4", None, 2, 1004)]          # the newcomer takes them over
    (rr,) = c.on_activated("r4", 2, 1.3)
    assert "r4" in rr.primaries
    acts = c.on_rerouted(2, 1.4)
    assert acts == [Handoff(r, 1004, 2) for r in R]
    for r in R:
        acts = c.on_handed_off(r, 2, 1.5)
    assert [a.view for a in acts] == [3] * 4                 # re-protection in a new view
    for r in ["r1", "r2", "r3", "r4"]:
        acts = c.on_reprotected(r, 3, 1.6)
    assert acts[0].kind == "scale-out" and c.alive == {"r1", "r2", "r3", "r4"}
    assert c.scale_out("r4", 2.0) == []                     # already in


def test_the_controllers_own_pause_is_not_the_replicas_silence():
    """pico-sdn SIGSTOPped (or starved) for 2.5 s: the beats sent meanwhile are still queued
    when it runs again; its loop pauses the clock so nobody fails for that (the fault matrix
    found every replica failed after a SIGSTOP/SIGCONT of pico-sdn)."""
    c = ctl()
    beat_all(c, 1.0)
    c.pause(2.5)
    assert c.tick(3.5) == []                       # the queued beats come in right after
    beat_all(c, 3.6, but=("r3",))
    beat_all(c, 3.8, but=("r3",))
    acts = c.tick(3.85)                            # r3 really is silent: failed as usual
    assert kinds(acts)[0] == "Failed" and acts[0].replica == "r3"


def test_silence_of_most_replicas_at_once_is_our_partition_not_their_death():
    """A control-network partition: every replica is silent together. Failing them all would
    steer traffic around every middlebox (the fault matrix saw it): the controller reports
    its isolation once and fails nobody; when they are heard again nothing has changed."""
    c = ctl()
    beat_all(c, 1.0)
    acts = c.tick(1.5)                               # all three silent for 0.5 s
    assert [type(a).__name__ for a in acts] == ["Isolated"]
    assert acts[0].silent == ("r1", "r2", "r3") and acts[0].heard == 0
    assert c.tick(1.8) == [] and c.alive == {"r1", "r2", "r3"}   # reported once
    # the silences expire a beat apart: the first one to time out is not failed either
    c2 = ctl()
    beat_all(c2, 1.0)
    beat_all(c2, 1.05, but=("r1",))
    assert kinds(c2.tick(1.31)) == ["Isolated"] and c2.alive == {"r1", "r2", "r3"}
    beat_all(c, 2.0)
    assert c.tick(2.1) == [] and c.view == 1 and not c.isolated
    # two of three silent: still the likelier partition (1 heard < 2 silent)
    beat_all(c, 3.0, but=("r1", "r2"))
    beat_all(c, 3.3, but=("r1", "r2"))
    assert kinds(c.tick(3.4)) == ["Isolated"] and c.alive == {"r1", "r2", "r3"}
    # ...but a link down is evidence, and still fails a replica
    assert kinds(c.on_link("r1", False, 3.5))[0] == "Failed"


def test_one_silent_replica_of_two_still_fails_over_and_the_last_one_never_on_silence():
    c = ctl()
    beat_all(c, 1.0)
    beat_all(c, 1.3, but=("r1",))
    assert kinds(c.tick(1.4))[0] == "Failed"         # 2 heard >= 1 silent
    c2 = Controller(["r1"], 0.0, heartbeat_timeout=0.3)
    c2.on_heartbeat("r1", 1.0)
    assert kinds(c2.tick(2.0)) == ["Isolated"] and c2.alive == {"r1"}


def test_an_unhealthy_report_fails_a_replica_even_while_others_are_silent():
    c = ctl()
    beat_all(c, 1.0)
    c.on_heartbeat("r1", 1.1, healthy=False, why="smm heartbeat 2.0 s old")
    acts = c.tick(1.5)            # r1 stale with evidence; r2, r3 silent (no quorum)
    assert "Failed" in kinds(acts) and c.alive == {"r2", "r3"}


def test_after_a_partition_heals_a_late_member_gets_one_more_timeout_then_is_judged():
    c = ctl()
    beat_all(c, 1.0)
    assert kinds(c.tick(1.5)) == ["Isolated"]
    beat_all(c, 3.0, but=("r1",))        # healed, but r1's transport is still backing off
    assert c.tick(3.05) == [] and c.alive == {"r1", "r2", "r3"} and not c.isolated
    beat_all(c, 3.2, but=("r1",))
    assert c.tick(3.3) == []             # within its new timeout
    c.on_heartbeat("r1", 3.32)           # it is back
    beat_all(c, 3.5, but=("r1",))
    beat_all(c, 3.6, but=("r1",))
    acts = c.tick(3.65)                  # ...and then silent for real: failed as usual
    assert kinds(acts)[0] == "Failed" and acts[0].replica == "r1"
