"""Tuning a classification pipeline (single- or multi-label) from its cache: each member's
views, view weights and temperature, each blend's member weights, multi-label thresholds,
and with --adaptive each member's gate (kaggle_tta.tuning.gates).

Fitting works on a mask of training rows; every prediction it scores is computed exactly as
the blend computes it (kaggle_tta.tuning.class_data: kaggle_tta.ops.merge.reduce_views and
blend, the DAG in its order), so the tuned score reported is the score
``kaggle-tta blend --overrides tuned.yaml`` reports.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from kaggle_tta.config import BlendConfig
from kaggle_tta.exec.dag import MemberSource, evaluate_dag
from kaggle_tta.ops.gate import RULES
from kaggle_tta.ops.merge import Prediction, blend_terms, to_probs, weighted_sum
from kaggle_tta.tuning import classes_report as rep
from kaggle_tta.tuning import ensemble, gates, gates_report, losses
from kaggle_tta.tuning.class_data import ClassData, Tuned, blend_node
from kaggle_tta.tuning.gate_results import HeldOut
from kaggle_tta.tuning.options import TuneOptions
from kaggle_tta.tuning.problem import Point, TuningProblem
from kaggle_tta.tuning.thresholds import tune_thresholds
from kaggle_tta.tuning.views import ViewSettings, tune_views

if TYPE_CHECKING:
    from kaggle_tta.engine.plan import Plan


KEEP_LADDER = (0.925, 0.95, 0.975, 1.0)  # in-sample keeps calibrate_keep tries above --keep-gain


class ClassProblem(ClassData, TuningProblem[Tuned]):
    """The classification tuning problem (registered as ``classes``)."""

    unit = "rows"
    gain_label = "NLL, + helps"

    def __init__(self, plan: Plan, sources: list[MemberSource], opts: TuneOptions):
        super().__init__(plan, sources, opts)
        self.settings = ViewSettings(
            views=opts.views,
            view_weights=opts.view_weights,
            class_weights=opts.class_weights,
            temperature=opts.temperature,
            seed=opts.seed,
        )
        self.rules = gate_rules(
            opts.adaptive, {n: g.rule if g is not None else None for n, g in self.pipeline_gates.items()}
        )
        self.held_out: list[HeldOut] = []  # the folds' gates scored on their held-out rows (fit appends)
        self.keep_gain = opts.keep_gain  # what the gates keep in sample: --keep-gain, or what calibrate_keep chose
        self.calibration: list[
            tuple[float, float | None, float | None]
        ] = []  # (in-sample keep tried, the folds' pooled held-out keep, its SE)

    # ---- fitting -------------------------------------------------------------------------------

    def fit(self, train: np.ndarray, gates_too: bool = True) -> Tuned:
        """Tunes on the rows where ``train`` is True: views, weights and thresholds on full
        TTA (no gate), then, with --adaptive (and ``gates_too``), each member's gate."""
        base = self.untuned()
        tuning_views = any((self.opts.views, self.opts.view_weights, self.opts.class_weights, self.opts.temperature))
        members = {
            n: replace(tune_views(m, train, self.settings) if tuning_views else base.members[n], gate=None)
            for n, m in self.members.items()
        }
        tuned = Tuned(members, dict(base.blends), base.threshold)
        preds = {n: self.member_prediction(n, p) for n, p in members.items()}

        def combine(b: BlendConfig, inputs: list[Prediction]) -> Prediction:
            if self.opts.member_weights != "off" and len(inputs) > 1:
                tuned.blends[b.name] = self._tune_blend(b, inputs, train, tuned)
            return blend_node(b, inputs, tuned.blends[b.name])

        nodes = evaluate_dag(self.cfg, preds, combine)
        if self.multilabel and self.opts.thresholds:
            probs = to_probs(nodes[self.cfg.submission_source]).astype(np.float32)
            tuned.threshold = tune_thresholds(probs[train], self.y[train], macro=self.metric.name == "macro_f1")
        tuned.set_nodes(nodes)
        if gates_too and any(self.rules.values()):
            self._fit_gates(tuned, train)
        return tuned

    def _fit_gates(self, tuned: Tuned, train: np.ndarray) -> None:
        """Learns the gates on ``train``; a fold's (``train`` not every row) are scored on
        its held-out rows, for the gate table's held-out column."""
        search = gates.learn(self, tuned, train, {n: r for n, r in self.rules.items() if r}, keep=self.keep_gain)
        search.calibration = list(self.calibration)
        tuned.gate_search = search
        for name, gate in search.gates.items():
            tuned.members[name].gate = gate
        if search.gates:
            tuned.set_nodes(None)  # the nodes again, through reduce_views with the gates' masks
        if train.all():
            self.held_out = []
            search.probs_none = search.probs_full = None  # [N, C] each, for held_out only: no held-out rows here
            return
        held = gates.held_out(search, self.nodes(tuned), self, np.flatnonzero(~train), tuned.threshold, self.opts.seed)
        if held is not None:
            self.held_out.append(held)

    def calibrate_keep(self, folds: int, seed: int) -> None:
        """--keep-gain is what the gates should keep on images tune has not seen. Gates
        learned to keep exactly that in sample keep less out of sample (the loosest thresholds
        that pass are, in part, those the training rows happen to favour). So, with folds and
        --calibrate-keep: on each of the estimate's folds (the same split), everything but
        the gates is tuned on the other folds, then gates are learned at each in-sample keep
        of KEEP_LADDER from --keep-gain up and scored on the held-out fold; the lowest keep
        whose held-out gain kept, pooled over the folds, reaches --keep-gain by --keep-margin
        standard errors (gates.pooled_spread; a figure with no spread known: the figure
        alone) is the one the final gates (and the estimate's
        folds) are learned at; 1.0 where none does."""
        rules = {n: r for n, r in self.rules.items() if r}
        if not rules or folds < 2 or not self.opts.calibrate_keep:
            return
        n, keep = self.n_units, self.opts.keep_gain
        ladder = [keep, *(k for k in KEEP_LADDER if k > keep + 1e-9)]
        parts = np.array_split(np.random.default_rng(seed).permutation(n), min(folds, n))
        got: dict[float, list[HeldOut]] = {k: [] for k in ladder}
        probe = None
        for held in parts:
            train = np.ones(n, dtype=bool)
            train[held] = False
            base = self.fit(train, gates_too=False)  # views, weights and blends on the other folds
            for k in ladder:
                t = Tuned(
                    {m: replace(p, gate=None) for m, p in base.members.items()}, dict(base.blends), base.threshold
                )
                search = probe = gates.learn(self, t, train, rules, keep=k)
                for name, gate in search.gates.items():
                    t.members[name].gate = gate
                h = gates.held_out(search, self.nodes(t), self, np.flatnonzero(~train), t.threshold, seed)
                if h is not None:
                    got[k].append(h)
        if probe is None:
            return
        self.calibration = [(k, gates.pooled_kept(probe, got[k]), gates.pooled_spread(probe, got[k])) for k in ladder]
        if all(v is None for _, v, _ in self.calibration):
            return  # no held-out gain to keep: nothing to calibrate against
        z = self.opts.keep_margin
        # a figure without a spread (too few resamples with a gain) is taken as it is
        self.keep_gain = next(
            (
                k
                for k, v, se in self.calibration
                if v is not None and v - (z * se if z and se is not None else 0.0) >= keep - 1e-12
            ),
            1.0,
        )

    def _tune_blend(self, b: BlendConfig, inputs: list[Prediction], train: np.ndarray, tuned: Tuned) -> np.ndarray:
        values, kind, root = blend_terms(str(b.method), inputs, b.space, b.power)
        terms = list(values)
        act, power = inputs[0].activation, b.power if root else None
        use_metric = self.opts.objective == "metric" or kind == "scores"
        if kind == "scores" and self.opts.objective == "nll":
            tuned.notes.append(
                f"blends.{b.name}: rank_mean gives scores, not probabilities; its weights maximize {self.metric.name}"
            )
        if (
            not use_metric and kind == "probs" and b.method == "mean" and not self.multilabel
        ):  # q[y] is linear in w: gather once
            cols = np.stack([t[np.arange(len(self.y)), self.y] for t in terms])[:, train].astype(np.float64)
            objective = lambda w: float(-np.log(np.clip((w / w.sum()) @ cols, losses.EPS, None)).mean())  # noqa: E731
        elif not use_metric and kind == "logits":  # logits in, logits out: summed block by block, never held whole

            def objective(w: np.ndarray) -> float:
                return float(
                    losses.nll_rows([(t, wi) for t, wi in zip(terms, w / w.sum()) if wi], "mean", act, self.y)[
                        train
                    ].mean()
                )
        else:
            sign = -1.0 if self.metric.higher_is_better else 1.0

            def objective(w: np.ndarray) -> float:
                pred = weighted_sum(terms, w, kind, act, power)
                if not use_metric:
                    return float(losses.prediction_nll(pred, self.y)[train].mean())  # type: ignore[index]
                return sign * self.metric.fn(self.y[train], to_probs(pred)[train], tuned.threshold)

        counts, value = ensemble.hill_climb(objective, len(terms), self.opts.max_steps)
        if self.opts.member_weights == "optimise":
            counts, value = ensemble.optimise_weights(objective, counts)
        return counts

    def n_params(self) -> dict[str, int]:
        """How many values each tuner sets (for the too-few-rows warning)."""
        o, c = self.opts, len(self.plan.classes)
        out = {
            "temperature": len(self.members) if o.temperature else 0,
            "views": sum(len(m.views) for m in self.members.values()) if (o.views or o.view_weights) else 0,
            "class weights": sum(len(m.views) * c for m in self.members.values()) if o.class_weights else 0,
            "member weights": sum(len(b.inputs) for b in self.cfg.blends) if o.member_weights != "off" else 0,
            "thresholds": c if (self.multilabel and o.thresholds) else 0,
            "gates": sum(1 for r in self.rules.values() if r),
        }
        return {k: v for k, v in out.items() if v}

    # ---- what is written -------------------------------------------------------------------

    def tables(self, before: Tuned, after: Tuned) -> dict[str, Any]:
        out = {"views": rep.view_table(self, before, after), "members": rep.member_table(self, before, after)}
        if self.cfg.blends:
            out["blends"] = rep.blend_table(self, before, after)
        if self.multilabel and self.opts.thresholds:
            out["thresholds"] = _threshold_table(self.plan.classes, before.threshold, after.threshold)
        if any(m.activation != "none" for m in self.members.values()):
            out["uncertainty"] = rep.uncertainty_table(self, before, after)
        if after.gate_search is not None and after.gate_search.members:
            out["gates"] = gates_report.table(after.gate_search, self.held_out, self.n_units)
        return out

    def report_notes(self, tuned: Tuned) -> list[str]:
        """What the report adds below its tables: the gates' summary and notes."""
        search = tuned.gate_search
        if search is None:
            return [
                f"adaptive: no gate learned (--adaptive off); members.{n}.adaptive is null in tuned.yaml: "
                "plain TTA, as tune scored it"
                for n, g in self.pipeline_gates.items()
                if g is not None
            ]
        out = list(search.notes)
        if self.calibration:
            tried = ", ".join(
                f"{k:g} -> {'—' if v is None else f'{100 * v:.1f}%'}{'' if se is None else f' ± {100 * se:.1f}%'}"
                for k, v, se in self.calibration
            )
            out.append(
                f"adaptive: keep-gain {self.opts.keep_gain:g} on new images: "
                f"the gates are learned to keep {self.keep_gain:g} in sample "
                f"(--calibrate-keep, --keep-margin {self.opts.keep_margin:g} SE; held-out gain kept, "
                f"pooled over {self.opts.folds} folds, ± its bootstrap SE, "
                f"at each in-sample keep: {tried})"
            )
        if search.learned:
            out.append(gates_report.summary(search, self.held_out, self.n_units))
        return out

    def points(self, tuned: Tuned, tables: dict[str, Any]) -> list[Point]:
        return rep.picture_points(self, tuned, tables["views"])

    def overrides(self, tuned: Tuned) -> dict[str, Any]:
        """tuned.yaml: a partial pipeline with each member's tta, view weights and
        temperature, each blend's weights and the thresholds."""
        members = []
        for name, p in tuned.members.items():
            m, kept = self.members[name], p.kept()
            w = p.weights[kept]
            entry: dict[str, Any] = {
                "name": name,
                "tta": [m.views[k] for k in kept],
                "temperature": float(p.temperature),
            }
            uniform = w.ndim == 1 and np.all(w == w[0])
            entry["view_weights"] = None if (uniform or w.ndim == 2) else _numbers(w)
            entry["view_class_weights"] = [_numbers(row) for row in w] if w.ndim == 2 else None
            if (
                p.gate is not None
            ):  # every rule's key, so that an adaptive of the pipeline's merged under it keeps no other
                entry["adaptive"] = {
                    "first": p.gate.first,
                    **{r: (float(p.gate.threshold) if r == p.gate.rule else None) for r in RULES},
                }
            elif self.pipeline_gates.get(name) is not None:
                entry["adaptive"] = (
                    None  # no gate learned (--adaptive off, one view, no gain): plain TTA, as tune scored it
                )
            members.append(entry)
        out: dict[str, Any] = {"members": members}
        if self.cfg.blends:
            out["blends"] = [{"name": b, "weights": _numbers(w)} for b, w in tuned.blends.items()]
        if self.multilabel and self.opts.thresholds:
            out["submission"] = {"threshold": _numbers(np.asarray(tuned.threshold))}
        return out


def gate_rules(option: str | None, pipeline: dict[str, str | None]) -> dict[str, str | None]:
    """Member -> the rule its gate is learned with (None: no gate): ``--adaptive`` for every
    member; by default (None) the rule of the members whose pipeline sets adaptive."""
    if option is None:
        return dict(pipeline)
    return {n: option if option in RULES else None for n in pipeline}


def _threshold_table(classes: list[str], before: Any, after: Any) -> Any:
    import polars as pl

    b = np.broadcast_to(np.asarray(before, dtype=np.float64), (len(classes),))
    a = np.broadcast_to(np.asarray(after, dtype=np.float64), (len(classes),))
    return pl.DataFrame({"class": classes, "threshold before": b.round(4), "threshold after": a.round(4)})


def _numbers(w: np.ndarray) -> list[int | float]:
    """Whole numbers as ints (hill climbing's copies), others as floats."""
    return [int(x) if float(x).is_integer() else float(x) for x in np.asarray(w, dtype=np.float64).tolist()]
