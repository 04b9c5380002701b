"""Chords placement in the PMM's classifier: a new flow joins the group of its bucket's backup."""
import ipaddress

from pmm.classify import Classifier
from sdn.ring import Ring, placements
from shared import abi
from shared.config import parse_config

CFG = """version: 1
cluster: {name: ch}
replicas:
  r1: {id: 1, smm_endpoint: "tcp://127.0.0.1:7101", switch_port: 3, mac: "0e:00:00:00:00:03"}
  r2: {id: 2, smm_endpoint: "tcp://127.0.0.1:7102", switch_port: 4, mac: "0e:00:00:00:00:04"}
  r3: {id: 3, smm_endpoint: "tcp://127.0.0.1:7103", switch_port: 5, mac: "0e:00:00:00:00:05"}
groups:
  dns: {id: 7, target: r2}
policies:
  - {group: dns, proto: udp, dport: 53}
sdn:
  client_subnet: 10.70.0.0/24
  buckets: 8
  vnodes: 8
  hosts: {c1: {port: 1, role: client}, s1: {port: 2, role: server}}
"""
SERVER = "10.70.1.1"


def a(ip):
    return (0xFFFF << 32) | int(ipaddress.IPv4Address(ip))


def test_new_flows_join_their_buckets_backup_group():
    cfg = parse_config(CFG)
    alive = {"mask": 0}
    cls = Classifier(cfg, "r1", membership=lambda: alive["mask"])
    ring = placements(Ring(["r1", "r2", "r3"], 8), 8)
    for host in range(1, 40):
        client = f"10.70.0.{host}"
        pl = ring[host & 7]
        want = pl.backup if pl.primary == "r1" else (pl.primary if pl.primary != "r1" else pl.backup)
        got = cls.group_of(6, a(client), a(SERVER), 40000, 80)
        assert got == 1000 + int(want[1]), client
        assert cls.group_of(6, a(SERVER), a(client), 80, 40000) == got   # either direction
    assert cls.group_of(17, a("10.70.0.5"), a(SERVER), 4000, 53) == 7     # policies first
    assert cls.group_of(6, a("192.0.2.1"), a(SERVER), 1, 80) == abi.GROUP_DEFAULT  # not a client


def test_a_view_without_a_replica_moves_its_backups_elsewhere():
    cfg = parse_config(CFG)
    alive = {"mask": 0b111}
    cls = Classifier(cfg, "r1", membership=lambda: alive["mask"])
    groups = {cls.group_of(6, a(f"10.70.0.{h}"), a(SERVER), 1, 80) for h in range(8)}
    assert groups <= {1002, 1003} and 1001 not in groups             # never to itself
    alive["mask"] = 0b101                                             # r2 failed
    groups = {cls.group_of(6, a(f"10.70.0.{h}"), a(SERVER), 1, 80) for h in range(8)}
    assert groups == {1003}
    alive["mask"] = 0b001                                             # r1 alone: unprotected
    assert cls.group_of(6, a("10.70.0.1"), a(SERVER), 1, 80) == abi.GROUP_DEFAULT
