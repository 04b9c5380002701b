"""MBServ's per-flow state: one packed, fixed-size record in the flow's `state[]` (pure).

The record is STATE_SIZE = 64 bytes, little-endian, no padding (struct "<", explicit offsets):

    off size field            meaning
      0   1  version          VERSION (1) once written; 0 = a zeroed slot (just created)
      1   1  tcp              TCP state: NONE SYN_SENT SYN_RCVD ESTABLISHED FIN_WAIT CLOSING
                              TIME_WAIT CLOSED (tcp.py)
      2   1  flags            F_CLIENT_IS_A F_BLOCKED F_ROUTED F_WSCALE F_FIN_C F_FIN_S
                              F_ACKED_C F_ACKED_S
      3   1  backend          index into the config's routing.backends (valid if F_ROUTED)
      4   4  last_seen        u32 seconds (int(now) mod 2**32) of the last forwarded segment
      8   4  c_end            client: highest seq + len it sent (SYN and FIN count 1)
     12   4  c_maxend         client: highest seq + len the server allowed it (ack + window)
     16   4  c_maxwin         client: largest window it advertised (scaled, bytes)
     20   4  s_end            server: same three
     24   4  s_maxend
     28   4  s_maxwin
     32   1  c_wscale         client's window-scale option (0..14), NO_WSCALE (0xFF) if none
     33   1  s_wscale         server's
     34   2  tag              inspection tag: 16 bits of the pattern set the nodes refer to
     36   4  c_packets        u32 segments forwarded client -> server
     40   4  s_packets        u32 segments forwarded server -> client
     44   8  c_bytes          u64 payload bytes forwarded client -> server
     52   8  s_bytes          u64 payload bytes forwarded server -> client
     60   2  c_node           client stream's inspection context (inspect.py): a prefix id
     62   2  s_node           server stream's

"Client" is the side whose SYN opened the connection; F_CLIENT_IS_A says whether it is side
`a` of the canonical flow key (the lower (address, port), shared/flowkey.py), so a segment's
direction follows from its own addresses. Sequence numbers are mod 2**32. A flow table whose
state_size is larger leaves the rest unused; a smaller one cannot hold MBServ's state.
"""
from __future__ import annotations

import struct

VERSION = 1
STATE_SIZE = 64
NO_WSCALE = 0xFF

# TCP states
NONE, SYN_SENT, SYN_RCVD, ESTABLISHED, FIN_WAIT, CLOSING, TIME_WAIT, CLOSED = range(8)
STATE_NAMES = ("NONE", "SYN_SENT", "SYN_RCVD", "ESTABLISHED", "FIN_WAIT", "CLOSING",
               "TIME_WAIT", "CLOSED")

# flags
F_CLIENT_IS_A = 0x01  # the client is side a of the canonical key
F_BLOCKED = 0x02      # a malicious string was seen: every later segment is dropped
F_ROUTED = 0x04       # the layer-7 decision is made: `backend` is valid
F_WSCALE = 0x08       # both sides offered window scaling: non-SYN windows are scaled
F_FIN_C = 0x10        # the client sent FIN
F_FIN_S = 0x20        # the server sent FIN
F_ACKED_C = 0x40      # the server acknowledged the client's FIN
F_ACKED_S = 0x80      # the client acknowledged the server's FIN

_LAYOUT = struct.Struct("<BBBBI" "III" "III" "BBH" "II" "QQ" "HH")
assert _LAYOUT.size == STATE_SIZE


class Direction:
    """One side's sequence tracking (the sender's view, as in netfilter's TCP window check)."""

    __slots__ = ("end", "maxend", "maxwin", "wscale", "packets", "bytes", "node")

    def __init__(self, end=0, maxend=0, maxwin=0, wscale=NO_WSCALE, packets=0, nbytes=0,
                 node=0):
        self.end, self.maxend, self.maxwin, self.wscale = end, maxend, maxwin, wscale
        self.packets, self.bytes, self.node = packets, nbytes, node

    def __repr__(self) -> str:
        return (f"Direction(end={self.end}, maxend={self.maxend}, maxwin={self.maxwin}, "
                f"wscale={self.wscale}, packets={self.packets}, bytes={self.bytes}, "
                f"node={self.node})")


class FlowState:
    """The unpacked record. `c` is the client's direction, `s` the server's."""

    __slots__ = ("version", "tcp", "flags", "backend", "last_seen", "tag", "c", "s")

    def __init__(self):
        self.version = self.tcp = self.flags = self.backend = self.last_seen = self.tag = 0
        self.c, self.s = Direction(), Direction()

    @classmethod
    def unpack(cls, data) -> "FlowState":
        """From the first STATE_SIZE bytes of `data` (bytes, bytearray or memoryview)."""
        (version, tcp, flags, backend, last_seen, c_end, c_maxend, c_maxwin, s_end, s_maxend,
         s_maxwin, c_ws, s_ws, tag, c_pk, s_pk, c_by, s_by, c_node,
         s_node) = _LAYOUT.unpack_from(data, 0)
        st = cls.__new__(cls)
        st.version, st.tcp, st.flags, st.backend = version, tcp, flags, backend
        st.last_seen, st.tag = last_seen, tag
        st.c = Direction(c_end, c_maxend, c_maxwin, c_ws, c_pk, c_by, c_node)
        st.s = Direction(s_end, s_maxend, s_maxwin, s_ws, s_pk, s_by, s_node)
        return st

    def pack(self) -> bytes:
        c, s = self.c, self.s
        return _LAYOUT.pack(self.version, self.tcp, self.flags, self.backend,
                            self.last_seen & 0xFFFFFFFF,
                            c.end, c.maxend, c.maxwin, s.end, s.maxend, s.maxwin,
                            c.wscale, s.wscale, self.tag,
                            c.packets & 0xFFFFFFFF, s.packets & 0xFFFFFFFF,
                            c.bytes & 0xFFFFFFFFFFFFFFFF, s.bytes & 0xFFFFFFFFFFFFFFFF,
                            c.node, s.node)

    @property
    def blocked(self) -> bool:
        return bool(self.flags & F_BLOCKED)

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.tcp] if self.tcp < len(STATE_NAMES) else f"?{self.tcp}"

    def __repr__(self) -> str:
        return (f"FlowState({self.state_name}, flags={self.flags:#x}, backend={self.backend}, "
                f"c={self.c!r}, s={self.s!r})")
