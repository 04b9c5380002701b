"""Apply a new faucet.yaml to a running Faucet and know when it took effect.

`FaucetDriver.apply(text)`:
  1. writes the file atomically (a temporary file in the same directory, then os.replace), so
     faucet never reads half a file;
  2. SIGHUPs faucet and calls poke() (faucet acts on a signal only at its next eventlet hub
     wakeup; any socket activity, e.g. a GET of its Prometheus port, wakes it: tens of ms instead
     of up to ~1.7 s; notes networking-stack §5);
  3. waits on the event socket for faucet's verdict and returns the seconds from SIGHUP to it.

What faucet 1.10.12 sends on a reload (faucet/valves_manager.py request_reload_configs; seen on
the test bed, tests/test_steering_net.py):

  - if the file's content did not change (by hash) it logs "configuration is unchanged, not
    reloading" and sends NO event. apply() therefore skips the signal when the text equals
    what faucet is known to run (`loaded_hash`) and returns 0.0;
  - otherwise, per datapath: {"CONFIG_CHANGE": {"restart_type": "warm"|"cold"|"new"|null}},
    sent before the new flows go out (null: nothing changed for that DP), then ONE event with
    dp_id 0: {"CONFIG_CHANGE": {"success": true|false, "config_hash_info": {"config_files":
    "<realpath>[,<include>...]", "hashes": "<sha256>[,...]", "error": ""}}}. For a warm reload
    the flows have been sent when it comes (the notes saw rules take effect within ~2 ms of it).
    A rejected config sends no restart_type event, success false, hashes "" and the parser's
    message in "error" (e.g. "ACL (pico-from-clients) output port undefined in DP: 1").
  - the hash is hashlib.sha256 of the file's TEXT as Python reads it (text mode, UTF-8,
    universal newlines: a "\\r\\n" file hashes as "\\n"), hex; config_files are real paths,
    comma-joined in sorted order, hashes in the same order. apply() checks that the hash for our
    file equals sha256 of the text it wrote; a success event with another hash (someone else
    rewrote the file) is ignored, logged, and named in the timeout error.
  - a cold restart (e.g. changing the VLAN's vid; adding `acls_in` with an ACL that other
    ports already use was WARM here) makes faucet drop the datapath's connection; the success
    event comes before OVS reconnects, so with wait_cold (default) apply() also waits for that
    DP's DP_CHANGE cold_start: 2.6-2.8 s from SIGHUP on the test bed (max_backoff=1000).

Measured on the test bed (tests/test_steering_net.py, all buckets r1 -> r2, a warm reload):
20-50 ms from SIGHUP to the success event, and 0 or 5-6 datagrams of a 1 kpps stream lost, in
one hole at the switch-over. Faucet changes a port's ACL by deleting the port's ACL flows and
adding the new ones (valve_acl.cold_start_port: del_port + add_port, not an OpenFlow bundle),
so for a few ms the port matches nothing; that is the likely cause of the hole (it stays when
the new replica's ARP cache is warm).

A rejected config: faucet logs "New config bad (...) - rejecting" and KEEPS RUNNING ITS PREVIOUS
CONFIG: flows unchanged, traffic keeps its old path (verified on the test bed). The rejected text
stays on disk unless FAUCET_CONFIG_AUTO_REVERT is set (then faucet itself writes back its last
good text). Left alone, a faucet restart would then fail to load, so with restore_on_reject
(default) apply() writes the previous good text back (atomically, without SIGHUP; faucet already
runs it), then raises FaucetConfigRejected. After a rejection faucet treats the file as "not
loaded", so its next SIGHUP reloads whatever the file holds.
"""
from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sdn.faucet_events import (CONFIG_CHANGE, DP_CHANGE, Event, FaucetEventClient,
                               FaucetEventTimeout)
from shared import log as pico_log
from shared.errors import PicoError

log = pico_log.get_logger("sdn.faucet")


class FaucetDriverError(PicoError):
    """A config could not be applied to Faucet; the message says why and what to do."""


class FaucetConfigRejected(FaucetDriverError):
    """Faucet reported success false for the new config; it keeps running the previous one."""

    def __init__(self, message: str, error: str | None):
        self.error = error
        super().__init__(message)


class FaucetApplyTimeout(FaucetDriverError):
    """Faucet gave no verdict on the new config in time."""


class FaucetNotRunning(FaucetDriverError):
    """There is no faucet process to signal."""


def config_hash(text: str) -> str:
    """The hash faucet reports for a config file holding `text` (see the module doc)."""
    normalised = text.replace("\r\n", "\n").replace("\r", "\n")
    return hashlib.sha256(normalised.encode("utf-8")).hexdigest()


@dataclass
class ApplyResult:
    seconds: float                   # monotonic, SIGHUP -> verdict (or cold_start)
    faucet_seconds: float | None     # faucet's own event time minus our wall time at SIGHUP
    config_hash: str
    restart_types: dict[int, str | None] = field(default_factory=dict)  # dp_id -> type
    success_event: Event | None = None
    skipped: bool = False            # the text was already loaded: nothing sent


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class FaucetDriver:
    """Owns one faucet.yaml: apply() writes it, signals faucet, waits for the verdict.

    faucet_pid() gives faucet's PID (None when it is not running); poke() wakes faucet's hub;
    events is the (only) client of faucet's event socket; its unrelated events stay in its
    backlog for the caller's poll(). log_path (faucet's FAUCET_LOG) adds its tail to errors.
    loaded_hash: the hash of the config faucet runs now; by default the file's current content
    is assumed loaded (create the driver after faucet has started on that file)."""

    def __init__(self, config_path: str | os.PathLike, faucet_pid: Callable[[], int | None],
                 poke: Callable[[], None], events: FaucetEventClient,
                 log_path: str | os.PathLike | None = None, loaded_hash: str | None = None,
                 restore_on_reject: bool = True, wait_cold: bool = True):
        self.config_path = Path(config_path)
        self.faucet_pid = faucet_pid
        self.poke = poke
        self.events = events
        self.log_path = Path(log_path) if log_path else None
        self.restore_on_reject = restore_on_reject
        self.wait_cold = wait_cold
        if loaded_hash is None and self.config_path.is_file():
            loaded_hash = config_hash(self.config_path.read_text(encoding="utf-8"))
        self.loaded_hash = loaded_hash
        self.last: ApplyResult | None = None
        self.applies = 0
        self.rejections = 0

    def _log_tail(self, lines: int = 8) -> str:
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError as e:
            return f" (faucet log {self.log_path} unreadable: {e})"
        tail = "\n".join(text[-lines:])
        return f"\n--- tail of {self.log_path}:\n{tail}" if tail else ""

    def _pid(self) -> int:
        pid = self.faucet_pid()
        if pid is None:
            raise FaucetNotRunning(f"cannot apply {self.config_path}: faucet is not running. "
                                   "What to do: start faucet (FAUCET_CONFIG=<this file>)")
        return pid

    def apply(self, yaml_text: str, timeout: float = 10.0) -> float:
        """Make faucet run yaml_text; seconds from SIGHUP until faucet confirmed it.

        Raises FaucetConfigRejected (faucet keeps its previous config), FaucetApplyTimeout or
        FaucetNotRunning. Details of the last apply are in `self.last`."""
        want = config_hash(yaml_text)
        if want == self.loaded_hash:
            log.info("%s: unchanged (sha256 %s), not reloading", self.config_path, want[:12])
            self.last = ApplyResult(0.0, None, want, skipped=True)
            return 0.0
        pid = self._pid()
        previous = None
        if self.config_path.is_file():
            previous = self.config_path.read_text(encoding="utf-8")
        # Events already waiting (or buffered in the socket) are older than our reload.
        self.events.pump()
        since_id = self.events.last_event_id or 0
        atomic_write(self.config_path, yaml_text)
        t_wall = time.time()
        t0 = time.monotonic()
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            raise FaucetNotRunning(f"cannot apply {self.config_path}: faucet (pid {pid}) is "
                                   "gone. What to do: restart it; the new file is in place and "
                                   "will be loaded at start") from None
        self.poke()
        self.applies += 1

        def after_hup(e: Event) -> bool:
            return e.event_id > since_id or e.time >= t_wall

        restart: dict[int, str | None] = {}
        other_hashes: list[str] = []

        def verdict(e: Event) -> bool:
            if e.kind != CONFIG_CHANGE or not after_hup(e):
                return False
            if e.success is None:
                restart[e.dp_id] = e.restart_type
                return False
            if e.success and e.config_files:
                got = e.config_hash(self.config_path)
                if got is not None and got != want:
                    other_hashes.append(got)
                    log.warning("%s: faucet loaded content with sha256 %s, not ours (%s): "
                                "is someone else writing this file?", self.config_path,
                                got[:12], want[:12])
                    return False
            return True

        deadline = t0 + timeout
        try:
            ev = self._wait(verdict, deadline, pid)
        except FaucetEventTimeout:
            raise FaucetApplyTimeout(self._timeout_message(timeout, pid, want, other_hashes)) \
                from None
        seconds = time.monotonic() - t0
        if not ev.success:
            self.rejections += 1
            restored = ""
            if self.restore_on_reject and previous is not None:
                atomic_write(self.config_path, previous)
                restored = " The previous file was written back (faucet already runs it)."
            raise FaucetConfigRejected(
                f"faucet rejected {self.config_path}: {ev.config_error or 'no reason given'}. "
                f"Faucet keeps running its previous config (sha256 "
                f"{(self.loaded_hash or '?')[:12]}).{restored} What to do: run "
                f"`check_faucet_config {self.config_path}` on the new text and fix it"
                + self._log_tail(), ev.config_error)
        cold = [dp for dp, kind in restart.items() if kind == "cold"]
        if cold and self.wait_cold:
            for dp in cold:
                try:
                    ev_cold = self._wait(lambda e, dp=dp: e.kind == DP_CHANGE and e.dp_id == dp
                                         and e.reason == "cold_start" and after_hup(e),
                                         deadline, pid)
                except FaucetEventTimeout:
                    raise FaucetApplyTimeout(
                        f"faucet accepted {self.config_path} with a COLD restart of datapath "
                        f"{dp:#x}, but the datapath did not reconnect within {timeout} s. What "
                        "to do: check the switch's controller connection (ovs-vsctl show)"
                        + self._log_tail()) from None
                seconds = time.monotonic() - t0
                log.info("%s: datapath %#x cold-started %.3f s after SIGHUP (event %d)",
                         self.config_path, dp, seconds, ev_cold.event_id)
        self.loaded_hash = want
        self.last = ApplyResult(seconds, ev.time - t_wall, want, dict(restart), ev)
        log.info("%s applied in %.3f s (%s, sha256 %s)", self.config_path, seconds,
                 ",".join(f"{dp:#x}:{k}" for dp, k in sorted(restart.items())) or "no DP change",
                 want[:12])
        return seconds

    def _wait(self, pred: Callable[[Event], bool], deadline: float, pid: int) -> Event:
        """wait_for in slices, so a faucet that dies is noticed before the deadline."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FaucetEventTimeout("deadline")
            try:
                return self.events.wait_for(pred, min(left, 0.5))
            except FaucetEventTimeout:
                if not _alive(pid):
                    raise FaucetNotRunning(
                        f"faucet (pid {pid}) died while loading {self.config_path}. What to "
                        "do: read its logs; it will load this file when restarted"
                        + self._log_tail()) from None

    def _timeout_message(self, timeout: float, pid: int, want: str,
                         other_hashes: list[str]) -> str:
        ev = self.events
        why = []
        if other_hashes:
            why.append(f"it loaded other content (sha256 {', '.join(h[:12] for h in other_hashes)}"
                       f", ours {want[:12]}): another writer?")
        if not ev.connected:
            why.append("the event socket is not connected")
        if ev.lost:
            why.append(f"{ev.lost} event(s) were lost on the event socket (a reconnect?), "
                       "the verdict may be among them")
        if ev.garbage:
            why.append(f"{ev.garbage} unreadable event line(s), last: {ev.last_garbage}")
        return (f"faucet (pid {pid}) gave no verdict on {self.config_path} within {timeout} s"
                + (f" ({'; '.join(why)})" if why else "")
                + ". What to do: read faucet's log (a 'configuration is unchanged' line means it "
                  "already ran this text: pass loaded_hash); check Prometheus "
                  "faucet_config_hash_info and faucet_config_load_error" + self._log_tail())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
