"""Prometheus metrics of pico-sdn (sdn.metrics_port, 127.0.0.1): the view it steers, who is
alive and how recently each member beat, whether it suspects its own partition, the failovers
and scales it ran, its control requests and refusals. Read from the controller at scrape time
(plain attribute reads: the loop keeps running)."""
from __future__ import annotations

import time

from pmm.metrics import serve
from shared import log as pico_log


class SdnMetrics:
    def __init__(self, port: int | None, server):
        from prometheus_client import CollectorRegistry
        self.server = server
        self.log = pico_log.get_logger("sdn")
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.httpd = serve(self.registry, port, "pico-sdn")

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        s, core = self.server, self.server.core
        now = time.monotonic()
        yield GaugeMetricFamily("pico_sdn_view", "The membership view steered", value=core.view)
        yield GaugeMetricFamily("pico_sdn_isolated", "1 while most members are silent at once "
                                "(a suspected partition of this controller: no failover on "
                                "silence)", value=int(core.isolated))
        alive = GaugeMetricFamily("pico_sdn_member_alive", "1 for a member of the ring",
                                  labels=["replica"])
        age = GaugeMetricFamily("pico_sdn_heartbeat_age_seconds", "Since the member's last "
                                "healthy heartbeat", labels=["replica"])
        for r in core.replicas:
            alive.add_metric([r], int(r in core.alive))
            if r in core.alive:
                age.add_metric([r], max(0.0, now - core.last_beat[r]))
        yield alive
        yield age
        done = CounterMetricFamily("pico_sdn_operations", "Failovers and scales completed",
                                   labels=["kind"])
        kinds: dict[str, int] = {}
        for f in list(s.failovers):
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        for kind in ("failover", "scale-in", "scale-out"):
            done.add_metric([kind], kinds.get(kind, 0))
        yield done
        for name, doc, label, values in (
                ("pico_sdn_requests", "Requests and events taken, by type", "type",
                 dict(s.requests)),
                ("pico_sdn_request_errors", "Refused requests, by error", "error",
                 dict(s.errors))):
            fam = CounterMetricFamily(name, doc, labels=[label])
            for k, v in sorted(values.items()):
                fam.add_metric([str(k)], v)
            yield fam
        from shared.auth import refused_metric
        yield refused_metric("controller", getattr(s, "gate", None))

    def close(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
