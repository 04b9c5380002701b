"""Python mirror of shared/pico_abi.h: constants and numpy dtypes with explicit offsets.

pico_abi.h is the specification; this module must agree with it byte for byte, and
tests/test_abi_offsets.py compiles a C program that prints every offsetof/sizeof and compares.
"""
from __future__ import annotations

import numpy as np

ABI_MAJOR = 1
ABI_MINOR = 3

MAGIC = int.from_bytes(b"PICOSEG1", "little")
READY = int.from_bytes(b"REDY", "little")
CLOSED = int.from_bytes(b"CLSD", "little")

SEG_FLOWS = 1
SEG_PACKETS = 2  # PMM: packet rings and the group table
SEG_GROUPS = 3   # reserved
SEG_KIND_NAMES = {SEG_FLOWS: "flows", SEG_PACKETS: "packets", SEG_GROUPS: "groups"}

STATUS_FREE = 0
STATUS_ACTIVE = 1
STATUS_STANDBY = 2
STATUS_TOMBSTONE = 3
STATUS_NAMES = {0: "free", 1: "active", 2: "standby", 3: "tombstone"}

GROUP_DEFAULT = 0
MAX_CLIENTS = 64
SLOT_HEADER = 96
SLOT_ALIGN = 32
SEM_PREFIX_LEN = 48

FLOW_DESC_OFFSET = 128
FLOW_COUNTERS_OFFSET = 256
CLIENTS_OFFSET = 384

LANG_PYTHON = 1
LANG_C = 2


def _struct(spec: list[tuple[str, str | tuple, int]], itemsize: int) -> np.dtype:
    """A little-endian structured dtype from (name, format, offset) triples."""
    names = [n for n, _, _ in spec]
    formats = [f for _, f, _ in spec]
    offsets = [o for _, _, o in spec]
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": itemsize})


SEG_HEADER = _struct([
    ("magic", "<u8", 0),
    ("abi_major", "<u4", 8),
    ("abi_minor", "<u4", 12),
    ("kind", "<u4", 16),
    ("header_size", "<u4", 20),
    ("segment_size", "<u8", 24),
    ("owner_pid", "<i8", 32),
    ("owner_start_time", "<u8", 40),
    ("created_ns", "<u8", 48),
    ("owner_replica", "<u4", 56),
    ("reserved0", "<u4", 60),
    ("reserved", ("<u8", 7), 64),
    ("ready", "<u4", 120),
    ("reserved1", "<u4", 124),
], 128)

FLOW_DESC = _struct([
    ("n_slots", "<u8", 0),
    ("capacity", "<u8", 8),
    ("slot_size", "<u4", 16),
    ("state_size", "<u4", 20),
    ("n_stripes", "<u4", 24),
    ("slots_per_stripe", "<u4", 28),
    ("max_per_stripe", "<u4", 32),
    ("lock_timeout_ms", "<u4", 36),
    ("clients_offset", "<u8", 40),
    ("stripes_offset", "<u8", 48),
    ("slots_offset", "<u8", 56),
    ("sem_prefix", f"S{SEM_PREFIX_LEN}", 64),
    ("reserved", ("<u8", 2), 112),
], 128)

FLOW_COUNTERS = _struct([
    ("standby_installed", "<u8", 0),
    ("activated", "<u8", 8),
    ("lock_recoveries", "<u8", 16),
    ("txn_recoveries", "<u8", 24),
    ("client_recoveries", "<u8", 32),
    ("heartbeat_ns", "<u8", 40),
    ("reserved", ("<u8", 10), 48),
], 128)

CLIENT = _struct([
    ("pid", "<i8", 0),
    ("start_time", "<u8", 8),
    ("attached_ns", "<u8", 16),
    ("lang", "<u4", 24),
    ("reserved0", "<u4", 28),
    ("name", "S32", 32),
], 64)

STRIPE = _struct([
    ("holder_pid", "<i8", 0),
    ("acquisitions", "<u8", 8),
    ("live", "<u4", 16),
    ("tombstones", "<u4", 20),
    ("recoveries", "<u8", 24),
    ("dirty", ("u1", 16), 32),
    ("pad", ("u1", 16), 48),
], 64)

FLOW_KEY = _struct([
    ("addr_a", ("u1", 16), 0),
    ("addr_b", ("u1", 16), 16),
    ("port_a", "<u2", 32),
    ("port_b", "<u2", 34),
    ("proto", "u1", 36),
    ("family", "u1", 37),
    ("pad", ("u1", 2), 38),
], 40)

SLOT_HEADER_DTYPE = _struct([
    ("key", FLOW_KEY, 0),
    ("status", "<u4", 40),
    ("owner", "<u2", 44),
    ("flags", "<u2", 46),
    ("group", "<u4", 48),
    ("refcount", "<u4", 52),
    ("version", "<u8", 56),
    ("ckpt_epoch", "<u8", 64),
    ("modified", "<u4", 72),
    ("txn_pid", "<i4", 76),
    ("hash", "<u8", 80),
    ("reserved", "<u8", 88),
], SLOT_HEADER)

# ---------------------------------------------------------------- packet segment (ABI 1.1)
PKT_DESC_OFFSET = 128
PKT_COUNTERS_OFFSET = 256
GROUPS_OFFSET = 384
PKT_META_SIZE = 128
RING_HEADER_SIZE = 256

GROUP_FREE = 0
GROUP_ACTIVE = 1

PKT_NEW = 0x01
PKT_MODIFIED = 0x02
PKT_DIRECT = 0x04
PKT_DROP = 0x08
PKT_CREATED = 0x10
PKT_IPV6 = 0x20
PKT_NOFLOW = 0x40

PKT_DESC = _struct([
    ("max_groups", "<u4", 0),
    ("ring_slots", "<u4", 4),
    ("slot_size", "<u4", 8),
    ("mtu", "<u4", 12),
    ("groups_offset", "<u8", 16),
    ("rings_offset", "<u8", 24),
    ("ring_bytes", "<u8", 32),
    ("n_rings", "<u4", 40),
    ("consumer_pid", "<u4", 44),
    ("groups_generation", "<u8", 48),
    ("sem_prefix", f"S{SEM_PREFIX_LEN}", 56),
    ("in_waiting", "<u4", 104),
    ("out_waiting", "<u4", 108),
    ("view", "<u8", 112),
    ("alive_mask", "<u8", 120),
], 128)

PKT_COUNTERS = _struct([
    ("rx_packets", "<u8", 0),
    ("rx_bytes", "<u8", 8),
    ("malformed", "<u8", 16),
    ("default_group", "<u8", 24),
    ("input_drops", "<u8", 32),
    ("released", "<u8", 40),
    ("unwritten_drops", "<u8", 48),
    ("raw_sent", "<u8", 56),
    ("verdict_errors", "<u8", 64),
    ("heartbeat_ns", "<u8", 72),
    ("pending", "<u8", 80),
    ("output_errors", "<u8", 88),
    ("standby_held", "<u8", 96),
    ("standby_drops", "<u8", 104),
    ("rm_waiting", "<u4", 112),  # (ABI 1.3) the RM's sleep word: not a counter
    ("reserved0", "<u4", 116),
    ("reserved1", "<u8", 120),
], 128)
PKT_COUNTER_NAMES = [n for n in PKT_COUNTERS.names
                     if n not in ("rm_waiting", "reserved0", "reserved1")]

GROUP_CONTROL = ["id", "state", "frequency_hz", "target", "buffering", "suspended", "protected_"]
GROUP_PMM = ["rx_packets", "rx_bytes", "input_drops", "released", "held"]
GROUP_MB = ["pkts_read", "pkts_done", "written", "written_direct", "dropped", "output_full",
            "created"]
GROUP = _struct(
    [(n, "<u4", 4 * i) for i, n in enumerate(GROUP_CONTROL)]
    + [("discard", "<u4", 28), ("epoch", "<u8", 32), ("committed", "<u8", 40),
       ("reserved1", ("<u8", 2), 48)]
    + [(n, "<u8", 64 + 8 * i) for i, n in enumerate(GROUP_PMM)]
    + [("reserved2", ("<u8", 3), 104)]
    + [(n, "<u8", 128 + 8 * i) for i, n in enumerate(GROUP_MB)]
    + [("reserved3", "<u8", 184), ("reserved4", ("<u8", 8), 192)], 256)

RING_HEADER = _struct([
    ("tail", "<u8", 0),
    ("full_drops", "<u8", 8),
    ("pad0", ("u1", 48), 16),
    ("head", "<u8", 64),
    ("pad1", ("u1", 56), 72),
    ("pad2", ("u1", 128), 128),
], RING_HEADER_SIZE)

PKT_META = _struct([
    ("len", "<u4", 0),
    ("flags", "<u4", 4),
    ("packet_id", "<u4", 8),
    ("group", "<u4", 12),
    ("flow_hash", "<u8", 16),
    ("epoch", "<u8", 24),
    ("ts_ns", "<u8", 32),
    ("group_index", "<u4", 40),
    ("reserved0", "<u4", 44),
    ("key", FLOW_KEY, 48),
    ("reserved", ("u1", 40), 88),
], PKT_META_SIZE)


def pkt_slot_size(mtu: int) -> int:
    """Bytes per ring slot: the 128-byte meta plus the MTU rounded up to 64."""
    return PKT_META_SIZE + -(-mtu // 64) * 64


def pkt_layout(max_groups: int, ring_slots: int, mtu: int) -> dict[str, int]:
    """Offsets and total size of a packet segment, as pico_abi.h documents them."""
    slot = pkt_slot_size(mtu)
    ring_bytes = RING_HEADER_SIZE + ring_slots * slot
    n_rings = 2 * max_groups + 1
    rings = -(-(GROUPS_OFFSET + max_groups * GROUP.itemsize) // 4096) * 4096
    size = rings + n_rings * ring_bytes
    return {"groups_offset": GROUPS_OFFSET, "rings_offset": rings, "ring_bytes": ring_bytes,
            "n_rings": n_rings, "slot_size": slot, "segment_size": -(-size // 4096) * 4096}


#: C struct name -> dtype, for the offset agreement test.
C_STRUCTS = {
    "pico_seg_header": SEG_HEADER,
    "pico_flow_desc": FLOW_DESC,
    "pico_flow_counters": FLOW_COUNTERS,
    "pico_client": CLIENT,
    "pico_stripe": STRIPE,
    "pico_flow_key": FLOW_KEY,
    "pico_flow_slot": SLOT_HEADER_DTYPE,
    "pico_pkt_desc": PKT_DESC,
    "pico_pkt_counters": PKT_COUNTERS,
    "pico_group": GROUP,
    "pico_ring_header": RING_HEADER,
    "pico_pkt_meta": PKT_META,
}


def slot_size(state_size: int) -> int:
    """Bytes per slot: the 96-byte header plus the state, rounded up to 32."""
    return -(-(SLOT_HEADER + state_size) // SLOT_ALIGN) * SLOT_ALIGN


def slot_dtype(state_size: int) -> np.dtype:
    """A whole slot (header + state blob) for a table with this state size."""
    fields = dict(SLOT_HEADER_DTYPE.fields)
    names = list(SLOT_HEADER_DTYPE.names) + ["state"]
    formats = [fields[n][0] for n in SLOT_HEADER_DTYPE.names] + [("u1", state_size)]
    offsets = [fields[n][1] for n in SLOT_HEADER_DTYPE.names] + [SLOT_HEADER]
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": slot_size(state_size)})


def flow_layout(n_slots: int, n_stripes: int, state_size: int) -> dict[str, int]:
    """Offsets and total size of a flow-state segment, as the header documents them."""
    clients = CLIENTS_OFFSET
    stripes = -(-(clients + MAX_CLIENTS * CLIENT.itemsize) // 64) * 64
    slots = -(-(stripes + n_stripes * STRIPE.itemsize) // 4096) * 4096
    size = slots + n_slots * slot_size(state_size)
    return {"clients_offset": clients, "stripes_offset": stripes, "slots_offset": slots,
            "slot_size": slot_size(state_size), "segment_size": -(-size // 4096) * 4096}
