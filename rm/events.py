"""Events the RM reports to the controller (control.controller_endpoint): a group left
unprotected because its backup stopped answering, a group protected again.

The controller must hear about an unprotected group even if it is down for a while, so each
event is resent (same body, new seq) every `retry_s` until a reply comes, and the oldest are
dropped (logged, counted) past `max_pending`. Sending never blocks the RM's pass.
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict

from shared import wire
from shared.control import AsyncControl


class ControllerEvents:
    def __init__(self, endpoint: str | None, log, retry_s: float = 0.5, max_pending: int = 256,
                 curve=None):
        self.endpoint = endpoint
        self.log = log
        self.retry_s = retry_s
        self.max_pending = max_pending
        self.client = AsyncControl(endpoint, curve=curve) if endpoint else None
        self.pending: OrderedDict[int, dict] = OrderedDict()  # event number -> event
        self.sent_at: dict[int, float] = {}
        self.by_seq: dict[int, int] = {}
        self.delivered = self.dropped = 0
        self._next = 1

    def report(self, event: str, **fields) -> None:
        body = {"event": event, **fields, "time": time.time()}
        self.log.info(f"event {event}: " + json.dumps(fields, sort_keys=True))
        if self.client is None:
            return
        n, self._next = self._next, self._next + 1
        body["id"] = n  # resends repeat it: the controller takes each id once
        self.pending[n] = body
        while len(self.pending) > self.max_pending:
            old, ev = self.pending.popitem(last=False)
            self.dropped += 1
            self.log.error(f"controller at {self.endpoint} did not take event {ev['event']} "
                           f"in time: dropped ({self.dropped} so far)")
        self._send(n, time.monotonic())

    def beat(self, body: dict) -> None:
        """A heartbeat: sent once, never queued or resent (only the latest one matters)."""
        if self.client is not None:
            self.client.send(wire.EVENT, wire.json_body({"event": "heartbeat", **body}))

    def _send(self, n: int, now: float) -> None:
        seq = self.client.send(wire.EVENT, wire.json_body(self.pending[n]))
        self.sent_at[n] = now
        if seq is not None:
            self.by_seq[seq] = n

    def pump(self, now: float) -> None:
        """Take replies, resend what is overdue."""
        if self.client is None:
            return
        for reply in self.client.poll():
            n = self.by_seq.pop(reply.seq, None)
            if n is not None and n in self.pending and reply.status == wire.OK:
                del self.pending[n]
                self.sent_at.pop(n, None)
                self.delivered += 1
        for n in list(self.pending):
            if now - self.sent_at.get(n, 0.0) >= self.retry_s:
                self._send(n, now)
        if len(self.by_seq) > 4 * self.max_pending:  # replies that will never come
            self.by_seq = {q: n for q, n in self.by_seq.items() if n in self.pending}

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
