"""Malicious-string inspection over a TCP byte stream, one segment at a time (pure).

    insp = Inspector([b"EVIL", b"/etc/passwd"])
    hit, node = insp.scan(node, payload)     # hit: the pattern found (as configured), or None

A pattern may be split across segments. Instead of keeping the last few bytes of the previous
payload verbatim, the flow state keeps their essence in two bytes per direction: the id of the
longest suffix of the stream so far that is a proper prefix of some pattern (a "node"; 0 = none,
the same idea as an Aho-Corasick automaton state). scan() searches prefix(node) + payload, so a
pattern that starts in any earlier segment and ends in this one is found, however many segments
it spans, and the new node is again the longest such suffix. Proof sketch: the part of an
occurrence before this payload is a suffix of the stream and a prefix of the pattern, so it is
a suffix of prefix(node), the longest such.

Node ids are deterministic (sorted prefixes), so replicas with the same pattern list agree on
them; `tag` (16 bits of a CRC of the list) is stored beside them so a flow whose nodes refer to
another list restarts from node 0 (see core.py). With ignore_case, ASCII letters match either
case.
"""
from __future__ import annotations

import re
import zlib

MAX_NODES = 0xFFFF  # node ids are u16


class Inspector:
    def __init__(self, patterns, ignore_case: bool = False):
        pats: list[bytes] = []
        for p in patterns:
            p = bytes(p)
            if not p:
                raise ValueError("an empty malicious string would match everything")
            if p not in pats:
                pats.append(p)
        self.patterns = tuple(pats)
        self.ignore_case = ignore_case
        norm = [p.lower() for p in pats] if ignore_case else pats
        self._display = dict(zip(norm, pats))  # normalized match -> pattern as configured
        prefixes = sorted({q[:k] for q in norm for k in range(1, len(q))})
        if len(prefixes) >= MAX_NODES:
            raise ValueError(f"the malicious strings have {len(prefixes)} distinct prefixes; "
                             f"at most {MAX_NODES - 1} fit the flow state (u16): shorten them")
        self._prefix = [b""] + prefixes
        self._node = {q: i for i, q in enumerate(self._prefix)}
        self._keep = max((len(q) for q in norm), default=1) - 1
        # longest first, so the reported pattern is the longest one found at the leftmost place
        alts = b"|".join(re.escape(q) for q in sorted(set(norm), key=len, reverse=True))
        self._re = re.compile(alts, re.IGNORECASE if ignore_case else 0) if pats else None
        crc = zlib.crc32(b"\0".join(norm) + (b"\1i" if ignore_case else b"\1c"))
        self.tag = (crc ^ (crc >> 16)) & 0xFFFF or 1  # 0 is "no tag yet"

    @property
    def enabled(self) -> bool:
        return self._re is not None

    def prefix_of(self, node: int) -> bytes:
        """The stream suffix a node stands for (b"" for 0 or an unknown id)."""
        return self._prefix[node] if 0 < node < len(self._prefix) else b""

    def scan(self, node: int, payload: bytes) -> tuple[bytes | None, int]:
        """(the first malicious string in prefix(node) + payload or None, the new node)."""
        if self._re is None:
            return None, 0
        ctx = self.prefix_of(node) + payload
        m = self._re.search(ctx)
        if m is not None:
            found = m.group(0)
            return self._display.get(found.lower() if self.ignore_case else found, found), 0
        tail = ctx[-self._keep:] if self._keep else b""
        if self.ignore_case:
            tail = tail.lower()
        get = self._node.get
        for k in range(len(tail), 0, -1):
            n = get(tail[-k:])
            if n is not None:
                return None, n
        return None, 0
