"""The C and Python views of pico_abi.h agree: struct layouts, constants, flow keys and hashes.

Builds libpico and tests/c (abi_offsets, flowtool) with make, then compares the compiler's
offsetof/sizeof with the numpy dtypes of shared/abi.py, and flowtool's keys and hashes with
shared/flowkey.py.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from shared import abi
from shared.flowkey import hash_key, make_key

ROOT = Path(__file__).parents[1]
BUILD = ROOT / "tests" / "c" / "build"

pytestmark = pytest.mark.cbuild


@pytest.fixture(scope="module")
def c_layout(cbuild: Path) -> dict:
    proc = subprocess.run([str(cbuild / "abi_offsets")], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout)


def _py_fields(dtype) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of a structured dtype."""
    return {name: (off, sub.itemsize) for name, (sub, off, *_) in dtype.fields.items()}


@pytest.mark.parametrize("cname", sorted(abi.C_STRUCTS))
def test_struct_layout_matches(c_layout: dict, cname: str) -> None:
    dtype = abi.C_STRUCTS[cname]
    assert cname in c_layout, f"abi_offsets.c does not print struct {cname}"
    c = c_layout[cname]
    assert dtype.itemsize == c["sizeof"], (
        f"{cname}: sizeof is {c['sizeof']} in C but the dtype is {dtype.itemsize} bytes")
    py = _py_fields(dtype)
    c_fields = c["fields"]
    allowed_py_only = {"state"} if cname == "pico_flow_slot" else set()
    missing_in_py = set(c_fields) - set(py)
    assert not missing_in_py, f"{cname}: C fields missing from shared/abi.py: {missing_in_py}"
    missing_in_c = set(py) - set(c_fields) - allowed_py_only
    assert not missing_in_c, f"{cname}: abi.py fields absent from pico_abi.h: {missing_in_c}"
    for name, c_off in c_fields.items():
        py_off, py_size = py[name]
        assert py_off == c_off, f"{cname}.{name}: offset {c_off} in C, {py_off} in abi.py"
        c_size = c["field_sizes"][name]
        assert py_size == c_size, f"{cname}.{name}: {c_size} bytes in C, {py_size} in abi.py"


def test_every_c_struct_is_mirrored(c_layout: dict) -> None:
    c_structs = set(c_layout) - {"constants"}
    assert c_structs == set(abi.C_STRUCTS), (
        f"structs only in C: {c_structs - set(abi.C_STRUCTS)}; "
        f"only in abi.C_STRUCTS: {set(abi.C_STRUCTS) - c_structs}")


CONSTANTS = {
    "PICO_ABI_MAJOR": "ABI_MAJOR",
    "PICO_ABI_MINOR": "ABI_MINOR",
    "PICO_MAGIC": "MAGIC",
    "PICO_READY": "READY",
    "PICO_CLOSED": "CLOSED",
    "PICO_SEG_FLOWS": "SEG_FLOWS",
    "PICO_SEG_PACKETS": "SEG_PACKETS",
    "PICO_SEG_GROUPS": "SEG_GROUPS",
    "PICO_STATUS_FREE": "STATUS_FREE",
    "PICO_STATUS_ACTIVE": "STATUS_ACTIVE",
    "PICO_STATUS_STANDBY": "STATUS_STANDBY",
    "PICO_STATUS_TOMBSTONE": "STATUS_TOMBSTONE",
    "PICO_GROUP_DEFAULT": "GROUP_DEFAULT",
    "PICO_MAX_CLIENTS": "MAX_CLIENTS",
    "PICO_SLOT_HEADER": "SLOT_HEADER",
    "PICO_SLOT_ALIGN": "SLOT_ALIGN",
    "PICO_SEM_PREFIX_LEN": "SEM_PREFIX_LEN",
    "PICO_FLOW_DESC_OFFSET": "FLOW_DESC_OFFSET",
    "PICO_FLOW_COUNTERS_OFFSET": "FLOW_COUNTERS_OFFSET",
    "PICO_CLIENTS_OFFSET": "CLIENTS_OFFSET",
    "PICO_PKT_DESC_OFFSET": "PKT_DESC_OFFSET",
    "PICO_PKT_COUNTERS_OFFSET": "PKT_COUNTERS_OFFSET",
    "PICO_GROUPS_OFFSET": "GROUPS_OFFSET",
    "PICO_PKT_META_SIZE": "PKT_META_SIZE",
    "PICO_RING_HEADER_SIZE": "RING_HEADER_SIZE",
    "PICO_PKT_NEW": "PKT_NEW",
    "PICO_PKT_MODIFIED": "PKT_MODIFIED",
    "PICO_PKT_DIRECT": "PKT_DIRECT",
    "PICO_PKT_DROP": "PKT_DROP",
    "PICO_PKT_CREATED": "PKT_CREATED",
    "PICO_PKT_IPV6": "PKT_IPV6",
    "PICO_PKT_NOFLOW": "PKT_NOFLOW",
}


@pytest.mark.parametrize("cname,pyname", sorted(CONSTANTS.items()))
def test_constant_matches(c_layout: dict, cname: str, pyname: str) -> None:
    consts = c_layout["constants"]
    assert cname in consts, f"abi_offsets.c does not print {cname}"
    assert consts[cname] == getattr(abi, pyname), (
        f"{cname} = {consts[cname]:#x} in C but abi.{pyname} = {getattr(abi, pyname):#x}")


def test_segment_offsets_consistent() -> None:
    """The fixed offsets follow from the struct sizes, as the header's layout diagram says."""
    assert abi.FLOW_DESC_OFFSET == abi.SEG_HEADER.itemsize
    assert abi.FLOW_COUNTERS_OFFSET == abi.FLOW_DESC_OFFSET + abi.FLOW_DESC.itemsize
    assert abi.CLIENTS_OFFSET == abi.FLOW_COUNTERS_OFFSET + abi.FLOW_COUNTERS.itemsize


# (proto, src, sport, dst, dport): both families, both orders, equal addresses, ICMP, extremes.
TUPLES = [
    ("tcp", "10.0.0.1", 1234, "10.0.0.2", 80),
    ("tcp", "10.0.0.2", 80, "10.0.0.1", 1234),
    ("udp", "192.168.1.10", 53, "8.8.8.8", 40000),
    ("udp", "8.8.8.8", 40000, "192.168.1.10", 53),
    ("tcp", "10.0.0.1", 5000, "10.0.0.1", 80),      # same address: ports decide
    ("tcp", "10.0.0.1", 80, "10.0.0.1", 5000),
    ("tcp", "10.0.0.1", 80, "10.0.0.1", 80),        # identical endpoints
    ("icmp", "10.1.2.3", 777, "10.3.2.1", 0),
    ("tcp", "0.0.0.0", 0, "255.255.255.255", 65535),
    ("tcp", "255.255.255.255", 65535, "0.0.0.0", 0),
    ("132", "172.16.0.1", 2905, "172.16.0.2", 2905),  # SCTP by number
    ("tcp", "2001:db8::1", 443, "2001:db8::2", 51000),
    ("tcp", "2001:db8::2", 51000, "2001:db8::1", 443),
    ("udp", "fe80::1", 546, "ff02::1:2", 547),
    ("udp", "ff02::1:2", 547, "fe80::1", 546),
    ("icmp6", "::1", 9, "::1", 0),
    ("tcp", "::", 1, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 2),
    ("tcp", "::ffff:10.0.0.1", 1234, "::ffff:10.0.0.2", 80),  # IPv4-mapped text is family 6
    ("17", "10.255.0.1", 65535, "10.0.255.1", 1),
    ("tcp", "10.0.0.9", 1, "10.0.0.10", 1),
]
PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58}


def _flowtool_key(build: Path, proto: str, src: str, sport: int, dst: str, dport: int):
    proc = subprocess.run([str(build / "flowtool"), "-", "key", proto, src, str(sport), dst,
                           str(dport)], capture_output=True, text=True)
    assert proc.returncode == 0, f"flowtool key failed: {proc.stderr}"
    key_hex, hash_hex = proc.stdout.split()
    return key_hex, hash_hex


@pytest.mark.parametrize("proto,src,sport,dst,dport", TUPLES)
def test_flowtool_key_matches_python(cbuild: Path, proto, src, sport, dst, dport) -> None:
    pnum = PROTOS.get(proto) or int(proto)
    key = make_key(src, sport, dst, dport, pnum)
    key_hex, hash_hex = _flowtool_key(cbuild, proto, src, sport, dst, dport)
    assert key_hex == key.hex(), f"C key {key_hex} != Python key {key.hex()}"
    assert hash_hex == format(hash_key(key), "016x")
    # the reverse direction gives the same key, on both sides
    rev_hex, rev_hash = _flowtool_key(cbuild, proto, dst, dport, src, sport)
    assert (rev_hex, rev_hash) == (key_hex, hash_hex)
    assert make_key(dst, dport, src, sport, pnum) == key


@pytest.mark.parametrize("i", [0, 1, 255, 256, 49999, 50000, 65536, 123456, (1 << 24) - 1])
def test_flowtool_bench_keys_match_documented_derivation(cbuild: Path, i: int) -> None:
    """flowtool fill/bench key i is the Python expression its header documents."""
    proc = subprocess.run([str(cbuild / "flowtool"), "-", "bench-key", str(i)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    key = make_key(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 1000 + i % 50000,
                   "192.168.0.1", 80, 6)
    assert proc.stdout.split() == [key.hex(), format(hash_key(key), "016x")]
