"""A tiny pure-Python scatter plot written as a PNG (no plotting library needed).

`scatter_png()` draws labelled points and optional connected series on linear axes with a
3x5 pixel font, and writes an RGB PNG with zlib. Good enough for a cost-accuracy curve.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_GLYPHS = {
    "0": "111101101101111",
    "1": "010110010010111",
    "2": "111001111100111",
    "3": "111001111001111",
    "4": "101101111001001",
    "5": "111100111001111",
    "6": "111100111101111",
    "7": "111001010010010",
    "8": "111101111101111",
    "9": "111101111001111",
    "A": "010101111101101",
    "B": "110101110101110",
    "C": "011100100100011",
    "D": "110101101101110",
    "E": "111100110100111",
    "F": "111100110100100",
    "G": "011100101101011",
    "H": "101101111101101",
    "I": "111010010010111",
    "J": "001001001101010",
    "K": "101101110101101",
    "L": "100100100100111",
    "M": "101111111101101",
    "N": "110101101101101",
    "O": "010101101101010",
    "P": "110101110100100",
    "Q": "010101101110011",
    "R": "110101110101101",
    "S": "011100010001110",
    "T": "111010010010010",
    "U": "101101101101111",
    "V": "101101101101010",
    "W": "101101111111101",
    "X": "101101010101101",
    "Y": "101101010010010",
    "Z": "111001010100111",
    "-": "000000111000000",
    ".": "000000000000010",
    ":": "000010000010000",
    "%": "101001010100101",
    "$": "011110010011110",
    "/": "001001010100100",
    "(": "010100100100010",
    ")": "010001001001010",
    "=": "000111000111000",
    "+": "000010111010000",
    "_": "000000000000111",
    " ": "000000000000000",
}
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 0),
    (255, 0, 255),
    (0, 128, 128),
    (128, 128, 0),
]


@dataclass
class Point:
    x: float
    y: float
    label: str = ""
    color: int = 0


@dataclass
class Canvas:
    width: int
    height: int
    pixels: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self.pixels = bytearray(b"\xff" * (self.width * self.height * 3))

    def set(self, x: int, y: int, rgb: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i : i + 3] = bytes(rgb)

    def line(self, x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.set(x0, y0, rgb)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def dot(self, x: int, y: int, rgb: tuple[int, int, int], r: int = 4) -> None:
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if dx * dx + dy * dy <= r * r:
                    self.set(x + dx, y + dy, rgb)

    def text(
        self, x: int, y: int, text: str, rgb: tuple[int, int, int] = (0, 0, 0), scale: int = 2
    ) -> None:
        for n, ch in enumerate(text.upper()):
            glyph = _GLYPHS.get(ch, _GLYPHS[" "])
            for bit, on in enumerate(glyph):
                if on == "1":
                    gx, gy = bit % 3, bit // 3
                    for sy in range(scale):
                        for sx in range(scale):
                            self.set(x + n * 4 * scale + gx * scale + sx, y + gy * scale + sy, rgb)

    def png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.pixels[y * self.width * 3 : (y + 1) * self.width * 3])
            for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def scatter_png(
    path: str | Path,
    points: Sequence[Point],
    *,
    series: Sequence[Sequence[Point]] = (),
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    size: tuple[int, int] = (900, 600),
) -> Path:
    """Write a labelled scatter plot (plus connected `series`) to `path` as a PNG."""
    width, height = size
    left, right, top, bottom = 80, 240, 50, 60
    canvas = Canvas(width, height)
    every = [*points, *(p for s in series for p in s)]
    xs, ys = [p.x for p in every] or [0.0, 1.0], [p.y for p in every] or [0.0, 1.0]
    x0, x1 = 0.0, max(xs) * 1.08 or 1.0
    y0, y1 = min(ys) - 0.02, max(ys) + 0.02
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def px(x: float, y: float) -> tuple[int, int]:
        fx = left + (x - x0) / (x1 - x0) * (width - left - right)
        fy = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return round(fx), round(fy)

    grey, black = (200, 200, 200), (0, 0, 0)
    for i in range(6):
        gx = x0 + (x1 - x0) * i / 5
        gy = y0 + (y1 - y0) * i / 5
        ax, _ = px(gx, y0)
        _, ay = px(x0, gy)
        canvas.line(ax, top, ax, height - bottom, grey)
        canvas.line(left, ay, width - right, ay, grey)
        canvas.text(ax - 12, height - bottom + 8, f"{gx:.3g}")
        canvas.text(8, ay - 5, f"{gy:.3g}")
    canvas.line(left, height - bottom, width - right, height - bottom, black)
    canvas.line(left, top, left, height - bottom, black)
    canvas.text(left, 14, title, scale=3)
    canvas.text((width - right) // 2 - 40, height - 24, x_label)
    canvas.text(8, top - 20, y_label)
    for line in series:
        for a, b in itertools.pairwise(line):
            canvas.line(*px(a.x, a.y), *px(b.x, b.y), PALETTE[a.color % len(PALETTE)])
    legend_y = top
    for p in points:
        rgb = PALETTE[p.color % len(PALETTE)]
        canvas.dot(*px(p.x, p.y), rgb)
        if p.label:
            canvas.dot(width - right + 16, legend_y + 5, rgb, r=4)
            canvas.text(width - right + 26, legend_y, p.label[:26])
            legend_y += 16
    path = Path(path)
    path.write_bytes(canvas.png())
    return path
