"""Security (issue 8): CurveZMQ on the control endpoints, picoctl keygen, secrets kept out of
logs and reprs, and the permissions of shared-memory segments and semaphores."""
from __future__ import annotations

import grp
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import posix_ipc
import pytest

from conftest import PACKET_GROUPS, REPO, SHM_PREFIX, write_config
from rm.ctl import main as picoctl
from shared import abi, wire
from shared.config import parse_config
from shared.control import ControlClient, wait_until_serving
from shared.errors import AuthRefused, ConfigError, ControlTimeout, SecurityError
from shared.locks import create_sem
from shared.security import (CurveClient, Keyring, ShmAccess, generate, load_keypair,
                             sem_path, shm_access, shm_path)
from shared.segment import create_segment

SECURE = "security:\n  curve: true\n  keys_dir: keys\n"


def secure_config(tmp_path, *, extra: str = "", **kw):
    """A cluster with curve on and keys for r1, r2 and the operator in tmp_path/keys; an
    intruder's key pair lives elsewhere (tmp_path/other), so no server knows it."""
    generate(tmp_path / "keys", ["r1", "r2", "operator"])
    generate(tmp_path / "other", ["intruder"])
    return write_config(tmp_path, extra=extra + SECURE, **kw)


def secret_texts(tmp_path) -> list[str]:
    out = []
    for f in list((tmp_path / "keys").glob("*.key_secret")) + \
            list((tmp_path / "other").glob("*.key_secret")):
        out.append(load_keypair(f.parent, str(f)).secret.decode())
    return out


def until(cond, timeout: float = 5.0, what: str = "condition"):
    """Wait for `cond()` to hold (it is set by another thread or process)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# --------------------------------------------------------------------------- keygen

def test_keygen_writes_owner_only_secrets_and_prints_public_keys(tmp_path, capsys):
    d = tmp_path / "k"
    assert picoctl(["keygen", str(d), "r1", "operator"]) == 0
    out = capsys.readouterr().out.split("\n")
    for name in ("r1", "operator"):
        assert os.stat(d / f"{name}.key_secret").st_mode & 0o777 == 0o600
        assert os.stat(d / f"{name}.key").st_mode & 0o777 == 0o644
        pair = load_keypair(d, name)
        assert f"{name} {pair.public.decode()}" in out
        assert pair.secret.decode() not in "\n".join(out)
    # an existing key is never replaced by accident
    assert picoctl(["keygen", str(d), "r1"]) == 1
    assert "already exists" in capsys.readouterr().err
    before = load_keypair(d, "r1").public
    assert picoctl(["keygen", str(d), "r1", "--force"]) == 0
    assert load_keypair(d, "r1").public != before


def test_a_secret_file_readable_by_others_is_refused(tmp_path):
    generate(tmp_path, ["r1"])
    os.chmod(tmp_path / "r1.key_secret", 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        load_keypair(tmp_path, "r1")


# --------------------------------------------------------------------------- config

BASE = ("version: 1\ncluster: {name: t}\n"
        "replicas: {r1: {id: 1, smm_endpoint: 'tcp://127.0.0.1:7101'}}\n")


def test_security_defaults_keep_old_configs_working():
    sec = parse_config(BASE).security
    assert sec.curve is False and sec.file_mode == 0o600
    assert parse_config(BASE + "security: {shm_group: nogroup}\n").security.file_mode == 0o660
    assert parse_config(BASE + "security:\n  shm_mode: 0640\n").security.file_mode == 0o640


@pytest.mark.parametrize("text, key, fragment", [
    ("security: {curve: true}\n", "security.keys_dir", "picoctl keygen"),
    ("security:\n  shm_mode: 644\n", "security.shm_mode", "leading 0"),
    ("security:\n  shm_mode: 0666\n", "security.shm_mode", "other users never"),
    ("security: {authorized_keys: ['no spaces']}\n", "security.authorized_keys", "Z85"),
    ("security: {curv: true}\n", "security.curv", "did you mean 'curve'"),
    ("security: {shm_group: 'Bad Group'}\n", "security.shm_group", "group name"),
])
def test_security_errors_are_located(text, key, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + text)
    assert info.value.key == key and fragment in str(info.value), str(info.value)


def test_missing_keys_say_how_to_make_them(tmp_path):
    cfg = write_config(tmp_path, extra=SECURE)
    with pytest.raises(SecurityError, match="picoctl keygen"):
        Keyring(cfg, "r1")


def test_secrets_never_printed(tmp_path, caplog):
    """Neither the config, nor the keyring, nor the client settings, nor what a curve server
    logs while refusing clients, contain a secret key."""
    from smm.server import SmmServer
    cfg = secure_config(tmp_path)
    keys = Keyring(cfg, "r1")
    printed = [repr(cfg), str(cfg), repr(cfg.security), repr(keys), repr(keys.keys),
               repr(keys.client("r2")), repr(Keyring(cfg, "operator").client("r1"))]
    caplog.set_level(logging.DEBUG)
    server = SmmServer(cfg, "r1", metrics=False)
    thread = threading.Thread(target=server.serve)
    thread.start()
    try:
        intruder = load_keypair(tmp_path / "other", "intruder")
        with ControlClient(server.endpoint, timeout_ms=300,
                           curve=CurveClient(intruder, keys.keys.public, "r1")) as c:
            with pytest.raises(AuthRefused) as info:
                c.request(wire.PING)
        printed.append(str(info.value))
        until(lambda: server.gate.refused_total >= 1, what="the refusal")
    finally:
        server.stop()
        thread.join()
        server.close()
    printed.append(caplog.text)
    assert "refused a client" in caplog.text
    text = "\n".join(printed)
    for secret in secret_texts(tmp_path):
        assert secret not in text
    assert keys.keys.public.decode() in text  # the check would see a key if one leaked


# --------------------------------------------------------------------------- curve server

@pytest.fixture
def curve_smm(tmp_path):
    """An SMM with curve on, served on a thread of this process over real sockets."""
    from smm.server import SmmServer
    cfg = secure_config(tmp_path, request_timeout_ms=400)
    server = SmmServer(cfg, "r1", metrics=True)
    thread = threading.Thread(target=server.serve)
    thread.start()
    yield cfg, server
    server.stop()
    thread.join()
    server.close()


def refused_samples(server) -> dict:
    from prometheus_client import generate_latest
    return parse_refused(generate_latest(server.metrics.registry).decode())


def parse_refused(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line.startswith("pico_auth_refused_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def test_curve_server_serves_authorized_clients_and_refuses_the_rest(curve_smm, tmp_path,
                                                                      caplog):
    cfg, server = curve_smm
    timeout = cfg.control.request_timeout_ms
    ring = Keyring(cfg, "operator")
    assert refused_samples(server) == {"unknown_key": 0, "no_curve": 0, "bad_handshake": 0}
    with ControlClient(server.endpoint, timeout_ms=timeout, curve=ring.client("r1")) as c:
        assert c.request(wire.PING).status == wire.OK

    # an unknown key: no answer (ZAP says no), an AuthRefused that names the key, counted
    intruder = load_keypair(tmp_path / "other", "intruder")
    r1_public = Keyring(cfg, "r1").keys.public
    with ControlClient(server.endpoint, timeout_ms=timeout,
                       curve=CurveClient(intruder, r1_public, "r1")) as c:
        with pytest.raises(AuthRefused, match="refused our CURVE key 'intruder'"):
            c.request(wire.PING)
    until(lambda: refused_samples(server)["unknown_key"] >= 1, what="the unknown_key count")
    assert "from 127.0.0.1" in caplog.text and intruder.public.decode() in caplog.text

    # no curve at all: no answer either (libzmq refuses the mechanism), counted
    with ControlClient(server.endpoint, timeout_ms=timeout) as c:
        with pytest.raises(ControlTimeout):
            c.request(wire.PING)
    until(lambda: refused_samples(server)["no_curve"] >= 1, what="the no_curve count")

    # a client that has a wrong server key cannot complete the handshake
    with ControlClient(server.endpoint, timeout_ms=timeout,
                       curve=CurveClient(ring.keys, intruder.public, "r1")) as c:
        with pytest.raises(AuthRefused, match="handshake"):
            c.request(wire.PING)
    until(lambda: refused_samples(server)["bad_handshake"] >= 1, what="bad_handshake count")

    # the server is still up and serving the cluster
    with ControlClient(server.endpoint, timeout_ms=timeout, curve=ring.client("r1")) as c:
        assert c.request(wire.PING).status == wire.OK
    assert server.gate.accepted >= 2


def test_authorized_keys_restrict_the_clients(tmp_path):
    """With authorized_keys, a key in keys_dir that is not listed is refused too."""
    from smm.server import SmmServer
    generate(tmp_path / "keys", ["r1", "r2", "operator"])
    cfg = write_config(tmp_path, request_timeout_ms=300,
                       extra=SECURE + "  authorized_keys: [r1, r2]\n")
    server = SmmServer(cfg, "r1", metrics=False)
    thread = threading.Thread(target=server.serve)
    thread.start()
    try:
        with ControlClient(server.endpoint, timeout_ms=300,
                           curve=Keyring(cfg, "r2").client("r1")) as c:
            assert c.request(wire.PING).status == wire.OK
        with ControlClient(server.endpoint, timeout_ms=300,
                           curve=Keyring(cfg, "operator").client("r1")) as c:
            with pytest.raises(AuthRefused):
                c.request(wire.PING)
    finally:
        server.stop()
        thread.join()
        server.close()


# --------------------------------------------------------------------------- shared memory

@pytest.fixture
def shm_names():
    names = []
    yield names
    for n in names:
        for unlink in (posix_ipc.unlink_shared_memory, posix_ipc.unlink_semaphore):
            try:
                unlink(n)
            except posix_ipc.ExistentialError:
                pass


def test_segments_and_semaphores_are_owner_only_whatever_the_umask(shm_names):
    seg_name, sem_name = f"/{SHM_PREFIX}.perm{os.getpid()}", f"/{SHM_PREFIX}.perm{os.getpid()}.s0"
    shm_names += [seg_name, sem_name]
    old = os.umask(0)  # the most permissive umask must not open them up
    try:
        seg = create_segment(seg_name, abi.SEG_FLOWS, 4096, 1)
        sem = create_sem(sem_name, 1)
    finally:
        os.umask(old)
    try:
        assert os.stat(shm_path(seg_name)).st_mode & 0o777 == 0o600
        assert os.stat(sem_path(sem_name)).st_mode & 0o777 == 0o600
    finally:
        sem.close()
        seg.unlink()
        seg.close()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: gives objects another group")
def test_shm_group_gives_the_group_read_write(tmp_path, shm_names):
    cfg = write_config(tmp_path, extra="security: {shm_group: nogroup}\n")
    access = shm_access(cfg)
    gid = grp.getgrnam("nogroup").gr_gid
    assert access == ShmAccess(0o660, gid)
    seg_name, sem_name = f"/{SHM_PREFIX}.grp{os.getpid()}", f"/{SHM_PREFIX}.grp{os.getpid()}.s0"
    shm_names += [seg_name, sem_name]
    old = os.umask(0o077)  # a strict umask must not take the group's access away
    try:
        seg = create_segment(seg_name, abi.SEG_FLOWS, 4096, 1, access)
        sem = create_sem(sem_name, 1, access)
    finally:
        os.umask(old)
    try:
        for path in (shm_path(seg_name), sem_path(sem_name)):
            st = os.stat(path)
            assert (st.st_mode & 0o777, st.st_gid) == (0o660, gid), path
    finally:
        sem.close()
        seg.unlink()
        seg.close()


def test_an_unknown_shm_group_is_a_clear_error(tmp_path):
    cfg = write_config(tmp_path, extra="security: {shm_group: no-such-group-x}\n")
    with pytest.raises(ConfigError) as info:
        shm_access(cfg)
    assert info.value.key == "security.shm_group" and "groupadd" in str(info.value)


def test_flow_store_objects_follow_the_config(tmp_path):
    """The SMM's own segment and lock stripes: 0600 by default."""
    from smm.store import FlowStore
    cfg = write_config(tmp_path, stripes=4)
    store = FlowStore(cfg, "r1")
    try:
        assert os.stat(shm_path(store.name)).st_mode & 0o777 == 0o600
        for k in range(4):
            assert os.stat(sem_path(f"{store.sem_prefix}.s{k}")).st_mode & 0o777 == 0o600
    finally:
        store.close()


# --------------------------------------------------------------------------- end to end

class _Proc:
    def __init__(self, args, log_path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def test_a_curve_cluster_checkpoints_and_picoctl_needs_an_authorized_key(tmp_path, capsys):
    """pico-smm r1, r2 and pico-rm r1 as processes with security.curve on: the RM's
    checkpoints reach r2's SMM and are acknowledged; picoctl works with the operator key and
    fails cleanly with an unknown one, which the RM logs and counts."""
    from pmm.store import PacketStore
    cfg = secure_config(tmp_path, extra=PACKET_GROUPS, rm_endpoints=True, metrics=True)
    operator = Keyring(cfg, "operator")
    store = PacketStore(cfg, "r1")  # stands in for r1's PMM
    procs = []
    try:
        for r in ("r1", "r2"):
            p = _Proc(["smm", "--config", str(cfg.path), "--replica", r], tmp_path / f"smm-{r}.log")
            procs.append(p)
            wait_until_serving(cfg.replica(r).smm_endpoint, p.proc, 30, "pico-smm",
                               curve=operator.client(r))
        rm = _Proc(["rm", "--config", str(cfg.path), "--replica", "r1"], tmp_path / "rm.log")
        procs.append(rm)
        wait_until_serving(cfg.replica("r1").rm_endpoint, rm.proc, 30, "pico-rm",
                           curve=operator.client("r1"))
        row = store.seg.groups[1]  # web, checkpointed to r2 over CURVE
        first = int(row["committed"])
        until(lambda: int(row["committed"]) >= first + 3, 10, "acknowledged checkpoints")

        args = ["--config", str(cfg.path), "--replica", "r1"]
        assert picoctl([*args, "groups"]) == 0
        assert "p99 ms" in capsys.readouterr().out
        intruder = str(tmp_path / "other" / "intruder.key_secret")
        assert picoctl([*args, "--timeout", "500", "--key", intruder, "groups"]) == 1
        err = capsys.readouterr().err
        assert "refused our CURVE key 'intruder'" in err and "authorized_keys" in err
        until(lambda: "refused a client from 127.0.0.1" in rm.log(), 5, "the RM's log line")
        from urllib.request import urlopen
        port = cfg.replica("r1").metrics_port + 2
        text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert parse_refused(text)["unknown_key"] >= 1, text
        assert rm.proc.poll() is None  # still up
        assert picoctl([*args, "groups"]) == 0
    finally:
        codes = [p.stop() for p in reversed(procs)]
        store.close()
    assert codes == [0, 0, 0], [p.log() for p in procs]
    for p in procs:
        for secret in secret_texts(tmp_path):
            assert secret not in p.log()


# --------------------------------------------------------------------------- pure parts

def test_zap_verdict_and_log_limiter():
    from zmq.utils import z85
    from shared.security import LogLimiter, zap_verdict
    raw = bytes(range(32))
    allowed = frozenset({z85.encode(raw)})
    assert zap_verdict(b"CURVE", [raw], allowed) == (True, "ok", z85.encode(raw).decode())
    assert zap_verdict(b"CURVE", [bytes(32)], allowed)[:2] == (False, "unknown_key")
    assert zap_verdict(b"NULL", [], allowed)[:2] == (False, "no_curve")
    lim = LogLimiter(every=10.0)
    assert lim.admit("k", 0.0) == (True, 0)
    assert lim.admit("k", 1.0) == (False, 0) and lim.admit("k", 2.0) == (False, 0)
    assert lim.admit("other", 2.0) == (True, 0)
    assert lim.admit("k", 10.5) == (True, 2)  # the two held back are reported


def test_check_config_counts_the_authorized_keys(tmp_path, capsys):
    from shared.config_check import main as check_main
    cfg = write_config(tmp_path, extra=SECURE)
    assert check_main([str(cfg.path)]) == 0
    out = capsys.readouterr()
    assert "keys not found here" in out.out and "picoctl keygen" in out.err
    generate(tmp_path / "keys", ["r1", "r2", "operator"])
    assert check_main([str(cfg.path)]) == 0
    assert "curve: 3 authorized key(s)" in capsys.readouterr().out


def test_the_controller_takes_events_from_replicas_only(tmp_path):
    """pico-sdn with curve on: an RM's event (r1's key) is answered, an intruder's is not."""
    from conftest import free_port
    from sdn.server import SdnServer
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    generate(tmp_path / "keys", ["controller"])
    cfg = secure_config(tmp_path, controller=endpoint, request_timeout_ms=300,
                        extra="sdn: {client_subnet: 10.70.0.0/24, heartbeat_timeout_ms: 5000}\n")
    server = SdnServer(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,))
    thread.start()
    beat = wire.json_body({"event": "heartbeat", "replica": "r1", "healthy": True})
    try:
        with ControlClient(endpoint, timeout_ms=2000,
                           curve=Keyring(cfg, "r1").client("controller")) as c:
            assert c.request(wire.EVENT, beat).status == wire.OK
        intruder = load_keypair(tmp_path / "other", "intruder")
        with ControlClient(endpoint, timeout_ms=300, curve=CurveClient(
                intruder, Keyring(cfg, "r1").client("controller").server_public,
                "controller")) as c:
            with pytest.raises(AuthRefused):
                c.request(wire.EVENT, beat)
        until(lambda: server.gate.refused.get("unknown_key", 0) >= 1, what="the refusal")
    finally:
        stop.set()
        thread.join()
        server.close()
