"""A first end-to-end checkpoint: r1's middlebox updates flows, the RM ships the epoch to r2's
SMM, the ack commits it, and only then does the held output leave (real SMM processes, real
shared memory; the packet segment stands in for r1's PMM in this process)."""
import struct
import time

from pmm.audit import violations
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
        assert violations([{"g": v.group, "e": v.epoch, "c": v.committed, "b": v.buffering}
                           for v in out]) == []
        assert int(store.seg.groups[1]["epoch"]) == 2  # the next epoch is open
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
