"""Segmentation: one map ``[K, h, w]`` per image, every view inverted onto the canvas.

Engine side: the canvas is cut into tiles (one tile when there is no tiling), each view is
applied per tile, the predicted map is resized to the view's input size where the model
predicts at a lower resolution, inverted, and stitched with the tile weights into a map of
the canvas' size; stored ``[N, K, h, w]`` as float32/float16 logits or uint8 probabilities,
optionally at a reduced resolution.

From the cache: merge aligned maps, blend, post-process, RLE, Dice/IoU. Maps are read in
blocks of images (memory-mapped), so a blend holds a block of maps at a time whatever the
test-set size. Each cached view is already inverted onto the canvas, so merging
views and blending members are element-wise. A uint8 cache holds probabilities; they are read
back as log-probabilities (softmax) or logits (sigmoid), whose activation gives the stored
probabilities again, so every merge rule applies unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from kaggle_tta.config import MemberConfig, PipelineConfig, SubmissionConfig
from kaggle_tta.config.errors import ConfigError, DataError
from kaggle_tta.exec.dag import MemberSource, blocks, member_prediction, node_predictions
from kaggle_tta.io.canvas import CanvasSpec
from kaggle_tta.io.data import decode_image
from kaggle_tta.io.readers import read_item, reader_of
from kaggle_tta.ops.merge import VIEW_REDUCERS, Prediction, to_probs
from kaggle_tta.ops.rle import mask_to_rle, remove_small_components
from kaggle_tta.tasks.base import Task, TaskOutput, register_task
from kaggle_tta.tasks.seg_forward import Tiles, normalize_canvas, view_maps
from kaggle_tta.tasks.seg_native import check_native, native, native_rows, native_step, stored_of

if TYPE_CHECKING:
    from torch import Tensor

    from kaggle_tta.engine.plan import Plan
    from kaggle_tta.exec.forward import MemberWork
    from kaggle_tta.io.data import Batch
    from kaggle_tta.io.models import Preprocess

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
        return _as_logits(arr if region is None else arr[:, :, region[0], region[1]], activation)

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
    """The id of an (image, class) row."""
    return spec.rle.id_template.format(id=image_id, **{"class": name, "index": index})


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
    return native_rows(image_id, read, stored, size, masks, classes, cfg.submission, row_id)


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
    for lo, hi in blocks(len(ids), block_of(sources)):
        nodes = node_maps(cfg, sources, lo, hi) if truth_given or not native(cfg) else {}
        plain_nodes = node_maps(cfg, sources, lo, hi, plain=True) if plain and truth_given else {}
        probs = {name: to_probs(p) for name, p in nodes.items()}
        plain_probs = {name: to_probs(p) for name, p in plain_nodes.items()}
        for j, i in enumerate(range(lo, hi)):
            size = (int(sizes[i][0]), int(sizes[i][1]))
            masks = None
            if native(cfg):  # band by band: the image is never whole in memory
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
    table = pl.DataFrame(
        {cfg.submission.id_column: [r[0] for r in rows], cfg.submission.rle.column: [r[1] for r in rows]},
        schema={cfg.submission.id_column: pl.String, cfg.submission.rle.column: pl.String},
    )
    return TaskOutput(
        table, ["Dice", "IoU"], {k: v.result() for k, v in tta.items()}, {k: v.result() for k, v in no_tta.items()}
    )


# ---- the task ------------------------------------------------------------------------------


@register_task
class Segmentation(Task):
    name = "segmentation"
    target = "mask"
    merges = tuple(VIEW_REDUCERS)
    blends = ("mean", "power_mean")
    writers = {"rle": rle_rows}
    truth = "masks"
    stores_image_sizes = True
    tiling = True
    dense_maps = True
    adaptive = True
    tuner = "masks"

    def validate(self, cfg: PipelineConfig) -> None:
        for m in cfg.members:
            if m.preprocess.input_size is not None:
                raise ConfigError(
                    f"members.{m.name}.preprocess.input_size: a segmentation member sees the whole canvas "
                    "(segmentation.size) "
                    "or its tiles (tiling.tile); remove input_size"
                )

    def input_size(self, cfg: PipelineConfig, m: MemberConfig) -> tuple[int, int]:
        return m.tiling.size if m.tiling else (0, 0)  # the canvas or a tile, not a size of its own

    def canvas(self, cfg: PipelineConfig, pre: Preprocess) -> CanvasSpec:
        size = cfg.segmentation.size
        if size == "native":  # nothing decoded by the loader: the step reads each image's windows
            return CanvasSpec((0, 0), 1.0, pre.interpolation, None, "window")
        return CanvasSpec(
            (int(size[0]), int(size[1])) if size else (0, 0),
            1.0,
            pre.interpolation,
            pre.albumentations,
            "resize" if size else "native",
        )

    def view_size(self, pre: Preprocess) -> None:
        return None  # views see the whole canvas or tile

    def activation(self, cfg: PipelineConfig, m: MemberConfig, n_classes: int) -> str:
        if m.activation != "auto":
            return m.activation
        return "sigmoid" if cfg.multilabel or n_classes == 1 else "softmax"

    def out_channels(self, activation: str, n_classes: int) -> int:
        """With softmax, background is channel 0, then one per class."""
        return n_classes + 1 if activation == "softmax" else n_classes

    def fingerprint(self, cfg: PipelineConfig, m: MemberConfig, canvas: CanvasSpec, activation: str) -> dict[str, Any]:
        return {
            "canvas": canvas.__dict__,
            "tiling": m.tiling.model_dump() if m.tiling else None,
            "scale": cfg.cache.scale,
            "activation": activation,
        }

    def check_plan(self, plan: Plan) -> None:
        super().check_plan(plan)
        if native(plan.cfg):
            check_native(plan)
        seg, k = plan.cfg.segmentation, len(plan.classes)
        for key in ("threshold", "min_area"):
            value = getattr(seg, key)
            if isinstance(value, list) and len(value) != k:
                raise ConfigError(
                    f"segmentation.{key}: {len(value)} values for {k} classes: give one value or one per class"
                )
        spec = plan.cfg.data.masks
        if spec is not None:  # every mask is there before the first forward (read when scored)
            folder = plan.cfg.resolve(spec.folder)
            missing = [i for i in plan.testset.ids if not (folder / spec.template.format(id=i)).is_file()]
            if missing:
                raise DataError(
                    f"data.masks: {folder / spec.template.format(id=missing[0])} not found for image '{missing[0]}' "
                    f"({len(missing)} missing); check data.masks.folder and template"
                )
        if len({m.activation for m in plan.members}) > 1:  # maps blend element-wise: one meaning per channel
            acts = ", ".join(f"{m.name}: {m.activation}" for m in plan.members)
            raise ConfigError(
                f"members.*.activation: segmentation members must share one activation ({acts}); set activation on "
                "each member"
            )

    def row_ids(self, plan: Plan) -> list[tuple[str, int]]:
        r = plan.cfg.submission.rle
        if r.rows == "image":
            return super().row_ids(plan)
        return [
            (class_row_id(plan.cfg.submission, i, c, name), k)
            for k, i in enumerate(plan.testset.ids)
            for c, name in enumerate(plan.classes)
        ]

    def columns(self, plan: Plan) -> list[str]:
        return [plan.cfg.submission.id_column, plan.cfg.submission.rle.column]

    # ---- engine side ---------------------------------------------------------------------

    def open_views(self, work: MemberWork, plan: Plan) -> None:
        work.canvas_size = map_size(plan, plan.testset.reference)
        shape = (len(plan.testset), work.member.out_channels, *stored_size(plan, work.canvas_size))
        for v in work.views:
            work.open_dense(v.name, shape, plan.cfg.cache.dtype)

    def as_logits(self, values: np.ndarray, activation: str) -> np.ndarray:
        return _as_logits(values, activation)

    def row_bytes(self, work: MemberWork, plan: Plan) -> int:
        h, w = stored_size(plan, map_size(plan, plan.testset.reference))
        return work.member.out_channels * h * w * np.dtype(plan.cfg.cache.dtype).itemsize

    def step(self, work: MemberWork, batch: Batch, plan: Plan) -> None:
        """Tiles x views -> forward -> resize to the view input -> invert -> stitch -> store."""
        from kaggle_tta.exec.forward import ViewLog

        if native(plan.cfg):
            native_step(work, batch, plan)
            return
        m, runner, lo, hi = work.member, work.runner, batch.lo, batch.hi
        assert runner is not None
        x = normalize_canvas(batch, m, runner.device)
        size = tuple(x.shape[-2:])
        if size != tuple(work.canvas_size):
            raise DataError(
                f"{plan.testset.paths[lo]}: canvas {size[0]}x{size[1]} differs from the first image's "
                f"{work.canvas_size[0]}x{work.canvas_size[1]}; set segmentation.size: [H, W] to resize every image"
            )
        tiles = Tiles.of(x, m.cfg.tiling, runner.device)
        log = ViewLog()
        for part in work.view_rows(lo, hi):  # the gate reads its first view's maps: gated views go last
            for job in part:
                if job.count == 0:
                    continue
                acc = view_maps(work, job, tiles, lo, hi, plan, log)
                work.store[job.view.name][job.destination()] = _to_store(acc, plan, m.activation, plan.cfg.cache.dtype)
        work.record(lo, hi, batch.sizes, log)

    # ---- from the cache ------------------------------------------------------------------

    def blend(self, plan: Plan, sources: Sequence[MemberSource], sizes: np.ndarray | None, plain: bool) -> TaskOutput:
        assert sizes is not None
        cfg = plan.cfg
        encode = self.writers[cfg.submission.format]  # type: ignore[index]
        return write_and_score(
            cfg, plan.testset.ids, plan.classes, sources, sizes, plan.members[0].activation, plain, encode
        )


def _to_store(maps: Tensor, plan: Plan, activation: str, dtype: str) -> np.ndarray:
    """Stitched logits -> what the cache holds (reduced resolution, float16 or uint8 probs)."""
    import torch
    import torch.nn.functional as F

    store = stored_size(plan, (int(maps.shape[-2]), int(maps.shape[-1])))
    if store != tuple(maps.shape[-2:]):
        maps = F.interpolate(maps, size=store, mode="area")
    if dtype == "uint8":
        probs = (
            torch.softmax(maps, 1)
            if activation == "softmax"
            else torch.sigmoid(maps)
            if activation == "sigmoid"
            else maps.clamp(0, 1)
        )
        return (probs * 255.0).round_().to(torch.uint8).cpu().numpy()
    if dtype == "float16":
        maps = maps.clamp(-65504, 65504)
    return maps.cpu().numpy()


def map_size(plan: Plan, first_path: Any) -> tuple[int, int]:
    """The canvas (H, W) of a segmentation run: segmentation.size, the first image's, or at
    native size the largest image's (each image's map fills its row's top-left corner)."""
    size = plan.cfg.segmentation.size
    if size == "native":
        return native_canvas(plan)
    if size:
        return int(size[0]), int(size[1])
    reader = reader_of(plan.cfg)
    img = decode_image(first_path) if reader is None else read_item(str(first_path), reader)
    h, w = img.shape[:2]
    return int(h), int(w)


def stored_size(plan: Plan, canvas: tuple[int, int]) -> tuple[int, int]:
    if native(plan.cfg):  # the largest image's stored map: each image's own is rounded alone
        return canvas
    s = plan.cfg.cache.scale
    return (max(1, round(canvas[0] * s)), max(1, round(canvas[1] * s))) if s != 1.0 else canvas


def native_canvas(plan: Plan) -> tuple[int, int]:
    """The largest stored map of a native-size run (headers read once per plan)."""
    from kaggle_tta.io.windows import item_size

    if plan.rows is not None:
        raise ConfigError("segmentation.size: native runs in one process (its maps' layout is the whole test set's)")
    if plan.native_sizes is None:
        reader = reader_of(plan.cfg)
        plan.native_sizes = np.array([item_size(str(p), reader) for p in plan.testset.paths], np.int64).reshape(-1, 2)
    stored = [stored_of(plan.cfg.cache.scale, (int(h), int(w))) for h, w in plan.native_sizes]
    return max(h for h, _ in stored), max(w for _, w in stored)


def own_map(probs: np.ndarray, size: tuple[int, int], cfg: PipelineConfig) -> np.ndarray:
    """An image's stored map: at native size its top-left corner of the row, else the row."""
    if not native(cfg):
        return probs
    h, w = stored_of(cfg.cache.scale, size)
    return probs[:, :h, :w]
