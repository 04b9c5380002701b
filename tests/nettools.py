"""Traffic for network tests: small servers and clients run inside the test bed's namespaces,
and a reader that turns a child's output lines into awaitable events."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sdn import clusterbed

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


Lines = clusterbed.Lines  # one line collector for the tests, the bench and the demo


def spawn(bed, role: str, argv: list[str], stderr=subprocess.PIPE) -> tuple[subprocess.Popen, Lines]:
    proc = bed.exec(role, argv, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO)
    return proc, Lines(proc.stdout)


def wait_line(proc, timeout: float) -> str:
    """The child's next stdout line within `timeout` s ("" if none came, or it exited)."""
    import select
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.1)
        if r:
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    return ""
