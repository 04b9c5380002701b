"""Fuzzing the ZeroMQ control endpoints: a real pico-smm and pico-rm process, and pico-sdn's
server in this process, each sent garbage, empty frames, truncated headers, wrong magic and
version, lying body lengths, unknown and reply types, oversized frames, JSON that is not JSON or
has wrong types or missing fields, broken binary INSTALL/INSTALL_BATCH/ACTIVATE bodies, and
multi-frame junk.

For each endpoint: every case gets an error reply (docs/protocol.md section 3) with the error's
name, a message, and the request's seq when it had a full header; the error counters (STATS
`errors`, the metrics) grow by exactly the errors sent; the process still answers a valid
request; no state changed (the SMM's table and epochs, the RM's groups, the controller's view).
A frame over libzmq's ZMQ_MAXMSGSIZE (4 x control.max_message_bytes + 4096) is dropped by
libzmq with the connection, unanswered; the server goes on. Seeds fixed; failures print them.
"""
from __future__ import annotations

import json
import random
import signal
import struct
import subprocess
import sys
import threading
import urllib.request
from collections import Counter

import pytest
import zmq

from conftest import PACKET_GROUPS, REPO, free_port, write_config
from shared import wire
from shared.control import ControlClient, wait_until_serving
from shared.flowkey import make_key

SEED = 4242
MAX = 65536  # control.max_message_bytes of these tests (libzmq's limit: 4 * MAX + 4096)
BIG = 1 << 30


class Peer:
    """A DEALER that sends any multipart and reads the raw reply frame."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.ctx = zmq.Context.instance()
        self.sock = None
        self.reopen()

    def reopen(self):
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)

    def ask(self, parts: list[bytes], timeout_ms: int = 5000) -> list[bytes] | None:
        self.sock.send_multipart(parts)
        if not self.sock.poll(timeout_ms):
            return None
        return self.sock.recv_multipart()

    def close(self):
        self.sock.close(linger=0)


def header(type_=wire.PING, seq=7, body=b"", magic=wire.MAGIC, version=wire.VERSION,
           body_len=None, status=0) -> bytes:
    n = len(body) if body_len is None else body_len
    return struct.pack("<4sHHQII", magic, version, type_, seq, n & 0xFFFFFFFF, status) + body


def common_cases(rng: random.Random, served: set[int]):
    """(case, parts after the DEALER, expected code or None for any error) for any server."""
    yield "empty frame", [b"", b""], wire.ERR_TRUNCATED
    yield "lone delimiter", [b""], {wire.ERR_BAD_ENVELOPE, wire.ERR_TRUNCATED}
    good = header(wire.PING, 11)
    for n in range(1, wire.HEADER_SIZE):
        yield f"header cut to {n}", [b"", good[:n]], wire.ERR_TRUNCATED
    for i in range(150):
        g = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        if g[:4] == wire.MAGIC:
            continue
        yield f"garbage {i}", [b"", g], (wire.ERR_TRUNCATED if len(g) < wire.HEADER_SIZE
                                          else wire.ERR_BAD_MAGIC)
    for magic in (b"PCTK", b"\0\0\0\0", b"pctl", b"LTCP", b"\xff\xff\xff\xff"):
        yield f"magic {magic!r}", [b"", header(magic=magic)], wire.ERR_BAD_MAGIC
    for v in (0, 2, 3, 0x100, 0xFFFF):
        yield f"version {v}", [b"", header(version=v)], wire.ERR_BAD_VERSION
    for body, n in ((b"", 1), (b"{}", 0), (b"{}", 1), (b"{}", 3), (b"{}", 0xFFFFFFFF),
                    (b"x" * 100, 99), (b"x" * 100, 101)):
        yield f"body_len {n} for {len(body)} bytes", [b"", header(body=body, body_len=n)], \
            wire.ERR_TRUNCATED
    for t in (0, 7, 8, 15, 30, 31, 100, 127, 0x7FFF, 0xFFFF, wire.ERROR,
              *(t | wire.REPLY_BIT for t in sorted(served))):
        if t not in served:
            yield f"type {t}", [b"", header(t)], wire.ERR_UNKNOWN_TYPE
    yield "too large", [b"", header(body=b"x" * (MAX + 1 - wire.HEADER_SIZE))], \
        wire.ERR_TOO_LARGE
    yield "too large garbage", [b"", bytes(MAX + 100)], wire.ERR_TOO_LARGE
    yield "two frames", [b"", header(), header()], wire.ERR_BAD_ENVELOPE
    yield "three frames no delimiter", [b"a", b"b", b"c"], wire.ERR_BAD_ENVELOPE
    yield "delimiter and empties", [b"", b"", b""], wire.ERR_BAD_ENVELOPE


NOT_JSON = [b"{", b"\xff\xfe\xfd", b"[1, 2]", b"42", b'"s"', b"null", b"NaN", b"{'a': 1}",
            b"{\"a\": }", b"\x00" * 8, "{\"é\": 1}".encode("latin-1")]


def json_cases(types: dict[int, list[dict]]):
    """Each JSON type with bodies that are not a JSON object, then its own invalid objects."""
    for t, objs in types.items():
        name = wire.TYPE_NAMES[t]
        for body in NOT_JSON:
            yield f"{name} body {body[:12]!r}", [b"", header(t, 100 + t, body)], \
                wire.ERR_BAD_BODY
        for obj in objs:
            yield f"{name} {obj!r:.80}", [b"", header(t, 200 + t, json.dumps(obj).encode())], \
                wire.ERR_BAD_BODY


def fire(peer: Peer, cases, label: str) -> Counter:
    """Send every case; check its reply; the Counter of error names the replies carried."""
    sent: Counter = Counter()
    n = 0
    for case, parts, want in cases:
        n += 1
        got = peer.ask(parts)
        if got is None:
            pytest.fail(f"[seed {SEED}] {label} {case}: no reply in 5 s")
        frame = got[-1]
        try:
            reply = wire.decode(frame, BIG)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"[seed {SEED}] {label} {case}: undecodable reply {frame[:60]!r}: {e}")
        wants = want if isinstance(want, set) else {want} if want is not None else None
        if reply.type != wire.ERROR or reply.status == wire.OK or (
                wants is not None and reply.status not in wants):
            pytest.fail(f"[seed {SEED}] {label} {case}: wanted error {wants}, got type "
                        f"{reply.type:#x} status {reply.status}: {reply.body[:200]!r}")
        if reply.status == wire.ERR_INTERNAL:
            pytest.fail(f"[seed {SEED}] {label} {case}: INTERNAL (a bug): {reply.body!r}")
        body = json.loads(reply.body)
        assert body["error"] == wire.ERROR_NAMES[reply.status] and len(body["message"]) > 10, \
            (case, body)
        frames = [p for p in parts if p] if parts and parts[0] == b"" else parts
        if len(frames) == 1 and len(frames[0]) >= wire.HEADER_SIZE \
                and reply.status != wire.ERR_TOO_LARGE:
            assert reply.seq == wire.peek_seq(frames[0]), (case, reply.seq)
        else:
            assert reply.seq in (0, wire.peek_seq(frames[0]) if frames else 0), case
        sent[body["error"]] += 1
    assert n > 50, n
    return sent


def over_maxmsgsize(endpoint: str) -> None:
    """A frame over ZMQ_MAXMSGSIZE: libzmq drops it with the connection; nothing answers."""
    peer = Peer(endpoint)
    try:
        assert peer.ask([b"", bytes(4 * MAX + 4096 + 1)], timeout_ms=1000) is None
    finally:
        peer.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------------------------------ SMM
def smm_binary_cases(rng: random.Random):
    st = 64
    key = make_key("10.8.0.1", 1000, "10.8.1.1", 80, 6)
    good = wire.encode_install(2, 1, 2, 1, st, [(key, wire.OP_UPSERT, 1, b"s" * st)])
    for n in range(len(good)):
        if n % 7 == 0 or n < 41:
            yield f"install cut to {n}", [b"", header(wire.INSTALL, 3, good[:n])], \
                wire.ERR_TRUNCATED
    yield "install padded", [b"", header(wire.INSTALL, 3, good + b"\0")], wire.ERR_TRUNCATED

    def install(**kw):
        f = dict(owner=2, group=1, epoch=2, base=1, n=1, state_size=st, flags=0)
        f.update(kw)
        head = wire.INSTALL_HEADER.pack(f["owner"], f["group"], f["epoch"], f["base"], f["n"],
                                        f["state_size"], f["flags"], 0)
        return head + good[40:]
    yield "install n+1", [b"", header(wire.INSTALL, 3, install(n=2))], wire.ERR_TRUNCATED
    yield "install n=2^32-1", [b"", header(wire.INSTALL, 3, install(n=0xFFFFFFFF))], \
        wire.ERR_TRUNCATED
    yield "install state 2^21", [b"", header(wire.INSTALL, 3, install(state_size=1 << 21))], \
        wire.ERR_BAD_BODY
    small = wire.encode_install(2, 1, 2, 1, 32, [(key, wire.OP_UPSERT, 1, b"s" * 32)])
    yield "install state 32", [b"", header(wire.INSTALL, 3, small)], wire.ERR_STATE_SIZE
    yield "install epoch 0", [b"", header(wire.INSTALL, 3, install(epoch=0))], wire.ERR_BAD_BODY
    yield "install from self", [b"", header(wire.INSTALL, 3, install(owner=1))], \
        wire.ERR_BAD_BODY
    yield "install gap", [b"", header(wire.INSTALL, 3, install(base=7, epoch=9))], \
        wire.ERR_EPOCH_GAP
    for op in (0, 3, 255):
        b = bytearray(good)
        b[40 + 40] = op
        yield f"install op {op}", [b"", header(wire.INSTALL, 3, bytes(b))], wire.ERR_BAD_BODY
    batch = wire.encode_install_batch([good])
    for n in range(0, len(batch), 5):
        if n != len(batch):
            yield f"batch cut to {n}", [b"", header(wire.INSTALL_BATCH, 4, batch[:n])], \
                wire.ERR_TRUNCATED
    yield "batch trailing", [b"", header(wire.INSTALL_BATCH, 4, batch + b"x")], \
        wire.ERR_TRUNCATED
    yield "batch 5000 sections", [b"", header(wire.INSTALL_BATCH, 4,
                                              struct.pack("<II", 5000, 0))], wire.ERR_BAD_BODY
    yield "batch section too long", [b"", header(wire.INSTALL_BATCH, 4, struct.pack(
        "<III", 1, 0, 1 << 31) + good)], wire.ERR_TRUNCATED
    act = wire.encode_activate(wire.SEL_KEYS, 0, [key])
    for n in range(0, len(act), 3):
        yield f"activate cut to {n}", [b"", header(wire.ACTIVATE, 5, act[:n])], \
            wire.ERR_TRUNCATED
    for sel in (0, 4, 0xFFFFFFFF):
        yield f"activate selector {sel}", [b"", header(wire.ACTIVATE, 5, struct.pack(
            "<IIII", sel, 2, wire.KEEP_GROUP, 0))], wire.ERR_BAD_BODY
    yield "activate n_keys lies", [b"", header(wire.ACTIVATE, 5, struct.pack(
        "<IIII", 3, 0, wire.KEEP_GROUP, 2) + key)], wire.ERR_TRUNCATED
    for i in range(200):  # random bodies for the binary types: some error, whichever
        t = rng.choice((wire.INSTALL, wire.INSTALL_BATCH, wire.ACTIVATE))
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120)))
        yield f"random {wire.TYPE_NAMES[t]} body {i}", [b"", header(t, 6, body)], None


def test_smm_endpoint(tmp_path, smm_factory):
    cfg = write_config(tmp_path, max_message_bytes=MAX, metrics=True)
    smm = smm_factory(cfg, "r1")
    endpoint = cfg.replica("r1").smm_endpoint
    keys = [make_key("10.8.0.1", 2000 + i, "10.8.1.1", 80, 6) for i in range(3)]
    with ControlClient(endpoint) as c:  # some state to keep: r2's checkpoint of group 1
        c.request(wire.INSTALL, wire.encode_install(
            2, 1, 1, 0, 64, [(k, wire.OP_UPSERT, 1, b"v" * 64) for k in keys]))
        dump0 = json.loads(c.request(wire.DUMP, b'{"limit": 100}').body)
        stats0 = json.loads(c.request(wire.STATS).body)
    metrics_port = cfg.replica("r1").metrics_port
    m0 = scrape(metrics_port)
    rng = random.Random(SEED)
    served = {wire.PING, wire.INSTALL, wire.ACTIVATE, wire.DUMP, wire.STATS, wire.INSTALL_BATCH}
    dump_bad = [{"limit": -1}, {"limit": "x"}, {"limit": 10 ** 9}, {"limit": True},
                {"status": "alive"}, {"status": 3}, {"group": -1}, {"group": 2 ** 40},
                {"group": "1"}]
    peer = Peer(endpoint)
    try:
        sent = fire(peer, [*common_cases(rng, served), *json_cases({wire.DUMP: dump_bad}),
                           *smm_binary_cases(rng)], "smm")
        over_maxmsgsize(endpoint)
    finally:
        peer.close()
    assert smm.proc.poll() is None, smm.log()
    with ControlClient(endpoint) as c:  # still serving; nothing changed; all counted
        assert json.loads(c.request(wire.PING).body)["replica"] == "r1"
        dump1 = json.loads(c.request(wire.DUMP, b'{"limit": 100}').body)
        stats1 = json.loads(c.request(wire.STATS).body)
    assert dump1 == dump0
    assert stats1["epochs"] == stats0["epochs"] and stats1["flows"] == stats0["flows"]
    assert stats1["install_results"] == stats0["install_results"]
    grown = Counter(stats1["errors"])
    grown.subtract(stats0["errors"])
    assert +grown == sent, (dict(grown), dict(sent))
    m1 = scrape(metrics_port)
    for name, n in sent.items():
        before = metric(m0, "pico_smm_request_errors_total", error=name)
        assert metric(m1, "pico_smm_request_errors_total", error=name) - before == n, name
    assert "rejected request" in smm.log()


# ------------------------------------------------------------------------------------ RM
RM_BAD_IDS = ["1", 1.5, True, None, -1, 99999, 2 ** 70, [], {}]


def rm_json_types() -> dict[int, list[dict]]:
    key = "00" * 40
    ids = [{"group": g} for g in RM_BAD_IDS]
    return {
        wire.PING: [], wire.STATS: [], wire.GROUPS: [],
        wire.SUSPEND: ids + [{}], wire.RESUME: ids + [{}], wire.GROUP_DELETE: ids + [{}],
        wire.GROUP_SET: ids + [{"group": 2, "frequency_hz": "fast"},
                               {"group": 2, "frequency_hz": -5},
                               {"group": 2, "frequency_hz": 10 ** 12},
                               {"group": 2, "target": "r9"}, {"group": 2, "target": 5},
                               {"group": 2, "buffering": "yes"}, {"group": 2, "bogus": 1},
                               {"group": 0, "frequency_hz": 10}],
        wire.GROUP_CREATE: [{"group": g} for g in (0, -1, 65536, "7", True, None, 1, 2, 1.5)]
        + [{"group": 7, "bogus": 1}, {"group": 7, "frequency_hz": 0},
           {"group": 7, "frequency_hz": "x"}, {"group": 7, "target": "r9"},
           {"group": 7, "buffering": "yes"}, {}],
        wire.FLOWS: [{"limit": v} for v in (0, -1, "x", 10 ** 9, None, [])]
        + [{"group": "x"}, {"group": True}, {"group": 1.5}],
        wire.MOVE: [{"key": v, "group": 1} for v in (None, "zz", "00", 5, key[:-2], [])]
        + [{"key": key, "group": 1}, {"key": key, "group": "x"}, {"key": key, "group": True},
           {"key": key, "group": 99999}, {}],
        wire.VIEW: [{"view": v, "alive": ["r1"]} for v in (0, -1, "9", None, True, 1.5)]
        + [{"view": 99, "alive": "r1"}, {"view": 99, "alive": [1]},
           {"view": 99, "alive": ["r9"]}, {"view": 99, "alive": []}, {"view": 99}, {}],
        wire.FREEZE: [{"group": g} for g in ("x", 1.5, True, 99999, -1, [], {})],
        wire.HANDOFF: [{"group": g} for g in ("x", 1.5, True, None, 99999, -1, [], {})] + [{}],
        wire.TAKEOVER: [{"group": g} for g in ("x", 1.5, True, None, [], {})] + [{}],
    }


@pytest.fixture
def live_rm(tmp_path, smm_factory):
    from pmm.store import PacketStore
    cfg = write_config(tmp_path, extra=PACKET_GROUPS, rm_endpoints=True, metrics=True,
                       max_message_bytes=MAX)
    store = PacketStore(cfg, "r1")  # stands in for r1's PMM
    smm_factory(cfg, "r1")
    smm_factory(cfg, "r2")
    log = open(tmp_path / "rm.log", "wb")
    rm = subprocess.Popen([sys.executable, "-m", "rm", "--config", str(cfg.path), "--replica",
                           "r1"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(cfg.replica("r1").rm_endpoint, rm, 30, "pico-rm")
        yield cfg, store, rm, tmp_path / "rm.log"
    finally:
        if rm.poll() is None:
            rm.send_signal(signal.SIGTERM)
            rm.wait(10)
        log.close()
        store.close()


def _groups(c) -> list:
    rows = json.loads(c.request(wire.GROUPS).body)["groups"]
    return sorted((g["id"], g["suspended"], g["protected"], g["target"]) for g in rows)


def test_rm_endpoint(live_rm):
    cfg, store, rm, log_path = live_rm
    endpoint = cfg.replica("r1").rm_endpoint
    with ControlClient(endpoint) as c:
        groups0 = _groups(c)
        errors0 = json.loads(c.request(wire.STATS).body)["errors"]
    view0 = store.seg.membership()
    rng = random.Random(SEED + 1)
    served = {wire.PING, wire.STATS, *range(16, 24), wire.VIEW, wire.FREEZE, wire.HANDOFF,
              wire.TAKEOVER}
    peer = Peer(endpoint)
    try:
        sent = fire(peer, [*common_cases(rng, served), *json_cases(rm_json_types())], "rm")
        over_maxmsgsize(endpoint)
    finally:
        peer.close()
    assert rm.poll() is None, log_path.read_text()
    with ControlClient(endpoint) as c:
        assert json.loads(c.request(wire.PING).body)["replica"] == "r1"
        assert _groups(c) == groups0
        errors1 = json.loads(c.request(wire.STATS).body)["errors"]
    assert store.seg.membership() == view0
    grown = Counter(errors1)
    grown.subtract(errors0)
    assert +grown == sent, (dict(grown), dict(sent))
    m = scrape(cfg.replica("r1").metrics_port + 2)
    for name, n in sent.items():
        assert metric(m, "pico_rm_request_errors_total", error=name) >= n, name
    assert "rejected request" in log_path.read_text()


# ------------------------------------------------------------------------------------ SDN
def test_sdn_endpoint(tmp_path):
    from sdn.server import SdnServer
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    extra = "sdn: {client_subnet: 10.71.0.0/24, heartbeat_timeout_ms: 60000, buckets: 8}\n"
    cfg = write_config(tmp_path, replicas=3, extra=extra, controller=endpoint,
                       max_message_bytes=MAX)
    server = SdnServer(cfg)
    stop = threading.Event()
    t = threading.Thread(target=server.serve, args=(stop,))
    t.start()
    core = server.core
    state0 = (core.view, sorted(core.alive), len(server.failovers), len(server.unprotected))
    rng = random.Random(SEED + 2)
    bad_events = [{"event": 5}, {"event": ["heartbeat"]}, {"event": "heartbeat", "replica": []},
                  {"event": "heartbeat", "replica": {"r1": 1}},
                  {"event": "heartbeat", "replica": "r1", "alive": [1, 2]},
                  {"event": "heartbeat", "replica": "r1", "view": 99, "alive": [["r1"]]},
                  {"replica": 3}]
    bad_scale = [{}, {"op": "sideways", "replica": "r1"}, {"op": "in", "replica": ["r1"]},
                 {"op": "in", "replica": {"a": 1}}, {"op": "in", "replica": "r9"},
                 {"op": "in", "replica": None}, {"op": "out", "replica": "r1"}, {"op": 1}]
    peer = Peer(endpoint)
    try:
        sent = fire(peer, [*common_cases(rng, {wire.EVENT, wire.SCALE}),
                           *json_cases({wire.EVENT: bad_events, wire.SCALE: bad_scale})], "sdn")
        over_maxmsgsize(endpoint)
        assert t.is_alive()
        got = peer.ask([b"", header(wire.EVENT, 99, json.dumps(
            {"event": "note", "replica": "r1"}).encode())])
        assert wire.decode(got[-1], BIG).status == wire.OK  # still serving
    finally:
        stop.set()
        t.join(5)
        peer.close()
        server.close()
    assert (core.view, sorted(core.alive), len(server.failovers),
            len(server.unprotected)) == state0
    assert +server.errors == sent, (dict(server.errors), dict(sent))
    assert server.requests["event"] >= 1
