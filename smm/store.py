"""The SMM's side of the flow segment: create it, own its lock stripes, unlink both at the end.

Creation follows pico_abi.h: remove what a crashed predecessor left (segment and semaphores),
create the segment, write the descriptor, create the semaphores, and publish the ready word
last. Only then may a middlebox attach.
"""
from __future__ import annotations

import numpy as np

from shared import abi
from shared.api import flow_segment_name, sem_prefix
from shared.errors import ConfigError
from shared.flowtable import FlowTable, Geometry, write_desc
from shared.locks import StripeLocks
from shared.security import shm_access
from shared.segment import Segment, create_segment


class FlowStore:
    """The owned flow table of one replica."""

    def __init__(self, config, replica: str):
        self.config = config
        self.replica = config.replica(replica)
        ft = config.flow_table
        self.name = flow_segment_name(config.cluster.shm_prefix, config.cluster.name, replica)
        self.sem_prefix = sem_prefix(config.cluster.shm_prefix, config.cluster.name, replica)
        if len(self.sem_prefix) >= abi.SEM_PREFIX_LEN:
            raise ConfigError(f"semaphore prefix {self.sem_prefix!r} is longer than "
                              f"{abi.SEM_PREFIX_LEN - 1} bytes: shorten cluster.name, "
                              "cluster.shm_prefix or the replica name", file=str(config.path))
        self.geometry = Geometry.plan(ft.capacity, ft.state_size, ft.lock_stripes)
        access = shm_access(config)
        self.segment: Segment = create_segment(self.name, abi.SEG_FLOWS,
                                               self.geometry.segment_size, self.replica.id,
                                               access)
        try:
            desc = self.segment.view(abi.FLOW_DESC, abi.FLOW_DESC_OFFSET)
            write_desc(desc, self.geometry, self.sem_prefix, ft.lock_timeout_ms)
            del desc
            self.counters = self.segment.view(abi.FLOW_COUNTERS, abi.FLOW_COUNTERS_OFFSET)
            self.clients = self.segment.view(abi.CLIENT, self.geometry.clients_offset,
                                             abi.MAX_CLIENTS)
            self.locks = StripeLocks(self.sem_prefix, self.geometry.n_stripes, self.segment.buf,
                                     self.geometry.stripes_offset, ft.lock_timeout_ms / 1000.0,
                                     create=True, access=access)
            self.table = FlowTable(self.segment.buf, self.geometry, self.locks, self.replica.id)
        except BaseException:
            self.segment.unlink()
            raise
        self.segment.publish()

    def bump(self, counter: str, n: int = 1) -> None:
        """Counters in the segment have one writer: this SMM."""
        self.counters[counter] = int(self.counters[counter]) + n

    def counter_values(self) -> dict[str, int]:
        return {name: int(self.counters[name]) for name in abi.FLOW_COUNTERS.names
                if name != "reserved"}

    def close(self, unlink: bool = True) -> None:
        if unlink:
            self.segment.unlink()
            self.locks.unlink()
        self.locks.close()
        self.table.release_views()
        self.counters = self.clients = None
        self.segment.close()


def clients_snapshot(clients: np.ndarray) -> list[dict]:
    out = []
    for i in range(len(clients)):
        pid = int(clients[i]["pid"])
        if pid:
            out.append({"entry": i, "pid": pid, "start_time": int(clients[i]["start_time"]),
                        "lang": int(clients[i]["lang"]),
                        "name": bytes(clients[i]["name"]).split(b"\0", 1)[0].decode("utf-8", "replace")})
    return out
