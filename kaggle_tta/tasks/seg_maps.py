"""Segmentation from the cache: maps read in blocks of images (memory-mapped, so a blend
holds a block of maps at a time whatever the test-set size), merged on aligned maps, blended,
post-processed, run-length encoded, scored with Dice/IoU. A uint8 cache holds probabilities;
they are read back as log-probabilities (softmax) or logits (sigmoid), whose activation gives
the stored probabilities again, so every merge rule applies unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import polars as pl

from kaggle_tta.config import PipelineConfig, SubmissionConfig
from kaggle_tta.config.errors import DataError
from kaggle_tta.exec.dag import MemberSource, blocks, member_prediction, node_predictions
from kaggle_tta.io.submission import KEY_SEP
from kaggle_tta.ops.merge import Prediction, to_probs
from kaggle_tta.ops.rle import mask_to_rle, remove_small_components
from kaggle_tta.tasks.base import TaskOutput
from kaggle_tta.tasks.seg_native import native, native_rows, stored_of

BLOCK = 16  # images per block: bounds the maps held in memory
BLOCK_BYTES = 256 << 20  # ... and fewer where each image's maps are large


def block_of(sources: Sequence[MemberSource]) -> int:
    """Images per block: BLOCK, fewer where a block's float32 maps of every source's views
    would pass BLOCK_BYTES (a native-size run's rows are as large as its largest image)."""
    row = sum(
        int(np.prod(s.entry.view_state(v).get("shape", [1])[1:])) * 4 * 2
        for s in sources
        for v in s.views
        if s.entry is not None
    )
    return max(1, min(BLOCK, BLOCK_BYTES // max(1, row)))


def as_logits(arr: np.ndarray, activation: str) -> np.ndarray:
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
    return member_prediction(s, lo, hi, views, as_logits)


def node_maps(
    cfg: PipelineConfig,
    sources: Sequence[MemberSource],
    lo: int,
    hi: int,
    views: Sequence[str] | None = None,
    plain: bool = False,
    region: tuple[slice, slice] | None = None,
) -> dict[str, Prediction]:
    """Every node's maps for images ``lo:hi`` (``plain``: each member's view without TTA);
    ``region``: only those rows and columns of each map read and merged."""

    def logits(arr: np.ndarray, activation: str) -> np.ndarray:
        return as_logits(arr if region is None else arr[:, :, region[0], region[1]], activation)

    return node_predictions(cfg, sources, lo, hi, views=views, transform=logits, plain=plain)


def masks_of(
    probs: np.ndarray,
    size: tuple[int, int],
    activation: str,
    threshold: float | Sequence[float],
    min_area: int | Sequence[int],
) -> np.ndarray:
    """One image's ``[K', h, w]`` probabilities -> ``[K, H, W]`` bool masks at its own size.

    Probabilities are resized (bilinear) to the image before deciding, so masks are as sharp
    as the image, not as the cache. softmax: each pixel goes to its most probable channel,
    channel 0 being background; sigmoid: every class reaching ``threshold``. ``threshold``
    and ``min_area`` are one value or one per class.
    """
    p = image_probs(probs, size)
    return decide(p, activation, threshold, min_area)


def image_probs(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One image's ``[K', h, w]`` probabilities resized (bilinear) to ``[H, W, K']``."""
    import cv2

    h, w = int(size[0]), int(size[1])
    p: np.ndarray = np.ascontiguousarray(np.moveaxis(probs.astype(np.float32), 0, -1))
    if p.shape[:2] != (h, w):  # cv2.resize takes at most 128 channels at a time here
        parts = [
            cv2.resize(np.ascontiguousarray(p[:, :, c : c + 128]), (w, h), interpolation=cv2.INTER_LINEAR)
            for c in range(0, p.shape[-1], 128)
        ]
        parts = [q[:, :, None] if q.ndim == 2 else q for q in parts]
        p = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
    return p


def decide(
    p: np.ndarray, activation: str, threshold: float | Sequence[float], min_area: int | Sequence[int]
) -> np.ndarray:
    """``[H, W, K']`` probabilities -> ``[K, H, W]`` bool masks (see masks_of)."""
    if activation == "softmax":
        best = p.argmax(axis=-1)
        masks = np.stack([best == c for c in range(1, p.shape[-1])])
    else:
        masks = np.moveaxis(p >= np.asarray(threshold, dtype=np.float32), -1, 0)
    areas: list[Any] = (
        list(min_area) if isinstance(min_area, (list, tuple, np.ndarray)) else [min_area] * len(masks)
    )  # as given: a fractional area (a tuned one) compares as it is
    if any(a > 0 for a in areas):
        masks = np.stack(
            [
                remove_small_components(mk.astype(np.uint8), a).astype(bool) if a > 0 else mk
                for mk, a in zip(masks, areas)
            ]
        )
    return masks


def rle_rows(image_id: str, masks: np.ndarray, classes: Sequence[str], spec: SubmissionConfig) -> list[tuple[str, str]]:
    """The submission rows of one image: ``(id, rle)`` per image or per (image, class)."""
    r = spec.rle
    order: Literal["F", "C"] = "F" if r.order == "column" else "C"
    if r.rows == "image":
        return [(image_id, mask_to_rle(np.asarray(masks.any(axis=0)), order, r.one_indexed, r.empty))]
    return [
        (class_row_id(spec, image_id, k, name), mask_to_rle(masks[k], order, r.one_indexed, r.empty))
        for k, name in enumerate(classes)
    ]


def class_row_id(spec: SubmissionConfig, image_id: str, index: int, name: str) -> str:
    """The id of an (image, class) row; with ``rle.class_column``, the id and the class joined
    by KEY_SEP (split into two columns when the table is made)."""
    rid = spec.rle.id_template.format(id=image_id, **{"class": name, "index": index})
    return rid if spec.rle.class_column is None else f"{rid}{KEY_SEP}{name}"


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
    top = int(m.max()) if m.size else 0
    if n_classes > 1 and top > n_classes:
        raise DataError(
            f"{path}: mask value {top} is not a class: 0 is background, 1..{n_classes} are data.classes; fix the mask "
            "or data.classes"
        )
    if n_classes == 1:
        return (m > 0)[None]
    return np.stack([m == k + 1 for k in range(n_classes)])


def pixel_ids(image_id: str, size: tuple[int, int]) -> list[str]:
    """``<id>_<row>_<col>`` of every pixel, 1-based, row by row (denoising-dirty-documents)."""
    h, w = int(size[0]), int(size[1])
    return [f"{image_id}_{r}_{c}" for r in range(1, h + 1) for c in range(1, w + 1)]


def pixel_rows(
    image_id: str, probs: np.ndarray, size: tuple[int, int], activation: str
) -> tuple[list[str], np.ndarray]:
    """One image's rows of format ``pixels``: every pixel's value at the image's size (the first
    class's probability; a model without activation, its output), row by row."""
    p = image_probs(probs, size)
    value = p[..., 1] if activation == "softmax" else p[..., 0]
    return pixel_ids(image_id, size), value.reshape(-1).astype(np.float64)


def rle_table(spec: SubmissionConfig, rows: Sequence[tuple[str, str]]) -> pl.DataFrame:
    """The RLE rows as the submission's table: id and RLE, or id, class and RLE."""
    ids = [r[0] for r in rows]
    columns: dict[str, list[str]] = {spec.id_column: ids}
    if spec.rle.class_column is not None:
        parts = [i.split(KEY_SEP, 1) for i in ids]
        columns = {spec.id_column: [p[0] for p in parts], spec.rle.class_column: [p[1] for p in parts]}
    columns[spec.rle.column] = [r[1] for r in rows]
    return pl.DataFrame(columns, schema=dict.fromkeys(columns, pl.String))


def _masks(cfg: PipelineConfig, probs: np.ndarray, size: tuple[int, int], activation: str) -> np.ndarray:
    seg = cfg.segmentation
    return masks_of(own_map(probs, size, cfg), size, activation, seg.threshold, seg.min_area)


def _native_image(
    cfg: PipelineConfig,
    sources: Sequence[MemberSource],
    i: int,
    image_id: str,
    size: tuple[int, int],
    classes: Sequence[str],
    activation: str,
) -> list[tuple[str, str]]:
    """Image ``i``'s rows at native size: its maps read, merged and encoded one band at a time."""
    stored = stored_of(cfg.cache.scale, size)
    column = cfg.submission.rle.order == "column"

    def read(a: int, b: int) -> np.ndarray:
        region = (slice(0, stored[0]), slice(a, b)) if column else (slice(a, b), slice(0, stored[1]))
        return to_probs(node_maps(cfg, sources, i, i + 1, region=region)[cfg.submission_source])[0]

    def masks(p: np.ndarray) -> np.ndarray:
        return decide(p, activation, cfg.segmentation.threshold, 0)

    row_id = partial(class_row_id, cfg.submission)
    s = sources[0]
    channels = int(s.entry.view_state(s.views[0]).get("shape", [0, 1])[1]) if s.entry is not None else 1
    return native_rows(image_id, read, stored, size, masks, classes, cfg.submission, row_id, channels)


def write_and_score(
    cfg: PipelineConfig,
    ids: Sequence[str],
    classes: Sequence[str],
    sources: Sequence[MemberSource],
    sizes: np.ndarray,
    activation: str,
    plain: bool,
    encode: Any = rle_rows,
) -> TaskOutput:
    """Streams blocks of images: the submission table of the source node (each image's rows
    by ``encode``), and (with ground truth) every node's Dice/IoU with TTA and, if ``plain``,
    with the identity view alone."""
    src = cfg.submission_source
    rows: list[tuple[str, str]] = []
    truth_given = cfg.data.masks is not None
    tta: dict[str, Scores] = {}
    no_tta: dict[str, Scores] = {}
    pixels: tuple[list[str], list[np.ndarray]] = ([], [])  # format pixels: ids and values
    for lo, hi in blocks(len(ids), block_of(sources)):
        nodes = node_maps(cfg, sources, lo, hi) if truth_given or not native(cfg) or encode is pixel_rows else {}
        plain_nodes = node_maps(cfg, sources, lo, hi, plain=True) if plain and truth_given else {}
        probs = {name: to_probs(p) for name, p in nodes.items()}
        plain_probs = {name: to_probs(p) for name, p in plain_nodes.items()}
        for j, i in enumerate(range(lo, hi)):
            size = (int(sizes[i][0]), int(sizes[i][1]))
            masks = None
            if encode is pixel_rows:
                pid, value = pixel_rows(ids[i], own_map(probs[src][j], size, cfg), size, activation)
                pixels[0].extend(pid)
                pixels[1].append(value)
            elif native(cfg):  # band by band: the image is never whole in memory
                rows.extend(_native_image(cfg, sources, i, ids[i], size, classes, activation))
            else:
                masks = _masks(cfg, probs[src][j], size, activation)
                rows.extend(encode(ids[i], masks, classes, cfg.submission))
            if not truth_given:
                continue
            truth = load_truth(cfg, ids[i], len(classes), size)
            for name in probs:
                pred = masks if name == src and masks is not None else _masks(cfg, probs[name][j], size, activation)
                tta.setdefault(name, Scores([], [])).add(pred, truth)
            for name in plain_probs:
                no_tta.setdefault(name, Scores([], [])).add(_masks(cfg, plain_probs[name][j], size, activation), truth)
    table = (
        rle_table(cfg.submission, rows)
        if encode is not pixel_rows
        else pl.DataFrame(
            {cfg.submission.id_column: pixels[0], cfg.submission.label_column: np.concatenate(pixels[1])},
            schema={cfg.submission.id_column: pl.String, cfg.submission.label_column: pl.Float64},
        )
    )
    return TaskOutput(
        table, ["Dice", "IoU"], {k: v.result() for k, v in tta.items()}, {k: v.result() for k, v in no_tta.items()}
    )


def own_map(probs: np.ndarray, size: tuple[int, int], cfg: PipelineConfig) -> np.ndarray:
    """An image's stored map: at native size its top-left corner of the row, else the row."""
    if not native(cfg):
        return probs
    h, w = stored_of(cfg.cache.scale, size)
    return probs[:, :h, :w]
