"""View objects: a deterministic transform of a batch with an exact inverse per target.

A view is a chain of atomic ops. Its name is canonical and parses back to the same chain
(``crop_tl+hflip``, ``scale_1.25``), so the name alone identifies the math: it is the cache
file name and what a user lists to re-blend a subset of views.

Views act on the member's *canvas*: the decoded image resized so its shortest side is
``floor(size / crop_pct)`` and centre-cropped square (see data.py). A view starts with a crop
to the member's input size (the centre, unless it names a corner) and then applies its ops.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


class _Functional:
    """The tensor ops, imported on first use: parsing view names (re-blending from the cache)
    then never imports torch."""

    def __getattr__(self, name: str):
        return getattr(importlib.import_module("kaggle_tta.views.functional"), name)


Fn = _Functional()

ALL_TARGETS = frozenset({"label", "mask", "boxes"})
Size = tuple[int, int]


@dataclass(frozen=True)
class Op:
    """One atomic transform. Subclasses implement the image map and each inverse."""

    targets = ALL_TARGETS

    @property
    def name(self) -> str:
        raise NotImplementedError

    def apply(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def out_size(self, size: Size) -> Size:
        return size

    def invert_mask(self, m: Tensor, in_size: Size) -> Tensor:
        raise NotImplementedError

    def invert_boxes(self, b: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class HFlip(Op):
    name = "hflip"

    def apply(self, x: Tensor) -> Tensor:
        return Fn.image_hflip(x)

    def invert_mask(self, m: Tensor, in_size: Size) -> Tensor:
        return Fn.mask_hflip(m)

    def invert_boxes(self, b: np.ndarray) -> np.ndarray:
        return Fn.boxes_hflip(b)


@dataclass(frozen=True)
class VFlip(Op):
    name = "vflip"

    def apply(self, x: Tensor) -> Tensor:
        return Fn.image_vflip(x)

    def invert_mask(self, m: Tensor, in_size: Size) -> Tensor:
        return Fn.mask_vflip(m)

    def invert_boxes(self, b: np.ndarray) -> np.ndarray:
        return Fn.boxes_vflip(b)


@dataclass(frozen=True)
class Rot90(Op):
    k: int = 1

    @property
    def name(self) -> str:
        return f"rot{90 * self.k}"

    def apply(self, x: Tensor) -> Tensor:
        return Fn.image_rot90(x, self.k)

    def out_size(self, size: Size) -> Size:
        return size if self.k % 2 == 0 else (size[1], size[0])

    def invert_mask(self, m: Tensor, in_size: Size) -> Tensor:
        return Fn.mask_rot90(m, -self.k)

    def invert_boxes(self, b: np.ndarray) -> np.ndarray:
        return Fn.boxes_rot90(b, -self.k)


@dataclass(frozen=True)
class Transpose(Op):
    name = "transpose"

    def apply(self, x: Tensor) -> Tensor:
        return Fn.image_transpose(x)

    def out_size(self, size: Size) -> Size:
        return size[1], size[0]

    def invert_mask(self, m: Tensor, in_size: Size) -> Tensor:
        return Fn.mask_transpose(m)

    def invert_boxes(self, b: np.ndarray) -> np.ndarray:
        return Fn.boxes_transpose(b)


@dataclass(frozen=True)
class Scale(Op):
    """Resizes the model input by ``factor``; inverted by the recorded size, never by 1/factor."""

    factor: float = 1.0

    @property
    def name(self) -> str:
        return f"scale_{self.factor:g}"

    def apply(self, x: Tensor) -> Tensor:
        return Fn.image_resize(x, Fn.scaled_size(tuple(x.shape[-2:]), self.factor))

    def out_size(self, size: Size) -> Size:
        return Fn.scaled_size(size, self.factor)

    def invert_mask(self, m: Tensor, in_size: Size) -> Tensor:
        return Fn.mask_resize(m, in_size)

    def invert_boxes(self, b: np.ndarray) -> np.ndarray:
        return Fn.boxes_scale(b)


@dataclass(frozen=True)
class Colour(Op):
    """Brightness, contrast or gamma at a fixed value. Works on normalized inputs: pixels are
    de-normalized with the member's mean/std (bound later), adjusted, normalized again.
    Predictions are not moved, so every inverse is the identity."""

    kind: str = "brightness"
    value: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.value:g}"

    def apply(self, x: Tensor) -> Tensor:
        import torch

        if self.mean is None or self.std is None:
            raise RuntimeError(f"view {self.name} was not bound to a member's mean/std")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        px = Fn.image_denormalize(x, mean, std)
        if self.kind == "brightness":
            px = Fn.image_brightness_contrast(px, self.value, 0.0)
        elif self.kind == "contrast":
            px = Fn.image_brightness_contrast(px, 0.0, self.value)
        else:
            px = Fn.image_gamma(px, self.value)
        return Fn.image_normalize(px, mean, std)

    def invert_mask(self, m: Tensor, in_size: Size) -> Tensor:
        return m

    def invert_boxes(self, b: np.ndarray) -> np.ndarray:
        return b.copy()


@dataclass(frozen=True)
class Crop(Op):
    """A window of the canvas at the member's input size (bound later). Labels are unchanged;
    a single crop cannot restore a full map, so masks and boxes need tiling instead."""

    position: str = "center"
    size: Size | None = None
    targets = frozenset({"label"})

    @property
    def name(self) -> str:
        return "identity" if self.position == "center" else f"crop_{self.position}"

    def apply(self, x: Tensor) -> Tensor:
        size = self.size or tuple(x.shape[-2:])
        top, left = Fn.crop_origin(tuple(x.shape[-2:]), size, self.position)
        return Fn.image_crop(x, top, left, *size)

    def out_size(self, size: Size) -> Size:
        return self.size or size

    def invert_mask(self, m: Tensor, in_size: Size) -> Tensor:
        if tuple(in_size) == tuple(m.shape[-2:]):
            return m  # the crop was the whole canvas
        raise NotImplementedError("crops invert on maps only through tiling")

    def invert_boxes_at(self, b: np.ndarray, in_size: Size) -> np.ndarray:
        if self.size is None or tuple(in_size) == tuple(self.size):
            return b.copy()  # the crop was the whole canvas
        raise NotImplementedError("crops invert on boxes only through tiling")


@dataclass(frozen=True)
class View:
    """A named chain of ops, applied in order and inverted in reverse."""

    name: str
    ops: tuple[Op, ...] = ()
    crop: Crop = field(default_factory=Crop)

    @property
    def targets(self) -> frozenset[str]:
        t = frozenset(ALL_TARGETS)
        for op in self.ops:
            t &= op.targets
        if self.crop.position != "center":
            t &= self.crop.targets
        return t

    @property
    def is_spatial(self) -> bool:
        return any(not isinstance(op, Colour) for op in self.ops) or self.crop.position != "center"

    def bind(self, input_size: Size | None, mean: tuple[float, ...], std: tuple[float, ...]) -> View:
        """The view for one member: crop at its input size (None: the whole canvas, as
        segmentation members see it), colour with its mean/std."""
        ops = tuple(dataclasses.replace(op, mean=tuple(mean), std=tuple(std)) if isinstance(op, Colour) else op for op in self.ops)
        return View(self.name, ops, dataclasses.replace(self.crop, size=tuple(input_size) if input_size else None))

    def apply(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` canvas -> ``[B, C, H', W']`` model input."""
        x = self.crop.apply(images)
        for op in self.ops:
            x = op.apply(x)
        return x

    def out_size(self, size: Size) -> Size:
        sizes = self._sizes(size)
        return sizes[-1]

    def _sizes(self, size: Size) -> list[Size]:
        sizes = [tuple(self.crop.out_size(size))]
        for op in self.ops:
            sizes.append(tuple(op.out_size(sizes[-1])))
        return sizes

    def invert_mask(self, masks: Tensor, size: Size) -> Tensor:
        """Maps ``[B, K, h, w]`` predicted on the view back to the input of ``size``."""
        sizes = self._sizes(size)
        m = masks
        for op, in_size in zip(reversed(self.ops), reversed(sizes[:-1])):
            m = op.invert_mask(m, in_size)
        return self.crop.invert_mask(m, size)

    def invert_boxes(self, boxes: np.ndarray, size: Size) -> np.ndarray:
        """Maps normalized xyxy boxes predicted on the view back to the input."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        for op in reversed(self.ops):
            b = op.invert_boxes(b)
        return self.crop.invert_boxes_at(b, size)
