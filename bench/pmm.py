"""pico-bench pmm: the packet path's cost. Packets per second and the round-trip latency through
a replica namespace, for a bare NetfilterQueue accept loop (the baseline) and for the PMM with a
pass-through middlebox in Python and in C, with the same traffic in the same run.

Traffic: a client namespace floods 64-byte UDP datagrams at a server namespace for a few seconds
(the server counts what arrives), then a ping-pong of UDP datagrams measures round trips. Both
directions cross the replica's NFQUEUE. Needs root.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import percentiles, result

REPO = Path(__file__).resolve().parents[1]

BARE = r"""
import signal, sys
from netfilterqueue import NetfilterQueue
q = NetfilterQueue()
q.bind(int(sys.argv[1]), lambda p: p.accept(), max_len=16384)
print("bound", flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
q.run()
"""

SINK = r"""
import socket, sys, time, select
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
n = 0; first = last = None
while True:
    r, _, _ = select.select([s], [], [], 1.5 if n else 30)
    if not r:
        break
    s.recv(2048); n += 1
    last = time.monotonic(); first = first or last
print(f"{n} {(last - first) if n > 1 else 0}", flush=True)
"""

FLOOD = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + float(sys.argv[3]); n = 0; payload = b"x" * 36
while time.monotonic() < end:
    for _ in range(64):
        try:
            s.sendto(payload, (sys.argv[1], int(sys.argv[2]))); n += 1
        except OSError:
            pass
print(n, flush=True)
"""

ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    d, a = s.recvfrom(2048); s.sendto(d, a)
"""

PING = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.0)
out = []
for i in range(int(sys.argv[3])):
    t0 = time.perf_counter_ns()
    s.sendto(i.to_bytes(4, "little") * 16, (sys.argv[1], int(sys.argv[2])))
    try:
        s.recv(2048)
    except socket.timeout:
        continue
    out.append(time.perf_counter_ns() - t0)
print(json.dumps(out), flush=True)
"""


def _py(code: str, *args) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def _wait_line(proc: subprocess.Popen, want: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline() if proc.stdout else ""
        if want in line:
            return line
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"{proc.args[:3]}: no {want!r} line (exit {proc.poll()})")


def _wait_ready(pmm: subprocess.Popen, log, timeout: float = 30.0) -> None:
    """Wait for the PMM's 'bound NFQUEUE' log line (its log goes to a file, never a pipe that
    nobody reads: a full pipe would block its logging)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log.seek(0)
        if "bound NFQUEUE" in log.read():
            return
        if pmm.poll() is not None:
            break
        time.sleep(0.05)
    log.seek(0)
    raise RuntimeError(f"pico-pmm did not bind its queue: {log.read()[-2000:]}")


def measure(bed, seconds: float, pings: int) -> tuple[float, list[int]]:
    """(packets/s delivered to the server, RTT samples in ns) for the current packet path."""
    sink = bed.exec("server", _py(SINK, bed.server_ip, 9100), stdout=subprocess.PIPE, text=True)
    _wait_line(sink, "listening")
    bed.run("client", _py(FLOOD, bed.server_ip, 9100, seconds), timeout=seconds + 30, check=True)
    got, span = sink.stdout.readline().split()
    sink.wait(10)
    pps = int(got) / float(span) if float(span) > 0 else 0.0
    echo = bed.exec("server", _py(ECHO, bed.server_ip, 9101), stdout=subprocess.PIPE, text=True)
    _wait_line(echo, "listening")
    r = bed.run("client", _py(PING, bed.server_ip, 9101, pings), timeout=pings + 30, check=True)
    echo.terminate()
    echo.wait(5)
    return pps, json.loads(r.stdout)


def run(quick: bool) -> list[dict]:
    if os.geteuid() != 0:
        raise SystemExit("pico-bench pmm: needs root (network namespaces, NFQUEUE)")
    from sdn.testbed import LinearBed
    from shared.api import flow_segment_name
    from shared.config import load_config
    from shared.control import wait_until_serving
    from shared.packets import pkt_segment_name

    subprocess.run(["make", "-s", "-C", str(REPO / "shared")], check=True)
    subprocess.run(["make", "-s", "-C", str(REPO / "examples")], check=True)
    seconds, pings = (2.0, 500) if quick else (5.0, 3000)
    results = []
    with tempfile.TemporaryDirectory(prefix="pico-bench-pmm-") as tmp:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg_path = Path(tmp) / "bench.yaml"
        name = f"bpmm{os.getpid() % 10000}"
        cfg_path.write_text(f"""version: 1
cluster: {{name: {name}, shm_prefix: picob}}
flow_table: {{capacity: 65536}}
packets: {{ring_slots: 4096, pending_timeout_ms: 2000, queue_maxlen: 16384}}
replicas:
  r1: {{id: 1, smm_endpoint: "tcp://127.0.0.1:{port}", nfqueue: 1}}
""")
        cfg = load_config(cfg_path)
        pkts = pkt_segment_name("picob", name, "r1")
        flows = flow_segment_name("picob", name, "r1")
        bed = LinearBed(f"bp{os.getpid() % 100}", index=45, nfqueue=1)
        bed.up()
        smm = subprocess.Popen([sys.executable, "-m", "smm", "--config", str(cfg_path),
                                "--replica", "r1"], cwd=REPO, stderr=subprocess.DEVNULL)
        try:
            wait_until_serving(cfg.replica("r1").smm_endpoint, smm, 30, "pico-smm")
            bare = bed.exec("replica", _py(BARE, 1), stdout=subprocess.PIPE, text=True)
            _wait_line(bare, "bound")
            base_pps, base_rtt = measure(bed, seconds, pings)
            bare.send_signal(signal.SIGTERM)
            bare.wait(10)
            base = percentiles(base_rtt)
            results.append(result("bare nfqueue accept pps", base_pps, "pkt/s", None))
            for kind in ("python", "c"):
                log = open(Path(tmp) / f"pmm-{kind}.log", "w+")
                pmm = bed.exec("replica", [sys.executable, "-m", "pmm", "--config", str(cfg_path),
                                           "--replica", "r1"], cwd=REPO, stderr=log)
                _wait_ready(pmm, log)
                argv = ([str(REPO / "examples" / "build" / "passthrough"), pkts, flows]
                        if kind == "c" else
                        [sys.executable, str(REPO / "examples" / "passthrough.py"), pkts, flows])
                mb = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
                _wait_line(mb, "ready")
                pps, rtt = measure(bed, seconds, pings)
                mb.send_signal(signal.SIGTERM)
                mb.wait(10)
                pmm.send_signal(signal.SIGTERM)
                pmm.wait(10)
                p = percentiles(rtt)
                results.append(result(f"pmm + {kind} pass-through pps", pps, "pkt/s", base_pps,
                                      "bare nfqueue accept pps"))
                for q in (50, 99):
                    results.append(result(f"pmm + {kind} rtt p{q}", p[q] / 1000, "us",
                                          base[q] / 1000, f"bare nfqueue rtt p{q}",
                                          added_us=round((p[q] - base[q]) / 1000, 1)))
        finally:
            smm.terminate()
            smm.wait(10)
            bed.down()
    return results
