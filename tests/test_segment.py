"""Attaching to a segment: each way it can fail has its own clear error (real POSIX shm)."""
import os
import subprocess
import sys
import time

import posix_ipc
import pytest

from shared import abi
from shared.api import attach
from shared.errors import AbiMismatch, SegmentCorrupt, SegmentMissing, SegmentNotReady, StaleOwner
from shared.segment import attach_segment, create_segment, process_alive, proc_start_time


@pytest.fixture
def name(request):
    n = f"/picot.seg{os.getpid()}.{request.node.name[:20]}"
    yield n
    try:
        posix_ipc.unlink_shared_memory(n)
    except posix_ipc.ExistentialError:
        pass


def test_missing(name):
    with pytest.raises(SegmentMissing, match="pico-smm"):
        attach_segment(name, abi.SEG_FLOWS, timeout=0.1)


def test_ready_segment_attaches(name):
    seg = create_segment(name, abi.SEG_FLOWS, 8192, replica_id=3)
    seg.publish()
    other = attach_segment(name, abi.SEG_FLOWS, timeout=0.1)
    assert int(other.header["owner_replica"]) == 3 and other.size == 8192
    other.close()
    seg.unlink()
    seg.close()


def test_not_ready_after_deadline(name):
    seg = create_segment(name, abi.SEG_FLOWS, 8192, replica_id=1)
    t0 = time.monotonic()
    with pytest.raises(SegmentNotReady, match="not ready after 0.2 s"):
        attach_segment(name, abi.SEG_FLOWS, timeout=0.2)
    assert time.monotonic() - t0 >= 0.2
    seg.close()


def test_abi_mismatch_names_both_versions(name):
    seg = create_segment(name, abi.SEG_FLOWS, 8192, replica_id=1)
    seg.header["abi_major"] = 7
    seg.header["abi_minor"] = 3
    seg.publish()
    with pytest.raises(AbiMismatch, match=rf"segment is 7\.3, this binding is 1\.{abi.ABI_MINOR}"):
        attach_segment(name, abi.SEG_FLOWS, timeout=0.1)
    seg.close()


def test_minor_version_ahead_is_accepted(name):
    seg = create_segment(name, abi.SEG_FLOWS, 8192, replica_id=1)
    seg.header["abi_minor"] = abi.ABI_MINOR + 1
    seg.publish()
    attach_segment(name, abi.SEG_FLOWS, timeout=0.1).close()
    seg.close()


@pytest.mark.parametrize("field,value,match", [
    ("magic", 0x1234, "magic"),
    ("kind", abi.SEG_PACKETS, "kind 'packets'"),
    ("segment_size", 4096, "truncated or corrupt"),
])
def test_corrupt_header(name, field, value, match):
    seg = create_segment(name, abi.SEG_FLOWS, 8192, replica_id=1)
    seg.publish()
    seg.header[field] = value
    with pytest.raises(SegmentCorrupt, match=match):
        attach_segment(name, abi.SEG_FLOWS, timeout=0.1)
    seg.close()


def test_too_small_for_a_header(name):
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=64)
    shm.close_fd()
    with pytest.raises(SegmentCorrupt, match="smaller than its 128-byte header"):
        attach_segment(name, abi.SEG_FLOWS, timeout=0.1)


def test_stale_owner_dead_pid(name):
    # A child creates and publishes the segment, then dies without cleaning up.
    code = ("import sys; sys.path.insert(0, '.');"
            "from shared.segment import create_segment; from shared import abi;"
            f"s = create_segment({name!r}, abi.SEG_FLOWS, 8192, 1); s.publish()")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(__file__)))
    with pytest.raises(StaleOwner, match="no longer running"):
        attach_segment(name, abi.SEG_FLOWS, timeout=0.1)
    # The next owner takes the leftover over instead of refusing.
    seg = create_segment(name, abi.SEG_FLOWS, 8192, replica_id=1)
    seg.publish()
    attach_segment(name, abi.SEG_FLOWS, timeout=0.1).close()
    seg.close()


def test_closed_segment_is_stale(name):
    seg = create_segment(name, abi.SEG_FLOWS, 8192, replica_id=1)
    seg.publish()
    seg.header["ready"] = abi.CLOSED
    with pytest.raises(StaleOwner, match="closed by its owner"):
        attach_segment(name, abi.SEG_FLOWS, timeout=0.1)
    seg.close()


def test_a_live_owner_is_not_displaced(name):
    code = ("import sys, time; sys.path.insert(0, '.');"
            "from shared.segment import create_segment; from shared import abi;"
            f"s = create_segment({name!r}, abi.SEG_FLOWS, 8192, 1); s.publish();"
            "print('up', flush=True); time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert p.stdout.readline() == b"up\n"
        with pytest.raises(SegmentCorrupt, match=f"owned by live pid {p.pid}"):
            create_segment(name, abi.SEG_FLOWS, 8192, replica_id=1)
    finally:
        p.kill()
        p.wait()


def test_process_alive_checks_start_time():
    me = os.getpid()
    assert process_alive(me) and process_alive(me, proc_start_time(me))
    assert not process_alive(me, proc_start_time(me) + 1)  # a reused pid
    assert not process_alive(0) and not process_alive(2 ** 22 + 12345)


def test_attach_flow_api_missing_segment():
    with pytest.raises(SegmentMissing):
        attach("/picot.nonexistent.flows", timeout=0.05)


def test_a_segment_its_owner_has_not_written_yet_is_waited_for(name):
    """Just created (all zeros): an attacher waits until the deadline, as libpico does,
    instead of calling it corrupt at once (the race a starting middlebox used to lose)."""
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=8192)
    os.close(shm.fd)
    t0 = time.monotonic()
    with pytest.raises(SegmentCorrupt, match="magic 0x0"):
        attach_segment(name, abi.SEG_FLOWS, timeout=0.3)
    assert time.monotonic() - t0 >= 0.3
    # (the next attach after the owner wrote it succeeds: test_ready_segment_attaches)
