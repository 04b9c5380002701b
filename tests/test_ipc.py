"""Real processes sharing one flow segment: striped locks under contention, dead and hung holders."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared import wire
from shared.api import attach_replica
from shared.control import ControlClient
from shared.errors import FlowLockTimeout
from shared.flowkey import make_key

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import sys, struct
sys.path.insert(0, {repo!r})
from shared.config import load_config
from shared.api import attach_replica
from shared.flowkey import make_key
cfg = load_config({cfg!r})
keys = [make_key("10.9.0.1", 3000 + i, "10.9.1.1", 80, 6) for i in range({nkeys})]
with attach_replica(cfg, "r1", name="hammer") as mb:
    print("attached", flush=True)
    sys.stdin.readline()  # start together
    for n in range({iters}):
        k = keys[n % len(keys)]
        st = mb.get_flow(k, create=True, group=1)
        v = struct.unpack_from("<Q", st)[0]
        struct.pack_into("<Q", st, 0, v + 1)   # read-modify-write inside the transaction
        mb.put_flow(k, modified=True)
print("done", flush=True)
"""

HOLDER = r"""
import sys, os, time
sys.path.insert(0, {repo!r})
from shared.config import load_config
from shared.api import attach_replica
from shared.flowkey import make_key
cfg = load_config({cfg!r})
mb = attach_replica(cfg, "r1", name="holder")
mb.get_flow(make_key("10.9.0.1", 1, "10.9.1.1", 80, 6), create=True, group=1)
print("holding", flush=True)
time.sleep(60)
"""


def spawn(code: str, **fmt) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code.format(repo=str(REPO), **fmt)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def stats(cluster):
    with ControlClient(cluster.replica("r1").smm_endpoint) as c:
        return json.loads(c.request(wire.STATS).body)


def await_stats(cluster, pred, timeout=10.0):
    """Poll the SMM's stats until pred holds (an event with a deadline, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        s = stats(cluster)
        if pred(s):
            return s
        assert time.monotonic() < deadline, f"condition not reached; last stats {s}"
        time.sleep(0.02)


def test_two_processes_hammering_the_same_flows_lose_no_update(cluster, smm_factory):
    smm_factory(cluster, "r1")
    nkeys, iters = 8, 3000
    workers = [spawn(WORKER, cfg=str(cluster.path), nkeys=nkeys, iters=iters) for _ in range(2)]
    try:
        for w in workers:
            assert w.stdout.readline().strip() == "attached"
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        for w in workers:
            assert w.stdout.readline().strip() == "done"
            assert w.wait(60) == 0
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    with attach_replica(cluster, "r1") as mb:
        total = 0
        for i in range(nkeys):
            k = make_key("10.9.0.1", 3000 + i, "10.9.1.1", 80, 6)
            idx, _ = mb.table.lookup(k)
            slot = mb.table.slots[idx]
            count = int.from_bytes(mb.get_flow(k)[:8], "little")
            mb.put_flow(k, modified=False)
            assert count == 2 * iters // nkeys
            assert int(slot["version"]) == count and int(slot["refcount"]) == 0
            total += count
        del slot
    assert total == 2 * iters
    s = await_stats(cluster, lambda s: len(s["clients"]) == 0)  # both detached cleanly
    assert s["counters"]["client_recoveries"] == 0


def test_a_killed_lock_holder_is_recovered(cluster, smm_factory):
    smm_factory(cluster, "r1")
    holder = spawn(HOLDER, cfg=str(cluster.path))
    try:
        assert holder.stdout.readline().strip() == "holding"
        k = make_key("10.9.0.1", 1, "10.9.1.1", 80, 6)
        with attach_replica(cluster, "r1") as mb:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            # The stripe is posted by the SMM's watchdog; our acquire waits for it.
            deadline = time.monotonic() + 10
            while True:
                try:
                    st = mb.get_flow(k)
                    break
                except FlowLockTimeout:
                    assert time.monotonic() < deadline
            assert st is not None
            mb.put_flow(k, modified=False)
        s = await_stats(cluster, lambda s: s["counters"]["client_recoveries"] >= 1)
        assert s["counters"]["lock_recoveries"] == 1
        assert s["counters"]["txn_recoveries"] == 1  # its open transaction was closed
        dump = json.loads(ControlClient(cluster.replica("r1").smm_endpoint)
                          .request(wire.DUMP).body)
        assert dump["flows"][0]["refcount"] == 0
    finally:
        if holder.poll() is None:
            holder.kill()


def test_a_hung_holder_gives_a_timeout_naming_it_then_recovers_on_resume(cluster, smm_factory):
    smm_factory(cluster, "r1")
    holder = spawn(HOLDER, cfg=str(cluster.path))
    try:
        assert holder.stdout.readline().strip() == "holding"
        holder.send_signal(signal.SIGSTOP)
        k = make_key("10.9.0.1", 1, "10.9.1.1", 80, 6)
        with attach_replica(cluster, "r1") as mb:
            t0 = time.monotonic()
            with pytest.raises(FlowLockTimeout, match=f"holder pid {holder.pid}"):
                mb.get_flow(k)
            assert time.monotonic() - t0 >= cluster.flow_table.lock_timeout_ms / 1000 * 0.9
            # A live (stopped) holder is never robbed of its lock.
            assert stats(cluster)["counters"]["lock_recoveries"] == 0
            holder.send_signal(signal.SIGCONT)
            holder.kill()
            holder.wait()
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert mb.get_flow(k) is not None
                    break
                except FlowLockTimeout:
                    assert time.monotonic() < deadline
            mb.put_flow(k, modified=False)
    finally:
        if holder.poll() is None:
            holder.kill()


def test_a_holder_that_died_before_writing_its_pid_is_recovered(cluster, smm_factory):
    """The window between sem_wait and the holder_pid store: caught as an orphaned stripe."""
    import posix_ipc
    from shared.flowkey import hash_key
    smm_factory(cluster, "r1")
    k = make_key("10.9.0.1", 5, "10.9.1.1", 80, 6)
    stripe = hash_key(k) & (cluster.flow_table.lock_stripes - 1)
    name = f"/picot.{cluster.cluster.name}.r1.s{stripe}"
    code = f"import posix_ipc; posix_ipc.Semaphore({name!r}).acquire()"
    subprocess.run([sys.executable, "-c", code], check=True)  # takes it and exits
    s = await_stats(cluster, lambda s: s["counters"]["lock_recoveries"] >= 1)
    assert s["counters"]["lock_recoveries"] == 1
    with attach_replica(cluster, "r1") as mb:
        mb.get_flow(k, create=True)
        mb.put_flow(k)
    del posix_ipc
