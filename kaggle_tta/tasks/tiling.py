"""Sliding-window geometry: where tiles go and how much each tile pixel counts.

Pure numpy; the engine cuts, predicts and stitches on the device with what these return.
"""

from __future__ import annotations

import math

import numpy as np


def tile_origins(size: tuple[int, int], tile: tuple[int, int], overlap: float) -> list[tuple[int, int]]:
    """Top-left corners of tiles covering an image of ``size``.

    Tiles step by ``tile * (1 - overlap)`` (at least one pixel) and the last tile of a row or
    column is pushed back to end exactly at the border, so every tile lies inside the image
    and every pixel is covered. A side no longer than the tile is one tile.

    Args:
        size: ``(H, W)`` of the image.
        tile: ``(h, w)`` of a tile; clipped to the image.
        overlap: fraction of a tile shared with its neighbour, in ``[0, 1)``.
    """
    return [
        (top, left)
        for top in _starts(size[0], min(tile[0], size[0]), overlap)
        for left in _starts(size[1], min(tile[1], size[1]), overlap)
    ]


def _starts(n: int, t: int, overlap: float) -> list[int]:
    if n <= t:
        return [0]
    step = max(1, int(t * (1.0 - overlap)))
    count = math.ceil((n - t) / step) + 1
    starts = [min(k * step, n - t) for k in range(count)]
    return sorted(set(starts))


def tile_weight(tile: tuple[int, int], kind: str, sigma: float = 0.125) -> np.ndarray:
    """``[h, w]`` float32 weights of a tile's pixels: all ones (``uniform``), or a gaussian
    centred on the tile with standard deviation ``sigma * side`` (``gaussian``), scaled to a
    maximum of 1 and floored at 1e-3 so that border pixels covered by one tile only still
    count."""
    h, w = tile
    if kind == "uniform":
        return np.ones((h, w), np.float32)
    ys = (np.arange(h, dtype=np.float64) - (h - 1) / 2.0) / max(sigma * h, 1e-6)
    xs = (np.arange(w, dtype=np.float64) - (w - 1) / 2.0) / max(sigma * w, 1e-6)
    g = np.exp(-0.5 * ys[:, None] ** 2) * np.exp(-0.5 * xs[None, :] ** 2)
    g /= g.max()
    return np.maximum(g, 1e-3).astype(np.float32)
