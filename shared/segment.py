"""Create and attach POSIX shared-memory segments with Pico's versioned header.

The owner creates a segment, fills it, and only then writes the ready word (publish last); an
attacher validates the header in the order pico_abi.h documents and raises one distinct error
per failure. A segment left by a crashed owner is detected through its (pid, start time) pair.
"""
from __future__ import annotations

import mmap
import os
import time

import numpy as np
import posix_ipc

from . import abi
from .errors import AbiMismatch, SegmentCorrupt, SegmentMissing, SegmentNotReady, StaleOwner
from .security import ShmAccess

_OWNER_ONLY = ShmAccess()

_STAT_START_TIME_FIELD = 22


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot), or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
    rest = stat[stat.rindex(b")") + 2:].split()
    return int(rest[_STAT_START_TIME_FIELD - 3])


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """True if pid runs and, when given, started at start_time (so a reused pid is not alive)."""
    if pid <= 0:
        return False
    st = proc_start_time(pid)
    if st is None:
        return False
    if start_time is not None and st != start_time:
        return False
    # A zombie has a stat file but is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] not in (b"Z", b"X")
    except FileNotFoundError:
        return False


class Segment:
    """A mapped segment: `buf` is the writable mmap, `header` a numpy record over its first 128 B."""

    def __init__(self, name: str, mm: mmap.mmap, owner: bool):
        self.name = name
        self.mm = mm
        self.buf = memoryview(mm)
        self.owner = owner
        self.header = np.ndarray((), dtype=abi.SEG_HEADER, buffer=mm, offset=0)

    @property
    def size(self) -> int:
        return len(self.mm)

    def view(self, dtype: np.dtype, offset: int, count: int | None = None) -> np.ndarray:
        """A numpy view of `count` records of dtype at offset (a 0-d record if count is None)."""
        shape = () if count is None else (count,)
        return np.ndarray(shape, dtype=dtype, buffer=self.mm, offset=offset)

    def publish(self) -> None:
        """Write the ready word: the last store of segment creation (pico_abi.h)."""
        self.header["ready"] = abi.READY

    def close(self) -> None:
        """Unmap. Numpy views into the segment must be dropped first."""
        self.header = None
        try:
            self.buf.release()
        except ValueError:
            return  # a caller still holds a view; the mapping goes when they do
        try:
            self.mm.close()
        except BufferError:
            pass

    def unlink(self) -> None:
        """Mark closed (so attachers see an orderly shutdown) and remove the name."""
        if self.owner and self.header is not None:
            self.header["ready"] = abi.CLOSED
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass


def _map(name: str, size: int = 0, create: bool = False, access=None) -> mmap.mmap:
    flags = posix_ipc.O_CREX if create else 0
    shm = posix_ipc.SharedMemory(name, flags, mode=0o600, size=size)
    try:
        if create:
            # Exactly the configured mode, whatever the umask (shared.security.ShmAccess).
            (access or _OWNER_ONLY).apply_fd(shm.fd, name)
        if not create and shm.size == 0:
            raise SegmentCorrupt(f"segment {name} is empty (0 bytes): its creator died while "
                                 "building it; restart the owner to recreate it")
        return mmap.mmap(shm.fd, shm.size)
    finally:
        shm.close_fd()


def _unlink_quiet(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


def read_owner(name: str) -> tuple[int, int, int] | None:
    """(owner_pid, owner_start_time, ready) of an existing segment, or None if absent/unreadable."""
    try:
        mm = _map(name)
    except (posix_ipc.ExistentialError, SegmentCorrupt):
        return None
    try:
        if len(mm) < abi.SEG_HEADER.itemsize:
            return None
        h = np.frombuffer(mm, dtype=abi.SEG_HEADER, count=1)[0]
        return int(h["owner_pid"]), int(h["owner_start_time"]), int(h["ready"])
    finally:
        del h
        mm.close()


def create_segment(name: str, kind: int, size: int, replica_id: int, access=None) -> Segment:
    """Create a fresh segment (not yet ready); clean up one a dead predecessor left. `access`
    (a shared.security.ShmAccess) sets its mode and group: by default 0600, owner only.

    Raises PicoError-family StaleOwner-free errors: if a live process owns the name, we refuse.
    """
    prev = read_owner(name)
    if prev is not None:
        pid, start, _ready = prev
        if pid != os.getpid() and process_alive(pid, start):
            raise SegmentCorrupt(f"segment {name} is owned by live pid {pid}: stop that process "
                                 "first (two owners would corrupt it)")
    try:
        posix_ipc.unlink_shared_memory(name)  # a crashed predecessor's leftover
    except posix_ipc.ExistentialError:
        pass
    try:
        mm = _map(name, size, create=True, access=access)
    except BaseException:
        _unlink_quiet(name)  # e.g. the group could not be set: leave nothing half-made
        raise
    seg = Segment(name, mm, owner=True)
    h = seg.header
    h["magic"] = abi.MAGIC
    h["abi_major"] = abi.ABI_MAJOR
    h["abi_minor"] = abi.ABI_MINOR
    h["kind"] = kind
    h["header_size"] = abi.SEG_HEADER.itemsize
    h["segment_size"] = size
    h["owner_pid"] = os.getpid()
    h["owner_start_time"] = proc_start_time(os.getpid()) or 0
    h["created_ns"] = time.time_ns()
    h["owner_replica"] = replica_id
    return seg


def attach_segment(name: str, kind: int, timeout: float = 2.0,
                   abi_major: int = abi.ABI_MAJOR) -> Segment:
    """Attach to an existing segment, validating it as pico_abi.h's attach protocol says.

    A segment that exists but is still empty or shorter than its header is being created:
    like the C library, we retry until the deadline before calling it corrupt.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            mm = _map(name)
        except posix_ipc.ExistentialError:
            raise SegmentMissing(f"no shared-memory segment {name}: is the owner (pico-smm for "
                                 "flows) running for this replica, with the same cluster name "
                                 "and shm_prefix?") from None
        except PermissionError as e:
            raise SegmentMissing(f"segment {name} exists but cannot be opened ({e}): run as "
                                 "the owner's user or root") from None
        except SegmentCorrupt:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.001)
            continue
        if len(mm) < abi.SEG_HEADER.itemsize and time.monotonic() < deadline:
            mm.close()
            time.sleep(0.001)
            continue
        try:
            return _validate(name, mm, kind, max(0.0, deadline - time.monotonic()), abi_major)
        except BaseException:
            mm.close()
            raise


def wait_for_segment(name: str, kind: int, timeout: float = 30.0) -> Segment:
    """attach_segment, waiting up to `timeout` for the owner to create (or re-create) the
    segment: for processes that start together with their segment's owner (honcho)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attach_segment(name, kind, max(0.1, deadline - time.monotonic()))
        except (SegmentMissing, StaleOwner):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _validate(name: str, mm: mmap.mmap, kind: int, timeout: float, abi_major: int) -> Segment:
    if len(mm) < abi.SEG_HEADER.itemsize:
        raise SegmentCorrupt(f"segment {name} is {len(mm)} bytes, smaller than its 128-byte "
                             "header: remove it (restart its owner) and retry")
    hdr = np.ndarray((), dtype=abi.SEG_HEADER, buffer=mm, offset=0)
    deadline = time.monotonic() + timeout
    pause = 0.0005
    # An all-zero header is a segment its owner has just created and not yet written (as
    # libpico does, wait for it until the deadline); any other wrong magic is corruption.
    while int(hdr["magic"]) != abi.MAGIC:
        if int(hdr["magic"]) != 0 or int(hdr["ready"]) != 0 or time.monotonic() >= deadline:
            raise SegmentCorrupt(f"segment {name} has magic {int(hdr['magic']):#x}, not "
                                 f"Pico's {abi.MAGIC:#x}: it is not a Pico segment or it was "
                                 "overwritten")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    pause = 0.0005
    while int(hdr["ready"]) != abi.READY:
        if int(hdr["ready"]) == abi.CLOSED:
            raise StaleOwner(f"segment {name} was closed by its owner (pid "
                             f"{int(hdr['owner_pid'])}): wait for the owner to restart")
        if time.monotonic() >= deadline:
            raise SegmentNotReady(f"segment {name} not ready after {timeout:.3g} s (owner pid "
                                  f"{int(hdr['owner_pid'])} still building it, or it died "
                                  "mid-way): check the owner's log")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    major, minor = int(hdr["abi_major"]), int(hdr["abi_minor"])
    if major != abi_major:
        raise AbiMismatch(f"ABI mismatch on {name}: segment is {major}.{minor}, this binding "
                          f"is {abi_major}.{abi.ABI_MINOR}: upgrade the older side so both "
                          "speak the same major version")
    if int(hdr["kind"]) != kind:
        got = abi.SEG_KIND_NAMES.get(int(hdr["kind"]), str(int(hdr["kind"])))
        raise SegmentCorrupt(f"segment {name} is of kind {got!r}, expected "
                             f"{abi.SEG_KIND_NAMES.get(kind, kind)!r}: wrong name?")
    if int(hdr["segment_size"]) != len(mm) or int(hdr["header_size"]) != abi.SEG_HEADER.itemsize:
        raise SegmentCorrupt(f"segment {name}: header says {int(hdr['segment_size'])} bytes "
                             f"(header {int(hdr['header_size'])}), mapping is {len(mm)}: "
                             "truncated or corrupt; restart its owner")
    pid, start = int(hdr["owner_pid"]), int(hdr["owner_start_time"])
    if not process_alive(pid, start):
        raise StaleOwner(f"segment {name} belongs to pid {pid}, which is no longer running: "
                         "start the owner again (it removes the leftover)")
    del hdr
    return Segment(name, mm, owner=False)
