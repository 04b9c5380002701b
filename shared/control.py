"""A control-channel client: every request has a sequence number and a timeout (Lazy Pirate).

The socket is a DEALER that sends the REQ-compatible envelope [b"", frame]. On a timeout the
socket is closed and reopened (a late reply to an old request must not be taken for the next
one), and ControlTimeout says which endpoint did not answer.

With `curve` (shared.security.CurveClient, from Keyring.client) the socket is a CURVE client;
ControlClient then also watches its handshakes, so a refused key is reported as AuthRefused
with the reason instead of a bare timeout.
"""
from __future__ import annotations

import itertools
import os
import time

import zmq

from . import wire
from .errors import AuthRefused, ControlTimeout, WireError
from .security import CurveClient, MECHANISM_MISMATCH, configure_client

_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class ControlClient:
    def __init__(self, endpoint: str, timeout_ms: int = 2000, context: zmq.Context | None = None,
                 max_bytes: int = 256 * 1024 * 1024, curve: CurveClient | None = None):
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.max_bytes = max_bytes
        self.curve = curve
        self._ctx = context or zmq.Context.instance()
        self._seq = itertools.count((os.getpid() & 0xFFFF) << 32 | 1)
        self._sock = self._monitor = None
        self._connect()

    def _connect(self) -> None:
        self._close_socket()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        configure_client(self._sock, self.curve)
        if self.curve is not None:
            self._monitor = self._sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        self._sock.connect(self.endpoint)

    def _close_socket(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _refusal(self) -> str | None:
        """Why the server refused our handshakes, if it did (the monitor's last word)."""
        from zmq.utils.monitor import recv_monitor_message
        why = None
        while self._monitor is not None and self._monitor.poll(0):
            ev = recv_monitor_message(self._monitor)
            c = self.curve
            if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                why = (f"{self.endpoint} refused our CURVE key {c.keys.name!r} "
                       f"({c.keys.public.decode()}): add it to the server's "
                       "security.authorized_keys (or keys_dir), or use an authorized key")
            elif ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and \
                    int(ev["value"]) == MECHANISM_MISMATCH:
                why = (f"{self.endpoint} does not use CURVE: turn security.curve on for it "
                       "too, or off here")
            else:
                why = (f"the CURVE handshake with {self.endpoint} failed: is "
                       f"{c.server_name}.key the public key of the server there?")
        return why

    def request(self, type_: int, body: bytes = b"", timeout_ms: int | None = None) -> wire.Message:
        """Send one request, wait for its reply; raise ControlTimeout or WireError (status != 0)."""
        reply = self.request_raw(wire.encode(type_, next(self._seq), body), timeout_ms)
        if reply.status != wire.OK:
            raise WireError(reply.status, _error_text(reply))
        return reply

    def request_raw(self, frame: bytes, timeout_ms: int | None = None) -> wire.Message:
        """Send a frame as is (tests send garbage this way) and return the decoded reply."""
        seq = wire.peek_seq(frame)
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        deadline = time.monotonic() + timeout / 1000.0
        self._sock.send_multipart([b"", frame])
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(left_ms, zmq.POLLIN):
                why = self._refusal()
                self._connect()
                if why:
                    raise AuthRefused(f"no reply within {timeout} ms: {why}")
                raise ControlTimeout(f"no reply from {self.endpoint} within {timeout} ms: is the "
                                     "peer running and reachable? (request seq "
                                     f"{seq})")
            parts = self._sock.recv_multipart()
            msg = wire.decode(parts[-1], self.max_bytes)
            if msg.seq == seq or wire.peek_seq(frame) == 0:
                return msg
            # A stale reply to an earlier, timed-out request: skip it.

    def close(self) -> None:
        self._close_socket()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _error_text(msg: wire.Message) -> str:
    try:
        return wire.parse_json_body(msg.body).get("message", repr(msg.body[:200]))
    except WireError:
        return repr(msg.body[:200])


def wait_until_serving(endpoint: str, proc=None, timeout: float = 30.0, what: str = "peer",
                       curve: CurveClient | None = None) -> None:
    """Ping `endpoint` until it answers. If `proc` (a Popen) exits first, say so at once; a
    refused key (AuthRefused) is raised at once too: waiting longer would not help."""
    deadline = time.monotonic() + timeout
    with ControlClient(endpoint, timeout_ms=200, curve=curve) as c:
        while True:
            if proc is not None and proc.poll() is not None:
                raise ControlTimeout(f"{what} exited with status {proc.returncode} before "
                                     f"serving {endpoint}: see its log")
            try:
                c.request(wire.PING)
                return
            except AuthRefused:
                raise
            except ControlTimeout:
                if time.monotonic() > deadline:
                    raise ControlTimeout(f"{what} did not answer on {endpoint} within "
                                         f"{timeout:g} s") from None


class AsyncControl:
    """Requests without waiting: send() now, collect replies with poll(). For a sender that
    must not stall on one slow peer (the RM pipelining checkpoints to several backups).

    The caller owns timeouts and retries (it knows which requests are still unanswered);
    reset() drops the socket, so a late reply to a request given up on is never taken for a new
    one."""

    def __init__(self, endpoint: str, context: zmq.Context | None = None,
                 max_bytes: int = 256 * 1024 * 1024, curve: CurveClient | None = None):
        self.endpoint = endpoint
        self.max_bytes = max_bytes
        self.curve = curve
        self._ctx = context or zmq.Context.instance()
        self._seq = itertools.count((os.getpid() & 0xFFFF) << 32 | 1)
        self._sock = None
        self.reset()

    def reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 64)  # a hung peer must not absorb unbounded memory
        configure_client(self._sock, self.curve)
        self._sock.connect(self.endpoint)

    def send(self, type_: int, body: bytes = b"") -> int | None:
        """Queue one request; its seq, or None if the peer's queue is full (try later)."""
        seq = next(self._seq)
        try:
            self._sock.send_multipart([b"", wire.encode(type_, seq, body)], flags=zmq.NOBLOCK)
        except zmq.Again:
            return None
        return seq

    def poll(self) -> list[wire.Message]:
        """Every reply that has arrived (undecodable ones are skipped)."""
        out = []
        while True:
            try:
                parts = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                out.append(wire.decode(parts[-1], self.max_bytes))
            except WireError:
                continue

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
