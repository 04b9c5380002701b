"""Layer-7 routing: pick a backend for a connection from its first request (pure).

    router = Router(["web", "api", "static"], [Rule("api", path_prefix="/api/"),
                    Rule("static", host="*.static.example")], default="web")
    index = router.classify(first_client_payload)     # an index into router.backends

What "route" means here, exactly: MBServ classifies the connection by its first request and
records the decision (the backend's index) in the flow's replicated state, and the shell counts
connections per backend. It does not rewrite addresses: the backend decision needs the first
request, which comes after the handshake, and moving an established connection to another
server means terminating TCP on both sides (a full proxy, with sequence-number translation),
which a packet-level middlebox like this one does not do. The decision is what an ADC would act
on; here it is real, replicated (a backup knows each flow's backend after a failover), counted
and exposed, but packets keep their destination.

A rule matches when all of its conditions hold:
  host         the HTTP Host header (no port), case-insensitive; "*.example.com" matches any
               subdomain (not example.com itself)
  path_prefix  the HTTP request target's path starts with it (absolute-form targets,
               "http://host/path", are reduced to their path; their host counts as Host)
  prefix       the first payload starts with these bytes (any protocol)
The first matching rule wins; none: the default backend. Only the first client payload segment
is looked at: a request whose headers continue in a later segment is classified on what the
first one holds (its Host may be missed).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_REQUEST_LINE = re.compile(rb"^([A-Z]{1,16}) (\S+) HTTP/\d\.\d\r?$")


@dataclass(frozen=True)
class Rule:
    backend: str
    host: str | None = None
    path_prefix: str | None = None
    prefix: bytes | None = None

    def __post_init__(self):
        if self.host is None and self.path_prefix is None and self.prefix is None:
            raise ValueError(f"rule for {self.backend!r} has no condition (host, path_prefix or "
                             "prefix)")


@dataclass(frozen=True)
class Request:
    method: bytes
    path: bytes
    host: bytes | None  # lower case, port removed


def parse_request(payload: bytes) -> Request | None:
    """The HTTP/1.x request line and Host header at the start of `payload`, or None."""
    head = payload[:8192]
    line_end = head.find(b"\n")
    first = head if line_end < 0 else head[:line_end]
    m = _REQUEST_LINE.match(first)
    if m is None:
        return None
    method, target = m.group(1), m.group(2)
    host = None
    if target.startswith((b"http://", b"https://")):
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        host, target = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
    if host is None and line_end >= 0:
        for line in head[line_end + 1:].split(b"\n"):
            line = line.rstrip(b"\r")
            if not line:
                break
            name, sep, value = line.partition(b":")
            if sep and name.strip().lower() == b"host":
                host = value.strip()
                break
    if host is not None:
        host = _strip_port(host.lower())
    return Request(method, target, host)


def _strip_port(host: bytes) -> bytes:
    if host.startswith(b"["):  # [v6]:port
        return host[:host.find(b"]") + 1] if b"]" in host else host
    name, sep, port = host.rpartition(b":")
    return name if sep and port.isdigit() else host


def _host_matches(pattern: bytes, host: bytes | None) -> bool:
    if host is None:
        return False
    if pattern.startswith(b"*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


class Router:
    def __init__(self, backends, rules=(), default: str | None = None):
        self.backends = tuple(backends)
        if len(set(self.backends)) != len(self.backends):
            raise ValueError("backend names must be unique")
        if not 0 < len(self.backends) <= 255:
            raise ValueError("routing needs 1 to 255 backends (a u8 in the flow state)")
        index = {b: i for i, b in enumerate(self.backends)}
        if default is None:
            default = self.backends[0]
        if default not in index:
            raise ValueError(f"default backend {default!r} is not one of {list(self.backends)}")
        self.default = index[default]
        self._rules = []
        for r in rules:
            if r.backend not in index:
                raise ValueError(f"rule backend {r.backend!r} is not one of "
                                 f"{list(self.backends)}")
            self._rules.append((index[r.backend],
                                r.host.lower().encode() if r.host is not None else None,
                                r.path_prefix.encode() if r.path_prefix is not None else None,
                                r.prefix))
        self._http = any(h is not None or p is not None for _, h, p, _ in self._rules)

    def classify(self, payload: bytes) -> int:
        """The backend index for a connection whose first request payload is `payload`."""
        req = parse_request(payload) if self._http else None
        for backend, host, path_prefix, prefix in self._rules:
            if prefix is not None and not payload.startswith(prefix):
                continue
            if host is not None and not (req is not None and _host_matches(host, req.host)):
                continue
            if path_prefix is not None and not (req is not None and
                                                 req.path.startswith(path_prefix)):
                continue
            return backend
        return self.default

    def name(self, index: int) -> str:
        return self.backends[index] if 0 <= index < len(self.backends) else f"?{index}"
