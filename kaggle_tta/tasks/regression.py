"""Regression: one float per target and image (``data.classes`` names the targets; PetFinder's
``Pawpularity``), merged over views and blended as values, written as ``id, <target>...``.

The engine side is classification's (an ``[N, C]`` output per image, every view inverting to
the identity): only the activation, the merges, the writer and the scores differ. A member's
``activation`` is ``none`` (the model outputs the value) or ``sigmoid`` (it outputs a logit of
value / scale); ``regression.scale``, ``offset`` and ``clip`` map merged values to what is
written. Scores with ``data.labels`` (its label column holding the number): RMSE and MAE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from kaggle_tta.config import MemberConfig, PipelineConfig, SubmissionConfig
from kaggle_tta.config.errors import ConfigError, DataError
from kaggle_tta.exec.dag import MemberSource, blocks, node_predictions
from kaggle_tta.ops.merge import to_probs
from kaggle_tta.ops.metrics import check_metric
from kaggle_tta.tasks.base import TaskOutput, register_task
from kaggle_tta.tasks.classification import Classification

if TYPE_CHECKING:
    from kaggle_tta.engine.plan import Plan

BLOCK_ROWS = 4096
ACTIVATIONS = ("none", "sigmoid")


def write_values(
    ids: Sequence[str], values: np.ndarray, targets: Sequence[str], spec: SubmissionConfig
) -> pl.DataFrame:
    """``id`` and one float column per target (``class_columns`` renames them); integer
    grades (``regression.cutoffs``) as integers."""
    cols = spec.class_columns or list(targets)
    data = np.asarray(values)
    data = data if data.dtype.kind == "i" else data.astype(np.float64)
    data = data.reshape(len(ids), -1) if len(ids) else np.zeros((0, len(cols)))
    return pl.DataFrame(
        [pl.Series(spec.id_column, list(ids), dtype=pl.String), *(pl.Series(c, data[:, k]) for k, c in enumerate(cols))]
    )


def load_values(cfg: PipelineConfig, ids: Sequence[str]) -> np.ndarray | None:
    """``data.labels`` as numbers, one per test id (None without labels)."""
    from kaggle_tta.io.data import label_table

    found = label_table(cfg, ids)
    if found is None:
        return None
    path, table = found
    out = np.empty(len(ids), dtype=np.float64)
    for k, i in enumerate(ids):
        try:
            out[k] = float(table[i])
        except (TypeError, ValueError):
            raise DataError(f"{path}: label {table[i]!r} of id {i!r} is not a number (task: regression)") from None
    return out


def scores(values: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """RMSE and MAE over every image and target (lower is better)."""
    err = values.reshape(len(truth), -1)[:, 0] - truth
    return {"RMSE": float(np.sqrt(np.mean(err**2))), "MAE": float(np.mean(np.abs(err)))}


@register_task
class Regression(Classification):
    name = "regression"
    merges = ("mean",)
    blends = ("mean",)
    writers = {"values": write_values}
    uncertainty = False
    adaptive = False
    tuner = None

    def validate(self, cfg: PipelineConfig) -> None:
        check_metric(cfg.metric, "regression")
        if cfg.multilabel:
            raise ConfigError("multilabel: regression writes values; remove multilabel")
        acts = {"none" if m.activation == "auto" else m.activation for m in cfg.members}
        if len(acts) > 1:
            raise ConfigError(
                "members.*.activation: regression members blend values in one unit; give every member the same "
                f"activation (found {', '.join(sorted(acts))})"
            )
        for m in cfg.members:
            if m.activation not in ("auto", *ACTIVATIONS):
                raise ConfigError(
                    f"members.{m.name}.activation: regression members output values (none) or a logit of "
                    f"value / regression.scale (sigmoid), not {m.activation}"
                )

    def activation(self, cfg: PipelineConfig, m: MemberConfig, n_classes: int) -> str:
        return "none" if m.activation == "auto" else m.activation

    def check_plan(self, plan: Plan) -> None:
        spec = plan.cfg.submission
        if spec.class_columns is not None and len(spec.class_columns) != len(plan.classes):
            raise ConfigError(
                f"submission.class_columns: {len(spec.class_columns)} names for {len(plan.classes)} targets"
            )
        if plan.cfg.data.labels is not None and len(plan.classes) > 1:
            raise ConfigError(
                f"data.labels: one label column scores one target; {len(plan.classes)} targets given (data.classes)"
            )
        load_values(plan.cfg, plan.testset.ids)  # a bad labels file fails now, not after inference

    def columns(self, plan: Plan) -> list[str]:
        return write_values([], np.zeros((0, len(plan.classes))), plan.classes, plan.cfg.submission).columns

    def blend(self, plan: Plan, sources: Sequence[MemberSource], sizes: np.ndarray | None, plain: bool) -> TaskOutput:
        cfg = plan.cfg
        ids = plan.testset.ids
        truth = load_values(cfg, ids)
        values: dict[str, list[np.ndarray]] = {}
        plain_values: dict[str, list[np.ndarray]] = {}
        ungraded: list[np.ndarray] = []  # the source's, for groups: graded once aggregated (finish)
        for lo, hi in blocks(len(ids), BLOCK_ROWS):
            for name, pred in node_predictions(cfg, sources, lo, hi).items():
                v = self.written(cfg, to_probs(pred), grade=False)
                values.setdefault(name, []).append(self.graded(cfg, v))
                if name == cfg.submission_source:
                    ungraded.append(v)
            if plain and truth is not None:
                for name, pred in node_predictions(cfg, sources, lo, hi, plain=True).items():
                    plain_values.setdefault(name, []).append(self.written(cfg, to_probs(pred)))
        whole = {k: np.concatenate(v) for k, v in values.items()}
        source = np.concatenate(ungraded) if plan.groups is not None else whole[cfg.submission_source]
        table = write_values(ids, source, plan.classes, cfg.submission)
        if truth is None:
            return TaskOutput(table, [], {}, {})
        tta = {k: scores(v, truth) for k, v in whole.items()}
        no_tta = {k: scores(np.concatenate(v), truth) for k, v in plain_values.items()}
        return TaskOutput(table, ["RMSE", "MAE"], tta, no_tta)

    @staticmethod
    def written(cfg: PipelineConfig, v: Any, grade: bool = True) -> np.ndarray:
        """Merged values as written: ``offset + scale * v``, clipped to ``regression.clip``,
        then graded by ``regression.cutoffs``."""
        r = cfg.regression
        out = r.offset + r.scale * np.asarray(v, dtype=np.float64)
        out = np.clip(out, *r.clip) if r.clip is not None else out
        return Regression.graded(cfg, out) if grade else out

    @staticmethod
    def graded(cfg: PipelineConfig, v: np.ndarray) -> np.ndarray:
        """Values as ``regression.cutoffs`` grades them (as they are without cutoffs)."""
        cuts = cfg.regression.cutoffs
        return np.digitize(v, cuts).astype(np.int64) if cuts else v

    def finish(self, table: pl.DataFrame, plan: Plan) -> pl.DataFrame:
        """Grouped rows (``submission.group``) graded once aggregated: a group's grade is its
        aggregated value's, never an average of grades."""
        if plan.groups is None or not plan.cfg.regression.cutoffs:
            return table
        return table.with_columns(pl.Series(c, self.graded(plan.cfg, table[c].to_numpy())) for c in table.columns[1:])
