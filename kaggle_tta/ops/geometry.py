"""Crop geometry shared by the loader's canvases and the crop views (no torch here: the
loader and re-blending import it)."""

from __future__ import annotations

import math
from collections.abc import Callable


def floor(d: float) -> int:
    """albumentations' (and the reference code's) centre rounding: down."""
    return int(math.floor(d))


def crop_box(
    size: tuple[int, int], crop: tuple[int, int], position: str, rounding: Callable[[float], int]
) -> tuple[int, int]:
    """Top-left (y, x) of a ``crop`` at ``position`` in an image of ``size``; the centre's
    half-difference goes through ``rounding`` (floor for albumentations, round half to even
    for torchvision)."""
    (h, w), (ch, cw) = size, crop
    return {
        "center": (rounding((h - ch) / 2.0), rounding((w - cw) / 2.0)),
        "tl": (0, 0),
        "tr": (0, w - cw),
        "bl": (h - ch, 0),
        "br": (h - ch, w - cw),
    }[position]
