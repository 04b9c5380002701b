"""Shared-memory words as whole loads and stores: typed memoryview casts.

Two traps make struct unusable for words another process reads while they change:
- struct.pack_into first memsets its target to zero, then writes the value: a reader can see
  0 in between (a ring's tail read as 0 makes it look like the consumer ran ahead);
- standard-size formats ("<Q") are packed and unpacked one byte at a time.
A memoryview cast to "Q", "I"... copies each item with one aligned machine word, so readers see
either the old or the new value. The ABI is little-endian x86-64 (pico_abi.h), so native item
order is the ABI's order. Index = byte offset >> log2(item size); offsets are aligned by the ABI.
"""
from __future__ import annotations

import struct
import sys

if sys.byteorder != "little" or struct.calcsize("P") != 8:
    raise ImportError("Pico's shared-memory ABI is little-endian 64-bit (pico_abi.h)")


def word_views(buf: memoryview, formats: str) -> tuple[memoryview, ...]:
    """One typed view of `buf` per format character ("H", "I", "i", "Q", "q")."""
    raw = buf if isinstance(buf, memoryview) else memoryview(buf)
    raw = raw.cast("B") if raw.format != "B" else raw
    return tuple(raw.cast(f) for f in formats)
