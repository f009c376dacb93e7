"""The gain-against-cost picture: one point per view and per member, seconds (from the
manifest) across, gain (NLL, positive helps) up. Drawn in numpy and written by a
dependency-free PNG encoder (zlib + struct); labels are drawn with Pillow's default font
when Pillow is installed (it comes with torchvision, a dependency of the package, but
re-blending machines need not have it: the picture is then drawn without text).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

W, H, MARGIN = 720, 480, 60
COLOURS = {"view": (31, 119, 180), "member": (230, 120, 20)}
SIZES = {"view": 3, "member": 6}


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` ``[H, W, 3]`` uint8."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def draw(points: Sequence[tuple[str, str, float, float]], title: str) -> np.ndarray:
    """The picture ``[H, W, 3]`` of (kind, label, seconds, gain) points (NaN gains left out)."""
    img = np.full((H, W, 3), 255, dtype=np.uint8)
    pts = [p for p in points if math.isfinite(p[2]) and math.isfinite(p[3])]
    xs = [p[2] for p in pts] or [0.0]
    ys = [p[3] for p in pts] or [0.0]
    x_hi = max(max(xs) * 1.08, 1e-9)
    y_lo, y_hi = min(min(ys), 0.0), max(max(ys), 0.0)
    pad = (y_hi - y_lo) * 0.08 or 1e-3
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def at(x: float, y: float) -> tuple[int, int]:
        px = MARGIN + int((x / x_hi) * (W - 2 * MARGIN))
        py = H - MARGIN - int((y - y_lo) / (y_hi - y_lo) * (H - 2 * MARGIN))
        return px, py

    img[H - MARGIN, MARGIN : W - MARGIN] = 0  # axes
    img[MARGIN : H - MARGIN, MARGIN] = 0
    zero = at(0.0, 0.0)[1]
    img[zero, MARGIN : W - MARGIN : 3] = 150  # the zero-gain line, dotted
    labels = []
    for kind, label, x, y in pts:
        px, py = at(x, y)
        r = SIZES[kind]
        img[max(py - r, 0) : py + r + 1, max(px - r, 0) : px + r + 1] = COLOURS[kind]
        labels.append((px + r + 2, py - 6, label, COLOURS[kind]))
    ticks = [
        (MARGIN - 4, H - MARGIN + 6, "0 s"),
        (W - MARGIN - 40, H - MARGIN + 6, f"{x_hi:.3g} s"),
        (4, at(0, y_hi)[1], f"{y_hi:+.3g}"),
        (4, at(0, y_lo)[1] - 10, f"{y_lo:+.3g}"),
        (4, zero - 6, "0"),
    ]
    texts = (
        [(x, y, t, (0, 0, 0)) for x, y, t in ticks]
        + labels
        + [(MARGIN, 16, title, (0, 0, 0)), (W - MARGIN - 200, 16, "blue: views, orange: members", (90, 90, 90))]
    )
    return _text(img, texts)


def _text(img: np.ndarray, texts: list[tuple[int, int, str, tuple[int, int, int]]]) -> np.ndarray:
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return img
    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    for x, y, t, colour in texts:
        d.text((x, y), t, fill=colour)
    return np.asarray(pil)


def write_picture(path: Path, points: Sequence[tuple[str, str, float, float]], title: str) -> Path:
    from kaggle_tta.tuning.report import write_text

    return write_text(path, png_bytes(draw(points, title)), "--picture")
