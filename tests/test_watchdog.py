"""The watchdog's decisions as a pure function: a fake clock and a fake liveness test."""
import numpy as np

from smm.watchdog import PostRegistry, PostStripe, ReapClient, StripeMemory, plan_recovery

ALIVE = {100, 200}


def alive(pid, start):
    return pid in ALIVE and (start is None or start == 7)


def plan(now, holders, acq, values, clients=(), memory=None, registry=1):
    memory = memory if memory is not None else StripeMemory()
    return plan_recovery(now, np.array(holders), np.array(acq), np.array(values), list(clients),
                         alive, memory, orphan_after=1.0, own_pid=1, registry_value=registry)


def test_dead_holder_is_posted_live_one_is_not():
    acts = plan(0.0, [0, 100, 300, 1], [0, 5, 5, 5], [1, 0, 0, 0])
    assert acts == [PostStripe(2, "dead-holder", 300)]  # pid 1 is the SMM itself


def test_orphaned_stripe_needs_a_whole_deadline_without_progress():
    mem = StripeMemory()
    assert plan(0.0, [0, 0], [3, 9], [0, 1], memory=mem) == []
    assert plan(0.5, [0, 0], [3, 9], [0, 1], memory=mem) == []
    assert plan(1.0, [0, 0], [3, 9], [0, 1], memory=mem) == [PostStripe(0, "orphaned", 0)]


def test_progress_resets_the_orphan_clock():
    mem = StripeMemory()
    plan(0.0, [0], [3], [0], memory=mem)
    assert plan(0.9, [0], [4], [0], memory=mem) == []   # someone took and released it
    assert plan(1.5, [0], [4], [0], memory=mem) == []
    assert plan(2.0, [0], [4], [0], memory=mem) == [PostStripe(0, "orphaned", 0)]


def test_released_stripe_is_forgotten():
    mem = StripeMemory()
    plan(0.0, [0], [3], [0], memory=mem)
    plan(0.5, [0], [3], [1], memory=mem)
    assert plan(1.2, [0], [3], [0], memory=mem) == []


def test_dead_and_reused_pid_clients_are_reaped():
    clients = [(0, 100, 7), (1, 200, 8), (2, 555, 7)]  # 200 is alive but started elsewhen
    assert plan(0.0, [0], [0], [1], clients) == [ReapClient(1, 200), ReapClient(2, 555)]


def test_registry_taken_for_a_deadline_is_posted():
    mem = StripeMemory()
    assert plan(0.0, [0], [0], [1], memory=mem, registry=0) == []
    assert plan(0.6, [0], [0], [1], memory=mem, registry=0) == []
    assert plan(1.0, [0], [0], [1], memory=mem, registry=0) == [PostRegistry()]
    assert plan(1.1, [0], [0], [1], memory=mem, registry=0) == []
