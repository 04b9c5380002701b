"""picoctl against a live pico-rm process (real ZeroMQ, real shared memory)."""
import json
import signal
import time
import subprocess
import sys

import pytest

from conftest import PACKET_GROUPS, REPO, free_port, write_config
from pmm.store import PacketStore
from rm.ctl import main as picoctl
from shared import wire
from shared.control import ControlClient, wait_until_serving


@pytest.fixture
def live_rm(tmp_path, smm_factory):
    cfg = write_config(tmp_path, extra=PACKET_GROUPS, rm_endpoints=True)
    store = PacketStore(cfg, "r1")  # stands in for r1's PMM
    smm_factory(cfg, "r1")
    smm_factory(cfg, "r2")
    rm = subprocess.Popen([sys.executable, "-m", "rm", "--config", str(cfg.path), "--replica",
                           "r1"], cwd=REPO)
    wait_until_serving(cfg.replica("r1").rm_endpoint, rm, 30, "pico-rm")
    yield cfg, store
    rm.send_signal(signal.SIGTERM)
    assert rm.wait(10) == 0
    store.close()


def ctl(cfg, *args):
    return picoctl(["--config", str(cfg.path), "--replica", "r1", *args])


def test_groups_table_and_json(live_rm, capsys):
    cfg, store = live_rm
    assert ctl(cfg, "groups") == 0
    out = capsys.readouterr().out
    assert "group" in out.splitlines()[0] and "p99 ms" in out
    assert ctl(cfg, "--json", "stats") == 0
    stats = json.loads(capsys.readouterr().out)
    web = next(g for g in stats["groups"] if g["id"] == 1)
    assert web["protected"] is True and web["configured_hz"] == 1000
    assert web["committed"] >= 0


def test_suspend_resume_and_set(live_rm, capsys):
    cfg, store = live_rm
    row = store.seg.groups[2]  # dns
    assert ctl(cfg, "suspend", "2") == 0 and int(row["suspended"]) == 1
    committed = int(row["committed"])
    deadline = time.monotonic() + 5
    while int(row["committed"]) < committed + 3:   # epochs go on while it is suspended...
        assert time.monotonic() < deadline
    assert int(row["suspended"]) == 1              # ...and none of them resumed it
    assert ctl(cfg, "resume", "2") == 0
    # Released: the group's own epochs still suspend it for a moment each, so wait to see 0.
    deadline = time.monotonic() + 5
    while int(row["suspended"]):
        assert time.monotonic() < deadline
    assert ctl(cfg, "group", "set", "1", "--frequency", "200", "--buffering", "off") == 0
    assert int(store.seg.groups[1]["buffering"]) == 0
    capsys.readouterr()
    assert ctl(cfg, "--json", "stats") == 0
    web = next(g for g in json.loads(capsys.readouterr().out)["groups"] if g["id"] == 1)
    assert web["configured_hz"] == 200


def test_bad_requests_get_clear_errors(live_rm, capsys):
    cfg, _ = live_rm
    assert ctl(cfg, "suspend", "99") == 1
    assert "no group 99" in capsys.readouterr().err
    assert ctl(cfg, "suspend", "0") == 1                       # the default group
    assert "never suspended" in capsys.readouterr().err
    assert ctl(cfg, "group", "set", "1", "--frequency", "5") == 1
    assert "10..20000" in capsys.readouterr().err
    with ControlClient(cfg.replica("r1").rm_endpoint) as c:
        reply = c.request_raw(b"garbage")
        assert reply.status == wire.ERR_TRUNCATED
        assert c.request(wire.PING).status == wire.OK          # still serving


def test_an_rm_that_does_not_answer_times_out_clearly(capsys):
    assert picoctl(["--endpoint", f"tcp://127.0.0.1:{free_port()}", "--timeout", "200",
                    "groups"]) == 3
    assert "no reply from" in capsys.readouterr().err


def _until(pred, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_groups_at_runtime_flows_and_moves(live_rm, capsys):
    from shared import abi
    from shared.api import attach_replica
    from shared.flowkey import parse_key_spec
    from shared.flowtable import STANDBY
    cfg, store = live_rm
    spec = "tcp 10.0.0.1:40001 10.0.1.1:80"
    key = parse_key_spec(spec)
    with attach_replica(cfg, "r1") as flows, attach_replica(cfg, "r2") as backup:
        flows.get_flow(key, create=True, group=1)[0] = 42
        flows.put_flow(key)

        def standby_group():
            idx, status = backup.table.lookup(key)
            return int(backup.table.slots[idx]["group"]) if status == STANDBY else None
        _until(lambda: standby_group() == 1, "web's checkpoint reaches r2")

        assert ctl(cfg, "group", "create", "7", "--frequency", "100", "--target", "r2") == 0
        capsys.readouterr()
        row = store.seg.groups[store.seg.active_groups()[7]]
        assert int(row["protected_"]) == 1 and int(row["buffering"]) == 1
        _until(lambda: int(row["committed"]) >= 2, "the new group commits epochs")

        assert ctl(cfg, "--json", "flows", "--group", "1") == 0
        listed = json.loads(capsys.readouterr().out)
        assert listed["total"] == 1 and listed["flows"][0]["key"] == key.hex()

        assert ctl(cfg, "move", spec, "7") == 0
        assert "moved=True" in capsys.readouterr().out
        idx, _ = flows.table.lookup(key)
        assert int(flows.table.slots[idx]["group"]) == 7
        _until(lambda: standby_group() == 7, "the new group's checkpoint carries the flow")
        web = store.seg.groups[1]
        after = int(web["committed"])
        _until(lambda: int(web["committed"]) >= after + 2, "the old group's delete is taken")
        with ControlClient(cfg.replica("r2").smm_endpoint) as smm:
            backup_stats = json.loads(smm.request(wire.STATS).body)
        assert backup_stats["errors"] == {}                       # every section was well formed
        res = backup_stats["install_results"]   # the delete came, as one (before or after the
        assert res.get("absent", 0) + res.get("deleted", 0) == 1  # new group's upsert)
        assert standby_group() == 7

        # validated whole: a bad field changes nothing
        assert ctl(cfg, "group", "set", "7", "--frequency", "300", "--target", "r1") == 1
        assert "cannot back up its own" in capsys.readouterr().err
        assert int(row["frequency_hz"]) == 100
        assert ctl(cfg, "group", "set", "7", "--target", "none") == 0
        assert int(row["protected_"]) == 0 and int(row["buffering"]) == 0
        _until(lambda: standby_group() is None, "the old backup's copies are purged")
        assert ctl(cfg, "group", "set", "7", "--buffering", "on") == 1
        assert "no backup" in capsys.readouterr().err
        assert ctl(cfg, "group", "set", "7", "--target", "r2") == 0   # protected again
        _until(lambda: standby_group() == 7, "a FULL snapshot re-protects the group's flows")
        assert int(row["buffering"]) == 1

        assert ctl(cfg, "group", "delete", "7") == 0
        assert 7 not in store.seg.active_groups()
        assert int(flows.table.slots[idx]["group"]) == abi.GROUP_DEFAULT
        _until(lambda: standby_group() is None, "a deleted group's copies leave its backup")
        assert ctl(cfg, "group", "create", "1") == 1
        assert "already exists" in capsys.readouterr().err
