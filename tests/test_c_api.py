"""The C library against a real SMM: round trips with Python both ways, errors, dead C clients."""
import json
import os
import shutil
import subprocess
import time

import pytest

from shared import wire
from shared.api import attach_replica, flow_segment_name
from shared.control import ControlClient
from shared.flowkey import make_key

pytestmark = pytest.mark.cbuild
FLOW = ["tcp", "10.5.0.1", "4000", "10.6.0.1", "443"]
KEY = make_key("10.5.0.1", 4000, "10.6.0.1", 443, 6)


@pytest.fixture
def seg(cluster, smm_factory, cbuild):
    smm_factory(cluster, "r1")
    c = cluster.cluster
    return flow_segment_name(c.shm_prefix, c.name, "r1")


def flowtool(cbuild, *args, check=True):
    r = subprocess.run([str(cbuild / "flowtool"), *args], capture_output=True, text=True,
                       timeout=30)
    if check:
        assert r.returncode == 0, f"flowtool {args}: exit {r.returncode}: {r.stderr}"
    return r


def test_c_writes_python_reads(cluster, seg, cbuild):
    flowtool(cbuild, seg, "put", *FLOW, "c0ffee", "4")
    with attach_replica(cluster, "r1") as mb:
        st = mb.get_flow(KEY)
        assert bytes(st[:3]) == bytes.fromhex("c0ffee")
        mb.put_flow(KEY, modified=False)
        idx, _ = mb.table.lookup(KEY)
        assert int(mb.table.slots[idx]["group"]) == 4 and int(mb.table.slots[idx]["version"]) == 1


def test_python_writes_c_reads_the_reverse_direction(cluster, seg, cbuild):
    with attach_replica(cluster, "r1") as mb:
        mb.get_flow(KEY, create=True)[:4] = b"\x01\x02\x03\x04"
        mb.put_flow(KEY)
    # The C side names the flow from the server's side: the same canonical key.
    out = flowtool(cbuild, seg, "get", "tcp", "10.6.0.1", "443", "10.5.0.1", "4000").stdout
    assert out.strip().startswith("01020304") and len(out.strip()) == 2 * 64


def test_c_delete_is_seen_by_python(cluster, seg, cbuild):
    flowtool(cbuild, seg, "put", *FLOW, "aa")
    flowtool(cbuild, seg, "del", *FLOW)
    with attach_replica(cluster, "r1") as mb:
        assert mb.get_flow(KEY) is None
    assert flowtool(cbuild, seg, "get", *FLOW, check=False).returncode == 3


def test_standby_is_invisible_to_c(cluster, seg, cbuild):
    with ControlClient(cluster.replica("r1").smm_endpoint) as c:
        c.request(wire.INSTALL, wire.encode_install(2, 1, 1, 0, 64, [(KEY, wire.OP_UPSERT, 1,
                                                                       b"S" * 64)]))
        assert flowtool(cbuild, seg, "get", *FLOW, check=False).returncode == 3
        r = flowtool(cbuild, seg, "put", *FLOW, "aa", check=False)
        assert r.returncode == 18 and "standby" in r.stderr  # PICO_E_STANDBY
        c.request(wire.ACTIVATE, wire.encode_activate(wire.SEL_KEYS, keys=[KEY]))
    assert flowtool(cbuild, seg, "get", *FLOW).stdout.startswith("53" * 8)


def test_c_client_killed_mid_transaction_is_recovered(cluster, seg, cbuild):
    r = flowtool(cbuild, seg, "hold-stripe", *FLOW, "1", check=False)
    assert r.returncode != 0 and "held" in r.stdout  # it aborted holding the flow
    with ControlClient(cluster.replica("r1").smm_endpoint) as c:
        deadline = time.monotonic() + 10
        while True:
            s = json.loads(c.request(wire.STATS).body)
            if s["counters"]["client_recoveries"] >= 1 and s["counters"]["lock_recoveries"] >= 1:
                break
            assert time.monotonic() < deadline, s
            time.sleep(0.02)
        assert s["counters"]["txn_recoveries"] == 1 and s["clients"] == []
    flowtool(cbuild, seg, "put", *FLOW, "bb")  # the stripe is usable again
    with attach_replica(cluster, "r1") as mb:
        idx, _ = mb.table.lookup(KEY)
        assert int(mb.table.slots[idx]["refcount"]) == 0


def test_c_attach_errors(cluster, cbuild):
    r = flowtool(cbuild, "/picot.none.r1.flows", "attach", check=False)
    assert r.returncode == 1 and "no" in r.stderr.lower()


def test_c_and_python_hammer_the_same_flows(cluster, seg, cbuild):
    flowtool(cbuild, seg, "fill", "16")
    procs = [subprocess.Popen([str(cbuild / "flowtool"), seg, "bench", "20000", "16"],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    with attach_replica(cluster, "r1") as mb:
        keys = [make_key(f"10.0.0.{i}", 1000 + i, "192.168.0.1", 80, 6) for i in range(16)]
        for n in range(4000):
            mb.get_flow(keys[n % 16])
            mb.put_flow(keys[n % 16], modified=True)
        for p in procs:
            assert p.wait(60) == 0
            json.loads(p.stdout.read())
        versions = 0
        for k in keys:
            idx, _ = mb.table.lookup(k)
            versions += int(mb.table.slots[idx]["version"])
            assert int(mb.table.slots[idx]["refcount"]) == 0
    assert versions == 16 + 2 * 20000 + 4000  # fill + two C benches + Python: none lost


def test_headers_compile_as_cplusplus(tmp_path):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not installed: the C++ check of pico.h needs it")
    src = tmp_path / "t.cpp"
    src.write_text('#include "pico.h"\nint main() { return sizeof(pico_flow_key) == 40 ? 0 : 1; }\n')
    root = os.path.dirname(os.path.dirname(__file__))
    subprocess.run([gxx, "-std=c++11", "-Wall", "-Werror", "-I", f"{root}/shared", str(src), "-o",
                    str(tmp_path / "t")], check=True)
    assert subprocess.run([str(tmp_path / "t")]).returncode == 0


def test_c_writers_leave_the_rms_dirty_hints(cluster, seg, cbuild):
    """A C put and a C delete each mark their stripe, so the RM's capture finds them."""
    from rm.capture import capture, mark_captured
    from shared import wire
    with attach_replica(cluster, "r1") as mb:
        t = mb.table
        flowtool(cbuild, seg, "put", *FLOW, "aa", "4")
        idx = t.lookup(KEY)[0]
        stripe, at = idx // t.g.slots_per_stripe, idx % t.g.slots_per_stripe
        block = at * 16 // t.g.slots_per_stripe
        assert t.stripes["dirty"][stripe].tolist() == [int(b == block) for b in range(16)]
        got = capture(t, [4])[4]
        assert [bytes(r["key"]) for r in got.records] == [KEY]
        mark_captured(t, got.slots, 1)
        assert not t.stripes["dirty"][stripe].any()
        flowtool(cbuild, seg, "del", *FLOW)
        assert int(t.stripes["dirty"][stripe][block]) == 1
        assert [int(r["op"]) for r in capture(t, [4])[4].records] == [wire.OP_DELETE]
