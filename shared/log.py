"""Structured logging: one named logger per component, every line carrying replica/group context.

Lines look like `2026-11-27 13:20:07,123 pico.smm INFO replica=r1 installed 12 records group=1`.
Set PICO_LOG_LEVEL (DEBUG, INFO, ...) to change the level; PICO_LOG_JSON=1 emits one JSON
object per line instead.
"""
from __future__ import annotations

import json
import logging
import os
import sys


class ContextLogger(logging.LoggerAdapter):
    """Prefixes every message with key=value context (replica, group, flow...)."""

    def process(self, msg, kwargs):
        ctx = " ".join(f"{k}={v}" for k, v in self.extra.items())
        kwargs.setdefault("extra", {})["pico"] = dict(self.extra)
        return (f"{ctx} {msg}" if ctx else msg), kwargs

    def bind(self, **more) -> "ContextLogger":
        return ContextLogger(self.logger, {**self.extra, **more})


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {"time": record.created, "logger": record.name, "level": record.levelname,
               "message": record.getMessage()}
        obj.update(getattr(record, "pico", {}))
        return json.dumps(obj)


def setup(level: str | None = None) -> None:
    """Configure the root handler once per process (stderr, unbuffered-friendly)."""
    root = logging.getLogger()
    if getattr(root, "_pico_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("PICO_LOG_JSON") == "1":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("PICO_LOG_LEVEL", "INFO"))
    root._pico_configured = True


def get_logger(component: str, **context) -> ContextLogger:
    return ContextLogger(logging.getLogger(f"pico.{component}"), context)
