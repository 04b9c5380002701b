"""The RM on the real packet path with two replicas: r1 whole (SMM, PMM in a namespace with an
audit log, the pass-through middlebox, pico-rm as a process) checkpoints group `web` to r2's
SMM. Checked from the outside: what the server receives, r2's standby copies, the PMM's audit
log (output commit), the group table, picoctl and the events the controller gets."""
import os
import signal
import time

import pytest

from pmm.audit import read_audit, violations
from rmbed import NFLOWS, WEB, Rig, Sink, until
from shared import wire

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network "
                                 "namespaces and binds NFQUEUE; CI runs as root")]

COUNTED = 8  # the pass-through middlebox counts a flow's packets in its first 8 state bytes


def count(state: bytes) -> int:
    return int.from_bytes(state[:COUNTED], "little")


@pytest.fixture
def rig_factory(tmp_path, smm_factory):
    rigs = []

    def make(**kw) -> Rig:
        rig = Rig(tmp_path, smm_factory, **kw)
        rigs.append(rig)
        return rig

    yield make
    errors = []
    for rig in rigs:
        rig.close()
        rig.sweep_shm()
        errors += rig.errors
    assert errors == [], errors


def web_audit(rig, n: int) -> list[dict]:
    """Await the audit lines of n released web packets (written right after each verdict)."""
    until(lambda: len([r for r in rig.audit_records() if r["g"] == WEB]) >= n, 10,
          lambda: f"{len([r for r in rig.audit_records() if r['g'] == WEB])} of {n} audit lines")
    records = [r for r in read_audit(rig.audit) if r["g"] == WEB]
    assert len(records) == n, len(records)
    return records


def unprotect_events(rig) -> list[dict]:
    return [e.body for e in rig.controller.drain() if e.body.get("event") == "group_unprotected"]


def test_backup_standby_state_equals_committed_state(rig_factory):
    rig = rig_factory()
    sink = Sink(rig.bed)
    rounds = 40
    n = NFLOWS * rounds
    keys = [rig.key(k) for k in range(NFLOWS)]
    sender = rig.send("s", rounds, 0.02)
    samples = compared = 0
    while sender.poll() is None:
        # In this order: what the server has, then r2's copy, then r1's. Each can only grow,
        # so a later read that is behind an earlier one is a real inversion.
        sink.pull()
        got = {k: max(sink.flows.get(("s", k), [-1])) + 1 for k in range(NFLOWS)}
        for k, key in enumerate(keys):
            backup = rig.standby(key)
            mine = rig.active(key)
            if got[k]:
                # Output commit seen from outside: the server holds datagram i of flow k only
                # if r2 already holds the flow's state after packet i.
                assert backup is not None, (k, got[k])
                assert count(backup[1]) >= got[k], (k, got[k], count(backup[1]))
            if backup is not None:
                assert mine is not None, k
                assert backup[0] <= mine[0], ("r2's version is ahead of r1's", k, backup, mine)
                assert count(backup[1]) <= count(mine[1]), (k, backup, mine)
                compared += 1
        samples += 1
        time.sleep(0.03)
    assert sender.wait(10) == 0, sender.stderr.read()
    assert samples >= 5 and compared >= NFLOWS, (samples, compared)

    sink.expect_all("s", NFLOWS, rounds, 15, rig.diag)  # every datagram reached the server
    # The middlebox finished the last packet at or before the group's open epoch E; once E
    # is committed, r2 holds every update.
    until(lambda: rig.word("rx_packets") >= n and rig.word("pkts_done") == rig.word("pkts_read")
          and len(rig.seg.input_ring(rig.index)) == 0, 10,
          lambda: (rig.word("rx_packets"), rig.word("pkts_read"), rig.word("pkts_done")))
    last = rig.word("epoch")
    until(lambda: rig.word("committed") >= last, 10,
          lambda: f"committed {rig.word('committed')} < {last}\n{rig.rm_log()[-3000:]}")
    committed = rig.word("committed")
    for k, key in enumerate(keys):
        mine, backup = rig.active(key), rig.standby(key)
        assert mine is not None and count(mine[1]) == rounds, (k, mine)
        assert backup is not None, f"flow {k}: no standby copy on r2"
        assert backup[1] == mine[1], (k, backup[1].hex(), mine[1].hex())
        assert backup[0] == mine[0], (k, backup[0], mine[0])      # same version
        assert 1 <= backup[2] <= committed, (k, backup[2], committed)
    assert violations(web_audit(rig, n)) == []
    assert unprotect_events(rig) == []
    assert rig.word("protected_") == 1 and rig.word("buffering") == 1


def test_a_stopped_backup_holds_output_until_it_continues(rig_factory):
    # A 2 s ack timeout: the RM resends once while r2 is stopped, and would give the group
    # up only after 4 x 2 s.
    timeout_s = 2.0
    rig = rig_factory(request_timeout_ms=int(timeout_s * 1000))
    sink = Sink(rig.bed)
    rounds = 110
    sender = rig.send("t", rounds, 0.03)                 # about 3.5 s of traffic
    until(lambda: sink.pull() >= 40, 10, lambda: f"only {sink.count} datagrams arrived")
    r2 = rig.smm2.proc.pid
    os.kill(r2, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        # What was acknowledged before may still be leaving; then output is held.
        until(lambda: rig.word("held") >= 40, 5,
              lambda: f"held {rig.word('held')}, queued {rig.output_queued()}")
        frozen, held = sink.pull(), rig.word("held")
        while time.monotonic() - stopped < timeout_s + 0.3:   # one ack timeout and a resend
            assert sink.pull() == frozen, "output left while the backup was stopped"
            time.sleep(0.05)
        assert rig.word("held") > held                   # traffic goes on and is held
        assert rig.rm.poll() is None
        assert sender.poll() is None, "traffic ended before the backup was continued"
    finally:
        os.kill(r2, signal.SIGCONT)
    assert sender.wait(20) == 0, sender.stderr.read()
    sink.expect_all("t", NFLOWS, rounds, 15, rig.diag)  # every one arrives, in order
    assert violations(web_audit(rig, NFLOWS * rounds)) == []
    stats = rig.stats()
    assert stats["protected"] is True and stats["retries"] >= 1, stats
    assert rig.word("protected_") == 1 and rig.word("buffering") == 1
    assert unprotect_events(rig) == []


def test_a_dead_backup_unprotects_the_group_and_tells_the_controller(rig_factory):
    rig = rig_factory(request_timeout_ms=300)
    sink = Sink(rig.bed)
    rig.send_all("a", 5, 0.01)
    sink.expect_all("a", NFLOWS, 5, 10, rig.diag)       # protected, r2 answering
    assert rig.word("protected_") == 1 and rig.word("buffering") == 1
    rig.smm2.stop(signal.SIGKILL)
    killed = time.monotonic()
    rig.send_all("b", 5, 0.01)                           # epochs r2 will never acknowledge

    ev = until(lambda: rig.controller.recv(0.1), 10,
               lambda: f"no event at {rig.controller_endpoint}; RM log:\n{rig.rm_log()[-3000:]}")
    waited = time.monotonic() - killed
    assert ev.msg.type == wire.EVENT and ev.msg.status == wire.OK, ev.msg
    body = ev.body
    assert {k: body.get(k) for k in ("event", "replica", "group", "target")} == \
        {"event": "group_unprotected", "replica": "r1", "group": WEB, "target": "r2"}, body
    rig.controller.reply(ev, {"ok": True})
    replied = time.monotonic()
    assert waited < 4 * 0.3 * 4, waited                  # about 4 ack timeouts after the kill

    until(lambda: rig.word("protected_") == 0 and rig.word("buffering") == 0, 5,
          lambda: f"protected_={rig.word('protected_')} buffering={rig.word('buffering')}")
    sink.expect_all("b", NFLOWS, 5, 10, rig.diag)       # the held output left
    rig.send_all("c", 5, 0.01)
    sink.expect_all("c", NFLOWS, 5, 10, rig.diag)       # later output is not held
    assert rig.stats()["protected"] is False             # picoctl says so too
    assert violations(web_audit(rig, 3 * NFLOWS * 5)) == []
    assert rig.rm.poll() is None
    # Answered, the event is not sent again (one resend may have crossed our reply), and
    # nothing says the group came back.
    time.sleep(max(0.0, replied + 1.5 - time.monotonic()))  # an absence: 3 resend periods
    later = rig.controller.drain()
    assert len([e for e in later if e.body == body]) <= 1, [e.body for e in later]
    assert all(e.body.get("event") == "group_unprotected" for e in later), \
        [e.body for e in later]


def test_a_backup_that_answers_again_gets_its_group_back(rig_factory):
    """The backup hangs (or the control network drops its traffic) long enough for the group
    to be given up; when it answers again, the RM's probe finds it and protects the group
    again by itself: a FULL snapshot, output held again until acknowledged, the controller
    told. (Before, only an operator's `group set --target` did.)"""
    rig = rig_factory(request_timeout_ms=300)
    sink = Sink(rig.bed)
    rig.send_all("a", 5, 0.01)
    sink.expect_all("a", NFLOWS, 5, 10, rig.diag)
    r2 = rig.smm2.proc.pid
    os.kill(r2, signal.SIGSTOP)
    try:
        rig.send_all("b", 5, 0.01)
        ev = until(lambda: rig.controller.recv(0.1), 10, lambda: rig.rm_log()[-3000:])
        assert ev.body.get("event") == "group_unprotected", ev.body
        rig.controller.reply(ev, {"ok": True})
        until(lambda: rig.word("protected_") == 0, 5, lambda: rig.rm_log()[-2000:])
    finally:
        os.kill(r2, signal.SIGCONT)
    sink.expect_all("b", NFLOWS, 5, 10, rig.diag)

    def protected_event():
        for e in rig.controller.drain():            # (each answered)
            if e.body.get("event") == "group_protected":
                return e.body
        return None
    body = until(protected_event, 10, lambda: rig.rm_log()[-3000:])
    assert {k: body.get(k) for k in ("replica", "group", "target", "reason")} == \
        {"replica": "r1", "group": WEB, "target": "r2", "reason": "backup answers again"}, body
    until(lambda: rig.word("protected_") == 1 and rig.word("buffering") == 1, 5,
          lambda: rig.rm_log()[-2000:])
    rig.send_all("c", 5, 0.01)                    # held again, and released on its commits
    sink.expect_all("c", NFLOWS, 5, 10, rig.diag)
    assert rig.stats()["protected"] is True
    assert violations(web_audit(rig, 3 * NFLOWS * 5)) == []
    assert rig.rm.poll() is None
