"""The embedded demo: synthetic scenes seen from above, generated deterministically.

Each scene is a textured ground with one large object (its class) and up to two small
distractors, at any position, size, colour and angle. Seen from above there is no
privileged orientation, so the D4 group is a symmetry of the data, as for satellite tiles.
One generator gives images, class labels, per-pixel masks and boxes, for every task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kaggle_tta.demo import DEMO_SIZE

CLASSES = ["circle", "square", "triangle", "cross"]


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3] RGB
    label: int  # class of the main object
    mask: np.ndarray  # uint8 [H, W]: 0 background, k + 1 for class k
    boxes: np.ndarray  # float32 [M, 4] pixel xyxy
    box_labels: np.ndarray  # int64 [M]


def _polygon(cls: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    if cls == 1:  # square
        pts: list[tuple[float, float]] = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        pts = [(x * r * 0.8, y * r * 0.8) for x, y in pts]
    elif cls == 2:  # triangle
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    else:  # cross: arms of half-width w
        w = r * 0.33
        pts = [
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
        ]
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[cx + x * c - y * s, cy + x * s + y * c] for x, y in pts], dtype=np.float32)


def _draw(
    img: np.ndarray, mask: np.ndarray, cls: int, cx: float, cy: float, r: float, angle: float, colour: tuple[int, ...]
) -> np.ndarray:
    """Draws one object (anti-aliased, 4x sub-pixel precision); returns its pixel xyxy box."""
    shift = 4
    layer = np.zeros(mask.shape, np.uint8)
    if cls == 0:
        center = (int(round(cx * 16)), int(round(cy * 16)))
        cv2.circle(img, center, int(round(r * 16)), colour, -1, cv2.LINE_AA, shift)
        cv2.circle(layer, center, int(round(r * 16)), 1, -1, cv2.LINE_8, shift)
    else:
        pts = np.round(_polygon(cls, cx, cy, r, angle) * 16).astype(np.int32)
        cv2.fillPoly(img, [pts], colour, cv2.LINE_AA, shift)
        cv2.fillPoly(layer, [pts], 1, cv2.LINE_8, shift)
    mask[layer > 0] = cls + 1
    ys, xs = np.nonzero(layer)
    if len(xs) == 0:
        return np.array([cx, cy, cx + 1, cy + 1], np.float32)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def make_scene(rng: np.random.Generator, size: int = 64) -> Scene:
    """One scene; the same generator state always gives the same scene."""
    h = w = size
    # Ground: a smooth random field plus pixel noise, in a random earthy tint.
    low = rng.normal(0.0, 1.0, (6, 6, 3)).astype(np.float32)
    field = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    tint = rng.uniform(70, 150, 3).astype(np.float32)
    img: np.ndarray = np.clip(tint + 25 * field + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    boxes, labels = [], []
    n_small = int(rng.integers(0, 3))
    for _ in range(n_small):  # distractors first, so the main object lies on top
        cls = int(rng.integers(0, len(CLASSES)))
        r = float(rng.uniform(0.05, 0.08) * size)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        boxes.append(_draw(img, mask, cls, cx, cy, r, float(rng.uniform(0, 2 * math.pi)), col))
        labels.append(cls)
    label = int(rng.integers(0, len(CLASSES)))
    r = float(rng.uniform(0.18, 0.32) * size)
    cx, cy = rng.uniform(r * 0.9, w - r * 0.9), rng.uniform(r * 0.9, h - r * 0.9)
    # Contrast against the ground varies from plain to faint.
    col = tuple(int(c) for c in np.clip(tint + rng.normal(0, 1, 3) * rng.uniform(60, 130), 0, 255))
    boxes.append(_draw(img, mask, label, cx, cy, r, float(rng.uniform(0, 2 * math.pi)), col))
    labels.append(label)
    # Sensor noise and blur make the task hard enough that views disagree.
    img = cv2.GaussianBlur(img, (3, 3), float(rng.uniform(0.3, 0.8)))
    img = np.clip(img.astype(np.float32) + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return Scene(img, label, mask, np.stack(boxes).astype(np.float32), np.array(labels, np.int64))


def make_split(n: int, seed: int, size: int = 64) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size) for _ in range(n)]


def _write_if_changed(path: Path, data: bytes) -> None:
    if not path.is_file() or path.read_bytes() != data:  # keep mtimes stable: the cache keys on them
        path.write_bytes(data)


def write_split(out: Path, n: int, seed: int, size: int = DEMO_SIZE) -> int:
    """Writes a test set to ``out``, idempotently: ``img_00000.png ...``, ``labels.csv``
    (id, label), the masks under ``../<name>_masks/`` (so a folder listing of ``out`` sees
    images only) and ``boxes.csv`` (id, x1, y1, x2, y2, label; pixel corners)."""
    import polars as pl

    out.mkdir(parents=True, exist_ok=True)
    masks = out.parent / f"{out.name}_masks"
    masks.mkdir(exist_ok=True)
    scenes = make_split(n, seed, size)
    ids = []
    box_rows: dict[str, list] = {"id": [], "x1": [], "y1": [], "x2": [], "y2": [], "label": []}
    for k, s in enumerate(scenes):
        ident = f"img_{k:05d}"
        _write_if_changed(
            out / f"{ident}.png", cv2.imencode(".png", cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR))[1].tobytes()
        )
        _write_if_changed(masks / f"{ident}.png", cv2.imencode(".png", s.mask)[1].tobytes())
        ids.append(ident)
        for b, lab in zip(s.boxes.tolist(), s.box_labels.tolist()):
            for key, v in zip(("x1", "y1", "x2", "y2"), b):
                box_rows[key].append(v)
            box_rows["id"].append(ident)
            box_rows["label"].append(CLASSES[lab])
    for name, table in (
        ("labels.csv", pl.DataFrame({"id": ids, "label": [CLASSES[s.label] for s in scenes]})),
        ("boxes.csv", pl.DataFrame(box_rows)),
    ):
        _write_if_changed(out / name, table.write_csv().encode())
    return n
