"""pico-sdn's shell against real SMMs (no switch): a silent replica is failed over, its standby
flows are activated on the survivors, and replicas' events are answered."""
import json
import threading
import time

import zmq

from conftest import free_port, write_config
from sdn.server import SdnServer
from shared import wire
from shared.api import attach_replica
from shared.control import ControlClient
from shared.flowkey import make_key
from shared.flowtable import ACTIVE, STANDBY


def test_a_silent_replica_is_failed_over_to_the_survivors(tmp_path, smm_factory):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    mport = free_port()
    extra = ("sdn: {client_subnet: 10.70.0.0/24, heartbeat_timeout_ms: 300, buckets: 8, "
             f"metrics_port: {mport}}}\n")
    cfg = write_config(tmp_path, replicas=3, extra=extra, controller=endpoint)
    smm_factory(cfg, "r2")
    smm_factory(cfg, "r3")
    keys = {r: [make_key(f"10.70.0.{i}", 1000 + i, "10.70.1.1", 80, 6) for i in range(n, n + 5)]
            for r, n in (("r2", 1), ("r3", 10))}
    for r, ks in keys.items():  # r1's checkpoints had reached both survivors
        with ControlClient(cfg.replica(r).smm_endpoint) as smm:
            recs = [(k, wire.OP_UPSERT, 1, b"s" * 64) for k in ks]
            smm.request(wire.INSTALL, wire.encode_install(1, 1000 + int(r[1]), 1, 0, 64, recs))
    server = SdnServer(cfg)
    stop = threading.Event()
    t = threading.Thread(target=server.serve, args=(stop,))
    t.start()
    beat = zmq.Context.instance().socket(zmq.DEALER)
    beat.setsockopt(zmq.LINGER, 0)
    beat.connect(endpoint)
    try:
        deadline = time.monotonic() + 10
        seq = 1
        beat.send_multipart([b"", wire.encode(wire.EVENT, seq, wire.json_body(
            {"event": "heartbeat", "replica": "r1", "healthy": True}))])  # r1 was up once
        while not server.failovers:                    # r2 and r3 beat; r1 is silent
            assert time.monotonic() < deadline, "no failover"
            for r in ("r2", "r3"):
                seq += 1
                beat.send_multipart([b"", wire.encode(wire.EVENT, seq, wire.json_body(
                    {"event": "heartbeat", "replica": r, "healthy": True}))])
            while beat.poll(0):
                reply = wire.decode(beat.recv_multipart()[-1], 1 << 20)
                assert reply.status == wire.OK and json.loads(reply.body) == {"ok": True}
            time.sleep(0.05)
        done = server.failovers[0]
        assert done.replica == "r1" and server.core.alive == {"r2", "r3"}
        assert 0.3 <= done.detected < 1.0
        for r, ks in keys.items():                     # activated where they were
            with attach_replica(cfg, r) as flows:
                assert all(flows.table.lookup(k)[1] == ACTIVE for k in ks)
                other = keys["r3" if r == "r2" else "r2"]
                assert all(flows.table.lookup(k)[1] != STANDBY for k in other)
        # garbage on the controller's endpoint gets an error, the server stays up
        while beat.poll(200):
            beat.recv_multipart()                      # (late heartbeat replies)
        beat.send_multipart([b"", b"garbage"])
        assert wire.decode(beat.recv_multipart()[-1], 1 << 20).status == wire.ERR_TRUNCATED
        assert t.is_alive()
        # and its metrics say all of it (sdn.metrics_port)
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
        m = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
             for line in text.decode().splitlines() if line and not line.startswith("#")}
        assert m["pico_sdn_view"] == 2 and m["pico_sdn_isolated"] == 0, m
        assert m['pico_sdn_member_alive{replica="r1"}'] == 0
        assert m['pico_sdn_member_alive{replica="r2"}'] == 1
        assert m['pico_sdn_operations_total{kind="failover"}'] == 1
        assert m['pico_sdn_request_errors_total{error="truncated"}'] >= 1, m
        assert m['pico_sdn_requests_total{type="event"}'] >= 3, m
    finally:
        stop.set()
        t.join(5)
        beat.close()
        server.close()


def test_port_status_from_faucets_metrics():
    from sdn.server import ports_down
    text = ('# HELP port_status status of switch ports\n'
            'port_status{dp_id="0x1",dp_name="pico",port="r1",port_description="r1"} 0.0\n'
            'port_status{dp_id="0x1",dp_name="pico",port="r2",port_description="r2"} 1.0\n'
            'port_status_other{port="r3"} 0.0\n'
            'learned_macs{dp_id="0x1",n="0"} 0.0\n')
    assert ports_down(text) == {"r1"}
    assert ports_down("garbage\n{}\n") == set()
