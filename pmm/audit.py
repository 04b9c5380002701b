"""The output-commit invariant, checked from the PMM's audit log (pico-pmm --audit FILE).

Each released packet is one JSON line: group "g", epoch tag "e", the group's committed epoch
at release "c", buffering "b". The invariant: a packet of a buffered group leaves only if its
tag is <= the committed epoch, i.e. the backup has acknowledged the checkpoint covering it.
"""
from __future__ import annotations

import json
from typing import Iterable


def record(verdict) -> dict:
    """The audit line of one released pmm.core.Verdict."""
    return {"g": verdict.group, "e": verdict.epoch, "c": verdict.committed,
            "b": verdict.buffering, "id": verdict.packet_id}


def violations(records: Iterable[dict]) -> list[dict]:
    """The released packets that broke output commit."""
    return [r for r in records if r["b"] and r["e"] > r["c"]]


def read_audit(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
