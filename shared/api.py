"""The middlebox API in Python: attach to a replica's flow segment, then get/put/del flows.

    from shared.api import attach
    with attach("/pico.demo.r1.flows") as pico:       # or attach_replica(config, "r1")
        state = pico.get_flow(key, create=True)       # writable memoryview of the flow's state
        state[0:4] = b"seen"
        pico.put_flow(key, modified=True)

The C library (shared/libpico.c, pico.h) implements the same calls over the same layout.
"""
from __future__ import annotations

import os
import sys
import time

from . import abi
from .errors import AttachError, FlowLockTimeout, SegmentCorrupt
from .flowtable import FlowTable, Geometry
from .locks import StripeLocks
from .segment import Segment, attach_segment, proc_start_time, process_alive, wait_for_segment

from .words import word_views


def flow_segment_name(shm_prefix: str, cluster: str, replica: str) -> str:
    """/<shm_prefix>.<cluster>.<replica>.flows (pico_abi.h, "Naming")."""
    return f"/{shm_prefix}.{cluster}.{replica}.flows"


def sem_prefix(shm_prefix: str, cluster: str, replica: str) -> str:
    return f"/{shm_prefix}.{cluster}.{replica}"


class FlowClient:
    """An attached middlebox (or any non-owner process): the flow API over a mapped segment."""

    def __init__(self, seg: Segment, name: str = ""):
        self.segment = seg
        desc = seg.view(abi.FLOW_DESC, abi.FLOW_DESC_OFFSET)
        self.geometry = Geometry.from_desc(desc, seg.size)
        self.geometry.check(seg.name)
        prefix = sem_prefix_of(desc, seg.name)
        timeout = int(desc["lock_timeout_ms"]) / 1000.0
        del desc
        try:
            self.locks = StripeLocks(prefix, self.geometry.n_stripes, seg.buf,
                                     self.geometry.stripes_offset, timeout)
        except AttachError as e:  # say which segment named the missing semaphores
            raise type(e)(f"flow segment {seg.name}: {e}") from None
        self.table = FlowTable(seg.buf, self.geometry, self.locks,
                               int(seg.header["owner_replica"]))
        self._client_slot = -1
        try:
            self._register(name or os.path.basename(sys.argv[0] or "python"))
        except BaseException:
            self.close()
            raise
        # The hot-path methods, bound once.
        self.get_flow = self.table.get_flow
        self.put_flow = self.table.put_flow
        self.del_flow = self.table.del_flow

    @property
    def state_size(self) -> int:
        return self.geometry.state_size

    def _register(self, name: str) -> None:
        clients = self.segment.view(abi.CLIENT, self.geometry.clients_offset, abi.MAX_CLIENTS)
        reg = self.locks.registry
        _take_registry(reg, self.locks.timeout_s, self.segment.name)
        try:
            for i in range(abi.MAX_CLIENTS):
                if int(clients[i]["pid"]) == 0:
                    clients[i]["start_time"] = proc_start_time(os.getpid()) or 0
                    clients[i]["attached_ns"] = time.time_ns()
                    clients[i]["lang"] = abi.LANG_PYTHON
                    clients[i]["name"] = name.encode()[:31]
                    clients[i]["pid"] = os.getpid()  # publish last
                    self._client_slot = i
                    return
        finally:
            reg.release()
            del clients
        raise AttachError(f"flow segment {self.segment.name} already has {abi.MAX_CLIENTS} "
                          "attached processes: detach idle middleboxes, or wait for the SMM to "
                          "reap dead ones")

    def close(self) -> None:
        """Detach: free the client entry, close the semaphores, unmap."""
        if self._client_slot >= 0 and self.locks.registry is not None:
            off = self.geometry.clients_offset + self._client_slot * abi.CLIENT.itemsize
            _take_registry(self.locks.registry, self.locks.timeout_s, self.segment.name)
            try:
                (pids,) = word_views(self.segment.buf, "q")
                if pids[off >> 3] == os.getpid():
                    pids[off >> 3] = 0
                pids.release()
            finally:
                self.locks.registry.release()
            self._client_slot = -1
        self.locks.close()
        self.table.release_views()
        self.get_flow = self.put_flow = self.del_flow = None
        self.segment.close()

    def __enter__(self) -> "FlowClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sem_prefix_of(desc, where: str) -> str:
    """The descriptor's semaphore prefix; SegmentCorrupt if it is not one (garbage bytes)."""
    raw = bytes(desc["sem_prefix"]).split(b"\0", 1)[0]
    try:
        prefix = raw.decode()
    except UnicodeDecodeError:
        prefix = ""
    if not prefix.startswith("/") or len(prefix) < 2:
        raise SegmentCorrupt(f"segment {where}: its semaphore prefix {raw[:48]!r} is not a "
                             "'/name': the segment is corrupt; restart its owner to rebuild it")
    return prefix


def _take_registry(sem, timeout: float, where: str) -> None:
    import posix_ipc
    try:
        sem.acquire(timeout)
    except posix_ipc.BusyError:
        raise FlowLockTimeout(f"client registry of {where} not acquired in {timeout:.3g} s: a "
                              "process died attaching; the SMM recovers it within a deadline, "
                              "so retry") from None


def attach(segment_name: str, timeout: float = 2.0, name: str = "",
           wait: bool = False) -> FlowClient:
    """Attach to a flow segment by name; raises an AttachError subclass on any failure.
    wait=True waits up to `timeout` for the SMM to create the segment."""
    seg = (wait_for_segment(segment_name, abi.SEG_FLOWS, timeout) if wait else
           attach_segment(segment_name, abi.SEG_FLOWS, timeout))
    try:
        return FlowClient(seg, name)
    except BaseException:
        seg.close()
        raise


def attach_replica(config, replica: str, timeout: float = 2.0, name: str = "",
                   wait: bool = False) -> FlowClient:
    """Attach to the flow segment of `replica` in a loaded ClusterConfig."""
    config.replica(replica)  # a clear error for an unknown name
    return attach(flow_segment_name(config.cluster.shm_prefix, config.cluster.name, replica),
                  timeout, name, wait)


__all__ = ["attach", "attach_replica", "FlowClient", "flow_segment_name", "sem_prefix",
           "SegmentCorrupt", "process_alive"]
