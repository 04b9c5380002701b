"""tcptracker - a minimal stateful Pico middlebox: it forwards only TCP segments of connections
it has state for.

    python examples/tcptracker.py SEGMENT_PKTS FLOWS_SEGMENT [--reset]

A SYN (without ACK) creates the flow's state; any other TCP segment of a flow with no state is
dropped, like a stateful firewall that lost its table, so a failover without replicated state
breaks connections (the paper's No-HA case). With --reset it also answers such a segment with
a TCP RST to its sender (IPv4), as a firewall rejecting INVALID packets with tcp-reset does:
the connection is then reset, not merely stalled. State (little-endian u64s): packets, bytes,
SYN seen, FIN/RST seen. Non-TCP packets pass unchanged. Prints "ready" once attached; on SIGTERM
one JSON line of counts. (MBServ, mbserv/, is the full reference middlebox.)
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

SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


def tcp_flags(data: bytes) -> int | None:
    """The TCP flags of an IPv4 or IPv6 packet, or None if it is not TCP."""
    if not data:
        return None
    if data[0] >> 4 == 4:
        if len(data) < 20 or data[9] != 6:
            return None
        off = (data[0] & 0x0F) * 4
    elif data[0] >> 4 == 6:
        if len(data) < 40 or data[6] != 6:
            return None
        off = 40
    else:
        return None
    return data[off + 13] if len(data) > off + 13 else None


def reset_for(data: bytes) -> bytes | None:
    """A TCP RST (IPv4) answering segment `data` to its sender (RFC 793, "Reset
    Generation"); checksums are left 0: the PMM computes them before sending."""
    if len(data) < 20 or data[0] >> 4 != 4 or data[9] != 6:
        return None
    ihl = (data[0] & 0x0F) * 4
    tcp = data[ihl:]
    if len(tcp) < 20:
        return None
    sport, dport = int.from_bytes(tcp[0:2], "big"), int.from_bytes(tcp[2:4], "big")
    seq, ack = int.from_bytes(tcp[4:8], "big"), int.from_bytes(tcp[8:12], "big")
    flags = tcp[13]
    seg_len = len(data) - ihl - (tcp[12] >> 4) * 4 + (1 if flags & SYN else 0) + \
        (1 if flags & FIN else 0)
    if flags & ACK:
        r_seq, r_ack, r_flags = ack, 0, RST
    else:
        r_seq, r_ack, r_flags = 0, (seq + seg_len) & 0xFFFFFFFF, RST | ACK
    ip = bytes([0x45, 0]) + (40).to_bytes(2, "big") + bytes(2) + b"\x40\x00" + bytes([64, 6]) \
        + bytes(2) + data[16:20] + data[12:16]
    th = dport.to_bytes(2, "big") + sport.to_bytes(2, "big") + r_seq.to_bytes(4, "big") + \
        r_ack.to_bytes(4, "big") + bytes([5 << 4, r_flags]) + bytes(6)
    return ip + th


def main(argv: list[str]) -> int:
    reset = "--reset" in argv
    argv = [a for a in argv if a != "--reset"]
    if len(argv) != 3:
        print(f"usage: {argv[0]} SEGMENT_PKTS FLOWS_SEGMENT [--reset]", file=sys.stderr)
        return 2
    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        io = attach_packets(argv[1], timeout=30.0, wait=True)
        flows = attach(argv[2], timeout=30.0, wait=True, name="tcptracker")
    except PicoError as e:
        print(f"tcptracker: {e}", file=sys.stderr)
        return 1
    print("ready", flush=True)
    counts = {"packets": 0, "dropped_no_state": 0, "created": 0, "errors": 0, "resets": 0}
    try:
        while not stop:
            try:
                pkt = io.pkt_read(timeout=1.0)
            except posix_ipc.SignalError:
                continue
            if pkt is None:
                continue
            counts["packets"] += 1
            flags = tcp_flags(pkt.data) if pkt.has_flow else None
            if flags is None:
                io.pkt_write(pkt)
                continue
            opening = flags & SYN and not flags & ACK
            try:
                state = flows.get_flow(pkt.key, create=bool(opening), group=pkt.group)
            except PicoError as e:
                counts["errors"] += 1
                print(f"tcptracker: {e}", file=sys.stderr)
                io.pkt_drop(pkt)
                continue
            if state is None:  # no state, not an opening SYN: a broken connection
                counts["dropped_no_state"] += 1
                rst = reset_for(pkt.data) if reset and not flags & RST else None
                if rst is not None and io.pkt_create(rst, pkt.group, pkt.key, pkt.flow_hash):
                    counts["resets"] += 1
                io.pkt_drop(pkt)
                continue
            n = [int.from_bytes(bytes(state[i:i + 8]), "little") for i in range(0, 32, 8)]
            if opening and n[0] == 0:
                counts["created"] += 1
            n[0] += 1
            n[1] += len(pkt.data)
            n[2] |= 1 if flags & SYN else 0
            n[3] |= 1 if flags & (FIN | RST) else 0
            state[:32] = b"".join(v.to_bytes(8, "little") for v in n)
            io.pkt_write(pkt)
            flows.put_flow(pkt.key, modified=True)
    finally:
        flows.close()
        io.close()
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
