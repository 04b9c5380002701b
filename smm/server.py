"""The SMM process shell: a ZeroMQ ROUTER loop, the watchdog on the same thread, signals, metrics.

One thread does everything, so the segment's counters keep one writer and no request races the
watchdog. The poll timeout is the heartbeat interval: the watchdog runs at least that often.
"""
from __future__ import annotations

import signal
import time

import zmq

from shared import log as pico_log
from smm.service import SmmService
from smm.store import FlowStore
from smm.watchdog import Watchdog

FLOW_GAUGE_PERIOD_S = 1.0


class SmmServer:
    def __init__(self, config, replica: str, metrics: bool = True):
        self.log = pico_log.get_logger("smm", replica=replica)
        self.store = FlowStore(config, replica)
        ctl = config.control
        self.service = SmmService(self.store, self.log, ctl.max_message_bytes)
        self.watchdog = Watchdog(self.store, self.log)
        self.interval = ctl.heartbeat_interval_ms / 1000.0
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # libzmq drops a peer that sends more than MAXMSGSIZE; above the application limit and
        # below this one, the peer gets a TOO_LARGE error reply instead.
        self.sock.setsockopt(zmq.MAXMSGSIZE, ctl.max_message_bytes * 4 + 4096)
        self.endpoint = self.store.replica.smm_endpoint
        self.sock.bind(self.endpoint)
        self._stop = False
        self.metrics = _Metrics(replica, self.store.replica.metrics_port) if metrics else None
        self.log.info(f"flow segment {self.store.name} ready: {self.store.geometry.n_slots} "
                      f"slots, {self.store.geometry.n_stripes} stripes; control on "
                      f"{self.endpoint}")

    def stop(self, *_):
        self._stop = True

    def serve(self) -> None:
        next_watch = 0.0
        next_gauge = 0.0
        while not self._stop:
            if self.sock.poll(int(self.interval * 1000), zmq.POLLIN):
                self._serve_one()
            now = time.monotonic()
            if now >= next_watch:
                self.watchdog.run_once(now)
                next_watch = now + self.interval
            if self.metrics and now >= next_gauge:
                self.metrics.update(self.service)
                next_gauge = now + FLOW_GAUGE_PERIOD_S

    def _serve_one(self) -> None:
        parts = self.sock.recv_multipart()
        ident, rest = parts[0], parts[1:]
        envelope = [b""] if rest and rest[0] == b"" else []
        body = rest[len(envelope):]
        if len(body) != 1:
            reply = self.service.bad_envelope(len(body))
        else:
            reply = self.service.handle(body[0])
        self.sock.send_multipart([ident, *envelope, reply])

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        self.store.close(unlink=True)
        self.log.info("stopped; segment and lock stripes removed")


class _Metrics:
    """Prometheus metrics on the replica's metrics_port (own registry, no global state)."""

    def __init__(self, replica: str, port: int | None):
        from prometheus_client import CollectorRegistry, Gauge, start_http_server
        self.registry = CollectorRegistry()
        labels = ["replica"]
        self.flows = Gauge("pico_smm_flows", "Flow slots by status", labels + ["status"],
                           registry=self.registry)
        self.requests = Gauge("pico_smm_requests_total", "Control requests served, by type",
                              labels + ["type"], registry=self.registry)
        self.errors = Gauge("pico_smm_request_errors_total", "Rejected control requests, by "
                            "error", labels + ["error"], registry=self.registry)
        self.counters = Gauge("pico_smm_events_total", "Segment counters (installs, "
                              "activations, recoveries)", labels + ["counter"],
                              registry=self.registry)
        self.replica = replica
        if port:
            start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def update(self, service: SmmService) -> None:
        r = self.replica
        for status, n in service.flow_counts().items():
            self.flows.labels(r, status).set(n)
        for t, n in service.requests.items():
            self.requests.labels(r, t).set(n)
        for e, n in service.errors.items():
            self.errors.labels(r, e).set(n)
        for c, n in service.store.counter_values().items():
            if c != "heartbeat_ns":
                self.counters.labels(r, c).set(n)


def run(config, replica: str) -> int:
    server = SmmServer(config, replica)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    try:
        server.serve()
    finally:
        server.close()
    return 0
