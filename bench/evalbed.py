"""The evaluation's test bed: the three-replica cluster of sdn/clusterbed.py with MBServ as the
middlebox, HTTP-style transaction traffic through r1, and CPU accounting of Pico's processes.

Traffic: TXN_SERVER in s1 listens on SERVER_PORTS; each connection carries transactions
(4-byte request length + 4-byte response length + the request body; the server answers with the
response bytes). TXN_CLIENTS in c1 runs one thread per connection, each bound to its own source
address and source port (so policies can classify it by `sport`/`dport`), either closed-loop
(the next request as soon as the answer is in) or paced at `rate` transactions per second.
Request sizes come from a per-connection random.Random(seed, k): lognormal with the given mean
and sigma of the underlying normal, capped at `max`. Latency is the time from the request's
first byte to the response's last, per transaction, recorded only inside the measurement window
(after `warmup`), so connection set-up and slow start are excluded.

Client addresses are chosen in r1's steering buckets, so every connection crosses r1 (MBServ1);
r2 and r3 are its backups. Root only (namespaces, OVS, Faucet).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

SERVER_PORTS = (8000, 8001)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

TXN_SERVER = r"""
import socket, struct, sys, threading
def serve(c):
    with c:
        f = c.makefile("rb")
        while True:
            hdr = f.read(8)
            if len(hdr) < 8:
                return
            req, resp = struct.unpack("!II", hdr)
            left = req
            while left:
                d = f.read(min(left, 65536))
                if not d:
                    return
                left -= len(d)
            c.sendall(b"r" * resp)
def listen(port):
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((sys.argv[1], port)); srv.listen(1024)
    while True:
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(c,), daemon=True).start()
for p in sys.argv[2].split(","):
    threading.Thread(target=listen, args=(int(p),), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""

# argv[1]: a JSON spec {"dst", "secs", "warmup", "seed", "req": {"mean", "sigma", "max"} or
# {"fixed"}, "resp", "conns": [{"src", "sport", "dport", "cls", "rate"}]}. Prints "started",
# "window" when the measurement window opens, "done" when it closes, then one JSON line per
# connection {"cls", "n", "lat_ms": [...], "error"} and "end".
TXN_CLIENTS = r"""
import json, math, random, socket, struct, sys, threading, time
spec = json.loads(sys.argv[1])
req, resp = spec["req"], spec["resp"]
t0 = time.monotonic() + 0.5
w0, w1 = t0 + spec["warmup"], t0 + spec["warmup"] + spec["secs"]
def size(rng):
    if "fixed" in req:
        return req["fixed"]
    mu = math.log(req["mean"]) - req["sigma"] ** 2 / 2
    return max(1, min(req["max"], int(rng.lognormvariate(mu, req["sigma"]))))
body = b"q" * 200000
out = []
def conn(k, c):
    r = {"cls": c["cls"], "n": 0, "lat_ms": [], "bytes": 0, "error": None}
    rng = random.Random(spec["seed"] * 100003 + k)
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((c["src"], c["sport"]))
        s.settimeout(15)
        s.connect((spec["dst"], c["dport"]))
        period = 1.0 / c["rate"] if c["rate"] else 0.0
        due = t0 + rng.random() * period
        while True:
            now = time.monotonic()
            if now >= w1:
                break
            if period and due > now:
                time.sleep(due - now)
            n = size(rng)
            t = time.monotonic()
            s.sendall(struct.pack("!II", n, resp) + body[:n])
            got = 0
            while got < resp:
                d = s.recv(65536)
                if not d:
                    raise ConnectionError("closed by peer")
                got += len(d)
            done = time.monotonic()
            if w0 <= t and done <= w1:
                r["n"] += 1
                r["bytes"] += n + resp
                r["lat_ms"].append(round((done - t) * 1000, 3))
            due = max(due + period, done) if period else done
        s.close()
    except Exception as e:
        r["error"] = f"{type(e).__name__}: {e}"
    out.append(r)
threads = [threading.Thread(target=conn, args=(k, c)) for k, c in enumerate(spec["conns"])]
for t in threads:
    t.start()
print("started", flush=True)
time.sleep(max(0.0, w0 - time.monotonic()))
print("window", flush=True)
time.sleep(max(0.0, w1 - time.monotonic()))
print("done", flush=True)
for t in threads:
    t.join(20)
for r in out:
    print(json.dumps(r), flush=True)
print("end", flush=True)
"""


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """utime + stime of each live process, in seconds."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        except (OSError, IndexError, ValueError):
            pass
    return out


class EvalBed:
    """One cluster (bed + Pico processes + the transaction server) for one configuration;
    `run(conns, ...)` drives a client run through it and returns the client's records and the
    CPU each Pico role used in the window."""

    def __init__(self, tmp: Path, name: str, ha: bool, frequency_hz: int = 1000,
                 groups: str = "", index: int = 44, capacity: int = 65536):
        from sdn.clusterbed import HOSTS, Cluster, Lines, first_steering
        from sdn.testbed import SwitchedBed
        self.bed = SwitchedBed(HOSTS, first_steering, prefix=f"ev{os.getpid() % 100}",
                               base_dir=tmp, index=index, ipv6=False)
        self.bed.start()
        self.cluster = self.srv = None
        from sdn.clusterbed import REPO
        self.cluster_repo = REPO
        try:
            self.cluster = Cluster(self.bed, tmp, name, shm_prefix="picoe", ha=ha,
                                   frequency_hz=frequency_hz, groups=groups, capacity=capacity,
                                   middlebox="mbserv", max_groups=80,
                                   # no failover is measured here: a 2-core machine under
                                   # full load may delay a heartbeat past the usual 300 ms
                                   heartbeat_timeout_ms=3000)
            self.cluster.wait_log("sdn", "controlling 3 replica(s)", timeout=60)
            self.sources = self._r1_sources()
            for ip in self.sources:
                self.bed.run("c1", ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
            self.srv = self.bed.exec("s1", [sys.executable, "-c", TXN_SERVER,
                                            self.bed.host_ip("s1"),
                                            ",".join(map(str, SERVER_PORTS))],
                                     stdout=subprocess.PIPE, text=True)
            Lines(self.srv.stdout).expect("listening", timeout=10)
        except BaseException:
            self.stop()
            raise

    def _r1_sources(self) -> list[str]:
        from sdn.clusterbed import REPLICAS, client_ips
        from sdn.ring import Ring, placements
        from sdn.steering import bucket_of
        pl = placements(Ring(list(REPLICAS), 16), 16)
        return [ip for ip in client_ips(self.bed, 250)[16:]
                if pl[bucket_of(ip, 16)].primary == "r1"]

    def roles(self) -> dict[str, int]:
        """Pico's processes by role: r1's pmm, middlebox, rm, smm; the backups' smm; sdn."""
        out = {}
        for r, procs in self.cluster.procs.items():
            smm, pmm, rm, mb = (procs + [None] * 4)[:4]
            for role, p in (("smm", smm), ("pmm", pmm), ("rm", rm), ("mbserv", mb)):
                if p is not None and p.poll() is None:
                    out[f"{r}-{role}"] = p.pid
        if self.cluster.sdn.poll() is None:
            out["sdn"] = self.cluster.sdn.pid
        return out

    def picoctl(self, replica: str, *args: str) -> dict:
        """Runs picoctl against a replica's RM; its JSON reply."""
        cp = subprocess.run([sys.executable, "-m", "rm.ctl", "--config", str(self.cluster.path),
                             "--replica", replica, "--json", *args],
                            capture_output=True, text=True, timeout=30, cwd=self.cluster_repo)
        if cp.returncode != 0:
            raise RuntimeError(f"picoctl {' '.join(args)} failed ({cp.returncode}): "
                               f"{cp.stderr.strip() or cp.stdout.strip()}")
        return json.loads(cp.stdout) if cp.stdout.strip() else {}

    def run(self, conns: list[dict], secs: float, warmup: float, seed: int,
            req: dict, resp: int) -> dict:
        """conns: [{"sport", "dport", "cls", "rate"}] (src assigned round-robin over r1's
        addresses). Returns {"records", "cpu": {role: seconds}, "window_s"}."""
        from sdn.clusterbed import Lines
        if len(conns) > len(self.sources) * 200:
            raise ValueError("too many connections for the source addresses")
        for k, c in enumerate(conns):
            c.setdefault("src", self.sources[k % len(self.sources)])
        spec = {"dst": self.bed.host_ip("s1"), "secs": secs, "warmup": warmup, "seed": seed,
                "req": req, "resp": resp, "conns": conns}
        cl = self.bed.exec("c1", [sys.executable, "-c", TXN_CLIENTS, json.dumps(spec)],
                           stdout=subprocess.PIPE, text=True)
        try:
            lines = Lines(cl.stdout)
            lines.expect("started", timeout=30)
            roles = self.roles()
            lines.expect("window", timeout=warmup + 30)
            c0, t_a = cpu_seconds(list(roles.values())), time.monotonic()
            lines.expect("done", timeout=secs + 30)
            c1, t_b = cpu_seconds(list(roles.values())), time.monotonic()
            records = lines.records(60)
            cl.wait(30)
        finally:
            if cl.poll() is None:
                cl.kill()
                cl.wait(5)
        cpu = {role: c1[pid] - c0[pid] for role, pid in roles.items()
               if pid in c0 and pid in c1}
        return {"records": records, "cpu": cpu, "window_s": t_b - t_a,
                "failovers": self.failovers(), "unprotected": self.unprotected()}

    def failovers(self) -> int:
        """Replicas pico-sdn has declared failed so far (a run with one is not a measurement
        of the configuration asked for: its traffic moved)."""
        return self.cluster.log_text("sdn").count(" failed (")

    def unprotected(self) -> list[int]:
        """r1's checkpointed groups that carried traffic and are not protected now (a backup
        that stopped answering unprotects its groups: their output no longer waits)."""
        groups = self.picoctl("r1", "groups").get("groups", [])
        return [g["id"] for g in groups if g["id"] != 0 and g.get("configured_hz")
                and g.get("rx_packets") and not g.get("protected")]

    def stop(self) -> None:
        if self.srv is not None and self.srv.poll() is None:
            self.srv.terminate()
            self.srv.wait(10)
        if self.cluster is not None:
            self.cluster.stop()
        self.bed.stop()
