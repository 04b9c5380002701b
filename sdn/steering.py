"""Flow steering through Faucet: which replica each flow crosses, as a faucet.yaml (pure).

Every edge port (a client or server port) has `acls_in` from the start, so a reroute only edits
an ACL's rules: a warm reload, tens of milliseconds (notes: networking-stack §5). The steering
unit is a BUCKET: the low bits of the client's IPv4 address, `buckets` (a power of two) of them.
A client port matches `ipv4_src` and a server port `ipv4_dst` against the same value/mask, so
both directions of a connection cross the same replica. Each bucket's rule rewrites eth_dst to
its primary replica's MAC and outputs on that replica's port; the replica routes the packet on
to its real destination (ip_forward, its PMM on NFQUEUE). A flow that must leave its bucket's
replica (a live migration) gets an EXACT rule (5-tuple, both directions), placed before the
bucket rules. Everything else (ARP, IPv6 neighbour discovery, replica-originated traffic) is
switched normally.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import yaml

ETH_IPV4 = 0x0800


@dataclass(frozen=True)
class Port:
    name: str
    number: int          # OpenFlow port
    mac: str | None = None


@dataclass(frozen=True)
class ExactFlow:
    """One TCP/UDP connection, as the client opened it (client -> server)."""
    proto: int           # 6 or 17
    client: str
    client_port: int
    server: str
    server_port: int


@dataclass(frozen=True)
class Topology:
    dp_name: str
    dp_id: int
    vid: int
    clients: tuple[Port, ...]
    servers: tuple[Port, ...]
    replicas: dict[str, Port] = field(hash=False)
    buckets: int = 16

    def __post_init__(self):
        if self.buckets < 1 or self.buckets & (self.buckets - 1) or self.buckets > 256:
            raise ValueError(f"buckets must be a power of two up to 256, got {self.buckets}")
        for name, p in self.replicas.items():
            if not p.mac:
                raise ValueError(f"replica {name} needs a MAC address to be steered to")

    @property
    def mask(self) -> str:
        return str(ipaddress.IPv4Address(self.buckets - 1))


def bucket_of(client_ip: str, buckets: int) -> int:
    """The steering bucket of a client address (its low bits)."""
    return int(ipaddress.IPv4Address(client_ip)) & (buckets - 1)


def _to(topo: Topology, replica: str) -> dict:
    p = topo.replicas[replica]
    return {"output": {"set_fields": [{"eth_dst": p.mac}], "port": p.number}}


def _exact_rule(topo: Topology, f: ExactFlow, replica: str, from_client: bool) -> dict:
    l4 = "tcp" if f.proto == 6 else "udp"
    if from_client:
        m = {"ipv4_src": f.client, "ipv4_dst": f.server, f"{l4}_src": f.client_port,
             f"{l4}_dst": f.server_port}
    else:
        m = {"ipv4_src": f.server, "ipv4_dst": f.client, f"{l4}_src": f.server_port,
             f"{l4}_dst": f.client_port}
    return {"rule": {"dl_type": ETH_IPV4, "nw_proto": f.proto, **m, "actions": _to(topo, replica)}}


def acls(topo: Topology, primaries: list[str], exact: dict[ExactFlow, str] | None = None) -> dict:
    """The two steering ACLs: `pico-from-clients` and `pico-from-servers`.

    primaries[b] is bucket b's replica, or None to let the bucket's packets be switched
    normally (no replica alive for it)."""
    if len(primaries) != topo.buckets:
        raise ValueError(f"{len(primaries)} primaries for {topo.buckets} buckets")
    out = {}
    for name, from_client, field_ in (("pico-from-clients", True, "ipv4_src"),
                                      ("pico-from-servers", False, "ipv4_dst")):
        rules = [_exact_rule(topo, f, r, from_client) for f, r in sorted(
            (exact or {}).items(), key=lambda kv: (kv[0].client, kv[0].client_port))]
        for b, replica in enumerate(primaries):
            if replica is None:
                continue
            rules.append({"rule": {"dl_type": ETH_IPV4,
                                   field_: f"{ipaddress.IPv4Address(b)}/{topo.mask}",
                                   "actions": _to(topo, replica)}})
        rules.append({"rule": {"actions": {"allow": 1}}})
        out[name] = rules
    return out


def faucet_config(topo: Topology, primaries: list[str],
                  exact: dict[ExactFlow, str] | None = None) -> str:
    """The whole faucet.yaml: one VLAN, every port on it, edge ports with their ACL."""
    interfaces = {}
    for p in topo.clients:
        interfaces[p.number] = {"name": p.name, "native_vlan": "pico",
                                "acls_in": ["pico-from-clients"]}
    for p in topo.servers:
        interfaces[p.number] = {"name": p.name, "native_vlan": "pico",
                                "acls_in": ["pico-from-servers"]}
    for name, p in topo.replicas.items():
        interfaces[p.number] = {"name": p.name, "native_vlan": "pico"}
    doc = {"acls": acls(topo, primaries, exact),
           "vlans": {"pico": {"vid": topo.vid}},
           "dps": {topo.dp_name: {"dp_id": topo.dp_id, "hardware": "Open vSwitch",
                                  "interfaces": dict(sorted(interfaces.items()))}}}
    return "# generated by pico-sdn: edits are overwritten\n" + yaml.safe_dump(doc, sort_keys=False)
