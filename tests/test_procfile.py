"""A replica started the documented way: `honcho start` with the Procfile and an env file.
Traffic crosses its PMM, its RM commits to the backup, and when one process dies the replica
stops whole (fate-sharing)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nettools import REPO, UDP_SEND, UDP_SINK, py, spawn
from shared.segment import process_alive

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces and "
                                 "NFQUEUE; CI runs as root")]

EXTRA = """groups:
  web: {id: 1, target: r2, frequency_hz: 200, buffering: true}
policies:
  - {group: web, proto: udp, dport: 7001}
"""


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below pid (honcho forks a worker per process)."""
    parent, cmd = {}, {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            parent[int(p.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            cmd[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
    out, todo = {}, [pid]
    while todo:
        me = todo.pop()
        for child, par in parent.items():
            if par == me and child not in out:
                out[child] = cmd[child]
                todo.append(child)
    return out


def test_honcho_runs_a_replica_that_fails_whole(tmp_path, smm_factory):
    from conftest import write_config
    from sdn.testbed import LinearBed
    cfg = write_config(tmp_path, extra=EXTRA)
    smm_factory(cfg, "r2")  # the backup, outside this replica
    bed = LinearBed(f"hp{os.getpid() % 100}", index=50 + os.getpid() % 6, nfqueue=1)
    bed.up()
    env_file = tmp_path / "r1.env"
    env_file.write_text("\n".join([
        f"PICO_CONFIG={cfg.path}", "PICO_REPLICA=r1", f"PICO_CLUSTER={cfg.cluster.name}",
        f"PICO_SHM_PREFIX={cfg.cluster.shm_prefix}", f"PICO_NETNS={bed.replica_ns}",
        f"PICO_BIN={Path(sys.executable).parent}",
        f"PICO_MIDDLEBOX=\"{sys.executable} examples/passthrough.py\"", "PYTHONUNBUFFERED=1", ""]))
    honcho = subprocess.Popen([str(Path(sys.executable).parent / "honcho"), "start", "-f",
                               str(REPO / "Procfile"), "-e", str(env_file)], cwd=REPO,
                              stdout=open(tmp_path / "honcho.log", "w"), stderr=subprocess.STDOUT)
    try:
        _, lines = spawn(bed, "server", py(UDP_SINK, bed.server_ip, 7001))
        lines.expect("listening")
        # Datagrams of a protected group leave only after the RM's commit: their arrival
        # shows the SMM, PMM, RM and middlebox all running. Retried until the replica is up.
        deadline = time.monotonic() + 20
        while not any(x.startswith("p ") for x in lines.seen):
            assert time.monotonic() < deadline, (tmp_path / "honcho.log").read_text()[-3000:]
            bed.run("client", py(UDP_SEND, bed.server_ip, 7001, "p", 3, 0.01), timeout=30)
            lines.drain(quiet=0.5)
        procs = {pid: c for pid, c in descendants(honcho.pid).items()
                 if any(w in c for w in ("-m smm", "pico-smm", "pico-pmm", "pico-rm",
                                         "passthrough"))}
        assert len(procs) == 4, procs
        mb = next((pid for pid, cmd in procs.items() if "passthrough" in cmd), None)
        assert mb, procs
        os.kill(mb, signal.SIGKILL)                    # one process of the replica dies...
        assert honcho.wait(30) != 0                   # ...and honcho stops the rest
        for pid in procs:
            assert not process_alive(pid), procs[pid]
        shm = f"{cfg.cluster.shm_prefix}.{cfg.cluster.name}.r1"
        assert not (Path("/dev/shm") / f"{shm}.flows").exists()  # stopped cleanly, not killed
        assert not (Path("/dev/shm") / f"{shm}.pkts").exists()
    finally:
        if honcho.poll() is None:
            honcho.terminate()
            honcho.wait(30)
        for pid in descendants(honcho.pid):
            os.kill(pid, signal.SIGKILL)
        bed.down()
