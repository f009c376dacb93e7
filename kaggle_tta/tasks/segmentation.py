"""Segmentation: one map ``[K, h, w]`` per image, every view inverted onto the canvas.

Engine side: the canvas is cut into tiles (one tile when there is no tiling), each view is
applied per tile, the predicted map is resized to the view's input size where the model
predicts at a lower resolution, inverted, and stitched with the tile weights into a map of
the canvas' size; stored ``[N, K, h, w]`` as float32/float16 logits or uint8 probabilities,
optionally at a reduced resolution.

From the cache (kaggle_tta.tasks.seg_maps): each cached view is already inverted onto the
canvas, so merging views and blending members are element-wise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kaggle_tta.config import MemberConfig, PipelineConfig
from kaggle_tta.config.errors import ConfigError, DataError
from kaggle_tta.exec.dag import MemberSource
from kaggle_tta.io.canvas import CanvasSpec
from kaggle_tta.io.data import decode_image
from kaggle_tta.io.readers import read_item, reader_of
from kaggle_tta.ops.merge import VIEW_REDUCERS
from kaggle_tta.tasks.base import Task, TaskOutput, register_task
from kaggle_tta.tasks.seg_forward import Tiles, normalize_canvas, view_maps
from kaggle_tta.tasks.seg_maps import (
    as_logits,
    class_row_id,
    pixel_ids,
    pixel_rows,
    rle_rows,
    write_and_score,
)
from kaggle_tta.tasks.seg_native import check_native, native, native_step, stored_of, stored_values

if TYPE_CHECKING:
    from torch import Tensor

    from kaggle_tta.engine.plan import Plan
    from kaggle_tta.exec.forward import MemberWork
    from kaggle_tta.io.data import Batch
    from kaggle_tta.io.models import Preprocess

# ---- the task ------------------------------------------------------------------------------


@register_task
class Segmentation(Task):
    name = "segmentation"
    target = "mask"
    merges = tuple(VIEW_REDUCERS)
    blends = ("mean", "power_mean")
    writers = {"rle": rle_rows, "pixels": pixel_rows}
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
        if plan.cfg.submission.format == "pixels":  # every pixel of every image: their sizes from the headers
            from kaggle_tta.io.windows import item_size

            reader = reader_of(plan.cfg)
            return [
                (pid, k)
                for k, (i, p) in enumerate(zip(plan.testset.ids, plan.testset.paths))
                for pid in pixel_ids(i, item_size(str(p), reader))
            ]
        if r.rows == "image":
            return super().row_ids(plan)
        return [
            (class_row_id(plan.cfg.submission, i, c, name), k)
            for k, i in enumerate(plan.testset.ids)
            for c, name in enumerate(plan.classes)
        ]

    def columns(self, plan: Plan) -> list[str]:
        spec = plan.cfg.submission
        if spec.format == "pixels":
            return [spec.id_column, spec.label_column]
        named = [spec.rle.class_column] if spec.rle.class_column is not None else []
        return [spec.id_column, *named, spec.rle.column]

    # ---- engine side ---------------------------------------------------------------------

    def open_views(self, work: MemberWork, plan: Plan) -> None:
        work.canvas_size = map_size(plan, plan.testset.reference)
        shape = (len(plan.testset), work.member.out_channels, *stored_size(plan, work.canvas_size))
        for v in work.views:
            work.open_dense(v.name, shape, plan.cfg.cache.dtype)

    def as_logits(self, values: np.ndarray, activation: str) -> np.ndarray:
        return as_logits(values, activation)

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
    import torch.nn.functional as F

    store = stored_size(plan, (int(maps.shape[-2]), int(maps.shape[-1])))
    if store != tuple(maps.shape[-2:]):
        maps = F.interpolate(maps, size=store, mode="area")
    return stored_values(maps, activation, dtype, axis=1)


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
