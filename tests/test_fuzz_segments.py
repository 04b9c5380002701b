"""Fuzzing the shared-memory attach paths with corrupt copies of real segments.

A real flow segment (the SMM's FlowStore, in this process) and a real packet segment (the
PMM's PacketStore) are copied byte for byte under new names, after a mutation: truncated at
many lengths (down to 0 bytes), wrong magic, ABI major, kind, sizes, ready word unset or
CLOSED, a dead owner, random header and descriptor words (the geometry, offsets, semaphore
prefix), random bytes anywhere in the first 512. Attaching each copy must end in success or in
an AttachError subclass (shared/errors.py) whose message names the segment; never in another
exception. libpico (tests/c flowtool/pkttool `attach`) must return an error code, not crash.
Seeds fixed; a failure prints the seed and the case.
"""
from __future__ import annotations

import mmap
import os
import random
import struct
import subprocess

import posix_ipc
import pytest

from conftest import PACKET_GROUPS, write_config
from shared import abi
from shared.api import attach
from shared.errors import (AbiMismatch, AttachError, SegmentCorrupt, SegmentMissing,
                           SegmentNotReady, StaleOwner)
from shared.packets import attach_control, attach_packets

SEED = 777
RANDOM_CASES = 250
HDR = {name: abi.SEG_HEADER.fields[name][1] for name in abi.SEG_HEADER.names}


@pytest.fixture
def originals(tmp_path):
    from pmm.store import PacketStore
    from smm.store import FlowStore
    cfg = write_config(tmp_path, extra=PACKET_GROUPS)
    fs = FlowStore(cfg, "r1")
    ps = PacketStore(cfg, "r1")
    try:
        yield {"flows": bytes(fs.segment.mm), "pkts": bytes(ps.seg.segment.mm)}, \
            f"/picot.fz{os.getpid()}"
    finally:
        ps.close()
        fs.close(unlink=True)


def put(name: str, data: bytes) -> None:
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=len(data))
    try:
        if data:
            with mmap.mmap(shm.fd, len(data)) as m:
                m[:] = data
    finally:
        shm.close_fd()


def _u(b: bytearray, off: int, size: int, value: int) -> bytearray:
    b[off:off + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
    return b


def mutations(base: bytes, rng: random.Random):
    """(case, bytes, the AttachError subclasses allowed (None: any))."""
    for n in (0, 1, 8, 64, 120, 127, 128, 129, 255, 256, 1000, 4096, len(base) // 2,
              len(base) - 4096, len(base) - 1):
        yield f"cut to {n}", base[:n], (SegmentCorrupt, SegmentNotReady)
    yield "magic", bytes(_u(bytearray(base), HDR["magic"], 8, 0x1234)), (SegmentCorrupt,)
    yield "magic 0, ready", bytes(_u(bytearray(base), HDR["magic"], 8, 0)), (SegmentCorrupt,)
    for major in (0, abi.ABI_MAJOR + 1, 0xFFFFFFFF):
        yield f"abi major {major}", bytes(_u(bytearray(base), HDR["abi_major"], 4, major)), \
            (AbiMismatch,)
    for kind in (0, 3, 0xFFFFFFFF):
        yield f"kind {kind}", bytes(_u(bytearray(base), HDR["kind"], 4, kind)), (SegmentCorrupt,)
    for size in (0, 128, len(base) - 1, len(base) + 4096, 1 << 63):
        yield f"segment_size {size}", bytes(_u(bytearray(base), HDR["segment_size"], 8, size)), \
            (SegmentCorrupt,)
    for hs in (0, 64, 256):
        yield f"header_size {hs}", bytes(_u(bytearray(base), HDR["header_size"], 4, hs)), \
            (SegmentCorrupt,)
    yield "ready unset", bytes(_u(bytearray(base), HDR["ready"], 4, 0)), (SegmentNotReady,)
    yield "ready closed", bytes(_u(bytearray(base), HDR["ready"], 4, abi.CLOSED)), (StaleOwner,)
    yield "ready garbage", bytes(_u(bytearray(base), HDR["ready"], 4, 0xDEAD)), \
        (SegmentNotReady,)
    yield "owner dead", bytes(_u(bytearray(base), HDR["owner_pid"], 8, 0x7FFFFFF0)), \
        (StaleOwner,)
    yield "owner pid -1", bytes(_u(bytearray(base), HDR["owner_pid"], 8, -1)), (StaleOwner,)
    yield "owner restarted", bytes(_u(bytearray(base), HDR["owner_start_time"], 8, 1)), \
        (StaleOwner,)
    # every descriptor word (offset 128..255) set to odd values, one at a time
    for off in range(128, 256, 4):
        for value in (0, 1, 3, 0xFFFFFFFF):
            yield f"desc word {off} = {value:#x}", bytes(_u(bytearray(base), off, 4, value)), \
                None
    for off in range(128, 256, 8):
        for value in (1 << 40, 1 << 63, (1 << 64) - 1):
            yield f"desc u64 {off} = {value:#x}", bytes(_u(bytearray(base), off, 8, value)), None
    yield "no semaphore prefix", bytes(bytearray(base[:128]) + bytes(128) + base[256:]), None
    b = bytearray(base)
    prefix_at = 128 + (abi.FLOW_DESC.fields["sem_prefix"][1] if base[16] == abi.SEG_FLOWS
                       else abi.PKT_DESC.fields["sem_prefix"][1])
    for junk in (b"\xff\xfe", b"no-slash", b"/", b"/\x01\x02", b"/picot.nosuch"):
        b = bytearray(base)
        b[prefix_at:prefix_at + abi.SEM_PREFIX_LEN] = junk.ljust(abi.SEM_PREFIX_LEN, b"\0")
        yield f"semaphore prefix {junk!r}", bytes(b), None
    for i in range(RANDOM_CASES):
        b = bytearray(base)
        how = i % 3
        if how == 0:  # random bytes in the header and descriptor
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(512)] = rng.randrange(256)
        elif how == 1:  # one random descriptor word
            off = 128 + rng.randrange(0, 128, 4)
            _u(b, off, rng.choice((4, 8)), rng.randrange(1 << 64))
        else:  # garbage header over a good body
            b[:rng.randrange(1, 256)] = bytes(rng.randrange(256) for _ in range(256))[:len(b)]
            b = b[:len(base)]
        yield f"random {i} (kind {how})", bytes(b), None


def _attach_python(kind: str, name: str):
    if kind == "flows":
        attach(name, timeout=0.02).close()
    else:
        seg, ctl = attach_control(name, timeout=0.02)
        ctl.close()
        seg.release_views()
        seg.segment.close()
        attach_packets(name, timeout=0.02).close()


@pytest.mark.parametrize("kind", ["flows", "pkts"])
def test_python_attach_refuses_corrupt_segments_clearly(originals, kind):
    segs, prefix = originals
    rng = random.Random(SEED + (kind == "pkts"))
    seen: dict[str, int] = {}
    n = 0
    for i, (case, data, allowed) in enumerate(mutations(segs[kind], rng)):
        name = f"{prefix}.{kind}.{i}"
        put(name, data)
        try:
            _attach_python(kind, name)
            outcome = "attached"
        except AttachError as e:
            msg = str(e)
            if name not in msg:
                pytest.fail(f"[seed {SEED}] {kind} {case}: the error does not name {name}: "
                            f"{msg}")
            if allowed is not None and not isinstance(e, allowed):
                pytest.fail(f"[seed {SEED}] {kind} {case}: {type(e).__name__}, wanted one of "
                            f"{[a.__name__ for a in allowed]}: {msg}")
            outcome = type(e).__name__
        except Exception as e:  # noqa: BLE001 - exactly what the fuzzer looks for
            pytest.fail(f"[seed {SEED}] {kind} {case}: raw {type(e).__name__}: {e}")
        finally:
            posix_ipc.unlink_shared_memory(name)
        seen[outcome] = seen.get(outcome, 0) + 1
        n += 1
    assert n > 400
    for want in ("SegmentCorrupt", "AbiMismatch", "SegmentNotReady", "StaleOwner"):
        assert seen.get(want), (want, seen)
    assert seen.get("attached", 0) < n / 2, seen  # most mutations are caught


def test_a_missing_segment_is_named():
    with pytest.raises(SegmentMissing, match="/picot.nosuch.flows"):
        attach("/picot.nosuch.flows", timeout=0.02)
    with pytest.raises(SegmentMissing, match="/picot.nosuch.pkts"):
        attach_control("/picot.nosuch.pkts", timeout=0.02)


@pytest.mark.cbuild
@pytest.mark.parametrize("kind", ["flows", "pkts"])
def test_libpico_attach_returns_an_error_code_not_a_crash(originals, cbuild, kind):
    """A sample of the same mutations through libpico's attach (flowtool/pkttool `attach`):
    it exits with an error code and a message, never dies of a signal."""
    segs, prefix = originals
    tool = str(cbuild / ("flowtool" if kind == "flows" else "pkttool"))
    # flowtool attach exits |error code|; pkttool |code| + 10 (tests/c/*.c)
    codes = {1, 2, 3, 4, 5} if kind == "flows" else {11, 12, 13, 14, 15}
    env = dict(os.environ, PICO_ATTACH_TIMEOUT_MS="50")
    rng = random.Random(SEED + 10 + (kind == "pkts"))
    results: dict[int, int] = {}
    for i, (case, data, _) in enumerate(mutations(segs[kind], rng)):
        if i % 4 and not case.startswith(("cut", "magic", "abi", "kind", "segment_size",
                                          "ready", "owner")):
            continue  # a sample: each run is a process
        name = f"{prefix}.c{kind}.{i}"
        put(name, data)
        try:
            r = subprocess.run([tool, name, "attach"], capture_output=True, text=True,
                               errors="replace",
                               timeout=20, env=env)
        finally:
            posix_ipc.unlink_shared_memory(name)
        if r.returncode < 0:
            pytest.fail(f"[seed {SEED}] {kind} {case}: libpico died of signal {-r.returncode}"
                        f"\n{r.stderr}")
        if r.returncode != 0:
            if r.returncode not in codes or not r.stderr.strip():
                pytest.fail(f"[seed {SEED}] {kind} {case}: exit {r.returncode}, stderr "
                            f"{r.stderr!r}")
        results[r.returncode] = results.get(r.returncode, 0) + 1
    assert len(results) >= 3 and sum(results.values()) > 100, results


def test_struct_sanity():
    # the header offsets the mutations use are the ABI's
    assert HDR["magic"] == 0 and HDR["ready"] == 120 and struct.calcsize("<Q") == 8
