"""pico-demo: the main job on the embedded default cluster (configs/demo.yaml).

Until the PMM, RM and SDN issues land, the demo is a smoke run of the foundation with real
processes: it starts the SMMs of two replicas, lets a middlebox on the first create and update
flows through the shared-memory API, ships their state to the second replica's SMM as standby
records (what the RM will do every epoch), fails the first replica over to the second by
activating the standby flows, and checks the second sees exactly the state the first wrote.
"""
from __future__ import annotations

import argparse
import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

from shared import log as pico_log
from shared import wire
from shared.api import attach_replica
from shared.config import DEFAULT_CONFIG, load_config
from shared.control import ControlClient, wait_until_serving
from shared.errors import PicoError
from shared.flowkey import describe, make_key

REPO = Path(__file__).resolve().parents[1]


def start_smm(config_path: str, replica: str, endpoint: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "smm", "--config", config_path,
                             "--replica", replica], cwd=REPO)
    wait_until_serving(endpoint, proc, 60, f"pico-smm {replica}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(config_path: str, flows: int) -> int:
    log = pico_log.get_logger("demo")
    cfg = load_config(config_path)
    names = list(cfg.replicas)
    if len(names) < 2:
        raise PicoError(f"{config_path}: the demo needs two replicas, the config has {len(names)}")
    primary, backup = cfg.replica(names[0]), cfg.replica(names[1])
    group = next((g for g in cfg.groups.values() if g.target == backup.name), None)
    group_id = group.id if group else 1
    procs = []
    try:
        for r in (primary, backup):
            procs.append(start_smm(config_path, r.name, r.smm_endpoint))
            log.info(f"pico-smm {r.name} up (pid {procs[-1].pid}) on {r.smm_endpoint}")
        keys = [make_key(f"10.0.{i // 250}.{i % 250 + 1}", 40000 + i, "192.0.2.10", 80, 6)
                for i in range(flows)]
        t0 = time.perf_counter()
        with attach_replica(cfg, primary.name, name="demo-middlebox") as mb:
            for n, k in enumerate(keys):   # a packet counter per flow, three packets each
                for _ in range(3):
                    st = mb.get_flow(k, create=True, group=group_id)
                    struct.pack_into("<Q", st, 0, struct.unpack_from("<Q", st)[0] + 1)
                    mb.put_flow(k, modified=True)
            elapsed = time.perf_counter() - t0
            log.info(f"middlebox on {primary.name}: {flows} flows x 3 transactions in "
                     f"{elapsed * 1000:.1f} ms")
            records = []
            for k in keys:
                st = mb.get_flow(k)
                records.append((k, wire.OP_UPSERT, 3, bytes(st)))
                mb.put_flow(k, modified=False)
        with ControlClient(backup.smm_endpoint) as c:
            body = wire.encode_install(primary.id, group_id, 1, 0, cfg.flow_table.state_size,
                                       records)
            ack = wire.INSTALL_REPLY.unpack(c.request(wire.INSTALL, body).body)
            log.info(f"checkpoint epoch 1 of group {group_id}: {ack[3]} standby records "
                     f"installed on {backup.name}, acked epoch {ack[2]}")
            stop(procs[0])
            log.info(f"{primary.name} stopped: failing over to {backup.name}")
            reply = c.request(wire.ACTIVATE, wire.encode_activate(wire.SEL_REPLICA, primary.id))
            activated = wire.decode_key_list(reply.body)
            stats = json.loads(c.request(wire.STATS).body)
        with attach_replica(cfg, backup.name, name="demo-middlebox") as mb:
            bad = 0
            for k in keys:
                st = mb.get_flow(k)
                if st is None or struct.unpack_from("<Q", st)[0] != 3:
                    bad += 1
                if st is not None:
                    mb.put_flow(k, modified=False)
        ok = len(activated) == flows and bad == 0
        print(f"demo: {len(activated)}/{flows} flows activated on {backup.name}; "
              f"{flows - bad}/{flows} carry the state {primary.name} wrote "
              f"(e.g. {describe(keys[0])}); {backup.name} flows: {stats['flows']}")
        print("demo: OK" if ok else "demo: FAILED")
        return 0 if ok else 1
    finally:
        for p in procs:
            stop(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pico-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--flows", type=int, default=1000)
    args = ap.parse_args(argv)
    pico_log.setup()
    try:
        return run(args.config, args.flows)
    except PicoError as e:
        print(f"pico-demo: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
