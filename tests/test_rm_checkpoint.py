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
        assert b.committed >= 10
    finally:
        rm.close()
        store.close()
