"""Prometheus metrics of the PMM and the RM: what a scrape shows, read from live objects."""
import socket
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, write_config
from pktbuild import web
from pmm import metrics as pmm_metrics
from pmm.metrics import PmmMetrics
from rm import metrics as rm_metrics
from rm.epochs import GroupEpochs
from rm.metrics import RmMetrics
from shared.errors import PicoError

WEB = 1


def samples(registry) -> dict:
    """(sample name, sorted label items) -> value, parsed back from the text exposition."""
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def lab(**kw) -> tuple:
    return tuple(sorted(kw.items()))


def test_port_convention():
    assert pmm_metrics.port_for(None) is None and rm_metrics.port_for(None) is None
    assert (pmm_metrics.port_for(9400), rm_metrics.port_for(9400)) == (9401, 9402)


# ---------------------------------------------------------------- PMM
def test_pmm_metrics_read_the_segment_at_scrape_time(packet_bed):
    store, ingress, releaser, _, _, _ = packet_bed
    from shared.packets import attach_packets
    m = PmmMetrics("r1", None, store.seg)
    before = samples(m.registry)
    assert before[("pico_pmm_packets_total", lab(replica="r1", counter="rx_packets"))] == 0
    with attach_packets(store.name) as mb:
        for i in range(3):
            ingress.on_packet(i + 1, web(i))
        for _ in range(2):
            mb.pkt_write(mb.pkt_read(timeout=1))  # held: epoch 1 is not committed
    assert releaser.drain() == []  # the releaser counts what it holds
    store.seg.counters["pending"] = 3
    s = samples(m.registry)
    g = lab(replica="r1", group=str(WEB))
    assert s[("pico_pmm_packets_total", lab(replica="r1", counter="rx_packets"))] == 3
    assert s[("pico_pmm_pending", lab(replica="r1"))] == 3
    assert s[("pico_pmm_group_rx_packets_total", g)] == 3
    assert s[("pico_pmm_group_held", g)] == 2
    assert s[("pico_pmm_group_input_queued", g)] == 1
    assert s[("pico_pmm_group_output_queued", g)] == 2
    assert s[("pico_pmm_group_epoch", g)] == 1 and s[("pico_pmm_group_committed", g)] == 0
    assert s[("pico_pmm_group_released_total", g)] == 0
    assert s[("pico_pmm_group_input_drops_total", g)] == 0
    assert ("pico_pmm_group_held", lab(replica="r1", group="0")) in s  # the default group too
    counters = {dict(k[1])["counter"] for k in s if k[0] == "pico_pmm_packets_total"}
    assert "heartbeat_ns" not in counters and "pending" not in counters
    assert "output_errors" in counters and "reserved" not in counters


def test_pmm_scrape_after_views_are_released_is_empty_not_an_error(packet_bed):
    store = packet_bed[0]
    m = PmmMetrics("r1", None, store.seg)
    assert samples(m.registry)
    store.seg.release_views()  # what PacketStore.close() does before unmapping
    assert samples(m.registry) == {}


def test_metrics_are_served_over_http_on_loopback(packet_bed):
    store = packet_bed[0]
    port = free_port()
    m = PmmMetrics("r1", port, store.seg)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b'pico_pmm_group_epoch{group="1",replica="r1"} 1.0' in text
    finally:
        m.close()
    with pytest.raises(OSError):  # close() stopped the server
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_a_taken_port_fails_loudly(packet_bed):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(PicoError, match="metrics_port"):
            PmmMetrics("r1", s.getsockname()[1], packet_bed[0].seg)


def test_pmm_server_serves_on_metrics_port_plus_one(tmp_path, smm_factory):
    from conftest import PACKET_GROUPS
    from pmm.server import PmmServer
    cfg = write_config(tmp_path, metrics=True, extra=PACKET_GROUPS)
    smm_factory(cfg, "r1")
    server = PmmServer(cfg, "r1")
    try:
        url = f"http://127.0.0.1:{cfg.replica('r1').metrics_port + 1}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        assert 'pico_pmm_packets_total{counter="rx_packets",replica="r1"} 0.0' in text
    finally:
        server.close()


# ---------------------------------------------------------------- RM
def fake_rm(groups: dict, stats: list | None = None, fail: bool = False):
    def group_stats():
        if fail:
            raise TypeError("views released")
        return stats or []
    return SimpleNamespace(groups=groups, seg=SimpleNamespace(group_stats=group_stats))


def run_epochs(ge: GroupEpochs, n: int, t: float = 0.0, rtt: float = 0.002) -> float:
    """n epochs, each suspended, captured, sent and acked rtt later; the clock at the end."""
    for _ in range(n):
        t = max(t, ge.next_due)
        ge.step(t)
        ge.step(t + 0.0001)
        t += 0.0001 + rtt
        ge.on_ack(ge.epoch - 1, t)
    return t


def test_rm_metrics_per_group():
    web, dns = GroupEpochs(1, 100, 0.0), GroupEpochs(2, 500, 0.0)
    run_epochs(web, 5)
    web.bytes_last, web.retries, web.stuck = 4096, 2, 1
    dns.step(dns.next_due)
    dns.step(dns.next_due + 0.0001)  # epoch 1 sent, not acked yet
    m = RmMetrics("r1", None, fake_rm({1: web, 2: dns}, [{"id": 1, "held": 7},
                                                          {"id": 9, "held": 3}]))
    s = samples(m.registry)
    g1, g2 = lab(replica="r1", group="1"), lab(replica="r1", group="2")
    g9 = lab(replica="r1", group="9")  # in the table, not protected (its backup gave up)
    assert s[("pico_rm_group_protected", g9)] == 0 and s[("pico_rm_group_held", g9)] == 3
    assert ("pico_rm_group_configured_hz", g9) not in s
    assert s[("pico_rm_group_configured_hz", g1)] == 100
    assert s[("pico_rm_group_achieved_hz", g1)] == pytest.approx(100, rel=0.01)
    assert s[("pico_rm_group_protected", g1)] == 1
    assert s[("pico_rm_group_committed_epoch", g1)] == 5
    assert s[("pico_rm_group_checkpoints_total", g1)] == 5
    assert s[("pico_rm_group_retries_total", g1)] == 2
    assert s[("pico_rm_group_stuck_total", g1)] == 1
    assert s[("pico_rm_group_bytes_per_checkpoint", g1)] == 4096
    assert s[("pico_rm_group_held", g1)] == 7
    assert ("pico_rm_group_held", g2) not in s  # not in the group table: no sample, no guess
    assert s[("pico_rm_group_inflight", g1)] == 0 and s[("pico_rm_group_inflight", g2)] == 1
    assert s[("pico_rm_group_committed_epoch", g2)] == 0
    q = {k[1]: v for k, v in s.items() if k[0] == "pico_rm_group_commit_latency_seconds"}
    assert q[lab(replica="r1", group="1", quantile="0.5")] == pytest.approx(0.002)
    assert q[lab(replica="r1", group="1", quantile="0.99")] == pytest.approx(0.002)
    assert not any(dict(k)["group"] == "2" for k in q)  # no acks yet: no quantiles


def test_rm_latency_quantiles_use_the_last_1000():
    ge = GroupEpochs(3, 1000, 0.0)
    ge.commit_latencies[:] = [10.0] * 500 + [i / 1000 for i in range(1, 1001)]
    s = samples(RmMetrics("r1", None, fake_rm({3: ge})).registry)
    g = dict(replica="r1", group="3")
    assert s[("pico_rm_group_commit_latency_seconds", lab(quantile="0.5", **g))] == \
        pytest.approx(0.5005)
    assert s[("pico_rm_group_commit_latency_seconds", lab(quantile="0.99", **g))] == \
        pytest.approx(0.99001)


def test_rm_scrape_never_raises():
    good, bad = GroupEpochs(1, 100, 0.0), SimpleNamespace()  # bad: no attributes at all
    good.protected = False
    m = RmMetrics("r1", None, fake_rm({1: good, 2: bad}, fail=True))
    s = samples(m.registry)
    assert s[("pico_rm_group_protected", lab(replica="r1", group="1"))] == 0
    assert not any(dict(k[1]).get("group") == "2" for k in s)
    assert not any(k[0] == "pico_rm_group_held" for k in s)


def test_rm_metrics_served_over_http():
    port = free_port()
    m = RmMetrics("r2", port, fake_rm({1: GroupEpochs(1, 100, 0.0)}))
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b'pico_rm_group_configured_hz{group="1",replica="r2"} 100.0' in text
    finally:
        m.close()
