"""The C TCP tracker (examples/build/tcptracker, the twin of examples/tcptracker.py) as a
replica's middlebox on the real packet path: SMM, PMM on NFQUEUE in the replica namespace, real
TCP between the client and server namespaces. A transfer through it arrives intact and leaves
flow state Python reads with the Python tracker's layout; a connection whose state is gone
(deleted from the flow table mid-connection, as after a failover without replication) stalls,
or with --reset is reset by a RST the tracker makes."""
import json
import os
import signal
import struct
import subprocess

import pytest

from nettools import REPO, TCP_SINK, Lines, py, spawn
from shared.api import attach_replica
from shared.flowkey import make_key
from shared.flowtable import ACTIVE
from test_pmm_net import replica_bed

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network "
                                 "namespaces and binds NFQUEUE; CI runs as root")]

FREE = 2   # unbuffered: output leaves without an RM committing epochs
PORT = 5001
EXTRA = f"""packets: {{ring_slots: 1024, pending_timeout_ms: 500}}
groups:
  free: {{id: {FREE}, buffering: false}}
policies:
  - {{group: free, proto: tcp, dport: {PORT}}}
"""
TRACKER = REPO / "examples" / "build" / "tcptracker"

# nettools.TCP_SEND from a fixed source port, so the flow's key is known.
TCP_SEND_FROM = r"""
import hashlib, json, random, socket, sys
addr, port, size, src, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
data = random.Random(size).randbytes(size)
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((src, sport)); s.settimeout(20); s.connect((addr, port))
s.sendall(data); s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    d = s.recv(1024)
    if not d:
        break
    reply += d
print(json.dumps({"sent": hashlib.sha256(data).hexdigest(), "got": reply.decode()}), flush=True)
"""


# An echo server, a thread per connection; prints what it receives.
ECHO = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(8)
print("listening", flush=True)
def serve(c):
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            print("got", d.decode(), flush=True)
            c.sendall(d)
    except OSError as e:
        print("server", type(e).__name__, flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# A client that opens a connection from a fixed port, proves it works, then waits for "go" on
# stdin (the test deletes the flow's state meanwhile) and sends again: what happens is printed.
CLIENT = r"""
import socket, sys, time
src, sport, dst, dport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((src, sport)); s.settimeout(5); s.connect((dst, dport))
s.sendall(b"hello")
assert s.recv(100) == b"hello"
time.sleep(0.3)  # our ACK of the echo has left: nothing of this flow is in flight
print("connected", flush=True)
sys.stdin.readline()
try:
    s.sendall(b"after")
    s.settimeout(3)
    d = s.recv(100)
    print("data " + d.decode() if d else "closed", flush=True)
except ConnectionResetError:
    print("reset", flush=True)
except BrokenPipeError:
    print("broken pipe", flush=True)
except socket.timeout:
    print("timeout", flush=True)
"""


@pytest.fixture
def net(tmp_path, smm_factory, cbuild):
    from conftest import write_config
    subprocess.run(["make", "-s", "-C", str(REPO / "examples")], check=True)
    assert TRACKER.exists()
    with replica_bed("ct", write_config(tmp_path, extra=EXTRA), smm_factory, tmp_path) as got:
        yield got


def start_tracker(rep, *extra):
    """The C tracker as the replica's middlebox, with the Procfile's command line: the command,
    then the packet and flow segment names."""
    rep.mb = subprocess.Popen([str(TRACKER), *extra, rep.pkts, rep.flows], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    rep.mb_out = Lines(rep.mb.stdout)
    rep.mb_out.expect("ready", timeout=15)
    return rep.mb


def stop_tracker(rep) -> dict:
    rep.mb.send_signal(signal.SIGTERM)
    out = json.loads(rep.mb_out.expect(lambda line: line.startswith("{"), 10))
    assert rep.mb.wait(10) == 0
    assert set(out) == {"packets", "dropped_no_state", "created", "errors", "resets"}
    return out


def flow_state(cfg, key):
    """(the four u64 words, status, group) of key's slot, read from Python."""
    with attach_replica(cfg, "r1", name="test") as mb:
        idx, status = mb.table.lookup(key)
        if status != ACTIVE:
            return None, status, None
        st = mb.get_flow(key)
        assert st is not None
        try:
            words = struct.unpack("<4Q", bytes(st[:32]))  # the Python tracker's layout
        finally:
            mb.put_flow(key, modified=False)
        return words, status, int(mb.table.slots[idx]["group"])


def test_tcp_transfer_through_the_c_tracker_and_its_state_from_python(net):
    bed, rep = net
    start_tracker(rep)
    keys = []
    for src, dst, sport in ((bed.client_ip, bed.server_ip, 41001),
                            (bed.client_ip6, bed.server_ip6, 41002)):
        sink, lines = spawn(bed, "server", py(TCP_SINK, PORT, 1, dst))
        lines.expect("listening")
        r = bed.run("client", py(TCP_SEND_FROM, dst, PORT, 2_000_000, src, sport), timeout=60,
                    check=True)
        got = json.loads(r.stdout)
        assert got["sent"] == got["got"], got  # the content hash survived the round trip
        sink.wait(10)
        keys.append(make_key(src, sport, dst, PORT, 6))
    out = stop_tracker(rep)
    assert out["created"] == 2 and out["errors"] == 0 and out["resets"] == 0, out
    assert out["dropped_no_state"] == 0, out  # every segment of both connections had state
    total = 0
    for key in keys:
        words, status, group = flow_state(rep.cfg, key)
        assert status == ACTIVE and group == FREE, (status, group)
        packets, nbytes, syn, fin = words
        assert syn == 1 and fin == 1, words
        assert nbytes > 2_000_000 and packets > 2_000_000 // 65536, words
        total += packets
    assert total <= out["packets"], (total, out)
    c = rep.counters()
    assert c["unwritten_drops"] == 0 and c["verdict_errors"] == 0, c


@pytest.mark.parametrize("reset", [False, True], ids=["drop", "reset"])
def test_a_connection_whose_state_is_gone_is_dropped_or_reset(net, reset):
    bed, rep = net
    start_tracker(rep, *(["--reset"] if reset else []))
    server, srv_lines = spawn(bed, "server", py(ECHO, bed.server_ip, PORT))
    srv_lines.expect("listening")
    sport = 42000 + int(reset)
    client = bed.exec("client", py(CLIENT, bed.client_ip, sport, bed.server_ip, PORT),
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    cl_lines = Lines(client.stdout)
    try:
        cl_lines.expect("connected", 15)
        srv_lines.expect("got hello")
        key = make_key(bed.client_ip, sport, bed.server_ip, PORT, 6)
        words, status, group = flow_state(rep.cfg, key)
        assert status == ACTIVE and group == FREE and words[0] >= 5 and words[2] == 1, words
        with attach_replica(rep.cfg, "r1", name="test") as mb:
            assert mb.del_flow(key)  # the state is gone, the connection is not
        client.stdin.write("go\n")
        client.stdin.flush()
        outcome = cl_lines.expect(lambda line: True, 15)
        client.wait(10)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    # A new connection opens new state and works: the tracker only refuses the orphan.
    sink, lines = spawn(bed, "server", py(TCP_SINK, PORT, 1, bed.server_ip6))
    lines.expect("listening")
    r = bed.run("client", py(TCP_SEND_FROM, bed.server_ip6, PORT, 100_000, bed.client_ip6, sport),
                timeout=60, check=True)
    got = json.loads(r.stdout)
    assert got["sent"] == got["got"], got
    sink.wait(10)
    out = stop_tracker(rep)
    assert out["dropped_no_state"] >= 1 and out["errors"] == 0, out
    assert out["created"] == 2, out  # the two SYNs: the orphan's segments created nothing
    assert "got after" not in srv_lines.drain(quiet=0.3)  # never reached the server
    if reset:
        assert outcome == "reset", outcome  # ConnectionResetError in the client
        assert out["resets"] >= 1, out
        assert rep.counters()["raw_sent"] >= 1  # the PMM sent the tracker's RST
    else:
        assert outcome == "timeout", outcome  # stalled: its segments are dropped
        assert out["resets"] == 0, out
    assert flow_state(rep.cfg, key)[0] is None  # a segment with no state never recreates it
    del server  # bed.down() stops it
