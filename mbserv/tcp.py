"""TCP segments and MBServ's per-flow TCP state machine (pure: no I/O, no clock).

    seg = parse_segment(ip_packet)                 # None: not TCP; BadSegment: broken TCP
    verdict, new_state, reason = step(state, seg, now)

The conformance rules are those of netfilter's TCP window tracking (G. van Rooij, "Real
Stateful TCP Packet Filtering in IP Filter"), over the packed record of state.py. For a
segment of a side ("sender") with sequence range [seq, end) (SYN and FIN count one):

    I    end <= sender.maxend                 not beyond what the receiver ever allowed
    II   seq >= sender.end - receiver.maxwin  at most one receiver window old
    III  ack <= receiver.end                  does not acknowledge data never sent
    IV   ack >= receiver.end - max(sender.maxwin, 66000)   not an impossibly old ack

So an old (retransmitted) segment is accepted as long as it is within a window of the newest
one: TCP retransmits after a failover, and after a drop downstream of MBServ. With Pico's output
commit a backup's state is never behind what the endpoints saw, so the same checks hold after a
failover; without replicated state there is no state at all and the segment is dropped.

States and transitions (client = the side whose SYN opened the connection):

    NONE        --client SYN-->                         SYN_SENT  (anything else: "no state")
    SYN_SENT    --server SYN-ACK acking the SYN-->      SYN_RCVD
                --server RST acking the SYN-->          CLOSED    (connection refused)
    SYN_RCVD    --client ACK-->                         ESTABLISHED
    any open    --FIN of one side-->                    FIN_WAIT; both FINs: CLOSING
    FIN_WAIT/CLOSING --both FINs acknowledged-->        TIME_WAIT
    any         --RST in window-->                      CLOSED
    TIME_WAIT/CLOSED --a new client SYN-->              SYN_SENT  (port reuse)

Retransmitted SYNs and SYN-ACKs, data and ACKs within the window, and retransmitted FINs are
accepted; data past a side's FIN, SYN with FIN or RST, a SYN-ACK that does not acknowledge the
SYN, anything but a SYN on a connection that was reset, are not. Simultaneous open (two SYNs
without ACK) is not supported: the second SYN is dropped.
"""
from __future__ import annotations

from .state import (CLOSED, CLOSING, ESTABLISHED, F_ACKED_C, F_ACKED_S, F_CLIENT_IS_A,
                    F_FIN_C, F_FIN_S, F_WSCALE, FIN_WAIT, NO_WSCALE, NONE, STATE_NAMES,
                    STATE_SIZE, SYN_RCVD, SYN_SENT, TIME_WAIT, VERSION, FlowState)

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
FORWARD, DROP = "forward", "drop"
M32 = 0xFFFFFFFF
MAXACKWINCONST = 66000  # netfilter's floor for rule IV
MAX_WSCALE = 14         # RFC 7323

V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
_V6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options
_V6_FRAG, _V6_AH = 44, 51


class BadSegment(ValueError):
    """A TCP packet MBServ cannot read: truncated, a bad data offset, a fragment."""


class Segment:
    """What MBServ needs of a TCP segment. `src_is_a`: the sender is side a of the canonical
    flow key (the lower (address, port), IPv4 compared IPv4-mapped, as in shared/flowkey.py)."""

    __slots__ = ("family", "src", "dst", "sport", "dport", "seq", "ack", "flags", "window",
                 "wscale", "payload", "src_is_a")

    def __init__(self, family, src, dst, sport, dport, seq, ack, flags, window, wscale, payload):
        self.family, self.src, self.dst, self.sport, self.dport = family, src, dst, sport, dport
        self.seq, self.ack, self.flags, self.window = seq, ack, flags, window
        self.wscale, self.payload = wscale, payload
        s16, d16 = (V4_MAPPED + src, V4_MAPPED + dst) if family == 4 else (src, dst)
        self.src_is_a = (s16, sport) <= (d16, dport)

    @property
    def seg_len(self) -> int:
        """Sequence space the segment takes: payload, plus one each for SYN and FIN."""
        return len(self.payload) + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)

    def __repr__(self) -> str:
        names = "".join(n for bit, n in ((SYN, "S"), (ACK, "A"), (FIN, "F"), (RST, "R"),
                                        (PSH, "P")) if self.flags & bit)
        return (f"Segment({self.sport}->{self.dport} {names or '.'} seq={self.seq} "
                f"ack={self.ack} win={self.window} len={len(self.payload)})")


def _wscale_option(opts: bytes) -> int:
    """The window-scale option's shift (capped at 14), or NO_WSCALE."""
    i, n = 0, len(opts)
    while i < n:
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= n or opts[i + 1] < 2:
            break  # a broken option list: stop reading it (the segment itself is fine)
        if kind == 3 and opts[i + 1] == 3 and i + 2 < n:
            return min(opts[i + 2], MAX_WSCALE)
        i += opts[i + 1]
    return NO_WSCALE


def parse_segment(data: bytes) -> Segment | None:
    """The TCP segment in IPv4/IPv6 packet `data`; None if the packet is not TCP (or not IP).
    Raises BadSegment for a TCP packet that cannot be read (truncated, fragment...)."""
    n = len(data)
    if n < 1:
        return None
    version = data[0] >> 4
    if version == 4:
        if n < 20:
            return None
        if data[9] != 6:
            return None
        ihl = (data[0] & 0x0F) * 4
        total = int.from_bytes(data[2:4], "big")
        if ihl < 20 or total < ihl or total > n:
            raise BadSegment(f"bad IPv4 header (IHL {ihl}, total length {total}, {n} bytes)")
        if int.from_bytes(data[6:8], "big") & 0x3FFF:
            raise BadSegment("IPv4 fragment: TCP fragments are not reassembled")
        family, src, dst, off = 4, bytes(data[12:16]), bytes(data[16:20]), ihl
    elif version == 6:
        if n < 40:
            return None
        total = 40 + int.from_bytes(data[4:6], "big")
        if total > n:
            return None
        proto, off = data[6], 40
        for _ in range(8):
            if proto in _V6_EXT or proto == _V6_AH:
                if total - off < 8:
                    return None
                hlen = (data[off + 1] + 2) * 4 if proto == _V6_AH else (data[off + 1] + 1) * 8
                proto, off = data[off], off + hlen
            elif proto == _V6_FRAG:
                if total - off < 8:
                    return None
                if int.from_bytes(data[off + 2:off + 4], "big") & 0xFFF9:
                    if data[off] == 6:
                        raise BadSegment("IPv6 fragment: TCP fragments are not reassembled")
                    return None
                proto, off = data[off], off + 8
            else:
                break
        if proto != 6:
            return None
        family, src, dst = 6, bytes(data[8:24]), bytes(data[24:40])
    else:
        return None
    if total - off < 20:
        raise BadSegment(f"truncated TCP header ({max(total - off, 0)} bytes)")
    doff = (data[off + 12] >> 4) * 4
    if doff < 20 or off + doff > total:
        raise BadSegment(f"bad TCP data offset {doff}")
    flags = data[off + 13]
    wscale = _wscale_option(bytes(data[off + 20:off + doff])) if flags & SYN else NO_WSCALE
    return Segment(family, src, dst,
                   int.from_bytes(data[off:off + 2], "big"),
                   int.from_bytes(data[off + 2:off + 4], "big"),
                   int.from_bytes(data[off + 4:off + 8], "big"),
                   int.from_bytes(data[off + 8:off + 12], "big"),
                   flags, int.from_bytes(data[off + 14:off + 16], "big"), wscale,
                   bytes(data[off + doff:total]))


# ------------------------------------------------------------------ sequence arithmetic
def before(a: int, b: int) -> bool:
    """a < b in sequence space (RFC 793, mod 2**32)."""
    return ((a - b) & M32) >= 0x80000000


def after(a: int, b: int) -> bool:
    return before(b, a)


# ------------------------------------------------------------------ the state machine
def is_opening(seg: Segment) -> bool:
    """A SYN without ACK, FIN or RST: the only segment that may create a flow's state."""
    return seg.flags & (SYN | ACK | FIN | RST) == SYN


def from_client(st: FlowState, seg: Segment) -> bool:
    return seg.src_is_a == bool(st.flags & F_CLIENT_IS_A)


def _open(st: FlowState, seg: Segment, now: float) -> None:
    """A new connection from seg's sender (the client); keeps only the inspection tag."""
    tag = st.tag
    st.__init__()
    st.version, st.tcp, st.tag = VERSION, SYN_SENT, tag
    st.flags = F_CLIENT_IS_A if seg.src_is_a else 0
    c = st.c
    c.end = c.maxend = (seg.seq + seg.seg_len) & M32
    c.maxwin = seg.window or 1  # windows in SYNs are never scaled
    c.wscale = seg.wscale
    _account(st, c, seg, now)


def _account(st: FlowState, d, seg: Segment, now: float) -> None:
    d.packets += 1
    d.bytes += len(seg.payload)
    st.last_seen = int(now) & M32


def _window_problem(st: FlowState, snd, rcv, seg: Segment, end: int) -> str | None:
    """Which of rules I-IV the segment breaks, or None."""
    if after(end, snd.maxend):
        return "beyond the receiver's window"
    if before(seg.seq, (snd.end - rcv.maxwin) & M32):
        return "older than the receiver's window"
    if seg.flags & ACK:
        if after(seg.ack, rcv.end):
            return "acknowledges data never sent"
        if before(seg.ack, (rcv.end - max(snd.maxwin, MAXACKWINCONST)) & M32):
            return "acknowledgement older than a window"
    return None


def advance(st: FlowState, seg: Segment, now: float) -> tuple[str, str]:
    """Apply `seg` to `st`: (FORWARD, what happened) with `st` updated, or (DROP, why) with
    `st` untouched."""
    flags = seg.flags
    syn, ack, fin, rst = flags & SYN, flags & ACK, flags & FIN, flags & RST
    if st.version not in (0, VERSION):
        return DROP, f"state written by another layout (version {st.version})"
    state = st.tcp if st.version else NONE
    opening = is_opening(seg)
    if state == NONE:
        if not opening:
            return DROP, "no flow state"
        _open(st, seg, now)
        return FORWARD, "SYN: new connection"
    if opening and state in (TIME_WAIT, CLOSED):
        _open(st, seg, now)
        return FORWARD, "SYN: new connection on a closed flow"
    if state == CLOSED:
        return DROP, "connection was reset"
    if syn and (fin or rst):
        return DROP, "SYN with FIN or RST"
    client = from_client(st, seg)
    snd, rcv = (st.c, st.s) if client else (st.s, st.c)
    end = (seg.seq + seg.seg_len) & M32

    if state == SYN_SENT:
        if client:
            if not opening:
                return DROP, "client segment before the SYN-ACK"
            if end == snd.end:
                _account(st, snd, seg, now)
                return FORWARD, "SYN retransmitted"
            _open(st, seg, now)
            return FORWARD, "SYN: new attempt (another ISN)"
        if seg.ack != st.c.end or not ack:
            return DROP, "server segment that does not acknowledge the SYN"
        if rst:
            st.tcp = CLOSED
            _account(st, snd, seg, now)
            return FORWARD, "RST: connection refused"
        if not syn:
            return DROP, "server segment before its SYN-ACK"
        snd.end = snd.maxend = end
        snd.maxwin = seg.window or 1
        snd.wscale = seg.wscale
        if snd.wscale != NO_WSCALE and rcv.wscale != NO_WSCALE:
            st.flags |= F_WSCALE
        lim = (seg.ack + seg.window) & M32  # the client may send this far
        if after(lim, rcv.maxend):
            rcv.maxend = lim
        st.tcp = SYN_RCVD
        _account(st, snd, seg, now)
        return FORWARD, "SYN-ACK"

    # SYN_RCVD and later: sequence and acknowledgement within the windows
    if syn and not ((not client and ack) or (client and not ack)):
        return DROP, ("client SYN-ACK" if client else
                      "server SYN without ACK (simultaneous open is not supported)")
    problem = _window_problem(st, snd, rcv, seg, end)
    if problem:
        return DROP, problem
    if st.flags & (F_FIN_C if client else F_FIN_S) and after(end, snd.end):
        return DROP, "data after FIN"

    # conforming: update (netfilter's tcp_in_window)
    scaled = (st.flags & F_WSCALE) and not syn and snd.wscale != NO_WSCALE
    win = seg.window << snd.wscale if scaled else seg.window
    if snd.maxwin < win:
        snd.maxwin = win
    if after(end, snd.end):
        snd.end = end
    if ack:
        lim = (seg.ack + win + (0 if win else 1)) & M32
        if after(lim, rcv.maxend):
            rcv.maxend = lim
    _account(st, snd, seg, now)
    if rst:
        st.tcp = CLOSED
        return FORWARD, "RST"
    what = "retransmitted SYN" if syn else "segment"
    if state == SYN_RCVD and client and ack:
        st.tcp = state = ESTABLISHED
        what = "handshake complete"
    if fin:
        st.flags |= F_FIN_C if client else F_FIN_S
        what = "FIN"
    if ack:  # does this acknowledge the other side's FIN?
        fin_other, acked_other = (F_FIN_S, F_ACKED_S) if client else (F_FIN_C, F_ACKED_C)
        if st.flags & fin_other and not before(seg.ack, rcv.end):
            st.flags |= acked_other
    if st.flags & (F_FIN_C | F_FIN_S) and state in (SYN_RCVD, ESTABLISHED, FIN_WAIT):
        st.tcp = CLOSING if st.flags & F_FIN_C and st.flags & F_FIN_S else FIN_WAIT
    if st.flags & (F_ACKED_C | F_ACKED_S) == F_ACKED_C | F_ACKED_S and st.tcp != TIME_WAIT:
        st.tcp = TIME_WAIT
        what = "both FINs acknowledged"
    return FORWARD, what


def step(state: bytes, seg: Segment, now: float) -> tuple[str, bytes, str]:
    """(verdict, new state bytes, reason) for `seg` on the packed `state` (b"" or zeros: none)."""
    if len(state) < STATE_SIZE:
        state = bytes(state) + bytes(STATE_SIZE - len(state))
    st = FlowState.unpack(state)
    verdict, reason = advance(st, seg, now)
    return verdict, (st.pack() if verdict == FORWARD else bytes(state[:STATE_SIZE])), reason


def is_terminal(st: FlowState) -> bool:
    """Nothing more to forward but stray retransmissions: the flow may be deleted later."""
    return st.tcp in (TIME_WAIT, CLOSED)


def state_name(st: FlowState) -> str:
    return STATE_NAMES[st.tcp] if st.tcp < len(STATE_NAMES) else f"?{st.tcp}"


# ------------------------------------------------------------------ resets
def reset_for(data: bytes) -> bytes | None:
    """A TCP RST answering the segment in IP packet `data` to its sender (RFC 793, "Reset
    Generation"), IPv4 or IPv6, or None (not TCP, or itself an RST). Checksums are left 0: the
    PMM computes them before it sends a made packet."""
    try:
        seg = parse_segment(data)
    except BadSegment:
        return None
    if seg is None or seg.flags & RST:
        return None
    if seg.flags & ACK:
        r_seq, r_ack, r_flags = seg.ack, 0, RST
    else:
        r_seq, r_ack, r_flags = 0, (seg.seq + seg.seg_len) & M32, RST | ACK
    tcp = (seg.dport.to_bytes(2, "big") + seg.sport.to_bytes(2, "big") +
           r_seq.to_bytes(4, "big") + r_ack.to_bytes(4, "big") +
           bytes([5 << 4, r_flags]) + bytes(6))
    if seg.family == 4:
        ip = (bytes([0x45, 0]) + (20 + len(tcp)).to_bytes(2, "big") + bytes(2) + b"\x40\x00" +
              bytes([64, 6]) + bytes(2) + seg.dst + seg.src)
    else:
        ip = ((6 << 28).to_bytes(4, "big") + len(tcp).to_bytes(2, "big") + bytes([6, 64]) +
              seg.dst + seg.src)
    return ip + tcp
