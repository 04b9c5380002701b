"""The SPSC ring's logic over a bytearray: order, wrap-around, full, oversize, two processes."""
import os
import subprocess
import sys

import pytest

from shared import abi
from shared.rings import Ring

KEY = bytes(range(40))


def ring(slots=8, mtu=1500):
    size = abi.RING_HEADER_SIZE + slots * abi.pkt_slot_size(mtu)
    return Ring(memoryview(bytearray(size)), 0, slots, abi.pkt_slot_size(mtu))


def push(r, i, data=None):
    return r.push(data if data is not None else bytes([i % 256]) * (i % 90 + 1), i, 0, 7, i * 3,
                  i, 1, KEY)


def test_fifo_across_many_wraps():
    r = ring(slots=8)
    out = []
    for i in range(1, 1000):
        assert push(r, i)
        if i % 3 == 0:
            while (p := r.pop()) is not None:
                out.append(p)
    while (p := r.pop()) is not None:
        out.append(p)
    assert [m.packet_id for m, _ in out] == list(range(1, 1000))
    for m, data in out:
        assert data == bytes([m.packet_id % 256]) * (m.packet_id % 90 + 1)
        assert (m.len, m.group, m.flow_hash, m.epoch, m.group_index, m.key) == (
            len(data), 7, m.packet_id * 3, m.packet_id, 1, KEY)


def test_full_ring_refuses_and_counts():
    r = ring(slots=4)
    assert all(push(r, i) for i in range(1, 5))
    assert not push(r, 5) and r.full_drops == 1 and len(r) == 4
    assert r.pop()[0].packet_id == 1
    assert push(r, 6)
    assert [r.pop()[0].packet_id for _ in range(4)] == [2, 3, 4, 6]
    assert r.pop() is None and r.peek() is None


def test_peek_does_not_consume():
    r = ring()
    push(r, 1)
    assert r.peek().packet_id == 1 and len(r) == 1
    assert r.pop()[0].packet_id == 1 and len(r) == 0


def test_oversized_packet_is_an_error_not_an_overrun():
    r = ring(mtu=1500)
    with pytest.raises(ValueError, match="exceeds the ring's MTU"):
        push(r, 1, b"x" * 1537)
    assert len(r) == 0
    assert push(r, 2, b"y" * 1536)  # the MTU rounds up to whole 64-byte lines


def test_skip_all():
    r = ring()
    for i in range(1, 6):
        push(r, i)
    assert r.skip_all() == 5 and r.pop() is None


def test_capacity_must_be_power_of_two():
    with pytest.raises(ValueError):
        Ring(memoryview(bytearray(1 << 16)), 0, 6, 256)


PRODUCER = r"""
import mmap, sys
sys.path.insert(0, {repo!r})
import posix_ipc
from shared.rings import Ring
shm = posix_ipc.SharedMemory({name!r})
mm = mmap.mmap(shm.fd, shm.size); shm.close_fd()
r = Ring(memoryview(mm), 0, {slots}, {slot_size})
i = 1
while i <= {n}:
    if r.push(i.to_bytes(4, "little") * (i % 16 + 1), i, 0, 1, 0, 0, 0, bytes(40)):
        i += 1
"""


def test_two_processes_stream_in_order_with_no_loss():
    import mmap
    import posix_ipc
    slots, n = 64, 20000
    slot_size = abi.pkt_slot_size(1500)
    name = f"/picot.ring{os.getpid()}"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX,
                                 size=abi.RING_HEADER_SIZE + slots * slot_size)
    mm = mmap.mmap(shm.fd, shm.size)
    shm.close_fd()
    try:
        r = Ring(memoryview(mm), 0, slots, slot_size)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        p = subprocess.Popen([sys.executable, "-c", PRODUCER.format(
            repo=repo, name=name, slots=slots, slot_size=slot_size, n=n)])
        expect = 1
        while expect <= n:
            got = r.pop()
            if got is None:
                assert p.poll() in (None, 0)
                continue
            m, data = got
            assert m.packet_id == expect and data == expect.to_bytes(4, "little") * (expect % 16 + 1)
            expect += 1
        assert p.wait(30) == 0  # every refused push (counted in full_drops) was retried
        del r
    finally:
        posix_ipc.unlink_shared_memory(name)


def test_metas_lists_queued_packets_in_order():
    r = ring(slots=4)
    for i in range(1, 4):
        push(r, i)
    r.pop()
    assert [m.packet_id for m in r.metas()] == [2, 3] and len(r) == 2
