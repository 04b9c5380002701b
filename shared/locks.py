"""Striped flow locks: a fixed number of named POSIX semaphores, never one per flow.

Stripe k guards run k of the flow table's slots (pico_abi.h, "Hash table"). The holder writes
its pid into the stripe record right after acquiring and clears it right before releasing, so
the SMM's watchdog can tell a dead holder from a busy one and post the semaphore for it.
"""
from __future__ import annotations

import os
import threading

import posix_ipc

from .errors import FlowLockTimeout

from .words import word_views
STRIPE_SIZE = 64


def sem_name(prefix: str, stripe: int) -> str:
    return f"{prefix}.s{stripe}"


def registry_sem_name(prefix: str) -> str:
    return f"{prefix}.reg"


class _StripeRecords:
    """Writes the holder word and the acquisition counter of each stripe record."""

    def __init__(self, buf: memoryview, stripes_offset: int):
        # holder_pid (i64) and acquisitions (u64) as whole words (shared/words.py).
        self._i64, self._u64 = word_views(buf, "qQ")
        self._base = stripes_offset >> 3
        self._pid = os.getpid()

    def mark_held(self, k: int) -> None:
        at = self._base + k * (STRIPE_SIZE >> 3)
        self._i64[at] = self._pid
        self._u64[at + 1] = self._u64[at + 1] + 1

    def mark_free(self, k: int) -> None:
        self._i64[self._base + k * (STRIPE_SIZE >> 3)] = 0

    def holder(self, k: int) -> int:
        return self._i64[self._base + k * (STRIPE_SIZE >> 3)]


class StripeLocks:
    """The named semaphores of one flow table, opened (or created by the SMM)."""

    def __init__(self, prefix: str, n_stripes: int, buf: memoryview, stripes_offset: int,
                 timeout_s: float, create: bool = False, access=None):
        self.prefix = prefix
        self.n_stripes = n_stripes
        self.timeout_s = timeout_s
        self._records = _StripeRecords(buf, stripes_offset)
        self._sems: list[posix_ipc.Semaphore] = []
        try:
            for k in range(n_stripes):
                self._sems.append(_open_sem(sem_name(prefix, k), create, access))
            self.registry = _open_sem(registry_sem_name(prefix), create, access)
        except BaseException:
            self.close()
            raise
        self._acquire = [sem.acquire for sem in self._sems]
        self._release = [sem.release for sem in self._sems]

    def acquire(self, k: int) -> None:
        try:
            self._acquire[k](self.timeout_s)
        except posix_ipc.BusyError:
            raise FlowLockTimeout(
                f"flow lock stripe {k} of {self.prefix} not acquired in {self.timeout_s:.3g} s "
                f"(holder pid {self._records.holder(k)}): a hung middlebox holds it; the SMM "
                "recovers stripes of dead holders, so retry, or stop the hung process") from None
        self._records.mark_held(k)

    def release(self, k: int) -> None:
        self._records.mark_free(k)
        self._release[k]()

    def post(self, k: int) -> None:
        """Release on behalf of a dead holder (the SMM watchdog only)."""
        self._sems[k].release()

    def value(self, k: int) -> int:
        return self._sems[k].value

    def close(self) -> None:
        for s in self._sems:
            s.close()
        self._sems = []
        self._acquire = self._release = []
        self._records = None  # its views of the segment, so the mapping can close
        reg = getattr(self, "registry", None)
        if reg is not None:
            reg.close()
            self.registry = None

    def unlink(self) -> None:
        """Remove the names (the SMM, at shutdown). Open handles stay valid until closed."""
        for k in range(self.n_stripes):
            _unlink_quiet(sem_name(self.prefix, k))
        _unlink_quiet(registry_sem_name(self.prefix))


class ThreadStripeLocks:
    """The same interface over threading locks: for unit tests of the pure table logic."""

    def __init__(self, n_stripes: int, buf: memoryview, stripes_offset: int,
                 timeout_s: float = 1.0):
        self.n_stripes = n_stripes
        self.timeout_s = timeout_s
        self._records = _StripeRecords(buf, stripes_offset)
        self._locks = [threading.Lock() for _ in range(n_stripes)]
        self.registry = threading.Lock()

    def acquire(self, k: int) -> None:
        if not self._locks[k].acquire(timeout=self.timeout_s):
            raise FlowLockTimeout(f"flow lock stripe {k} not acquired in {self.timeout_s} s")
        self._records.mark_held(k)

    def release(self, k: int) -> None:
        self._records.mark_free(k)
        self._locks[k].release()

    def close(self) -> None:
        pass


def create_sem(name: str, initial_value: int, access=None) -> posix_ipc.Semaphore:
    """A fresh named semaphore (a predecessor's is removed first: it may be stuck), with
    exactly the mode and group of `access` (a shared.security.ShmAccess; default 0600)."""
    from .security import ShmAccess
    _unlink_quiet(name)
    sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=initial_value)
    try:
        (access or ShmAccess()).apply_sem(name)
    except BaseException:
        sem.close()
        _unlink_quiet(name)
        raise
    return sem


def _open_sem(name: str, create: bool, access=None) -> posix_ipc.Semaphore:
    if create:  # (a crashed predecessor's semaphore may be stuck at 0: create_sem removes it)
        return create_sem(name, 1, access)
    try:
        return posix_ipc.Semaphore(name)
    except posix_ipc.ExistentialError:
        from .errors import SegmentMissing
        raise SegmentMissing(f"lock semaphore {name} is missing: the SMM that owns it is not "
                             "running or was restarted; re-attach") from None


def _unlink_quiet(name: str) -> None:
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        pass
