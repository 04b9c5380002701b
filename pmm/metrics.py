"""Prometheus metrics of the PMM, read from the packet segment at scrape time.

Port convention: a replica's `metrics_port` is its SMM's; the PMM serves on metrics_port+1 and
the RM on metrics_port+2 (rm/metrics.py), all on 127.0.0.1. No metrics_port, no HTTP server.
"""
from __future__ import annotations

from shared import log as pico_log
from shared.errors import ConfigError, PicoError

PORT_OFFSET = 1
# heartbeat_ns is a clock and pending a level, not counts: pending is a gauge of its own.
_NOT_COUNTERS = ("heartbeat_ns", "pending")
_GROUP_COUNTERS = (("rx_packets", "Packets queued for the group"),
                   ("released", "Output packets of the group released by output commit"),
                   ("input_drops", "Packets dropped because the group's input ring was full"))
_GROUP_GAUGES = (("held", "Output packets held for output commit"),
                 ("input_queued", "Packets in the input ring"),
                 ("output_queued", "Packets in the output ring"),
                 ("epoch", "The open checkpoint epoch"),
                 ("committed", "The last epoch the backup acknowledged"))


def port_for(metrics_port: int | None, offset: int = PORT_OFFSET) -> int | None:
    """The port a process serves on: the replica's metrics_port plus its offset, or None."""
    return metrics_port + offset if metrics_port else None


def serve(registry, port: int | None, what: str):
    """start_http_server on 127.0.0.1 (None: no server); a clear error if the port is taken,
    since a consecutive metrics_port of another replica on this host collides."""
    if not port:
        return None
    from prometheus_client import start_http_server
    if port > 65535:
        raise ConfigError(f"{what} metrics port {port} is above 65535: metrics_port must be at "
                          "most 65533 (the PMM serves on +1, the RM on +2)")
    try:
        return start_http_server(port, addr="127.0.0.1", registry=registry)[0]
    except OSError as e:
        raise PicoError(f"cannot serve {what} metrics on 127.0.0.1:{port} ({e}): the PMM uses "
                          "metrics_port+1 and the RM metrics_port+2, so space replicas' "
                          "metrics_port at least 3 apart") from None


class PmmMetrics:
    """Prometheus metrics of one PMM: a collector on its own registry (no global state) that
    copies the segment's counters and group table when scraped, so the packet path does no
    extra work. A scrape never raises: after close() (views released) it is empty."""

    def __init__(self, replica_name: str, port: int | None, seg):
        from prometheus_client import CollectorRegistry
        self.replica = replica_name
        self.seg = seg
        # (problem kind, malformed) -> packets without a flow key: Ingress.noflow, set by the
        # PMM once its Ingress exists.
        self.noflow: dict = {}
        self.log = pico_log.get_logger("pmm", replica=replica_name)
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.httpd = serve(self.registry, port, "PMM")

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        r = self.replica
        try:
            c = self.seg.counters
            counts = {n: int(c[n]) for n in c.dtype.names if n != "reserved"}
            stats = self.seg.group_stats()
        except Exception as e:  # views released at close, or a table being rewritten
            self.log.debug(f"metrics scrape skipped: {e!r}")
            return
        fam = CounterMetricFamily("pico_pmm_packets", "Packet segment counters",
                                  labels=["replica", "counter"])
        for name, n in counts.items():
            if name not in _NOT_COUNTERS:
                fam.add_metric([r, name], n)
        yield fam
        pending = GaugeMetricFamily("pico_pmm_pending", "Packets awaiting their verdict",
                                    labels=["replica"])
        pending.add_metric([r], counts["pending"])
        yield pending
        noflow = CounterMetricFamily("pico_pmm_noflow_packets", "Packets no flow key could be "
                                     "derived from (sent to the default group), by reason",
                                     labels=["replica", "reason", "malformed"])
        for (reason, malformed), n in list(self.noflow.items()):
            noflow.add_metric([r, reason, "true" if malformed else "false"], n)
        yield noflow
        for kind, fields in ((CounterMetricFamily, _GROUP_COUNTERS),
                             (GaugeMetricFamily, _GROUP_GAUGES)):
            for field, doc in fields:
                fam = kind(f"pico_pmm_group_{field}", doc, labels=["replica", "group"])
                for g in stats:
                    fam.add_metric([r, str(g["id"])], g[field])
                yield fam

    def close(self) -> None:
        """Stop the HTTP server before the segment is unmapped."""
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
