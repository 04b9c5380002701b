"""sdn.faucet_events and sdn.faucet_driver without root: the parser and the event_id tracker
(pure), the client against a fake event socket, the driver against a fake faucet process.

The sample lines are the ones faucet 1.10.12 sent on the project machine
(/work/shared/notes/networking-stack.md §5b, tests/test_steering_net.py)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sdn.faucet_driver import (FaucetApplyTimeout, FaucetConfigRejected, FaucetDriver,
                               FaucetNotRunning, atomic_write, config_hash)
from sdn.faucet_events import (CONFIG_CHANGE, DP_CHANGE, L2_LEARN, PORT_CHANGE, PORTS_STATUS,
                               EventIds, FaucetEventClient, FaucetEventConnectError,
                               FaucetEventError, FaucetEventTimeout, parse_event)
from shared.errors import PicoError

DOWN_1 = ('{"version": 1, "time": 1795784011.944709, "dp_id": 1, "dp_name": "sw1", "event_id": '
          '98, "PORT_CHANGE": {"port_no": 3, "reason": "MODIFY", "state": 0, "status": true}}')
DOWN_2 = ('{"version": 1, "time": 1795784011.9480362, "dp_id": 1, "dp_name": "sw1", "event_id": '
          '99, "PORT_CHANGE": {"port_no": 3, "reason": "MODIFY", "state": 1, "status": false}}')
UP = ('{"version": 1, "time": 1795784013.6576278, "dp_id": 1, "dp_name": "sw1", "event_id": 100, '
      '"PORT_CHANGE": {"port_no": 3, "reason": "MODIFY", "state": 4, "status": true}}')
WARM = ('{"version": 1, "time": 1795796579.7386954, "dp_id": 1, "dp_name": "sw1", "event_id": 9, '
        '"CONFIG_CHANGE": {"restart_type": "warm"}}')
NO_CHANGE = ('{"version": 1, "time": 1795796579.7, "dp_id": 1, "dp_name": "sw1", "event_id": 9, '
             '"CONFIG_CHANGE": {"restart_type": null}}')
HASH = "0ca3cdcb98a20cf35fe5ff8998c7ed1a3b8ebfb9b33247b0d3d28308381eff6d"
SUCCESS = ('{"version": 1, "time": 1795796579.7396069, "dp_id": 0, "dp_name": "0", "event_id": 10, '
           '"CONFIG_CHANGE": {"success": true, "config_hash_info": {"config_files": '
           '"/tmp/sn/faucet/faucet.yaml", "hashes": "' + HASH + '", "error": ""}}}')
FAILURE = ('{"version": 1, "time": 1795796581.4704368, "dp_id": 0, "dp_name": "0", "event_id": 15, '
           '"CONFIG_CHANGE": {"success": false, "config_hash_info": {"config_files": '
           '"/tmp/sn/faucet/faucet.yaml", "hashes": "", "error": "ACL (pico-from-clients) output '
           'port undefined in DP: 1"}}}')
COLD = ('{"version": 1, "time": 1795796578.1797416, "dp_id": 1, "dp_name": "sw1", "event_id": 7, '
        '"DP_CHANGE": {"reason": "cold_start"}}')
PORTS = ('{"version": 1, "time": 1795796578.1798382, "dp_id": 1, "dp_name": "sw1", "event_id": 8, '
         '"PORTS_STATUS": {"1": true, "2": true, "3": false, "4": true}}')
LEARN = ('{"version": 1, "time": 1795796580.19, "dp_id": 1, "dp_name": "sw1", "event_id": 11, '
         '"L2_LEARN": {"port_no": 2, "previous_port_no": null, "vid": 100, "eth_src": '
         '"0e:00:2f:00:00:02", "eth_dst": "33:33:00:00:00:02", "eth_type": 34525, '
         '"l3_src_ip": "fe80::c00:2fff:fe00:2", "l3_dst_ip": "ff02::2"}}')


def ev_line(event_id: int, body: dict, dp_id: int = 1, t: float | None = None) -> str:
    return json.dumps({"version": 1, "time": time.time() if t is None else t, "dp_id": dp_id,
                       "dp_name": "sw1" if dp_id else "0", "event_id": event_id, **body})


# ---------------------------------------------------------------------------- parser

def test_port_change_up_down_from_the_notes():
    a, b, c = parse_event(DOWN_1), parse_event(DOWN_2.encode()), parse_event(UP + "\n")
    assert (a.kind, a.event_id, a.dp_id, a.dp_name, a.port_no) == (PORT_CHANGE, 98, 1, "sw1", 3)
    assert a.up is True and a.state == 0 and a.status is True and a.reason == "MODIFY"
    assert a.live is False  # the first of the two events of a link going down
    assert b.up is False and b.state == 1 and b.status is False and b.live is False
    assert c.up is True and c.state == 4 and c.live is True
    assert b.time == pytest.approx(1795784011.9480362)
    assert b.success is None and b.restart_type is None
    # state & 1 (LINK_DOWN) wins over status, and a deleted port is down
    assert parse_event(ev_line(5, {PORT_CHANGE: {"port_no": 2, "reason": "MODIFY", "state": 5,
                                                 "status": True}})).up is False
    assert parse_event(ev_line(5, {PORT_CHANGE: {"port_no": 2, "reason": "DELETE", "state": 0,
                                                 "status": True}})).up is False


def test_config_change_events():
    w = parse_event(WARM)
    assert (w.kind, w.restart_type, w.success, w.dp_id) == (CONFIG_CHANGE, "warm", None, 1)
    n = parse_event(NO_CHANGE)
    assert n.restart_type is None and n.success is None
    s = parse_event(SUCCESS)
    assert s.success is True and s.dp_id == 0 and s.restart_type is None
    assert s.config_files == ("/tmp/sn/faucet/faucet.yaml",) and s.config_hashes == (HASH,)
    assert s.config_error is None
    assert s.config_hash("/tmp/sn/faucet/faucet.yaml") == HASH
    assert s.config_hash("/tmp/other.yaml") is None
    f = parse_event(FAILURE)
    assert f.success is False and f.config_hashes == ()
    assert f.config_error == "ACL (pico-from-clients) output port undefined in DP: 1"
    multi = parse_event(ev_line(3, {CONFIG_CHANGE: {"success": True, "config_hash_info": {
        "config_files": "/a.yaml,/b.yaml", "hashes": "aa,bb", "error": ""}}}, dp_id=0))
    assert multi.config_hash("/b.yaml") == "bb" and multi.config_hash("/a.yaml") == "aa"


def test_other_kinds():
    c = parse_event(COLD)
    assert (c.kind, c.reason, c.event_id) == (DP_CHANGE, "cold_start", 7)
    p = parse_event(PORTS)
    assert p.kind == PORTS_STATUS and p.ports == ((1, True), (2, True), (3, False), (4, True))
    learn = parse_event(LEARN)
    assert learn.kind == L2_LEARN and learn.port_no == 2
    assert learn.body["eth_src"] == "0e:00:2f:00:00:02"
    other = parse_event(ev_line(12, {"L2_EXPIRE": {"port_no": 2, "vid": 100,
                                                   "eth_src": "0e:00:2f:00:00:02"}}))
    assert other.kind == "L2_EXPIRE" and other.port_no is None and other.body["vid"] == 100
    assert hash(other) == hash(parse_event(ev_line(12, {"L2_EXPIRE": {}}, t=other.time)))


@pytest.mark.parametrize("line, why", [
    ("", "empty"),
    ("   \n", "empty"),
    ("not json at all", "not JSON"),
    ('{"version": 1, "time": 1.0, "dp_id": 1, "event_id": 3, "PORT_CHANGE": ', "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    ("[1, 2, 3]", "JSON object"),
    ('"a string"', "JSON object"),
    ('{"time": 1.0, "dp_id": 1, "event_id": 3, "DP_CHANGE": {}}', "version"),
    ('{"version": 2, "time": 1.0, "dp_id": 1, "event_id": 3, "DP_CHANGE": {}}', "version"),
    ('{"version": 1, "time": 1.0, "dp_id": 1, "DP_CHANGE": {}}', "event_id"),
    ('{"version": 1, "time": 1.0, "dp_id": 1, "event_id": "3", "DP_CHANGE": {}}', "event_id"),
    ('{"version": 1, "time": 1.0, "dp_id": 1, "event_id": true, "DP_CHANGE": {}}', "event_id"),
    ('{"version": 1, "time": 1.0, "dp_id": 1, "event_id": 0, "DP_CHANGE": {}}', "event_id"),
    ('{"version": 1, "time": "now", "dp_id": 1, "event_id": 3, "DP_CHANGE": {}}', "time"),
    ('{"version": 1, "time": NaN, "dp_id": 1, "event_id": 3, "DP_CHANGE": {}}', "time"),
    ('{"version": 1, "time": 1.0, "dp_id": null, "event_id": 3, "DP_CHANGE": {}}', "dp_id"),
    ('{"version": 1, "time": 1.0, "dp_id": 1, "event_id": 3}', "event body"),
    ('{"version": 1, "time": 1.0, "dp_id": 1, "event_id": 3, "A": {}, "B": {}}', "event body"),
    ('{"version": 1, "time": 1.0, "dp_id": 1, "event_id": 3, "PORT_CHANGE": {"state": 0, '
     '"status": true}}', "port_no"),
    ('{"version": 1, "time": 1.0, "dp_id": 1, "event_id": 3, "PORT_CHANGE": {"port_no": 1, '
     '"state": 0, "status": "up"}}', "status"),
    ('{"version": 1, "time": 1.0, "dp_id": 1, "event_id": 3, "PORT_CHANGE": {"port_no": 1, '
     '"state": "x", "status": true}}', "state"),
    ('{"version": 1, "time": 1.0, "dp_id": 0, "event_id": 3, "CONFIG_CHANGE": {"success": '
     '"yes"}}', "success"),
    ('{"version": 1, "time": 1.0, "dp_id": 0, "event_id": 3, "CONFIG_CHANGE": {"success": true, '
     '"config_hash_info": "x"}}', "config_hash_info"),
    ('{"version": 1, "time": 1.0, "dp_id": 1, "event_id": 3, "PORTS_STATUS": {"a": true}}',
     "port numbers"),
])
def test_garbage_raises_a_clear_error(line, why):
    with pytest.raises(FaucetEventError, match=why) as info:
        parse_event(line)
    assert isinstance(info.value, PicoError)


# ---------------------------------------------------------------------------- EventIds

def test_event_ids_gaps_and_restarts():
    ids = EventIds()
    assert ids.observe(41) == 0  # the first one only sets the baseline
    assert [ids.observe(i) for i in (42, 43)] == [0, 0]
    assert ids.observe(47) == 3 and ids.lost == 3 and ids.gaps == 1
    assert ids.observe(48) == 0
    assert ids.observe(50) == 1 and ids.lost == 4 and ids.gaps == 2
    # faucet restarted: its counter starts again; what it sent before this one is missed
    assert ids.observe(3) == 2 and ids.restarts == 1 and ids.lost == 6
    assert ids.observe(4) == 0
    assert ids.observe(1) == 0 and ids.restarts == 2 and ids.lost == 6
    assert ids.seen == 9 and ids.last == 1

    fresh = EventIds(first_expected=1)  # a client that must see everything from faucet's start
    assert fresh.observe(4) == 3 and fresh.lost == 3
    assert EventIds(first_expected=1).observe(1) == 0


# ---------------------------------------------------------------------------- client

class FakeSocketServer:
    """A unix stream server in a thread that plays faucet: each accepted connection gets the
    lines of one script (bytes, or a float = sleep), then is closed or held open."""

    def __init__(self, path: Path, scripts: list[list], hold_last: bool = True):
        self.path = path
        self.scripts = scripts
        self.hold_last = hold_last
        self.accepted = 0
        self.stop = threading.Event()
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(4)
        self.srv.settimeout(0.1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        held = []
        while not self.stop.is_set() and self.accepted < len(self.scripts):
            try:
                conn, _ = self.srv.accept()
            except socket.timeout:
                continue
            script = self.scripts[self.accepted]
            self.accepted += 1
            for item in script:
                if isinstance(item, float):
                    time.sleep(item)
                else:
                    conn.sendall(item)
            if self.hold_last and self.accepted == len(self.scripts):
                held.append(conn)
            else:
                conn.close()
        self.stop.wait(10)
        for c in held:
            c.close()

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.srv.close()


@pytest.fixture
def sock_path(tmp_path):
    return tmp_path / "ev.sock"


def test_client_reads_split_lines_counts_garbage_and_keeps_a_backlog(sock_path):
    lines = [ev_line(1, {CONFIG_CHANGE: {"restart_type": "new"}}),
             ev_line(2, {PORT_CHANGE: {"port_no": 3, "reason": "ADD", "state": 0,
                                       "status": True}}),
             "this is not an event",
             ev_line(3, {DP_CHANGE: {"reason": "cold_start"}})]
    blob = ("\n".join(lines) + "\n").encode()
    # split mid-line: the client must reassemble
    srv = FakeSocketServer(sock_path, [[blob[:37], 0.05, blob[37:150], 0.05, blob[150:]]])
    client = FaucetEventClient(sock_path)
    try:
        client.connect(timeout=2)
        cold = client.wait_for(lambda e: e.kind == DP_CHANGE, timeout=3)
        assert cold.event_id == 3 and cold.reason == "cold_start"
        assert [e.event_id for e in client.pending()] == [1, 2]
        assert client.garbage == 1 and "not JSON" in client.last_garbage
        got = client.poll(0)
        assert [e.event_id for e in got] == [1, 2] and got[1].up is True
        assert client.poll(0.1) == []
        with pytest.raises(FaucetEventTimeout, match="no matching faucet event"):
            client.wait_for(lambda e: False, timeout=0.2)
        assert client.lost == 0 and client.last_event_id == 3
    finally:
        client.close()
        srv.close()


def test_client_reconnects_on_eof_and_reports_the_gap(sock_path):
    first = [(ev_line(i, {DP_CHANGE: {"reason": "x"}}) + "\n").encode() for i in (1, 2)]
    # the first connection ends with half a line; the second is refused (closed at once, as
    # faucet does while it still serves another client); the third goes on at event 5
    srv = FakeSocketServer(sock_path, [
        [*first, b'{"version": 1, "ti'],
        [],
        [(ev_line(5, {DP_CHANGE: {"reason": "y"}}) + "\n").encode()]])
    gaps = []
    client = FaucetEventClient(sock_path, on_gap=lambda n, e: gaps.append((n, e.event_id)))
    try:
        client.connect(timeout=2)
        ev = client.wait_for(lambda e: e.event_id == 5, timeout=5)
        assert ev.reason == "y"
        assert client.lost == 2 and gaps == [(2, 5)]
        assert client.connects == 3 and client.eofs == 2
        assert client.garbage == 1 and "truncated" in client.last_garbage
        assert [e.event_id for e in client.poll(0)] == [1, 2]
    finally:
        client.close()
        srv.close()


def test_client_connect_waits_for_the_socket_then_gives_up(sock_path):
    def late():
        time.sleep(0.3)
        holder.append(FakeSocketServer(sock_path, [[(ev_line(1, {DP_CHANGE: {}}) + "\n")
                                                    .encode()]]))
    holder: list = []
    t = threading.Thread(target=late)
    t.start()
    client = FaucetEventClient(sock_path)
    try:
        client.connect(timeout=5)
        assert client.connected
        assert [e.event_id for e in client.poll(2)] == [1]
    finally:
        t.join()
        client.close()
        for s in holder:
            s.close()
    with pytest.raises(FaucetEventConnectError, match="within 0.2 s"):
        FaucetEventClient(sock_path.with_name("nothing.sock")).connect(timeout=0.2)
    # poll on a socket that never appears: empty, no exception
    assert FaucetEventClient(sock_path.with_name("nothing.sock")).poll(0.1) == []


# ---------------------------------------------------------------------------- driver

# A stand-in for faucet: serves the event socket (one client), and on each SIGHUP reads the
# config and answers like faucet 1.10.12 does, steered by a "# mode: X" line in the file:
# ok (warm + success with the file's sha256), bad (success false), silent (nothing, as for an
# unchanged file), other (success with another hash), cold (cold, success, then DP_CHANGE
# cold_start 0.3 s later).
FAKE_FAUCET = r"""
import hashlib, json, os, re, signal, socket, sys, time
sock_path, cfg = sys.argv[1], sys.argv[2]
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGHUP])
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sock_path); srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
eid = 0
def send(dp_id, body):
    global eid
    eid += 1
    conn.sendall((json.dumps({"version": 1, "time": time.time(), "dp_id": dp_id,
                              "dp_name": "sw1" if dp_id else "0", "event_id": eid, **body})
                  + "\n").encode())
real = os.path.realpath(cfg)
while True:
    signal.sigwait([signal.SIGHUP])
    text = open(cfg, encoding="utf-8").read()
    mode = (re.search(r"# mode: (\w+)", text) or [None, "ok"])[1]
    h = hashlib.sha256(text.encode("utf-8")).hexdigest()
    info = {"config_files": real, "hashes": h, "error": ""}
    if mode == "silent":
        continue
    if mode == "bad":
        send(0, {"CONFIG_CHANGE": {"success": False, "config_hash_info": {
            "config_files": real, "hashes": "", "error": "port 9 undefined"}}})
        continue
    if mode == "other":
        info["hashes"] = "f" * 64
    send(1, {"CONFIG_CHANGE": {"restart_type": "cold" if mode == "cold" else "warm"}})
    send(1, {"PORT_CHANGE": {"port_no": 2, "reason": "MODIFY", "state": 0, "status": True}})
    send(0, {"CONFIG_CHANGE": {"success": True, "config_hash_info": info}})
    if mode == "cold":
        time.sleep(0.3)
        send(1, {"DP_CHANGE": {"reason": "cold_start"}})
"""


@pytest.fixture
def fake_faucet(tmp_path):
    cfg = tmp_path / "faucet.yaml"
    cfg.write_text("# mode: ok\nstart: 1\n")
    sock = tmp_path / "ev.sock"
    proc = subprocess.Popen([sys.executable, "-c", FAKE_FAUCET, str(sock), str(cfg)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    client = FaucetEventClient(sock).connect(timeout=5)
    pokes = []
    log = tmp_path / "faucet.log"
    log.write_text("faucet INFO line one\nfaucet ERROR New config bad (port 9) - rejecting\n")
    pid = {"pid": proc.pid}
    driver = FaucetDriver(cfg, lambda: pid["pid"], lambda: pokes.append(1), client,
                          log_path=log)
    yield driver, cfg, pokes, pid
    client.close()
    if proc.poll() is None:
        proc.kill()
    proc.wait(5)
    proc.stdout.close()


def test_driver_applies_and_checks_the_hash(fake_faucet):
    driver, cfg, pokes, _ = fake_faucet
    assert driver.loaded_hash == config_hash(cfg.read_text())  # assumed loaded at creation
    text = "# mode: ok\nrules: [1, 2]\n"
    seconds = driver.apply(text, timeout=5)
    assert 0 < seconds < 5 and pokes == [1]
    assert cfg.read_text() == text
    assert driver.loaded_hash == hashlib.sha256(text.encode()).hexdigest()
    assert driver.last.restart_types == {1: "warm"} and not driver.last.skipped
    assert driver.last.success_event.config_hash(cfg) == driver.loaded_hash
    # the restart_type and the unrelated event stay for the caller
    kinds = [(e.kind, e.restart_type) for e in driver.events.poll(0)]
    assert kinds == [(CONFIG_CHANGE, "warm"), (PORT_CHANGE, None)]
    # the same text again: faucet would send nothing, so nothing is signalled
    assert driver.apply(text) == 0.0 and driver.last.skipped and pokes == [1]
    assert not list(cfg.parent.glob(".faucet.yaml.*"))  # no temporary file left


def test_driver_rejected_config_restores_the_file(fake_faucet):
    driver, cfg, _, _ = fake_faucet
    good = "# mode: ok\ngood: 1\n"
    driver.apply(good, timeout=5)
    with pytest.raises(FaucetConfigRejected) as info:
        driver.apply("# mode: bad\nport: 9\n", timeout=5)
    msg = str(info.value)
    assert str(cfg) in msg and "port 9 undefined" in msg and "check_faucet_config" in msg
    assert "keeps running its previous config" in msg and "New config bad" in msg  # log tail
    assert info.value.error == "port 9 undefined"
    assert cfg.read_text() == good and driver.loaded_hash == config_hash(good)
    assert driver.rejections == 1
    # without restore, the rejected text stays on disk (faucet still runs the good one)
    driver.restore_on_reject = False
    with pytest.raises(FaucetConfigRejected):
        driver.apply("# mode: bad\nport: 10\n", timeout=5)
    assert "port: 10" in cfg.read_text() and driver.loaded_hash == config_hash(good)


def test_driver_timeouts_say_why(fake_faucet):
    driver, cfg, _, _ = fake_faucet
    with pytest.raises(FaucetApplyTimeout, match="gave no verdict") as info:
        driver.apply("# mode: silent\nx: 1\n", timeout=0.6)
    assert "configuration is unchanged" in str(info.value) and str(cfg) in str(info.value)
    with pytest.raises(FaucetApplyTimeout, match="loaded other content"):
        driver.apply("# mode: other\nx: 2\n", timeout=0.6)
    # the pending events of those attempts do not confuse the next apply
    assert driver.apply("# mode: ok\nx: 3\n", timeout=5) > 0


def test_driver_waits_for_a_cold_start(fake_faucet):
    driver, _, _, _ = fake_faucet
    seconds = driver.apply("# mode: cold\nvid: 101\n", timeout=5)
    assert seconds >= 0.3 and driver.last.restart_types == {1: "cold"}


def test_driver_without_faucet(fake_faucet, tmp_path):
    driver, cfg, _, pid = fake_faucet
    pid["pid"] = None
    with pytest.raises(FaucetNotRunning, match="not running"):
        driver.apply("# mode: ok\ny: 1\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid["pid"] = dead.pid
    with pytest.raises(FaucetNotRunning, match="gone"):
        driver.apply("# mode: ok\ny: 2\n")
    assert cfg.read_text() == "# mode: ok\ny: 2\n"  # in place for faucet's next start


def test_config_hash_and_atomic_write(tmp_path):
    p = tmp_path / "f.yaml"
    atomic_write(p, "a: 1\r\nb: 2\n")
    assert p.read_bytes() == b"a: 1\r\nb: 2\n"
    # faucet reads in text mode (universal newlines) before hashing
    with open(p, encoding="utf-8") as f:
        assert config_hash(p.read_bytes().decode()) == hashlib.sha256(f.read().encode()).hexdigest()
    assert os.stat(p).st_mode & 0o777 == 0o644
    assert [x.name for x in tmp_path.iterdir()] == ["f.yaml"]

