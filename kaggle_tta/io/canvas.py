"""How a member's input is cut from the decoded image, in the loader workers.

A classification member's views start from one of five crops of the resized image, each of
the model's input size: the centre and the four corners (``crop_tl`` ...), so a crop view
sees exactly the reference five-crop's pixels and batches stay rectangular. The loader
makes, per canvas group, the crops its views need, ``[P, h, w, 3]`` uint8 per image; views
then flip, rotate, scale and colour them on the device. Two backends make them:

- ``timm``: timm's own eval transform (``timm.data.create_transform(..., is_training=False)``
  without its tensor conversion and normalization): PIL's resize, which antialiases when
  it shrinks, timm's resize rule (shortest side to ``floor(size / crop_pct)``, or its
  keep-ratio resize for a non-square input) and torchvision's centre-crop rounding (half to
  even). Corners are cut from the same resized image.
- ``albumentations``: the reference document's OpenCV path, ``SmallestMaxSize(floor(size /
  crop_pct))`` (``Resize`` to both sides for a non-square input) and crops of the resized
  image, the centre rounded down as albumentations' ``CenterCrop`` does. OpenCV does not
  antialias when it shrinks.

Segmentation and detection canvases are a plain OpenCV resize to the working size (or the
image as decoded), so that maps and boxes map back to the image exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kaggle_tta.ops.geometry import crop_box, floor

POSITIONS = ("center", "tl", "tr", "bl", "br")  # the order crops are stacked in
_CV2_INTERPOLATION = {
    "nearest": "INTER_NEAREST",
    "bilinear": "INTER_LINEAR",
    "bicubic": "INTER_CUBIC",
    "area": "INTER_AREA",
    "lanczos": "INTER_LANCZOS4",
}
_TIMM_INTERPOLATION = {
    "nearest": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "area": "box",
    "lanczos": "lanczos",
}


@dataclass(frozen=True)
class CanvasSpec:
    """How a member's canvas is made from the decoded image; equal specs share one canvas."""

    size: tuple[int, int]  # the model input (H, W); (0, 0) with mode 'native'
    crop_pct: float
    interpolation: str
    albumentations: str | None = None  # JSON of A.to_dict, when the user gives a pipeline
    mode: str = "resize"  # resize: to `size`; native: as decoded; crop: the crops at `positions` (classification);
    # window: none (the task reads the image's windows itself, io.windows)
    backend: str = "albumentations"  # crop mode: timm | albumentations (module docstring)
    positions: tuple[str, ...] = ("center",)  # crop mode: which crops, in POSITIONS order

    @property
    def canvas_size(self) -> tuple[int, int]:
        """The resized image's side(s) before cropping: ``floor(size / crop_pct)``."""
        return tuple(int(math.floor(s / self.crop_pct)) for s in self.size)  # type: ignore[return-value]

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def stacked(self) -> bool:
        """Whether each image gives ``[P, h, w, 3]`` crops (else one ``[h, w, 3]`` canvas)."""
        return self.mode == "crop" and self.albumentations is None

    def build(self) -> Callable[[np.ndarray], np.ndarray]:
        """The function from a decoded RGB uint8 image to this canvas (built in each worker)."""
        import albumentations as A

        if self.albumentations is not None:
            t = A.from_dict(json.loads(self.albumentations))
            return lambda img: t(image=img)["image"]
        if self.mode == "native":
            return lambda img: img
        if self.mode == "resize":  # maps and boxes need the whole image: no crop
            t = A.Resize(*self.size, interpolation=_cv2_flag(self.interpolation))
            return lambda img: t(image=img)["image"]
        return _timm_crops(self) if self.backend == "timm" else _albumentations_crops(self)


def _cv2_flag(interpolation: str) -> int:
    import cv2

    return getattr(cv2, _CV2_INTERPOLATION[interpolation])


def _stack(resized: np.ndarray, spec: CanvasSpec, rounding: Callable[[float], int]) -> np.ndarray:
    ch, cw = spec.size
    h, w = resized.shape[:2]
    if ch > h or cw > w:  # crop_pct > 1 (timm pads there; we do not)
        raise ValueError(f"crop {ch}x{cw} is larger than the resized image {h}x{w}; use crop_pct <= 1")
    out = np.empty((len(spec.positions), ch, cw, resized.shape[2]), resized.dtype)  # uint8, or a window's float32
    for k, pos in enumerate(spec.positions):
        top, left = crop_box((h, w), (ch, cw), pos, rounding)
        out[k] = resized[top : top + ch, left : left + cw]
    return out


def _albumentations_crops(spec: CanvasSpec) -> Callable[[np.ndarray], np.ndarray]:
    import albumentations as A

    sh, sw = spec.canvas_size
    flag = _cv2_flag(spec.interpolation)
    resize = (
        A.SmallestMaxSize(max_size=sh, interpolation=flag)
        if spec.size[0] == spec.size[1]
        else A.Resize(sh, sw, interpolation=flag)
    )
    return lambda img: _stack(resize(image=img)["image"], spec, floor)


def _timm_crops(spec: CanvasSpec) -> Callable[[np.ndarray], np.ndarray]:
    from PIL import Image
    from timm.data import create_transform

    t = create_transform(
        input_size=(3, *spec.size),
        crop_pct=spec.crop_pct,
        interpolation=_TIMM_INTERPOLATION[spec.interpolation],
        is_training=False,
    )
    resize = t.transforms[0]  # timm's Resize / ResizeKeepRatio, on a PIL image

    def crops(img: np.ndarray) -> np.ndarray:
        resized = np.asarray(resize(Image.fromarray(img)))
        return _stack(resized, spec, lambda d: int(round(d)))  # torchvision's center_crop: round half to even

    return crops
