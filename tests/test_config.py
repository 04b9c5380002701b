"""Tests for shared/config.py (cluster YAML loading/validation) and pico-check-config."""
from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from shared.config import DEFAULT_CONFIG, load_config, parse_config
from shared.config_check import main as check_main
from shared.errors import ConfigError, PicoError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# A minimal valid config; the line numbers matter to the error tests below.
BASE = textwrap.dedent("""\
    version: 1
    cluster:
      name: t
    replicas:
      r1:
        id: 1
        smm_endpoint: tcp://127.0.0.1:7101
      r2:
        id: 2
        smm_endpoint: tcp://127.0.0.1:7102
        rm_endpoint: tcp://127.0.0.1:7202
    groups:
      web:
        id: 1
        target: r2
    """)


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, f"test bug: {old!r} must occur exactly once"
    return text.replace(old, new)


def load_text(tmp_path: Path, text: str, name: str = "cluster.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return load_config(p), p


def expect_error(tmp_path: Path, text: str, line: int | None, key: str | None,
                 fragment: str = "") -> ConfigError:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    err = info.value
    msg = str(err)
    assert err.file == str(p) and msg.startswith(str(p)), msg
    assert err.line == line, msg
    if line is not None:
        assert f"{p}:{line}: " in msg
    assert err.key == key, msg
    if key is not None:
        assert f": {key}: " in msg
    assert fragment in msg
    return err


# --------------------------------------------------------------------------- valid configs

def test_demo_config_loads():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert DEFAULT_CONFIG == CONFIGS / "demo.yaml"
    assert cfg.version == 1
    assert list(cfg.replicas) == ["r1", "r2", "r3"]
    assert [r.id for r in cfg.replicas.values()] == [1, 2, 3]
    assert cfg.replica("r1").smm_endpoint == "tcp://127.0.0.1:7101"
    assert cfg.replica("r3").smm_endpoint == "tcp://127.0.0.1:7103"
    ft = cfg.flow_table
    assert (ft.capacity, ft.state_size, ft.lock_stripes) == (1_000_000, 64, 1024)
    assert ft.n_slots == 2_097_152 and ft.slots_per_stripe == 2048
    assert len(cfg.groups) >= 2
    assert all(g.target in cfg.replicas for g in cfg.groups.values() if g.target)


def test_test_small_config_loads():
    cfg = load_config(CONFIGS / "test-small.yaml")
    assert len(cfg.replicas) == 2
    ft = cfg.flow_table
    assert (ft.capacity, ft.state_size, ft.lock_stripes) == (4096, 64, 64)
    assert ft.n_slots == 8192 and ft.slots_per_stripe == 128


def test_default_config_is_loadable_without_argument():
    assert load_config().cluster.name == "demo"


def test_defaults_applied():
    cfg = parse_config(BASE)
    assert cfg.path == "<string>"
    assert cfg.cluster.shm_prefix == "pico"
    ft = cfg.flow_table
    assert (ft.capacity, ft.state_size, ft.lock_stripes, ft.lock_timeout_ms) == (65536, 64, 1024, 1000)
    c = cfg.control
    assert (c.max_message_bytes, c.request_timeout_ms, c.heartbeat_interval_ms) == (16 * 1024 * 1024, 2000, 100)
    r1 = cfg.replica("r1")
    assert r1.name == "r1"
    assert (r1.rm_endpoint, r1.pmm_endpoint, r1.metrics_port, r1.namespace, r1.nfqueue) == (None, None, None, None, 1)
    web = cfg.groups["web"]
    assert (web.name, web.id, web.frequency_hz, web.target, web.buffering) == ("web", 1, 1000, "r2", True)


def test_groups_optional_and_order_kept():
    cfg = parse_config(edit("groups:\n  web:\n    id: 1\n    target: r2\n", ""))
    assert cfg.groups == {}
    text = edit("  r1:\n", "  zz:\n")  # names out of alphabetical order
    assert list(parse_config(text).replicas) == ["zz", "r2"]


def test_explicit_nulls_and_ipc_endpoints():
    text = edit("    rm_endpoint: tcp://127.0.0.1:7202\n",
                "    rm_endpoint: null\n    pmm_endpoint: ipc:///tmp/pico-r2-pmm\n"
                "    metrics_port: ~\n    namespace: ns2\n    nfqueue: 0\n")
    r2 = parse_config(text).replica("r2")
    assert (r2.rm_endpoint, r2.pmm_endpoint, r2.metrics_port, r2.namespace, r2.nfqueue) == (
        None, "ipc:///tmp/pico-r2-pmm", None, "ns2", 0)


def test_endpoint_forms_accepted():
    text = edit("tcp://127.0.0.1:7101", "tcp://*:7101")
    text = edit("tcp://127.0.0.1:7202", "tcp://[::1]:65535", text)
    text = edit("tcp://127.0.0.1:7102", "tcp://host-b.example:1", text)
    cfg = parse_config(text)
    assert cfg.replica("r2").endpoints == {"smm_endpoint": "tcp://host-b.example:1",
                                           "rm_endpoint": "tcp://[::1]:65535"}


def test_merge_keys_are_not_duplicates():
    text = edit("groups:\n  web:\n    id: 1\n    target: r2\n",
                "groups:\n  web: &g\n    id: 1\n    frequency_hz: 50\n  dns:\n    <<: *g\n    id: 2\n")
    cfg = parse_config(text)
    assert cfg.groups["dns"].id == 2 and cfg.groups["dns"].frequency_hz == 50


def test_results_are_frozen():
    cfg = parse_config(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.version = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.replica("r1").id = 5


def test_replica_lookup():
    cfg = parse_config(BASE, path="x.yaml")
    assert cfg.replica_by_id(2).name == "r2"
    with pytest.raises(ConfigError) as info:
        cfg.replica("r9")
    assert str(info.value) == "no replica named 'r9' in x.yaml; known: r1, r2"
    with pytest.raises(ConfigError, match="no replica with id 7 in x.yaml"):
        cfg.replica_by_id(7)


@pytest.mark.parametrize("capacity, stripes, n_slots", [
    (1_000_000, 1024, 2_097_152),
    (4096, 64, 8192),          # ceil(4096*4/3) = 5462 -> 8192
    (49152, 1, 65536),         # exactly 65536 needed: no rounding up
    (10, 1024, 16384),         # the 16-slots-per-stripe floor wins
    (1, 1, 16),
])
def test_n_slots(capacity, stripes, n_slots):
    text = edit("replicas:", f"flow_table:\n  capacity: {capacity}\n  lock_stripes: {stripes}\nreplicas:")
    ft = parse_config(text).flow_table
    assert ft.n_slots == n_slots
    assert ft.slots_per_stripe == n_slots // stripes


# --------------------------------------------------------------------------- errors

ERROR_CASES = [
    # id, text, line, key, message fragment
    ("unknown-top", BASE + "colour: red\n", 16, "colour", "unknown key 'colour'"),
    ("unknown-nested", edit("  name: t\n", "  name: t\n  nmae: u\n"), 4, "cluster.nmae", "did you mean 'name'"),
    ("unknown-in-replica", edit("    id: 2\n", "    id: 2\n    port: 5\n"), 10, "replicas.r2.port", "allowed keys"),
    ("wrong-type", edit("    id: 1\n    smm", "    id: one\n    smm"), 6, "replicas.r1.id", "expected an integer"),
    ("wrong-type-section", edit("cluster:\n  name: t\n", "cluster: demo\n"), 2, "cluster", "expected a mapping"),
    ("float-as-int", edit("    id: 2\n", "    id: 2.0\n"), 9, "replicas.r2.id", "expected an integer"),
    ("bool-as-int", edit("    id: 1\n    smm", "    id: true\n    smm"), 6, "replicas.r1.id", "got a boolean"),
    ("int-as-bool", edit("    target: r2\n", "    target: r2\n    buffering: 1\n"), 16,
     "groups.web.buffering", "expected a boolean"),
    ("duplicate-key", edit("    id: 2\n", "    id: 2\n    id: 3\n"), 10, "replicas.r2.id", "first defined at line 9"),
    ("duplicate-top-key", BASE + "version: 1\n", 16, "version", "duplicate key"),
    ("duplicate-replica-name", edit("  r2:\n", "  r1:\n"), 8, "replicas.r1", "duplicate key"),
    ("missing-required", edit("    smm_endpoint: tcp://127.0.0.1:7101\n", ""), 5,
     "replicas.r1.smm_endpoint", "missing required key 'smm_endpoint'"),
    ("missing-required-top", edit("cluster:\n  name: t\n", ""), 1, "cluster", "missing required key"),
    ("missing-replicas", edit("replicas:", "other:").split("other:")[0], 1, "replicas", "missing required key"),
    ("no-replicas", edit("groups:\n  web:\n    id: 1\n    target: r2\n", "").split("replicas:")[0]
     + "replicas: {}\n", 4, "replicas", "at least 1"),
    ("out-of-range", edit("replicas:", "flow_table:\n  capacity: 0\nreplicas:"), 5,
     "flow_table.capacity", "between 1 and 16000000"),
    ("out-of-range-big", edit("replicas:", "control:\n  heartbeat_interval_ms: 10001\nreplicas:"), 5,
     "control.heartbeat_interval_ms", "between 10 and 10000"),
    ("not-multiple-of-8", edit("replicas:", "flow_table:\n  state_size: 12\nreplicas:"), 5,
     "flow_table.state_size", "multiple of 8"),
    ("not-power-of-two", edit("replicas:", "flow_table:\n  lock_stripes: 1000\nreplicas:"), 5,
     "flow_table.lock_stripes", "power of two"),
    ("group-id-zero", edit("    id: 1\n    target", "    id: 0\n    target"), 14, "groups.web.id", "between 1"),
    ("bad-cluster-name", edit("  name: t\n", "  name: Demo_1\n"), 3, "cluster.name", "not a valid cluster name"),
    ("replica-name-too-long", edit("  r2:\n", "  r234567890123456:\n"), 8, "replicas.r234567890123456",
     "invalid name"),
    ("bad-shm-prefix", edit("  name: t\n", "  name: t\n  shm_prefix: pico-x\n"), 4, "cluster.shm_prefix",
     "not a valid shm prefix"),
    ("bad-replica-name", edit("  r2:\n", "  R2:\n"), 8, "replicas.R2", "invalid name"),
    ("bad-endpoint-port", edit(":7101", ":99999"), 7, "replicas.r1.smm_endpoint", "tcp://HOST:PORT"),
    ("bad-endpoint-scheme", edit("tcp://127.0.0.1:7202", "http://127.0.0.1:7202"), 11,
     "replicas.r2.rm_endpoint", "not a valid endpoint"),
    ("bad-endpoint-no-port", edit("tcp://127.0.0.1:7102", "tcp://127.0.0.1"), 10,
     "replicas.r2.smm_endpoint", "not a valid endpoint"),
    ("duplicate-endpoint", edit("tcp://127.0.0.1:7202", "tcp://127.0.0.1:7101"), 11,
     "replicas.r2.rm_endpoint", "already used by replicas.r1.smm_endpoint (line 7)"),
    ("duplicate-replica-id", edit("    id: 2\n", "    id: 1\n"), 9, "replicas.r2.id",
     "duplicate replica id 1, already used by replicas.r1.id (line 6)"),
    ("duplicate-group-id", BASE + "  dns:\n    id: 1\n", 17, "groups.dns.id", "duplicate group id"),
    ("dangling-target", edit("target: r2", "target: r9"), 15, "groups.web.target",
     "'r9' is not a replica; use one of: r1, r2"),
    ("bad-version", edit("version: 1", "version: 2"), 1, "version", "must be 1"),
    ("version-as-string", edit("version: 1", "version: '1'"), 1, "version", "expected an integer"),
    ("not-a-mapping", "- version\n- 1\n", 1, None, "top level must be a mapping"),
    ("not-a-mapping-after-comments", "# comment\n\n42\n", 3, None, "top level must be a mapping"),
    ("empty-file", "", None, None, "file is empty"),
    ("only-comments", "# nothing here\n", None, None, "file is empty"),
    ("syntax-error", edit("  name: t\n", "  name: [t\n"), 4, None, "YAML syntax error"),
    ("syntax-error-indent", edit("    id: 2\n", "    id: 2\n   bad: 1\n"), 10, None, "YAML syntax error"),
]


@pytest.mark.parametrize("text, line, key, fragment",
                         [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors_are_located(tmp_path, text, line, key, fragment):
    err = expect_error(tmp_path, text, line, key, fragment)
    assert isinstance(err, PicoError)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.file == str(p)
    assert str(p) in str(info.value) and "cannot read config file" in str(info.value)


def test_parse_config_error_names_string_path():
    with pytest.raises(ConfigError) as info:
        parse_config(edit("version: 1", "version: 2"))
    assert str(info.value).startswith("<string>:1: version: ")


# --------------------------------------------------------------------------- pico-check-config

def test_check_config_ok(capsys):
    assert check_main([str(CONFIGS / "demo.yaml"), str(CONFIGS / "test-small.yaml")]) == 0
    out, err = capsys.readouterr()
    assert f"{CONFIGS / 'demo.yaml'}: ok (3 replicas, 2 groups)" in out
    assert f"{CONFIGS / 'test-small.yaml'}: ok (2 replicas, 1 groups)" in out
    assert err == ""


def test_check_config_error(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(BASE)
    bad.write_text(edit("target: r2", "target: r9"))
    assert check_main([str(bad), str(good)]) == 1
    out, err = capsys.readouterr()
    assert f"{bad}:15: groups.web.target: " in err
    assert f"{good}: ok (2 replicas, 1 groups)" in out


def test_check_config_missing_file(tmp_path, capsys):
    assert check_main([str(tmp_path / "none.yaml")]) == 1
    assert "none.yaml" in capsys.readouterr().err


def test_check_config_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        check_main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


POLICIES = BASE + textwrap.dedent("""\
    policies:
      - group: web
        proto: tcp
        dport: 80
      - group: default
        src: 10.0.0.0/8
        sport: 1000-2000
    """)


def test_policies_and_packets_section():
    cfg = parse_config(POLICIES + "packets:\n  ring_slots: 256\n")
    assert [r.group for r in cfg.policies] == ["web", "default"]
    assert cfg.policies[0].proto == "tcp" and cfg.policies[0].dport == 80
    assert cfg.policies[1].sport == "1000-2000" and cfg.policies[1].src == "10.0.0.0/8"
    assert cfg.packets.ring_slots == 256 and cfg.packets.mtu == 1500
    assert parse_config(BASE).policies == []


@pytest.mark.parametrize("old,new,line,key,fragment", [
    ("  - group: web\n", "  - group: mail\n", 17, "policies[0].group", "is not defined"),
    ("    proto: tcp\n", "    proto: sctpx\n", 18, "policies[0].proto", "not a protocol"),
    ("    dport: 80\n", "    dport: 90000\n", 19, "policies[0].dport", "0..65535"),
    ("    sport: 1000-2000\n", "    sport: 2000-1000\n", 22, "policies[1].sport", "LO-HI"),
    ("    src: 10.0.0.0/8\n", "    src: 10.0.0.300/8\n", 21, "policies[1].src", "not an address"),
    ("    dport: 80\n", "    dport: 80\n    bogus: 1\n", 20, "policies[0].bogus", "unknown key"),
])
def test_policy_errors_are_located(tmp_path, old, new, line, key, fragment):
    expect_error(tmp_path, edit(old, new, POLICIES), line, key, fragment)


def test_packets_errors(tmp_path):
    expect_error(tmp_path, BASE + "packets:\n  ring_slots: 1000\n", 17, "packets.ring_slots",
                 "power of two")
    expect_error(tmp_path, BASE + "packets:\n  mtu: 1400\n", 17, "packets.mtu", "between 1500")
    expect_error(tmp_path, BASE + "policies: {a: 1}\n", 16, "policies", "list")
    two_groups = edit("groups:\n", "groups:\n  extra:\n    id: 9\n") + "packets:\n  max_groups: 2\n"
    expect_error(tmp_path, two_groups, 12, "groups", "exceed packets.max_groups")


def test_metrics_ports_leave_room_for_the_pmm_and_the_rm(tmp_path):
    r1 = "    smm_endpoint: tcp://127.0.0.1:7101\n"
    close = edit("    id: 2\n", "    id: 2\n    metrics_port: 9402\n",
                 edit(r1, r1 + "    metrics_port: 9400\n"))
    expect_error(tmp_path, close, 11, "replicas.r2.metrics_port", "within 3")
    spaced = close.replace("9402", "9403")
    assert load_text(tmp_path, spaced)[0].replicas["r2"].metrics_port == 9403
    high = edit(r1, r1 + "    metrics_port: 65534\n")
    expect_error(tmp_path, high, 8, "replicas.r1.metrics_port", "at most 65533")


SDN = """sdn:
  placement: chords
  client_subnet: 10.70.0.0/24
  buckets: 8
  hosts:
    c1: {port: 1, role: client}
    s1: {port: 2, role: server}
"""


def _with_switch(text: str) -> str:
    text = text.replace("    smm_endpoint: tcp://127.0.0.1:7101\n",
                        "    smm_endpoint: tcp://127.0.0.1:7101\n    switch_port: 3\n"
                        "    mac: 0e:00:00:00:00:03\n")
    return text.replace("    rm_endpoint: tcp://127.0.0.1:7202\n",
                        "    rm_endpoint: tcp://127.0.0.1:7202\n    switch_port: 4\n"
                        "    mac: 0e:00:00:00:00:04\n")


def test_chords_adds_one_group_per_backup(tmp_path):
    cfg, _ = load_text(tmp_path, _with_switch(BASE) + SDN)
    assert cfg.sdn.buckets == 8 and cfg.sdn.hosts["c1"].role == "client"
    to = {n: (g.id, g.target) for n, g in cfg.groups.items() if n.startswith("to-")}
    assert to == {"to-r1": (1001, "r1"), "to-r2": (1002, "r2")}
    assert cfg.groups["web"].id == 1                       # the user's groups stay
    assert load_text(tmp_path, BASE)[0].sdn is None        # no sdn section: no chords


def test_sdn_errors_are_located(tmp_path):
    expect_error(tmp_path, BASE + SDN, 5, "replicas.r1", "needs switch_port")
    no_subnet = SDN.replace("  client_subnet: 10.70.0.0/24\n", "")
    expect_error(tmp_path, _with_switch(BASE) + no_subnet, 20, "sdn", "client_subnet")
    clash = SDN.replace("s1: {port: 2", "s1: {port: 3")
    expect_error(tmp_path, _with_switch(BASE) + clash, 8, "replicas.r1.switch_port",
                 "already used by sdn.hosts.s1.port")
    odd = SDN.replace("buckets: 8", "buckets: 6")
    expect_error(tmp_path, _with_switch(BASE) + odd, 23, "sdn.buckets", "power of two")
    taken = _with_switch(BASE).replace("    id: 1\n    target: r2", "    id: 1002\n    target: r2")
    expect_error(tmp_path, taken + SDN, 17, "groups.web", "clashes with the chords group")


def test_sdn_metrics_port_must_not_be_one_of_a_replicas_three():
    from shared.config import parse_config
    from shared.errors import ConfigError
    text = """version: 1
cluster: {name: t}
replicas:
  r1: {id: 1, smm_endpoint: "tcp://127.0.0.1:7001", metrics_port: 9400}
sdn: {placement: streams, metrics_port: PORT}
"""
    assert parse_config(text.replace("PORT", "9403")).sdn.metrics_port == 9403
    with pytest.raises(ConfigError) as e:
        parse_config(text.replace("PORT", "9402"))
    assert "sdn.metrics_port" in str(e.value) and "9400..9402" in str(e.value)
