"""Failover's race on the real packet path: datagrams of a flow that is STANDBY on this replica
(installed from a checkpoint of replica 2) reach the PMM before the SMM activates the flow. They
are held, not dropped, and leave in order, processed with the standby state, once ACTIVATE
comes; a flow that is never activated is dropped after packets.standby_hold_ms and counted.
(The hold's logic itself is tested without NFQUEUE in test_standby_hold.py.)"""
import os
import time

import pytest

from nettools import py
from shared import wire
from shared.api import attach
from shared.control import ControlClient
from shared.flowkey import make_key
from shared.flowtable import STANDBY
from test_pmm_net import replica_bed, udp_sink

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network "
                                 "namespaces and binds NFQUEUE; CI runs as root")]

FREE = 2            # an unbuffered group: output leaves without an RM committing epochs
HOLD_MS = 1500      # longer than pending_timeout_ms: the pending sweep must leave held ones be
STATE = 64          # write_config's state_size
EXTRA = f"""packets: {{ring_slots: 1024, pending_timeout_ms: 500, standby_hold_ms: {HOLD_MS}}}
groups:
  held: {{id: 1, target: r2, buffering: true}}
  free: {{id: {FREE}, buffering: false}}
"""

# Datagrams "TAG i" for i in FIRST..FIRST+N-1 from a fixed source port, so the flow's key is
# known before the first one leaves (the standby record must exist first).
UDP_FROM = r"""
import socket, sys, time
src, sport, dst, dport, tag, first, n = sys.argv[1:8]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((src, int(sport)))
for i in range(int(first), int(first) + int(n)):
    s.sendto(f"{tag} {i}".encode(), (dst, int(dport))); time.sleep(0.002)
"""


@pytest.fixture
def net(tmp_path, smm_factory):
    from conftest import write_config
    cfg = write_config(tmp_path, replicas=3, extra=EXTRA)
    with replica_bed("ps", cfg, smm_factory, tmp_path) as got:
        yield got


def send(bed, sport, dport, tag, first, n):
    bed.run("client", py(UDP_FROM, bed.client_ip, sport, bed.server_ip, dport, tag, first, n),
            timeout=30, check=True)


def wait_for(pred, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what()
        time.sleep(0.02)


def test_standby_packets_are_held_until_activation_then_leave_in_order(net):
    bed, rep = net
    rep.start_middlebox()
    key_a = make_key(bed.client_ip, 40001, bed.server_ip, 7101, 17)
    key_b = make_key(bed.client_ip, 40002, bed.server_ip, 7102, 17)
    smm = ControlClient(rep.cfg.replica("r1").smm_endpoint, timeout_ms=3000)
    try:
        # Replica 2's checkpoint carries flow A (its packet count so far: 1000); replica 3's
        # carries flow B, which nobody activates.
        for owner, key in ((2, key_a), (3, key_b)):
            state = (1000).to_bytes(8, "little") + bytes(STATE - 8)
            body = wire.encode_install(owner, FREE, 1, 0, STATE,
                                       [(key, wire.OP_UPSERT, 1, state)])
            assert wire.INSTALL_REPLY.unpack(smm.request(wire.INSTALL, body).body)[3] == 1
        _, a = udp_sink(bed, 7101)
        _, b = udp_sink(bed, 7102)
        t0 = time.monotonic()
        send(bed, 40001, 7101, "a", 0, 5)
        send(bed, 40002, 7102, "b", 0, 3)
        # Held: nothing arrives, nothing is dropped, not even past pending_timeout_ms (500).
        assert a.drain(quiet=0.8) == [] and b.drain(quiet=0.01) == []
        wait_for(lambda: rep.counters()["pending"] == 8, rep.counters)
        c = rep.counters()
        assert (c["standby_held"], c["standby_drops"], c["unwritten_drops"]) == (8, 0, 0), c
        assert time.monotonic() - t0 < HOLD_MS / 1000  # the test is still inside the hold

        reply = smm.request(wire.ACTIVATE, wire.encode_activate(wire.SEL_REPLICA, 2))
        assert wire.decode_key_list(reply.body) == [key_a]
        send(bed, 40001, 7101, "a", 5, 5)               # the flow goes on, after the held ones
        a.expect("a 9")
        assert a.seen == [f"a {i}" for i in range(10)]  # none lost, in order

        # B was never activated: dropped at its deadline and counted, never delivered.
        wait_for(lambda: rep.counters()["standby_drops"] == 3, rep.counters)
        assert time.monotonic() - t0 >= HOLD_MS / 1000
        assert b.drain(quiet=0.3) == []
        wait_for(lambda: rep.counters()["pending"] == 0, rep.counters)
        c = rep.counters()
        assert c["standby_held"] >= 8 and c["standby_drops"] == 3, c
        assert (c["unwritten_drops"], c["verdict_errors"], c["output_errors"]) == (0, 0, 0), c
    finally:
        smm.close()

    # The middlebox counted A's packets on top of the standby state: 1000 + 10.
    with attach(rep.flows) as flows:
        state = flows.get_flow(key_a)
        assert state is not None
        count = int.from_bytes(bytes(state[:8]), "little")
        flows.put_flow(key_a, modified=False)
        assert flows.table.lookup(key_b)[1] == STANDBY
    assert count == 1010


def test_without_standby_records_a_flow_is_not_held(net):
    """The usual path is unchanged: an unknown flow is new, queued at once, never held."""
    bed, rep = net
    rep.start_middlebox()
    _, a = udp_sink(bed, 7103)
    send(bed, 40003, 7103, "n", 0, 5)
    a.expect("n 4")
    assert rep.counters()["standby_held"] == 0

