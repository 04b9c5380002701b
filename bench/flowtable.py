"""pico-bench flowtable: the cost of one get_flow + put_flow pair, Python and C, at 1,000 and
1,000,000 flows, beside the raw cost of one semaphore acquire + release in the same run.

A real pico-smm owns the table; the flows are created by the C tool (`flowtool fill`), then each
binding times get_flow(create=False) + put_flow(modified=True) on keys spread over the table.
Every pair takes and releases the flow's lock stripe once, so the semaphore pair is the floor.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import posix_ipc

from bench.report import percentiles, result

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tests" / "c" / "build" / "flowtool"


def build_tools() -> None:
    for d in ("shared", "tests/c"):
        subprocess.run(["make", "-s", "-C", str(REPO / d)], check=True)


def bench_key(i: int) -> bytes:
    """The key flowtool's fill/bench derive from index i (tests/c/flowtool.c header)."""
    from shared.flowkey import make_key
    return make_key(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 1000 + i % 50000,
                    "192.168.0.1", 80, 6)


def write_config(tmp: Path, flows: int) -> Path:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"bench{os.getpid() % 100000}f{flows}"
    path = tmp / f"{name}.yaml"
    path.write_text(f"""version: 1
cluster: {{name: {name}, shm_prefix: picob}}
flow_table: {{capacity: {flows}, state_size: 64, lock_stripes: 1024, lock_timeout_ms: 5000}}
replicas:
  r1: {{id: 1, smm_endpoint: "tcp://127.0.0.1:{port}"}}
""")
    return path


class Smm:
    def __init__(self, config_path: Path, log: Path):
        from shared.config import load_config
        from shared.control import wait_until_serving
        self.config = load_config(config_path)
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "smm", "--config", str(config_path),
                                      "--replica", "r1"], cwd=REPO, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        wait_until_serving(self.config.replica("r1").smm_endpoint, self.proc, 60, "pico-smm")
        c = self.config.cluster
        self.segment = f"/{c.shm_prefix}.{c.name}.r1.flows"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def python_pairs(segment: str, flows: int, samples: int) -> list[int]:
    from shared.api import attach
    rng = random.Random(1)
    keys = [bench_key(rng.randrange(flows)) for _ in range(samples)]
    clock = time.perf_counter_ns
    out = [0] * samples
    with attach(segment) as mb:
        get, put = mb.get_flow, mb.put_flow
        for k in keys[:1000]:  # warm up
            get(k)
            put(k)
        for i, k in enumerate(keys):
            t0 = clock()
            get(k)
            put(k, True)
            out[i] = clock() - t0
    return out


def python_sem_pairs(samples: int) -> list[int]:
    name = f"/pico-bench-sem-{os.getpid()}"
    sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=1)
    sem.unlink()
    acquire, release, clock = sem.acquire, sem.release, time.perf_counter_ns
    out = [0] * samples
    try:
        for i in range(samples):
            t0 = clock()
            acquire(5.0)   # the same timed acquire the flow locks use
            release()
            out[i] = clock() - t0
    finally:
        sem.close()
    return out


def c_run(*args: str) -> dict:
    r = subprocess.run([str(TOOL), *args], capture_output=True, text=True, check=True,
                       timeout=600)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(quick: bool) -> list[dict]:
    build_tools()
    samples = 20_000 if quick else 200_000
    results = []
    with tempfile.TemporaryDirectory(prefix="pico-bench-") as tmp:
        for flows in (1_000, 1_000_000):
            smm = Smm(write_config(Path(tmp), flows), Path(tmp) / f"smm-{flows}.log")
            try:
                c_run(smm.segment, "fill", str(flows))
                py = percentiles(python_pairs(smm.segment, flows, samples))
                py_sem = percentiles(python_sem_pairs(samples))
                c = c_run(smm.segment, "bench", str(samples), str(flows))
                c_sem = c_run("-", "sem-bench", str(samples))
            finally:
                smm.stop()
            for p in (50, 99):
                results.append(result(f"python get+put p{p} @{flows} flows", py[p], "ns",
                                      py_sem[p], f"python sem acquire+release p{p}",
                                      flows=flows, samples=samples))
            for p in (50, 99):
                results.append(result(f"c get+put p{p} @{flows} flows", c[f"p{p}_ns"], "ns",
                                      c_sem[f"p{p}_ns"], f"c sem_wait+sem_post p{p}",
                                      flows=flows, samples=samples))
    return results
