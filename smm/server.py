"""The SMM process shell: a ZeroMQ ROUTER loop, the watchdog on the same thread, signals, metrics.

One thread does everything, so the segment's counters keep one writer and no request races the
watchdog. The poll timeout is the heartbeat interval: the watchdog runs at least that often.
"""
from __future__ import annotations

import signal
import time

import zmq

from shared import log as pico_log
from shared.auth import gatekeeper, refused_metric
from shared.errors import PicoError
from shared.security import Keyring
from smm.service import SmmService
from smm.store import FlowStore
from smm.watchdog import Watchdog


class SmmServer:
    def __init__(self, config, replica: str, metrics: bool = True):
        self.log = pico_log.get_logger("smm", replica=replica)
        keyring = Keyring(config, replica)  # before the segment: a missing key fails cleanly
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
        self.gate = gatekeeper(self.ctx, keyring, self.log)
        if self.gate is not None:
            self.gate.protect(self.sock, self.endpoint)
        self.sock.bind(self.endpoint)
        self._stop = False
        self.watchdog_errors = 0
        self.watchdog_errors = 0
        self.metrics = _Metrics(replica, self.store.replica.metrics_port, self) if metrics else None
        self.log.info(f"flow segment {self.store.name} ready: {self.store.geometry.n_slots} "
                      f"slots, {self.store.geometry.n_stripes} stripes; control on "
                      f"{self.endpoint}" + (" (CURVE)" if self.gate else ""))

    def stop(self, *_):
        self._stop = True

    def serve(self) -> None:
        next_watch = 0.0
        while not self._stop:
            if self.sock.poll(int(self.interval * 1000), zmq.POLLIN):
                self._serve_one()
            now = time.monotonic()
            if now >= next_watch:
                try:
                    self.watchdog.run_once(now)
                except PicoError as e:  # e.g. a stripe busy past its timeout: next pass retries
                    self.watchdog_errors += 1
                    self.log.warning(f"watchdog pass failed, retrying next pass: {e}")
                next_watch = now + self.interval

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
        if self.gate is not None:
            self.gate.close()
        self.ctx.term()
        self.store.close(unlink=True)
        self.log.info("stopped; segment and lock stripes removed")


class _Metrics:
    """Prometheus metrics on the replica's metrics_port: a collector read at scrape time (own
    registry, no global state). Values are copied from the serving thread's counters; a dict
    copy is atomic under the GIL, so a scrape never sees a half-updated table."""

    def __init__(self, replica: str, port: int | None, server: "SmmServer"):
        from prometheus_client import CollectorRegistry, start_http_server
        self.replica = replica
        self.server = server
        self.registry = CollectorRegistry()
        self.registry.register(self)
        if port:
            start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        service, r = self.server.service, self.replica
        flows = GaugeMetricFamily("pico_smm_flows", "Flow slots by status",
                                  labels=["replica", "status"])
        for status, n in service.flow_counts().items():
            flows.add_metric([r, status], n)
        yield flows
        for name, doc, label, values in (
                ("pico_smm_requests", "Control requests served, by type", "type",
                 dict(service.requests)),
                ("pico_smm_request_errors", "Rejected control requests, by error", "error",
                 dict(service.errors)),
                ("pico_smm_events", "Segment counters: installs, activations, recoveries",
                 "counter", {k: v for k, v in service.store.counter_values().items()
                             if k != "heartbeat_ns"})):
            fam = CounterMetricFamily(name, doc, labels=["replica", label])
            for key, n in values.items():
                fam.add_metric([r, key], n)
            yield fam
        errs = CounterMetricFamily("pico_smm_watchdog_errors", "Watchdog passes that failed",
                                   labels=["replica"])
        errs.add_metric([r], self.server.watchdog_errors)
        yield errs
        yield refused_metric(r, self.server.gate)


def run(config, replica: str) -> int:
    server = SmmServer(config, replica)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    try:
        server.serve()
    finally:
        server.close()
    return 0
