"""One replication group's checkpoint epochs (paper §4.3) as a pure state machine.

The RM's shell feeds it the clock and what it observes (is the group quiescent? how many of
its flows are inside a transaction? which epoch did the backup acknowledge?) and carries out
the actions it returns, in order. Nothing here sleeps, reads memory or touches a socket, so the
tests drive every path with a fake clock.

End of epoch e:  Suspend -> (wait: quiescent, no open transaction) -> Capture(e) ->
                 OpenEpoch(e+1) -> Resume -> Send(e, base) ... Ack(>= e) -> Commit(e)
Sends are pipelined (up to max_inflight epochs unacknowledged); acks are cumulative.
Deadlines sit on the grid of the group's period (multiples of it on the clock), so groups of one
frequency fall due together and the shell serves them in one pass.
A group whose backup lost the stream (EPOCH_GAP: the backup's SMM restarted, or this RM did)
takes its next epoch as a FULL snapshot of every flow; so does a group's first epoch when
`resync` is set (an RM that starts does not know what its backup holds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

RUNNING, DRAINING = "running", "draining"


@dataclass(frozen=True)
class Suspend:
    group: int


@dataclass(frozen=True)
class Capture:
    group: int
    epoch: int
    full: bool = False  # every flow of the group, not only the modified ones (a resync)


@dataclass(frozen=True)
class OpenEpoch:
    group: int
    epoch: int


@dataclass(frozen=True)
class Resume:
    group: int


@dataclass(frozen=True)
class Send:
    group: int
    epoch: int
    base: int      # the epoch this delta builds on (wire INSTALL base_epoch)
    retry: int     # 0 for the first send
    full: bool = False


@dataclass(frozen=True)
class Commit:
    group: int
    epoch: int


@dataclass(frozen=True)
class Stuck:
    """The group did not drain in time: reported and counted, the epoch is not taken."""
    group: int
    epoch: int
    open_transactions: int
    quiescent: bool


@dataclass(frozen=True)
class Unprotect:
    """The backup does not answer: stop protecting (release held output, stop buffering)."""
    group: int
    epoch: int


Action = Union[Suspend, Capture, OpenEpoch, Resume, Send, Commit, Stuck, Unprotect]


@dataclass
class GroupEpochs:
    group: int
    frequency_hz: float
    now: float
    epoch: int = 1                 # the open epoch: outputs written now carry this tag
    committed: int = 0
    max_inflight: int = 4
    drain_timeout: float = 0.05    # seconds a suspension may wait for quiescence
    ack_timeout: float = 0.5
    max_retries: int = 3
    state: str = RUNNING
    next_due: float = field(init=False)
    suspended_at: float = 0.0
    # epoch -> (first sent, last sent, tries, full)
    inflight: dict[int, tuple[float, float, int, bool]] = field(default_factory=dict)
    last_sent: int = 0
    stuck: int = 0
    commit_latencies: list[float] = field(default_factory=list)
    protected: bool = True
    retries: int = 0
    bytes_last: int = 0
    commit_times: list[float] = field(default_factory=list)
    resync: bool = False           # the next epoch is taken as a FULL snapshot
    resyncs: int = 0
    commits: int = 0               # acks that advanced `committed`
    skipped: int = 0               # deadlines passed without an epoch (idle group)
    timeout_at: float = math.inf   # no in-flight epoch can time out before this

    def __post_init__(self) -> None:
        self.next_due = self._grid_after(self.now)

    @property
    def period(self) -> float:
        return 1.0 / self.frequency_hz

    def _grid_after(self, now: float) -> float:
        """The first multiple of the period after `now`: groups of one frequency share it."""
        return (math.floor(now / self.period) + 1) * self.period

    def skip(self, now: float) -> None:
        """Nothing happened in the group since its last epoch (the shell saw no packet read
        and no output waiting): let this deadline pass without an epoch."""
        self.next_due = self._grid_after(now)
        self.skipped += 1

    def set_frequency(self, hz: float, now: float) -> None:
        self.frequency_hz = hz
        if self.state == RUNNING:
            self.next_due = self._grid_after(now)

    def on_gap(self, now: float) -> list[Action]:
        """The backup refused an epoch as not following the last it holds: what is in flight
        will never be acknowledged as is, so resend the whole group as a FULL snapshot soon."""
        self.inflight.clear()
        self.timeout_at = math.inf
        self.resync = True
        self.resyncs += 1
        return []

    def step(self, now: float, quiescent: bool = True, open_transactions: int = 0) -> list[Action]:
        """Advance on the clock and the latest observations; the actions to carry out."""
        if not self.protected:
            return []
        actions: list[Action] = self._timeouts(now)
        if not self.protected:
            return actions
        if self.state == RUNNING:
            if now >= self.next_due and len(self.inflight) < self.max_inflight:
                self.state, self.suspended_at = DRAINING, now
                # Observations made before the suspension are stale: judge quiescence only
                # at a later step, after the shell has stored `suspended` (pico_abi.h).
                actions.append(Suspend(self.group))
            return actions
        # DRAINING: take the epoch as soon as the group is quiet
        if quiescent and open_transactions == 0:
            e, full = self.epoch, self.resync
            self.epoch, self.resync = e + 1, False
            self.state = RUNNING
            nxt = self.next_due + self.period
            self.next_due = nxt if nxt > now else self._grid_after(now)  # no burst to catch up
            self.inflight[e] = (now, now, 0, full)
            self.timeout_at = min(self.timeout_at, now + self.ack_timeout)
            base, self.last_sent = self.last_sent, e
            actions += [Capture(self.group, e, full), OpenEpoch(self.group, e + 1),
                        Resume(self.group), Send(self.group, e, base, 0, full)]
        elif now - self.suspended_at >= self.drain_timeout:
            self.stuck += 1
            self.state = RUNNING
            self.next_due = self._grid_after(now)
            actions += [Stuck(self.group, self.epoch, open_transactions, quiescent),
                        Resume(self.group)]
        return actions

    def on_ack(self, acked_epoch: int, now: float) -> list[Action]:
        """The backup acknowledged every epoch <= acked_epoch (cumulative)."""
        done = [e for e in self.inflight if e <= acked_epoch]
        for e in done:
            first, _, _, _ = self.inflight.pop(e)
            self.commit_latencies.append(now - first)  # from the first send, retries included
        del self.commit_latencies[:-4096]
        if acked_epoch > self.committed:
            self.committed = acked_epoch
            self.commits += 1
            self.commit_times.append(now)
            del self.commit_times[:-256]
            return [Commit(self.group, acked_epoch)]
        return []

    def _timeouts(self, now: float) -> list[Action]:
        if now < self.timeout_at:
            return []
        out: list[Action] = []
        for e in sorted(self.inflight):
            first, sent, tries, full = self.inflight[e]
            if now - sent < self.ack_timeout:
                continue
            if tries >= self.max_retries:
                self.protected = False
                self.inflight.clear()
                out.append(Unprotect(self.group, e))
                if self.state == DRAINING:  # never leave the group suspended
                    self.state = RUNNING
                    out.append(Resume(self.group))
                return out
            self.inflight[e] = (first, now, tries + 1, full)
            self.retries += 1
            base = max((x for x in self.inflight if x < e), default=self.committed)
            out.append(Send(self.group, e, base, tries + 1, full))
        self.timeout_at = min((v[1] for v in self.inflight.values()), default=math.inf) \
            + self.ack_timeout
        return out


    def achieved_hz(self) -> float:
        """Commits per second over the last (up to 256) commits."""
        t = self.commit_times
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0


def due_order(groups: list[GroupEpochs]) -> list[GroupEpochs]:
    """Groups by their next deadline, so one thread serves many groups on time."""
    return sorted(groups, key=lambda g: g.next_due)
