"""The SMM process: segment ownership, control messages good and bad (real processes, real ZMQ)."""
import json
import signal
import struct
from pathlib import Path

import pytest

from shared import wire
from shared.api import attach_replica
from shared.control import ControlClient
from shared.errors import ControlTimeout, WireError
from shared.flowkey import make_key

STATE = 64


def k(i):
    return make_key("10.1.0.1", 2000 + i, "10.2.0.1", 443, 6)


def install(client, epoch, base, records, owner=2, group=1, flags=0):
    body = wire.encode_install(owner, group, epoch, base, STATE, records, flags)
    reply = client.request(wire.INSTALL, body)
    return wire.INSTALL_REPLY.unpack(reply.body)


def stats(client):
    return json.loads(client.request(wire.STATS).body)


@pytest.fixture
def smm(cluster, smm_factory):
    proc = smm_factory(cluster, "r1")
    client = ControlClient(proc.endpoint, timeout_ms=3000)
    yield proc, client
    client.close()


def test_segment_exists_while_running_and_is_removed_on_sigterm(cluster, smm_factory):
    p = smm_factory(cluster, "r1")
    seg = Path("/dev/shm") / f"picot.{cluster.cluster.name}.r1.flows"
    sems = list(Path("/dev/shm").glob(f"sem.picot.{cluster.cluster.name}.r1.*"))
    assert seg.exists() and len(sems) == cluster.flow_table.lock_stripes + 1
    assert p.stop() == 0
    assert not seg.exists()
    assert not list(Path("/dev/shm").glob(f"sem.picot.{cluster.cluster.name}.r1.*"))


def test_restart_after_crash_cleans_the_leftovers(cluster, smm_factory):
    p = smm_factory(cluster, "r1")
    with attach_replica(cluster, "r1") as mb:
        mb.get_flow(k(1), create=True)
        mb.put_flow(k(1))
    p.stop(signal.SIGKILL)
    seg = Path("/dev/shm") / f"picot.{cluster.cluster.name}.r1.flows"
    assert seg.exists()  # the crash left it
    smm_factory(cluster, "r1")  # the successor takes over
    with attach_replica(cluster, "r1") as mb:
        assert mb.get_flow(k(1)) is None  # a fresh table


def test_install_then_activate_by_replica(cluster, smm):
    proc, c = smm
    recs = [(k(i), wire.OP_UPSERT, 10 + i, bytes([i]) * STATE) for i in range(5)]
    disp, _, acked, installed, updated, deleted, conflicts = install(c, 1, 0, recs)
    assert (disp, acked, installed, updated, deleted, conflicts) == (wire.APPLIED, 1, 5, 0, 0, 0)
    with attach_replica(cluster, "r1") as mb:
        assert mb.get_flow(k(0)) is None  # standby flows are invisible
        reply = c.request(wire.ACTIVATE, wire.encode_activate(wire.SEL_REPLICA, 2))
        assert sorted(wire.decode_key_list(reply.body)) == sorted(r[0] for r in recs)
        st = mb.get_flow(k(3))
        assert bytes(st) == bytes([3]) * STATE
        mb.put_flow(k(3), modified=False)
    s = stats(c)
    assert s["flows"]["active"] == 5 and s["counters"]["activated"] == 5
    assert s["counters"]["standby_installed"] == 5


def test_activate_by_group_and_by_keys(cluster, smm):
    _, c = smm
    install(c, 1, 0, [(k(1), wire.OP_UPSERT, 1, b"a" * STATE)], group=1)
    install(c, 1, 0, [(k(2), wire.OP_UPSERT, 1, b"b" * STATE),
                      (k(3), wire.OP_UPSERT, 1, b"c" * STATE)], group=2)
    r = c.request(wire.ACTIVATE, wire.encode_activate(wire.SEL_GROUP, 2))
    assert sorted(wire.decode_key_list(r.body)) == sorted([k(2), k(3)])
    r = c.request(wire.ACTIVATE, wire.encode_activate(wire.SEL_KEYS, keys=[k(1), k(9)]))
    assert wire.decode_key_list(r.body) == [k(1)]
    r = c.request(wire.ACTIVATE, wire.encode_activate(wire.SEL_REPLICA, 2))
    assert wire.decode_key_list(r.body) == []


def test_install_is_idempotent_and_stale_epochs_are_ignored(cluster, smm):
    _, c = smm
    install(c, 1, 0, [(k(1), wire.OP_UPSERT, 1, b"1" * STATE)])
    install(c, 2, 1, [(k(1), wire.OP_UPSERT, 2, b"2" * STATE)])
    # A retry of epoch 2 and a late epoch 1: acked, not applied.
    for epoch, base, payload in ((2, 1, b"X"), (1, 0, b"Y")):
        disp, _, acked, *counts = install(c, epoch, base, [(k(1), wire.OP_UPSERT, 9, payload * STATE)])
        assert disp == wire.DUPLICATE and acked == 2 and counts == [0, 0, 0, 0]
    dump = json.loads(c.request(wire.DUMP, wire.json_body({"status": "standby"})).body)
    assert dump["total"] == 1 and dump["flows"][0]["version"] == 2
    assert dump["flows"][0]["ckpt_epoch"] == 2
    # Another group of the same owner has its own epoch stream.
    assert install(c, 1, 0, [(k(2), wire.OP_UPSERT, 1, b"g" * STATE)], group=9)[0] == wire.APPLIED


def test_epoch_gap_is_refused_until_a_full_snapshot(cluster, smm):
    _, c = smm
    install(c, 1, 0, [(k(1), wire.OP_UPSERT, 1, b"1" * STATE)])
    with pytest.raises(WireError, match="builds on epoch 2, but the last installed is 1") as e:
        install(c, 3, 2, [(k(1), wire.OP_UPSERT, 3, b"3" * STATE)])
    assert e.value.code == wire.ERR_EPOCH_GAP
    assert install(c, 5, 0, [(k(1), wire.OP_UPSERT, 5, b"5" * STATE)],
                   flags=wire.INSTALL_FULL)[2] == 5


def test_full_snapshot_replaces_the_group_and_restarts_the_stream(cluster, smm):
    _, c = smm
    install(c, 1, 0, [(k(i), wire.OP_UPSERT, 1, b"o" * STATE) for i in range(4)], group=1)
    install(c, 1, 0, [(k(9), wire.OP_UPSERT, 1, b"x" * STATE)], group=2)
    install(c, 7, 1, [(k(0), wire.OP_UPSERT, 7, b"o" * STATE)], group=1)
    # The primary restarted: its epochs count from 1 again, behind the backup's 7.
    res = install(c, 1, 0, [(k(1), wire.OP_UPSERT, 2, b"N" * STATE),
                            (k(5), wire.OP_UPSERT, 2, b"N" * STATE)], group=1,
                  flags=wire.INSTALL_FULL)
    disp, _, acked, installed, updated, deleted, _ = res
    assert (disp, acked, installed, updated, deleted) == (wire.APPLIED, 1, 1, 1, 3)
    dump = json.loads(c.request(wire.DUMP, wire.json_body({"status": "standby"})).body)
    got = {(f["group"], f["key"]) for f in dump["flows"]}
    assert got == {(1, k(1).hex()), (1, k(5).hex()), (2, k(9).hex())}  # group 2 untouched
    assert install(c, 2, 1, [(k(1), wire.OP_UPSERT, 3, b"M" * STATE)], group=1)[0] == wire.APPLIED
    assert stats(c)["flows"]["standby"] == 3


def test_a_batch_applies_each_section_on_its_own(cluster, smm):
    _, c = smm
    up = [(k(1), wire.OP_UPSERT, 1, b"1" * STATE)]
    sections = [wire.encode_install(2, 1, 1, 0, STATE, up),
                wire.encode_install(2, 2, 5, 4, STATE, [(k(2), wire.OP_UPSERT, 1, b"2" * STATE)]),
                b"\x00" * 10,                                                   # garbage
                wire.encode_install(2, 3, 1, 0, STATE, [(k(3), wire.OP_UPSERT, 1, b"3" * STATE)])]
    errors_before = sum(stats(c)["errors"].values())
    reply = c.request(wire.INSTALL_BATCH, wire.encode_install_batch(sections))
    rows = wire.decode_batch_reply(reply.body)
    assert [(g, st) for g, st, _ in rows] == [(1, wire.OK), (2, wire.ERR_EPOCH_GAP),
                                              (0, wire.ERR_TRUNCATED), (3, wire.OK)]
    assert rows[0][2][2] == 1 and rows[3][2][2] == 1   # acked epochs of the good sections
    assert stats(c)["flows"]["standby"] == 2           # the gap installed nothing
    assert sum(stats(c)["errors"].values()) == errors_before + 2


def test_a_delete_from_the_group_a_flow_left_keeps_the_new_groups_copy(cluster, smm):
    _, c = smm
    install(c, 1, 0, [(k(1), wire.OP_UPSERT, 1, b"1" * STATE)], group=1)
    install(c, 1, 0, [(k(1), wire.OP_UPSERT, 2, b"2" * STATE)], group=2)   # moved to 2
    assert install(c, 2, 1, [(k(1), wire.OP_DELETE, 2, None)], group=1)[5] == 0
    assert stats(c)["flows"]["standby"] == 1


def test_delete_records_remove_standby(cluster, smm):
    _, c = smm
    install(c, 1, 0, [(k(1), wire.OP_UPSERT, 1, b"1" * STATE), (k(2), wire.OP_UPSERT, 1, b"2" * STATE)])
    res = install(c, 2, 1, [(k(1), wire.OP_DELETE, 2, None), (k(7), wire.OP_DELETE, 2, None)])
    assert res[5] == 1  # deleted
    assert stats(c)["flows"]["standby"] == 1


def test_standby_for_an_active_flow_is_a_counted_conflict(cluster, smm):
    _, c = smm
    with attach_replica(cluster, "r1") as mb:
        mb.get_flow(k(1), create=True)[:1] = b"L"
        mb.put_flow(k(1))
        assert install(c, 1, 0, [(k(1), wire.OP_UPSERT, 1, b"R" * STATE)])[6] == 1
        assert bytes(mb.get_flow(k(1))[:1]) == b"L"
        mb.put_flow(k(1), modified=False)


def _table_snapshot(c):
    return json.loads(c.request(wire.DUMP).body)


BAD_FRAMES = {
    "truncated-header": (b"PCTL\x01", wire.ERR_TRUNCATED),
    "bad-magic": (wire.HEADER.pack(b"XXXX", 1, wire.PING, 5, 0, 0), wire.ERR_BAD_MAGIC),
    "bad-version": (wire.HEADER.pack(wire.MAGIC, 9, wire.PING, 5, 0, 0), wire.ERR_BAD_VERSION),
    "length-mismatch": (wire.HEADER.pack(wire.MAGIC, 1, wire.PING, 5, 10, 0) + b"abc",
                        wire.ERR_TRUNCATED),
    "unknown-type": (wire.encode(0x42, 5), wire.ERR_UNKNOWN_TYPE),
    "install-short": (wire.encode(wire.INSTALL, 5, b"\x01\x00"), wire.ERR_TRUNCATED),
    "install-records-truncated": (
        wire.encode(wire.INSTALL, 5, wire.encode_install(2, 1, 1, 0, STATE, [(k(1), 1, 1, b"x")])[:-10]),
        wire.ERR_TRUNCATED),
    "install-bad-op": (
        wire.encode(wire.INSTALL, 5, wire.encode_install(2, 1, 1, 0, STATE, [(k(1), 7, 1, b"x")])),
        wire.ERR_BAD_BODY),
    "install-epoch-0": (
        wire.encode(wire.INSTALL, 5, wire.encode_install(2, 1, 0, 0, STATE, [(k(1), 1, 1, b"x")])),
        wire.ERR_BAD_BODY),
    "install-wrong-state-size": (
        wire.encode(wire.INSTALL, 5, wire.encode_install(2, 1, 1, 0, 32, [(k(1), 1, 1, b"x")])),
        wire.ERR_STATE_SIZE),
    "install-from-self": (
        wire.encode(wire.INSTALL, 5, wire.encode_install(1, 1, 1, 0, STATE, [(k(1), 1, 1, b"x")])),
        wire.ERR_BAD_BODY),
    "activate-bad-selector": (wire.encode(wire.ACTIVATE, 5, struct.pack("<IIII", 9, 0, 0, 0)),
                              wire.ERR_BAD_BODY),
    "activate-key-count-lies": (wire.encode(wire.ACTIVATE, 5, struct.pack("<IIII", 3, 0, 0, 4) + k(1)),
                                wire.ERR_TRUNCATED),
    "dump-not-json": (wire.encode(wire.DUMP, 5, b"\xff\xfe"), wire.ERR_BAD_BODY),
    "dump-bad-limit": (wire.encode(wire.DUMP, 5, b'{"limit": "all"}'), wire.ERR_BAD_BODY),
    "dump-bad-group": (wire.encode(wire.DUMP, 5, b'{"group": "web"}'), wire.ERR_BAD_BODY),
    "dump-not-object": (wire.encode(wire.DUMP, 5, b'[1, 2]'), wire.ERR_BAD_BODY),
    "batch-short": (wire.encode(wire.INSTALL_BATCH, 5, b"\x01"), wire.ERR_TRUNCATED),
    "batch-section-missing": (wire.encode(wire.INSTALL_BATCH, 5, struct.pack("<II", 2, 0)),
                              wire.ERR_TRUNCATED),
    "batch-section-overruns": (wire.encode(wire.INSTALL_BATCH, 5,
                                           struct.pack("<III", 1, 0, 999) + b"x"),
                               wire.ERR_TRUNCATED),
    "batch-trailing-bytes": (wire.encode(wire.INSTALL_BATCH, 5, struct.pack("<II", 0, 0) + b"z"),
                             wire.ERR_TRUNCATED),
    "batch-too-many": (wire.encode(wire.INSTALL_BATCH, 5, struct.pack("<II", 99999, 0)),
                       wire.ERR_BAD_BODY),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_bad_messages_get_an_error_reply_and_change_nothing(cluster, smm, case):
    _, c = smm
    install(c, 1, 0, [(k(1), wire.OP_UPSERT, 1, b"1" * STATE)])
    before = _table_snapshot(c)
    errors_before = sum(stats(c)["errors"].values())
    frame, code = BAD_FRAMES[case]
    reply = c.request_raw(frame)
    assert reply.status == code, reply.body
    assert reply.type in (wire.ERROR, wire.peek_seq(frame) and reply.type)
    msg = json.loads(reply.body)
    assert msg["error"] == wire.ERROR_NAMES[code] and msg["message"]
    assert _table_snapshot(c) == before
    s = stats(c)
    assert sum(s["errors"].values()) == errors_before + 1
    c.request(wire.PING)  # still serving


def test_oversized_message_gets_too_large(cluster, smm):
    _, c = smm
    limit = cluster.control.max_message_bytes
    reply = c.request_raw(wire.encode(wire.PING, 77, b"z" * limit))
    assert reply.status == wire.ERR_TOO_LARGE and reply.seq == 77
    assert stats(c)["errors"]["too_large"] == 1


def test_multi_frame_envelope_is_rejected(cluster, smm):
    import zmq
    proc, c = smm
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.connect(proc.endpoint)
    s.send_multipart([b"", wire.encode(wire.PING, 1), b"extra"])
    assert s.poll(3000)
    reply = wire.decode(s.recv_multipart()[-1], 1 << 20)
    assert reply.status == wire.ERR_BAD_ENVELOPE
    s.close(linger=0)
    c.request(wire.PING)


def test_request_to_a_dead_endpoint_times_out_clearly():
    from conftest import free_port
    with ControlClient(f"tcp://127.0.0.1:{free_port()}", timeout_ms=100) as c:
        with pytest.raises(ControlTimeout, match="no reply from tcp://127.0.0.1:"):
            c.request(wire.PING)


def test_ping_and_stats_shape(cluster, smm):
    _, c = smm
    ping = json.loads(c.request(wire.PING).body)
    assert ping["replica"] == "r1" and ping["pid"] > 0
    s = stats(c)
    assert s["capacity"] == cluster.flow_table.capacity and s["stripes"] == 64
    assert s["flows"]["free"] == s["slots"]


def test_unknown_replica_and_bad_config_exit_nonzero(cluster, tmp_path):
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "smm", "--config", str(cluster.path), "--replica",
                        "r9"], cwd=repo, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "no replica named 'r9'" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nbogus: 1\n")
    r = subprocess.run([sys.executable, "-m", "smm", "--config", str(bad), "--replica", "r1"],
                       cwd=repo, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "bad.yaml:2" in r.stderr


def test_cheap_flow_counts_agree_with_a_full_scan(cluster, smm):
    _, c = smm
    install(c, 1, 0, [(k(i), wire.OP_UPSERT, 1, b"s" * STATE) for i in range(6)])
    install(c, 2, 1, [(k(0), wire.OP_DELETE, 2, None)])
    c.request(wire.ACTIVATE, wire.encode_activate(wire.SEL_KEYS, keys=[k(1), k(2)]))
    with attach_replica(cluster, "r1") as mb:
        for i in range(10, 15):
            mb.get_flow(k(i), create=True)
            mb.put_flow(k(i))
        mb.del_flow(k(10))
        mb.del_flow(k(1))
        full = mb.table.counts()
    assert stats(c)["flows"] == full
    assert full == {"free": full["free"], "active": 5, "standby": 3, "tombstone": 3}


def test_prometheus_metrics_are_served(tmp_path, smm_factory):
    import urllib.request
    from conftest import write_config
    cfg = write_config(tmp_path, metrics=True)
    proc = smm_factory(cfg, "r1")
    with ControlClient(proc.endpoint) as c:
        install(c, 1, 0, [(k(1), wire.OP_UPSERT, 1, b"m" * STATE)])
        c.request_raw(b"junk")
    url = f"http://127.0.0.1:{cfg.replica('r1').metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'pico_smm_flows{replica="r1",status="standby"} 1.0' in text
    assert 'pico_smm_request_errors_total{error="truncated",replica="r1"} 1.0' in text
    assert 'pico_smm_requests_total{replica="r1",type="install"} 1.0' in text
