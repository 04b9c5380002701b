"""MBServ on the real packet path: the PMM on NFQUEUE in a replica namespace, MBServ in place of
the pass-through middlebox, real TCP between a client and a server namespace. A transfer keeps
its content (SHA-256), a request is routed, a malicious string split across two segments never
reaches the server, and a segment whose flow state is gone (a failover without replication) is
dropped and reset."""
import json
import os
import signal
import subprocess
import sys

import pytest

from nettools import REPO, TCP_SEND, TCP_SINK, Lines, py, spawn
from shared.api import attach
from shared.flowkey import make_key
from test_pmm_net import replica_bed

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network "
                                 "namespaces and binds NFQUEUE; CI runs as root")]

EXTRA = """packets: {ring_slots: 1024, pending_timeout_ms: 500}
groups:
  free: {id: 2, buffering: false}
policies:
  - {group: free, proto: tcp, dport: "5001-5010"}
"""
EVIL = "EVIL-PAYLOAD-7"
MBSERV_CONFIG = f"""malicious: ["{EVIL}"]
routing:
  backends: [bulk, api]
  default: bulk
  rules: [{{backend: api, path_prefix: /api/}}]
"""

# A client driven line by line from stdin, so the test decides when each segment leaves.
CLIENT = r"""
import socket, struct, sys
addr, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if sport:
    s.bind(("", sport))
s.settimeout(5)
s.connect((addr, port))
print("connected", s.getsockname()[1], flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    try:
        if cmd == "send":
            s.sendall(bytes.fromhex(arg)); print("sent", flush=True)
        elif cmd == "recv":
            print("recv", s.recv(65536).hex(), flush=True)
        elif cmd == "close":  # our FIN, then the server's
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
            s.close(); print("closed", flush=True); break
        elif cmd == "abort":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close(); print("aborted", flush=True); break
    except OSError as e:
        print("error", type(e).__name__, flush=True)
"""

# A server that reports every chunk it receives, as it receives it.
SERVER = r"""
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port)); srv.listen(8)
print("listening", flush=True)
while True:
    c, peer = srv.accept()
    print("accepted", peer[1], flush=True)
    c.settimeout(30)
    try:
        while True:
            d = c.recv(65536)
            if not d:
                print("eof", flush=True); break
            print("got", d.hex(), flush=True)
    except OSError as e:
        print("error", type(e).__name__, flush=True)
    c.close()
"""


@pytest.fixture
def net(tmp_path, smm_factory):
    from conftest import write_config
    cfg = write_config(tmp_path, extra=EXTRA)
    mb_cfg = tmp_path / "mbserv.yaml"
    mb_cfg.write_text(MBSERV_CONFIG)
    with replica_bed("mb", cfg, smm_factory, tmp_path, index=46) as (bed, rep):
        yield bed, rep, mb_cfg


def start_mbserv(rep, mb_cfg, *extra):
    rep.mb = subprocess.Popen([sys.executable, "-m", "mbserv", rep.pkts, rep.flows,
                               "--config", str(mb_cfg), *extra],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    rep.mb_out = Lines(rep.mb.stdout)
    rep.mb_out.expect("ready", timeout=15)


def stop_mbserv(rep) -> dict:
    rep.mb.send_signal(signal.SIGTERM)
    out = json.loads(rep.mb_out.expect(lambda line: line.startswith("{"), 10))
    assert rep.mb.wait(10) == 0
    return out


def server(bed, port, ip=None):
    proc, lines = spawn(bed, "server", py(SERVER, ip or bed.server_ip, port))
    lines.expect("listening")
    return proc, lines


def client(bed, port, sport=0, ip=None):
    proc = bed.exec("client", py(CLIENT, ip or bed.server_ip, port, sport), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, text=True, cwd=REPO)
    lines = Lines(proc.stdout)
    sport = int(lines.expect("connected").split()[1])

    def do(cmd: str, expect: str, timeout: float = 10.0) -> str:
        proc.stdin.write(cmd + "\n")
        proc.stdin.flush()
        return lines.expect(lambda line: line.startswith((expect, "error")), timeout)
    return proc, do, sport


def data_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("got ")]


def received(lines) -> bytes:
    return b"".join(bytes.fromhex(line.split()[1]) for line in lines.seen
                    if line.startswith("got "))


def test_tcp_transfers_and_a_routed_request_through_mbserv(net):
    bed, rep, mb_cfg = net
    start_mbserv(rep, mb_cfg)
    for ip in (bed.server_ip, bed.server_ip6):
        sink, lines = spawn(bed, "server", py(TCP_SINK, 5001, 1, ip))
        lines.expect("listening")
        r = bed.run("client", py(TCP_SEND, ip, 5001, 2_000_000), timeout=60, check=True)
        got = json.loads(r.stdout)
        assert got["sent"] == got["got"], got  # the content hash survived MBServ
        sink.wait(10)
    srv, slines = server(bed, 5002)
    request = b"GET /api/items HTTP/1.1\r\nHost: shop\r\n\r\n"
    proc, do, _ = client(bed, 5002)
    assert do("send " + request.hex(), "sent") == "sent"
    slines.expect("got")
    assert received(slines) == request
    assert do("close", "closed") == "closed"
    slines.expect("eof")
    srv.kill()
    out = stop_mbserv(rep)
    assert out["flows_created"] == 3 and out["requests"] == {"bulk": 2, "api": 1}, json.dumps(out)
    assert out["forwarded"] > 2 * 2_000_000 // 1500, json.dumps(out)
    # real Linux TCP, retransmissions included, conforms to the state machine throughout
    assert out["dropped_no_state"] == 0 and out["dropped_nonconforming"] == 0, json.dumps(out)
    assert out["dropped_malicious"] == 0 and out["errors"] == 0, json.dumps(out)


def test_a_malicious_string_split_across_segments_never_reaches_the_server(net):
    bed, rep, mb_cfg = net
    start_mbserv(rep, mb_cfg)
    srv, slines = server(bed, 5003)
    first, second = b"hello, here comes " + EVIL[:8].encode(), EVIL[8:].encode() + b" and more"
    proc, do, _ = client(bed, 5003)
    do("send " + first.hex(), "sent")
    slines.expect("got")                   # the harmless first half passes
    do("send " + second.hex(), "sent")     # completes the string: dropped, and so are its
    assert slines.drain(quiet=1.5) == []   #   retransmissions (the flow is blocked)
    do("abort", "aborted")
    # The whole string in one segment, on a second connection.
    srv2, slines2 = server(bed, 5004)
    proc2, do2, _ = client(bed, 5004)
    slines2.expect("accepted")
    do2("send " + (b"GET /api/x?q=" + EVIL.encode()).hex(), "sent")
    assert slines2.drain(quiet=1.0) == []
    do2("abort", "aborted")
    # (a server may or may not accept its client's RST: see the end)
    assert data_lines(slines.drain(quiet=0.5) + slines2.drain(quiet=0.2)) == []
    srv.kill()
    srv2.kill()
    assert received(slines) == first and received(slines2) == b""
    out = stop_mbserv(rep)
    assert out["dropped_malicious"] == 2 and out["hits"] == {EVIL: 2}, json.dumps(out)
    # at least one retransmission of the second half was dropped as part of a blocked flow
    assert out["dropped_blocked"] >= 1, json.dumps(out)
    assert out["requests"] == {"bulk": 1, "api": 0}, json.dumps(out)  # blocked: not routed
    # The clients' RSTs pass (the flows close and can be deleted), but a server may ignore
    # one: an RST whose sequence number counts the bytes MBServ dropped is not the one it
    # expects (RFC 5961: it answers with a challenge ACK, which the blocked flow drops).
    assert out["dropped_nonconforming"] == 0 and out["errors"] == 0, json.dumps(out)


@pytest.mark.parametrize("v6", [False, True])
def test_a_segment_without_flow_state_is_dropped_and_reset(net, v6):
    """The paper's No-HA case: the flow's state is gone (here deleted, as on a replica that
    takes the flow over without a checkpoint); the next segment is dropped, and with --reset
    the client's connection is reset instead of stalling."""
    bed, rep, mb_cfg = net
    start_mbserv(rep, mb_cfg, "--reset")
    cip, sip = (bed.client_ip6, bed.server_ip6) if v6 else (bed.client_ip, bed.server_ip)
    srv, slines = server(bed, 5005, sip)
    proc, do, sport = client(bed, 5005, ip=sip)
    do("send " + b"before".hex(), "sent")
    slines.expect("got")
    with attach(rep.flows, name="test-failover") as flows:
        assert flows.del_flow(make_key(cip, sport, sip, 5005, 6))
    do("send " + b"after the state is gone".hex(), "sent")
    assert do("recv", "recv").split() == ["error", "ConnectionResetError"]
    # (the server is reset too if it sent anything, such as a delayed ACK, after the loss)
    assert data_lines(slines.drain(quiet=0.5)) == []
    srv.kill()
    assert received(slines) == b"before"
    out = stop_mbserv(rep)
    assert out["dropped_no_state"] >= 1 and out["resets"] >= 1, json.dumps(out)
    assert out["reasons"]["no flow state"] == out["dropped_no_state"], json.dumps(out)
