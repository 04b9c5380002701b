"""Who may talk to whom, and who may map what: CurveZMQ keys and shared-memory permissions.

The config's `security:` section names a directory of key files (`zmq.auth` certificates):

    <keys_dir>/<name>.key          the public key of <name> (a replica, `controller`,
                                   `operator`); every peer may read it
    <keys_dir>/<name>.key_secret   the same public key and its secret key (mode 0600)

A replica's SMM and RM serve with the replica's key pair, pico-sdn with `controller`'s, and
picoctl connects with `operator`'s. A client knows a server's public key from its `.key`
file. A server accepts the clients whose public key is in `security.authorized_keys` (key
names or Z85 strings), or, without that list, the keys of every `.key` file in keys_dir.

Secrets stay out of everything printable: the config holds paths only, and KeyPair's repr
shows the public key alone. Nothing here does socket I/O (shared/auth.py does).
"""
from __future__ import annotations

import dataclasses
import grp
import os
import re
from pathlib import Path

from .errors import ConfigError, SecurityError

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
CONTROLLER = "controller"
OPERATOR = "operator"
ZAP_DOMAIN = b"pico"
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_Z85 = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")

# What a refusal is counted under (pico_auth_refused_total{reason=...}).
UNKNOWN_KEY = "unknown_key"      # a CURVE client whose key is not authorized (ZAP said 400)
NO_CURVE = "no_curve"            # a client without CURVE (libzmq: mechanism mismatch)
BAD_HANDSHAKE = "bad_handshake"  # a broken CURVE handshake (e.g. the client has a wrong
#                                  server key) or a peer that left mid-handshake
MECHANISM_MISMATCH = 0x11000002  # ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH


def is_z85_key(text: str) -> bool:
    """A 32-byte CurveZMQ key written in Z85 (40 characters)."""
    return bool(_Z85.fullmatch(text))


@dataclasses.dataclass(frozen=True)
class KeyPair:
    """A CurveZMQ identity. The secret is kept out of repr (and so out of logs and tracebacks
    that print the object)."""
    name: str
    public: bytes                                   # Z85, 40 bytes
    secret: bytes = dataclasses.field(repr=False)   # Z85, 40 bytes


@dataclasses.dataclass(frozen=True)
class CurveClient:
    """What a client socket needs: its own key pair and the server's public key."""
    keys: KeyPair
    server_public: bytes
    server_name: str


# --------------------------------------------------------------------------- key files

def keys_dir(config) -> Path:
    """security.keys_dir, relative to the config file's directory."""
    sec = config.security
    if not sec.keys_dir:
        raise ConfigError("security.curve is on but security.keys_dir is not set: add the "
                          "directory that holds the key files (picoctl keygen DIR NAME...)",
                          str(config.path), None, "security.keys_dir")
    d = Path(sec.keys_dir)
    if not d.is_absolute() and config.path and not str(config.path).startswith("<"):
        d = Path(config.path).resolve().parent / d
    return d


def _read_cert(path: Path, want_secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth
    if not path.is_file():
        raise SecurityError(f"key file {path} is missing: create it with `picoctl keygen "
                            f"{path.parent} {_name_of(path)}` (or fix security.keys_dir)")
    if want_secret:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise SecurityError(f"secret key file {path} can be read by others (mode "
                                f"{mode:04o}): run `chmod 600 {path}`")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as e:
        # (the loader's messages name the file, never its content)
        raise SecurityError(f"cannot read key file {path}: {e}; regenerate it with picoctl "
                            "keygen") from None
    if want_secret and not secret:
        raise SecurityError(f"{path} holds no secret key: use the `{SECRET_SUFFIX}` file "
                            "picoctl keygen wrote")
    return public, secret


def _name_of(path: Path) -> str:
    n = path.name
    for suffix in (SECRET_SUFFIX, PUBLIC_SUFFIX):
        if n.endswith(suffix):
            return n[:-len(suffix)]
    return n


def load_keypair(directory: Path, name_or_path: str) -> KeyPair:
    """A key pair by name (<dir>/<name>.key_secret) or by the path of a .key_secret file."""
    if "/" in name_or_path or name_or_path.endswith(SECRET_SUFFIX):
        path = Path(name_or_path)
    else:
        path = directory / f"{name_or_path}{SECRET_SUFFIX}"
    public, secret = _read_cert(path, want_secret=True)
    return KeyPair(_name_of(path), public, secret)


def load_public(directory: Path, name: str) -> bytes:
    return _read_cert(directory / f"{name}{PUBLIC_SUFFIX}", want_secret=False)[0]


def authorized(config) -> frozenset[bytes]:
    """The client public keys the servers accept."""
    d = keys_dir(config)
    names = config.security.authorized_keys
    if names is None:
        if not d.is_dir():
            raise SecurityError(f"security.keys_dir {d} is not a directory: create the keys "
                                f"with `picoctl keygen {d} NAME...`")
        return frozenset(_read_cert(p, False)[0] for p in sorted(d.glob(f"*{PUBLIC_SUFFIX}")))
    return frozenset(k.encode() if is_z85_key(k) else load_public(d, k) for k in names)


def generate(directory: Path, names: list[str], force: bool = False) -> list[tuple[str, bytes]]:
    """Write a key pair per name; (name, public key) each. The secret file is created 0600
    from the start (umask 077 while writing, so it is never readable by others), the public
    one is made 0644. Existing files are kept unless `force`."""
    import zmq.auth
    for n in names:
        if not KEY_NAME.fullmatch(n):
            raise SecurityError(f"bad key name {n!r}: use letters, digits, '-', '_' or '.' "
                                "(a replica name, controller or operator)")
        for suffix in (PUBLIC_SUFFIX, SECRET_SUFFIX):
            if (directory / f"{n}{suffix}").exists() and not force:
                raise SecurityError(f"{directory / (n + suffix)} already exists: remove it "
                                    "first (its peers must then learn the new public key), "
                                    "or pass --force")
    old = os.umask(0o077)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        for n in names:
            for suffix in (PUBLIC_SUFFIX, SECRET_SUFFIX):
                (directory / f"{n}{suffix}").unlink(missing_ok=True)
            public_file, secret_file = zmq.auth.create_certificates(str(directory), n)
            os.chmod(secret_file, 0o600)
            os.chmod(public_file, 0o644)
            out.append((n, _read_cert(Path(public_file), False)[0]))
        return out
    finally:
        os.umask(old)


class Keyring:
    """One process's view of the cluster's keys: its own pair, the servers' public keys, the
    authorized clients. `enabled` is False when security.curve is off; then client() gives
    None and servers run in the clear, as before."""

    def __init__(self, config, me: str, key: str | None = None):
        self.enabled = bool(config.security.curve)
        self.me = me
        self.keys: KeyPair | None = None
        self._authorized: frozenset[bytes] | None = None
        self._config = config
        if self.enabled:
            self.dir = keys_dir(config)
            self.keys = load_keypair(self.dir, key or me)

    def __repr__(self) -> str:
        return (f"Keyring(me={self.me!r}, enabled={self.enabled}, "
                f"public={self.keys.public.decode() if self.keys else None})")

    @property
    def authorized(self) -> frozenset[bytes]:
        if self._authorized is None:
            self._authorized = authorized(self._config) if self.enabled else frozenset()
        return self._authorized

    def client(self, server: str) -> CurveClient | None:
        """Curve settings to reach `server` (a replica name or `controller`); None if off."""
        if not self.enabled:
            return None
        return CurveClient(self.keys, load_public(self.dir, server), server)

    def server_for_endpoint(self, endpoint: str) -> str | None:
        """Whose server binds `endpoint` in the config (a replica, or the controller)."""
        if endpoint == self._config.control.controller_endpoint:
            return CONTROLLER
        for r in self._config.replicas.values():
            if endpoint in r.endpoints.values():
                return r.name
        return None


def configure_client(sock, curve: CurveClient | None) -> None:
    """Make a socket a CURVE client (before connect); nothing when curve is None."""
    if curve is None:
        return
    sock.curve_publickey = curve.keys.public
    sock.curve_secretkey = curve.keys.secret
    sock.curve_serverkey = curve.server_public


def configure_server(sock, keys: KeyPair) -> None:
    """Make a socket a CURVE server that asks the ZAP handler about each client (before bind)."""
    sock.curve_server = True
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.zap_domain = ZAP_DOMAIN


# --------------------------------------------------------------------------- ZAP decisions

def zap_verdict(mechanism: bytes, credentials: list[bytes],
                allowed: frozenset[bytes]) -> tuple[bool, str, str | None]:
    """(accept?, reason, the client's public key in Z85 or None) for one ZAP request."""
    from zmq.utils import z85
    if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
        return False, NO_CURVE, None
    key = z85.encode(credentials[0])
    if key in allowed:
        return True, "ok", key.decode()
    return False, UNKNOWN_KEY, key.decode()


class LogLimiter:
    """At most one log line per key per `every` seconds; how many were held back meanwhile.
    A refused client may reconnect several times a second: its first refusal is logged, then
    one line per period, each counting the ones in between."""

    def __init__(self, every: float = 10.0):
        self.every = every
        self._last: dict = {}
        self._held: dict = {}

    def admit(self, key, now: float) -> tuple[bool, int]:
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return False, 0
        self._last[key] = now
        return True, self._held.pop(key, 0)


# --------------------------------------------------------------------------- shared memory

@dataclasses.dataclass(frozen=True)
class ShmAccess:
    """The mode (and group) every segment and semaphore is given right after creation. The
    creation mode is 0600 at most, masked further by the umask; chmod then sets exactly
    `mode`, so an object is never, even for a moment, open to more than it should be."""
    mode: int = 0o600
    gid: int = -1  # -1: keep the creator's group

    def apply_fd(self, fd: int, name: str) -> None:
        self._apply(name, lambda: os.fchmod(fd, self.mode),
                    lambda: os.fchown(fd, -1, self.gid))

    def apply_sem(self, name: str) -> None:
        # Linux keeps a named semaphore as /dev/shm/sem.<name without its leading slash>.
        path = sem_path(name)
        self._apply(name, lambda: os.chmod(path, self.mode), lambda: os.chown(path, -1, self.gid))

    def _apply(self, name: str, chmod, chown) -> None:
        try:
            if self.gid != -1:
                chown()
            chmod()
        except PermissionError as e:
            raise SecurityError(f"cannot give {name} group id {self.gid} and mode "
                                f"{self.mode:04o} ({e.strerror}): the process must belong to "
                                "security.shm_group (or run as root)") from None


def sem_path(name: str) -> str:
    return f"/dev/shm/sem.{name.lstrip('/')}"


def shm_path(name: str) -> str:
    return f"/dev/shm/{name.lstrip('/')}"


def shm_access(config) -> ShmAccess:
    """security.shm_mode and shm_group, resolved on this host."""
    sec = config.security
    gid = -1
    if sec.shm_group is not None:
        try:
            gid = grp.getgrnam(sec.shm_group).gr_gid
        except KeyError:
            raise ConfigError(f"group {sec.shm_group!r} does not exist on this host: create it "
                              f"(groupadd {sec.shm_group}) and add the middlebox's user to it, "
                              "or remove the key", str(config.path), None,
                              "security.shm_group") from None
    return ShmAccess(sec.file_mode, gid)
