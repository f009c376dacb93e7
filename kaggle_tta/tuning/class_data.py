"""A classification pipeline's labelled rows and cached members, and its predictions under a
tuning computed exactly as the blend computes them (kaggle_tta.ops.merge.reduce_views and
blend, the DAG in its order): what the classification problem (kaggle_tta.tuning.classes),
its gates (kaggle_tta.tuning.gates) and its tables (kaggle_tta.tuning.classes_report) read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kaggle_tta.config import BlendConfig
from kaggle_tta.config.errors import ConfigError
from kaggle_tta.exec.dag import MemberSource, evaluate_dag
from kaggle_tta.io.data import load_labels
from kaggle_tta.ops.merge import Prediction, blend, to_probs
from kaggle_tta.ops.metrics import Metric, metric_named, names_for
from kaggle_tta.tuning import losses
from kaggle_tta.tuning.cache import read_view, view_seconds
from kaggle_tta.tuning.gate_results import GateSearch
from kaggle_tta.tuning.member import MemberData
from kaggle_tta.tuning.options import TuneOptions
from kaggle_tta.tuning.views import ViewPolicy

if TYPE_CHECKING:
    from kaggle_tta.engine.plan import Plan


@dataclass
class Tuned:
    """One tuning's result: a view policy per member, weights per blend, thresholds."""

    members: dict[str, ViewPolicy]
    blends: dict[str, np.ndarray]
    threshold: float | np.ndarray
    notes: list[str] = field(default_factory=list)
    gate_search: GateSearch | None = None  # --adaptive: the gates learned (each member's ViewPolicy.gate holds its own)
    _nodes: dict[str, Prediction] | None = field(default=None, repr=False)

    def set_nodes(self, nodes: dict[str, Prediction] | None) -> None:
        """Every node's prediction on every row under this tuning, as computed while fitting
        (None: computed again when asked, e.g. once gates are set)."""
        self._nodes = nodes


def resolve_metric(spec: str | None, multilabel: bool) -> Metric:
    """The task's metric (accuracy; micro F1 for multi-label), a registered name
    (kaggle_tta.ops.metrics: qwk, macro_f1, auc, logloss, ...), nll, or module:callable."""
    name = spec or ("f1" if multilabel else "accuracy")
    kind = "multilabel" if multilabel else "single"
    if name == "nll":
        return Metric(
            "NLL",
            lambda y, p, t: float(losses.nll_of_probs(p, y).mean()),
            False,
            per_row=lambda y, p, t: np.asarray(losses.nll_of_probs(p, y), np.float64),
        )
    known = metric_named(name)
    if known is not None:
        if kind not in known.kinds:
            raise ConfigError(
                f"--metric {name}: it does not score {'multi-label' if multilabel else 'single-label'} pipelines; "
                f"use one of {', '.join(names_for(kind))}"
            )
        return known
    if ":" not in name:
        raise ConfigError(
            f"--metric {name}: use nll, one of {', '.join(names_for(kind))}, or module:callable "
            "(called as fn(y_true, probs) -> float, higher is better)"
        )
    from kaggle_tta.io.models import import_callable

    fn = import_callable(name, "--metric")  # what it raises is one line naming it

    def score(y: np.ndarray, p: np.ndarray, t: Any) -> float:
        value = fn(y, p)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"--metric ({name}) returned {type(value).__name__}, not a number; return a float, higher is better"
            ) from None

    return Metric(name, score)


def blend_node(b: BlendConfig, inputs: list[Prediction], weights: np.ndarray) -> Prediction:
    """A blend's prediction as ``kaggle-tta blend`` computes it, with these member weights."""
    return blend(str(b.method), inputs, weights.tolist(), b.space, b.power)


class ClassData:
    """The labelled rows ``y``, each member's cached views (:class:`MemberData`), the metric,
    and every prediction of a :class:`Tuned` on them."""

    def __init__(self, plan: Plan, sources: list[MemberSource], opts: TuneOptions):
        self.plan, self.cfg, self.opts = plan, plan.cfg, opts
        y = load_labels(plan.cfg, plan.testset.ids, plan.classes)
        assert y is not None
        self.y = y
        self.multilabel = plan.cfg.multilabel
        self.metric = resolve_metric(opts.metric or plan.cfg.metric, self.multilabel)
        self.members: dict[str, MemberData] = {}
        for s, mp in zip(sources, plan.members):
            m = plan.cfg.member(s.name)
            w = m.view_class_weights if m.view_class_weights is not None else m.view_weights
            self.members[s.name] = MemberData(
                s.name,
                list(s.views),
                [read_view(s, v) for v in s.views],
                mp.activation,
                str(m.merge),
                view_seconds(s),
                y,
                m.temperature,
                None if w is None else np.asarray(w, dtype=np.float64),
            )
        self.pipeline_gates = {mp.name: mp.gate for mp in plan.members}  # adaptive as the pipeline sets it (as is)

    @property
    def n_units(self) -> int:
        return len(self.y)

    @property
    def scores(self) -> list[tuple[str, bool]]:
        """(name, higher is better) of what is scored: the metric, then NLL."""
        out = [(self.metric.name, self.metric.higher_is_better)]
        return out + ([("NLL", False)] if self.metric.name != "NLL" else [])

    def untuned(self) -> Tuned:
        members = {
            n: ViewPolicy(
                m.weights if m.weights is not None else np.ones(len(m.views)),
                m.temperature,
                gate=self.pipeline_gates.get(n),
            )
            for n, m in self.members.items()
        }
        blends = {
            b.name: np.asarray(b.weights if b.weights is not None else [1.0] * len(b.inputs), dtype=np.float64)
            for b in self.cfg.blends
        }
        th = self.cfg.submission.threshold
        return Tuned(members, blends, np.asarray(th, dtype=np.float32) if isinstance(th, list) else th)

    def member_prediction(self, name: str, p: ViewPolicy, drop: int | None = None) -> Prediction:
        """The member's merge as the blend computes it: its kept views, weights and
        temperature, and its gate's masks where it has one (full TTA at 1.0: as
        api.sources_for, no masks)."""
        m = self.members[name]
        kept = [k for k in p.kept() if k != drop]
        w = p.weights[kept]
        uniform = len(kept) == 1 or (w.ndim == 1 and np.all(w == w[0]))  # as dag.view_weights: one view weighs nothing
        return m.predict([m.views[k] for k in kept], None if uniform else w, p.temperature, gate=p.gate)

    def nodes(self, tuned: Tuned) -> dict[str, Prediction]:
        """Every node's prediction on every row, as the blend computes it."""
        if tuned._nodes is None:
            preds = {n: self.member_prediction(n, p) for n, p in tuned.members.items()}
            tuned._nodes = evaluate_dag(self.cfg, preds, lambda b, ins: blend_node(b, ins, tuned.blends[b.name]))
        return tuned._nodes

    def score(
        self, tuned: Tuned, rows: np.ndarray, node: str | None = None, pred: Prediction | None = None
    ) -> dict[str, float]:
        """The metric and NLL of a node (default: the submission's source) on ``rows``."""
        p = pred if pred is not None else self.nodes(tuned)[node or self.cfg.submission_source]
        probs = to_probs(p)
        out = {self.metric.name: self.metric.fn(self.y[rows], probs[rows], tuned.threshold)}
        if self.metric.name != "NLL":
            nll = losses.prediction_nll(p, self.y)
            out["NLL"] = float(nll[rows].mean()) if nll is not None else float("nan")
        return out
