"""The control wire format, version 1 (docs/protocol.md is its prose twin).

Every request and reply is ONE ZeroMQ frame (after the ROUTER/REQ envelope):

    offset  size  field
    0       4     magic b"PCTL"
    4       2     version (1)
    6       2     type (request types below; a reply has type | 0x80, ERROR is 0xFF)
    8       8     seq: chosen by the requester, echoed in the reply
    16      4     body_len: bytes after this 24-byte header (must match the frame)
    20      4     status: 0 in requests; in replies 0 = ok, else an ERR_* code
    24      ...   body

Bodies: binary for the data path (INSTALL, ACTIVATE, their replies), UTF-8 JSON for the
operator's calls (PING, DUMP, STATS replies, and every error reply's message).
"""
from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass

import numpy as np

from .errors import WireError

MAGIC = b"PCTL"
VERSION = 1
HEADER = struct.Struct("<4sHHQII")
HEADER_SIZE = HEADER.size  # 24

# Request types
PING, INSTALL, ACTIVATE, DUMP, STATS = 1, 2, 3, 4, 5
INSTALL_BATCH = 6  # several groups' INSTALLs in one message (the RM's per-pass send)
REPLY_BIT = 0x80
ERROR = 0xFF
# The RM's control requests (picoctl): JSON bodies, JSON replies.
GROUPS, SUSPEND, RESUME, GROUP_SET = 16, 17, 18, 19
GROUP_CREATE, GROUP_DELETE, FLOWS, MOVE = 20, 21, 22, 23
# Events a replica reports to the controller (control.controller_endpoint): JSON both ways.
EVENT = 24
# The controller's new membership view, to a replica's RM (JSON): it re-protects taken-over flows.
VIEW = 25
# Live migration (the controller's elastic scale): FREEZE {"group": G|null, "view": V} holds a
# group (null: every protected group) and answers once its last epoch is acknowledged;
# HANDOFF {"group": G, "view": V}: the group's flows live elsewhere now, drop them and go on.
FREEZE, HANDOFF = 26, 27
# TAKEOVER {"group": G, "view": V}: activate the standby flows of G whose bucket this replica
# is now the primary of (scale-out, on the newcomer); answers {"activated": n}.
TAKEOVER = 29
# To the controller: SCALE {"op": "in"|"out", "replica": R} (picoctl scale-in/scale-out).
SCALE = 28
TYPE_NAMES = {PING: "ping", INSTALL: "install", ACTIVATE: "activate", DUMP: "dump",
              STATS: "stats", INSTALL_BATCH: "install_batch", GROUPS: "groups",
              SUSPEND: "suspend", RESUME: "resume", GROUP_SET: "group_set",
              GROUP_CREATE: "group_create", GROUP_DELETE: "group_delete", FLOWS: "flows",
              MOVE: "move", EVENT: "event", VIEW: "view", FREEZE: "freeze",
              HANDOFF: "handoff", SCALE: "scale", TAKEOVER: "takeover", ERROR: "error"}

# Status / error codes
OK = 0
ERR_BAD_MAGIC, ERR_BAD_VERSION, ERR_TRUNCATED, ERR_TOO_LARGE = 1, 2, 3, 4
ERR_UNKNOWN_TYPE, ERR_BAD_BODY, ERR_STATE_SIZE, ERR_TABLE_FULL = 5, 6, 7, 8
ERR_EPOCH_GAP, ERR_BAD_ENVELOPE, ERR_INTERNAL = 9, 10, 11
ERR_BUSY = 12  # an operator change could not get the groups quiet in time: try again
ERROR_NAMES = {ERR_BAD_MAGIC: "bad_magic", ERR_BAD_VERSION: "bad_version",
               ERR_TRUNCATED: "truncated", ERR_TOO_LARGE: "too_large",
               ERR_UNKNOWN_TYPE: "unknown_type", ERR_BAD_BODY: "bad_body",
               ERR_STATE_SIZE: "state_size", ERR_TABLE_FULL: "table_full",
               ERR_EPOCH_GAP: "epoch_gap", ERR_BAD_ENVELOPE: "bad_envelope",
               ERR_INTERNAL: "internal", ERR_BUSY: "busy"}

# INSTALL body: a 40-byte header, then n_records fixed-size records.
INSTALL_HEADER = struct.Struct("<IIQQIIII")  # owner group epoch base_epoch n state_size flags rsvd
INSTALL_FULL = 1  # flags bit 0: the records are the group's whole state (a resync)
OP_UPSERT, OP_DELETE = 1, 2
RECORD_HEADER = 56  # key[40] op u8 pad[7] version u64, then state[state_size]

# INSTALL reply body
INSTALL_REPLY = struct.Struct("<IIQIIII")  # disposition rsvd acked_epoch installed updated deleted conflicts
APPLIED, DUPLICATE = 0, 1

# ACTIVATE body: selector, argument, new group, key count, then keys
ACTIVATE_HEADER = struct.Struct("<IIII")
SEL_REPLICA, SEL_GROUP, SEL_KEYS = 1, 2, 3
KEEP_GROUP = 0xFFFFFFFF
KEY_SIZE = 40


@functools.lru_cache(maxsize=16)
def record_dtype(state_size: int) -> np.dtype:
    return np.dtype({"names": ["key", "op", "version", "state"],
                     "formats": [("u1", KEY_SIZE), "u1", "<u8", ("u1", state_size)],
                     "offsets": [0, 40, 48, RECORD_HEADER],
                     "itemsize": RECORD_HEADER + state_size})


@dataclass(frozen=True)
class Message:
    type: int
    seq: int
    status: int
    body: bytes


def encode(type_: int, seq: int, body: bytes = b"", status: int = OK) -> bytes:
    return HEADER.pack(MAGIC, VERSION, type_, seq, len(body), status) + body


def decode(frame: bytes, max_bytes: int) -> Message:
    """Parse one frame; raises WireError with the code to send back."""
    if len(frame) > max_bytes:
        raise WireError(ERR_TOO_LARGE, f"message of {len(frame)} bytes exceeds the limit of "
                        f"{max_bytes} (control.max_message_bytes): split it")
    if len(frame) < HEADER_SIZE:
        raise WireError(ERR_TRUNCATED, f"message of {len(frame)} bytes is shorter than the "
                        f"{HEADER_SIZE}-byte header")
    magic, version, type_, seq, body_len, status = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise WireError(ERR_BAD_MAGIC, f"bad magic {magic!r}, expected {MAGIC!r}: not a Pico "
                        "control message")
    if version != VERSION:
        raise WireError(ERR_BAD_VERSION, f"protocol version {version} not supported; this "
                        f"peer speaks version {VERSION}: upgrade the older side")
    if body_len != len(frame) - HEADER_SIZE:
        raise WireError(ERR_TRUNCATED, f"header says {body_len} body bytes, frame carries "
                        f"{len(frame) - HEADER_SIZE}: truncated or padded message")
    return Message(type_, seq, status, bytes(frame[HEADER_SIZE:]))


def peek_seq(frame: bytes) -> int:
    """The seq of a frame too broken to decode, if its header is there (else 0)."""
    if len(frame) >= HEADER_SIZE:
        return HEADER.unpack_from(frame)[3]
    return 0


def error_reply(seq: int, code: int, message: str, type_: int = ERROR) -> bytes:
    body = json.dumps({"error": ERROR_NAMES.get(code, str(code)), "message": message}).encode()
    return encode(type_, seq, body, status=code)


def json_body(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def parse_json_body(body: bytes) -> dict:
    if not body:
        return {}
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(ERR_BAD_BODY, f"body is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise WireError(ERR_BAD_BODY, f"body must be a JSON object, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------- INSTALL
@dataclass(frozen=True)
class Install:
    owner: int
    group: int
    epoch: int
    base_epoch: int
    flags: int
    state_size: int
    records: np.ndarray  # record_dtype(state_size)


def encode_install(owner: int, group: int, epoch: int, base_epoch: int, state_size: int,
                   records: np.ndarray | list, flags: int = 0) -> bytes:
    """records: an array of record_dtype(state_size), or a list of (key, op, version, state)."""
    if not isinstance(records, np.ndarray):
        arr = np.zeros(len(records), dtype=record_dtype(state_size))
        for i, (key, op, version, state) in enumerate(records):
            arr[i]["key"] = np.frombuffer(key, dtype=np.uint8)
            arr[i]["op"] = op
            arr[i]["version"] = version
            if state is not None:
                st = np.frombuffer(bytes(state), dtype=np.uint8)[:state_size]
                arr[i]["state"][:len(st)] = st
        records = arr
    head = INSTALL_HEADER.pack(owner, group, epoch, base_epoch, len(records), state_size,
                               flags, 0)
    return head + records.tobytes()


def decode_install(body: bytes) -> Install:
    if len(body) < INSTALL_HEADER.size:
        raise WireError(ERR_TRUNCATED, f"INSTALL body of {len(body)} bytes is shorter than "
                        f"its {INSTALL_HEADER.size}-byte header")
    owner, group, epoch, base, n, state_size, flags, _ = INSTALL_HEADER.unpack_from(body)
    if state_size > 1 << 20:
        raise WireError(ERR_BAD_BODY, f"INSTALL state_size {state_size} is absurd")
    want = INSTALL_HEADER.size + n * (RECORD_HEADER + state_size)
    if len(body) != want:
        raise WireError(ERR_TRUNCATED, f"INSTALL of {n} records of state {state_size} needs "
                        f"{want} body bytes, got {len(body)}")
    if epoch == 0:
        raise WireError(ERR_BAD_BODY, "INSTALL epoch 0 is reserved (epochs start at 1)")
    recs = np.frombuffer(body, dtype=record_dtype(state_size), count=n,
                         offset=INSTALL_HEADER.size)
    bad_ops = np.flatnonzero((recs["op"] != OP_UPSERT) & (recs["op"] != OP_DELETE))
    if len(bad_ops):
        raise WireError(ERR_BAD_BODY, f"INSTALL record {int(bad_ops[0])} has unknown op "
                        f"{int(recs['op'][bad_ops[0]])} (1 upsert, 2 delete)")
    return Install(owner, group, epoch, base, flags, state_size, recs)


# ---------------------------------------------------------------- INSTALL_BATCH
# Body: u32 n_sections, u32 reserved, then per section u32 length + an INSTALL body (above).
# Reply body: u32 n, u32 reserved, then per section (in order) u32 group, u32 status (OK or an
# ERR_* code: one group's gap or full table does not fail the others), then the 32-byte
# INSTALL_REPLY (zeros unless status is OK).
BATCH_HEADER = struct.Struct("<II")
SECTION_LEN = struct.Struct("<I")
BATCH_REPLY = struct.Struct("<II")  # group status, then INSTALL_REPLY
MAX_SECTIONS = 4096


def encode_install_batch(sections: list[bytes]) -> bytes:
    parts = [BATCH_HEADER.pack(len(sections), 0)]
    for body in sections:
        parts += [SECTION_LEN.pack(len(body)), body]
    return b"".join(parts)


def split_install_batch(body: bytes) -> list[bytes]:
    """The INSTALL bodies of a batch (each still to be decoded with decode_install)."""
    if len(body) < BATCH_HEADER.size:
        raise WireError(ERR_TRUNCATED, f"INSTALL_BATCH body of {len(body)} bytes is shorter "
                        f"than its {BATCH_HEADER.size}-byte header")
    n, _ = BATCH_HEADER.unpack_from(body)
    if n > MAX_SECTIONS:
        raise WireError(ERR_BAD_BODY, f"INSTALL_BATCH of {n} sections exceeds {MAX_SECTIONS}")
    off, out = BATCH_HEADER.size, []
    for i in range(n):
        if off + SECTION_LEN.size > len(body):
            raise WireError(ERR_TRUNCATED, f"INSTALL_BATCH section {i} of {n} is missing")
        (length,) = SECTION_LEN.unpack_from(body, off)
        off += SECTION_LEN.size
        if off + length > len(body):
            raise WireError(ERR_TRUNCATED, f"INSTALL_BATCH section {i} announces {length} "
                            f"bytes, {len(body) - off} remain")
        out.append(body[off:off + length])
        off += length
    if off != len(body):
        raise WireError(ERR_TRUNCATED, f"INSTALL_BATCH carries {len(body) - off} bytes after "
                        f"its {n} sections")
    return out


def encode_batch_reply(rows: list[tuple[int, int, bytes]]) -> bytes:
    """rows: (group, status, INSTALL_REPLY bytes or b"")."""
    zero = bytes(INSTALL_REPLY.size)
    return BATCH_HEADER.pack(len(rows), 0) + b"".join(
        BATCH_REPLY.pack(g, st) + (r or zero) for g, st, r in rows)


def decode_batch_reply(body: bytes) -> list[tuple[int, int, tuple]]:
    """[(group, status, INSTALL_REPLY fields)] of an INSTALL_BATCH reply."""
    n, _ = BATCH_HEADER.unpack_from(body)
    row = BATCH_REPLY.size + INSTALL_REPLY.size
    if len(body) != BATCH_HEADER.size + n * row:
        raise WireError(ERR_TRUNCATED, f"INSTALL_BATCH reply of {n} rows has {len(body)} bytes")
    out = []
    for i in range(n):
        off = BATCH_HEADER.size + i * row
        g, st = BATCH_REPLY.unpack_from(body, off)
        out.append((g, st, INSTALL_REPLY.unpack_from(body, off + BATCH_REPLY.size)))
    return out


# ---------------------------------------------------------------- ACTIVATE
def encode_activate(selector: int, arg: int = 0, keys: list[bytes] = (),
                    new_group: int = KEEP_GROUP) -> bytes:
    return ACTIVATE_HEADER.pack(selector, arg, new_group, len(keys)) + b"".join(keys)


def decode_activate(body: bytes) -> tuple[int, int, int, list[bytes]]:
    if len(body) < ACTIVATE_HEADER.size:
        raise WireError(ERR_TRUNCATED, "ACTIVATE body shorter than its 16-byte header")
    selector, arg, new_group, n = ACTIVATE_HEADER.unpack_from(body)
    if selector not in (SEL_REPLICA, SEL_GROUP, SEL_KEYS):
        raise WireError(ERR_BAD_BODY, f"ACTIVATE selector {selector} unknown (1 replica, "
                        "2 group, 3 keys)")
    if len(body) != ACTIVATE_HEADER.size + n * KEY_SIZE:
        raise WireError(ERR_TRUNCATED, f"ACTIVATE announces {n} keys but carries "
                        f"{len(body) - ACTIVATE_HEADER.size} key bytes")
    off = ACTIVATE_HEADER.size
    keys = [body[off + i * KEY_SIZE: off + (i + 1) * KEY_SIZE] for i in range(n)]
    return selector, arg, new_group, keys


def decode_key_list(body: bytes) -> list[bytes]:
    """ACTIVATE reply body: u32 count, then count 40-byte keys."""
    (n,) = struct.unpack_from("<I", body)
    return [body[4 + i * KEY_SIZE: 4 + (i + 1) * KEY_SIZE] for i in range(n)]


def encode_key_list(keys: list[bytes]) -> bytes:
    return struct.pack("<I", len(keys)) + b"".join(keys)
