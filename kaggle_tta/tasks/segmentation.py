"""Segmentation from the cache: merge aligned maps, blend, post-process, RLE, Dice/IoU.

Maps are read in blocks of images (memory-mapped), so a blend holds a block of maps at a time
whatever the test-set size. Each cached view is already inverted onto the canvas, so merging
views and blending members are element-wise. A uint8 cache holds probabilities; they are read
back as log-probabilities (softmax) or logits (sigmoid), whose activation gives the stored
probabilities again, so every merge rule applies unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from kaggle_tta.blend import MemberSource, blocks, member_prediction, node_predictions
from kaggle_tta.cache import IMAGE_SIZE
from kaggle_tta.config import PipelineConfig, SubmissionConfig
from kaggle_tta.errors import DataError
from kaggle_tta.merge import Prediction, to_probs
from kaggle_tta.rle import mask_to_rle, remove_small_components

BLOCK = 16  # images per block: bounds the maps held in memory


def _as_logits(arr: np.ndarray, activation: str) -> np.ndarray:
    """Cached values -> float32 logits; uint8 probabilities are inverted through the activation."""
    if arr.dtype != np.uint8:
        return np.asarray(arr, dtype=np.float32)
    p = np.clip(arr.astype(np.float32) / 255.0, 0.5 / 255.0, 1.0 - 0.5 / 255.0)
    if activation == "softmax":
        return np.log(p)
    if activation == "sigmoid":
        return np.log(p) - np.log1p(-p)
    return p


def member_maps(s: MemberSource, lo: int, hi: int, views: Sequence[str] | None = None) -> Prediction:
    """A member's views of images ``lo:hi`` merged with its rule, as logits."""
    return member_prediction(s, lo, hi, views, _as_logits)


def node_maps(cfg: PipelineConfig, sources: Sequence[MemberSource], lo: int, hi: int, activation: str, views: Sequence[str] | None = None) -> dict[str, Prediction]:
    """Every node's maps for images ``lo:hi``."""
    return node_predictions(cfg, sources, lo, hi, activation, views, _as_logits)


def image_sizes(s: MemberSource) -> np.ndarray:
    return np.asarray(s.entry.read(IMAGE_SIZE))  # type: ignore[union-attr]


def masks_of(probs: np.ndarray, size: tuple[int, int], activation: str, threshold: float, min_area: int) -> np.ndarray:
    """One image's ``[K', h, w]`` probabilities -> ``[K, H, W]`` bool masks at its own size.

    Probabilities are resized (bilinear) to the image before deciding, so masks are as sharp
    as the image, not as the cache. softmax: each pixel goes to its most probable channel,
    channel 0 being background; sigmoid: every class reaching ``threshold``.
    """
    import cv2

    h, w = int(size[0]), int(size[1])
    p = np.ascontiguousarray(np.moveaxis(probs.astype(np.float32), 0, -1))
    if p.shape[:2] != (h, w):  # cv2.resize takes at most 128 channels at a time here
        parts = [cv2.resize(np.ascontiguousarray(p[:, :, c : c + 128]), (w, h), interpolation=cv2.INTER_LINEAR) for c in range(0, p.shape[-1], 128)]
        parts = [q[:, :, None] if q.ndim == 2 else q for q in parts]
        p = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
    if activation == "softmax":
        best = p.argmax(axis=-1)
        masks = np.stack([best == c for c in range(1, p.shape[-1])])
    else:
        masks = np.moveaxis(p >= threshold, -1, 0)
    if min_area > 0:
        masks = np.stack([remove_small_components(mk.astype(np.uint8), min_area).astype(bool) for mk in masks])
    return masks


def rle_rows(image_id: str, masks: np.ndarray, classes: Sequence[str], spec: SubmissionConfig) -> list[tuple[str, str]]:
    """The submission rows of one image: ``(id, rle)`` per image or per (image, class)."""
    r = spec.rle
    order = "F" if r.order == "column" else "C"
    if r.rows == "image":
        return [(image_id, mask_to_rle(masks.any(axis=0), order, r.one_indexed, r.empty))]
    return [
        (r.id_template.format(id=image_id, **{"class": name, "index": k}), mask_to_rle(masks[k], order, r.one_indexed, r.empty))
        for k, name in enumerate(classes)
    ]


@dataclass
class Scores:
    dice: list[float]
    iou: list[float]

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """Per class: Dice and IoU of one image (1.0 where both are empty)."""
        for p, t in zip(pred, truth):
            inter = float(np.logical_and(p, t).sum())
            total = float(p.sum() + t.sum())
            union = total - inter
            self.dice.append(1.0 if total == 0 else 2.0 * inter / total)
            self.iou.append(1.0 if union == 0 else inter / union)

    def result(self) -> dict[str, float]:
        return {"Dice": float(np.mean(self.dice)), "IoU": float(np.mean(self.iou))}


def load_truth(cfg: PipelineConfig, image_id: str, n_classes: int, size: tuple[int, int]) -> np.ndarray:
    """One image's ground-truth ``[K, H, W]`` bool masks from ``data.masks``."""
    import cv2

    spec = cfg.data.masks
    assert spec is not None
    path = cfg.resolve(spec.folder) / spec.template.format(id=image_id)
    if not path.is_file():
        raise DataError(f"data.masks: {path} not found for image '{image_id}'; check data.masks.folder and template")
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None or m.ndim != 2:
        raise DataError(f"{path}: a mask must be a single-channel image (0 background, k + 1 for class k)")
    if m.shape != tuple(size):
        raise DataError(f"{path}: mask is {m.shape[0]}x{m.shape[1]}, its image {size[0]}x{size[1]}")
    if n_classes == 1:
        return (m > 0)[None]
    return np.stack([m == k + 1 for k in range(n_classes)])


def write_and_score(
    cfg: PipelineConfig,
    ids: Sequence[str],
    classes: Sequence[str],
    sources: Sequence[MemberSource],
    activation: str,
    plain: bool,
) -> tuple[pl.DataFrame, dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Streams blocks of images: the submission table of the source node, and (with ground
    truth) every node's Dice/IoU with TTA and, if ``plain``, with the identity view alone."""
    sizes = image_sizes(sources[0])
    src = cfg.submission_source
    seg = cfg.segmentation
    rows: list[tuple[str, str]] = []
    truth_given = cfg.data.masks is not None
    tta: dict[str, Scores] = {}
    no_tta: dict[str, Scores] = {}
    for lo, hi in blocks(len(ids), BLOCK):
        nodes = node_maps(cfg, sources, lo, hi, activation)
        plain_nodes = node_maps(cfg, sources, lo, hi, activation, ["identity"]) if plain and truth_given else {}
        probs = {name: to_probs(p, activation) for name, p in nodes.items()}
        plain_probs = {name: to_probs(p, activation) for name, p in plain_nodes.items()}
        for j, i in enumerate(range(lo, hi)):
            size = tuple(sizes[i])
            masks = masks_of(probs[src][j], size, activation, seg.threshold, seg.min_area)
            rows.extend(rle_rows(ids[i], masks, classes, cfg.submission))
            if not truth_given:
                continue
            truth = load_truth(cfg, ids[i], len(classes), size)
            for name in probs:
                pred = masks if name == src else masks_of(probs[name][j], size, activation, seg.threshold, seg.min_area)
                tta.setdefault(name, Scores([], [])).add(pred, truth)
            for name in plain_probs:
                no_tta.setdefault(name, Scores([], [])).add(masks_of(plain_probs[name][j], size, activation, seg.threshold, seg.min_area), truth)
    table = pl.DataFrame({cfg.submission.id_column: [r[0] for r in rows], cfg.submission.rle.column: [r[1] for r in rows]}, schema={cfg.submission.id_column: pl.String, cfg.submission.rle.column: pl.String})
    return table, {k: v.result() for k, v in tta.items()}, {k: v.result() for k, v in no_tta.items()}
