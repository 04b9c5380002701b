"""Network testbeds in namespaces, for tests, the demo and benchmarks.

Two beds, both built with plain subprocess calls (`ip`, `sysctl`, `iptables-legacy`, `ethtool`,
`ovs-*`); every call is checked and a failure raises `TestbedError` naming the command, its
stderr and what to do. Everything a bed creates carries a caller-given prefix, lives in network
namespaces it owns (the root namespace gets no interface, address or route), and is removed by
PID and by exact name, never by a process name.

LinearBed(prefix="pt3", index=i, replicas=1): a client, a router-like replica and a server

    {p}c  10.(200+i).0.1/24    fd00:i::1/64          client, default route via the active replica
      | veth {p}c1 -- {p}r1c   (replicas > 1: every {p}cK is a port of bridge {p}cbr in {p}c)
    {p}r1 10.(200+i).0.254     fd00:i::fe            ip_forward=1, IPv6 forwarding, NFQUEUE rule
          10.(200+i).1.254     fd00:i:0:1::fe        in FORWARD (iptables-legacy, ip6tables-legacy)
      | veth {p}r1s -- {p}s1   (replica K uses host number 255-K on both sides)
    {p}s  10.(200+i).1.1/24    fd00:i:0:1::1/64      server, default route via the active replica

SwitchedBed(hosts={"h1": 1, ...}, faucet_config=..., prefix="pt4", base_dir=...): Open vSwitch
(userspace netdev datapath, private database) controlled by Faucet. The switch side lives in its
own namespace `{p}sw`: ovsdb-server, ovs-vswitchd, Faucet, the bridge, its tap devices and the
switch end of every veth. That matters: a userspace OVS always creates a tap device called
`ovs-netdev`, so two of them in one namespace collide ("creating tap device failed: Device or
resource busy"), and a system OVS would be disturbed. Host H is namespace `{p}H` with `eth0`
= 10.(200+i).2.<ofport>/24, fd00:i:0:2::<ofport>/64 and MAC 0e:00:<i>:00:00:<ofport>, attached
at its fixed OpenFlow port. TCP ports 6653/9302 (OpenFlow, Prometheus) are 127.0.0.1 of `{p}sw`,
so they never clash with anything; `metrics()` and `reload()` reach them through a socket opened
in that namespace.

Crash recovery: `LinearBed.up()` and `SwitchedBed.start()` first remove their own leftovers;
`cleanup_prefix(prefix)` removes every namespace whose name starts with the prefix, after killing
(by PID) the processes still inside it.
"""
from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

from shared.errors import PicoError

log = logging.getLogger("pico.testbed")

NETNS_DIR = Path("/run/netns")
IFNAMSIZ = 15
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_HOST_RE = re.compile(r"^[a-z][a-z0-9]*$")

# What to do when a command of this family fails (keyed by the program name).
_HINTS = {
    "ip": "run as root (namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN) with iproute2 installed; "
          "a leftover of a crashed run is removed with sdn.testbed.cleanup_prefix(<prefix>)",
    "sysctl": "run as root with procps installed (make setup)",
    "iptables-legacy": "install iptables (make setup); the kernel needs ip_tables and xt_NFQUEUE",
    "ip6tables-legacy": "install iptables (make setup); the kernel needs ip6_tables and "
                        "xt_NFQUEUE",
    "ethtool": "install ethtool (make setup)",
    "ovs": "install openvswitch-switch (make setup) and read the OVS logs of this bed",
    "cat": "is the namespace still there?",
}
_PACKAGES = {"ip": "iproute2", "sysctl": "procps", "iptables-legacy": "iptables",
             "ip6tables-legacy": "iptables", "ethtool": "ethtool", "ovs": "openvswitch-switch"}


class TestbedError(PicoError):
    """A testbed command failed or a testbed did not come up; the message says what to do."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, message: str, argv: Sequence[str] | None = None, stderr: str = "",
                 hint: str | None = None):
        self.argv = list(argv) if argv else None
        self.stderr = stderr
        self.hint = hint
        text = message
        if stderr.strip():
            text += f": {stderr.strip()}"
        if hint:
            text += f". What to do: {hint}"
        super().__init__(text)


def _family(argv: Sequence[str]) -> str:
    """The program a command really runs (`ip netns exec NS prog` counts as prog)."""
    prog = os.path.basename(argv[0])
    if prog == "ip" and len(argv) > 4 and argv[1] == "netns" and argv[2] == "exec":
        prog = os.path.basename(argv[4])
    return "ovs" if prog.startswith("ovs") else prog


def _run(argv: Sequence[str], *, check: bool = True, env: Mapping[str, str] | None = None,
         timeout: float = 20.0, hint: str | None = None,
         input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command, capture its output; with check, a non-zero exit raises TestbedError."""
    argv = [str(a) for a in argv]
    cmd = " ".join(argv)
    fam = _family(argv)
    log.debug("run %s", cmd)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                              input=input)
    except FileNotFoundError:
        raise TestbedError(f"`{cmd}`: command not found", argv,
                           hint=f"install {_PACKAGES.get(fam, 'the package providing it')} "
                                "(make setup)") from None
    except subprocess.TimeoutExpired as e:
        raise TestbedError(f"`{cmd}` did not finish within {timeout} s", argv,
                           (e.stderr or b"").decode(errors="replace")
                           if isinstance(e.stderr, bytes) else (e.stderr or ""),
                           hint or _HINTS.get(fam)) from None
    if check and proc.returncode != 0:
        raise TestbedError(f"`{cmd}` failed (exit {proc.returncode})", argv,
                           proc.stderr or proc.stdout, hint or _HINTS.get(fam))
    return proc


def _nsexec(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *[str(a) for a in argv]]


# ---------------------------------------------------------------------------- processes

def _pid_alive(pid: int) -> bool:
    """True while the PID runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _pid_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if _pid_alive(p)]
    return left


def _kill_pids(pids: Sequence[int], term_timeout: float = 2.0) -> list[int]:
    """SIGTERM, wait, SIGKILL; returns the PIDs still alive after that (should be none)."""
    pids = [p for p in pids if p != os.getpid() and _pid_alive(p)]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    left = _wait_gone(pids, term_timeout)
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return _wait_gone(left, 2.0)


def _stop_popen(proc: subprocess.Popen, timeout: float = 2.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def _pid_matches(pid: int, needle: str) -> bool:
    """Does PID still belong to us: its command line or environment mentions needle?"""
    for what in ("cmdline", "environ"):
        try:
            if needle.encode() in Path(f"/proc/{pid}/{what}").read_bytes():
                return True
        except OSError:
            pass
    return False


# ---------------------------------------------------------------------------- namespaces

def list_namespaces() -> list[str]:
    """Names of the named network namespaces (`ip netns list`, read from /run/netns)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _ns_exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def _ns_pids(ns: str) -> list[int]:
    proc = _run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in proc.stdout.split()] if proc.returncode == 0 else []


def _delete_ns(ns: str) -> None:
    """Kill (by PID) whatever still runs inside, then delete the namespace. Idempotent."""
    if not _ns_exists(ns):
        return
    left = _kill_pids(_ns_pids(ns))
    if left:
        raise TestbedError(f"namespace {ns}: processes {left} survived SIGKILL", hint="look at "
                           "them with `ps -o pid,stat,cmd -p " + ",".join(map(str, left)) + "`")
    proc = _run(["ip", "netns", "del", ns], check=False)
    if proc.returncode != 0 and _ns_exists(ns):
        raise TestbedError(f"`ip netns del {ns}` failed", ["ip", "netns", "del", ns],
                           proc.stderr, _HINTS["ip"])


def _add_ns(ns: str, sysctls: Sequence[str]) -> None:
    """Create a namespace, apply sysctls (before any interface exists), bring lo up."""
    _run(["ip", "netns", "add", ns])
    if sysctls:
        _run(_nsexec(ns, ["sysctl", "-qw", *sysctls]))
    _run(["ip", "-n", ns, "link", "set", "lo", "up"])


def cleanup_prefix(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with prefix (killing its processes by PID).

    For crash recovery; returns the names removed. Choose prefixes that are not a prefix of
    someone else's: cleanup_prefix("p") would also take "pt3c".
    """
    if not prefix or not _PREFIX_RE.match(prefix):
        raise TestbedError(f"cleanup_prefix({prefix!r}): not a testbed prefix",
                           hint="pass the prefix the bed was built with, e.g. 'pt3'")
    gone = [ns for ns in list_namespaces() if ns.startswith(prefix)]
    for ns in gone:
        _delete_ns(ns)
    return gone


def _check_prefix(prefix: str, longest_suffix: int) -> None:
    if not _PREFIX_RE.match(prefix or ""):
        raise TestbedError(f"bad testbed prefix {prefix!r}",
                           hint="use 1-8 lowercase letters/digits starting with a letter, "
                                "e.g. 'pt3'")
    if len(prefix) + longest_suffix > IFNAMSIZ:
        raise TestbedError(f"prefix {prefix!r} is too long: interface names would exceed "
                           f"{IFNAMSIZ} characters", hint="use a shorter prefix (<= 5 chars)")


def _check_index(index: int) -> None:
    if not (isinstance(index, int) and 0 <= index <= 55):
        raise TestbedError(f"bad testbed index {index!r}",
                           hint="use an integer 0..55 (subnets are 10.(200+index).x.0/24)")


def _ipv6_available() -> bool:
    return Path("/proc/sys/net/ipv6").is_dir()


# ---------------------------------------------------------------------------- LinearBed

class LinearBed:
    """client -- replica(s) -- server in network namespaces; see the module docstring.

    nfqueue: queue number of the FORWARD rule in every replica (None: no rule).
    queue_bypass: add --queue-bypass (fail open when no handler is bound).
    """

    ROLES = ("client", "server", "replica")

    def __init__(self, prefix: str, index: int = 0, replicas: int = 1, nfqueue: int | None = 1,
                 queue_bypass: bool = False, ipv6: bool = True):
        if not (isinstance(replicas, int) and 1 <= replicas <= 99):
            raise TestbedError(f"bad replica count {replicas!r}", hint="use 1..99")
        _check_prefix(prefix, len(f"r{replicas}c"))
        _check_index(index)
        if nfqueue is not None and not (0 <= nfqueue <= 65535):
            raise TestbedError(f"bad NFQUEUE number {nfqueue}", hint="use 0..65535 or None")
        self.prefix = prefix
        self.index = index
        self.replicas = replicas
        self.nfqueue = nfqueue
        self.queue_bypass = queue_bypass
        self.ipv6 = ipv6
        self.active = 1
        self._procs: list[subprocess.Popen] = []
        self.up_seconds: float | None = None
        self.down_seconds: float | None = None
        self._net4 = [ipaddress.ip_network(f"10.{200 + index}.{side}.0/24") for side in (0, 1)]
        base6 = int(ipaddress.IPv6Address(f"fd00:{index:x}::"))
        self._net6 = [ipaddress.ip_network((base6 + (side << 64), 64)) for side in (0, 1)]
        self._own_ns = re.compile(rf"^{re.escape(prefix)}(c|s|r[0-9]+)$")

    # -- names and addresses
    @property
    def client_ns(self) -> str:
        return f"{self.prefix}c"

    @property
    def server_ns(self) -> str:
        return f"{self.prefix}s"

    @property
    def replica_ns(self) -> str:
        """The namespace of replica 1."""
        return self.replica_ns_of(1)

    @property
    def replica_nss(self) -> list[str]:
        return [self.replica_ns_of(k) for k in range(1, self.replicas + 1)]

    @property
    def namespaces(self) -> list[str]:
        return [self.client_ns, *self.replica_nss, self.server_ns]

    def replica_ns_of(self, k: int) -> str:
        self._check_replica(k)
        return f"{self.prefix}r{k}"

    def _check_replica(self, k: int) -> None:
        if not (isinstance(k, int) and 1 <= k <= self.replicas):
            raise TestbedError(f"no replica {k!r} in bed {self.prefix}",
                               hint=f"use 1..{self.replicas}")

    def _host(self, net, host: int) -> str:
        return str(net.network_address + host)

    @property
    def client_subnet(self) -> str:
        return str(self._net4[0])

    @property
    def server_subnet(self) -> str:
        return str(self._net4[1])

    @property
    def client_subnet6(self) -> str:
        return str(self._net6[0])

    @property
    def server_subnet6(self) -> str:
        return str(self._net6[1])

    @property
    def client_ip(self) -> str:
        return self._host(self._net4[0], 1)

    @property
    def server_ip(self) -> str:
        return self._host(self._net4[1], 1)

    @property
    def client_ip6(self) -> str:
        return self._host(self._net6[0], 1)

    @property
    def server_ip6(self) -> str:
        return self._host(self._net6[1], 1)

    def replica_ip(self, k: int = 1, side: str = "client") -> str:
        """Replica k's IPv4 address on the client side or the server side."""
        self._check_replica(k)
        return self._host(self._net4[self._side(side)], 255 - k)

    def replica_ip6(self, k: int = 1, side: str = "client") -> str:
        self._check_replica(k)
        return self._host(self._net6[self._side(side)], 255 - k)

    @staticmethod
    def _side(side: str) -> int:
        if side not in ("client", "server"):
            raise TestbedError(f"bad side {side!r}", hint="use 'client' or 'server'")
        return 0 if side == "client" else 1

    @property
    def client_if(self) -> str:
        """The client's interface carrying client_ip."""
        return f"{self.prefix}cbr" if self.replicas > 1 else f"{self.prefix}c1"

    @property
    def server_if(self) -> str:
        return f"{self.prefix}sbr" if self.replicas > 1 else f"{self.prefix}s1"

    def replica_ifs(self, k: int = 1) -> tuple[str, str]:
        """Replica k's (client-side, server-side) interface names."""
        self._check_replica(k)
        return f"{self.prefix}r{k}c", f"{self.prefix}r{k}s"

    def ns(self, role: str) -> str:
        """Namespace of a role: client, server, replica (= replica 1), replicaK / rK, or a name."""
        if role in ("client", "c", self.client_ns):
            return self.client_ns
        if role in ("server", "s", self.server_ns):
            return self.server_ns
        if role == "replica":
            return self.replica_ns
        m = re.fullmatch(r"(?:replica|r|" + re.escape(self.prefix) + r"r)([0-9]+)", role)
        if m:
            return self.replica_ns_of(int(m.group(1)))
        raise TestbedError(f"unknown role {role!r} in bed {self.prefix}",
                           hint="use client, server, replica, replica2 / r2, ...")

    # -- life cycle
    def __enter__(self) -> "LinearBed":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> "LinearBed":
        """Build the bed (after removing any leftover of ours). On failure, nothing stays."""
        self.down()
        t0 = time.monotonic()
        if self.ipv6 and not _ipv6_available():
            raise TestbedError("IPv6 is disabled in this kernel", hint="pass ipv6=False")
        try:
            self._build()
        except BaseException:
            try:
                self.down()
            except TestbedError as e:  # keep the original error
                log.warning("cleanup after a failed up() also failed: %s", e)
            raise
        self.up_seconds = time.monotonic() - t0
        log.info("bed %s up in %.3f s", self.prefix, self.up_seconds)
        return self

    def _build(self) -> None:
        p, n = self.prefix, self.replicas
        # Sysctls are set before any interface exists, so the `default` values apply to the
        # veths. IPv4 settings of a new netns are inherited from the root namespace (Debian
        # may have rp_filter=2 there), hence all+default.
        common = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
        if self.ipv6:
            common += ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        else:
            common += ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"] \
                if _ipv6_available() else []
        router = ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                  "net.ipv4.conf.default.send_redirects=0"]
        if self.ipv6:
            router += ["net.ipv6.conf.all.forwarding=1"]
        _add_ns(self.client_ns, common)
        _add_ns(self.server_ns, common)
        for r in self.replica_nss:
            _add_ns(r, common + router)

        c, s = self.client_ns, self.server_ns
        for k in range(1, n + 1):
            r = self.replica_ns_of(k)
            rc, rs = self.replica_ifs(k)
            # created directly inside the namespaces: the root namespace never sees them
            _run(["ip", "link", "add", f"{p}c{k}", "netns", c, "type", "veth",
                  "peer", "name", rc, "netns", r])
            _run(["ip", "link", "add", rs, "netns", r, "type", "veth",
                  "peer", "name", f"{p}s{k}", "netns", s])
        if n > 1:
            for ns, br, side in ((c, f"{p}cbr", "c"), (s, f"{p}sbr", "s")):
                _run(["ip", "-n", ns, "link", "add", br, "type", "bridge", "stp_state", "0",
                      "forward_delay", "0"])
                for k in range(1, n + 1):
                    _run(["ip", "-n", ns, "link", "set", f"{p}{side}{k}", "master", br])
                    _run(["ip", "-n", ns, "link", "set", f"{p}{side}{k}", "up"])

        def addr(ns: str, dev: str, side: int, host: int) -> None:
            _run(["ip", "-n", ns, "addr", "add",
                  f"{self._host(self._net4[side], host)}/24", "dev", dev])
            if self.ipv6:
                _run(["ip", "-n", ns, "-6", "addr", "add",
                      f"{self._host(self._net6[side], host)}/64", "dev", dev, "nodad"])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])

        addr(c, self.client_if, 0, 1)
        addr(s, self.server_if, 1, 1)
        for k in range(1, n + 1):
            rc, rs = self.replica_ifs(k)
            addr(self.replica_ns_of(k), rc, 0, 255 - k)
            addr(self.replica_ns_of(k), rs, 1, 255 - k)
        self._set_routes(self.active, "add")
        if self.nfqueue is not None:
            self.set_nfqueue(True)

    def _set_routes(self, k: int, verb: str) -> None:
        _run(["ip", "-n", self.client_ns, "route", verb, "default", "via",
              self.replica_ip(k, "client")])
        _run(["ip", "-n", self.server_ns, "route", verb, "default", "via",
              self.replica_ip(k, "server")])
        if self.ipv6:
            _run(["ip", "-n", self.client_ns, "-6", "route", verb, "default", "via",
                  self.replica_ip6(k, "client")])
            _run(["ip", "-n", self.server_ns, "-6", "route", verb, "default", "via",
                  self.replica_ip6(k, "server")])

    def set_active(self, k: int) -> None:
        """Point the client's and the server's default routes at replica k (a failover)."""
        self._check_replica(k)
        self._set_routes(k, "replace")
        self.active = k

    def down(self) -> None:
        """Stop the processes started by exec() and delete this bed's namespaces (only ours:
        {prefix}c, {prefix}s, {prefix}rN). Idempotent; fine after a crashed run."""
        t0 = time.monotonic()
        for proc in self._procs:
            _stop_popen(proc)
        self._procs.clear()
        for ns in list_namespaces():
            if self._own_ns.match(ns):
                _delete_ns(ns)
        self.down_seconds = time.monotonic() - t0

    # -- running things inside
    def exec(self, ns_role: str, argv: Sequence[str], **popen_kw) -> subprocess.Popen:
        """Start argv inside a namespace (`ip netns exec`); the PID is argv's own (ip execs it).

        down() stops it (SIGTERM, then SIGKILL)."""
        proc = subprocess.Popen(_nsexec(self.ns(ns_role), argv), **popen_kw)
        self._procs.append(proc)
        return proc

    def run(self, ns_role: str, argv: Sequence[str], timeout: float = 10.0,
            check: bool = False, **kw) -> subprocess.CompletedProcess:
        """Run argv inside a namespace to completion, capturing text output."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        proc = subprocess.run(_nsexec(self.ns(ns_role), argv), timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise TestbedError(f"`{' '.join(map(str, argv))}` in {self.ns(ns_role)} failed "
                               f"(exit {proc.returncode})", argv, proc.stderr or "")
        return proc

    def ping(self, src: str = "client", dst: str | None = None, count: int = 3,
             ipv6: bool = False, timeout: float = 15.0) -> bool:
        """ping -c count -i 0.2 -W 1 from a role to an address (default: the server)."""
        if dst is None:
            dst = self.server_ip6 if ipv6 else self.server_ip
        argv = ["ping", "-6" if ipv6 else "-4", "-n", "-q", "-c", str(count), "-i", "0.2",
                "-W", "1", dst]
        return self.run(src, argv, timeout=timeout).returncode == 0

    # -- NFQUEUE
    def _nfq_rule(self) -> list[str]:
        rule = ["FORWARD", "-j", "NFQUEUE", "--queue-num", str(self.nfqueue)]
        return rule + ["--queue-bypass"] if self.queue_bypass else rule

    def set_nfqueue(self, enabled: bool, replica: int | None = None) -> None:
        """Add (idempotent) or remove the FORWARD -j NFQUEUE rule, IPv4 and IPv6, in one replica
        or (None) in all of them."""
        if self.nfqueue is None:
            raise TestbedError(f"bed {self.prefix} has no NFQUEUE number",
                               hint="construct it with nfqueue=<queue number>")
        targets = self.replica_nss if replica is None else [self.replica_ns_of(replica)]
        tools = ["iptables-legacy"] + (["ip6tables-legacy"] if self.ipv6 else [])
        rule = self._nfq_rule()
        for ns in targets:
            for tool in tools:
                # -w: the xtables lock is a file shared by every namespace on the machine
                if enabled:
                    if not self._rule_present(ns, tool, rule):
                        _run(_nsexec(ns, [tool, "-w", "5", "-A", *rule]))
                else:
                    while self._rule_present(ns, tool, rule):
                        _run(_nsexec(ns, [tool, "-w", "5", "-D", *rule]))

    @staticmethod
    def _rule_present(ns: str, tool: str, rule: list[str]) -> bool:
        # `-C` cannot tell "no such rule" from a real error (both: exit 1, "No chain/target/
        # match by that name"), so look for the rule in the `-S` listing instead.
        out = _run(_nsexec(ns, [tool, "-w", "5", "-S", rule[0]])).stdout
        return " ".join(["-A", *rule]) in (line.strip() for line in out.splitlines())

    NFQ_FIELDS = ("queue_num", "portid", "queue_total", "copy_mode", "copy_range",
                  "queue_dropped", "user_dropped", "id_sequence")

    def nfqueue_stats(self, replica: int = 1) -> dict[int, dict[str, int]]:
        """/proc/net/netfilter/nfnetlink_queue read inside a replica's namespace:
        {queue number: {queue_num, portid, queue_total, copy_mode, copy_range, queue_dropped,
        user_dropped, id_sequence}}. Only bound queues are listed; {} when none is."""
        ns = self.replica_ns_of(replica)
        path = "/proc/net/netfilter/nfnetlink_queue"
        proc = _run(_nsexec(ns, ["cat", path]), check=False)
        if proc.returncode != 0:
            if "No such file" in proc.stderr and _ns_exists(ns):
                return {}  # nfnetlink_queue not loaded yet: nothing was ever bound
            raise TestbedError(f"cannot read {path} in {ns}", None, proc.stderr,
                               "is the bed up?")
        return parse_nfqueue_stats(proc.stdout)


def parse_nfqueue_stats(text: str) -> dict[int, dict[str, int]]:
    """Parse the lines of /proc/net/netfilter/nfnetlink_queue."""
    out: dict[int, dict[str, int]] = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < len(LinearBed.NFQ_FIELDS):
            continue
        row = dict(zip(LinearBed.NFQ_FIELDS, map(int, cols)))
        out[row["queue_num"]] = row
    return out


# ---------------------------------------------------------------------------- netns sockets

_CLONE_NEWNET = 0x40000000
_libc = None


def socket_in_netns(ns: str, family: int = socket.AF_INET,
                    type: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket that belongs to a named network namespace (usable from any thread).

    A short-lived thread enters the namespace with setns(2) (only that thread moves), creates
    the socket and ends; a socket stays in the namespace it was created in."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    result: dict = {}

    def work() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result["sock"] = socket.socket(family, type)
        except BaseException as e:  # handed to the caller
            result["err"] = e

    t = threading.Thread(target=work, name=f"netns-{ns}")
    t.start()
    t.join()
    if "err" in result:
        raise TestbedError(f"cannot open a socket in namespace {ns}", None,
                           str(result["err"]), "is the bed up? (needs root)")
    return result["sock"]


def http_get_in_netns(ns: str, port: int, path: str = "/", host: str = "127.0.0.1",
                      timeout: float = 2.0) -> str:
    """GET http://host:port/path from inside a namespace; the body as text."""
    with socket_in_netns(ns) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 200 " not in status + " ":
        raise TestbedError(f"GET http://{host}:{port}{path} in {ns}: {status}")
    return body.decode(errors="replace")


# ---------------------------------------------------------------------------- SwitchedBed

def one_vlan_config(hosts: Mapping[str, int], dpid: int = 1, vid: int = 100,
                    dp_name: str = "sw1") -> str:
    """A minimal faucet.yaml: every host untagged on one VLAN."""
    lines = ["vlans:", "  office:", f"    vid: {vid}", "dps:", f"  {dp_name}:",
             f"    dp_id: {dpid:#x}", '    hardware: "Open vSwitch"', "    interfaces:"]
    for name, port in sorted(hosts.items(), key=lambda kv: kv[1]):
        lines.append(f"      {port}: {{name: {name}, native_vlan: office}}")
    return "\n".join(lines) + "\n"


class SwitchedBed:
    """Hosts on an OVS userspace bridge controlled by Faucet; see the module docstring.

    hosts: {host name: OpenFlow port (1..254)}.
    faucet_config: YAML text (str), a path to a faucet.yaml (os.PathLike, used in place: edit it
        and call reload()), or a callable bed -> YAML text (called at start and at reload()).
    base_dir: private OVS database/run/log dirs and Faucet's files go below it.
    """

    OF_PORT = 6653
    PROM_PORT = 9302

    def __init__(self, hosts: Mapping[str, int], faucet_config, prefix: str,
                 base_dir: str | os.PathLike, index: int = 0, dpid: int = 1,
                 faucet_bin: str | os.PathLike | None = None, ipv6: bool = True):
        _check_prefix(prefix, 5)  # {p}v254, {p}br, {p}sw
        _check_index(index)
        if not hosts:
            raise TestbedError("SwitchedBed needs at least one host")
        ports = list(hosts.values())
        if len(set(ports)) != len(ports):
            raise TestbedError(f"two hosts share an OpenFlow port: {dict(hosts)}")
        for name, port in hosts.items():
            if not _HOST_RE.match(name) or name == "sw" or len(prefix + name) > IFNAMSIZ:
                raise TestbedError(f"bad host name {name!r}", hint="lowercase letters/digits, "
                                   "starting with a letter, not 'sw', prefix+name <= 15 chars")
            if not (isinstance(port, int) and 1 <= port <= 254):
                raise TestbedError(f"host {name}: bad OpenFlow port {port!r}", hint="use 1..254")
        if not (0 < dpid < 1 << 64):
            raise TestbedError(f"bad datapath id {dpid!r}")
        if isinstance(faucet_config, str) and "\n" not in faucet_config and \
                faucet_config.strip().endswith((".yaml", ".yml")):
            raise TestbedError(f"faucet_config {faucet_config!r} looks like a file name, but a "
                               "str is taken as YAML text", hint="pass pathlib.Path(...) to use "
                               "a file")
        self.hosts = dict(hosts)
        self.prefix = prefix
        self.index = index
        self.dpid = dpid
        self.ipv6 = ipv6
        self.faucet_config = faucet_config
        self.base_dir = Path(base_dir).resolve()
        self.ovs_dir = self.base_dir / "ovs"
        self.run_dir = self.ovs_dir / "run"
        self.log_dir = self.ovs_dir / "log"
        self.db_dir = self.ovs_dir / "db"
        self.faucet_dir = self.base_dir / "faucet"
        if isinstance(faucet_config, os.PathLike):
            self.config_path = Path(faucet_config).resolve()
        else:
            self.config_path = self.faucet_dir / "faucet.yaml"
        self.event_sock = self.faucet_dir / "event.sock"
        self.faucet_log = self.faucet_dir / "faucet.log"
        self.faucet_exception_log = self.faucet_dir / "faucet_exception.log"
        self.faucet_stdout = self.faucet_dir / "faucet.stdout"
        self.faucet_pidfile = self.faucet_dir / "faucet.pid"
        self.bridge = f"{prefix}br"
        self.switch_ns = f"{prefix}sw"
        self.of_port = self.OF_PORT
        self.prom_port = self.PROM_PORT
        self._faucet_bin = Path(faucet_bin) if faucet_bin else None
        self._faucet: subprocess.Popen | None = None
        self._faucet_out = None
        self._procs: list[subprocess.Popen] = []
        self.started_pids: dict[str, int] = {}
        self.start_seconds: float | None = None
        self.dp_up_seconds: float | None = None
        self.stop_seconds: float | None = None
        self._net4 = ipaddress.ip_network(f"10.{200 + index}.2.0/24")
        self._net6 = ipaddress.ip_network(
            (int(ipaddress.IPv6Address(f"fd00:{index:x}::")) + (2 << 64), 64))

    # -- names and addresses
    def _port(self, host: str) -> int:
        try:
            return self.hosts[host]
        except KeyError:
            raise TestbedError(f"no host {host!r} in bed {self.prefix}",
                               hint=f"hosts are {sorted(self.hosts)}") from None

    def host_ns(self, host: str) -> str:
        self._port(host)
        return f"{self.prefix}{host}"

    def port_name(self, host: str) -> str:
        """The switch-side veth (an OVS port, in the switch namespace)."""
        return f"{self.prefix}v{self._port(host)}"

    def host_ip(self, host: str) -> str:
        return str(self._net4.network_address + self._port(host))

    def host_ip6(self, host: str) -> str:
        return str(self._net6.network_address + self._port(host))

    def host_mac(self, host: str) -> str:
        return f"0e:00:{self.index:02x}:00:00:{self._port(host):02x}"

    @property
    def subnet(self) -> str:
        return str(self._net4)

    @property
    def subnet6(self) -> str:
        return str(self._net6)

    @property
    def namespaces(self) -> list[str]:
        return [self.switch_ns, *(self.host_ns(h) for h in self.hosts)]

    @property
    def ovs_env(self) -> dict[str, str]:
        """Environment for ovs-* commands: every OVS path points into base_dir."""
        return {**os.environ, "OVS_RUNDIR": str(self.run_dir), "OVS_LOGDIR": str(self.log_dir),
                "OVS_DBDIR": str(self.db_dir), "OVS_SYSCONFDIR": str(self.ovs_dir / "etc")}

    @property
    def db_sock(self) -> Path:
        return self.run_dir / "db.sock"

    def _ctl(self, daemon: str) -> Path:
        return self.run_dir / f"{daemon}.ctl"

    def _pidfile(self, daemon: str) -> Path:
        return self.run_dir / f"{daemon}.pid"

    # -- OVS helpers (checked)
    def vsctl(self, *args: str, timeout: float = 20.0) -> str:
        return _run(["ovs-vsctl", f"--db=unix:{self.db_sock}", "--timeout=10", *args],
                    env=self.ovs_env, timeout=timeout, hint=self._ovs_hint()).stdout

    def ofctl(self, cmd: str, *args: str) -> str:
        """ovs-ofctl -O OpenFlow13 <cmd> <this bridge> args..."""
        return _run(["ovs-ofctl", "-O", "OpenFlow13", cmd,
                     f"unix:{self.run_dir / (self.bridge + '.mgmt')}", *args],
                    env=self.ovs_env, hint=self._ovs_hint()).stdout

    def appctl(self, daemon: str, *args: str) -> str:
        return _run(["ovs-appctl", "-t", str(self._ctl(daemon)), *args], env=self.ovs_env,
                    hint=self._ovs_hint()).stdout

    def _ovs_hint(self) -> str:
        return f"read the OVS logs in {self.log_dir}; openvswitch-switch must be installed"

    # -- life cycle
    def __enter__(self) -> "SwitchedBed":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, wait: bool = True, timeout: float = 30.0) -> "SwitchedBed":
        """Remove our leftovers, start OVS and Faucet, attach the hosts; with wait, return when
        Faucet reports the datapath up. On failure, everything started is stopped again."""
        self.stop()
        t0 = time.monotonic()
        try:
            self._start()
            self.start_seconds = time.monotonic() - t0
            if wait:
                self.wait_dp_up(timeout)
        except BaseException:
            try:
                self.stop()
            except TestbedError as e:
                log.warning("cleanup after a failed start() also failed: %s", e)
            raise
        return self

    up = start

    def _start(self) -> None:
        if self.ipv6 and not _ipv6_available():
            raise TestbedError("IPv6 is disabled in this kernel", hint="pass ipv6=False")
        faucet_bin = self._find_faucet()
        for d in (self.run_dir, self.log_dir, self.db_dir, self.ovs_dir / "etc", self.faucet_dir):
            d.mkdir(parents=True, exist_ok=True)
        for sock in (self.db_sock, self._ctl("ovs-vswitchd"), self.event_sock,
                     self.run_dir / f"{self.bridge}.mgmt"):
            if len(str(sock)) > 100:
                raise TestbedError(f"unix socket path too long ({len(str(sock))} > 100): {sock}",
                                   hint="use a shorter base_dir")
        # The switch namespace: no IPv6 on the switch ports (they carry only host traffic).
        sw_sysctls = (["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
                      if _ipv6_available() else [])
        _add_ns(self.switch_ns, sw_sysctls)
        self._start_ovs()
        self._write_config()
        self._start_faucet(faucet_bin)  # its 1.5 s start-up overlaps with the host set-up
        for host in self.hosts:
            self._add_host(host)
        args = ["--", "add-br", self.bridge, "--", "set", "bridge", self.bridge,
                "datapath_type=netdev", f"other-config:datapath-id={self.dpid:016x}",
                "protocols=OpenFlow13", "fail_mode=secure"]
        for host, port in sorted(self.hosts.items(), key=lambda kv: kv[1]):
            name = self.port_name(host)
            args += ["--", "add-port", self.bridge, name, "--", "set", "interface", name,
                     f"ofport_request={port}"]
        self.vsctl(*args)
        # max_backoff=1000: reconnect every 1 s (the default backs off to 8 s).
        # out-of-band: the controller is on loopback, no in-band flows or route lookups.
        self.vsctl("set-controller", self.bridge, f"tcp:127.0.0.1:{self.of_port}", "--", "set",
                   "controller", self.bridge, "max_backoff=1000", "inactivity_probe=5000",
                   "connection_mode=out-of-band")

    def _find_faucet(self) -> Path:
        cands = [self._faucet_bin] if self._faucet_bin else [
            Path(sys.executable).parent / "faucet",
            Path(shutil.which("faucet") or "/nonexistent")]
        for c in cands:
            if c and c.is_file() and os.access(c, os.X_OK):
                if not (c.parent / "osken-manager").exists():
                    raise TestbedError(f"{c} found but no osken-manager next to it",
                                       hint="faucet execs osken-manager from PATH; install "
                                            "faucet into that venv (make setup)")
                return c
        raise TestbedError("faucet not found", hint="install the net extra: "
                           ".venv/bin/pip install -e '.[net]' (make setup)")

    def _start_ovs(self) -> None:
        db = self.db_dir / "conf.db"
        db.unlink(missing_ok=True)
        env = self.ovs_env
        _run(["ovsdb-tool", "create", db, "/usr/share/openvswitch/vswitch.ovsschema"], env=env,
             hint=self._ovs_hint())
        # Both daemons run inside the switch namespace, so the netdev datapath's tap devices
        # (ovs-netdev, the bridge) and the switch ends of the veths are private to this bed.
        _run(_nsexec(self.switch_ns, [
            "ovsdb-server", db, f"--remote=punix:{self.db_sock}",
            "--remote=db:Open_vSwitch,Open_vSwitch,manager_options",
            f"--pidfile={self._pidfile('ovsdb-server')}", f"--unixctl={self._ctl('ovsdb-server')}",
            f"--log-file={self.log_dir / 'ovsdb-server.log'}", "--detach"]),
            env=env, hint=self._ovs_hint())
        self.started_pids["ovsdb-server"] = self._read_pid(self._pidfile("ovsdb-server"))
        self.vsctl("--no-wait", "init")
        _run(_nsexec(self.switch_ns, [
            "ovs-vswitchd", f"unix:{self.db_sock}", f"--pidfile={self._pidfile('ovs-vswitchd')}",
            f"--unixctl={self._ctl('ovs-vswitchd')}",
            f"--log-file={self.log_dir / 'ovs-vswitchd.log'}", "--detach"]),
            env=env, hint=self._ovs_hint())
        self.started_pids["ovs-vswitchd"] = self._read_pid(self._pidfile("ovs-vswitchd"))

    @staticmethod
    def _read_pid(path: Path) -> int:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            raise TestbedError(f"no PID in {path}", hint="the daemon did not start; read its "
                               "log") from None

    def _add_host(self, host: str) -> None:
        ns, port = self.host_ns(host), self.port_name(host)
        sysctls = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
        if self.ipv6:
            sysctls += ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        _add_ns(ns, sysctls)
        _run(["ip", "link", "add", port, "netns", self.switch_ns, "type", "veth",
              "peer", "name", "eth0", "address", self.host_mac(host), "netns", ns])
        _run(["ip", "-n", ns, "addr", "add", f"{self.host_ip(host)}/24", "dev", "eth0"])
        if self.ipv6:
            _run(["ip", "-n", ns, "-6", "addr", "add", f"{self.host_ip6(host)}/64", "dev", "eth0",
                  "nodad"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        # The netdev datapath reads veths through AF_PACKET and never fills in offloaded
        # checksums: without this, TCP through the bridge fails (bad checksums).
        _run(_nsexec(ns, ["ethtool", "-K", "eth0", "tx", "off"]))
        _run(["ip", "-n", self.switch_ns, "link", "set", port, "up"])

    def _write_config(self) -> None:
        cfg = self.faucet_config
        if isinstance(cfg, os.PathLike):
            if not self.config_path.is_file():
                raise TestbedError(f"faucet config {self.config_path} does not exist")
            return
        text = cfg(self) if callable(cfg) else cfg
        if not isinstance(text, str):
            raise TestbedError(f"faucet config provider returned {type(text).__name__}",
                               hint="return the YAML text")
        tmp = self.config_path.with_suffix(".yaml.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)  # faucet must never read a half-written file

    def faucet_env(self, venv_bin: Path) -> dict[str, str]:
        return {**os.environ,
                "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
                "FAUCET_CONFIG": str(self.config_path), "FAUCET_LOG": str(self.faucet_log),
                "FAUCET_EXCEPTION_LOG": str(self.faucet_exception_log),
                "FAUCET_EVENT_SOCK": str(self.event_sock),
                "FAUCET_PROMETHEUS_PORT": str(self.prom_port),
                "FAUCET_PROMETHEUS_ADDR": "127.0.0.1"}

    def _start_faucet(self, faucet_bin: Path) -> None:
        self.event_sock.unlink(missing_ok=True)
        self._faucet_out = open(self.faucet_stdout, "wb")
        # `ip netns exec` execs faucet, which execs osken-manager: one PID throughout.
        self._faucet = subprocess.Popen(
            _nsexec(self.switch_ns, [faucet_bin, "--ryu-ofp-listen-host=127.0.0.1",
                                     f"--ryu-ofp-tcp-listen-port={self.of_port}"]),
            env=self.faucet_env(faucet_bin.parent), stdout=self._faucet_out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.faucet_pidfile.write_text(f"{self._faucet.pid}\n")
        self.started_pids["faucet"] = self._faucet.pid

    @property
    def faucet_pid(self) -> int | None:
        return self._faucet.pid if self._faucet is not None else None

    def metrics(self, timeout: float = 2.0) -> str:
        """Faucet's Prometheus text (port 9302 of the switch namespace)."""
        return http_get_in_netns(self.switch_ns, self.prom_port, timeout=timeout)

    def dp_is_up(self) -> bool:
        return self._dp_state() == "up"

    def _dp_state(self) -> str:
        """'up', 'config error' (Faucet rejected its config) or 'down'."""
        try:
            text = self.metrics()
        except (OSError, TestbedError):
            return "down"
        if re.search(rf'^dp_status{{[^}}]*dp_id="{self.dpid:#x}"[^}}]*}} 1\.0$', text, re.M):
            return "up"
        if re.search(r"^faucet_config_load_error 1\.0$", text, re.M):
            return "config error"
        return "down"

    def wait_dp_up(self, timeout: float = 30.0) -> float:
        """Poll Faucet's dp_status metric (OVS's is_connected lags ~5 s); seconds waited."""
        t0 = time.monotonic()
        while True:
            if self._faucet is not None and self._faucet.poll() is not None:
                raise TestbedError(f"faucet exited with {self._faucet.returncode}",
                                   stderr=self._log_tails(),
                                   hint=f"check the config {self.config_path} with "
                                        "check_faucet_config")
            state = self._dp_state()
            if state == "config error":
                raise TestbedError(f"faucet rejected its config {self.config_path}",
                                   stderr=self._log_tails(),
                                   hint="run check_faucet_config on it and fix the error")
            if state == "up":
                self.dp_up_seconds = time.monotonic() - t0
                log.info("bed %s: datapath %#x up after %.2f s", self.prefix, self.dpid,
                         self.dp_up_seconds)
                return self.dp_up_seconds
            if time.monotonic() - t0 > timeout:
                raise TestbedError(f"faucet did not report datapath {self.dpid:#x} up within "
                                   f"{timeout} s", stderr=self._log_tails(),
                                   hint="is the dp_id in the faucet config equal to the bed's "
                                        f"dpid ({self.dpid:#x})? read the logs in "
                                        f"{self.base_dir}")
            time.sleep(0.1)

    def _log_tails(self, lines: int = 12) -> str:
        out = []
        for f in (self.faucet_exception_log, self.faucet_log, self.log_dir / "ovs-vswitchd.log",
                  self.faucet_stdout):
            try:
                text = f.read_text(errors="replace").splitlines()
            except OSError:
                continue
            # faucet's stdout is mostly the access log of our own metric polls
            tail = [t for t in text if "GET /" not in t and "accepted (" not in t][-lines:]
            if tail:
                out.append(f"--- {f}:\n" + "\n".join(tail))
        return "\n".join(out)

    def poke(self) -> None:
        """Wake Faucet's eventlet hub (it acts on signals only at its next wakeup)."""
        try:
            self.metrics(timeout=1.0)
        except (OSError, TestbedError):
            pass

    def reload(self, config_text: str | None = None) -> None:
        """Rewrite the config (config_text, or the provider's new output) then SIGHUP Faucet and
        poke it: a warm reload takes effect in tens of ms instead of up to ~1.7 s."""
        if self._faucet is None or self._faucet.poll() is not None:
            raise TestbedError("faucet is not running", hint="start() the bed first")
        if config_text is not None:
            if isinstance(self.faucet_config, os.PathLike):
                raise TestbedError("this bed uses a config file: edit it, then reload()")
            self.faucet_config = config_text
        self._write_config()
        os.kill(self._faucet.pid, signal.SIGHUP)
        self.poke()

    # -- running things in hosts
    def exec(self, host: str, argv: Sequence[str], **popen_kw) -> subprocess.Popen:
        """Start argv inside a host's namespace; stop() stops it."""
        proc = subprocess.Popen(_nsexec(self.host_ns(host), argv), **popen_kw)
        self._procs.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[str], timeout: float = 10.0, check: bool = False,
            **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        proc = subprocess.run(_nsexec(self.host_ns(host), argv), timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise TestbedError(f"`{' '.join(map(str, argv))}` in {self.host_ns(host)} failed "
                               f"(exit {proc.returncode})", argv, proc.stderr or "")
        return proc

    def ping(self, src: str, dst: str, count: int = 3, ipv6: bool = False) -> bool:
        addr = self.host_ip6(dst) if ipv6 else self.host_ip(dst)
        argv = ["ping", "-6" if ipv6 else "-4", "-n", "-q", "-c", str(count), "-i", "0.2",
                "-W", "1", addr]
        return self.run(src, argv, timeout=15).returncode == 0

    def stop(self) -> None:
        """Stop Faucet and OVS (by PID), delete the bridge and every namespace of this bed.

        Idempotent; also cleans up after a crashed run with the same prefix and base_dir
        (PIDs from the pid files are only killed if they still point into base_dir)."""
        t0 = time.monotonic()
        survivors: list[int] = []
        for proc in self._procs:
            _stop_popen(proc)
        self._procs.clear()
        # Faucet: SIGTERM is only acted on at the next hub wakeup, so poke it.
        if self._faucet is not None:
            if self._faucet.poll() is None:
                self._faucet.terminate()
                self.poke()
                try:
                    self._faucet.wait(3)
                except subprocess.TimeoutExpired:
                    self._faucet.kill()
                    self._faucet.wait(5)
            self._faucet = None
        elif self.faucet_pidfile.exists():
            pid = self._pid_from(self.faucet_pidfile, str(self.config_path))
            if pid:  # a leftover of a crashed run
                os.kill(pid, signal.SIGTERM)
                self.poke()
                if _wait_gone([pid], 3.0):
                    survivors += _kill_pids([pid])
        if self._faucet_out is not None:
            self._faucet_out.close()
            self._faucet_out = None
        self.faucet_pidfile.unlink(missing_ok=True)
        # OVS: remove the bridge, then ask each daemon to exit (--cleanup deletes the datapath
        # and its tap devices), SIGTERM/SIGKILL by PID if it does not go.
        vswitchd = self._pid_from(self._pidfile("ovs-vswitchd"), str(self.run_dir))
        ovsdb = self._pid_from(self._pidfile("ovsdb-server"), str(self.run_dir))
        if ovsdb and vswitchd and self.db_sock.exists():
            _run(["ovs-vsctl", f"--db=unix:{self.db_sock}", "--timeout=5", "--if-exists",
                  "del-br", self.bridge], env=self.ovs_env, check=False, timeout=10)
        for daemon, pid, extra in (("ovs-vswitchd", vswitchd, ["--cleanup"]),
                                   ("ovsdb-server", ovsdb, [])):
            if pid:
                _run(["ovs-appctl", "-t", self._ctl(daemon), "exit", *extra], env=self.ovs_env,
                     check=False, timeout=10)
                if _wait_gone([pid], 3.0):
                    survivors += _kill_pids([pid])
            self._pidfile(daemon).unlink(missing_ok=True)
        # Namespaces last: anything still inside (e.g. started with ip netns exec by a test)
        # is killed by PID first.
        for ns in [*(self.host_ns(h) for h in self.hosts), self.switch_ns]:
            _delete_ns(ns)
        left = [p for p in (*self.started_pids.values(), *survivors) if _pid_alive(p)]
        self.started_pids = {}
        self.stop_seconds = time.monotonic() - t0
        if left:
            raise TestbedError(f"bed {self.prefix}: processes {left} still running after stop()",
                               hint="kill them by PID and report a bug")

    down = stop

    @staticmethod
    def _pid_from(pidfile: Path, needle: str) -> int | None:
        """The PID in a pid file if that process is alive and still ours (mentions needle)."""
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) and _pid_matches(pid, needle) else None
