"""passthrough - a minimal Pico middlebox in Python (the twin of passthrough.c).

    python examples/passthrough.py SEGMENT_PKTS [FLOWS_SEGMENT]
    e.g.   python examples/passthrough.py /pico.demo.r1.pkts /pico.demo.r1.flows

Every packet goes out unchanged; with a flow segment each flow counts its packets in the first
8 bytes of its state (little-endian u64). Prints "ready" once attached; on SIGTERM or SIGINT it
finishes the packet in hand, detaches and prints one JSON line {"packets": N, "writes_failed": M}.
"""
from __future__ import annotations

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import posix_ipc  # noqa: E402

from shared.api import attach  # noqa: E402
from shared.errors import PicoError  # noqa: E402
from shared.packets import attach_packets  # noqa: E402



def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(f"usage: {argv[0]} SEGMENT_PKTS [FLOWS_SEGMENT]", file=sys.stderr)
        return 2
    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        io = attach_packets(argv[1], timeout=30.0, wait=True)  # started beside the PMM
    except PicoError as e:
        print(f"passthrough: {e}", file=sys.stderr)
        return 1
    flows = None
    if len(argv) == 3:
        try:
            flows = attach(argv[2], timeout=30.0, wait=True)
        except PicoError as e:
            print(f"passthrough: {e}", file=sys.stderr)
            io.close()
            return 1
    counted = min(8, flows.state_size) if flows else 0
    print("ready", flush=True)

    packets = writes_failed = flow_errors = 0
    try:
        while not stop:
            try:
                pkt = io.pkt_read(timeout=1.0)
            except posix_ipc.SignalError:
                continue  # interrupted while idle: the loop checks the stop flag
            if pkt is None:
                continue
            packets += 1
            in_txn = False
            if flows is not None and pkt.has_flow:
                # The flow's transaction spans the write: its output is tagged with the epoch
                # whose checkpoint carries this update (pico_abi.h, "Output commit").
                try:
                    state = flows.get_flow(pkt.key, create=True, group=pkt.group)
                except PicoError as e:
                    state = None
                    flow_errors += 1
                    if flow_errors <= 10:
                        print(f"passthrough: flow state not updated: {e}", file=sys.stderr)
                if state is not None:
                    n = int.from_bytes(bytes(state[:counted]), "little") + 1
                    state[:counted] = n.to_bytes(8, "little")[:counted]
                    in_txn = True
            if not io.pkt_write(pkt):
                writes_failed += 1
            if in_txn:
                flows.put_flow(pkt.key, modified=True)
    finally:
        if flows is not None:
            flows.close()
        io.close()
    print(json.dumps({"packets": packets, "writes_failed": writes_failed}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
