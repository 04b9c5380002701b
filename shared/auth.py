"""The server side of CurveZMQ: a ZAP handler that refuses unknown clients, logs and counts.

One Gatekeeper per ZeroMQ context of a server process. Its thread answers libzmq's ZAP
requests (inproc://zeromq.zap.01) for the context's CURVE server sockets, with the verdict of
shared.security.zap_verdict, and reads those sockets' monitor events: a client without CURVE,
or whose handshake breaks (a wrong server key), never reaches ZAP, libzmq drops it and only
tells the monitor. Every refusal is counted in `refused` (by reason) and logged, at most once
per 10 s per peer and reason (a refused client may
reconnect several times a second).

ZAP gives the peer's address; a monitor event does not (libzmq reports the bound endpoint),
so those lines name the endpoint instead.

The serving thread keeps its own single-threaded loop; `refused` has one writer (this thread)
and is read by the metrics scrape as a dict copy.
"""
from __future__ import annotations

import itertools
import threading
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from .errors import PicoError
from .security import (BAD_HANDSHAKE, MECHANISM_MISMATCH, NO_CURVE, UNKNOWN_KEY, LogLimiter, KeyPair,
                       configure_server, zap_verdict)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_ids = itertools.count()


class Gatekeeper:
    def __init__(self, ctx: zmq.Context, keys: KeyPair, allowed: frozenset[bytes], log):
        self.ctx = ctx
        self.keys = keys
        self.allowed = allowed
        self.log = log
        self.refused: dict[str, int] = {}
        self.accepted = 0
        self.limiter = LogLimiter()
        self._monitors: list[tuple[str, str]] = []  # (inproc address, served endpoint)
        self._new = threading.Event()
        self._stop = threading.Event()
        self._zap = ctx.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        try:
            self._zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as e:
            self._zap.close(linger=0)
            raise PicoError(f"cannot serve ZAP on {ZAP_ENDPOINT} ({e}): another Gatekeeper "
                            "owns this ZeroMQ context; use one per context") from None
        self._thread = threading.Thread(target=self._run, name="pico-zap", daemon=True)
        self._thread.start()

    def protect(self, sock: zmq.Socket, endpoint: str) -> None:
        """Make `sock` a CURVE server checked by this gatekeeper; call before sock.bind()."""
        configure_server(sock, self.keys)
        addr = f"inproc://pico-auth-monitor-{id(self)}-{next(_ids)}"
        sock.monitor(addr, _EVENTS)
        self._monitors.append((addr, endpoint))
        self._new.set()

    @property
    def refused_total(self) -> int:
        return sum(dict(self.refused).values())

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        monitors: dict[zmq.Socket, str] = {}
        try:
            while not self._stop.is_set():
                if self._new.is_set():
                    self._new.clear()
                    for addr, endpoint in self._monitors[len(monitors):]:
                        m = self.ctx.socket(zmq.PAIR)
                        m.setsockopt(zmq.LINGER, 0)
                        m.connect(addr)
                        monitors[m] = endpoint
                        poller.register(m, zmq.POLLIN)
                for sock, _ in poller.poll(100):
                    frames = sock.recv_multipart()
                    try:
                        if sock is self._zap:
                            self._answer(frames)
                        else:
                            self._monitored(parse_monitor_message(frames), monitors[sock])
                    except zmq.ContextTerminated:
                        raise
                    except Exception as e:  # this thread must outlive one odd message: without
                        # it, every handshake on the context would wait forever
                        self.log.error(f"auth: cannot handle {frames[:2]!r}: {e!r}")
                        if sock is self._zap and self._zap.getsockopt(zmq.EVENTS) & zmq.POLLOUT:
                            self._zap.send_multipart([b"1.0", b"", b"500", b"error", b"", b""])
        except zmq.ContextTerminated:
            pass
        finally:
            for m in monitors:
                m.close(linger=0)
            self._zap.close(linger=0)

    def _answer(self, frames: list[bytes]) -> None:
        if len(frames) < 6:  # not a ZAP request (libzmq never sends one); REP must answer
            self._zap.send_multipart([b"1.0", b"", b"500", b"malformed ZAP request", b"", b""])
            return
        version, request_id, _domain, address, _identity, mechanism, *credentials = frames
        ok, reason, key = zap_verdict(mechanism, credentials, self.allowed)
        if ok:
            self.accepted += 1
            self._zap.send_multipart([version, request_id, b"200", b"OK", b"", b""])
            return
        self._refuse(reason, address.decode(errors="replace"), key)
        self._zap.send_multipart([version, request_id, b"400", b"unknown client key", b"",
                                  b""])

    def _monitored(self, event: dict, endpoint: str) -> None:
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and \
                int(event["value"]) == MECHANISM_MISMATCH:
            self._refuse(NO_CURVE, None, None, endpoint)
        elif event["event"] in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            self._refuse(BAD_HANDSHAKE, None, None, endpoint)

    def _refuse(self, reason: str, peer: str | None, key: str | None,
                endpoint: str | None = None) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        fresh, held = self.limiter.admit((reason, peer, key, endpoint), time.monotonic())
        if not fresh:
            return
        what = {"unknown_key": f"CURVE key {key} is not authorized",
                "no_curve": "the client does not use CURVE",
                "bad_handshake": "the CURVE handshake failed (does the client have this "
                                 "server's public key?)"}[reason]
        where = f"from {peer}" if peer else f"on {endpoint} (libzmq gives no peer address)"
        more = f" ({held} more like it since the last line)" if held else ""
        self.log.bind(auth="refused", reason=reason, peer=peer or "?").warning(
            f"refused a client {where}: {what}{more}; add its public key to "
            "security.authorized_keys (or keys_dir) if it belongs to the cluster")

    def close(self) -> None:
        """Stop the thread; call before the context is terminated."""
        self._stop.set()
        self._thread.join(5)


def refused_metric(replica: str, gate: Gatekeeper | None):
    """pico_auth_refused_total{replica, reason}: every reason, 0 included, once curve is on
    (an alert can then test for increase, not for presence)."""
    from prometheus_client.core import CounterMetricFamily
    fam = CounterMetricFamily("pico_auth_refused", "Clients refused by CurveZMQ "
                              "authentication, by reason", labels=["replica", "reason"])
    if gate is not None:
        counts = dict(gate.refused)
        for reason in (UNKNOWN_KEY, NO_CURVE, BAD_HANDSHAKE):
            fam.add_metric([replica, reason], counts.get(reason, 0))
    return fam


def gatekeeper(ctx: zmq.Context, keyring, log) -> Gatekeeper | None:
    """A Gatekeeper for the context when the keyring has curve on, else None."""
    if not keyring.enabled:
        return None
    return Gatekeeper(ctx, keyring.keys, keyring.authorized, log)
