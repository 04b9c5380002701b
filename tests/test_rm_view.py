"""A membership view reaches a survivor's RM: the flows it took over are protected again."""
import json
import time

from conftest import write_config
from pmm.store import PacketStore
from rm.server import RmServer
from shared import wire
from shared.api import attach_replica
from shared.control import ControlClient
from shared.flowkey import make_key
from shared.flowtable import ACTIVE, STANDBY

SDN = """sdn:
  client_subnet: 10.70.0.0/24
  buckets: 8
  vnodes: 8
"""


def _pump(rm, pred, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        rm.run_once()
        rm.wait()


def test_a_view_without_the_failed_replica_reprotects_its_flows(tmp_path, smm_factory):
    cfg = write_config(tmp_path, replicas=3, extra=SDN, request_timeout_ms=500)
    store = PacketStore(cfg, "r2")                    # r2 survives r1
    smm_factory(cfg, "r2")
    smm_factory(cfg, "r3")
    keys = [make_key(f"10.70.0.{h}", 40000 + h, "10.70.1.1", 80, 6) for h in range(1, 17)]
    # r1's RM had shipped these to r2 in group to-r2 (1002): install them as it would have.
    recs = [(k, wire.OP_UPSERT, 5, bytes([h]) * 64) for h, k in enumerate(keys, 1)]
    with ControlClient(cfg.replica("r2").smm_endpoint) as smm:
        smm.request(wire.INSTALL, wire.encode_install(1, 1002, 1, 0, 64, recs))
        reply = smm.request(wire.ACTIVATE, wire.encode_activate(wire.SEL_REPLICA, 1))
        assert len(wire.decode_key_list(reply.body)) == len(keys)
    rm = RmServer(cfg, "r2", metrics=False)
    flows = attach_replica(cfg, "r2")
    try:
        for k in keys:
            idx, status = flows.table.lookup(k)
            assert status == ACTIVE and int(flows.table.slots[idx]["group"]) == 1002
        reply = rm_request(rm, {"view": 2, "alive": ["r2", "r3"]})
        assert reply["applied"] and reply["moved"] == len(keys)
        assert store.seg.membership() == (2, 0b110)
        for k in keys:                                 # r3 is the only possible backup now
            idx, _ = flows.table.lookup(k)
            assert int(flows.table.slots[idx]["group"]) == 1003
        with attach_replica(cfg, "r3") as r3:
            def backed_up():
                return all(r3.table.lookup(k)[1] == STANDBY for k in keys)
            _pump(rm, backed_up, "r3 holds a standby copy of every taken-over flow")
            for h, k in enumerate(keys, 1):
                idx, _ = r3.table.lookup(k)
                assert bytes(r3.table.slots[idx]["state"][:1]) == bytes([h])
        again = rm_request(rm, {"view": 2, "alive": ["r2", "r3"]})
        assert not again["applied"] and again["moved"] == 0   # idempotent
        bad = rm.control.handle(wire.encode(wire.VIEW, 9, wire.json_body({"view": 3,
                                                                           "alive": ["r9"]})))
        assert wire.decode(bad, 1 << 20).status == wire.ERR_BAD_BODY
    finally:
        flows.close()
        rm.close()
        store.close()


def rm_request(rm, body):
    from rm.control import RmControl
    if not hasattr(rm, "control"):
        rm.control = RmControl(rm, 1 << 20)
    reply = wire.decode(rm.control.handle(wire.encode(wire.VIEW, 1, wire.json_body(body))),
                        1 << 20)
    assert reply.status == wire.OK, reply.body
    return json.loads(reply.body)


STREAMS = """sdn:
  placement: streams
groups:
  web: {id: 1, target: r1, frequency_hz: 200}
"""


def test_streams_groups_whose_backup_left_are_protected_to_the_next_replica(tmp_path, smm_factory):
    """Differentiated Pico Streams: r1 was group web's backup. On r2, the view without r1
    protects web to r3 (the next live replica after r2), so r2's flows are covered again."""
    cfg = write_config(tmp_path, replicas=3, extra=STREAMS, request_timeout_ms=500)
    store = PacketStore(cfg, "r2")
    smm_factory(cfg, "r2")
    smm_factory(cfg, "r3")
    rm = RmServer(cfg, "r2", metrics=False)
    flows = attach_replica(cfg, "r2")
    keys = [make_key(f"10.80.0.{h}", 5000 + h, "10.80.1.1", 443, 6) for h in range(1, 6)]
    try:
        for k in keys:
            flows.get_flow(k, create=True, group=1)[0] = 9
            flows.put_flow(k)
        reply = rm_request(rm, {"view": 2, "alive": ["r2", "r3"]})
        assert reply["retargeted"] == {"1": "r3"}   # (JSON keys are strings)
        row = store.seg.groups[store.seg.active_groups()[1]]
        assert int(row["target"]) == 3 and int(row["protected_"]) == 1
        assert int(row["buffering"]) == 1
        with attach_replica(cfg, "r3") as r3:
            _pump(rm, lambda: all(r3.table.lookup(k)[1] == STANDBY for k in keys),
                  "r3 holds web's flows")
    finally:
        flows.close()
        rm.close()
        store.close()
