"""The C packet API (libpico pico_pkt_*) against the PMM's side in this process: a real packet
segment (PacketStore), Ingress queueing packets and Releaser applying output commit, with the C
test tool (tests/c/pkttool) or the example middleboxes (examples/) as the middlebox process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pmm.core import ACCEPT, DROP, QUEUED, SEND
from pmm.parse import parse
from pktbuild import dns, other, web
from shared import abi
from shared.errors import AttachError
from shared.packets import attach_packets
from nettools import wait_line

pytestmark = pytest.mark.cbuild

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEB, DNS = 1, 2
E_FULL, E_INVAL, E_TIMEOUT, E_BUSY = 17, 20, 24, 25  # pkttool exits: |PICO_E_*| + 10


@pytest.fixture
def env(packet_bed):
    """The packet bed without a Python middlebox: the C tool is the one."""
    store, ingress, releaser, ctl, cfg, _ = packet_bed
    yield store, ingress, releaser, ctl, cfg


@pytest.fixture(scope="module")
def tools(cbuild):
    proc = subprocess.run(["make", "-C", os.path.join(REPO, "examples")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"make -C examples failed:\n{proc.stdout}\n{proc.stderr}"
    return cbuild


def feed(store, ingress, packet_id, data):
    """What the PMM does per NFQUEUE packet: queue it, ring the input doorbell."""
    assert ingress.on_packet(packet_id, data) == QUEUED
    store.in_bell.release()


def pkttool(tools, store, *args, check=True, timeout=30):
    r = subprocess.run([str(tools / "pkttool"), store.name, *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"pkttool {args}: exit {r.returncode}: {r.stderr}"
    return r


def lines(r):
    return [json.loads(x) for x in r.stdout.splitlines() if x.strip()]


def drain_until(rel, n, timeout=10.0):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += rel.drain()
        if len(out) < n:
            time.sleep(0.01)
    return out


def mb_counts(store, index):
    row = store.seg.groups[index]
    return {f: int(row[f]) for f in abi.GROUP_MB}


# ------------------------------------------------------------------------------------ reading
def test_c_reads_what_ingress_queued(env, tools):
    store, ingress, rel, _, _ = env
    sent = {1: web(1), 2: dns(2), 3: other(3), 4: b"\x45garbage"}
    for pid, data in sent.items():
        feed(store, ingress, pid, data)
    got = {p["id"]: p for p in lines(pkttool(tools, store, "read", 4, 2000))}
    assert sorted(got) == [1, 2, 3, 4]
    for pid, data in sent.items():
        p, want = got[pid], parse(data)
        assert p["len"] == len(data)
        assert bytes.fromhex(p["key"]) == want.key
        assert int(p["hash"], 16) == want.flow_hash
    assert (got[1]["group"], got[2]["group"], got[3]["group"]) == (WEB, DNS, abi.GROUP_DEFAULT)
    assert got[1]["flags"] & abi.PKT_NEW and not got[1]["flags"] & abi.PKT_NOFLOW
    assert got[4]["group"] == abi.GROUP_DEFAULT and got[4]["flags"] & abi.PKT_NOFLOW
    assert got[4]["key"] == "00" * 40
    # Written back unchanged: the unbuffered groups leave at once, web waits for its commit.
    out = rel.drain()
    assert sorted(v.packet_id for v in out) == [2, 3, 4]
    assert all(v.action == ACCEPT and v.data is None for v in out)
    assert mb_counts(store, 1)["pkts_read"] == mb_counts(store, 1)["pkts_done"] == 1
    assert mb_counts(store, 0)["pkts_read"] == 2 and mb_counts(store, 0)["written"] == 2
    assert int(store.seg.desc["consumer_pid"]) == 0  # detached on exit


def test_c_round_robin_no_group_starves(env, tools):
    store, ingress, *_ = env
    for i in range(10):
        feed(store, ingress, 100 + i, web(i))
    for i in range(3):
        feed(store, ingress, 200 + i, dns(i))
    got = [p["group"] for p in lines(pkttool(tools, store, "read", 6, 2000))]
    assert got.count(DNS) == 3  # interleaved with web, not after all ten of them


def test_c_skips_a_suspended_group_while_another_is_read(env, tools):
    store, ingress, _, ctl, _ = env
    ctl.suspend(WEB)
    for i in range(3):
        feed(store, ingress, 10 + i, web(i))
    feed(store, ingress, 20, dns(0))
    [p] = lines(pkttool(tools, store, "read", 1, 2000))
    assert (p["id"], p["group"]) == (20, DNS)
    r = pkttool(tools, store, "read", 1, 200, check=False)
    assert r.returncode == E_TIMEOUT and r.stdout == ""  # web waits in its ring
    assert len(store.seg.input_ring(1)) == 3
    ctl.resume(WEB)
    assert [p["id"] for p in lines(pkttool(tools, store, "read", 3, 2000))] == [10, 11, 12]


def test_c_blocked_reader_wakes_on_resume(env, tools):
    store, ingress, _, ctl, _ = env
    ctl.suspend(WEB)
    feed(store, ingress, 1, web(1))
    proc = subprocess.Popen([str(tools / "pkttool"), store.name, "read", "1", "10000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.4)  # attached and asleep on the doorbell: the only packet is suspended
        assert proc.poll() is None
        t0 = time.monotonic()
        ctl.resume(WEB)
        out, err = proc.communicate(timeout=5)
        assert proc.returncode == 0, err
        assert time.monotonic() - t0 < 2.0
        assert json.loads(out)["id"] == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_c_read_times_out_without_spinning(env, tools):
    store, *_ = env
    proc = subprocess.Popen([str(tools / "pkttool"), store.name, "read", "1", "800"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    err = proc.stderr.read().decode()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == E_TIMEOUT, err
    assert "no packet within 800 ms" in err
    assert 0.75 <= wall < 3.0, wall
    assert ru.ru_utime + ru.ru_stime < 0.1 * wall, (ru.ru_utime, ru.ru_stime, wall)
    # timeout 0 polls: no wait at all
    t0 = time.monotonic()
    assert pkttool(tools, store, "read", 1, 0, check=False).returncode == E_TIMEOUT
    assert time.monotonic() - t0 < 0.5


def test_c_idle_reader_absorbs_stale_doorbell_posts(env, tools):
    store, ingress, *_ = env
    for i in range(5):
        feed(store, ingress, i + 1, dns(i))  # five posts, read without ever waiting
    r = pkttool(tools, store, "read", 6, 300, check=False)
    assert r.returncode == E_TIMEOUT and len(lines(r)) == 5
    assert store.in_bell.value == 0  # absorbed before it slept: no empty wake-ups left over


# ------------------------------------------------------------------------------------ writing
def test_c_echo_write_held_until_commit_then_released_in_order(env, tools):
    store, ingress, rel, ctl, _ = env
    for i in range(4):
        feed(store, ingress, i + 1, web(i))
    pkttool(tools, store, "echo", 2, "write")      # tagged epoch 1
    ctl.open_epoch(WEB, 2)
    pkttool(tools, store, "echo", 2, "write")      # tagged epoch 2
    assert rel.drain() == []                       # nothing committed yet
    assert int(store.seg.groups[1]["held"]) == 4
    ctl.commit(WEB, 1)
    out = rel.drain()
    assert [(v.action, v.packet_id, v.epoch, v.data) for v in out] == [(ACCEPT, 1, 1, None),
                                                                      (ACCEPT, 2, 1, None)]
    ctl.commit(WEB, 2)
    assert [(v.packet_id, v.epoch) for v in rel.drain()] == [(3, 2), (4, 2)]
    c = mb_counts(store, 1)
    assert (c["pkts_read"], c["pkts_done"], c["written"]) == (4, 4, 4)


def test_c_modify_carries_the_new_bytes(env, tools):
    store, ingress, rel, ctl, _ = env
    feed(store, ingress, 7, dns(1))
    pkttool(tools, store, "echo", 1, "modify")
    [v] = rel.drain()
    want = bytearray(dns(1))
    want[-1] ^= 0xFF
    assert (v.action, v.packet_id, v.data, v.buffering) == (ACCEPT, 7, bytes(want), 0)
    # Identical bytes passed as data are not a modification.
    feed(store, ingress, 8, dns(2))
    pkttool(tools, store, "echo", 1, "copy")
    [v] = rel.drain()
    assert (v.packet_id, v.data) == (8, None)
    # A buffered group's modified packet waits for its commit like any other.
    feed(store, ingress, 9, web(1, b"hello"))
    pkttool(tools, store, "echo", 1, "modify")
    assert rel.drain() == []
    ctl.commit(WEB, 1)
    [v] = rel.drain()
    want = bytearray(web(1, b"hello"))
    want[-1] ^= 0xFF  # the checksums are the PMM's to fix (PICO_PKT_MODIFIED)
    assert v.packet_id == 9 and v.data == bytes(want)


def test_c_direct_and_drop_bypass_commit(env, tools):
    store, ingress, rel, _, _ = env
    feed(store, ingress, 1, web(1))
    feed(store, ingress, 2, web(2))
    pkttool(tools, store, "echo", 1, "direct")
    pkttool(tools, store, "echo", 1, "drop")
    out = rel.drain()  # no commit: both leave at once
    assert [(v.action, v.packet_id) for v in out] == [(ACCEPT, 1), (DROP, 2)]
    assert out[0].data is None
    c = mb_counts(store, 1)
    assert (c["pkts_read"], c["pkts_done"], c["written_direct"], c["dropped"], c["written"]) == \
        (2, 2, 1, 1, 0)


def test_c_created_packets_are_sent(env, tools):
    store, ingress, rel, ctl, _ = env
    assert pkttool(tools, store, "create", WEB, web(9).hex()).stdout.strip() == "ok"
    assert rel.drain() == []  # web holds output until the commit
    ctl.commit(WEB, 1)
    [v] = rel.drain()
    assert (v.action, v.packet_id, v.data, v.group, v.epoch) == (SEND, 0, web(9), WEB, 1)
    pkttool(tools, store, "create", DNS, dns(9).hex())  # unbuffered: at once
    [v] = rel.drain()
    assert (v.action, v.data) == (SEND, dns(9))
    assert mb_counts(store, 1)["created"] == 1 and mb_counts(store, 1)["pkts_done"] == 0
    r = pkttool(tools, store, "create", 99, "45", check=False)
    assert r.returncode == E_INVAL and "group 99 does not exist" in r.stderr


def test_c_full_output_ring_tells_the_caller(env, tools):
    store, ingress, *_ = env
    for i in range(16):
        feed(store, ingress, i + 1, web(i))
    pkttool(tools, store, "echo", 16, "write")
    feed(store, ingress, 99, web(99))
    r = pkttool(tools, store, "echo", 1, "write", check=False)
    assert r.returncode == E_FULL and "output ring" in r.stderr
    c = mb_counts(store, 1)
    assert (c["output_full"], c["pkts_done"], c["written"]) == (1, 17, 16)
    assert store.seg.output_ring(1).full_drops == 1


# ------------------------------------------------------------------------------------ attach
def test_second_middlebox_is_refused_while_pkttool_runs(env, tools):
    store, ingress, rel, _, _ = env
    proc = subprocess.Popen([str(tools / "pkttool"), store.name, "read", "1", "20000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 5
        while int(store.seg.desc["consumer_pid"]) != proc.pid:
            assert time.monotonic() < deadline and proc.poll() is None, "pkttool never attached"
            time.sleep(0.01)
        r = pkttool(tools, store, "attach", check=False)
        assert r.returncode == E_BUSY and f"already has a middlebox (pid {proc.pid})" in r.stderr
        with pytest.raises(AttachError, match="already has a middlebox"):
            attach_packets(store.name)
        feed(store, ingress, 5, dns(5))
        out, err = proc.communicate(timeout=5)
        assert proc.returncode == 0, err
        assert json.loads(out)["id"] == 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert int(store.seg.desc["consumer_pid"]) == 0
    assert pkttool(tools, store, "attach").stdout.strip() == "ok"


def test_dead_middlebox_is_replaced_and_its_packets_written_off(env, tools):
    store, ingress, *_ = env
    dead = subprocess.Popen(["true"])
    dead.wait()
    store.seg.desc["consumer_pid"] = dead.pid
    row = store.seg.groups[1]
    row["pkts_read"] = 5  # five packets it took and never finished
    assert pkttool(tools, store, "attach").stdout.strip() == "ok"
    assert int(row["pkts_done"]) == 5
    assert int(store.seg.desc["consumer_pid"]) == 0


def test_c_attach_errors(env, tools, smm_factory):
    store, _, _, _, cfg = env
    r = subprocess.run([str(tools / "pkttool"), "/picot.none.r1.pkts", "attach"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 11 and "is the PMM" in r.stderr  # PICO_E_MISSING
    # Kinds are checked both ways: a flow segment is not a packet segment, and vice versa.
    from shared.api import flow_segment_name
    smm_factory(cfg, "r1")
    c = cfg.cluster
    flows = flow_segment_name(c.shm_prefix, c.name, "r1")
    r = subprocess.run([str(tools / "pkttool"), flows, "attach"], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 14 and "expected 2 (pkts)" in r.stderr  # PICO_E_CORRUPT
    r = subprocess.run([str(tools / "flowtool"), store.name, "attach"], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 4 and "expected 1 (flows)" in r.stderr


# ------------------------------------------------------------------------------------ examples


@pytest.mark.parametrize("with_flows", [False, True], ids=["packets", "flows"])
@pytest.mark.parametrize("lang", ["c", "py"])
def test_passthrough_examples(env, tools, smm_factory, lang, with_flows):
    store, ingress, rel, ctl, cfg = env
    argv = ([str(os.path.join(REPO, "examples", "build", "passthrough"))] if lang == "c"
            else [sys.executable, os.path.join(REPO, "examples", "passthrough.py")])
    argv.append(store.name)
    if with_flows:
        from shared.api import flow_segment_name
        smm_factory(cfg, "r1")
        c = cfg.cluster
        argv.append(flow_segment_name(c.shm_prefix, c.name, "r1"))
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = wait_line(proc, 15)
        assert line.strip() == "ready", (line, proc.poll(), proc.stderr.read() if proc.poll()
                                         is not None else "")
        # Two flows, ten packets each, in two batches (the rings hold 16): the first held
        # until the commit, the second released as it comes (its epoch 1 is committed).
        for i in range(10):
            feed(store, ingress, i + 1, web(i % 2))
        deadline = time.monotonic() + 10
        while mb_counts(store, 1)["written"] < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rel.drain() == []
        ctl.commit(WEB, 1)
        out = drain_until(rel, 10)
        for i in range(10, 20):
            feed(store, ingress, i + 1, web(i % 2))
        out += drain_until(rel, 10)
        assert [(v.action, v.packet_id, v.data) for v in out] == \
            [(ACCEPT, i + 1, None) for i in range(20)]
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1]) == {"packets": 20, "writes_failed": 0}
    c = mb_counts(store, 1)
    assert (c["pkts_read"], c["pkts_done"], c["written"]) == (20, 20, 20)
    assert int(store.seg.desc["consumer_pid"]) == 0
    if with_flows:
        from shared.api import attach_replica
        with attach_replica(cfg, "r1") as mb:
            for i in range(2):
                key = parse(web(i)).key
                st = mb.get_flow(key)
                assert st is not None and int.from_bytes(bytes(st[:8]), "little") == 10
                mb.put_flow(key, modified=False)
                idx, _ = mb.table.lookup(key)
                assert int(mb.table.slots[idx]["group"]) == WEB
