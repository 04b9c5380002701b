"""The PMM's side of the packet segment: create it from the config, own its doorbells.

Creation follows pico_abi.h: a dead predecessor's leftovers are removed, the descriptor and the
group table (entry 0 the default group, then the configured groups) are written, the doorbells
created, and the ready word published last.
"""
from __future__ import annotations

import posix_ipc

from shared import abi
from shared.api import sem_prefix
from shared.errors import ConfigError
from shared.packets import PacketSegment, doorbell_names, pkt_segment_name, rm_doorbell_name
from shared.locks import create_sem
from shared.security import shm_access
from shared.segment import create_segment


class PacketStore:
    def __init__(self, config, replica: str):
        self.config = config
        self.replica = config.replica(replica)
        pk = config.packets
        c = config.cluster
        self.name = pkt_segment_name(c.shm_prefix, c.name, replica)
        self.sem_prefix = sem_prefix(c.shm_prefix, c.name, replica)
        if len(self.sem_prefix) >= abi.SEM_PREFIX_LEN:
            raise ConfigError(f"semaphore prefix {self.sem_prefix!r} is longer than "
                              f"{abi.SEM_PREFIX_LEN - 1} bytes: shorten the names",
                              file=str(config.path))
        lay = abi.pkt_layout(pk.max_groups, pk.ring_slots, pk.mtu)
        access = shm_access(config)
        seg = create_segment(self.name, abi.SEG_PACKETS, lay["segment_size"], self.replica.id,
                             access)
        try:
            desc = seg.view(abi.PKT_DESC, abi.PKT_DESC_OFFSET)
            desc["max_groups"] = pk.max_groups
            desc["ring_slots"] = pk.ring_slots
            desc["slot_size"] = lay["slot_size"]
            desc["mtu"] = pk.mtu
            for f in ("groups_offset", "rings_offset", "ring_bytes", "n_rings"):
                desc[f] = lay[f]
            desc["sem_prefix"] = self.sem_prefix.encode()
            desc["groups_generation"] = 1
            groups = seg.view(abi.GROUP, lay["groups_offset"], pk.max_groups)
            self._init_group(groups[0], abi.GROUP_DEFAULT, 0, 0, False)
            for i, g in enumerate(config.groups.values(), start=1):
                target = config.replica(g.target).id if g.target else 0
                # Every replica's table lists every group; where this replica is the group's
                # own backup, nothing can protect it here: unprotected, output not held.
                mine = target == self.replica.id
                self._init_group(groups[i], g.id, g.frequency_hz, target,
                                 g.buffering and not mine, protected=not mine)
            del desc, groups
            self.bells = []
            for name in (*doorbell_names(self.sem_prefix), rm_doorbell_name(self.sem_prefix)):
                # (a predecessor's, maybe mid-count, is removed first)
                self.bells.append(create_sem(name, 0, access))
            self.in_bell, self.out_bell, self.rm_bell = self.bells
            self.seg = PacketSegment(seg)
        except BaseException:
            seg.unlink()
            raise
        seg.publish()

    @staticmethod
    def _init_group(row, gid: int, freq: int, target: int, buffering: bool,
                    protected: bool = True) -> None:
        """The control line as the config says; state ACTIVE written last."""
        row["id"] = gid
        row["frequency_hz"] = freq
        row["target"] = target
        row["buffering"] = int(buffering)
        row["suspended"] = 0
        row["protected_"] = int(bool(target) and protected)
        row["epoch"] = 1
        row["committed"] = 0
        row["state"] = abi.GROUP_ACTIVE

    def close(self, unlink: bool = True) -> None:
        segment = self.seg.segment
        self.seg.release_views()
        if unlink:
            segment.unlink()
            for name in (*doorbell_names(self.sem_prefix), rm_doorbell_name(self.sem_prefix)):
                try:
                    posix_ipc.unlink_semaphore(name)
                except posix_ipc.ExistentialError:
                    pass
        for b in self.bells:
            b.close()
        segment.close()
