"""The cluster controller's decisions (pico-sdn), as a pure state machine.

Inputs: the clock, replicas' heartbeats (each says whether all the replica's processes are
healthy), switch port changes (link down/up of a replica's port), and the outcomes of the
actions it asked for. Outputs: actions for the shell (sdn/server.py) to carry out. Nothing here
sleeps or touches a socket, so the tests drive every path with a fake clock.

A failover of replica X runs in the order that keeps connections alive (paper §4.4):
  1. ACTIVATE: every surviving replica's SMM turns X's standby flows it holds into active ones;
  2. REROUTE:  once they all answered (or the activation deadline passed), the new membership's
               steering rules go to Faucet: X's buckets now lead to their backups;
  3. REPROTECT: once Faucet applied it, every surviving replica learns the new membership (view)
               and puts the flows it took over into groups that replicate to a live backup.
Packets that reach a backup between 1 and 2 are held by its PMM, never dropped. The opposite
order (ORDER_REROUTE_FIRST) exists only so a test can show that it breaks connections.
One failover runs at a time; a replica that fails meanwhile waits its turn.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .ring import Ring, placements

ORDER_ACTIVATE_FIRST, ORDER_REROUTE_FIRST = "activate-first", "reroute-first"
IDLE, ACTIVATING, REROUTING, REPROTECTING = "idle", "activating", "rerouting", "reprotecting"
VIEWING, FREEZING, HANDOFF = "viewing", "freezing", "handoff"
FAILOVER, SCALE_IN, SCALE_OUT = "failover", "scale-in", "scale-out"


@dataclass(frozen=True)
class Failed:
    """Replica declared failed (logged, reported)."""
    replica: str
    reason: str
    view: int


@dataclass(frozen=True)
class Activate:
    replica: str          # whose SMM activates...
    failed: str | None    # ...the standby flows owned by this replica
    view: int
    group: int | None = None  # (scale-out) instead: the standby flows of this group


@dataclass(frozen=True)
class Freeze:
    """Stop processing and checkpoint to the end: hold the group (None: every protected
    group of the replica), take a last epoch, answer once the backup acknowledged it."""
    replica: str
    group: int | None
    view: int


@dataclass(frozen=True)
class Handoff:
    """The flows of `group` now live elsewhere: drop this replica's copies, release it."""
    replica: str
    group: int
    view: int


@dataclass(frozen=True)
class Reroute:
    primaries: tuple      # bucket -> replica name (None: no live replica)
    view: int


@dataclass(frozen=True)
class Reprotect:
    replica: str
    alive: tuple          # the new membership, sorted
    view: int


@dataclass(frozen=True)
class FailoverDone:
    replica: str
    view: int
    detected: float       # seconds from the last sign of life to the decision
    activation: float     # seconds spent in each phase
    reroute: float
    reprotect: float
    kind: str = FAILOVER


@dataclass(frozen=True)
class Isolated:
    """Most replicas went silent at once: no failover on silence (logged once) until they
    are heard again or their links go down."""
    silent: tuple
    heard: int
    members: int


Action = Union[Failed, Activate, Freeze, Handoff, Reroute, Reprotect, FailoverDone, Isolated]


@dataclass
class _Failover:
    replica: str
    reason: str
    since: float          # last sign of life
    decided: float
    view: int
    kind: str = FAILOVER
    phases: tuple = ()
    others: tuple = ()    # scale-out: the members before the newcomer
    waiting: set = field(default_factory=set)
    phase_started: float = 0.0
    times: dict = field(default_factory=dict)


class Controller:
    def __init__(self, replicas: list[str], now: float, heartbeat_timeout: float = 0.3,
                 vnodes: int = 16, buckets: int = 16, activation_timeout: float = 1.0,
                 reprotect_timeout: float = 2.0, order: str = ORDER_ACTIVATE_FIRST,
                 startup_grace: float = 30.0, members=None, chord_groups=None,
                 freeze_timeout: float = 10.0, beat_interval: float = 0.1):
        if order not in (ORDER_ACTIVATE_FIRST, ORDER_REROUTE_FIRST):
            raise ValueError(f"unknown failover order {order!r}")
        self.replicas = sorted(replicas)
        # the ring's first members (default: every configured replica); others may join
        self.alive = set(self.replicas if members is None else members)
        self.chord_groups = dict(chord_groups or {})
        self.freeze_timeout = freeze_timeout
        self.heartbeat_timeout = heartbeat_timeout
        # a member silent for longer than this is not counted as heard (see tick)
        self.quiet_after = min(heartbeat_timeout / 2, 2 * beat_interval)
        self.activation_timeout = activation_timeout
        self.reprotect_timeout = reprotect_timeout
        self.vnodes, self.buckets, self.order = vnodes, buckets, order
        self.last_beat = {r: now for r in self.replicas}
        # A replica is judged by its heartbeats once it has sent one, or once startup_grace
        # has passed (a replica that never comes up fails then).
        self.seen: set[str] = set()
        self.unhealthy: dict[str, str] = {}
        self.started, self.startup_grace = now, startup_grace
        self.view = 1
        self.phase = IDLE
        self.current: _Failover | None = None
        self.queue: list[_Failover] = []
        self.history: list[FailoverDone] = []
        self.isolated = False  # most replicas went silent at once: we suspect our own partition

    # ---------------------------------------------------------------- placement
    def primaries(self, alive=None) -> tuple:
        alive = sorted(self.alive if alive is None else alive)
        if not alive:
            return (None,) * self.buckets
        return tuple(p.primary for p in placements(Ring(alive, self.vnodes), self.buckets))

    def start(self) -> list[Action]:
        """The first steering rules, for the configured membership, and that view to every
        replica (so their PMMs place new flows on the same ring)."""
        alive = tuple(sorted(self.alive))
        return [Reroute(self.primaries(), self.view)] + [Reprotect(r, alive, self.view)
                                                        for r in self.replicas]

    # ---------------------------------------------------------------- inputs
    def on_heartbeat(self, replica: str, now: float, healthy: bool = True,
                     why: str = "") -> list[Action]:
        if replica not in self.last_beat:
            return []
        if healthy:
            self.last_beat[replica] = now
            self.seen.add(replica)
            self.unhealthy.pop(replica, None)
            return []
        # An unhealthy report does not refresh the replica's last sign of life: if it stays
        # unhealthy, its silence timeout fails it, with this reason.
        self.unhealthy[replica] = why or "unhealthy"
        self.seen.add(replica)
        return []

    def adopt(self, view: int, alive, now: float) -> list[Action]:
        """A replica reports a newer view than ours: we are a restarted controller. Take the
        membership the cluster acts on (no failover is redone), and steer for it (Faucet
        already runs those rules: the driver sees the same text and does not reload)."""
        if view <= self.view or self.current is not None:
            return []
        alive = set(alive) & set(self.replicas)
        if not alive:
            return []
        self.view, self.alive = view, alive
        for r in alive:
            self.last_beat[r] = max(self.last_beat[r], now)
        return [Reroute(self.primaries(), view)]

    def pause(self, seconds: float) -> None:
        """This controller did not run for `seconds` (SIGSTOP, a starved CPU): the replicas'
        silence meanwhile is no evidence (their beats are still queued), so it does not count."""
        for r in self.last_beat:
            self.last_beat[r] += seconds

    def on_link(self, replica: str, up: bool, now: float) -> list[Action]:
        if up or replica not in self.last_beat:
            return []
        return self._suspect(replica, "link down", now, now)

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        stale = [r for r in sorted(self.alive)
                 if (r in self.seen or now - self.started >= self.startup_grace)
                 and now - self.last_beat[r] > self.heartbeat_timeout]
        # Evidence (a replica reporting itself unhealthy) fails a replica. Silence alone is
        # ambiguous: the replica died, or we are cut off from it. If we hear fewer replicas
        # than have gone silent (all of them, say), the likelier story is our own partition:
        # failing them would steer traffic away from healthy middleboxes, or around all of
        # them. So silence fails replicas only while we hear at least as many as are silent,
        # and at least one (the last replica is never failed on silence).
        # (A partition silences everyone at once, but their timeouts expire a beat or so
        # apart: a member that missed two beats is not counted as heard.)
        silent = [r for r in stale if r not in self.unhealthy]
        quiet = [r for r in sorted(self.alive) if r not in self.unhealthy
                 and now - self.last_beat[r] > self.quiet_after]
        heard = len(self.alive) - len(quiet)
        quorum = heard >= max(1, len(quiet))
        if silent and not quorum:
            if not self.isolated:
                out.append(Isolated(tuple(quiet), heard, len(self.alive)))
            self.isolated = True
        elif self.isolated and quorum:
            # Healed: members still silent get one more timeout from now (after a partition
            # their transport may be backing off: TCP retransmits late), then are judged.
            self.isolated = False
            for r in silent:
                self.last_beat[r] = now
            stale = [r for r in stale if r in self.unhealthy]
        for r in stale:
            if r in self.unhealthy or quorum:
                why = (f"unhealthy: {self.unhealthy[r]}" if r in self.unhealthy else
                       f"no heartbeat for {now - self.last_beat[r]:.3f} s")
                out += self._suspect(r, why, now, self.last_beat[r])
        if self.current is not None and self.phase != REROUTING:
            limit = {ACTIVATING: self.activation_timeout,
                     FREEZING: self.freeze_timeout}.get(self.phase, self.reprotect_timeout)
            if now - self.current.phase_started > limit:
                self.current.waiting.clear()  # those replicas did not answer: go on without
                out += self._advance(now)
        return out

    def on_activated(self, replica: str, view: int, now: float) -> list[Action]:
        return self._answered(ACTIVATING, replica, view, now)

    def on_rerouted(self, view: int, now: float) -> list[Action]:
        return self._answered(REROUTING, "faucet", view, now)

    def on_reprotected(self, replica: str, view: int, now: float) -> list[Action]:
        phase = VIEWING if self.phase == VIEWING else REPROTECTING
        return self._answered(phase, replica, view, now)

    def on_frozen(self, replica: str, view: int, now: float) -> list[Action]:
        return self._answered(FREEZING, replica, view, now)

    def on_handed_off(self, replica: str, view: int, now: float) -> list[Action]:
        return self._answered(HANDOFF, replica, view, now)

    # ---------------------------------------------------------------- elastic scale
    def scale_in(self, replica: str, now: float) -> list[Action]:
        """Remove a live replica without breaking its connections: it freezes and
        checkpoints to the end, its backups activate, the flows are rerouted to them."""
        if replica not in self.alive or len(self.alive) < 2:
            return []
        self.alive.discard(replica)
        f = _Failover(replica, "scale-in", now, now, 0, SCALE_IN,
                      (FREEZING, ACTIVATING, REROUTING, REPROTECTING))
        return self._enqueue(f, now)

    def scale_out(self, replica: str, now: float) -> list[Action]:
        """Add a replica: the buckets the ring gives it move live. Everyone learns the new
        view (the old primaries checkpoint the moving flows to the newcomer, in its chords
        group), the old primaries freeze that group, the newcomer activates it, the flows are
        rerouted, the old primaries drop their copies, and everyone re-protects."""
        if replica in self.alive or replica not in self.replicas or \
                replica not in self.chord_groups:
            return []
        others = tuple(sorted(self.alive))
        self.alive.add(replica)
        self.last_beat[replica] = now
        f = _Failover(replica, "scale-out", now, now, 0, SCALE_OUT,
                      (VIEWING, FREEZING, ACTIVATING, REROUTING, HANDOFF, REPROTECTING), others)
        return self._enqueue(f, now)

    def _enqueue(self, f: _Failover, now: float) -> list[Action]:
        if self.current is None:
            return self._begin(f, now)
        self.queue.append(f)
        return []

    # ---------------------------------------------------------------- the failover
    def _suspect(self, replica: str, reason: str, now: float, since: float) -> list[Action]:
        if replica not in self.alive:
            return []
        self.alive.discard(replica)
        phases = ((REROUTING, ACTIVATING, REPROTECTING) if self.order == ORDER_REROUTE_FIRST
                  else (ACTIVATING, REROUTING, REPROTECTING))
        f = _Failover(replica, reason, since, now, 0, FAILOVER, phases)
        if self.current is None:
            acts = self._begin(f, now)
            return [Failed(replica, reason, f.view)] + acts
        self.queue.append(f)  # (its view number is taken when it starts: views only grow)
        return [Failed(replica, reason, 0)]

    def _begin(self, f: _Failover, now: float) -> list[Action]:
        self.current = f
        self.view += 1
        f.view = self.view
        return self._phase(f.phases[0], now)

    def _phase(self, phase: str, now: float) -> list[Action]:
        f = self.current
        if self.phase != IDLE and self.phase != phase:
            f.times[self.phase] = now - f.phase_started
        self.phase, f.phase_started = phase, now
        survivors = sorted(self.alive)
        to_new = self.chord_groups.get(f.replica)
        if phase == VIEWING:
            f.waiting = set(survivors)
            acts = [Reprotect(r, tuple(survivors), f.view) for r in survivors]
        elif phase == FREEZING:
            if f.kind == SCALE_IN:
                f.waiting = {f.replica}
                acts = [Freeze(f.replica, None, f.view)]
            else:
                f.waiting = set(f.others)
                acts = [Freeze(r, to_new, f.view) for r in f.others]
        elif phase == ACTIVATING:
            if f.kind == SCALE_OUT:
                f.waiting = {f.replica}
                acts = [Activate(f.replica, None, f.view, to_new)]
            else:
                f.waiting = set(survivors)
                acts = [Activate(r, f.replica, f.view) for r in survivors]
        elif phase == REROUTING:
            f.waiting = {"faucet"}
            acts = [Reroute(self.primaries(), f.view)]
        elif phase == HANDOFF:
            f.waiting = set(f.others)
            acts = [Handoff(r, to_new, f.view) for r in f.others]
        else:
            if f.kind == SCALE_OUT:  # a new view number: the replicas saw f.view already
                self.view += 1
                f.view = self.view
            f.waiting = set(survivors)
            acts = [Reprotect(r, tuple(survivors), f.view) for r in survivors]
        return acts if f.waiting else self._advance(now)

    def _answered(self, phase: str, who: str, view: int, now: float) -> list[Action]:
        f = self.current
        if f is None or self.phase != phase or view != f.view:
            return []  # a late answer to a phase already left
        f.waiting.discard(who)
        return [] if f.waiting else self._advance(now)

    def _advance(self, now: float) -> list[Action]:
        order = self.current.phases
        i = order.index(self.phase)
        if i + 1 < len(order):
            return self._phase(order[i + 1], now)
        f = self.current
        f.times[self.phase] = now - f.phase_started
        done = FailoverDone(f.replica, f.view, f.decided - f.since,
                            f.times.get(ACTIVATING, 0.0), f.times.get(REROUTING, 0.0),
                            f.times.get(REPROTECTING, 0.0), f.kind)
        self.history.append(done)
        self.current, self.phase = None, IDLE
        out: list[Action] = [done]
        if self.queue:
            out += self._begin(self.queue.pop(0), now)
        return out
