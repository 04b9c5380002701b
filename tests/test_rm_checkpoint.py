"""A first end-to-end checkpoint: r1's middlebox updates flows, the RM ships the epoch to r2's
SMM, the ack commits it, and only then does the held output leave (real SMM processes, real
shared memory; the packet segment stands in for r1's PMM in this process)."""
import struct

import pytest
import time

from pmm.audit import record, violations
from pktbuild import ipv4
from rm.server import RmServer
from shared.api import attach_replica
from shared.flowtable import STANDBY
from shared.packets import attach_packets

WEB = 1


def ipv4_key(i):
    from shared.flowkey import make_key
    return make_key("10.0.0.1", 30000 + i, "10.0.1.1", 80, 6)


def test_a_committed_epoch_matches_the_backup_and_releases_the_output(packet_bed, smm_factory):
    store, ingress, releaser, ctl, cfg, _ = packet_bed
    smm_factory(cfg, "r1")
    smm_factory(cfg, "r2")
    flows = attach_replica(cfg, "r1")
    mb = attach_packets(store.name)
    rm = RmServer(cfg, "r1")
    try:
        keys = []
        for i in range(5):  # five web flows, two packets each
            for n in range(2):
                ingress.on_packet(10 * i + n + 1, ipv4("10.0.0.1", "10.0.1.1", 6, 40000 + i, 80))
        for _ in range(10):
            pkt = mb.pkt_read(timeout=1)
            st = flows.get_flow(pkt.key, create=True, group=pkt.group)
            struct.pack_into("<Q", st, 0, struct.unpack_from("<Q", st)[0] + 1)
            mb.pkt_write(pkt)
            flows.put_flow(pkt.key, modified=True)
            keys.append(pkt.key)
        assert releaser.drain() == []                  # held: epoch 1 is not committed
        deadline = time.monotonic() + 5
        while int(store.seg.groups[1]["committed"]) < 1:
            assert time.monotonic() < deadline, rm.groups[WEB]
            rm.run_once()
        out = releaser.drain()
        assert len(out) == 10 and {v.epoch for v in out} == {1}
        assert violations([record(v) for v in out]) == []
        assert int(store.seg.groups[1]["epoch"]) >= 2  # later epochs are open (pipelined)
        with attach_replica(cfg, "r2") as backup:     # r2's standby state = r1's committed state
            for key in set(keys):
                idx, status = backup.table.lookup(key)
                assert status == STANDBY
                mine, _ = flows.table.lookup(key)
                assert bytes(backup.table.slots[idx]["state"]) == bytes(flows.table.slots[mine]["state"])
                assert int(backup.table.slots[idx]["ckpt_epoch"]) == 1
        # Nothing changed since: the next epoch ships nothing and still commits.
        deadline = time.monotonic() + 5
        while int(store.seg.groups[1]["committed"]) < 2:
            assert time.monotonic() < deadline
            rm.run_once()
    finally:
        rm.close()
        mb.close()
        flows.close()


import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from conftest import REPO  # noqa: E402


def _traffic(ingress, mb, flows, n, first_id):
    """n web packets through the middlebox, each updating its flow; their ids."""
    ids = []
    for i in range(n):
        ingress.on_packet(first_id + i, ipv4("10.0.0.1", "10.0.1.1", 6, 41000 + i % 3, 80))
    for _ in range(n):
        pkt = mb.pkt_read(timeout=2)
        st = flows.get_flow(pkt.key, create=True, group=pkt.group)
        st[0] = (st[0] + 1) % 256
        mb.pkt_write(pkt)
        flows.put_flow(pkt.key, modified=True)
        ids.append(pkt.packet_id)
    return ids


def _released(releaser, want, timeout=5.0):
    """Drain until `want` packets left (awaiting the RM's commit), or fail."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < want:
        got += releaser.drain()
        assert time.monotonic() < deadline, f"only {len(got)} of {want} released"
    return got


def _held_for(releaser, seconds):
    """Nothing leaves for `seconds` (the condition under test is an absence)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert releaser.drain() == []


@pytest.fixture
def pair(packet_bed, smm_factory):
    """r1 (SMM, a packet segment in place of its PMM, an in-process middlebox) and its
    backup r2's SMM: (store, ingress, releaser, cfg, backup, flows, mb)."""
    store, ingress, releaser, _, cfg, _ = packet_bed
    smm_factory(cfg, "r1")
    backup = smm_factory(cfg, "r2")
    flows = attach_replica(cfg, "r1")
    mb = attach_packets(store.name)
    yield store, ingress, releaser, cfg, backup, flows, mb
    mb.close()
    flows.close()


def test_pico_rm_process_holds_output_while_the_backup_hangs(pair):
    store, ingress, releaser, cfg, backup, flows, mb = pair
    rm = subprocess.Popen([sys.executable, "-m", "rm", "--config", str(cfg.path), "--replica",
                           "r1"], cwd=REPO)
    try:
        ids = _traffic(ingress, mb, flows, 6, 1)
        out = _released(releaser, 6)
        assert sorted(v.packet_id for v in out) == sorted(ids)
        assert violations([record(v) for v in out]) == []
        backup.proc.send_signal(signal.SIGSTOP)           # the backup hangs
        _traffic(ingress, mb, flows, 4, 100)
        _held_for(releaser, 0.2)                          # no ack, no release
        backup.proc.send_signal(signal.SIGCONT)
        out = _released(releaser, 4)
        assert all(v.epoch <= v.committed for v in out)
        assert rm.poll() is None
    finally:
        backup.proc.send_signal(signal.SIGCONT)
        rm.send_signal(signal.SIGTERM)
        assert rm.wait(10) == 0


def test_a_dead_backup_leaves_the_group_unprotected_and_output_flowing(pair):
    store, ingress, releaser, cfg, backup, flows, mb = pair
    rm = RmServer(cfg, "r1")
    try:
        backup.stop(signal.SIGKILL)
        _traffic(ingress, mb, flows, 3, 1)
        deadline = time.monotonic() + 10
        while WEB in rm.groups:                         # protected while it is here
            assert time.monotonic() < deadline
            rm.run_once()
            time.sleep(rm.next_wakeup(time.monotonic()))
        out = _released(releaser, 3)                     # released once unprotected
        assert {v.buffering for v in out} == {0}
        assert int(store.seg.groups[1]["buffering"]) == 0
        assert int(store.seg.groups[1]["protected_"]) == 0 and rm.unprotected_total == 2  # web, dns
        _traffic(ingress, mb, flows, 2, 50)              # and later output is not held
        assert len(_released(releaser, 2)) == 2
    finally:
        rm.close()


def test_a_dead_backup_does_not_delay_another_group(tmp_path, smm_factory):
    from conftest import write_config
    from pmm.store import PacketStore
    extra = ("groups: {a: {id: 1, target: r2, frequency_hz: 1000},"
             " b: {id: 2, target: r3, frequency_hz: 1000}}\n")
    cfg = write_config(tmp_path, replicas=3, extra=extra, request_timeout_ms=1000)
    store = PacketStore(cfg, "r1")
    smm_factory(cfg, "r1")
    dead = smm_factory(cfg, "r2")
    smm_factory(cfg, "r3")
    rm = RmServer(cfg, "r1")
    try:
        dead.stop(signal.SIGKILL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.5:  # half a second of a's retries
            rm.run_once()
            time.sleep(rm.next_wakeup(time.monotonic()))
        a, b = rm.groups[1], rm.groups[2]
        assert a.committed == 0 and a.inflight       # a waits for its dead backup...
        # ...while b keeps committing. Behind a's 1 s request timeouts (a synchronous sender)
        # b would have committed nothing in this half second.
        assert b.committed >= 3      # (idle: an epoch every rm.server.IDLE_MAX_S at least)
    finally:
        rm.close()
        store.close()


def _pump(rm, pred, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        rm.run_once()
        rm.wait()


def test_a_restarted_backup_gets_the_whole_group_again(tmp_path, smm_factory):
    """The backup's SMM restarts empty: its EPOCH_GAP makes the RM resend the group FULL."""
    from conftest import PACKET_GROUPS, write_config
    from pmm.store import PacketStore
    cfg = write_config(tmp_path, extra=PACKET_GROUPS, request_timeout_ms=3000)
    store = PacketStore(cfg, "r1")
    smm_factory(cfg, "r1")
    backup = smm_factory(cfg, "r2")
    flows = attach_replica(cfg, "r1")
    rm = RmServer(cfg, "r1", metrics=False)
    keys = [ipv4_key(i) for i in range(20)]
    try:
        for i, key in enumerate(keys):
            flows.get_flow(key, create=True, group=WEB)[0] = i
            flows.put_flow(key)
        _pump(rm, lambda: rm.groups[WEB].committed >= 2, "first commits")
        backup.stop(signal.SIGKILL)
        backup = smm_factory(cfg, "r2")                  # empty table, no stream
        before = rm.groups[WEB].committed
        _pump(rm, lambda: rm.groups[WEB].resyncs >= 1 and rm.groups[WEB].committed > before + 1,
              "resync and commits after it")
        with attach_replica(cfg, "r2") as b:
            for key in keys:                              # every flow, not only modified ones
                idx, status = b.table.lookup(key)
                mine, _ = flows.table.lookup(key)
                assert status == STANDBY
                assert bytes(b.table.slots[idx]["state"]) == bytes(flows.table.slots[mine]["state"])
    finally:
        rm.close()
        flows.close()
        store.close()


def test_the_controller_hears_of_an_unprotected_group(tmp_path, smm_factory):
    import json
    import zmq
    from conftest import PACKET_GROUPS, free_port, write_config
    from pmm.store import PacketStore
    from shared import wire
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = write_config(tmp_path, extra=PACKET_GROUPS, request_timeout_ms=200,
                       controller=endpoint)
    ctx = zmq.Context.instance()
    controller = ctx.socket(zmq.ROUTER)
    controller.setsockopt(zmq.LINGER, 0)
    controller.bind(endpoint)
    store = PacketStore(cfg, "r1")
    smm_factory(cfg, "r1")
    backup = smm_factory(cfg, "r2")
    rm = RmServer(cfg, "r1", metrics=False)
    try:
        _pump(rm, lambda: rm.groups[WEB].committed >= 1, "a first commit")
        backup.stop(signal.SIGKILL)
        events = []
        deadline = time.monotonic() + 10
        while len({e["group"] for e in events}) < 2:     # web and dns, both on r2
            assert time.monotonic() < deadline, events
            rm.run_once()
            rm.wait()
            while controller.poll(0):
                parts = controller.recv_multipart()
                msg = wire.decode(parts[-1], 1 << 20)
                assert msg.type == wire.EVENT
                if json.loads(msg.body)["event"] != "heartbeat":
                    events.append(json.loads(msg.body))
                controller.send_multipart(parts[:-1] + [wire.encode(
                    wire.EVENT | wire.REPLY_BIT, msg.seq, wire.json_body({"ok": True}))])
        ev = next(e for e in events if e["group"] == WEB)
        assert ev["event"] == "group_unprotected" and ev["replica"] == "r1"
        assert ev["target"] == "r2" and "did not acknowledge" in ev["reason"]
        _pump(rm, lambda: not rm.events.pending, "the events are acknowledged")
        assert rm.events.delivered >= 2
    finally:
        rm.close()
        controller.close()
        store.close()


def test_an_idle_group_skips_its_epochs_but_still_checkpoints_now_and_then(pair):
    from rm.server import IDLE_MAX_S
    store, ingress, releaser, cfg, backup, flows, mb = pair
    rm = RmServer(cfg, "r1", metrics=False)
    try:
        _pump(rm, lambda: rm.groups[WEB].committed >= 1, "a first (FULL) epoch")
        before = rm.groups[WEB].commits
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5 * IDLE_MAX_S:   # no packet at all
            rm.run_once()
            rm.wait()
        web = rm.groups[WEB]
        assert web.skipped > 0                            # 1000 Hz deadlines passed idle...
        assert 2 <= web.commits - before <= 25            # ...but an epoch every IDLE_MAX_S
        #                                                   (not 500: 0.5 s at 1000 Hz)
        _traffic(ingress, mb, flows, 3, 500)              # traffic: epochs again at once
        out, deadline = [], time.monotonic() + 5
        while len(out) < 3:
            assert time.monotonic() < deadline, f"{len(out)} of 3 released"
            rm.run_once()
            rm.wait()
            out += releaser.drain()
        assert violations([record(v) for v in out]) == []
    finally:
        rm.close()


def test_an_idle_rm_sleeps_on_its_doorbell_and_a_queued_packet_wakes_it(pair):
    """ABI 1.3: with every group idle the RM stops polling each period and sleeps with
    rm_waiting = 1; the PMM's post for a protected group's packet wakes it, and the packet's
    output is committed and released as usual."""
    from shared.packets import RM_WAITING, Doorbell
    store, ingress, releaser, cfg, backup, flows, mb = pair
    rm = RmServer(cfg, "r1")
    waiting = lambda: int(store.seg.counters["rm_waiting"])  # noqa: E731
    try:
        assert rm.ctl.rm_bell is not None
        passes, deadline = 0, time.monotonic() + 5
        while rm.bell_sleeps < 3:                # idle: the groups' deadlines find nothing
            assert time.monotonic() < deadline, (rm.bell_sleeps, rm._dormant)
            rm.run_once()
            rm.wait([])
            passes += 1
        assert waiting() == 0                    # awake between sleeps
        import threading
        stop = threading.Event()

        def loop():
            while not stop.is_set():
                rm.run_once()
                rm.wait([])
        t = threading.Thread(target=loop)
        t.start()
        try:
            deadline = time.monotonic() + 5
            while waiting() != 1:               # the RM is asleep on its doorbell now
                assert time.monotonic() < deadline
                time.sleep(0.001)
            bell = Doorbell(store.rm_bell, store.seg.segment.buf, RM_WAITING)  # the PMM's
            woken = rm.ctl.rm_bell.wakeups
            assert bell.ring()                  # it sleeps: the ring posts
            deadline = time.monotonic() + 2
            while rm.ctl.rm_bell.wakeups == woken:  # the relay hands the post to the RM
                assert time.monotonic() < deadline
                time.sleep(0.001)
            ingress.on_packet(7, ipv4("10.0.0.1", "10.0.1.1", 6, 42000, 80))
            bell.ring()                         # (if it sleeps again)
            pkt = mb.pkt_read(timeout=2)
            st = flows.get_flow(pkt.key, create=True, group=pkt.group)
            st[0] = 1
            mb.pkt_write(pkt)
            flows.put_flow(pkt.key, modified=True)
            out = _released(releaser, 1)
            assert out[0].packet_id == 7 and out[0].epoch <= out[0].committed
            assert violations([record(v) for v in out]) == []
        finally:
            stop.set()
            t.join(5)
    finally:
        rm.close()


def test_a_middlebox_that_reads_nothing_while_input_waits_makes_the_replica_unhealthy(pair):
    """A hung middlebox (SIGSTOP, a deadlock) is alive, so only its progress tells: packets
    queued in a group and pkts_read not moving. The RM's health report says so (and the
    controller fails the replica over on it); reading again makes it healthy."""
    store, ingress, releaser, cfg, backup, flows, mb = pair
    rm = RmServer(cfg, "r1")
    try:
        assert rm.health()["healthy"], rm.health()
        ingress.on_packet(1, ipv4("10.0.0.1", "10.0.1.1", 6, 43000, 80))
        stale = 3 * rm.beat_s
        deadline = time.monotonic() + stale + 5
        while rm.health()["healthy"]:               # not read: the stall is found
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "read nothing of group" in rm.health()["why"]
        pkt = mb.pkt_read(timeout=2)                # it reads again
        mb.pkt_write(pkt)
        assert rm.health()["healthy"], rm.health()
    finally:
        rm.close()
