"""The packet segment with real shared memory in one process: ingress, the middlebox API,
suspend/resume, output commit. (The NFQUEUE shell is tested in test_pmm_net.py.)"""
import resource
import threading
import time

import pytest

from pmm.audit import record, violations
from pmm.core import ACCEPT, DROP, DROP_FULL, QUEUED, SEND
from pktbuild import dns, other, web
from shared import abi
from shared.packets import attach_packets

WEB, DNS = 1, 2


@pytest.fixture
def env(packet_bed):
    """The packet bed plus a Python middlebox attached to it."""
    store, ingress, releaser, ctl, _, known = packet_bed
    mb = attach_packets(store.name)
    yield store, ingress, releaser, mb, ctl, known
    mb.close()


def test_ingress_classifies_new_flows_and_reuses_known_ones(env):
    store, ingress, _, mb, _, known = env
    assert ingress.on_packet(1, web(1)) == QUEUED
    p = mb.pkt_read(timeout=1)
    assert (p.group, p.packet_id, p.data) == (WEB, 1, web(1)) and p.is_new_flow
    assert ingress.on_packet(2, web(1)) == QUEUED  # cached now: not new
    assert not mb.pkt_read(timeout=1).is_new_flow
    # A flow the table already knows (e.g. activated at failover) keeps its group.
    from pmm.parse import parse
    known[parse(other(3)).key] = DNS
    ingress.on_packet(3, other(3))
    assert mb.pkt_read(timeout=1).group == DNS
    ingress.on_packet(4, other(4))
    assert mb.pkt_read(timeout=1).group == abi.GROUP_DEFAULT
    ingress.on_packet(5, b"\x45garbage")
    p = mb.pkt_read(timeout=1)
    assert p.group == abi.GROUP_DEFAULT and not p.has_flow
    c = store.seg.counters
    assert int(c["rx_packets"]) == 5 and int(c["malformed"]) == 1 and int(c["default_group"]) == 2


def test_full_input_ring_drops_and_counts(env):
    store, ingress, *_ = env
    results = [ingress.on_packet(i, web(1)) for i in range(1, 20)]
    assert results.count(QUEUED) == 16 and results.count(DROP_FULL) == 3
    assert int(store.seg.counters["input_drops"]) == 3


def test_round_robin_no_group_starves(env):
    _, ingress, _, mb, _, _ = env
    for i in range(10):
        ingress.on_packet(100 + i, web(i))
    for i in range(3):
        ingress.on_packet(200 + i, dns(i))
    got = [mb.pkt_read(timeout=1).group for _ in range(6)]
    assert got.count(DNS) == 3  # interleaved with web, not after all ten of them


def test_suspend_holds_one_group_while_another_flows(env):
    store, ingress, _, mb, ctl, _ = env
    ctl.suspend(WEB)
    for i in range(3):
        ingress.on_packet(10 + i, web(i))
    ingress.on_packet(20, dns(0))
    assert mb.pkt_read(timeout=1).group == DNS
    assert mb.pkt_read(timeout=0.1) is None  # web waits in its ring
    assert len(store.seg.input_ring(1)) == 3
    ctl.resume(WEB)
    assert [mb.pkt_read(timeout=1).packet_id for _ in range(3)] == [10, 11, 12]


def test_blocked_reader_wakes_on_resume_and_does_not_spin(env):
    _, ingress, _, mb, ctl, _ = env
    ctl.suspend(WEB)
    ingress.on_packet(1, web(1))
    got = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    t = threading.Thread(target=lambda: got.append(mb.pkt_read(timeout=10)))
    t.start()
    time.sleep(0.3)  # the reader is blocked on the doorbell now (nothing to await instead)
    assert not got
    ctl.resume(WEB)
    t.join(5)
    assert got and got[0].packet_id == 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0 < 0.15


def test_output_held_until_commit_then_released_in_order(env):
    store, ingress, rel, mb, ctl, _ = env
    for i in range(4):
        ingress.on_packet(i + 1, web(i))
    for _ in range(2):
        mb.pkt_write(mb.pkt_read(timeout=1))       # tagged epoch 1
    ctl.open_epoch(WEB, 2)
    for _ in range(2):
        mb.pkt_write(mb.pkt_read(timeout=1))       # tagged epoch 2
    assert rel.drain() == []                        # nothing committed yet
    assert int(store.seg.groups[1]["held"]) == 4
    ctl.commit(WEB, 1)
    out = rel.drain()
    assert [(v.action, v.packet_id, v.epoch) for v in out] == [(ACCEPT, 1, 1), (ACCEPT, 2, 1)]
    ctl.commit(WEB, 2)
    assert [v.packet_id for v in rel.drain()] == [3, 4]
    assert violations([record(v) for v in out]) == []


def test_buffering_disabled_releases_at_once(env):
    _, ingress, rel, mb, ctl, _ = env
    ingress.on_packet(7, dns(1))
    mb.pkt_write(mb.pkt_read(timeout=1), b"rewritten")
    [v] = rel.drain()
    assert (v.action, v.packet_id, v.data, v.buffering) == (ACCEPT, 7, b"rewritten", 0)
    ctl.set_buffering(WEB, False)
    ingress.on_packet(8, web(1))
    mb.pkt_write(mb.pkt_read(timeout=1))
    [v] = rel.drain()
    assert v.packet_id == 8 and v.data is None  # unchanged bytes: no payload rewrite


def test_direct_drop_and_created_packets(env):
    store, ingress, rel, mb, ctl, _ = env
    ingress.on_packet(1, web(1))
    ingress.on_packet(2, web(2))
    mb.pkt_write_direct(mb.pkt_read(timeout=1))
    mb.pkt_drop(mb.pkt_read(timeout=1))
    assert mb.pkt_create(web(9), group=WEB)
    out = rel.drain()
    assert [(v.action, v.packet_id) for v in out] == [(ACCEPT, 1), (DROP, 2)]  # created: held
    ctl.commit(WEB, 1)
    [v] = rel.drain()
    assert v.action == SEND and v.data == web(9)
    row = store.seg.groups[1]
    assert (int(row["pkts_read"]), int(row["pkts_done"]), int(row["written_direct"]),
            int(row["dropped"]), int(row["created"])) == (2, 2, 1, 1, 1)


def test_full_output_ring_tells_the_caller(env):
    store, ingress, _, mb, _, _ = env
    for i in range(16):
        ingress.on_packet(i + 1, web(i))
    pkts = [mb.pkt_read(timeout=1) for _ in range(16)]
    for p in pkts:
        assert mb.pkt_write(p)
    ingress.on_packet(99, web(99))
    assert not mb.pkt_write(mb.pkt_read(timeout=1))
    row = store.seg.groups[1]
    assert int(row["output_full"]) == 1 and int(row["pkts_done"]) == 17


def test_checker_catches_a_release_that_broke_output_commit(env):
    """A release path that ignored the committed epoch must be flagged by the audit check."""
    _, ingress, rel, mb, _, _ = env
    ingress.on_packet(1, web(1))
    mb.pkt_write(mb.pkt_read(timeout=1))
    meta, _ = rel.seg.output_ring(1).pop()  # the buggy path: no epoch check
    row = rel.seg.groups[1]
    bad = {"g": meta.group, "e": meta.epoch, "c": int(row["committed"]), "b": int(row["buffering"])}
    assert violations([bad]) == [bad]


def test_one_middlebox_at_a_time(env):
    store, *_ = env
    import subprocess
    import sys
    code = ("import sys; sys.path.insert(0, '.');"
            "from shared.packets import attach_packets;"
            f"attach_packets({store.name!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(__import__('pathlib').Path(__file__).parents[1]))
    assert r.returncode != 0 and "already has a middlebox" in r.stderr


def test_a_suspension_between_count_and_take_leaves_the_packet(env, monkeypatch):
    """The RM suspends right after the middlebox counted a read: the packet must stay queued
    and the counts must balance, so the RM's quiescence check is not fooled."""
    import shared.packets as P
    store, ingress, _, mb, ctl, _ = env
    ingress.on_packet(1, web(1))
    real = P.fence

    def rm_suspends_now():
        store.seg.groups[1]["suspended"] = 1
        real()

    monkeypatch.setattr(P, "fence", rm_suspends_now)
    assert mb.pkt_read(timeout=0.1) is None
    monkeypatch.setattr(P, "fence", real)
    row = store.seg.groups[1]
    assert int(row["pkts_read"]) == int(row["pkts_done"]) and len(store.seg.input_ring(1)) == 1
    assert ctl.quiescent(WEB)
    ctl.resume(WEB)
    assert mb.pkt_read(timeout=1).packet_id == 1


def test_default_group_is_never_suspended_or_held(env):
    from shared.packets import PacketError
    *_, ctl, _ = env
    with pytest.raises(PacketError, match="never suspended"):
        ctl.suspend(abi.GROUP_DEFAULT)
    with pytest.raises(PacketError, match="never held"):
        ctl.set_buffering(abi.GROUP_DEFAULT, True)


def test_an_oversized_rewrite_is_dropped_and_counted_not_stuck(env):
    from shared.packets import PacketError
    store, ingress, rel, mb, _, _ = env
    ingress.on_packet(5, dns(1))
    p = mb.pkt_read(timeout=1)
    with pytest.raises(PacketError, match="exceeds the MTU"):
        mb.pkt_write(p, b"z" * 2000)
    row = store.seg.groups[2]
    assert int(row["pkts_done"]) == int(row["pkts_read"]) == 1
    assert [(v.action, v.packet_id) for v in rel.drain()] == [(DROP, 5)]
