"""A client for Faucet's event socket: parse its events, notice lost ones.

Faucet (FAUCET_EVENT_SOCK) is the SERVER of a unix stream socket and writes one JSON object per
line (faucet/faucet_event.py, 1.10.12):

    {"version": 1, "time": 1795784011.94, "dp_id": 1, "dp_name": "sw1", "event_id": 98,
     "PORT_CHANGE": {"port_no": 3, "reason": "MODIFY", "state": 1, "status": false}}

The header keys are version/time/dp_id/dp_name/event_id; the one other key names the event
(PORT_CHANGE, CONFIG_CHANGE, DP_CHANGE, PORTS_STATUS, L2_LEARN, L2_EXPIRE, LAG_CHANGE, ...).
event_id counts up from 1 for the life of the faucet process, over ALL events.

How faucet serves it, and what that means for a client (read from the source, then seen on the
test bed; tests/test_steering_net.py):

- One client at a time. Faucet queues events (the newest 120) until a client connects, then hands
  them over in order; a second connection is accepted and closed at once (its log says
  "multiple event clients not supported"): the client sees EOF.
- Faucet notices that its client went away only when it next tries to send to it. Until then a
  new connection is refused as above, and the event(s) it tried to send to the old connection
  are lost, as are the events it had already written to the old connection that were never
  read. So after `close()` (or a client process that died), a new client gets EOF until the
  next event, and misses it. This client reconnects on EOF (backing off from 50 ms to 1 s), and
  `EventIds` reports the hole in event_id: a caller that keeps a view of the switch (port
  states, config) must resync it from elsewhere (Prometheus) when `lost` grows.
- A faucet restart starts event_id at 1 again (reported as a restart, also a resync).

PORT_CHANGE: `up` is status true and not (state & LINK_DOWN). A link that goes down (OVS
userspace, `ip link set <port> down` or the peer's) gives TWO events a few ms apart:
state 0 / status true (no longer LIVE, so up is still True) then state 1 / status false (up
False); back up gives state 4 (LIVE) / status true. `live` is state & LIVE, for callers that
want to act on the first of the two.

Everything that decides is pure (`parse_event`, `EventIds`); `FaucetEventClient` only does the
socket I/O. Garbage lines are counted and logged, never raised out of poll().
"""
from __future__ import annotations

import collections
import errno
import json
import math
import os
import select
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from shared import log as pico_log
from shared.errors import PicoError

log = pico_log.get_logger("sdn.events")

PORT_CHANGE = "PORT_CHANGE"
CONFIG_CHANGE = "CONFIG_CHANGE"
DP_CHANGE = "DP_CHANGE"
PORTS_STATUS = "PORTS_STATUS"
L2_LEARN = "L2_LEARN"
KNOWN_KINDS = (PORT_CHANGE, CONFIG_CHANGE, DP_CHANGE, PORTS_STATUS, L2_LEARN)

_HEADER = ("version", "time", "dp_id", "dp_name", "event_id")
OFPPS_LINK_DOWN = 1  # OpenFlow port state bits; faucet reports status false exactly when
OFPPS_LIVE = 4       # LINK_DOWN is set. A link going down first shows state 0 (not LIVE)


class FaucetEventError(PicoError):
    """A line from Faucet's event socket is not an event we understand (the message says why
    and quotes the line)."""


class FaucetEventTimeout(PicoError):
    """wait_for() saw no matching event in time."""


class FaucetEventConnectError(PicoError):
    """The event socket could not be connected to before the deadline."""


@dataclass(frozen=True)
class Event:
    """One Faucet event. Fields that do not apply to `kind` are None.

    kind is the event's body key as faucet sends it: one of KNOWN_KINDS or another upper-case
    name (L2_EXPIRE, LAG_CHANGE, ...), whose body is still in `body`."""

    event_id: int
    time: float
    dp_id: int
    kind: str
    dp_name: str = ""
    # PORT_CHANGE
    port_no: int | None = None
    up: bool | None = None          # status true and not (state & LINK_DOWN); DELETE is down
    live: bool | None = None        # state & LIVE (OVS: the port can forward); see module doc
    reason: str | None = None       # PORT_CHANGE: ADD/MODIFY/DELETE; DP_CHANGE: cold_start/...
    state: int | None = None
    status: bool | None = None
    # CONFIG_CHANGE: a per-DP {"restart_type": ...} event, then one dp_id 0 {"success": ...}
    success: bool | None = None     # None: this is not the success/failure event
    restart_type: str | None = None  # "new", "warm", "cold" or None (no change for this DP)
    config_files: tuple[str, ...] = ()
    config_hashes: tuple[str, ...] = ()  # sha256 hex of each file's text, same order
    config_error: str | None = None
    # PORTS_STATUS: ((port_no, up), ...)
    ports: tuple[tuple[int, bool], ...] = ()
    body: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def config_hash(self, path: str | os.PathLike) -> str | None:
        """The hash faucet reported for one config file (compared by real path), or None."""
        want = os.path.realpath(path)
        for f, h in zip(self.config_files, self.config_hashes):
            if os.path.realpath(f) == want:
                return h
        return None


def _short(line: str, n: int = 160) -> str:
    return line if len(line) <= n else line[:n] + f"... ({len(line)} chars)"


def _int(obj: Mapping, key: str, line: str) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise FaucetEventError(f"faucet event: {key!r} must be an integer, got {v!r} in "
                               f"{_short(line)!r}")
    return v


def parse_event(line: bytes | str) -> Event:
    """One line of the event socket -> Event; FaucetEventError on anything else."""
    if isinstance(line, (bytes, bytearray)):
        try:
            line = bytes(line).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FaucetEventError(f"faucet event: not UTF-8 ({e}): {bytes(line)[:80]!r}") \
                from None
    text = line.strip()
    if not text:
        raise FaucetEventError("faucet event: empty line")
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise FaucetEventError(f"faucet event: not JSON ({e}): {_short(text)!r}") from None
    if not isinstance(obj, dict):
        raise FaucetEventError(f"faucet event: expected a JSON object, got "
                               f"{type(obj).__name__}: {_short(text)!r}")
    version = obj.get("version")
    if version != 1:
        raise FaucetEventError(f"faucet event: unsupported version {version!r} (this client "
                               f"reads version 1, faucet 1.10): {_short(text)!r}")
    event_id = _int(obj, "event_id", text)
    if event_id < 1:
        raise FaucetEventError(f"faucet event: event_id {event_id} < 1: {_short(text)!r}")
    dp_id = _int(obj, "dp_id", text)
    t = obj.get("time")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise FaucetEventError(f"faucet event: 'time' must be a number, got {t!r}: "
                               f"{_short(text)!r}")
    kinds = [k for k, v in obj.items() if k not in _HEADER and isinstance(v, dict)]
    if len(kinds) != 1:
        raise FaucetEventError(f"faucet event: expected exactly one event body, found "
                               f"{kinds or 'none'}: {_short(text)!r}")
    kind = kinds[0]
    body = obj[kind]
    dp_name = obj.get("dp_name")
    common = dict(event_id=event_id, time=float(t), dp_id=dp_id, kind=kind,
                  dp_name=str(dp_name) if dp_name is not None else "", body=body)
    if kind == PORT_CHANGE:
        port_no = _int(body, "port_no", text)
        state = body.get("state", 0)
        status = body.get("status")
        reason = body.get("reason")
        if isinstance(state, bool) or not isinstance(state, int):
            raise FaucetEventError(f"faucet event: PORT_CHANGE state must be an integer, got "
                                   f"{state!r}: {_short(text)!r}")
        if not isinstance(status, bool):
            raise FaucetEventError(f"faucet event: PORT_CHANGE status must be true/false, got "
                                   f"{status!r}: {_short(text)!r}")
        up = status and not (state & OFPPS_LINK_DOWN) and reason != "DELETE"
        return Event(**common, port_no=port_no, up=up, live=bool(state & OFPPS_LIVE),
                     state=state, status=status,
                     reason=None if reason is None else str(reason))
    if kind == CONFIG_CHANGE:
        success = body.get("success")
        if success is not None and not isinstance(success, bool):
            raise FaucetEventError(f"faucet event: CONFIG_CHANGE success must be true/false, "
                                   f"got {success!r}: {_short(text)!r}")
        info = body.get("config_hash_info") or {}
        if not isinstance(info, dict):
            raise FaucetEventError(f"faucet event: config_hash_info must be an object: "
                                   f"{_short(text)!r}")
        files = tuple(f for f in str(info.get("config_files") or "").split(",") if f)
        hashes = tuple(h for h in str(info.get("hashes") or "").split(",") if h)
        restart = body.get("restart_type")
        return Event(**common, success=success,
                     restart_type=None if restart is None else str(restart),
                     config_files=files, config_hashes=hashes,
                     config_error=str(info["error"]) if info.get("error") else None)
    if kind == DP_CHANGE:
        reason = body.get("reason")
        return Event(**common, reason=None if reason is None else str(reason))
    if kind == PORTS_STATUS:
        try:
            ports = tuple(sorted((int(k), bool(v)) for k, v in body.items()))
        except (TypeError, ValueError):
            raise FaucetEventError(f"faucet event: PORTS_STATUS keys must be port numbers: "
                                   f"{_short(text)!r}") from None
        return Event(**common, ports=ports)
    if kind == L2_LEARN:
        port_no = body.get("port_no")
        return Event(**common, port_no=port_no if isinstance(port_no, int) else None)
    return Event(**common)


class EventIds:
    """Tracks faucet's event_id sequence and reports holes (pure).

    observe(event_id) returns how many events were missed just before this one: 0 normally,
    n > 0 after a hole (a reconnect, an overflow of faucet's 120-event queue). An event_id that
    does not go up means faucet restarted (its counter starts again at 1): `restarts` grows,
    and the events of the new faucet before this one count as missed. The first id ever seen
    only sets the baseline (what happened before we connected is not a hole), unless
    `first_expected` is given. Either way the caller must resync its view when
    observe() > 0 or `restarts` changed."""

    def __init__(self, first_expected: int | None = None):
        self.last: int | None = None if first_expected is None else first_expected - 1
        self.lost = 0
        self.gaps = 0
        self.restarts = 0
        self.seen = 0

    def observe(self, event_id: int) -> int:
        self.seen += 1
        if self.last is None:
            self.last = event_id
            return 0
        if event_id <= self.last:
            self.restarts += 1
            missing = event_id - 1
        else:
            missing = event_id - self.last - 1
        self.last = event_id
        if missing:
            self.lost += missing
            self.gaps += 1
        return missing


class FaucetEventClient:
    """Reads Faucet's event socket: poll(), wait_for(), reconnect on EOF.

    Not thread-safe; one owner. Events go through `ids` (an EventIds), so `lost`, `gaps` and
    `restarts` say when events were missed. `on_gap(missing, event)` is called for each hole."""

    BACKOFF_MIN = 0.05
    BACKOFF_MAX = 1.0
    MAX_LINE = 1 << 20

    def __init__(self, path: str | os.PathLike,
                 on_gap: Callable[[int, Event], None] | None = None):
        self.path = Path(path)
        self.on_gap = on_gap
        self.ids = EventIds()
        self.garbage = 0
        self.last_garbage: str | None = None
        self.connects = 0
        self.eofs = 0
        self._sock: socket.socket | None = None
        self._buf = b""
        self._backlog: collections.deque[Event] = collections.deque()
        self._backoff = self.BACKOFF_MIN
        self._next_try = 0.0

    # -- connection
    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def last_event_id(self) -> int | None:
        """The newest event_id read from the socket (returned or still in the backlog)."""
        return self.ids.last

    @property
    def lost(self) -> int:
        return self.ids.lost

    def __enter__(self) -> "FaucetEventClient":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    def _try_connect(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.path))
        except OSError as e:
            s.close()
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                return False
            raise FaucetEventConnectError(f"faucet event socket {self.path}: {e}. What to do: "
                                          "check the path (FAUCET_EVENT_SOCK) and that you may "
                                          "read it (root)") from None
        s.setblocking(False)
        self._sock = s
        self._buf = b""
        self.connects += 1
        log.debug("connected to %s", self.path)
        return True

    def connect(self, timeout: float = 10.0) -> "FaucetEventClient":
        """Connect, retrying until the socket exists and takes connections (faucet creates it
        at start-up, ~1.5 s). Note: faucet may still refuse us after accepting (another
        client): that shows up as EOF in poll(), which reconnects."""
        if self._sock is not None:
            return self
        deadline = time.monotonic() + timeout
        while not self._try_connect():
            if time.monotonic() >= deadline:
                raise FaucetEventConnectError(
                    f"could not connect to faucet's event socket {self.path} within {timeout} s"
                    f" ({'no such file' if not self.path.exists() else 'refused'}). What to do: "
                    "is faucet running with FAUCET_EVENT_SOCK set to this path? read its log")
            time.sleep(0.05)
        return self

    def _drop_connection(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        if self._buf:
            self._garbage(self._buf, "truncated line at EOF")
        self._buf = b""

    def close(self) -> None:
        """Disconnect. Faucet only notices at its next event, which is then lost (see module
        doc). Events already read stay in the backlog; a later poll()/wait_for() reconnects."""
        self._drop_connection()

    # -- reading
    def _garbage(self, raw: bytes, why: str) -> None:
        self.garbage += 1
        self.last_garbage = f"{why}: {raw[:200]!r}"
        log.warning("faucet event socket %s: ignoring a bad line (%s), %d so far", self.path,
                    self.last_garbage, self.garbage)

    def _feed(self, data: bytes) -> int:
        self._buf += data
        n = 0
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            raw, self._buf = self._buf[:nl], self._buf[nl + 1:]
            if not raw.strip():
                continue
            try:
                ev = parse_event(raw)
            except FaucetEventError as e:
                self._garbage(raw, str(e))
                continue
            missing = self.ids.observe(ev.event_id)
            if missing:
                log.warning("faucet event socket %s: %d event(s) lost before event_id %d "
                            "(%d lost in all): resync", self.path, missing, ev.event_id,
                            self.ids.lost)
                if self.on_gap is not None:
                    self.on_gap(missing, ev)
            self._backlog.append(ev)
            n += 1
        if len(self._buf) > self.MAX_LINE:
            self._garbage(self._buf, f"no newline in {len(self._buf)} bytes")
            self._buf = b""
        return n

    def _reconnect(self, now: float) -> None:
        if now < self._next_try:
            return
        if self._try_connect():
            # A refused connection (faucet has another client) reads EOF at once: back off.
            self._next_try = now + self._backoff
            self._backoff = min(self._backoff * 2, self.BACKOFF_MAX)
        else:
            self._next_try = now + self.BACKOFF_MIN

    def _read(self, timeout: float) -> int:
        """Read whatever arrives within timeout into the backlog; how many events were added.
        Returns as soon as at least one event was added (or the time is up)."""
        deadline = time.monotonic() + max(timeout, 0.0)
        added = 0
        while True:
            now = time.monotonic()
            if self._sock is None:
                self._reconnect(now)
            if self._sock is None:
                wait = min(deadline, self._next_try) - now
                if wait > 0:
                    time.sleep(wait)
                if time.monotonic() >= deadline:
                    return added
                continue
            left = max(deadline - now, 0.0)
            try:
                ready, _, _ = select.select([self._sock], [], [], 0 if added else left)
            except (OSError, ValueError):
                ready = [self._sock]
            if not ready:
                return added
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:
                log.info("faucet event socket %s: %s; reconnecting", self.path, e)
                data = b""
            if not data:
                self.eofs += 1
                log.info("faucet event socket %s: EOF (faucet restarted, or it still serves "
                         "another client); reconnecting", self.path)
                self._drop_connection()
                continue
            self._backoff = self.BACKOFF_MIN
            added += self._feed(data)

    def pump(self) -> int:
        """Read what is already waiting into the backlog without returning it."""
        return self._read(0.0)

    def poll(self, timeout: float = 0.0) -> list[Event]:
        """Every event read so far and not yet returned, oldest first; waits up to timeout for
        the first one if there is none. Connects (or reconnects) as needed."""
        if self._backlog:
            self._read(0.0)
        else:
            self._read(timeout)
        out = list(self._backlog)
        self._backlog.clear()
        return out

    def wait_for(self, pred: Callable[[Event], bool], timeout: float = 10.0) -> Event:
        """The first event (backlog first, then new ones) with pred(event) true; the events
        before it stay in the backlog for poll(). FaucetEventTimeout if none in time."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            items = list(self._backlog)
            for i in range(checked, len(items)):
                if pred(items[i]):
                    del self._backlog[i]
                    return items[i]
            checked = len(items)
            left = deadline - time.monotonic()
            if left <= 0:
                raise FaucetEventTimeout(
                    f"no matching faucet event within {timeout} s on {self.path} "
                    f"(connected={self.connected}, {len(self._backlog)} other events waiting, "
                    f"{self.garbage} garbage lines, {self.lost} events lost). What to do: is "
                    "faucet alive? read its log")
            self._read(left)

    def pending(self) -> tuple[Event, ...]:
        """The backlog, without consuming it."""
        return tuple(self._backlog)
