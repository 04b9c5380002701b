"""The MBServ process: the packet loop around the pure core (core.py).

    python -m mbserv SEGMENT_PKTS FLOWS_SEGMENT [--config F] [--reset] [-v]
    e.g. python -m mbserv /pico.demo.r1.pkts /pico.demo.r1.flows --config mbserv/example.yaml

Attaches to a replica's packet and flow segments (waiting up to 30 s for the PMM and SMM),
prints "ready", then for each packet: a TCP segment's flow state is taken with get_flow (created
only for an opening SYN), the core decides, and the packet is written (pkt_write) or dropped
(pkt_drop); the flow's transaction stays open across the write, so the output is tagged with the
epoch whose checkpoint carries the update (docs/abi.md 12.8). With --reset (or the config's
reset_on_violation) a segment dropped for having no state or not conforming is answered with a
TCP RST to its sender (pkt_create), as a firewall rejecting INVALID packets does; the reset can
kill the connection the segment claims to belong to, which is the point for a stale connection
after a failover without state, and the known cost of this policy for a forged one.

Non-TCP packets pass unchanged; TCP fragments and broken TCP headers are dropped (they cannot
be matched to a flow's state). A flow in TIME_WAIT or CLOSED stays time_wait_s after its last
segment, so late retransmissions still find it, and is then deleted while a packet of its own
group is in hand: the RM never captures a group's checkpoint in the middle of a packet, so the
delete cannot race a capture. (A flow whose endpoints vanish without FIN or RST is never
deleted: the flow API has no safe sweep outside packet processing.)

On SIGTERM or SIGINT it finishes the packet in hand, detaches and prints one JSON line:
packets, forwarded, passed (non-TCP), dropped_no_state, dropped_nonconforming,
dropped_malicious, dropped_blocked, resets, writes_failed, flows_created, flows_deleted,
errors, requests {backend: connections routed there}, hits {malicious string: segments},
reasons {why: segments dropped as no-state or non-conforming}.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback

import posix_ipc

from shared.errors import ConfigError, PicoError
from shared.flowkey import describe

from .config import MBServConfig, load_config
from .core import Core
from .state import STATE_SIZE, FlowState
from .tcp import FORWARD, RST, BadSegment, is_opening, is_terminal, parse_segment, reset_for

REAP_PER_PACKET = 8


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


class Counters(dict):
    def __init__(self, backends):
        super().__init__(packets=0, forwarded=0, passed=0, dropped_no_state=0,
                         dropped_nonconforming=0, dropped_malicious=0, dropped_blocked=0,
                         resets=0, writes_failed=0, flows_created=0, flows_deleted=0, errors=0,
                         requests={b: 0 for b in backends}, hits={}, reasons={})

    def bump(self, name: str, sub: str | None = None) -> None:
        if sub is None:
            self[name] += 1
        else:
            self[name][sub] = self[name].get(sub, 0) + 1


class Lingering:
    """Flows in TIME_WAIT/CLOSED by group, in due order: key -> due (wall-clock seconds)."""

    def __init__(self, time_wait_s: float):
        self.tw = time_wait_s
        self.by_group: dict[int, dict[bytes, float]] = {}

    def add(self, group: int, key: bytes, due: float) -> None:
        q = self.by_group.setdefault(group, {})
        q.pop(key, None)
        q[key] = due  # dues only grow, so insertion order is due order

    def reap(self, flows, group: int, now: float, counts: Counters) -> None:
        q = self.by_group.get(group)
        n = 0
        while q and n < REAP_PER_PACKET:
            key, due = next(iter(q.items()))
            if due > now:
                return
            del q[key]
            n += 1
            state = flows.get_flow(key)
            if state is None:
                continue
            st = FlowState.unpack(state)
            if not is_terminal(st):  # reused by a new connection
                flows.put_flow(key, modified=False)
                continue
            age = (int(now) - st.last_seen) & 0xFFFFFFFF
            if age >= self.tw:
                flows.del_flow(key)
                counts.bump("flows_deleted")
            else:
                flows.put_flow(key, modified=False)
                self.add(group, key, now + self.tw - age)


def run(io, flows, core: Core, cfg: MBServConfig, reset: bool, verbose: bool,
        stopping) -> Counters:
    counts = Counters(core.router.backends if core.router else ())
    router = core.router
    lingering = Lingering(cfg.time_wait_s)
    warned = 0
    while not stopping():
        try:
            pkt = io.pkt_read(timeout=1.0)
        except posix_ipc.SignalError:
            continue
        if pkt is None:
            continue
        counts.bump("packets")
        now = time.time()
        try:
            seg = parse_segment(pkt.data)
        except BadSegment as e:
            counts.bump("dropped_nonconforming")
            counts.bump("reasons", str(e).split(":")[0])
            io.pkt_drop(pkt)
            continue
        if seg is None:  # not TCP: not MBServ's business
            counts.bump("passed")
            if not io.pkt_write(pkt):
                counts.bump("writes_failed")
            continue
        if not pkt.has_flow:  # TCP the PMM could not key (should not happen for a whole one)
            counts.bump("dropped_nonconforming")
            counts.bump("reasons", "TCP without a flow key")
            io.pkt_drop(pkt)
            continue
        try:
            lingering.reap(flows, pkt.group, now, counts)
        except PicoError as e:
            counts.bump("errors")
            if warned < 10:
                warned += 1
                print(f"mbserv: deleting closed flows: {e}", file=sys.stderr)
        key = pkt.key
        try:
            state = flows.get_flow(key, create=is_opening(seg), group=pkt.group)
        except PicoError as e:
            counts.bump("errors")
            if warned < 10:
                warned += 1
                print(f"mbserv: {describe(key)}: {e}", file=sys.stderr)
            io.pkt_drop(pkt)
            continue
        if state is None:
            counts.bump("dropped_no_state")
            counts.bump("reasons", "no flow state")
            if verbose:
                print(f"mbserv: drop {describe(key)} {seg!r}: no flow state", file=sys.stderr)
            if reset and not seg.flags & RST:
                rst = reset_for(pkt.data)
                if rst is not None and io.pkt_create(rst, pkt.group, key, pkt.flow_hash):
                    counts.bump("resets")
            io.pkt_drop(pkt)
            continue
        # the flow's transaction is open: it ends after the packet is written (output commit)
        try:
            res = core.process(state, seg, now)
            if res.changed:
                state[:STATE_SIZE] = res.state
        except Exception:
            counts.bump("errors")
            if warned < 10:
                warned += 1
                traceback.print_exc()
            io.pkt_drop(pkt)
            flows.put_flow(key, modified=False)
            continue
        if res.verdict == FORWARD:
            counts.bump("forwarded")
            if res.reason.startswith("SYN: new"):
                counts.bump("flows_created")
            if res.routed is not None:
                counts.bump("requests", router.name(res.routed))
            if not io.pkt_write(pkt):
                counts.bump("writes_failed")
        else:
            counts.bump(f"dropped_{res.kind}")
            if res.kind == "malicious":
                counts.bump("hits", _text(res.hit))
            elif res.kind in ("no_state", "nonconforming"):
                counts.bump("reasons", res.reason)
            if verbose:
                print(f"mbserv: drop {describe(key)} {seg!r}: {res.reason}", file=sys.stderr)
            if (reset and res.kind in ("no_state", "nonconforming")
                    and not seg.flags & RST):
                rst = reset_for(pkt.data)
                if rst is not None and io.pkt_create(rst, pkt.group, key, pkt.flow_hash):
                    counts.bump("resets")
            io.pkt_drop(pkt)
        if res.fresh and not res.changed:
            flows.del_flow(key)  # created for a segment that was refused: leave nothing
        else:
            flows.put_flow(key, modified=res.changed)
            if res.terminal:
                lingering.add(pkt.group, key, now + cfg.time_wait_s)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mbserv", description="MBServ, Pico's reference middlebox: TCP state tracking, "
        "malicious-string inspection and layer-7 request classification.")
    ap.add_argument("pkts", metavar="SEGMENT_PKTS", help="the replica's packet segment, e.g. "
                    "/pico.demo.r1.pkts")
    ap.add_argument("flows", metavar="FLOWS_SEGMENT", help="the replica's flow segment, e.g. "
                    "/pico.demo.r1.flows")
    ap.add_argument("--config", help="MBServ's YAML config (mbserv/config.py); default: "
                    "track TCP only")
    ap.add_argument("--reset", action="store_true", help="answer no-state and non-conforming "
                    "segments with a TCP RST (also: reset_on_violation in the config)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every drop to stderr")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config) if args.config else MBServConfig()
    except ConfigError as e:
        print(f"mbserv: {e}", file=sys.stderr)
        return 2
    core = Core(cfg.inspector(), cfg.router())

    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from shared.api import attach
    from shared.packets import attach_packets
    try:
        io = attach_packets(args.pkts, timeout=30.0, wait=True)
    except PicoError as e:
        print(f"mbserv: {e}", file=sys.stderr)
        return 1
    try:
        flows = attach(args.flows, timeout=30.0, wait=True, name="mbserv")
    except PicoError as e:
        print(f"mbserv: {e}", file=sys.stderr)
        io.close()
        return 1
    if flows.state_size < STATE_SIZE:
        print(f"mbserv: {args.flows} has state_size {flows.state_size}; MBServ's flow state "
              f"needs {STATE_SIZE} bytes: set flow_table.state_size >= {STATE_SIZE} in the "
              "cluster config", file=sys.stderr)
        flows.close()
        io.close()
        return 1
    print("ready", flush=True)
    try:
        counts = run(io, flows, core, cfg, args.reset or cfg.reset_on_violation, args.verbose,
                     lambda: stop)
    finally:
        flows.close()
        io.close()
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
