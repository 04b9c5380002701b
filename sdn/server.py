"""pico-sdn's shell: carries out sdn.core.Controller's decisions against the real parts.

- replicas' events on control.controller_endpoint (a ZeroMQ ROUTER): heartbeats (each RM
  says whether its replica's processes are all alive and beating), group_unprotected, ...;
- Faucet: its event socket (a replica's switch port going down is a failure at once) and the
  steering rules (sdn.steering -> faucet.yaml -> SIGHUP -> CONFIG_CHANGE success);
- each replica's SMM (ACTIVATE the failed replica's standby flows) and RM (VIEW: the new
  membership; it re-protects what it took over), without waiting on any one of them.
One thread. Reroutes block the loop for the reload (tens of ms; heartbeats queue meanwhile).
"""
from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import zmq

from shared import log as pico_log
from shared import wire
from shared.auth import gatekeeper
from shared.control import AsyncControl
from shared.errors import PicoError, WireError
from shared.security import CONTROLLER, Keyring

from .core import (Activate, Controller, Failed, FailoverDone, Freeze, Handoff, Isolated,
                   Reprotect, Reroute, ORDER_ACTIVATE_FIRST)
from .steering import Port, Topology, faucet_config


def topology(config) -> Topology | None:
    sdn = config.sdn
    if not sdn.hosts:
        return None
    hosts = sorted(sdn.hosts.values(), key=lambda h: h.port)
    return Topology("pico", sdn.dp_id, sdn.vid,
                    tuple(Port(h.name, h.port) for h in hosts if h.role == "client"),
                    tuple(Port(h.name, h.port) for h in hosts if h.role == "server"),
                    {r.name: Port(r.name, r.switch_port, r.mac) for r in config.replicas.values()},
                    sdn.buckets)


def ports_down(metrics_text: str) -> set[str]:
    """Port names Faucet's Prometheus `port_status` gauge says are down (0)."""
    import re
    down = set()
    for m in re.finditer(r'^port_status\{([^}]*)\}\s+([0-9.eE+-]+)\s*$', metrics_text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m[1]))
        if "port" in labels and float(m[2]) == 0.0:
            down.add(labels["port"])
    return down


def faucet_metrics(port: int, netns: str | None) -> str:
    if netns:
        from .testbed import http_get_in_netns
        return http_get_in_netns(netns, port)
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
        return r.read().decode(errors="replace")


def poke(port: int, netns: str | None) -> None:
    """Wake Faucet's eventlet hub: it acts on SIGHUP only at its next wakeup (any socket
    activity), so connect to its Prometheus port (notes: networking-stack §5)."""
    try:
        if netns:
            from .testbed import socket_in_netns
            s = socket_in_netns(netns)
        else:
            s = socket.socket()
        with s:
            s.settimeout(0.5)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    except (OSError, PicoError):
        pass


class SdnServer:
    def __init__(self, config, order: str = ORDER_ACTIVATE_FIRST, activate_delay: float = 0.0):
        if config.sdn is None:
            raise PicoError(f"{config.path} has no sdn section: pico-sdn needs one (placement, "
                            "buckets, edge ports)")
        if not config.control.controller_endpoint:
            raise PicoError(f"{config.path} has no control.controller_endpoint: replicas "
                            "report to it; add it")
        self.log = pico_log.get_logger("sdn")
        self.config = config
        sdn = config.sdn
        self.ids = {r.name: r.id for r in config.replicas.values()}
        self.by_port = {r.switch_port: r.name for r in config.replicas.values() if r.switch_port}
        self.core = Controller(list(config.replicas), time.monotonic(),
                               heartbeat_timeout=sdn.heartbeat_timeout_ms / 1000.0,
                               vnodes=sdn.vnodes, buckets=sdn.buckets,
                               activation_timeout=sdn.activation_timeout_ms / 1000.0, order=order,
                               members=sdn.members,
                               beat_interval=config.control.heartbeat_interval_ms / 1000.0,
                               chord_groups={r.name: sdn.CHORD_GROUP_BASE + r.id
                                             for r in config.replicas.values()}
                               if sdn.placement == "chords" else None)
        self.topo = topology(config)
        keys = Keyring(config, CONTROLLER)  # security.curve: the controller's key pair
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # As the SMM's: libzmq drops a peer whose message is over this (no reply, no count);
        # between max_message_bytes and it, the peer gets TOO_LARGE (docs/protocol.md 6).
        self.sock.setsockopt(zmq.MAXMSGSIZE, config.control.max_message_bytes * 4 + 4096)
        self.gate = gatekeeper(self.ctx, keys, self.log)
        if self.gate is not None:
            self.gate.protect(self.sock, config.control.controller_endpoint)
        self.sock.bind(config.control.controller_endpoint)
        self.smm = {r.name: AsyncControl(r.smm_endpoint, self.ctx, curve=keys.client(r.name))
                    for r in config.replicas.values()}
        self.rm = {r.name: AsyncControl(r.rm_endpoint, self.ctx, curve=keys.client(r.name))
                   for r in config.replicas.values() if r.rm_endpoint}
        self.waiting: dict[tuple[str, str, int], tuple] = {}  # (kind, replica, seq) -> action
        self.driver = self.events = None
        self.failovers: list[FailoverDone] = []
        self.unprotected: list[dict] = []
        self.reroutes = 0
        # Requests served by type name, and refused ones by error name (bad input is counted
        # and logged, and the controller goes on).
        self.requests: Counter = Counter()
        self.errors: Counter = Counter()
        from .metrics import SdnMetrics  # (after every counter it reads exists)
        self.metrics = SdnMetrics(sdn.metrics_port, self)
        # A (re)started controller first listens for one heartbeat timeout: replicas report
        # the view they act on, and a restarted controller adopts it instead of steering
        # the configured membership over a cluster that has moved on.
        self.steered = False
        self.lost_seen = 0
        self.learn_until = time.monotonic() + config.sdn.heartbeat_timeout_ms / 1000.0
        # A test knob: activations wait this long (a slow activation of many flows), to show
        # what the wrong order costs. 0 in production.
        self.activate_delay = activate_delay
        self.deferred: list[tuple[float, Activate]] = []
        fc = sdn.faucet
        if fc.config and self.topo is not None:
            from .faucet_driver import FaucetDriver
            from .faucet_events import FaucetEventClient
            self.events = FaucetEventClient(fc.event_sock).connect(timeout=30.0) \
                if fc.event_sock else None
            pid_file = Path(fc.pid_file) if fc.pid_file else None
            self.driver = FaucetDriver(
                fc.config, lambda: int(pid_file.read_text().split()[0]) if pid_file and
                pid_file.is_file() else None,
                lambda: poke(fc.prometheus_port, fc.netns), self.events)

    # ---------------------------------------------------------------- actions
    def apply(self, actions, now: float) -> None:
        for a in actions:
            if isinstance(a, Failed):
                self.log.error(f"replica {a.replica} failed ({a.reason}): failing over, view "
                               f"{a.view}")
            elif isinstance(a, Isolated):
                self.log.error(f"{', '.join(a.silent)} silent at once while only {a.heard} of "
                               f"{a.members} replica(s) are heard: this controller is likelier "
                               "cut off than they are all dead; no failover on silence until "
                               "they are heard again (a link down or an unhealthy report "
                               "still fails a replica); check the control network")
            elif isinstance(a, Activate):
                if self.activate_delay and not getattr(a, "_due", False):
                    self.deferred.append((now + self.activate_delay, a))
                    continue
                if a.group is not None:  # scale-out: the newcomer's RM picks its buckets
                    client = self.rm.get(a.replica)
                    seq = None if client is None else client.send(
                        wire.TAKEOVER, wire.json_body({"group": a.group, "view": a.view}))
                    if seq is not None:
                        self.waiting[("takeover", a.replica, seq)] = a
                    continue
                body = wire.encode_activate(wire.SEL_REPLICA, self.ids[a.failed])
                seq = self.smm[a.replica].send(wire.ACTIVATE, body)
                if seq is not None:
                    self.waiting[("activate", a.replica, seq)] = a
            elif isinstance(a, Reroute):
                self.steered = True
                self._reroute(a)
                self.apply(self.core.on_rerouted(a.view, time.monotonic()), time.monotonic())
            elif isinstance(a, Reprotect):
                client = self.rm.get(a.replica)
                if client is None:
                    self.apply(self.core.on_reprotected(a.replica, a.view, now), now)
                    continue
                seq = client.send(wire.VIEW, wire.json_body({"view": a.view,
                                                             "alive": list(a.alive)}))
                if seq is not None:
                    self.waiting[("view", a.replica, seq)] = a
            elif isinstance(a, (Freeze, Handoff)):
                kind = "freeze" if isinstance(a, Freeze) else "handoff"
                client = self.rm.get(a.replica)
                if client is None:  # no RM to ask: go on
                    self.apply(self.core.on_frozen(a.replica, a.view, now) if kind == "freeze"
                               else self.core.on_handed_off(a.replica, a.view, now), now)
                    continue
                seq = client.send(wire.FREEZE if kind == "freeze" else wire.HANDOFF,
                                  wire.json_body({"group": a.group, "view": a.view}))
                if seq is not None:
                    self.waiting[(kind, a.replica, seq)] = a
            elif isinstance(a, FailoverDone):
                self.failovers.append(a)
                what = "failover" if a.kind == "failover" else a.kind
                self.log.info(f"{what} of {a.replica} done (view {a.view}): detected in "
                              f"{a.detected * 1000:.0f} ms, activation "
                              f"{a.activation * 1000:.0f} ms, reroute {a.reroute * 1000:.0f} ms, "
                              f"re-protection {a.reprotect * 1000:.0f} ms")

    def _reroute(self, a: Reroute) -> None:
        if self.driver is None:
            return
        text = faucet_config(self.topo, list(a.primaries))
        try:
            took = self.driver.apply(text)
            self.reroutes += 1
            self.log.info(f"steering for view {a.view} applied in {took * 1000:.0f} ms")
        except PicoError as e:  # the old rules stay; the next view tries again
            self.log.error(f"steering for view {a.view} not applied: {e}")
        # The reload blocked this thread; heartbeats that arrived meanwhile are taken now,
        # before any silence is judged (else a slow reload looks like dead replicas).
        self._take_events()

    def _take_events(self) -> None:
        while True:
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # The SMM's envelope rule (docs/protocol.md 4): [identity, b"" (a REQ-style
            # delimiter, echoed), exactly one frame].
            ident, rest = parts[0], parts[1:]
            envelope = [b""] if len(rest) > 1 and rest[0] == b"" else []
            body = rest[len(envelope):]
            if len(body) != 1:
                reply = self._refuse(0, wire.ERR_BAD_ENVELOPE, f"expected one message frame "
                                     f"after the envelope, got {len(body)}: send a single frame")
            else:
                reply = self._on_event(body[0])
            self.sock.send_multipart([ident, *envelope, reply])

    def _refuse(self, seq: int, code: int, text: str) -> bytes:
        name = wire.ERROR_NAMES.get(code, str(code))
        self.errors[name] += 1
        self.log.warning(f"rejected request seq={seq}: {name}: {text}")
        return wire.error_reply(seq, code, text)

    # ---------------------------------------------------------------- inputs
    def _on_event(self, frame: bytes) -> bytes:
        """One request in, its reply out; never raises (bad input: an error reply, counted)."""
        try:
            return self._handle(frame)
        except WireError as e:
            return self._refuse(wire.peek_seq(frame), e.code, str(e))
        except Exception as e:  # a bug must not take the controller down
            self.log.exception("internal error handling a request")
            return self._refuse(wire.peek_seq(frame), wire.ERR_INTERNAL,
                                f"internal error: {type(e).__name__}: {e}")

    def _handle(self, frame: bytes) -> bytes:
        msg = wire.decode(frame, self.config.control.max_message_bytes)
        if msg.type not in (wire.EVENT, wire.SCALE):
            raise WireError(wire.ERR_UNKNOWN_TYPE, f"pico-sdn takes EVENT (24) and SCALE "
                            f"(28) on this endpoint, not type {msg.type}")
        ev = wire.parse_json_body(msg.body)
        self.requests[wire.TYPE_NAMES[msg.type]] += 1
        if msg.type == wire.SCALE:
            return wire.encode(wire.SCALE | wire.REPLY_BIT, msg.seq,
                               wire.json_body(self._scale(ev)))
        now = time.monotonic()
        kind, replica = ev.get("event"), ev.get("replica")
        # (fuzzing: a list as "replica" made `replica in self.ids` raise and end pico-sdn)
        if not isinstance(kind, (str, type(None))) or not isinstance(replica, (str, type(None))):
            raise WireError(wire.ERR_BAD_BODY, "event: \"event\" and \"replica\" must be "
                            f"strings, got {type(kind).__name__} and {type(replica).__name__}")
        if kind == "heartbeat" and replica in self.ids:
            view, alive = ev.get("view"), ev.get("alive")
            if isinstance(alive, list) and not all(isinstance(a, str) for a in alive):
                raise WireError(wire.ERR_BAD_BODY, "heartbeat: \"alive\" must be a list of "
                                f"replica names, got {alive!r:.100}")
            if isinstance(view, int) and view > self.core.view and isinstance(alive, list):
                self.log.info(f"adopting view {view} (alive {alive}) reported by {replica}")
                self.apply(self.core.adopt(view, alive, now), now)
            self.apply(self.core.on_heartbeat(replica, now, bool(ev.get("healthy", True)),
                                              str(ev.get("why", ""))), now)
        elif kind == "group_unprotected":
            self.unprotected.append(ev)
            self.log.warning(f"replica {replica} group {ev.get('group')} unprotected: "
                             f"{ev.get('reason')}")
        elif kind is not None:
            self.log.info(f"event {kind} from {replica}: {json.dumps(ev, sort_keys=True)}")
        return wire.encode(wire.EVENT | wire.REPLY_BIT, msg.seq, wire.json_body({"ok": True}))

    def _scale(self, req: dict) -> dict:
        op, replica = req.get("op"), req.get("replica")
        if op not in ("in", "out") or not isinstance(replica, str) or replica not in self.ids:
            raise WireError(wire.ERR_BAD_BODY, "scale: {\"op\": \"in\"|\"out\", "
                            f"\"replica\": one of {sorted(self.ids)}}}")
        now = time.monotonic()
        acts = self.core.scale_in(replica, now) if op == "in" else \
            self.core.scale_out(replica, now)
        if not acts and not (self.core.current and self.core.current.replica == replica) \
                and not any(f.replica == replica for f in self.core.queue):
            raise WireError(wire.ERR_BAD_BODY, f"cannot scale {op} {replica}: members are "
                            f"{sorted(self.core.alive)}" + (" (scale-out needs chords "
                                                            "placement)" if op == "out" else ""))
        self.log.info(f"scale-{op} of {replica} started (view {self.core.view})")
        self.apply(acts, now)
        return {"op": op, "replica": replica, "view": self.core.view,
                "members": sorted(self.core.alive)}

    def _collect(self, now: float) -> None:
        for name, client in list(self.smm.items()) + list(self.rm.items()):
            for reply in client.poll():
                now = time.monotonic()  # (a reroute above may have taken a while)
                for kind in ("activate", "view", "freeze", "handoff", "takeover"):
                    a = self.waiting.pop((kind, name, reply.seq), None)
                    if a is None:
                        continue
                    if reply.status != wire.OK:
                        self.log.warning(f"{kind} on {name} refused: {reply.body[:200]!r}")
                        if kind == "view" and reply.status == wire.ERR_BUSY:
                            self.apply([a], now)  # again (the phase deadline still holds)
                            continue
                    if kind == "activate":
                        n = len(wire.decode_key_list(reply.body)) if reply.status == wire.OK \
                            else 0
                        of = a.failed if a.group is None else f"group {a.group}"
                        self.log.info(f"{name} activated {n} flow(s) of {of}")
                        self.apply(self.core.on_activated(name, a.view, now), now)
                    elif kind == "takeover":
                        self.log.info(f"{name} took over: {reply.body[:200]!r}")
                        self.apply(self.core.on_activated(name, a.view, now), now)
                    elif kind == "freeze":
                        self.log.info(f"{name} frozen: {reply.body[:200]!r}")
                        self.apply(self.core.on_frozen(name, a.view, now), now)
                    elif kind == "handoff":
                        self.log.info(f"{name} handed off: {reply.body[:200]!r}")
                        self.apply(self.core.on_handed_off(name, a.view, now), now)
                    else:
                        self.apply(self.core.on_reprotected(name, a.view, now), now)

    def _faucet_events(self, now: float) -> None:
        if self.events is None:
            return
        if self.events.lost > self.lost_seen:  # events were lost: ask Faucet for the truth
            self.lost_seen = self.events.lost
            fc = self.config.sdn.faucet
            try:
                down = ports_down(faucet_metrics(fc.prometheus_port, fc.netns))
            except (OSError, PicoError) as e:
                self.log.warning(f"faucet events were lost and its port status is not "
                                 f"readable: {e}")
                down = set()
            self.log.warning(f"faucet events were lost ({self.events.lost} so far): ports "
                             f"down per its metrics: {sorted(down) or 'none'}")
            for name in down & set(self.ids):
                self.apply(self.core.on_link(name, False, now), now)
        for ev in self.events.poll(0.0):
            if ev.kind == "PORT_CHANGE" and ev.port_no in self.by_port and ev.up is not None:
                self.apply(self.core.on_link(self.by_port[ev.port_no], ev.up, now), now)

    # ---------------------------------------------------------------- loop
    def serve(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        for c in list(self.smm.values()) + list(self.rm.values()):
            poller.register(c._sock, zmq.POLLIN)
        while not stop.is_set():
            before = time.monotonic()
            ready = dict(poller.poll(20))
            now = time.monotonic()
            if now - before > 0.02 + self.core.heartbeat_timeout / 2:
                # This process did not run (stopped, starved): the beats sent meanwhile are
                # still on their way, so silence judged now would fail live replicas.
                self.core.pause(now - before - 0.02)
                self.log.warning(f"the controller did not run for {now - before:.3f} s: "
                                 "that silence of the replicas does not count")
            if self.sock in ready:
                self._take_events()
            self._collect(now)
            self._faucet_events(now)
            due = [a for t, a in self.deferred if t <= now]
            if due:
                self.deferred = [(t, a) for t, a in self.deferred if t > now]
                for a in due:
                    object.__setattr__(a, "_due", True)
                self.apply(due, now)
            if not self.steered and time.monotonic() >= self.learn_until:
                self.apply(self.core.start(), time.monotonic())  # no view reported: a new one
            self.apply(self.core.tick(time.monotonic()), time.monotonic())

    def close(self) -> None:
        for c in list(self.smm.values()) + list(self.rm.values()):
            c.close()
        if self.events is not None:
            self.events.close()
        self.sock.close(linger=0)
        if self.gate is not None:
            self.gate.close()
        self.metrics.close()


def run(config, order: str = ORDER_ACTIVATE_FIRST, activate_delay: float = 0.0) -> int:
    server = SdnServer(config, order, activate_delay)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.log.info(f"controlling {len(server.ids)} replica(s) on "
                    f"{config.control.controller_endpoint}; placement {config.sdn.placement}")
    try:
        server.serve(stop)
    finally:
        server.close()
    return 0
