"""The checkpoint epoch state machine, driven by a fake clock."""
from rm.epochs import (Capture, Commit, GroupEpochs, OpenEpoch, Resume, Send, Stuck, Suspend,
                       Unprotect, due_order)


def g(**kw):
    return GroupEpochs(group=7, frequency_hz=1000, now=0.0, **kw)


def test_nothing_before_the_epoch_ends():
    grp = g()
    assert grp.step(0.0005) == []


def test_a_full_epoch_in_the_papers_order():
    grp = g()
    # The suspension comes first, alone: quiescence seen before it proves nothing.
    assert grp.step(0.001, quiescent=True, open_transactions=0) == [Suspend(7)]
    acts = grp.step(0.0011, quiescent=True, open_transactions=0)
    assert acts == [Capture(7, 1), OpenEpoch(7, 2), Resume(7), Send(7, 1, 0, 0)]
    assert grp.epoch == 2 and grp.committed == 0
    assert grp.on_ack(1, 0.0013) == [Commit(7, 1)]
    assert grp.committed == 1 and abs(grp.commit_latencies[0] - 0.0002) < 1e-9  # sent at 1.1 ms


def test_waits_for_quiescence_and_open_transactions():
    grp = g()
    assert grp.step(0.001, quiescent=True) == [Suspend(7)]
    assert grp.step(0.0011, quiescent=False) == []
    assert grp.step(0.00115, quiescent=True, open_transactions=2) == []
    acts = grp.step(0.0012, quiescent=True, open_transactions=0)
    assert acts[0] == Capture(7, 1) and Resume(7) in acts


def test_a_stuck_drain_is_reported_counted_and_not_waited_on_forever():
    grp = g(drain_timeout=0.01)
    grp.step(0.001, quiescent=False)
    assert grp.step(0.005, quiescent=False) == []
    acts = grp.step(0.0111, quiescent=True, open_transactions=1)
    assert acts == [Stuck(7, 1, 1, True), Resume(7)]
    assert grp.stuck == 1 and grp.epoch == 1  # the epoch was not taken
    assert grp.step(0.0122)[0] == Suspend(7)  # the next period tries again


def test_sends_are_pipelined_and_acks_cumulative():
    grp = g(max_inflight=3)
    sends = []
    t = 0.0
    for _ in range(5):
        t += 0.001
        grp.step(t)                       # suspend
        sends += [a for a in grp.step(t + 0.0001) if isinstance(a, Send)]
    # three epochs in flight, then it stops suspending until acks come back
    assert [(s.epoch, s.base) for s in sends] == [(1, 0), (2, 1), (3, 2)]
    assert grp.on_ack(3, t) == [Commit(7, 3)] and grp.inflight == {}
    assert grp.on_ack(2, t) == []  # a late, smaller ack changes nothing
    t += 0.001
    grp.step(t)
    assert any(isinstance(a, Send) and a.epoch == 4 and a.base == 3 for a in grp.step(t + 1e-4))


def test_retries_then_unprotects_when_the_backup_is_gone():
    grp = g(ack_timeout=0.1, max_retries=2)
    grp.step(0.001)
    grp.step(0.0011)
    retries = []
    t = 0.001
    for _ in range(40):
        t += 0.05
        for a in grp.step(t):
            if isinstance(a, Send) and a.retry:
                retries.append(a)
            if isinstance(a, Unprotect):
                assert a.epoch == 1
                assert len([r for r in retries if r.epoch == 1]) == 2
                assert not grp.protected and grp.step(t + 1) == []
                return
    raise AssertionError("never unprotected")


def test_many_groups_are_served_by_deadline():
    groups = [GroupEpochs(group=i, frequency_hz=f, now=0.0)
              for i, f in enumerate([1000, 100, 5000, 10])]
    assert [x.group for x in due_order(groups)] == [2, 0, 1, 3]
