"""Tuning a detection pipeline's fusion: ``detection.skip_box_thr`` and ``iou_thr`` on a
small grid, for the mAP of the training images.

Every grid point fuses every image once (views, then blends, as the blend does); the folds
then only pick the point with the best mAP on their training images and score the held-out
ones, so the out-of-sample estimate costs no more fusion.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import TYPE_CHECKING, Any

import numpy as np

from kaggle_tta.exec.dag import MemberSource
from kaggle_tta.tasks.detection import MAP_RULES, evaluate_boxes, load_truth, mean_ap, member_boxes
from kaggle_tta.tuning.options import TuneOptions
from kaggle_tta.tuning.problem import Point, TuningProblem

if TYPE_CHECKING:
    from kaggle_tta.engine.plan import Plan

SKIP_BOX_THR = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3)
IOU_THR = (0.4, 0.5, 0.55, 0.6, 0.7)


@dataclass
class BoxTuned:
    point: int  # index into BoxProblem.points_; 0 is the pipeline's own settings
    notes: tuple[str, ...] = ()


class BoxProblem(TuningProblem[BoxTuned]):
    """The detection tuning problem (registered as ``boxes``)."""

    unit = "images"
    gain_label = "mAP, + helps"

    def __init__(self, plan: Plan, sources: list[MemberSource], opts: TuneOptions):
        from kaggle_tta.config.errors import ConfigError

        if not opts.thresholds:
            raise ConfigError("--no-thresholds: detection tunes skip_box_thr and iou_thr only; nothing is left to tune")
        self.plan, self.cfg = plan, plan.cfg
        d = plan.cfg.detection
        self.rule = d.map_rule
        self.metric = MAP_RULES[self.rule][2]
        self.grid = [
            (d.skip_box_thr, d.iou_thr),
            *((s, i) for s, i in product(SKIP_BOX_THR, IOU_THR) if (s, i) != (d.skip_box_thr, d.iou_thr)),
        ]
        self.truth = load_truth(plan.cfg, plan.testset.ids, plan.classes)
        sizes = sources[0].entry.read_sizes()  # type: ignore[union-attr]
        self.boxes = [self._fused(sources, sizes, s, i) for s, i in self.grid]

    def _fused(self, sources: list[MemberSource], sizes: np.ndarray, skip: float, iou: float) -> list[Any]:
        d = self.cfg.detection.model_copy(update={"skip_box_thr": skip, "iou_thr": iou})
        cfg = self.cfg.model_copy(update={"detection": d})
        members = {s.name: member_boxes(s, sizes, d, weights=cfg.member(s.name).view_weights) for s in sources}
        return evaluate_boxes(cfg, members, sizes)[cfg.submission_source]

    @property
    def n_units(self) -> int:
        return len(self.truth)

    @property
    def scores(self) -> list[tuple[str, bool]]:
        return [(self.metric, True)]

    def _map(self, point: int, rows: np.ndarray) -> float:
        return mean_ap(
            [self.boxes[point][i] for i in rows], [self.truth[i] for i in rows], len(self.plan.classes), rule=self.rule
        )

    def untuned(self) -> BoxTuned:
        return BoxTuned(0)

    def fit(self, train: np.ndarray) -> BoxTuned:
        rows = np.flatnonzero(train)
        return BoxTuned(int(np.argmax([self._map(p, rows) for p in range(len(self.grid))])))

    def score(self, tuned: BoxTuned, rows: np.ndarray) -> dict[str, float]:
        return {self.metric: self._map(tuned.point, np.asarray(rows))}

    def n_params(self) -> dict[str, int]:
        return {"skip_box_thr and iou_thr": 2}

    def overrides(self, tuned: BoxTuned) -> dict[str, Any]:
        s, i = self.grid[tuned.point]
        return {"detection": {"skip_box_thr": float(s), "iou_thr": float(i)}}

    def tables(self, before: BoxTuned, after: BoxTuned) -> dict[str, Any]:
        import polars as pl

        every = np.arange(self.n_units)
        rows = [
            {
                "skip_box_thr": s,
                "iou_thr": i,
                self.metric: self._map(p, every),
                "pipeline's": p == before.point,
                "tuned": p == after.point,
            }
            for p, (s, i) in enumerate(self.grid)
        ]
        return {"thresholds": pl.DataFrame(rows).sort(self.metric, descending=True)}

    def points(self, tuned: BoxTuned, tables: dict[str, Any]) -> list[Point]:
        return []
