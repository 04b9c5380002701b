"""Shared fixtures: throw-away cluster configs, real SMM processes, cleanup by PID and name."""
from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.config import load_config  # noqa: E402

SHM_PREFIX = "picot"
_names = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, *, replicas: int = 2, capacity: int = 4096, state_size: int = 64,
                 stripes: int = 64, lock_timeout_ms: int = 500, max_message_bytes: int = 1 << 20,
                 heartbeat_ms: int = 50, metrics: bool = False, extra: str = "",
                 request_timeout_ms: int = 2000, rm_endpoints: bool = False,
                 controller: str | None = None):
    """A cluster YAML with a unique name and free loopback ports; returns the loaded config."""
    name = f"t{os.getpid() % 100000}x{next(_names)}"
    lines = ["version: 1", "cluster:", f"  name: {name}", f"  shm_prefix: {SHM_PREFIX}",
             "flow_table:", f"  capacity: {capacity}", f"  state_size: {state_size}",
             f"  lock_stripes: {stripes}", f"  lock_timeout_ms: {lock_timeout_ms}",
             "control:", f"  max_message_bytes: {max_message_bytes}",
             f"  request_timeout_ms: {request_timeout_ms}",
             f"  heartbeat_interval_ms: {heartbeat_ms}",
             *([f"  controller_endpoint: {controller}"] if controller else []),
             "replicas:"]
    for i in range(1, replicas + 1):
        lines += [f"  r{i}:", f"    id: {i}", f"    smm_endpoint: tcp://127.0.0.1:{free_port()}"]
        if metrics:
            lines.append(f"    metrics_port: {free_port()}")
        if rm_endpoints:
            lines.append(f"    rm_endpoint: tcp://127.0.0.1:{free_port()}")
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return load_config(path)


class SmmProcess:
    """A real pico-smm child process, stopped by PID."""

    def __init__(self, config, replica: str, log_path: Path):
        self.config = config
        self.replica = replica
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smm", "--config", str(config.path), "--replica", replica],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        self.endpoint = config.replica(replica).smm_endpoint
        self._wait_ready()

    def _wait_ready(self, timeout: float = 15.0) -> None:
        from shared.control import wait_until_serving
        try:
            wait_until_serving(self.endpoint, self.proc, timeout, what="pico-smm")
        except Exception:
            if self.proc.poll() is None:  # not serving in time: never leave it running
                self.proc.kill()
                self.proc.wait()
            self._log.close()
            raise RuntimeError(f"pico-smm did not start: {self.log_path.read_text()}") from None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def cluster(tmp_path):
    """A small two-replica config (unique names, free ports)."""
    return write_config(tmp_path)


@pytest.fixture
def smm_factory(tmp_path):
    started: list[SmmProcess] = []

    def start(config, replica: str = "r1") -> SmmProcess:
        p = SmmProcess(config, replica, tmp_path / f"smm-{replica}-{len(started)}.log")
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture(scope="session", autouse=True)
def _remove_test_segments():
    """Leftovers of a crashed test run (our prefix only) are removed before and after."""
    def sweep():
        for f in Path("/dev/shm").glob(f"*{SHM_PREFIX}.t{os.getpid() % 100000}x*"):
            f.unlink(missing_ok=True)
    sweep()
    yield
    sweep()


def needs_root():
    return pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_NET_ADMIN, network "
                              "namespaces); CI runs as root")


@pytest.fixture(scope="session")
def cbuild() -> Path:
    """Build libpico and the C test tools once; their directory."""
    import shutil
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler (gcc) on PATH: install gcc (make setup) to test the C ABI")
    for target in (REPO / "shared", REPO / "tests" / "c"):
        proc = subprocess.run(["make", "-C", str(target)], capture_output=True, text=True)
        assert proc.returncode == 0, (f"make -C {target} failed:\n{proc.stdout}\n{proc.stderr}")
    return REPO / "tests" / "c" / "build"


PACKET_GROUPS = ("packets: {ring_slots: 16}\n"
                 "groups: {web: {id: 1, target: r2}, dns: {id: 2, target: r2, buffering: false}}\n"
                 "policies: [{group: web, proto: tcp, dport: 80}, {group: dns, proto: udp, dport: 53}]\n")


@pytest.fixture
def packet_bed(tmp_path):
    """A PMM's packet segment in this process, without NFQUEUE: (store, ingress, releaser,
    group control, config, known flows). Groups: web (1, buffered), dns (2, unbuffered)."""
    from pmm.classify import Classifier
    from pmm.core import Ingress, Releaser
    from pmm.store import PacketStore
    from shared.packets import GroupControl
    cfg = write_config(tmp_path, extra=PACKET_GROUPS, request_timeout_ms=300)
    store = PacketStore(cfg, "r1")
    known: dict = {}
    ingress = Ingress(store.seg, Classifier(cfg), lambda key, h: known.get(key))
    ctl = GroupControl(store.seg)
    yield store, ingress, Releaser(store.seg), ctl, cfg, known
    ctl.close()
    store.close()
