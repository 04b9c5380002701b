"""Prometheus metrics of the RM: per protected group, its checkpoint epochs at scrape time.

Port convention: a replica's `metrics_port` is its SMM's; the PMM serves on metrics_port+1 and
the RM on metrics_port+2, all on 127.0.0.1. The caller passes the port to serve on:
`RmMetrics(name, port_for(replica.metrics_port), server)`; None means no HTTP server.
"""
from __future__ import annotations

import numpy as np

from pmm.metrics import port_for as _port_for, serve
from shared import log as pico_log

PORT_OFFSET = 2
LATENCY_WINDOW = 1000  # commit latencies the quantiles are computed over
_GAUGES = (("configured_hz", "Checkpoint frequency the group is configured for"),
           ("achieved_hz", "Checkpoints committed per second (last 256 commits)"),
           ("protected", "1 while the backup answers; 0 once the group is unprotected"),
           ("committed_epoch", "The last epoch the backup acknowledged"),
           ("inflight", "Epochs sent and not yet acknowledged"),
           ("held", "Output packets held for output commit"),
           ("bytes_per_checkpoint", "Bytes of the last checkpoint sent"))
_COUNTERS = (("retries", "Checkpoint sends retried after an ack timeout"),
             ("stuck", "Epochs not taken because the group did not drain in time"),
             ("checkpoints", "Acks that advanced the committed epoch (since this RM started)"))


def port_for(metrics_port: int | None) -> int | None:
    """The RM's port: the replica's metrics_port + 2, or None."""
    return _port_for(metrics_port, PORT_OFFSET)


def _values(ge, held: int | None) -> dict:
    """One group's samples; plain attribute reads, so a scrape needs no lock."""
    return {"configured_hz": ge.frequency_hz, "achieved_hz": ge.achieved_hz(),
            "protected": int(ge.protected), "committed_epoch": ge.committed,
            "inflight": len(ge.inflight), "held": held, "bytes_per_checkpoint": ge.bytes_last,
            "retries": ge.retries, "stuck": ge.stuck, "checkpoints": ge.commits}


class RmMetrics:
    """Prometheus metrics of one RM: a collector on its own registry (no global state). The
    RM thread keeps mutating its GroupEpochs while we read them from the HTTP thread, so we
    copy (a list of the groups, a slice of the latencies: atomic under the GIL) and never
    raise: a bad group is skipped, not the whole scrape."""

    def __init__(self, replica_name: str, port: int | None, server):
        from prometheus_client import CollectorRegistry
        self.replica = replica_name
        self.server = server
        self.log = pico_log.get_logger("rm", replica=replica_name)
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.httpd = serve(self.registry, port, "RM")

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        r = self.replica
        try:
            held = {g["id"]: g["held"] for g in self.server.seg.group_stats()}
        except Exception as e:  # segment views released at shutdown
            self.log.debug(f"metrics: no group table: {e!r}")
            held = {}
        rows, latency = [], []
        for gid, ge in list(self.server.groups.items()):
            try:
                rows.append((str(gid), _values(ge, held.get(gid))))
                lat = ge.commit_latencies[-LATENCY_WINDOW:]
                if lat:
                    latency.append((str(gid), np.quantile(np.asarray(lat), [0.5, 0.99])))
            except Exception as e:
                self.log.debug(f"metrics: group {gid} skipped: {e!r}")
        for gid in sorted(set(held) - set(self.server.groups) - {0}):  # unprotected groups
            values = dict.fromkeys(f for f, _ in _GAUGES + _COUNTERS)
            values.update(protected=0, held=held[gid])
            rows.append((str(gid), values))
        for kind, fields in ((GaugeMetricFamily, _GAUGES), (CounterMetricFamily, _COUNTERS)):
            for field, doc in fields:
                fam = kind(f"pico_rm_group_{field}", doc, labels=["replica", "group"])
                for gid, v in rows:
                    if v[field] is not None:
                        fam.add_metric([r, gid], v[field])
                yield fam
        fam = GaugeMetricFamily("pico_rm_group_commit_latency_seconds",
                                f"Send-to-ack time of checkpoints (last {LATENCY_WINDOW})",
                                labels=["replica", "group", "quantile"])
        for gid, (p50, p99) in latency:
            fam.add_metric([r, gid, "0.5"], float(p50))
            fam.add_metric([r, gid, "0.99"], float(p99))
        yield fam
        control = getattr(self.server, "control", None)  # the control endpoint's RmControl
        if control is not None:
            for name, doc, label, values in (
                    ("pico_rm_requests", "Control requests served, by type", "type",
                     dict(control.requests)),
                    ("pico_rm_request_errors", "Rejected control requests, by error", "error",
                     dict(control.errors))):
                fam = CounterMetricFamily(name, doc, labels=["replica", label])
                for key, n in values.items():
                    fam.add_metric([r, key], n)
                yield fam
        from shared.auth import refused_metric
        yield refused_metric(r, getattr(self.server, "gate", None))

    def close(self) -> None:
        """Stop the HTTP server before the segment is unmapped."""
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
