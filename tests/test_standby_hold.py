"""Packets of a STANDBY flow that reach the backup's PMM before the flow's activation are held,
not dropped: StandbyHold with a fake clock, then Ingress on a real packet segment (packet_bed,
no NFQUEUE). The NFQUEUE path with a real SMM is in test_pmm_standby_net.py."""
import pytest

from pktbuild import dns, other, web
from pmm.core import (DROP_HOLD_FULL, FLOW_STANDBY, HELD, QUEUED, Held, Ingress, StandbyHold)
from pmm.parse import parse
from shared import abi
from shared.packets import attach_packets

HOLD = 0.5
WEB, DNS = 1, 2


def held(pid: int, pkt: bytes, since: float) -> Held:
    return Held(pid, pkt, parse(pkt), since)


class Table:
    """The flow table as the hold sees it: which keys are STANDBY, and who asked."""

    def __init__(self, *standby: bytes):
        self.standby = set(standby)
        self.asked: list[bytes] = []

    def __call__(self, key: bytes, h: int) -> bool:
        self.asked.append(key)
        return key in self.standby


A, B = parse(other(1)).key, parse(other(2)).key


def add(hold: StandbyHold, pid: int, pkt: bytes, now: float) -> bool:
    return hold.add(parse(pkt).key, held(pid, pkt, now))


# ---------------------------------------------------------------- StandbyHold, pure
def test_held_packets_wait_until_activation_then_leave_in_order():
    hold, table = StandbyHold(HOLD), Table(A, B)
    for i, pid in enumerate((1, 2, 3)):
        assert add(hold, pid, other(1), 10.0 + i * 0.01)
    assert add(hold, 9, other(2), 10.0)
    assert len(hold) == 4 and A in hold and B in hold
    assert hold.poll(10.05, 0, table) == ([], [])       # first look: both still standby
    table.asked.clear()
    assert hold.poll(10.1, 0, table) == ([], [])        # counter unchanged, nothing due
    assert table.asked == []                            # ... so the table is not read
    table.standby.discard(A)                            # the SMM activates A, bumps the counter
    queue, drop = hold.poll(10.2, 1, table)
    assert [h.packet_id for h in queue] == [1, 2, 3] and drop == []
    assert A not in hold and B in hold and len(hold) == 1


def test_a_counter_change_for_other_flows_keeps_the_packets():
    hold, table = StandbyHold(HOLD), Table(A)
    add(hold, 1, other(1), 0.0)
    hold.poll(0.0, 5, table)
    assert hold.poll(0.1, 6, table) == ([], [])         # some other flow was activated
    assert len(hold) == 1


def test_newer_packets_of_a_held_flow_wait_behind_the_older_ones():
    hold, table = StandbyHold(HOLD), Table(A)
    add(hold, 1, other(1), 0.0)
    hold.poll(0.0, 0, table)
    table.standby.clear()                               # activated ...
    add(hold, 2, other(1), 0.01)                        # ... but a packet came first: behind 1
    queue, _ = hold.poll(0.02, 1, table)
    assert [h.packet_id for h in queue] == [1, 2]


def test_packets_past_the_deadline_are_dropped_newer_ones_stay():
    hold, table = StandbyHold(HOLD), Table(A, B)
    add(hold, 1, other(1), 0.0)
    add(hold, 2, other(1), 0.3)
    add(hold, 3, other(2), 0.1)
    hold.poll(0.0, 0, table)
    assert hold.poll(0.49, 0, table) == ([], [])
    queue, drop = hold.poll(0.5, 0, table)             # held exactly hold_s: due
    assert queue == [] and [h.packet_id for h in drop] == [1]
    assert hold.next_due == pytest.approx(0.6)
    queue, drop = hold.poll(0.6, 0, table)
    assert [h.packet_id for h in drop] == [3]
    queue, drop = hold.poll(0.8, 0, table)
    assert [h.packet_id for h in drop] == [2] and len(hold) == 0 and not hold.flows


def test_a_flow_no_longer_standby_at_its_deadline_leaves_instead_of_dropping():
    """Its standby copy was deleted (or activated without a counter change we saw): the
    deadline's re-check finds it and queues the packets."""
    hold, table = StandbyHold(HOLD), Table(A)
    add(hold, 1, other(1), 0.0)
    hold.poll(0.0, 0, table)
    table.standby.clear()
    assert hold.poll(0.2, 0, table) == ([], [])         # nothing says to look yet
    queue, drop = hold.poll(0.5, 0, table)
    assert [h.packet_id for h in queue] == [1] and drop == []


def test_the_hold_is_bounded():
    hold, table = StandbyHold(HOLD, limit=3), Table(A, B)
    assert all(add(hold, i, other(1), 0.0) for i in range(3))
    assert not add(hold, 3, other(2), 0.0) and not add(hold, 4, other(1), 0.0)
    assert len(hold) == 3 and B not in hold
    table.standby.discard(A)
    hold.poll(0.1, 1, table)
    assert len(hold) == 0 and add(hold, 5, other(2), 0.1)  # room again


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        StandbyHold(0)
    with pytest.raises(ValueError):
        StandbyHold(1.0, limit=0)


# ---------------------------------------------------------------- Ingress on a packet segment
@pytest.fixture
def env(packet_bed):
    store, _, _, _, cfg, known = packet_bed
    from pmm.classify import Classifier
    ingress = Ingress(store.seg, Classifier(cfg), lambda key, h: known.get(key),
                      StandbyHold(HOLD, limit=8))
    mb = attach_packets(store.name)
    yield store, ingress, mb, known
    mb.close()


def counters(store) -> dict:
    return {n: int(store.seg.counters[n]) for n in abi.PKT_COUNTER_NAMES}


def test_ingress_holds_a_standby_flow_and_queues_it_on_activation(env):
    store, ingress, mb, known = env
    key = parse(web(1)).key
    known[key] = FLOW_STANDBY                             # installed from replica 2's checkpoint
    assert [ingress.on_packet(i, web(1, bytes([i])), now=1.0 + i / 100) for i in (1, 2, 3)] \
        == [HELD] * 3
    assert ingress.on_packet(4, dns(0), now=1.0) == QUEUED  # other flows are not held
    assert mb.pkt_read(timeout=1).packet_id == 4
    assert mb.pkt_read(timeout=0.05) is None              # nothing of the standby flow
    assert key not in ingress.cache                       # a standby flow's group is not cached
    assert ingress.poll_hold(1.1, 7) == ([], [])
    known[key] = DNS                                      # activated (into group 2, say)
    assert ingress.poll_hold(1.2, 7) == ([], [])          # the counter did not move: no look
    assert ingress.on_packet(5, web(1, b"\x05"), now=1.25) == HELD  # must not overtake 1-3
    actions = ingress.poll_hold(1.3, 8)
    assert [h.packet_id for h in actions.queue] == [1, 2, 3, 5] and actions.drop == []
    assert [ingress.requeue(h, 1.3) for h in actions.queue] == [QUEUED] * 4
    assert ingress.on_packet(6, web(1, b"\x06"), now=1.31) == QUEUED
    got = [mb.pkt_read(timeout=1) for _ in range(5)]
    assert [p.packet_id for p in got] == [1, 2, 3, 5, 6]
    assert {p.group for p in got} == {DNS} and not any(p.is_new_flow for p in got)
    assert [p.data for p in got] == [web(1, bytes([i])) for i in (1, 2, 3, 5, 6)]
    c = counters(store)
    assert (c["rx_packets"], c["standby_held"], c["standby_drops"]) == (6, 4, 0)
    assert int(store.seg.groups[store.seg.active_groups()[DNS]]["rx_packets"]) == 6


def test_ingress_drops_at_the_deadline_and_over_the_bound(env):
    store, ingress, mb, known = env
    key = parse(web(2)).key
    known[key] = FLOW_STANDBY
    results = [ingress.on_packet(i, web(2), now=0.0) for i in range(10)]
    assert results == [HELD] * 8 + [DROP_HOLD_FULL] * 2
    assert counters(store)["standby_drops"] == 2
    assert ingress.poll_hold(0.0, 0) == ([], [])
    actions = ingress.poll_hold(HOLD, 0)
    assert actions.queue == [] and [h.packet_id for h in actions.drop] == list(range(8))
    c = counters(store)
    assert (c["rx_packets"], c["standby_held"], c["standby_drops"]) == (10, 8, 10)
    assert mb.pkt_read(timeout=0.05) is None
    # Still standby: the next packet is held afresh.
    assert ingress.on_packet(20, web(2), now=1.0) == HELD


def test_a_flow_whose_standby_copy_vanished_is_queued_as_new_at_the_deadline(env):
    store, ingress, mb, known = env
    key = parse(web(3)).key
    known[key] = FLOW_STANDBY
    assert ingress.on_packet(1, web(3), now=0.0) == HELD
    del known[key]                                        # the primary deleted it, say
    actions = ingress.poll_hold(HOLD, 0)
    assert [ingress.requeue(h, HOLD) for h in actions.queue] == [QUEUED]
    p = mb.pkt_read(timeout=1)
    assert (p.packet_id, p.group, p.is_new_flow) == (1, WEB, True)  # by policy: tcp/80 -> web
    assert counters(store)["standby_drops"] == 0


def test_counters_reach_the_metrics(env):
    from prometheus_client import generate_latest
    from pmm.metrics import PmmMetrics
    store, ingress, _, known = env
    known[parse(web(4)).key] = FLOW_STANDBY
    ingress.on_packet(1, web(4), now=0.0)
    ingress.poll_hold(HOLD, 0)
    text = generate_latest(PmmMetrics("r1", None, store.seg).registry).decode()
    assert 'pico_pmm_packets_total{counter="standby_held",replica="r1"} 1.0' in text
    assert 'pico_pmm_packets_total{counter="standby_drops",replica="r1"} 1.0' in text
