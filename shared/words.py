"""Shared-memory words as single loads and stores.

CPython's struct packs and unpacks *standard-size* formats ("<Q", "<I"...) one byte at a time,
so another process can see half of an update (a ring's tail going from 0x0FF to 0x100 reads as
0x000 between two byte stores). Native formats ("Q", "I"...) copy the whole aligned word at
once. Every word that another process reads while it changes must go through these. The ABI is
little-endian x86-64 (pico_abi.h), so native order is the ABI's order.
"""
from __future__ import annotations

import struct
import sys

if sys.byteorder != "little" or struct.calcsize("P") != 8:
    raise ImportError("Pico's shared-memory ABI is little-endian 64-bit (pico_abi.h)")

U16 = struct.Struct("H")
U32 = struct.Struct("I")
I32 = struct.Struct("i")
U64 = struct.Struct("Q")
I64 = struct.Struct("q")
