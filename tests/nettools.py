"""Traffic for network tests: small servers and clients run inside the test bed's namespaces,
and a reader that turns a child's output lines into awaitable events."""
from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TCP_SINK = r"""
import hashlib, socket, sys
port = int(sys.argv[1]); n = int(sys.argv[2])
srv = socket.socket(socket.AF_INET6 if ":" in sys.argv[3] else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[3], port)); srv.listen(8)
print("listening", flush=True)
for _ in range(n):
    c, _ = srv.accept()
    h = hashlib.sha256()
    while True:
        d = c.recv(65536)
        if not d:
            break
        h.update(d)
    c.sendall(h.hexdigest().encode())
    c.close()
"""

TCP_SEND = r"""
import hashlib, json, random, socket, sys
addr, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = random.Random(size).randbytes(size)
s = socket.create_connection((addr, port), timeout=20)
s.sendall(data); s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    d = s.recv(1024)
    if not d:
        break
    reply += d
print(json.dumps({"sent": hashlib.sha256(data).hexdigest(), "got": reply.decode()}), flush=True)
"""

UDP_SINK = r"""
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    d, _ = s.recvfrom(65536)
    print(d.decode(), flush=True)
"""

UDP_SEND = r"""
import socket, sys, time
addr, port, tag, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
gap = float(sys.argv[5]) if len(sys.argv) > 5 else 0.002
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    s.sendto(f"{tag} {i}".encode(), (addr, port)); time.sleep(gap)
"""


def py(code: str, *args) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


class Lines:
    """Collects a child's output lines on a thread, so tests can await them with deadlines."""

    def __init__(self, stream):
        self.q: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def expect(self, pred, timeout: float = 10.0) -> str:
        """Wait for a line satisfying pred (a substring or a callable); AssertionError if none."""
        test = pred if callable(pred) else (lambda line: pred in line)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no line matching {pred!r} within {timeout} s; saw {self.seen[-20:]}"
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                continue
            assert line is not None, f"stream ended before {pred!r}; saw {self.seen[-20:]}"
            self.seen.append(line)
            if test(line):
                return line

    def drain(self, quiet: float) -> list[str]:
        """Lines that arrive until the stream stays quiet for `quiet` seconds."""
        out = []
        while True:
            try:
                line = self.q.get(timeout=quiet)
            except queue.Empty:
                return out
            if line is None:
                return out
            self.seen.append(line)
            out.append(line)


def spawn(bed, role: str, argv: list[str], stderr=subprocess.PIPE) -> tuple[subprocess.Popen, Lines]:
    proc = bed.exec(role, argv, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO)
    return proc, Lines(proc.stdout)
