"""MBServ's own configuration: a small YAML file, validated with errors naming file and key.

    malicious:                     # strings whose presence in a payload drops the segment and
      - "EVIL-PAYLOAD"             #   blocks its flow; a plain string is its UTF-8 bytes,
      - {hex: "90 90 90 90"}       #   {hex: ...} any bytes
    ignore_case: false             # ASCII letters of the strings match either case
    reset_on_violation: false      # answer no-state / non-conforming segments with an RST
    time_wait_s: 30                # a closed flow (TIME_WAIT or reset) is deleted this long
                                   #   after its last segment
    routing:                       # optional: layer-7 classification (route.py)
      backends: [web, api, static]
      default: web                 # when no rule matches (default: the first backend)
      rules:                       # first match wins; all conditions of a rule must hold
        - {backend: api, path_prefix: /api/}
        - {backend: static, host: "*.static.example.com"}
        - {backend: api, prefix: "RPC "}     # first payload bytes, any protocol

Every key is optional; an empty file (or none at all) gives a middlebox that tracks TCP and
neither inspects nor routes. load_config(path) or parse_config(text, path) -> MBServConfig; a
problem raises shared.errors.ConfigError(reason, file, key=dotted.path).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared.errors import ConfigError

from .inspect import Inspector
from .route import Router, Rule

MAX_PATTERN = 1024
_TOP = {"malicious", "ignore_case", "reset_on_violation", "time_wait_s", "routing"}
_ROUTING = {"backends", "default", "rules"}
_RULE = {"backend", "host", "path_prefix", "prefix"}


@dataclass(frozen=True)
class MBServConfig:
    malicious: tuple[bytes, ...] = ()
    ignore_case: bool = False
    reset_on_violation: bool = False
    time_wait_s: float = 30.0
    backends: tuple[str, ...] = ()
    default_backend: str | None = None
    rules: tuple[Rule, ...] = field(default=())
    path: str | None = None

    def inspector(self) -> Inspector:
        return Inspector(self.malicious, self.ignore_case)

    def router(self) -> Router | None:
        if not self.backends:
            return None
        return Router(self.backends, self.rules, self.default_backend)


def load_config(path: str | Path) -> MBServConfig:
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the MBServ config: {e.strerror}", path) from None
    return parse_config(text, path)


def _unknown(raw: dict, allowed: set, where: str, path: str) -> None:
    for k in raw:
        if k not in allowed:
            raise ConfigError(f"unknown key; expected one of {', '.join(sorted(allowed))}",
                              path, key=f"{where}{k}")


def _bool(raw: dict, k: str, path: str) -> bool:
    v = raw.get(k, False)
    if not isinstance(v, bool):
        raise ConfigError(f"expected true or false, got {v!r}", path, key=k)
    return v


def _pattern(v: Any, key: str, path: str) -> bytes:
    if isinstance(v, str):
        b = v.encode("utf-8")
    elif isinstance(v, dict) and set(v) == {"hex"} and isinstance(v["hex"], str):
        try:
            b = bytes.fromhex(v["hex"])
        except ValueError:
            raise ConfigError(f"not hexadecimal: {v['hex']!r}", path, key=f"{key}.hex") from None
    else:
        raise ConfigError(f"expected a string or {{hex: \"...\"}}, got {v!r}", path, key=key)
    if not b:
        raise ConfigError("an empty string would match every payload", path, key=key)
    if len(b) > MAX_PATTERN:
        raise ConfigError(f"{len(b)} bytes; at most {MAX_PATTERN}", path, key=key)
    return b


def _name(v: Any, key: str, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"expected a backend name (a non-empty string), got {v!r}", path,
                          key=key)
    return v


def _opt_str(rule: dict, k: str, key: str, path: str) -> str | None:
    v = rule.get(k)
    if v is not None and (not isinstance(v, str) or not v):
        raise ConfigError(f"expected a non-empty string, got {v!r}", path, key=f"{key}.{k}")
    return v


def _routing(raw: Any, path: str) -> tuple[tuple[str, ...], str | None, tuple[Rule, ...]]:
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping with backends, default, rules", path,
                          key="routing")
    _unknown(raw, _ROUTING, "routing.", path)
    backends = raw.get("backends")
    if not isinstance(backends, list) or not backends:
        raise ConfigError("expected a non-empty list of backend names", path,
                          key="routing.backends")
    names = tuple(_name(b, f"routing.backends[{i}]", path) for i, b in enumerate(backends))
    for i, b in enumerate(names):
        if b in names[:i]:
            raise ConfigError(f"backend {b!r} is listed twice", path, key=f"routing.backends[{i}]")
    if len(names) > 255:
        raise ConfigError(f"{len(names)} backends; at most 255", path, key="routing.backends")
    default = raw.get("default")
    if default is not None:
        default = _name(default, "routing.default", path)
        if default not in names:
            raise ConfigError(f"{default!r} is not one of the backends {list(names)}", path,
                              key="routing.default")
    rules_raw = raw.get("rules", [])
    if not isinstance(rules_raw, list):
        raise ConfigError("expected a list of rules", path, key="routing.rules")
    rules = []
    for i, r in enumerate(rules_raw):
        key = f"routing.rules[{i}]"
        if not isinstance(r, dict):
            raise ConfigError("expected a mapping {backend: ..., host/path_prefix/prefix: ...}",
                              path, key=key)
        _unknown(r, _RULE, f"{key}.", path)
        if "backend" not in r:
            raise ConfigError("missing key backend", path, key=f"{key}.backend")
        backend = _name(r["backend"], f"{key}.backend", path)
        if backend not in names:
            raise ConfigError(f"{backend!r} is not one of the backends {list(names)}", path,
                              key=f"{key}.backend")
        host = _opt_str(r, "host", key, path)
        path_prefix = _opt_str(r, "path_prefix", key, path)
        if path_prefix is not None and not path_prefix.startswith("/"):
            raise ConfigError(f"a path prefix starts with '/', got {path_prefix!r}", path,
                              key=f"{key}.path_prefix")
        prefix = _pattern(r["prefix"], f"{key}.prefix", path) if "prefix" in r else None
        if host is None and path_prefix is None and prefix is None:
            raise ConfigError("a rule needs at least one of host, path_prefix, prefix", path,
                              key=key)
        rules.append(Rule(backend, host, path_prefix, prefix))
    return names, default, tuple(rules)


def parse_config(text: str, path: str = "<string>") -> MBServConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"YAML syntax error: {getattr(e, 'problem', None) or e}", path,
                          line) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping of settings at the top level", path)
    _unknown(raw, _TOP, "", path)
    mal = raw.get("malicious", [])
    if not isinstance(mal, list):
        raise ConfigError("expected a list of strings", path, key="malicious")
    patterns = tuple(_pattern(v, f"malicious[{i}]", path) for i, v in enumerate(mal))
    ignore_case = _bool(raw, "ignore_case", path)
    reset = _bool(raw, "reset_on_violation", path)
    tw = raw.get("time_wait_s", 30)
    if isinstance(tw, bool) or not isinstance(tw, (int, float)) or not math.isfinite(tw) \
            or not 0 <= tw <= 86400:
        raise ConfigError(f"expected seconds in 0..86400, got {tw!r}", path, key="time_wait_s")
    backends, default, rules = (_routing(raw["routing"], path) if raw.get("routing") is not None
                                else ((), None, ()))
    cfg = MBServConfig(patterns, ignore_case, reset, float(tw), backends, default, rules, path)
    try:
        cfg.inspector()
    except ValueError as e:
        raise ConfigError(str(e), path, key="malicious") from None
    return cfg
