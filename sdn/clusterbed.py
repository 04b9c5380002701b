"""A three-replica Pico cluster on a real switch, for the failover tests and the failover bench.

SwitchedBed (OVS userspace + Faucet in their own namespace): c1 (clients, port 1), s1 (server,
port 2), r1..r3 (replicas, ports 3..5). Clients use 16 addresses of their own subnet
(10.(200+i).3.1..16, aliases on c1's eth0, on-link routes everywhere) so the steering buckets
spread their connections over the replicas. Each replica: ip_forward, NFQUEUE in FORWARD, its
PMM in its namespace; its SMM, RM and middlebox (examples/tcptracker.py: it drops segments of
connections it has no state for) in the root namespace, over shared memory and 127.0.0.1.
The middlebox answers a segment it has no state for with a RST (--reset), so a connection
whose packets reach a replica before its state does is reset, as behind a real firewall.
pico-sdn runs in the root namespace and drives Faucet through its files and event socket.
Everything is stopped by PID; the bed removes its namespaces. Used by tests/test_failover_net.py
and `pico-bench failover`; ha=False runs the same cluster with no replication (no groups: every
flow in the default group, nothing checkpointed), the baseline.
"""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from sdn.core import Controller
from sdn.steering import Port, Topology, faucet_config
from sdn.testbed import SwitchedBed
from shared.config import load_config

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free port below the ephemeral range (32768+), so that the many outgoing ZeroMQ
    connections of a starting cluster cannot take it before its owner binds it."""
    import random
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free port in 20000..32000")


class Lines:
    """A child's output lines, collected on a thread, awaited with deadlines."""

    def __init__(self, stream):
        self.q: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def expect(self, pred, timeout: float = 10.0) -> str:
        test = pred if callable(pred) else (lambda line: pred in line)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pred!r} within {timeout} s; saw "
                                     f"{self.seen[-20:]}")
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"stream ended before {pred!r}; saw {self.seen[-20:]}")
            self.seen.append(line)
            if test(line):
                return line

    def records(self, timeout: float) -> list[dict]:
        """The JSON lines a client script prints at its end (one per connection), up to its
        "end" line, all within `timeout` s."""
        import json
        out, deadline = [], time.monotonic() + timeout
        while True:
            line = self.expect(lambda s: s.startswith("{") or s == "end",
                               timeout=max(0.1, deadline - time.monotonic()))
            if line == "end":
                return out
            out.append(json.loads(line))

    def drain(self, quiet: float) -> list[str]:
        """Lines that arrive until the stream stays quiet for `quiet` seconds."""
        out = []
        while True:
            try:
                line = self.q.get(timeout=quiet)
            except queue.Empty:
                return out
            if line is None:
                return out
            self.seen.append(line)
            out.append(line)

HOSTS = {"c1": 1, "s1": 2, "r1": 3, "r2": 4, "r3": 5}
REPLICAS = ("r1", "r2", "r3")
BUCKETS = 16
ECHO_PORT = 8000

# A TCP echo server: one thread per connection, echoes what it reads.
ECHO_SERVER = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(256)
print("listening", flush=True)
def serve(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# The echo clients of the failover tests and bench, the demo and the fault matrix: one TCP
# connection per (source address, index), each sending a numbered 64-byte request every
# `interval` s and checking the echo.
#   argv: srcs(comma-separated) dst port per interval secs [samples]
# secs 0: until SIGTERM. SIGUSR1 marks a moment (a kill, a fault). Every 0.1 s a progress line
# "tick <t since start> <connections ended>". On SIGTERM (or after secs) one JSON line per
# connection: src, k, done, error and its kind (reset, timeout, mismatch, other) and time,
# first_after_mark (its first answer after the mark), answers (every answer time after the
# mark), last, and with `samples` every exchange as (t since start, round trip ms); then "end".
CLIENTS = r"""
import json, signal, socket, sys, threading, time
srcs, dst, port, per, interval, secs = (sys.argv[1].split(","), sys.argv[2], int(sys.argv[3]),
                                        int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
keep_samples = len(sys.argv) > 7 and sys.argv[7] == "samples"
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
mark = []
signal.signal(signal.SIGUSR1, lambda *a: mark.append(time.monotonic()))
t0 = time.monotonic()
results = []
def conn(src, k):
    r = {"src": src, "k": k, "done": 0, "error": None, "kind": None, "error_at": None,
         "first_after_mark": None, "answers": [], "last": 0.0, "samples": []}
    try:
        s = socket.create_connection((dst, port), timeout=10, source_address=(src, 0))
        s.settimeout(10)
        i = 0
        while not stop.is_set():
            msg = (b"%s/%d/%08d/" % (src.encode(), k, i)).ljust(64, b".")
            t = time.monotonic()
            s.sendall(msg)
            got = b""
            while len(got) < 64:
                d = s.recv(64 - len(got))
                if not d:
                    raise ConnectionError("closed by peer")
                got += d
            if got != msg:
                r["kind"] = "mismatch"
                raise ValueError(f"echo mismatch at {i}: {got[:40]!r}")
            now = time.monotonic()
            if mark and now > mark[0]:
                r["answers"].append(round(now, 4))
                if r["first_after_mark"] is None:
                    r["first_after_mark"] = now
            if keep_samples:
                r["samples"].append((round(t - t0, 4), round((now - t) * 1000, 3)))
            r["last"] = now
            i += 1
            r["done"] = i
            stop.wait(max(0.0, interval - (now - t)))  # (one request per interval)
        s.close()
    except Exception as e:
        r["error"] = f"{type(e).__name__}: {e}"
        r["error_at"] = round(time.monotonic() - t0, 3)
        if r["kind"] is None:
            r["kind"] = ("timeout" if isinstance(e, (socket.timeout, TimeoutError)) else
                         "reset" if isinstance(e, ConnectionResetError) else "other")
    results.append(r)
threads = [threading.Thread(target=conn, args=(src, k)) for src in srcs for k in range(per)]
for t in threads:
    t.start()
print("started", flush=True)
while not stop.wait(0.1):
    print("tick %.2f %d" % (time.monotonic() - t0, len(results)), flush=True)
    if secs and time.monotonic() - t0 > secs:
        stop.set()
for t in threads:
    t.join(15)
for r in results:
    print(json.dumps(r), flush=True)
print("end", flush=True)
"""


def client_ips(bed: SwitchedBed, n: int = 16) -> list[str]:
    return [f"10.{200 + bed.index}.3.{k}" for k in range(1, n + 1)]


def client_subnet(bed: SwitchedBed) -> str:
    return f"10.{200 + bed.index}.3.0/24"


def topology(bed: SwitchedBed) -> Topology:
    def port(h: str) -> Port:
        return Port(h, HOSTS[h], bed.host_mac(h))
    return Topology("pico", bed.dpid, 100, (port("c1"),), (port("s1"),),
                    {r: port(r) for r in REPLICAS}, BUCKETS)


def first_steering(bed: SwitchedBed, members=None) -> str:
    """What pico-sdn will ask for at start, so Faucet starts with it (no reload at start)."""
    c = Controller(list(REPLICAS), 0.0, vnodes=16, buckets=BUCKETS, members=members)
    return faucet_config(topology(bed), list(c.primaries()))


def cluster_yaml(bed: SwitchedBed, name: str, hold_ms: int = 500, shm_prefix: str = "picot",
                 ha: bool = True, members: list[str] | None = None, frequency_hz: int = 200,
                 groups: str = "", capacity: int = 4096, max_groups: int = 16,
                 heartbeat_timeout_ms: int = 300) -> str:
    """ha: chords placement (a group per backup at frequency_hz); else streams placement with
    the given `groups` YAML (groups: and policies: sections; empty: no replication)."""
    reps = "\n".join(
        f"  {r}:\n    id: {i}\n    smm_endpoint: tcp://127.0.0.1:{free_port()}\n"
        f"    rm_endpoint: tcp://127.0.0.1:{free_port()}\n    nfqueue: 1\n"
        f"    switch_port: {HOSTS[r]}\n    mac: \"{bed.host_mac(r)}\""
        for i, r in enumerate(REPLICAS, 1))
    return f"""version: 1
cluster: {{name: {name}, shm_prefix: {shm_prefix}}}
flow_table: {{capacity: {capacity}, state_size: 64, lock_stripes: 64}}
control: {{request_timeout_ms: 300, heartbeat_interval_ms: 50,
          controller_endpoint: "tcp://127.0.0.1:{free_port()}"}}
packets: {{ring_slots: 1024, pending_timeout_ms: 2000, standby_hold_ms: {hold_ms},
          max_groups: {max_groups}}}
replicas:
{reps}
sdn:
  placement: {"chords" if ha else "streams"}
  vnodes: 16
  buckets: {BUCKETS}
  client_subnet: {client_subnet(bed)}
  frequency_hz: {frequency_hz}
  heartbeat_timeout_ms: {heartbeat_timeout_ms}
  members: {list(members or REPLICAS)}
  dp_id: {bed.dpid}
  hosts:
    c1: {{port: 1, role: client}}
    s1: {{port: 2, role: server}}
  faucet:
    config: {bed.config_path}
    event_sock: {bed.event_sock}
    pid_file: {bed.faucet_pidfile}
    prometheus_port: {bed.prom_port}
    netns: {bed.switch_ns}
{groups}"""


class Cluster:
    """The bed plus every Pico process, started in order; stop() stops them by PID."""

    def __init__(self, bed: SwitchedBed, tmp: Path, name: str, order: str = "activate-first",
                 hold_ms: int = 500, activate_delay_ms: int = 0, shm_prefix: str = "picot",
                 ha: bool = True, members: list[str] | None = None, frequency_hz: int = 200,
                 groups: str = "", capacity: int = 4096, middlebox: str = "tcptracker",
                 audit: bool = False, max_groups: int = 16, heartbeat_timeout_ms: int = 300):
        self.bed, self.tmp, self.shm_prefix = bed, tmp, shm_prefix
        # audit: each PMM writes its output-commit audit log to <tmp>/<r>-audit.jsonl
        self.audit = {r: tmp / f"{r}-audit.jsonl" for r in REPLICAS} if audit else {}
        self.middlebox = middlebox  # tcptracker (examples/tcptracker.py) or mbserv
        self.path = tmp / f"{name}.yaml"
        self.path.write_text(cluster_yaml(bed, name, hold_ms, shm_prefix, ha, members,
                                          frequency_hz, groups, capacity, max_groups,
                                          heartbeat_timeout_ms=heartbeat_timeout_ms))
        self.cfg = load_config(self.path)
        self.procs: dict[str, list[subprocess.Popen]] = {r: [] for r in REPLICAS}
        self.others: list[subprocess.Popen] = []
        self.logs: dict[str, Path] = {}
        self.smms: dict[str, subprocess.Popen] = {}
        self.sdn_args = ["--order", order, "--activate-delay-ms", str(activate_delay_ms)]
        self.sdn_runs = 0
        try:
            self._setup_network()
            # Every SMM first, as the backups of the others: an RM whose backup has never
            # answered gives its groups up after its retries (a replica should not start long
            # before its backups; honcho starts each replica's own processes together).
            for r in REPLICAS:
                self.smms[r] = self._start_smm(r)
                self.procs[r] = [self.smms[r]]
            for r in REPLICAS:
                self._start_replica(r)
            self.start_sdn()
        except BaseException:
            self.stop()  # a half-started cluster leaves no process and no shared memory
            raise

    def start_sdn(self) -> None:
        self.sdn_runs += 1
        self.sdn_log = self.tmp / f"sdn{'' if self.sdn_runs == 1 else self.sdn_runs}.log"
        self.sdn = subprocess.Popen([sys.executable, "-m", "sdn", "--config", str(self.path),
                                     *self.sdn_args], cwd=REPO, stderr=open(self.sdn_log, "w"))
        self.others.append(self.sdn)

    def kill_sdn(self) -> None:
        self.sdn.send_signal(signal.SIGKILL)
        self.sdn.wait(10)

    def _setup_network(self) -> None:
        bed, net = self.bed, client_subnet(self.bed)
        for ip in client_ips(bed):
            bed.run("c1", ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"], check=True)
        for h in ("s1", *REPLICAS):
            bed.run(h, ["ip", "route", "add", net, "dev", "eth0"], check=True)
        for r in REPLICAS:
            for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                        "net.ipv4.conf.eth0.send_redirects=0"):
                bed.run(r, ["sysctl", "-w", key], check=True)
            bed.run(r, ["iptables-legacy", "-w", "5", "-A", "FORWARD", "-j", "NFQUEUE",
                        "--queue-num", "1"], check=True)

    def _log(self, what: str):
        p = self.tmp / f"{what}.log"
        self.logs[what] = p
        return open(p, "w")

    def _start_smm(self, r: str) -> subprocess.Popen:
        from shared.control import wait_until_serving
        smm = subprocess.Popen([sys.executable, "-m", "smm", "--config", str(self.path),
                                "--replica", r], cwd=REPO, stderr=self._log(f"{r}-smm"))
        try:
            wait_until_serving(self.cfg.replica(r).smm_endpoint, smm, 30, "pico-smm")
        except BaseException:  # not in self.procs yet: stop() would not find it
            smm.kill()
            smm.wait(5)
            raise
        return smm

    def _start_replica(self, r: str) -> None:
        args = ["--config", str(self.path), "--replica", r]
        py = sys.executable
        procs = self.procs[r]  # (each one listed as it starts: stop() finds them all)
        audit = ["--audit", str(self.audit[r])] if r in self.audit else []
        procs.append(self.bed.exec(r, [py, "-m", "pmm", *args, *audit], cwd=REPO,
                                   stderr=self._log(f"{r}-pmm")))
        procs.append(subprocess.Popen([py, "-m", "rm", *args], cwd=REPO,
                                      stderr=self._log(f"{r}-rm")))
        c = self.cfg.cluster
        pkts, flows = (f"/{c.shm_prefix}.{c.name}.{r}.pkts", f"/{c.shm_prefix}.{c.name}.{r}.flows")
        argv = ([py, "-m", "mbserv", pkts, flows, "--reset"] if self.middlebox == "mbserv"
                else [py, str(REPO / "examples" / "tcptracker.py"), pkts, flows, "--reset"])
        mb = subprocess.Popen(argv,
                              cwd=REPO, stdout=subprocess.PIPE, text=True,
                              stderr=self._log(f"{r}-mb"))
        procs.append(mb)
        Lines(mb.stdout).expect(lambda line: "ready" in line, timeout=30)

    def log_text(self, what: str) -> str:
        p = self.sdn_log if what == "sdn" else self.logs[what]
        return p.read_text(errors="replace") if p.exists() else ""

    def wait_log(self, what: str, needle: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log_text(what):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} log never said {needle!r}:\n"
                                     + self.log_text(what)[-3000:])
            time.sleep(0.05)

    def kill_replica(self, r: str) -> None:
        """SIGKILL every process of the replica and take its link down."""
        for p in self.procs[r]:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        subprocess.run(["ip", "-n", self.bed.switch_ns, "link", "set",
                        self.bed.port_name(r), "down"], check=True)

    def hang_replica(self, r: str) -> None:
        """SIGSTOP every process of the replica; its link stays up (only heartbeats tell)."""
        for p in self.procs[r]:
            if p.poll() is None:
                p.send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        for p in [*self.others, *(p for ps in self.procs.values() for p in ps)]:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in [*self.others, *(p for ps in self.procs.values() for p in ps)]:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        name = f"{self.shm_prefix}.{self.cfg.cluster.name}."
        for pattern in (f"{name}*", f"sem.{name}*"):  # a SIGKILLed SMM leaves both behind
            for f in Path("/dev/shm").glob(pattern):
                f.unlink(missing_ok=True)
        os.sync()
