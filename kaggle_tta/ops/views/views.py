"""View objects: a deterministic transform of a batch with an exact inverse per target.

A view is a chain of atomic ops. Its name is canonical and parses back to the same chain
(``crop_tl+hflip``, ``scale_1.25``), so the name alone identifies the math: it is the cache
file name and what a user lists to re-blend a subset of views.

Views act on the member's *canvas*: the decoded image resized so its shortest side is
``floor(size / crop_pct)`` and centre-cropped square (see data.py). Bound to a member's input
size, a chain starts with a crop to that size (the centre, unless the name put a corner crop
first); bound to None it sees the whole canvas.

Every op owns what the parser and the planner need to know about it: its name, the targets it
can invert and the fix to print for the others; a parametric op (``scale_1.25``) also owns its
name prefix, its YAML mapping keys, its legal range and the value that is no op, and is
registered with :func:`register_op`, so that adding one is one class.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, cast

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


class _Functional:
    """The tensor ops, imported on first use: parsing view names (re-blending from the cache)
    then never imports torch."""

    def __getattr__(self, name: str):
        return getattr(importlib.import_module("kaggle_tta.ops.views.functional"), name)


Fn = _Functional()

ALL_TARGETS = frozenset({"label", "mask", "boxes"})
Size = tuple[int, int]


@dataclass(frozen=True)
class Op:
    """One atomic transform. Subclasses implement the image map and each inverse.

    Inverses take the op's *input* size ``(H, W)``: an op that changes the size is inverted by
    the recorded size, never by inverting its parameter.

    Attributes:
        targets: The targets the op can invert.
        spatial: Whether it moves pixels (colour ops do not).
        leads: Non-empty when the op must come first in a chain; the noun for the error
            (``a crop must come first``).
        hint: The fix to print when a member's target is not in ``targets``.
    """

    targets: ClassVar[frozenset[str]] = ALL_TARGETS
    spatial: ClassVar[bool] = True
    leads: ClassVar[str] = ""
    hint: ClassVar[str] = "drop it from the list"

    @property
    def name(self) -> str:
        raise NotImplementedError

    def bind(self, input_size: Size | None, mean: tuple[float, ...], std: tuple[float, ...]) -> Op:
        """The op for one member; most ops need nothing of it."""
        return self

    def apply(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def out_size(self, size: Size) -> Size:
        return size

    def invert_mask(self, m: Tensor, size: Size) -> Tensor:
        raise NotImplementedError

    def invert_boxes(self, b: np.ndarray, size: Size) -> np.ndarray:
        raise NotImplementedError


# ---- permutations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HFlip(Op):
    name = "hflip"

    def apply(self, x: Tensor) -> Tensor:
        return Fn.image_hflip(x)

    def invert_mask(self, m: Tensor, size: Size) -> Tensor:
        return Fn.mask_hflip(m)

    def invert_boxes(self, b: np.ndarray, size: Size) -> np.ndarray:
        return Fn.boxes_hflip(b)


@dataclass(frozen=True)
class VFlip(Op):
    name = "vflip"

    def apply(self, x: Tensor) -> Tensor:
        return Fn.image_vflip(x)

    def invert_mask(self, m: Tensor, size: Size) -> Tensor:
        return Fn.mask_vflip(m)

    def invert_boxes(self, b: np.ndarray, size: Size) -> np.ndarray:
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

    def invert_mask(self, m: Tensor, size: Size) -> Tensor:
        return Fn.mask_rot90(m, -self.k)

    def invert_boxes(self, b: np.ndarray, size: Size) -> np.ndarray:
        return Fn.boxes_rot90(b, -self.k)


@dataclass(frozen=True)
class Transpose(Op):
    name = "transpose"

    def apply(self, x: Tensor) -> Tensor:
        return Fn.image_transpose(x)

    def out_size(self, size: Size) -> Size:
        return size[1], size[0]

    def invert_mask(self, m: Tensor, size: Size) -> Tensor:
        return Fn.mask_transpose(m)

    def invert_boxes(self, b: np.ndarray, size: Size) -> np.ndarray:
        return Fn.boxes_transpose(b)


# ---- crops -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crop(Op):
    """A corner window of the canvas at the member's input size (bound later; None: the whole
    canvas). Labels are unchanged; a single crop cannot restore a full map or every box, so
    masks and boxes need tiling instead."""

    position: str = "tl"
    size: Size | None = None
    targets = frozenset({"label"})
    leads = "a crop"
    hint = "crops are legal for maps only through tiling (members.<name>.tiling)"

    @property
    def name(self) -> str:
        return f"crop_{self.position}"

    def bind(self, input_size: Size | None, mean: tuple[float, ...], std: tuple[float, ...]) -> Crop:
        return dataclasses.replace(self, size=cast(Size, tuple(input_size)) if input_size else None)

    def apply(self, x: Tensor) -> Tensor:
        size = self.size or tuple(x.shape[-2:])
        top, left = Fn.crop_origin(tuple(x.shape[-2:]), size, self.position)
        return Fn.image_crop(x, top, left, *size)

    def out_size(self, size: Size) -> Size:
        return self.size or size

    def invert_mask(self, m: Tensor, size: Size) -> Tensor:
        if tuple(size) == tuple(m.shape[-2:]):
            return m  # the crop was the whole canvas
        raise NotImplementedError("crops invert on maps only through tiling")

    def invert_boxes(self, b: np.ndarray, size: Size) -> np.ndarray:
        if self.size is None or tuple(size) == tuple(self.size):
            return b.copy()  # the crop was the whole canvas
        raise NotImplementedError("crops invert on boxes only through tiling")


@dataclass(frozen=True)
class CentreCrop(Crop):
    """The centre window: how a classification canvas becomes the model input, so it is the
    whole of the ``identity`` view (hence its name) and no TTA transform (not spatial).

    Segmentation and detection canvases are the input size, where the crop is the whole canvas
    and inverts exactly; so it declares every target, and its inverses refuse the rest."""

    position: str = "center"
    targets = ALL_TARGETS
    spatial = False
    name = "identity"


# ---- parametric ops: one number in the name ------------------------------------------------------


@dataclass(frozen=True)
class Parametric(Op):
    """An op with one number in its name (``scale_1.25``).

    Attributes:
        value: The op's number.
        prefix: The name before the number (``scale``).
        keys: The YAML mapping keys that list several values (``{scales: [0.8, 1.25]}``).
        identity: The value that is no op: its name parses to no op at all.
        example: A legal value, for the did-you-mean list of an unknown name.
    """

    value: float
    prefix: ClassVar[str]
    keys: ClassVar[tuple[str, ...]]
    identity: ClassVar[float]
    example: ClassVar[float]
    open_range: ClassVar[tuple[float, float] | None] = None  # legal values lie strictly inside

    @property
    def name(self) -> str:
        return f"{self.prefix}_{self.value:g}"

    @classmethod
    def validate(cls, value: float) -> None:
        """Raises ValueError saying why ``value`` is not legal (the parser prefixes the name);
        by default, that it lies outside ``open_range``."""
        if cls.open_range is not None and not cls.open_range[0] < value < cls.open_range[1]:
            raise ValueError(f"{cls.prefix} must lie in ({cls.open_range[0]:g}, {cls.open_range[1]:g})")


PARAMETRIC: dict[str, type[Parametric]] = {}


def register_op(cls: type[Parametric]) -> type[Parametric]:
    """Class decorator: makes a parametric op parseable by its prefix and mapping keys.

    Raises:
        ValueError: the prefix or a key is already taken by another op.
    """
    taken = {p: c for c in PARAMETRIC.values() for p in (c.prefix, *c.keys)}
    for word in {cls.prefix, *cls.keys}:
        if taken.get(word, cls) is not cls:
            raise ValueError(f"{cls.__name__}: '{word}' already names {taken[word].__name__}")
    PARAMETRIC[cls.prefix] = cls
    return cls


@register_op
@dataclass(frozen=True)
class Scale(Parametric):
    """Resizes the model input by ``value``; inverted by the recorded size, never by 1/value."""

    prefix = "scale"
    keys = ("scales", "scale")
    identity = 1.0
    example = 1.25

    @classmethod
    def validate(cls, value: float) -> None:
        if not 0.05 <= value <= 8:
            raise ValueError("scale factors must lie in [0.05, 8]")

    def apply(self, x: Tensor) -> Tensor:
        return Fn.image_resize(x, Fn.scaled_size(tuple(x.shape[-2:]), self.value))

    def out_size(self, size: Size) -> Size:
        return Fn.scaled_size(size, self.value)

    def invert_mask(self, m: Tensor, size: Size) -> Tensor:
        return Fn.mask_resize(m, size)

    def invert_boxes(self, b: np.ndarray, size: Size) -> np.ndarray:
        return Fn.boxes_scale(b)


@dataclass(frozen=True)
class Colour(Parametric):
    """Base of the colour ops. They work on normalized inputs: pixels are de-normalized with
    the member's mean/std (bound later), adjusted by :meth:`adjust`, normalized again.
    Predictions are not moved, so every inverse is the identity."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    spatial = False

    def adjust(self, px: Tensor) -> Tensor:
        """The adjustment on pixels in [0, 1]."""
        raise NotImplementedError

    def bind(self, input_size: Size | None, mean: tuple[float, ...], std: tuple[float, ...]) -> Colour:
        return dataclasses.replace(self, mean=tuple(mean), std=tuple(std))

    def apply(self, x: Tensor) -> Tensor:
        import torch

        if self.mean is None or self.std is None:
            raise RuntimeError(f"view {self.name} was not bound to a member's mean/std")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return Fn.image_normalize(self.adjust(Fn.image_denormalize(x, mean, std)), mean, std)

    def invert_mask(self, m: Tensor, size: Size) -> Tensor:
        return m

    def invert_boxes(self, b: np.ndarray, size: Size) -> np.ndarray:
        return b.copy()


@register_op
@dataclass(frozen=True)
class Brightness(Colour):
    """Adds ``value`` to [0, 1] pixels, as RandomBrightnessContrast at a fixed limit."""

    prefix = "brightness"
    keys = ("brightness",)
    identity = 0.0
    example = 0.1
    open_range = (-1.0, 1.0)

    def adjust(self, px: Tensor) -> Tensor:
        return Fn.image_brightness_contrast(px, self.value, 0.0)


@register_op
@dataclass(frozen=True)
class Contrast(Colour):
    """Multiplies [0, 1] pixels by ``1 + value``, as RandomBrightnessContrast at a fixed limit."""

    prefix = "contrast"
    keys = ("contrast",)
    identity = 0.0
    example = 0.1
    open_range = (-1.0, 1.0)

    def adjust(self, px: Tensor) -> Tensor:
        return Fn.image_brightness_contrast(px, 0.0, self.value)


@register_op
@dataclass(frozen=True)
class Gamma(Colour):
    """Raises [0, 1] pixels to the power ``value``, as RandomGamma at a fixed limit."""

    prefix = "gamma"
    keys = ("gamma",)
    identity = 1.0
    example = 0.9

    @classmethod
    def validate(cls, value: float) -> None:
        if not value > 0:
            raise ValueError("gamma must be positive")

    def adjust(self, px: Tensor) -> Tensor:
        return Fn.image_gamma(px, self.value)


# ---- the view --------------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """A named chain of ops, applied in order and inverted in reverse."""

    name: str
    ops: tuple[Op, ...] = ()

    @property
    def targets(self) -> frozenset[str]:
        """The targets every op of the chain can invert."""
        t = ALL_TARGETS
        for op in self.ops:
            t &= op.targets
        return t

    @property
    def is_spatial(self) -> bool:
        return any(op.spatial for op in self.ops)

    @property
    def position(self) -> str:
        """Where its crop of the resized image sits: center, or the corner it names."""
        return self.ops[0].position if self.ops and isinstance(self.ops[0], Crop) else "center"

    def hint(self, target: str) -> str:
        """The fix to print when this view cannot be inverted on ``target``: that of the first
        op that cannot; '' when the view can."""
        return next((op.hint for op in self.ops if target not in op.targets), "")

    def bind(self, input_size: Size | None, mean: tuple[float, ...], std: tuple[float, ...]) -> View:
        """The view for one member: crop at its input size (None: the whole canvas, as
        segmentation members see it), colour with its mean/std."""
        ops = tuple(op.bind(input_size, mean, std) for op in self.ops)
        if input_size is not None and not (ops and isinstance(ops[0], Crop)):
            # The canvas is larger than the model input (crop_pct): the centre is the input.
            ops = (CentreCrop(size=cast(Size, tuple(input_size))), *ops)
        return View(self.name, ops)

    def apply(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` canvas -> ``[B, C, H', W']`` model input."""
        x = images
        for op in self.ops:
            x = op.apply(x)
        return x

    def out_size(self, size: Size) -> Size:
        return self._sizes(size)[-1]

    def _sizes(self, size: Size) -> list[Size]:
        """The input size of each op, then the output size of the chain."""
        sizes = [cast(Size, tuple(size))]
        for op in self.ops:
            sizes.append(cast(Size, tuple(op.out_size(sizes[-1]))))
        return sizes

    def invert_mask(self, masks: Tensor, size: Size) -> Tensor:
        """Maps ``[B, K, h, w]`` predicted on the view back to the input of ``size``."""
        m = masks
        for op, in_size in zip(reversed(self.ops), reversed(self._sizes(size)[:-1])):
            m = op.invert_mask(m, in_size)
        return m

    def invert_boxes(self, boxes: np.ndarray, size: Size) -> np.ndarray:
        """Maps normalized xyxy boxes predicted on the view back to the input of ``size``."""
        # A copy: an empty chain must not hand the caller's array back to it.
        b = np.array(boxes, dtype=np.float64).reshape(-1, 4)
        for op, in_size in zip(reversed(self.ops), reversed(self._sizes(size)[:-1])):
            b = op.invert_boxes(b, in_size)
        return b
