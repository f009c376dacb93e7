"""Pure ops on batches, named ``<target>_<op>``.

Images and masks are tensors ``[..., H, W]`` (the last two axes are spatial); boxes are numpy
arrays ``[N, 4]`` of normalized ``x_min, y_min, x_max, y_max``. Inputs are never mutated and
empty box arrays pass through. Rotations follow ``np.rot90`` (counter-clockwise), as
albumentations' ``D4`` does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kaggle_tta.ops.geometry import crop_box, floor

# ---- permutations: exact, bit for bit ------------------------------------------------------


def image_hflip(x: Tensor) -> Tensor:
    return x.flip(-1)


def image_vflip(x: Tensor) -> Tensor:
    return x.flip(-2)


def image_rot90(x: Tensor, k: int) -> Tensor:
    """Rotates by k quarter turns counter-clockwise (``np.rot90`` on the H, W axes)."""
    return torch.rot90(x, k % 4, dims=(-2, -1))


def image_transpose(x: Tensor) -> Tensor:
    return x.transpose(-2, -1)


# Masks are spatial maps: the same permutations apply.
mask_hflip = image_hflip
mask_vflip = image_vflip
mask_rot90 = image_rot90
mask_transpose = image_transpose


def boxes_hflip(b: np.ndarray) -> np.ndarray:
    out = b.copy()
    out[:, 0], out[:, 2] = 1.0 - b[:, 2], 1.0 - b[:, 0]
    return out


def boxes_vflip(b: np.ndarray) -> np.ndarray:
    out = b.copy()
    out[:, 1], out[:, 3] = 1.0 - b[:, 3], 1.0 - b[:, 1]
    return out


def boxes_transpose(b: np.ndarray) -> np.ndarray:
    return b[:, [1, 0, 3, 2]].copy()


def boxes_rot90(b: np.ndarray, k: int) -> np.ndarray:
    """Counter-clockwise quarter turns: a point (x, y) goes to (y, 1 - x)."""
    out = b.copy()
    for _ in range(k % 4):
        out = np.stack([out[:, 1], 1.0 - out[:, 2], out[:, 3], 1.0 - out[:, 0]], axis=1) if len(out) else out
    return out


# ---- crops and resizes ---------------------------------------------------------------------


def crop_origin(size: tuple[int, int], crop: tuple[int, int], position: str) -> tuple[int, int]:
    """Top-left corner (y, x) of a ``crop``-sized window at ``position`` in an image of ``size``.

    Positions: tl, tr, bl, br and center (rounded down, as the reference five-crop code and
    albumentations' CenterCrop do): :func:`crop_box`, the loader's own rule too.
    """

    (h, w), (ch, cw) = size, crop
    if ch > h or cw > w:
        raise ValueError(f"crop {ch}x{cw} is larger than the image {h}x{w}")
    return crop_box(size, crop, position, floor)


def image_crop(x: Tensor, top: int, left: int, height: int, width: int) -> Tensor:
    return x[..., top : top + height, left : left + width]


def mask_paste(m: Tensor, top: int, left: int, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Inverse of a crop on a map: the map placed into a zero canvas of ``size``, and the
    coverage (1 where the crop lies) so that overlapping crops can be averaged."""
    canvas = m.new_zeros((*m.shape[:-2], *size))
    cover = m.new_zeros((1,) * (m.dim() - 2) + tuple(size))
    h, w = m.shape[-2:]
    canvas[..., top : top + h, left : left + w] = m
    cover[..., top : top + h, left : left + w] = 1
    return canvas, cover


def scaled_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """The size a scale view produces: each side rounded, at least 1 px."""
    return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))


def image_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``[B, C, H, W]`` (antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def mask_resize(m: Tensor, size: tuple[int, int]) -> Tensor:
    """Resizes a logit/probability map back to a recorded size (bilinear)."""
    return image_resize(m, size)


def boxes_scale(b: np.ndarray) -> np.ndarray:
    """Normalized boxes are unchanged by a resize of the whole image."""
    return b.copy()


# ---- colour (pixel values in [0, 1]; as albumentations computes on float images) -------------


def image_brightness_contrast(x: Tensor, brightness: float, contrast: float) -> Tensor:
    """``clip(x * (1 + contrast) + brightness, 0, 1)``: RandomBrightnessContrast with
    brightness_by_max, at fixed limits."""
    return (x * (1.0 + contrast) + brightness).clamp_(0.0, 1.0)


def image_gamma(x: Tensor, gamma: float) -> Tensor:
    """``x ** gamma`` on [0, 1] pixels, as RandomGamma."""
    return x.clamp(min=0.0).pow(gamma)


def image_denormalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return x * std + mean


def image_normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x - mean) / std
