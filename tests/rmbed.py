"""A protected replica on the real packet path, for the RM's network tests (test_rm_net.py).

Rig: replica r1 whole (its SMM, its PMM inside the replica namespace of a LinearBed with an
audit log, the pass-through middlebox, and pico-rm as a real process in the root namespace)
and its backup r2, of which only the SMM runs: it receives r1's checkpoints as STANDBY flows.
A stand-in controller (a ZeroMQ ROUTER at control.controller_endpoint) takes the RM's events.

Helpers: `until` (poll a condition with a deadline), `Sink` (the server's datagrams, per flow),
`Controller`, and MULTI_SEND (one UDP socket per flow, fixed source ports).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

from nettools import REPO, Lines, py, spawn
from shared import wire
from shared.api import attach_replica, flow_segment_name
from shared.config import load_config
from shared.control import ControlClient, wait_until_serving
from shared.flowkey import make_key
from shared.flowtable import ACTIVE, STANDBY
from shared.packets import attach_control, pkt_segment_name

WEB = 1            # the protected group's id
WEB_PORT = 7001    # its policy: UDP to this port
SPORT_BASE = 41000  # flow k of a sender uses source port SPORT_BASE + k
NFLOWS = 8

EXTRA = f"""packets: {{max_groups: 4, ring_slots: 2048}}
groups:
  web: {{id: {WEB}, target: r2, frequency_hz: 200, buffering: true}}
policies:
  - {{group: web, proto: udp, dport: {WEB_PORT}}}
"""

# One socket per flow, bound to SPORT_BASE + k; round-robin, `rounds` datagrams per flow,
# "<tag><k> <i>" each; prints "done <total>" at the end.
MULTI_SEND = r"""
import socket, sys, time
addr, port, tag, nflows, rounds, gap, base = (sys.argv[1], int(sys.argv[2]), sys.argv[3],
    int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]))
socks = []
for k in range(nflows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", base + k))
    socks.append(s)
for i in range(rounds):
    for k, s in enumerate(socks):
        s.sendto(f"{tag}{k} {i}".encode(), (addr, port))
    time.sleep(gap)
print(f"done {nflows * rounds}", flush=True)
"""


# nettools.UDP_SINK with a large receive buffer: output held for seconds leaves as one burst
# when it is committed, and a default-sized buffer overflows (the kernel counts RcvbufErrors).
BIG_SINK = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE (root): past rmem_max
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), flush=True)
while True:
    d, _ = s.recvfrom(65536)
    print(d.decode(), flush=True)
"""


def until(cond, timeout: float, what, interval: float = 0.02):
    """Poll cond() until it returns something true (returned); AssertionError at the deadline.
    `what` (a string or a callable giving one) explains the failure."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: "
                                 f"{what() if callable(what) else what}")
        time.sleep(interval)


class Sink:
    """The server's UDP sink on WEB_PORT: datagrams received, per flow (tag, k) -> [i, ...]."""

    _LINE = re.compile(r"^([a-z]+)(\d+) (\d+)$")

    def __init__(self, bed, port: int = WEB_PORT):
        self.proc, self.lines = spawn(bed, "server", py(BIG_SINK, bed.server_ip, port))
        self.lines.expect("listening", 15)
        self.lines.seen.clear()
        self.flows: dict[tuple[str, int], list[int]] = {}
        self.count = 0
        self.junk: list[str] = []

    def pull(self) -> int:
        """Take every line that has arrived (without waiting); the total count."""
        for line in self.lines.drain(quiet=0.001):
            m = self._LINE.match(line)
            if m is None:
                self.junk.append(line)
                continue
            self.flows.setdefault((m.group(1), int(m.group(2))), []).append(int(m.group(3)))
            self.count += 1
        return self.count

    def missing(self, tag: str, nflows: int, rounds: int) -> list[tuple[int, int]]:
        return [(k, i) for k in range(nflows) for i in range(rounds)
                if i not in set(self.flows.get((tag, k), []))]

    def tagged(self, tag: str) -> int:
        self.pull()
        return sum(len(v) for (t, _), v in self.flows.items() if t == tag)

    def expect_all(self, tag: str, nflows: int, rounds: int, timeout: float,
                   diag=lambda: "") -> None:
        """Every datagram of a MULTI_SEND run arrived, each flow complete and in order."""
        until(lambda: self.tagged(tag) >= nflows * rounds, timeout,
              lambda: f"{self.tagged(tag)} of {nflows * rounds} '{tag}' datagrams arrived; "
                      f"missing {self.missing(tag, nflows, rounds)[:20]}\n{diag()}")
        for k in range(nflows):
            assert self.flows.get((tag, k)) == list(range(rounds)), \
                (tag, k, self.flows.get((tag, k), [])[:20])


class Event:
    def __init__(self, parts: list[bytes], msg: wire.Message):
        self.parts, self.msg = parts, msg
        self.body = wire.parse_json_body(msg.body) if msg.status == wire.OK else {}


class Controller:
    """The controller's side of control.controller_endpoint: a ROUTER the test reads."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.events: list[Event] = []
        self.heartbeats = 0

    def recv(self, timeout: float) -> Event | None:
        """The next event that is not a heartbeat (heartbeats are answered and counted)."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            if not self.sock.poll(int(left * 1000), zmq.POLLIN):
                return None
            parts = self.sock.recv_multipart()
            ev = Event(parts, wire.decode(parts[-1], 1 << 24))
            if json.loads(ev.msg.body or b"{}").get("event") == "heartbeat":
                self.heartbeats += 1
                self.reply(ev, {"ok": True})
                continue
            self.events.append(ev)
            return ev

    def reply(self, ev: Event, body: dict) -> None:
        """Answer in the request's envelope: same routing parts, type | REPLY_BIT, same seq."""
        self.sock.send_multipart(ev.parts[:-1] + [wire.encode(ev.msg.type | wire.REPLY_BIT,
                                                              ev.msg.seq, wire.json_body(body))])

    def drain(self) -> list[Event]:
        """Events already waiting (each answered ok)."""
        out = []
        while (ev := self.recv(0)) is not None:
            self.reply(ev, {"ok": True})
            out.append(ev)
        return out

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def _stop(proc, sig=signal.SIGTERM, timeout: float = 10.0) -> int | None:
    """Stop one child by its PID: sig, then SIGKILL after timeout; its exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGCONT)  # a stopped process would sit on SIGTERM
        except ProcessLookupError:
            pass
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


class Rig:
    """r1 whole + r2's SMM + a LinearBed + a controller; close() undoes all of it by PID."""

    def __init__(self, tmp_path: Path, smm_factory, request_timeout_ms: int = 300):
        from conftest import free_port, write_config
        self.tmp = tmp_path
        self.bed = self.pmm = self.rm = self.mb = self.controller = None
        self.seg = self.ctl = self.r1 = self.r2 = self.smm1 = self.smm2 = None
        self.errors: list[str] = []
        self._rm_log = None
        cfg = write_config(tmp_path, extra=EXTRA, request_timeout_ms=request_timeout_ms,
                           rm_endpoints=True)
        # controller_endpoint: write_config has no knob for it, so add it to its control section.
        self.controller_endpoint = f"tcp://127.0.0.1:{free_port()}"
        path = Path(cfg.path)
        text, n = re.subn(r"^control:\n", "control:\n  controller_endpoint: "
                          f"{self.controller_endpoint}\n", path.read_text(), flags=re.M)
        assert n == 1, "write_config's YAML changed: no single 'control:' section"
        path.write_text(text)
        self.cfg = cfg = load_config(path)
        assert cfg.control.controller_endpoint == self.controller_endpoint
        c = cfg.cluster
        self.shm_stem = f"{c.shm_prefix}.{c.name}."
        self.pkts = pkt_segment_name(c.shm_prefix, c.name, "r1")
        self.flows = flow_segment_name(c.shm_prefix, c.name, "r1")
        self.audit = str(tmp_path / "audit.jsonl")
        self.rm_log_path = tmp_path / "rm.log"
        self.rm_endpoint = cfg.replica("r1").rm_endpoint
        try:
            self._start(smm_factory)
        except BaseException:
            self.close()
            raise

    def _start(self, smm_factory) -> None:
        from sdn.testbed import LinearBed
        cfg = self.cfg
        self.controller = Controller(self.controller_endpoint)
        self.smm1 = smm_factory(cfg, "r1")
        self.smm2 = smm_factory(cfg, "r2")
        pid = os.getpid()
        # Indexes 0..39 are test_pmm_net's, 45 bench pmm's, 50..55 test_procfile's.
        self.bed = LinearBed(f"rn{pid % 100}", index=40 + pid % 5, nfqueue=1)
        self.bed.up()
        self.pmm = self.bed.exec("replica", [sys.executable, "-m", "pmm", "--config",
                                             str(cfg.path), "--replica", "r1", "--audit",
                                             self.audit],
                                 cwd=REPO, stderr=subprocess.PIPE, text=True)
        self.pmm_log = Lines(self.pmm.stderr)
        self.pmm_log.expect("bound NFQUEUE", timeout=20)
        self._rm_log = open(self.rm_log_path, "w")
        self.rm = subprocess.Popen([sys.executable, "-m", "rm", "--config", str(cfg.path),
                                    "--replica", "r1"], cwd=REPO, stdout=self._rm_log,
                                   stderr=subprocess.STDOUT)
        try:
            wait_until_serving(self.rm_endpoint, self.rm, 30, "pico-rm")
        except Exception:
            raise AssertionError(f"pico-rm did not come up:\n{self.rm_log()}") from None
        self.seg, self.ctl = attach_control(self.pkts)
        self.index = self.seg.active_groups()[WEB]
        self.mb = subprocess.Popen([sys.executable, str(REPO / "examples" / "passthrough.py"),
                                    self.pkts, self.flows], cwd=REPO, stdout=subprocess.PIPE,
                                   text=True)
        Lines(self.mb.stdout).expect("ready", timeout=15)
        self.r1 = attach_replica(cfg, "r1", name="test-r1")
        self.r2 = attach_replica(cfg, "r2", name="test-r2")

    # ------------------------------------------------------------------ observations
    def row(self):
        """The web group's entry in r1's group table (live view)."""
        return self.seg.groups[self.index]

    def word(self, name: str) -> int:
        return int(self.seg.groups[self.index][name])

    def output_queued(self) -> int:
        return len(self.seg.output_ring(self.index))

    def diag(self) -> str:
        """What the replica says about itself, for failure messages."""
        counters = {n: int(self.seg.counters[n]) for n in self.seg.counters.dtype.names
                    if n != "reserved"}
        row = next(g for g in self.seg.group_stats() if g["id"] == WEB)
        self.pmm_log.drain(quiet=0.05)
        snmp = self.bed.run("server", ["cat", "/proc/net/snmp"]).stdout.splitlines()
        udp = [line for line in snmp if line.startswith("Udp:")]
        return (f"packet counters {counters}\nweb group {row}\nserver {udp}\n"
                f"PMM log: {self.pmm_log.seen[-15:]}\nRM log:\n{self.rm_log()[-2500:]}")

    def rm_log(self) -> str:
        if self._rm_log is not None:
            self._rm_log.flush()
        return self.rm_log_path.read_text() if self.rm_log_path.exists() else ""

    def key(self, k: int) -> bytes:
        return make_key(self.bed.client_ip, SPORT_BASE + k, self.bed.server_ip, WEB_PORT, 17)

    def active(self, key: bytes) -> tuple[int, bytes] | None:
        """r1's ACTIVE copy: (version, state bytes), or None."""
        t = self.r1.table
        idx, status = t.lookup(key)
        if status != ACTIVE:
            return None
        return int(t.slots["version"][idx]), bytes(t.slots[idx]["state"])

    def standby(self, key: bytes) -> tuple[int, bytes, int] | None:
        """r2's STANDBY copy: (version, state bytes, ckpt_epoch), or None. The SMM writes
        records without our lock, so a copy is read until two reads agree."""
        t = self.r2.table
        idx, status = t.lookup(key)
        if status != STANDBY:
            return None
        last = None
        for _ in range(100):
            s = t.slots[idx]
            got = (int(s["version"]), bytes(s["state"]), int(s["ckpt_epoch"]))
            if got == last:
                return got
            last = got
        raise AssertionError(f"r2's standby copy of {key.hex()} never read the same twice")

    def audit_records(self) -> list[dict]:
        """The complete lines of the PMM's audit log so far (it may be mid-line)."""
        try:
            text = Path(self.audit).read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]

    def stats(self) -> dict:
        """picoctl --json stats, the web group's row."""
        r = subprocess.run([sys.executable, "-m", "rm.ctl", "--endpoint", self.rm_endpoint,
                            "--json", "stats"], cwd=REPO, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, (r.returncode, r.stderr, self.rm_log()[-3000:])
        return next(g for g in json.loads(r.stdout)["groups"] if g["id"] == WEB)

    def rm_stats(self) -> dict:
        with ControlClient(self.rm_endpoint, timeout_ms=2000) as c:
            reply = json.loads(c.request(wire.STATS).body)
        return next(g for g in reply["groups"] if g["id"] == WEB)

    # ------------------------------------------------------------------ traffic
    def send(self, tag: str, rounds: int, gap: float, nflows: int = NFLOWS) -> subprocess.Popen:
        """Start MULTI_SEND in the client namespace (not waited for)."""
        return self.bed.exec("client", py(MULTI_SEND, self.bed.server_ip, WEB_PORT, tag, nflows,
                                          rounds, gap, SPORT_BASE),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)

    def send_all(self, tag: str, rounds: int, gap: float, nflows: int = NFLOWS) -> None:
        r = self.bed.run("client", py(MULTI_SEND, self.bed.server_ip, WEB_PORT, tag, nflows,
                                      rounds, gap, SPORT_BASE), timeout=60)
        assert r.returncode == 0 and r.stdout.startswith("done"), (r.returncode, r.stderr)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        errors = []
        if self.mb is not None:
            _stop(self.mb)
        if self.rm is not None:
            rc = _stop(self.rm)
            if rc not in (0, None):
                errors.append(f"pico-rm exited {rc}")
        if self.pmm is not None:
            _stop(self.pmm)
        for client in (self.r1, self.r2):
            if client is not None:
                try:
                    client.close()
                except Exception as e:  # r2's SMM may be gone: detaching is best effort
                    errors.append(f"detach: {e}")
        if self.seg is not None:
            self.ctl.close()
            self.seg.release_views()
            self.seg.segment.close()
        if self.controller is not None:
            self.controller.close()
        if self.bed is not None:
            self.bed.down()
        if self._rm_log is not None:
            self._rm_log.close()
        for smm in (self.smm1, self.smm2):  # (smm_factory's own stop is then a no-op)
            if smm is not None:
                if smm.proc.poll() is None:
                    os.kill(smm.proc.pid, signal.SIGCONT)
                smm.stop()
        self.errors = errors

    def sweep_shm(self) -> list[str]:
        """Remove what this rig's cluster left in /dev/shm (a killed SMM leaves its segment
        and semaphores); the names removed. Call after every process is stopped."""
        gone = []
        for f in Path("/dev/shm").iterdir():
            if f.name.startswith(self.shm_stem) or f.name.startswith("sem." + self.shm_stem):
                f.unlink(missing_ok=True)
                gone.append(f.name)
        return gone
