"""The RM's control endpoint (picoctl's peer): requests in, JSON replies out, no sockets here.

RmControl.handle(frame) -> reply frame, like the SMM's service: every request is validated
first, and bad input gets an error reply and is counted. Requests:
  PING, STATS             the replica's groups with their figures
  GROUPS                  the same, shorter
  SUSPEND / RESUME        {"group": G}: hold or release the group's input (operator action)
  GROUP_SET               {"group": G, "frequency_hz": F?, "buffering": B?, "target": R?}
  GROUP_CREATE            {"group": G, "frequency_hz": F?, "target": R?, "buffering": B?}
  GROUP_DELETE            {"group": G}: its flows join the default group
  FLOWS                   {"group": G?, "limit": N?}
  MOVE                    {"key": HEX, "group": G}
  VIEW                    {"view": V, "alive": [R...]}: the controller's membership (sdn)
  FREEZE / TAKEOVER / HANDOFF {"group": G|null, "view": V}: live migration steps (sdn)
The changes themselves are rm.admin's.
"""
from __future__ import annotations

import os
import time
from collections import Counter

import numpy as np

from shared import wire
from shared.errors import WireError
from shared.packets import PacketError

from .admin import Admin


class RmControl:
    def __init__(self, server, max_bytes: int):
        self.server = server
        self.admin = Admin(server)
        self.max_bytes = max_bytes
        self.started = time.monotonic()
        self.requests: Counter = Counter()
        self.errors: Counter = Counter()

    def handle(self, frame: bytes) -> bytes:
        seq = wire.peek_seq(frame)
        try:
            msg = wire.decode(frame, self.max_bytes)
            handler = {wire.PING: self._ping, wire.STATS: self._stats, wire.GROUPS: self._stats,
                       wire.SUSPEND: self._suspend, wire.RESUME: self._resume,
                       wire.GROUP_SET: self._set, wire.GROUP_CREATE: self._create,
                       wire.GROUP_DELETE: self._delete, wire.FLOWS: self._flows,
                       wire.MOVE: self._move, wire.VIEW: self._view,
                       wire.FREEZE: self._freeze, wire.HANDOFF: self._handoff,
                       wire.TAKEOVER: self._takeover}.get(msg.type)
            if handler is None:
                raise WireError(wire.ERR_UNKNOWN_TYPE, f"the RM does not serve request type "
                                f"{msg.type}; it serves ping, stats, groups, suspend, resume, "
                                "group_set, group_create, group_delete, flows, move, view, "
                                "freeze, handoff, takeover")
            self.requests[wire.TYPE_NAMES[msg.type]] += 1
            body = handler(wire.parse_json_body(msg.body))
            return wire.encode(msg.type | wire.REPLY_BIT, msg.seq, wire.json_body(body))
        except (WireError, PacketError) as e:
            code = e.code if isinstance(e, WireError) else wire.ERR_BAD_BODY
            return self._refuse(seq, code, str(e))
        except Exception as e:  # a bug must not take the RM (and so the replica) down
            self.server.log.exception("internal error handling a request")
            return self._refuse(seq, wire.ERR_INTERNAL, f"internal error: "
                                f"{type(e).__name__}: {e}")

    def bad_envelope(self, parts: int) -> bytes:
        return self._refuse(0, wire.ERR_BAD_ENVELOPE, f"expected one message frame after the "
                            f"envelope, got {parts}: send a single frame")

    def _refuse(self, seq: int, code: int, text: str) -> bytes:
        """An error reply, counted in STATS `errors` and logged (bad input never stops the RM)."""
        name = wire.ERROR_NAMES.get(code, str(code))
        self.errors[name] += 1
        self.server.log.warning(f"rejected request seq={seq}: {name}: {text}")
        return wire.error_reply(seq, code, text)

    def _group(self, req: dict) -> int:
        g = req.get("group")
        if not isinstance(g, int) or isinstance(g, bool):
            raise WireError(wire.ERR_BAD_BODY, "'group' must be a group id (an integer)")
        if g not in self.server.seg.active_groups():
            raise WireError(wire.ERR_BAD_BODY, f"no group {g} on this replica; known: "
                            f"{sorted(self.server.seg.active_groups())}")
        return g

    def _replica_name(self, rid: int) -> str | None:
        for rep in self.server.config.replicas.values():
            if rep.id == rid:
                return rep.name
        return None if not rid else str(rid)

    def _ping(self, req: dict) -> dict:
        return {"replica": self.server.replica.name, "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started, 3)}

    def _stats(self, req: dict) -> dict:
        rows = []
        for row in self.server.seg.group_stats():
            ge = self.server.groups.get(row["id"])
            row["protected"] = bool(row["protected"])
            peer = self._replica_name(row["target"])
            row["target"] = peer
            if ge is not None:
                lat = np.array(ge.commit_latencies[-1000:]) * 1000 if ge.commit_latencies \
                    else np.array([0.0])
                row.update({"protected": ge.protected, "configured_hz": ge.frequency_hz,
                            "achieved_hz": round(ge.achieved_hz(), 1),
                            "commit_p50_ms": round(float(np.percentile(lat, 50)), 3),
                            "commit_p99_ms": round(float(np.percentile(lat, 99)), 3),
                            "inflight": len(ge.inflight), "stuck": ge.stuck,
                            "retries": ge.retries, "bytes_last": ge.bytes_last,
                            "resyncs": ge.resyncs})
            rows.append(row)
        return {"replica": self.server.replica.name, "groups": rows,
                "requests": dict(self.requests), "errors": dict(self.errors)}

    def _suspend(self, req: dict) -> dict:
        g = self._group(req)
        self.server.ctl.suspend(g)             # (refuses the default group)
        self.server.operator_suspended.add(g)  # checkpoints go on; their resumes skip it
        return {"group": g, "suspended": True}

    def _resume(self, req: dict) -> dict:
        g = self._group(req)
        self.server.operator_suspended.discard(g)
        self.server.ctl.resume(g)
        return {"group": g, "suspended": False}

    def _set(self, req: dict) -> dict:
        g = self._group(req)
        return self.admin.set(g, **{k: v for k, v in req.items() if k != "group"})

    def _create(self, req: dict) -> dict:
        unknown = set(req) - {"group", "frequency_hz", "target", "buffering"}
        if unknown:
            raise WireError(wire.ERR_BAD_BODY, f"group_create: unknown field(s) {sorted(unknown)}")
        return self.admin.create(req.get("group"), req.get("frequency_hz", 1000),
                                 req.get("target"), req.get("buffering", True))

    def _delete(self, req: dict) -> dict:
        return self.admin.delete(self._group(req))

    def _flows(self, req: dict) -> dict:
        return self.admin.flows(req.get("group"), req.get("limit", 100))

    def _freeze(self, req: dict) -> dict:
        return self.admin.freeze(req.get("group"))

    def _takeover(self, req: dict) -> dict:
        return self.admin.takeover(req.get("group"))

    def _handoff(self, req: dict) -> dict:
        return self.admin.handoff(req.get("group"))

    def _view(self, req: dict) -> dict:
        return self.admin.apply_view(req.get("view"), req.get("alive"))

    def _move(self, req: dict) -> dict:
        return self.admin.move(req.get("key"), req.get("group"))
