"""A dependency-free PNG plot: latency over time, one panel per series set (numpy + zlib).

Enough for the demo's Figure-8-style picture without a plotting library: axes, a grid, dots,
vertical markers, and labels in a 5x7 pixel font.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

_FONT = {  # 5x7 glyphs, rows top to bottom, 5 bits each
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    ".": "00000 00000 00000 00000 00000 01100 01100", " ": "00000 00000 00000 00000 00000 00000 00000",
    "-": "00000 00000 00000 11111 00000 00000 00000", ":": "00000 01100 01100 00000 01100 01100 00000",
    "(": "00010 00100 01000 01000 01000 00100 00010", ")": "01000 00100 00010 00010 00010 00100 01000",
    "/": "00001 00010 00010 00100 01000 01000 10000", "%": "11001 11010 00010 00100 01000 01011 10011",
}
for ch, rows in {
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11110 10001 10001 10001 10001 10001 11110",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111", "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 11001 10101 10011 10001 10001 10001", "O": "01110 10001 10001 10001 10001 10001 01110",
    "P": "11110 10001 10001 11110 10000 10000 10000", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
}.items():
    _FONT[ch] = rows

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def text(img: np.ndarray, x: int, y: int, s: str, color=(0, 0, 0)) -> None:
    for i, ch in enumerate(s.upper()):
        rows = _FONT.get(ch, _FONT[" "]).split()
        for r, bits in enumerate(rows):
            for c, bit in enumerate(bits):
                if bit == "1":
                    yy, xx = y + r, x + i * 6 + c
                    if 0 <= yy < img.shape[0] and 0 <= xx < img.shape[1]:
                        img[yy, xx] = color


def panel(img, top: int, height: int, title: str, series: list[list[tuple[float, float]]],
          t_max: float, y_max: float, marks: list[float]) -> None:
    """One panel: x = seconds (0..t_max), y = milliseconds (0..y_max)."""
    left, right = 50, img.shape[1] - 10
    bottom = top + height - 15
    img[top:bottom, left] = 0
    img[bottom, left:right] = 0
    for k in range(1, 5):  # grid and y labels
        y = bottom - (bottom - top) * k // 4
        img[y, left + 1:right:3] = (200, 200, 200)
        text(img, 2, y - 3, f"{y_max * k / 4:.0f}")
    for s in range(0, int(t_max) + 1, max(1, int(t_max) // 10)):
        x = left + int((right - left) * s / t_max)
        img[bottom:bottom + 3, x] = 0
        text(img, x - 3, bottom + 5, str(s))
    for m in marks:
        x = left + int((right - left) * m / t_max)
        img[top:bottom, x] = (120, 120, 120)
    text(img, left + 8, top + 2, title)
    for i, pts in enumerate(series):
        color = COLORS[i % len(COLORS)]
        for t, v in pts:
            x = left + int((right - left) * min(t, t_max) / t_max)
            y = bottom - int((bottom - top) * min(v, y_max) / y_max)
            img[max(top, y - 1):y + 1, max(left + 1, x - 1):x + 1] = color


def write_png(path, img: np.ndarray) -> None:
    """img: (h, w, 3) uint8."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def figure(panels: list[dict], path, width: int = 900, panel_h: int = 220) -> None:
    """panels: [{"title", "series": [[(t, ms), ...], ...], "marks": [t...]}] on one time and
    latency scale, stacked."""
    t_max = max([t for p in panels for s in p["series"] for t, _ in s] + [1.0])
    y_all = [v for p in panels for s in p["series"] for _, v in s]
    y_max = max(10.0, float(np.percentile(y_all, 99)) * 1.2 if y_all else 10.0)
    img = np.full((panel_h * len(panels) + 20, width, 3), 255, np.uint8)
    for i, p in enumerate(panels):
        panel(img, 5 + i * panel_h, panel_h - 5, p["title"], p["series"], t_max, y_max,
              p.get("marks", []))
    text(img, 5, img.shape[0] - 10, "TIME (S) - LATENCY (MS) OF EACH CONNECTION - "
         "GREY LINE: R1 KILLED")
    write_png(path, img)


def _line(img, x0: int, y0: int, x1: int, y1: int, color) -> None:
    n = max(abs(x1 - x0), abs(y1 - y0), 1)
    for i in range(n + 1):
        img[y0 + (y1 - y0) * i // n, x0 + (x1 - x0) * i // n] = color


def chart(panels: list[dict], path, width: int = 900, panel_h: int = 240) -> None:
    """Line charts over categories, for the evaluation's figures. panels: [{"title", "x":
    [labels], "y": "unit", "series": [{"name", "values": [number or None per label]}]}],
    stacked; each panel has its own y scale (0..max) and a legend under its title."""
    img = np.full((panel_h * len(panels) + 10, width, 3), 255, np.uint8)
    for i, p in enumerate(panels):
        top = 5 + i * panel_h
        left, right, bottom = 60, width - 20, top + panel_h - 20
        ok = lambda v: v is not None and v == v  # (None or NaN: no point)
        vals = [v for s in p["series"] for v in s["values"] if ok(v)]
        y_max = max(vals) * 1.15 if vals and max(vals) > 0 else 1.0
        img[top + 24:bottom, left] = 0
        img[bottom, left:right] = 0
        for k in range(1, 5):
            y = bottom - (bottom - top - 24) * k // 4
            img[y, left + 1:right:3] = (200, 200, 200)
            v = y_max * k / 4
            text(img, 2, y - 3, f"{v:.0f}" if v >= 10 else f"{v:.1f}")
        n = len(p["x"])
        pad = 20 + 3 * max(len(str(label)) for label in p["x"])  # (room for the labels)
        xs = [left + pad + (right - left - 2 * pad) * j // max(1, n - 1) for j in range(n)]
        for x, label in zip(xs, p["x"]):
            img[bottom:bottom + 3, x] = 0
            text(img, x - 3 * len(str(label)), bottom + 6, str(label))
        text(img, left + 8, top + 2, f"{p['title']} ({p.get('y', '')})")
        lx = left + 8
        for j, s in enumerate(p["series"]):
            color = COLORS[j % len(COLORS)]
            img[top + 15:top + 19, lx:lx + 10] = color
            text(img, lx + 13, top + 13, s["name"], color)
            lx += 13 + 6 * len(s["name"]) + 14
            pts = [(x, bottom - int((bottom - top - 24) * min(v, y_max) / y_max))
                   for x, v in zip(xs, s["values"]) if ok(v)]
            for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
                _line(img, x0, y0, x1, y1, color)
            for x, y in pts:
                img[max(top, y - 2):y + 3, x - 2:x + 3] = color
    write_png(path, img)
