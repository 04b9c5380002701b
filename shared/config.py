"""Load and validate a Pico cluster configuration (one YAML file per cluster).

The schema is declarative: each section is a dict of ``Field`` specs, and one
generic walker (``_build``) checks unknown keys, types, ranges and required
keys, then builds frozen dataclasses.  Cross-references (unique ids and
endpoints, group targets) are checked afterwards in ``_check_references``.
To add a key: add a ``Field`` to the section's dict *and* an attribute to its
dataclass (an import-time assertion keeps the two in sync).  To add a section:
same, one level up, in ``TOP``.

Every problem raises ``ConfigError`` with the file, 1-based line and dotted
key path (e.g. ``replicas.r1.smm_endpoint``).

Public API: ``load_config``, ``parse_config``, ``DEFAULT_CONFIG``,
``ClusterConfig`` (``.replica(name)``, ``.replica_by_id(id)``),
``ClusterSection``, ``FlowTableConfig`` (``.n_slots``, ``.slots_per_stripe``),
``ControlConfig``, ``ReplicaConfig``, ``GroupConfig``.
"""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from shared.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
SCHEMA_VERSION = 1

REQUIRED = object()  # sentinel: a Field without a default must be present


# --------------------------------------------------------------------------- result types

@dataclass(frozen=True, kw_only=True)
class ClusterSection:
    name: str
    shm_prefix: str


@dataclass(frozen=True, kw_only=True)
class FlowTableConfig:
    capacity: int = 65536
    state_size: int = 64
    lock_stripes: int = 1024
    lock_timeout_ms: int = 1000

    @property
    def n_slots(self) -> int:
        """Slots in the table: smallest power of two >= ceil(capacity*4/3) and >= 16 per stripe.

        The 4/3 keeps the load factor at most 75% when full; the 16-per-stripe
        floor keeps every stripe big enough for its share of probing.
        """
        need = max(-(-self.capacity * 4 // 3), self.lock_stripes * 16)
        return 1 << (need - 1).bit_length()

    @property
    def slots_per_stripe(self) -> int:
        return self.n_slots // self.lock_stripes


@dataclass(frozen=True, kw_only=True)
class ControlConfig:
    max_message_bytes: int = 16 * 1024 * 1024
    request_timeout_ms: int = 2000
    heartbeat_interval_ms: int = 100
    controller_endpoint: str | None = None


@dataclass(frozen=True, kw_only=True)
class ReplicaConfig:
    name: str
    id: int
    smm_endpoint: str
    rm_endpoint: str | None = None
    pmm_endpoint: str | None = None
    metrics_port: int | None = None
    namespace: str | None = None
    nfqueue: int = 1
    switch_port: int | None = None
    mac: str | None = None

    @property
    def endpoints(self) -> dict[str, str]:
        """The configured endpoints of this replica, by key (smm_endpoint, ...)."""
        return {k: getattr(self, k) for k in ENDPOINT_KEYS if getattr(self, k) is not None}


@dataclass(frozen=True, kw_only=True)
class GroupConfig:
    name: str
    id: int
    frequency_hz: int = 1000
    target: str | None = None
    buffering: bool = True


@dataclass(frozen=True, kw_only=True)
class PacketsConfig:
    max_groups: int = 16
    ring_slots: int = 1024
    mtu: int = 1500
    pending_timeout_ms: int = 2000
    queue_maxlen: int = 16384
    standby_hold_ms: int = 500


@dataclass(frozen=True, kw_only=True)
class SdnHost:
    """An edge port of the switch: clients' traffic and servers' traffic are steered there."""
    name: str
    port: int
    role: str


@dataclass(frozen=True, kw_only=True)
class FaucetConfig:
    config: str | None = None
    event_sock: str | None = None
    pid_file: str | None = None
    prometheus_port: int = 9302
    netns: str | None = None


@dataclass(frozen=True, kw_only=True)
class SdnConfig:
    placement: str = "chords"
    vnodes: int = 16
    buckets: int = 16
    client_subnet: str | None = None
    frequency_hz: int = 1000
    heartbeat_timeout_ms: int = 300
    activation_timeout_ms: int = 1000
    dp_id: int = 1
    vid: int = 100
    hosts: dict[str, SdnHost] = dataclasses.field(default_factory=dict)
    members: list | None = None
    faucet: FaucetConfig = dataclasses.field(default_factory=FaucetConfig)
    metrics_port: int | None = None

    CHORD_GROUP_BASE = 1000  # chords: group "to-<replica>" has id 1000 + replica id


@dataclass(frozen=True, kw_only=True)
class PolicyRule:
    """Classifies a new flow (by its first packet) into a group; the first matching rule wins."""
    group: str
    proto: str | int | None = None
    src: str | None = None
    dst: str | None = None
    sport: int | str | None = None
    dport: int | str | None = None


@dataclass(frozen=True, kw_only=True)
class SecurityConfig:
    """CurveZMQ on every control endpoint, and the shared-memory objects' permissions
    (shared/security.py). Only paths and public keys: no secret is ever part of a config."""
    curve: bool = False
    keys_dir: str | None = None
    authorized_keys: list | None = None
    shm_mode: int | None = None
    shm_group: str | None = None

    @property
    def file_mode(self) -> int:
        """Segments' and semaphores' mode: shm_mode, else 0660 with a shm_group, else 0600."""
        if self.shm_mode is not None:
            return self.shm_mode
        return 0o660 if self.shm_group else 0o600


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    path: str
    version: int
    cluster: ClusterSection
    flow_table: FlowTableConfig
    control: ControlConfig
    packets: PacketsConfig
    replicas: dict[str, ReplicaConfig]
    groups: dict[str, GroupConfig]
    policies: list[PolicyRule]
    sdn: SdnConfig | None = None
    security: SecurityConfig = dataclasses.field(default_factory=SecurityConfig)

    def replica(self, name: str) -> ReplicaConfig:
        try:
            return self.replicas[name]
        except KeyError:
            known = ", ".join(self.replicas)
            raise ConfigError(f"no replica named {name!r} in {self.path}; known: {known}") from None

    def replica_by_id(self, id: int) -> ReplicaConfig:
        for rep in self.replicas.values():
            if rep.id == id:
                return rep
        known = ", ".join(f"{r.name}={r.id}" for r in self.replicas.values())
        raise ConfigError(f"no replica with id {id!r} in {self.path}; known: {known}")


# --------------------------------------------------------------------------- schema

@dataclass(frozen=True)
class Field:
    """One key: its accepted type(s), default (REQUIRED if none), value check, and doc.

    ``type`` is a Python type, a tuple of types (``type(None)`` allows null),
    a ``Section`` (nested mapping) or a ``MapOf`` (mapping of named items).
    ``check(value)`` returns None if fine, else a phrase like "must be 1..10".
    """
    type: Any
    default: Any = REQUIRED
    check: Callable[[Any], str | None] | None = None
    doc: str = ""


@dataclass(frozen=True)
class Section:
    """A mapping with fixed keys, built into ``cls``; ``injected`` attrs come from the caller, not YAML."""
    fields: dict[str, Field]
    cls: type
    injected: tuple[str, ...] = ()


@dataclass(frozen=True)
class MapOf:
    """A mapping of user-chosen names to items of one Section (e.g. replicas)."""
    item: Section
    name_pattern: str
    min_items: int = 0


@dataclass(frozen=True)
class ListOf:
    """A list of items of one Section (e.g. policy rules), kept in file order."""
    item: Section


def in_range(lo: int, hi: int) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or lo <= v <= hi else f"must be between {lo} and {hi}, got {v}"


def all_of(*checks: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda v: next((msg for c in checks if (msg := c(v))), None)


def matches(pattern: str, what: str) -> Callable[[Any], str | None]:
    rx = re.compile(pattern)
    return lambda v: None if v is None or rx.fullmatch(v) else f"{v!r} is not a valid {what} (must match {pattern})"


def equals(expected: Any, hint: str) -> Callable[[Any], str | None]:
    return lambda v: None if v == expected else f"must be {expected!r}, got {v!r}; {hint}"


def multiple_of(n: int) -> Callable[[Any], str | None]:
    return lambda v: None if v % n == 0 else f"must be a multiple of {n}, got {v}"


def power_of_two(v: int) -> str | None:
    return None if v > 0 and v & (v - 1) == 0 else f"must be a power of two, got {v}"


_TCP = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>[0-9]{1,5})")
_IPC = re.compile(r"ipc://\S+")


def endpoint(v: str | None) -> str | None:
    """Accept tcp://HOST:PORT (port 1..65535) or ipc://PATH, the forms ZeroMQ binds to."""
    if v is None or _IPC.fullmatch(v):
        return None
    m = _TCP.fullmatch(v)
    if m and 1 <= int(m["port"]) <= 65535:
        return None
    return f"{v!r} is not a valid endpoint; use tcp://HOST:PORT (port 1..65535) or ipc://PATH"


def cidr(v: str | None) -> str | None:
    if v is None:
        return None
    try:
        ipaddress.ip_network(v, strict=False)
        return None
    except ValueError:
        return f"{v!r} is not an address or prefix (e.g. 10.0.0.0/8 or 2001:db8::/32)"


def port_spec(v: int | str | None) -> str | None:
    """A port (0..65535) or an inclusive range 'LO-HI'."""
    if v is None:
        return None
    if isinstance(v, int):
        return None if 0 <= v <= 65535 else f"port must be 0..65535, got {v}"
    m = re.fullmatch(r"([0-9]{1,5})-([0-9]{1,5})", v)
    if m and int(m[1]) <= int(m[2]) <= 65535:
        return None
    return f"{v!r} is not a port or a range LO-HI (e.g. 8000-8100)"


PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58}


def protocol(v: str | int | None) -> str | None:
    if v is None or (isinstance(v, int) and 0 <= v <= 255) or v in PROTOCOLS:
        return None
    return f"{v!r} is not a protocol; use {', '.join(PROTOCOLS)} or a number 0..255"


_PORT = in_range(1, 65535)
_ID = in_range(1, 65535)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
ENDPOINT_KEYS = ("smm_endpoint", "rm_endpoint", "pmm_endpoint")

CLUSTER = Section({
    "name": Field(str, check=matches(r"[a-z][a-z0-9-]{0,23}", "cluster name"),
                  doc="cluster name; part of shared-memory names"),
    "shm_prefix": Field(str, "pico", matches(r"[a-z][a-z0-9]{0,11}", "shm prefix"),
                        "prefix of every shared-memory object name"),
}, ClusterSection)

FLOW_TABLE = Section({
    "capacity": Field(int, 65536, in_range(1, 16_000_000), "max flows held at once"),
    "state_size": Field(int, 64, all_of(in_range(8, 4096), multiple_of(8)), "bytes of state per flow"),
    "lock_stripes": Field(int, 1024, all_of(in_range(1, 65536), power_of_two), "number of lock stripes"),
    "lock_timeout_ms": Field(int, 1000, in_range(1, 60000), "stripe lock acquire timeout"),
}, FlowTableConfig)

CONTROL = Section({
    "max_message_bytes": Field(int, 16 * 1024 * 1024, in_range(1024, 268435456), "largest control message"),
    "request_timeout_ms": Field(int, 2000, in_range(10, 600000), "control request timeout"),
    "heartbeat_interval_ms": Field(int, 100, in_range(10, 10000), "heartbeat period"),
    "controller_endpoint": Field(_OPT_STR, None, endpoint,
                                 "where pico-sdn takes events from replicas (group unprotected...)"),
}, ControlConfig)

REPLICA = Section({
    "id": Field(int, check=_ID, doc="replica id, unique in the cluster"),
    "smm_endpoint": Field(str, check=endpoint, doc="state-management module endpoint"),
    "rm_endpoint": Field(_OPT_STR, None, endpoint, "replication manager endpoint"),
    "pmm_endpoint": Field(_OPT_STR, None, endpoint, "packet management module endpoint"),
    "metrics_port": Field(_OPT_INT, None, _PORT, "Prometheus metrics port of the SMM; the PMM "
                          "serves on metrics_port+1, the RM on metrics_port+2 (127.0.0.1)"),
    "namespace": Field(_OPT_STR, None, doc="network namespace the replica runs in"),
    "nfqueue": Field(int, 1, in_range(0, 65535), "NFQUEUE number the PMM reads"),
    "switch_port": Field(_OPT_INT, None, in_range(1, 65279), "OpenFlow port of the replica on the switch"),
    "mac": Field(_OPT_STR, None, matches(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", "MAC address (lower case)"),
                 "MAC address steered flows are sent to"),
}, ReplicaConfig, injected=("name",))

GROUP = Section({
    "id": Field(int, check=in_range(1, 65535), doc="group id, unique; 0 is the default unprotected group"),
    "frequency_hz": Field(int, 1000, in_range(10, 20000), "state replication frequency"),
    "target": Field(_OPT_STR, None, doc="replica name that backs this group up"),
    "buffering": Field(bool, True, doc="hold output packets until state is replicated"),
}, GroupConfig, injected=("name",))

PACKETS = Section({
    "max_groups": Field(int, 16, in_range(2, 1024), "entries in the group table (one is the default group)"),
    "ring_slots": Field(int, 1024, all_of(in_range(16, 65536), power_of_two), "packets per ring"),
    "mtu": Field(int, 1500, in_range(1500, 9216), "largest packet a ring slot holds"),
    "pending_timeout_ms": Field(int, 2000, in_range(10, 60000),
                                "drop a queued packet the middlebox has not written after this"),
    "queue_maxlen": Field(int, 16384, in_range(64, 1_000_000), "kernel NFQUEUE length"),
    "standby_hold_ms": Field(int, 500, in_range(0, 10000),
                             "hold packets of a standby flow this long for its activation, "
                             "then drop them"),
}, PacketsConfig)

SDN_HOST = Section({
    "port": Field(int, check=in_range(1, 65279), doc="OpenFlow port"),
    "role": Field(str, check=lambda v: None if v in ("client", "server") else
                  f"must be client or server, got {v!r}", doc="client or server side"),
}, SdnHost, injected=("name",))

FAUCET = Section({
    "config": Field(_OPT_STR, None, doc="faucet.yaml that pico-sdn writes"),
    "event_sock": Field(_OPT_STR, None, doc="Faucet's event socket (FAUCET_EVENT_SOCK)"),
    "pid_file": Field(_OPT_STR, None, doc="file holding Faucet's pid (for SIGHUP)"),
    "prometheus_port": Field(int, 9302, _PORT, doc="Faucet's Prometheus port on 127.0.0.1 (poked after SIGHUP)"),
    "netns": Field(_OPT_STR, None, doc="network namespace Faucet's Prometheus port is in"),
}, FaucetConfig)

SDN = Section({
    "placement": Field(str, "chords", lambda v: None if v in ("chords", "streams") else
                       f"must be chords or streams, got {v!r}", "HA placement policy"),
    "vnodes": Field(int, 16, in_range(1, 1024), "virtual nodes per replica on the ring"),
    "buckets": Field(int, 16, all_of(in_range(1, 256), power_of_two),
                     "steering buckets (low bits of the client address)"),
    "client_subnet": Field(_OPT_STR, None, cidr, "where clients are (the steered side)"),
    "frequency_hz": Field(int, 1000, in_range(10, 20000), "chords groups' checkpoint frequency"),
    "heartbeat_timeout_ms": Field(int, 300, in_range(20, 60000), "silence that fails a replica"),
    "activation_timeout_ms": Field(int, 1000, in_range(10, 60000), "wait for activations"),
    "dp_id": Field(int, 1, in_range(1, 2**48), "the switch's datapath id"),
    "vid": Field(int, 100, in_range(1, 4094), "VLAN of every port"),
    "hosts": Field(MapOf(SDN_HOST, r"[a-z][a-z0-9-]{0,14}"), {}, doc="edge ports"),
    "members": Field((list, type(None)), None, doc="replicas on the ring at start (default: "
                     "all); the others can join later (picoctl scale-out)"),
    "faucet": Field(FAUCET, {}),
    "metrics_port": Field(_OPT_INT, None, _PORT, "Prometheus metrics port of pico-sdn "
                          "(127.0.0.1)"),
}, SdnConfig)

def shm_mode(v: int | None) -> str | None:
    """Owner read-write, perhaps group read-write, never others nor execute bits."""
    if v is None:
        return None
    if not 0 <= v <= 0o777 or v & 0o600 != 0o600 or v & 0o117:
        return (f"{v} ({v:#o}) is not an allowed mode: use 0600 (owner only), 0640 or 0660 "
                "(with shm_group), written in octal with a leading 0; other users never get "
                "access, and nothing is executable")
    return None


def key_list(v: list | None) -> str | None:
    if v is None:
        return None
    from shared.security import KEY_NAME, is_z85_key
    for item in v:
        if not isinstance(item, str) or not (is_z85_key(item) or KEY_NAME.fullmatch(item)):
            return (f"entry {item!r} is neither a key name (a file <name>.key in keys_dir) nor "
                    "a 40-character Z85 public key")
    return None


SECURITY = Section({
    "curve": Field(bool, False, doc="CurveZMQ (authentication, encryption) on every control "
                   "endpoint"),
    "keys_dir": Field(_OPT_STR, None, doc="directory of <name>.key and <name>.key_secret files "
                      "(picoctl keygen), relative to this file"),
    "authorized_keys": Field((list, type(None)), None, key_list,
                             "clients the servers accept: key names or Z85 public keys "
                             "(default: every <name>.key in keys_dir)"),
    "shm_mode": Field(_OPT_INT, None, shm_mode, "mode of segments and semaphores (default "
                      "0600, or 0660 with shm_group)"),
    "shm_group": Field(_OPT_STR, None, matches(r"[a-z_][a-z0-9_-]{0,31}", "group name"),
                       "group that owns segments and semaphores (the middlebox's)"),
}, SecurityConfig)

POLICY = Section({
    "group": Field(str, doc="group name (or 'default') that matching new flows join"),
    "proto": Field((str, int, type(None)), None, protocol, "tcp, udp, icmp, icmp6 or a number"),
    "src": Field(_OPT_STR, None, cidr, "source address or prefix of the first packet"),
    "dst": Field(_OPT_STR, None, cidr, "destination address or prefix of the first packet"),
    "sport": Field((int, str, type(None)), None, port_spec, "source port or LO-HI"),
    "dport": Field((int, str, type(None)), None, port_spec, "destination port or LO-HI"),
}, PolicyRule)

TOP = Section({
    "version": Field(int, check=equals(SCHEMA_VERSION, f"this Pico reads schema version {SCHEMA_VERSION}"),
                     doc="schema version"),
    "cluster": Field(CLUSTER),
    "flow_table": Field(FLOW_TABLE, {}),
    "control": Field(CONTROL, {}),
    "replicas": Field(MapOf(REPLICA, r"[a-z][a-z0-9-]{0,14}", min_items=1)),
    "packets": Field(PACKETS, {}),
    "groups": Field(MapOf(GROUP, r"[a-z][a-z0-9-]{0,23}"), {}),
    "policies": Field(ListOf(POLICY), []),
    "sdn": Field((SDN, type(None)), None),
    "security": Field(SECURITY, {}),
}, ClusterConfig, injected=("path",))


def _assert_schema_matches_dataclasses() -> None:
    # The schema and the dataclasses are written separately for readability;
    # fail at import if someone adds a key to one but not the other.
    for section in (CLUSTER, FLOW_TABLE, CONTROL, PACKETS, POLICY, REPLICA, GROUP, TOP, SDN,
                    SDN_HOST, FAUCET, SECURITY):
        attrs = {f.name for f in dataclasses.fields(section.cls)} - set(section.injected)
        assert attrs == set(section.fields), (section.cls.__name__, attrs ^ set(section.fields))


_assert_schema_matches_dataclasses()


# --------------------------------------------------------------------------- YAML loading

class _Map(dict):
    """A dict that remembers the 1-based line of each key, and where it starts."""
    line: int | None = None
    lines: dict
    duplicates: list  # (key, line, first_line)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records key lines and duplicate keys (PyYAML silently keeps the last)."""

    def construct_yaml_map(self, node):
        data = _Map()
        data.line, data.lines, data.duplicates = node.start_mark.line + 1, {}, []
        yield data  # yield first so recursive (anchored) structures work, like PyYAML does
        explicit = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merged keys may legitimately be overridden
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in explicit:
                    data.duplicates.append((key, line, explicit[key]))
                else:
                    explicit[key] = line
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    "found unhashable key", key_node.start_mark) from None
        self.flatten_mapping(node)  # resolve `<<:` merges; explicit keys come last and win
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            data[key] = self.construct_object(value_node, deep=True)
            data.lines[key] = key_node.start_mark.line + 1


_LineLoader.add_constructor("tag:yaml.org,2002:map", _LineLoader.construct_yaml_map)


def _load_yaml(text: str, path: str) -> tuple[Any, int]:
    """Parse ``text``; return (data, line of the document start)."""
    try:
        loader = _LineLoader(text)  # its reader refuses control characters (a YAMLError) here
    except yaml.YAMLError as e:
        raise ConfigError(f"not YAML text: {e}; fix the file (is it a binary file?)",
                          path) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError("file is empty; expected a mapping with version, cluster and replicas "
                              "(see configs/demo.yaml)", path)
        return loader.construct_document(node), node.start_mark.line + 1
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = ": ".join(p for p in (e.context, e.problem) if p)
        # The parser notices a problem where it fails, often a line after the cause.
        if e.context_mark and mark and e.context_mark.line != mark.line:
            what += f" (the construct started at line {e.context_mark.line + 1})"
        raise ConfigError(f"YAML syntax error: {what}; fix the YAML around this line",
                          path, mark.line + 1 if mark else None) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"YAML error: {e}; fix the file", path) from None
    finally:
        loader.dispose()


def _find_duplicates(data: Any, prefix: str, path: str) -> None:
    """Raise on the first duplicate key anywhere in the tree, with its full key path."""
    if isinstance(data, _Map):
        for key, line, first in data.duplicates:
            raise ConfigError(f"duplicate key (first defined at line {first}); keep only one",
                              path, line, _join(prefix, key))
        for key, value in data.items():
            _find_duplicates(value, _join(prefix, key), path)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _find_duplicates(value, f"{prefix}[{i}]", path)


# --------------------------------------------------------------------------- validation

_TYPE_NAMES = {int: "an integer", str: "a string", bool: "a boolean", float: "a number",
               type(None): "null", dict: "a mapping", _Map: "a mapping", list: "a list"}


def _type_name(t: Any) -> str:
    return _TYPE_NAMES.get(t, getattr(t, "__name__", str(t)))


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _type_ok(value: Any, types: tuple) -> bool:
    # bool is a subclass of int in Python, but `id: true` is a mistake, not 1.
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _lines(raw: Any) -> dict:
    return getattr(raw, "lines", {})


def _build(section: Section, raw: Any, key: str, line: int | None, path: str,
           inject: dict | None = None) -> Any:
    """Validate mapping ``raw`` (found at ``key``/``line``) against ``section``; return its dataclass."""
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping, got {_type_name(type(raw))}; "
                          f"write it as indented `key: value` lines", path, line, key or None)
    allowed = list(section.fields)
    for k in raw:
        if k not in section.fields:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown key {k!r}; {hint}allowed keys: {', '.join(allowed)}",
                              path, _lines(raw).get(k, line), _join(key, k))
    values = {}
    for name, field in section.fields.items():
        sub = _join(key, name)
        if name in raw:
            values[name] = _value(field, raw[name], sub, _lines(raw).get(name, line), path)
        elif field.default is REQUIRED:
            raise ConfigError(f"missing required key {name!r}" + (f" ({field.doc})" if field.doc else "")
                              + "; add it", path, line, sub)
        else:
            # Defaults go through the same walker so sections get their own defaults.
            values[name] = _value(field, field.default, sub, line, path)
    return section.cls(**(inject or {}), **values)


def _value(field: Field, value: Any, key: str, line: int | None, path: str) -> Any:
    t = field.type
    if isinstance(t, tuple) and any(isinstance(x, Section) for x in t):  # an optional section
        if value is None:
            return None
        return _build(next(x for x in t if isinstance(x, Section)), value, key, line, path)
    if isinstance(t, Section):
        return _build(t, value, key, line, path)
    if isinstance(t, MapOf):
        return _build_map(t, value, key, line, path)
    if isinstance(t, ListOf):
        if not isinstance(value, list):
            raise ConfigError(f"expected a list of `- key: value` items, got "
                              f"{_type_name(type(value))}", path, line, key)
        return [_build(t.item, item, f"{key}[{i}]", getattr(item, "line", line), path)
                for i, item in enumerate(value)]
    types = t if isinstance(t, tuple) else (t,)
    if not _type_ok(value, types):
        want = " or ".join(_type_name(x) for x in types)
        raise ConfigError(f"expected {want}, got {_type_name(type(value))} ({value!r}); fix the value",
                          path, line, key)
    if field.check and (problem := field.check(value)):
        raise ConfigError(f"{problem}; fix the value", path, line, key)
    return value


def _build_map(spec: MapOf, raw: Any, key: str, line: int | None, path: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of name -> settings, got {_type_name(type(raw))}",
                          path, line, key)
    if len(raw) < spec.min_items:
        raise ConfigError(f"needs at least {spec.min_items} entry; add one under it", path, line, key)
    rx = re.compile(spec.name_pattern)
    out = {}
    for name, item in raw.items():
        item_line = _lines(raw).get(name, line)
        if not isinstance(name, str) or not rx.fullmatch(name):
            raise ConfigError(f"invalid name {name!r}; rename it to match {spec.name_pattern}",
                              path, item_line, _join(key, name))
        out[name] = _build(spec.item, item, _join(key, name), item_line, path, {"name": name})
    return out


def _line_at(raw: Any, dotted: str) -> int | None:
    """Line of a dotted key path in the raw tree (None if absent)."""
    *parents, last = dotted.split(".")
    for p in parents:
        raw = raw.get(p) if isinstance(raw, dict) else None
    return _lines(raw).get(last)


def _check_references(cfg: ClusterConfig, raw: Any) -> None:
    """Checks that span entries: unique ids and endpoints, groups pointing at real replicas."""
    def unique(items, what: str) -> None:
        seen: dict[Any, str] = {}
        for value, key in items:
            if value in seen:
                first = seen[value]
                raise ConfigError(f"duplicate {what} {value!r}, already used by {first} "
                                  f"(line {_line_at(raw, first)}); pick a unique one",
                                  cfg.path, _line_at(raw, key), key)
            seen[value] = key

    reps = cfg.replicas.values()
    unique(((r.id, f"replicas.{r.name}.id") for r in reps), "replica id")
    unique(((ep, f"replicas.{r.name}.{k}") for r in reps for k, ep in r.endpoints.items()), "endpoint")
    unique(((g.id, f"groups.{g.name}.id") for g in cfg.groups.values()), "group id")
    # each replica's metrics take three ports: SMM +0, PMM +1, RM +2
    ports = sorted((r.metrics_port, r.name) for r in reps if r.metrics_port)
    for (p, name), (q, other) in zip(ports, ports[1:]):
        if q - p < 3:
            key = f"replicas.{other}.metrics_port"
            raise ConfigError(f"metrics_port {q} is within 3 of replica {name}'s {p}: each "
                              "replica serves metrics on metrics_port .. metrics_port+2 (SMM, "
                              "PMM, RM); space them at least 3 apart", cfg.path,
                              _line_at(raw, key), key)
    sdn_port = cfg.sdn.metrics_port if cfg.sdn is not None else None
    for p, name in ports:
        if sdn_port is not None and p <= sdn_port <= p + 2:
            key = "sdn.metrics_port"
            raise ConfigError(f"sdn.metrics_port {sdn_port} is one of replica {name}'s metrics "
                              f"ports ({p}..{p + 2}: SMM, PMM, RM); pick another", cfg.path,
                              _line_at(raw, key), key)
        if p > 65533:
            key = f"replicas.{name}.metrics_port"
            raise ConfigError(f"metrics_port {p} leaves no room for the PMM (+1) and RM (+2) "
                              "ports: use at most 65533", cfg.path, _line_at(raw, key), key)
    for i, rule in enumerate(cfg.policies):
        if rule.group != "default" and rule.group not in cfg.groups:
            item = raw.get("policies")[i] if isinstance(raw.get("policies"), list) else None
            raise ConfigError(f"group {rule.group!r} is not defined; use one of: "
                              f"{', '.join(['default', *cfg.groups])}", cfg.path,
                              _lines(item).get("group"), f"policies[{i}].group")
    if len(cfg.groups) + 1 > cfg.packets.max_groups:
        raise ConfigError(f"{len(cfg.groups)} groups plus the default group exceed "
                          f"packets.max_groups ({cfg.packets.max_groups}); raise it",
                          cfg.path, _line_at(raw, "groups"), "groups")
    if cfg.sdn is not None:
        _check_sdn(cfg, raw)
    if cfg.security.curve and not cfg.security.keys_dir:
        raise ConfigError("security.curve needs security.keys_dir: the directory of the key "
                          "files (create them with picoctl keygen DIR NAME...)", cfg.path,
                          _line_at(raw, "security.curve"), "security.keys_dir")
    for g in cfg.groups.values():
        if g.target is not None and g.target not in cfg.replicas:
            key = f"groups.{g.name}.target"
            raise ConfigError(f"target {g.target!r} is not a replica; use one of: {', '.join(cfg.replicas)} "
                              "(or drop the key)",
                              cfg.path, _line_at(raw, key), key)


def _check_sdn(cfg: ClusterConfig, raw: Any) -> None:
    sdn, where = cfg.sdn, lambda k: (cfg.path, _line_at(raw, k), k)
    if sdn.members is not None:
        bad = [m for m in sdn.members if m not in cfg.replicas]
        if bad or not sdn.members:
            raise ConfigError(f"sdn.members must name configured replicas (at least one); "
                              f"unknown: {bad}", *where("sdn.members"))
    fc = sdn.faucet
    if fc.config and not (fc.event_sock and fc.pid_file):
        raise ConfigError("sdn.faucet.config needs event_sock and pid_file too: pico-sdn "
                          "signals Faucet by its pid and waits for its verdict on the event "
                          "socket", *where("sdn.faucet"))
    for r in cfg.replicas.values():
        if r.id > 64:
            raise ConfigError(f"replica {r.name} has id {r.id}: under sdn, replica ids are "
                              "1..64 (the membership view is a 64-bit mask)",
                              *where(f"replicas.{r.name}.id"))
    if sdn.placement == "chords" and sdn.client_subnet is None:
        raise ConfigError("chords placement needs sdn.client_subnet (the clients' side: a "
                          "flow's bucket is its client address's low bits)", *where("sdn"))
    if not sdn.hosts:
        return
    for r in cfg.replicas.values():
        for k in ("switch_port", "mac"):
            if getattr(r, k) is None:
                raise ConfigError(f"replica {r.name} needs {k}: sdn.hosts steers flows to "
                                  "replicas by switch port and MAC", *where(f"replicas.{r.name}"))
    ports = [(h.port, f"sdn.hosts.{h.name}.port") for h in sdn.hosts.values()] + \
        [(r.switch_port, f"replicas.{r.name}.switch_port") for r in cfg.replicas.values()]
    first: dict[int, str] = {}
    for port, key in ports:
        if port in first:
            raise ConfigError(f"switch port {port} is already used by {first[port]}; each host "
                              "and replica needs its own port", *where(key))
        first[port] = key
    if not any(h.role == "client" for h in sdn.hosts.values()) or \
            not any(h.role == "server" for h in sdn.hosts.values()):
        raise ConfigError("sdn.hosts needs at least one client and one server port",
                          *where("sdn.hosts"))


# --------------------------------------------------------------------------- public entry points

def parse_config(text: str, path: str | Path = "<string>") -> ClusterConfig:
    """Parse and validate a cluster config from YAML ``text``; ``path`` is used in errors."""
    path = str(path)
    raw, start = _load_yaml(text, path)
    _find_duplicates(raw, "", path)
    if not isinstance(raw, dict):
        raise ConfigError(f"top level must be a mapping (version, cluster, replicas, ...), "
                          f"got {_type_name(type(raw))}; see configs/demo.yaml for the layout", path, start)
    cfg = _build(TOP, raw, "", start, path, {"path": path})
    cfg = _with_chord_groups(cfg, raw)
    _check_references(cfg, raw)
    return cfg


def _with_chord_groups(cfg: ClusterConfig, raw: Any) -> ClusterConfig:
    """Elastic Pico Chords groups flows by their backup: one group `to-<replica>` per replica
    (id 1000 + replica id), in every replica's table, added here so every process agrees."""
    if cfg.sdn is None or cfg.sdn.placement != "chords":
        return cfg
    groups = dict(cfg.groups)
    for r in cfg.replicas.values():
        name, gid = f"to-{r.name}", SdnConfig.CHORD_GROUP_BASE + r.id
        clash = next((g for g in groups.values() if g.name == name or g.id == gid), None)
        if clash is not None:
            key = f"groups.{clash.name}"
            raise ConfigError(f"group {clash.name!r} (id {clash.id}) clashes with the chords "
                              f"group {name!r} (id {gid}) that sdn.placement: chords adds; "
                              "rename it or choose another id", cfg.path, _line_at(raw, key), key)
        if gid > 65535:
            raise ConfigError(f"replica {r.name}'s id {r.id} is too large for chords groups "
                              f"(1000 + id must be <= 65535)", cfg.path,
                              _line_at(raw, f"replicas.{r.name}.id"), f"replicas.{r.name}.id")
        groups[name] = GroupConfig(name=name, id=gid, frequency_hz=cfg.sdn.frequency_hz,
                                   target=r.name, buffering=True)
    return dataclasses.replace(cfg, groups=groups)


def load_config(path: str | Path = DEFAULT_CONFIG) -> ClusterConfig:
    """Read, parse and validate the cluster config file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror or e}; check the path",
                          str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8",
                          str(path)) from None
    return parse_config(text, path)
