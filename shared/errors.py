"""Pico's exception tree. Every error message says what happened, where, and what to do.

    PicoError
    ├── ConfigError               bad cluster YAML (file, line, key)
    ├── AttachError               a process cannot attach to a shared-memory segment
    │   ├── SegmentMissing        no segment under that name (is the owner running?)
    │   ├── AbiMismatch           the segment's ABI major differs from ours (both named)
    │   ├── SegmentNotReady       the owner has not written the ready word before the deadline
    │   ├── SegmentCorrupt        bad magic, kind, sizes, or truncated segment
    │   └── StaleOwner            the pid that created the segment is dead
    ├── FlowTableError
    │   ├── TableFull             a lock stripe of the flow table has no room left
    │   ├── FlowIsStandby         create=True on a key that is held as a standby copy
    │   ├── FlowLockTimeout       a stripe lock was not acquired in time (dead or hung holder)
    │   └── NoTransaction         put_flow without a get_flow open on that key in this thread
    ├── WireError                 a control message could not be decoded (reason code + text)
    ├── ControlTimeout            a control request got no reply in time
    │   └── AuthRefused           ...because the server refused our CURVE handshake
    └── SecurityError             a key file is missing, unreadable or too open; a
                                  shared-memory object cannot be given its mode or group

Library errors (posix_ipc.ExistentialError, posix_ipc.BusyError, zmq.Again) are mapped to these
at the boundary, so callers catch one family.
"""
from __future__ import annotations


class PicoError(Exception):
    """Root of every error Pico raises on purpose."""


class ConfigError(PicoError):
    """A cluster configuration is invalid; carries the file, the line and the key path."""

    def __init__(self, reason: str, file: str | None = None, line: int | None = None,
                 key: str | None = None):
        self.reason, self.file, self.line, self.key = reason, file, line, key
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        super().__init__(f"{where}{key + ': ' if key else ''}{reason}")


class AttachError(PicoError):
    """Attaching to a shared-memory segment failed."""


class SegmentMissing(AttachError):
    pass


class AbiMismatch(AttachError):
    pass


class SegmentNotReady(AttachError):
    pass


class SegmentCorrupt(AttachError):
    pass


class StaleOwner(AttachError):
    pass


class FlowTableError(PicoError):
    pass


class TableFull(FlowTableError):
    pass


class FlowIsStandby(FlowTableError):
    pass


class FlowLockTimeout(FlowTableError):
    pass


class WireError(PicoError):
    """A control message is malformed; `code` is the protocol's error code."""

    def __init__(self, code: int, message: str):
        self.code = code
        super().__init__(message)


class ControlTimeout(PicoError):
    pass


class AuthRefused(ControlTimeout):
    """The server refused the CURVE handshake (unknown client key, wrong server key, or one
    side without CURVE). A ControlTimeout too: the request got no reply, and callers that
    retry on timeouts keep working."""


class SecurityError(PicoError):
    """Keys or permissions: what is wrong with which file, and the command that fixes it."""


class NoTransaction(FlowTableError):
    """put_flow without a matching get_flow in this thread."""
