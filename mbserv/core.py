"""MBServ's decision for one TCP segment on its flow's state (pure): TCP conformance, then
inspection, then routing.

    core = Core(Inspector(patterns), Router(backends, rules, default))   # router may be None
    res = core.process(state_bytes, segment, now)
    res.verdict ("forward"/"drop"), res.kind, res.reason, res.state (new bytes if res.changed)

Kinds: "forward"; drops: "no_state" (no flow state, not an opening SYN), "nonconforming" (the
TCP state machine rejects it, tcp.py), "malicious" (a malicious string is found: the flow is
marked blocked), "blocked" (a later segment of a blocked flow; an in-window RST still passes, so
the endpoints can tear the connection down, and the flow can be deleted).

Inspection follows the stream in sequence order: a segment that continues the stream exactly
(starts at the side's highest sequence so far) is scanned with the context the state keeps, so
a string split across segments is found; a retransmitted (old) segment is scanned on its own,
and its new part, if any, with the context. A segment after a gap is scanned on its own and
starts a new context: without reassembly a string split across a hole and its later fill is not
seen (the limitation of any non-reassembling IPS).
"""
from __future__ import annotations

from .inspect import Inspector
from .route import Router
from .state import F_BLOCKED, F_ROUTED, NONE, TIME_WAIT, CLOSED, VERSION, FlowState
from .tcp import (DROP, FORWARD, M32, RST, SYN, Segment, advance, after, from_client,
                  is_opening, is_terminal)


class Result:
    __slots__ = ("verdict", "kind", "reason", "state", "changed", "hit", "routed", "terminal",
                 "fresh")

    def __init__(self, verdict, kind, reason, state, changed, hit=None, routed=None,
                 terminal=False, fresh=False):
        self.verdict, self.kind, self.reason, self.state = verdict, kind, reason, state
        self.changed, self.hit, self.routed = changed, hit, routed
        self.terminal, self.fresh = terminal, fresh

    def __repr__(self) -> str:
        return (f"Result({self.verdict}, {self.kind}, {self.reason!r}, hit={self.hit!r}, "
                f"routed={self.routed}, terminal={self.terminal})")


class Core:
    def __init__(self, inspector: Inspector | None = None, router: Router | None = None):
        self.inspector = inspector or Inspector([])
        self.router = router

    def process(self, state, seg: Segment, now: float) -> Result:
        st = FlowState.unpack(state)
        fresh = st.version == 0
        had_state = st.version == VERSION and st.tcp != NONE
        if st.flags & F_BLOCKED and had_state and not (
                seg.flags & RST or (is_opening(seg) and st.tcp in (TIME_WAIT, CLOSED))):
            return Result(DROP, "blocked", "flow blocked (malicious string seen)", None, False,
                          terminal=is_terminal(st))
        client = from_client(st, seg) if had_state else True
        expected = (st.c if client else st.s).end
        verdict, reason = advance(st, seg, now)
        if verdict == DROP:
            return Result(DROP, "nonconforming" if had_state else "no_state", reason, None,
                          False, terminal=had_state and is_terminal(st), fresh=fresh)
        client = from_client(st, seg)  # a new connection may have swapped the sides
        d = st.c if client else st.s
        payload = seg.payload
        hit = routed = None
        insp = self.inspector
        if insp.enabled:
            if st.tag != insp.tag:  # contexts of another pattern list (or none yet)
                st.c.node = st.s.node = 0
                st.tag = insp.tag
            if payload:
                start = (seg.seq + (1 if seg.flags & SYN else 0)) & M32
                if reason.startswith("SYN: new") or after(start, expected):
                    hit, d.node = insp.scan(0, payload)      # a new stream, or after a gap
                elif start == expected:
                    hit, d.node = insp.scan(d.node, payload)  # in order: with the context
                else:                                        # (partly) retransmitted
                    hit, _ = insp.scan(0, payload)
                    fresh_part = (expected - start) & M32
                    if hit is None and fresh_part < len(payload):
                        hit, d.node = insp.scan(d.node, payload[fresh_part:])
        if hit is not None:
            st.flags |= F_BLOCKED
            d.packets -= 1  # counted by advance() as forwarded: it is not
            d.bytes -= len(payload)
            return Result(DROP, "malicious", f"malicious string {hit!r}", st.pack(), True,
                          hit=hit, terminal=is_terminal(st), fresh=fresh)
        if (self.router is not None and client and payload and not st.flags & F_ROUTED):
            st.backend = routed = self.router.classify(payload)
            st.flags |= F_ROUTED
        return Result(FORWARD, "forward", reason, st.pack(), True, routed=routed,
                      terminal=is_terminal(st), fresh=fresh)
