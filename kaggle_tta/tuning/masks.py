"""Tuning a segmentation pipeline's post-processing: per class, the threshold (sigmoid
members) and min_area that maximize the mean Dice of the training images, by a grid search
(as the SIIM-ACR pneumothorax winners searched theirs).

Each image's source probabilities are resized to the image once (as the writer does) and
every (threshold, min_area) of the grid is scored from one connected-component labelling
per threshold: a component is kept when its area reaches min_area, so its pixels and its
overlap with the truth add up for every min_area at once. The Dice of an (image, class)
with neither prediction nor truth is 1, as the blend's report counts it. Softmax maps take
each pixel's most probable channel: only min_area is tuned there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kaggle_tta.exec.dag import MemberSource, blocks
from kaggle_tta.ops.merge import to_probs
from kaggle_tta.tasks.seg_maps import block_of, decide, image_probs, load_truth, node_maps, own_map
from kaggle_tta.tuning.options import TuneOptions
from kaggle_tta.tuning.problem import Point, TuningProblem

if TYPE_CHECKING:
    from kaggle_tta.engine.plan import Plan

THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)
AREA_FRACTIONS = (0.0, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02)  # of the median image's pixels


@dataclass
class MaskTuned:
    threshold: float | list[float]
    min_area: int | list[int]
    base: bool = False  # the pipeline's own settings (scored from its own masks)
    notes: tuple[str, ...] = ()


def dice_grid(
    p: np.ndarray, truth: np.ndarray, taus: np.ndarray | None, areas: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """``[n_thresholds, n_areas]`` Dice of one class of one image: ``p >= tau`` (or the
    given ``mask``, softmax), components smaller than each area removed."""
    import cv2

    t_sum = float(truth.sum())
    if taus is None:
        assert mask is not None, "softmax maps: give the mask"
        rows = [mask]
    else:
        rows = [p >= np.float32(t) for t in taus]
    out = np.empty((len(rows), len(areas)))
    for i, m in enumerate(rows):
        if not m.any():
            out[i] = 1.0 if t_sum == 0 else 0.0
            continue
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
        area = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
        inter = np.bincount(labels[truth], minlength=n)[1:].astype(np.float64)
        keep = area[None, :] >= np.maximum(areas, 1)[:, None]  # [n_areas, components]; min_area <= 1 keeps all
        pred, both = keep @ area, keep @ inter
        total = pred + t_sum
        out[i] = np.where(total == 0, 1.0, 2 * both / np.maximum(total, 1e-12))
    return out


class MaskProblem(TuningProblem[MaskTuned]):
    """The segmentation tuning problem (registered as ``masks``)."""

    unit = "images"
    gain_label = "Dice, + helps"

    def __init__(self, plan: Plan, sources: list[MemberSource], opts: TuneOptions):
        from kaggle_tta.config.errors import ConfigError

        if not opts.thresholds:
            raise ConfigError(
                "--no-thresholds: segmentation tunes its threshold and min_area only; nothing is left to tune"
            )
        self.plan, self.cfg, self.opts = plan, plan.cfg, opts
        self.activation = plan.members[0].activation
        self.classes = plan.classes
        sizes = sources[0].entry.read_sizes()  # type: ignore[union-attr]
        area = float(np.median(sizes[:, 0] * sizes[:, 1]))
        self.areas = np.unique(np.round(np.asarray(AREA_FRACTIONS) * area).astype(np.int64))
        self.taus = THRESHOLDS if self.activation == "sigmoid" else None
        self.base_dice, self.grid = self._tables(sources, sizes)

    def _tables(self, sources: list[MemberSource], sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the pipeline's Dice ``[N, K]``, the grid's ``[N, K, n_thresholds, n_areas]``)."""
        cfg, ids, k = self.cfg, self.plan.testset.ids, len(self.classes)
        seg, src = cfg.segmentation, cfg.submission_source
        n_t = 1 if self.taus is None else len(self.taus)
        base = np.empty((len(ids), k))
        grid = np.empty((len(ids), k, n_t, len(self.areas)))
        for lo, hi in blocks(len(ids), block_of(sources)):
            probs = to_probs(node_maps(cfg, sources, lo, hi)[src])
            for j, i in enumerate(range(lo, hi)):
                size = (int(sizes[i][0]), int(sizes[i][1]))
                p = image_probs(own_map(probs[j], size, cfg), size)
                truth = load_truth(cfg, ids[i], k, size)
                mine = decide(p, self.activation, seg.threshold, seg.min_area)
                base[i] = [_dice(a, b) for a, b in zip(mine, truth)]
                plain = decide(p, self.activation, 0.5, 0) if self.taus is None else None
                for c in range(k):
                    pc = p[..., c] if self.taus is not None else None
                    grid[i, c] = dice_grid(pc, truth[c], self.taus, self.areas, None if plain is None else plain[c])  # type: ignore[arg-type]
        return base, grid

    @property
    def n_units(self) -> int:
        return len(self.base_dice)

    @property
    def scores(self) -> list[tuple[str, bool]]:
        return [("Dice", True)]

    def untuned(self) -> MaskTuned:
        seg = self.cfg.segmentation
        return MaskTuned(seg.threshold, seg.min_area, base=True)

    def fit(self, train: np.ndarray) -> MaskTuned:
        mean = self.grid[train].mean(axis=0)  # [K, n_t, n_a]
        taus, areas = [], []
        for c in range(len(self.classes)):
            t, a = np.unravel_index(int(np.argmax(mean[c])), mean[c].shape)
            taus.append(float(self.taus[t]) if self.taus is not None else 0.5)
            areas.append(int(self.areas[a]))
        thr: float | list[float] = taus if self.taus is not None else self.cfg.segmentation.threshold
        return MaskTuned(thr, areas)

    def per_class(self, tuned: MaskTuned, rows: np.ndarray) -> np.ndarray:
        """Dice ``[len(rows), K]``."""
        if tuned.base:
            return self.base_dice[rows]
        ti = [
            0 if self.taus is None else int(np.flatnonzero(self.taus == t)[0])
            for t in _per_class(tuned.threshold, len(self.classes))
        ]
        ai = [int(np.flatnonzero(self.areas == a)[0]) for a in _per_class(tuned.min_area, len(self.classes))]
        return np.stack([self.grid[rows, c, ti[c], ai[c]] for c in range(len(self.classes))], axis=1)

    def score(self, tuned: MaskTuned, rows: np.ndarray) -> dict[str, float]:
        return {"Dice": float(self.per_class(tuned, rows).mean())}

    def n_params(self) -> dict[str, int]:
        k = len(self.classes)
        return {"thresholds": k, "min_area": k} if self.taus is not None else {"min_area": k}

    def overrides(self, tuned: MaskTuned) -> dict[str, Any]:
        seg: dict[str, Any] = {"min_area": list(tuned.min_area)}  # type: ignore[arg-type]
        if self.taus is not None:
            seg["threshold"] = list(tuned.threshold)  # type: ignore[arg-type]
        return {"segmentation": seg}

    def tables(self, before: MaskTuned, after: MaskTuned) -> dict[str, Any]:
        import polars as pl

        k, every = len(self.classes), np.arange(self.n_units)
        db, da = self.per_class(before, every).mean(axis=0), self.per_class(after, every).mean(axis=0)
        return {
            "thresholds": pl.DataFrame(
                {
                    "class": self.classes,
                    "threshold before": _per_class(before.threshold, k),
                    "threshold after": _per_class(after.threshold, k),
                    "min_area before": _per_class(before.min_area, k),
                    "min_area after": _per_class(after.min_area, k),
                    "Dice before": db.tolist(),
                    "Dice after": da.tolist(),
                }
            )
        }

    def points(self, tuned: MaskTuned, tables: dict[str, Any]) -> list[Point]:
        return []


def _per_class(v: Any, k: int) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v] * k


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = float(pred.sum() + truth.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(pred, truth).sum()) / total
