"""Learning each member's adaptive gate (``kaggle-tta tune --adaptive``; kaggle_tta.ops.gate):
the loosest thresholds that keep a share of the full TTA's gain at the fewest forwards.

After the views, weights, temperatures and blend weights are tuned (full TTA), each gated
member gets a first view (the pipeline's ``adaptive.first`` where it is among the tuned
views, else identity where it is, else the tuned first view) and the rule asked for. The
cost is the extra forwards, ``sum_m (V_m - 1) x rows sent on`` (V_m: the member's tuned
views; a row is sent on to the other views when its first view's score is not above the
threshold). The constraints, on the training rows: the submission node's metric gain over
no TTA (each member's first view alone) is at least ``keep_gain`` x the full TTA's gain; and
of the decisions the full TTA changes (the submission's class of a row; under multi-label,
each class's yes or no), the gates make at least ``keep_changes`` as the full TTA does. The
second reads no label: the gain is helped rows minus hurt rows, a small difference that a
gate can keep in sample by dropping rows whose help and harm happen to cancel there; the
changed decisions count both, so a gate that keeps them keeps the gain out of sample too.

The search is deterministic, over each member's candidates (0, 1 and the quantiles of its
first view's scores on the training rows): from every threshold at 1.0 (full TTA), each
step moves one member's threshold to any lower candidate that keeps the constraint and
saves forwards; a move that loses nothing goes first (the one saving the most), then the
one saving the most forwards per unit lost (its share of the full TTA's gain plus, where
counted, its share of the changed decisions). It stops when no lower candidate of
any member keeps the constraint and saves a forward: no single threshold can then go lower.

Every prediction scored is the blend's: a gated member's rows are those of
kaggle_tta.ops.merge.reduce_views with the masks the blend gives it (dag.MemberSource.masks,
from adaptive.needs on the cached first view). The masked merge is row by row, so a row
sent on equals that row of the merge with every row sent on, and a row not sent on that
row of the merge with none: the search selects rows from those two (np.where) instead of
merging again, and the result is bit for bit what ``kaggle-tta blend`` computes (the
problem scores the chosen gates through reduce_views itself; tests compare the two).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from kaggle_tta.exec.dag import evaluate_dag
from kaggle_tta.ops.gate import Gate, needs, scores
from kaggle_tta.ops.merge import Prediction, to_probs
from kaggle_tta.tuning.class_data import ClassData, Tuned, blend_node
from kaggle_tta.tuning.gate_results import EPS, GateSearch, HeldOut, MemberGate
from kaggle_tta.tuning.member import MemberData
from kaggle_tta.tuning.views import ViewPolicy

LEVELS = 40  # candidates per member: 0, 1 and the k/LEVELS quantiles (k = 1 .. LEVELS - 1) of its scores
DIGITS = 6  # significant digits of a candidate threshold (what tuned.yaml holds, and what is scored)
BOOTSTRAP = 200  # resamples of the held-out rows behind pooled_spread


def first_view(configured: str | None, views: list[str]) -> str:
    """The pipeline's ``adaptive.first`` where tuning kept it, else identity where kept,
    else the first tuned view (plan.resolve_gate's rule, on the tuned views)."""
    if configured in views:
        return str(configured)
    return "identity" if "identity" in views else views[0]


def candidates(s: np.ndarray) -> list[float]:
    """0, 1 and the quantiles of the scores ``s`` (to DIGITS significant digits), descending."""
    q = np.quantile(s.astype(np.float64), np.arange(1, LEVELS) / LEVELS) if len(s) else np.array([])
    out = {0.0, 1.0} | {float(f"{x:.{DIGITS}g}") for x in q if 0.0 < x < 1.0}
    return sorted(out, reverse=True)


# ---- learning the gates on the training rows ----------------------------------------------


def learn(
    pb: ClassData, tuned: Tuned, train: np.ndarray, rules: dict[str, str], keep: float | None = None
) -> GateSearch:
    """The gates of the members in ``rules`` (member -> rule) for the tuned pipeline, on
    the training rows ``train`` (bool ``[N]``); ``tuned``'s members hold no gate yet.
    ``keep``: the share of the gain to keep in sample (default --keep-gain)."""
    search = GateSearch(
        pb.metric.name,
        pb.metric.higher_is_better,
        pb.opts.keep_gain if keep is None else keep,
        int(train.sum()),
        {},
        {},
        keep_changes=pb.opts.keep_changes,
    )
    for name, p in tuned.members.items():
        _add_member(search, pb, name, p, rules.get(name), train)
    if not search.members:
        return search
    blend = _Blend(pb, tuned, search)
    search.value = blend.value
    p_none, p_full = search.probs_none, search.probs_full = blend.probs(search.alone), blend.probs(search.fixed)
    search.none = blend.value(search.alone, train, p_none)
    search.full = blend.value(search.fixed, train, p_full)
    d_full = blend.decisions(p_full)[train]
    changed = d_full != blend.decisions(p_none)[train]  # the decisions the full TTA changes: what a gate must keep
    search.changed = int(changed.sum())
    if search.signed(search.full) - search.signed(search.none) <= EPS:
        search.notes.append(
            f"adaptive: the full TTA gains nothing over each member's first view alone on these rows "
            f"({search.metric} {search.full:.4f} against {search.none:.4f}): no gate learned "
            "(a gate at 0 would only say 'fewer views'; see the views table)"
        )
        search.adaptive = search.full
        return search
    descent = _Descent(search, blend, train, d_full, changed)
    idx = descent.run()
    for g, j in zip(descent.gated, idx):
        g.at = j
    search.learned = True
    v, search.changes_made = descent.scored(idx)
    search.adaptive = search.signed(v)
    return search


def _add_member(
    search: GateSearch, pb: ClassData, name: str, p: ViewPolicy, rule: str | None, train: np.ndarray
) -> None:
    """The member's full TTA and first view alone into ``search``; with a ``rule``, its gate's
    candidates where it can be gated (else a note says why not, and it counts as ungated)."""
    m = pb.members[name]
    views = [m.views[k] for k in p.kept()]
    cfg_adaptive = pb.cfg.member(name).adaptive
    configured = cfg_adaptive.first if cfg_adaptive is not None else None
    first = first_view(configured, views)
    search.fixed[name] = pb.member_prediction(name, p)
    search.alone[name] = m.predict([first], None, p.temperature)
    if rule is None:
        if len(views) > 1:
            search.ungated[name] = len(views) - 1
        return
    if len(views) < 2:
        search.notes.append(f"members.{name}: one tuned view ({views[0]}): no other views to skip, no gate")
        return
    if m.activation == "none":
        search.notes.append(f"members.{name}: activation none gives no probabilities for the gate to read: no gate")
        search.ungated[name] = len(views) - 1
        return
    if configured is not None and configured != first:
        search.notes.append(
            f"members.{name}: adaptive.first {configured} is not among the tuned views {views}: the gate reads {first}"
        )
    gate = _member_gate(name, m, p, rule, first, views, train, search.fixed[name])
    search.alone[name] = gate.alone
    search.members[name] = gate


def _member_gate(
    name: str,
    m: MemberData,
    p: ViewPolicy,
    rule: str,
    first: str,
    views: list[str],
    train: np.ndarray,
    full: Prediction,
) -> MemberGate:
    """A member's candidates (from its first view's scores on the training rows), the rows
    each sends on, and its masked merges with every row sent on and with none."""
    z = m.z[m.views.index(first)]
    cands = candidates(scores(z, m.activation, rule)[train])
    sends = [needs(z, m.activation, Gate(first, rule, c)) for c in cands]
    kept = p.kept()
    w = p.weights[kept]
    uniform = w.ndim == 1 and np.all(w == w[0])
    wv = None if uniform else w
    every = m.predict(views, wv, p.temperature, gate=Gate(first, rule, 0.0), send=np.ones(len(z), bool))
    none = m.predict(views, wv, p.temperature, gate=Gate(first, rule, 0.0), send=np.zeros(len(z), bool))
    return MemberGate(name, rule, first, len(views), cands, sends, every, none, full)


class _Blend:
    """The submission node of the tuned pipeline for any member predictions, its metric and
    its decisions (each blend counted in ``search.evaluations``)."""

    def __init__(self, pb: ClassData, tuned: Tuned, search: GateSearch):
        self.pb, self.tuned, self.search = pb, tuned, search

    def probs(self, preds: dict[str, Prediction]) -> np.ndarray:
        self.search.evaluations += 1
        nodes = evaluate_dag(self.pb.cfg, preds, lambda b, ins: blend_node(b, ins, self.tuned.blends[b.name]))
        return to_probs(nodes[self.pb.cfg.submission_source])

    def value(self, preds: dict[str, Prediction], rows: np.ndarray, probs: np.ndarray | None = None) -> float:
        probs = self.probs(preds) if probs is None else probs
        return float(self.pb.metric.fn(self.pb.y[rows], probs[rows], self.tuned.threshold))

    def decisions(self, probs: np.ndarray) -> np.ndarray:
        """What the submission decides per row: the class, or (multi-label) each class's yes/no."""
        return probs >= np.asarray(self.tuned.threshold) if self.pb.multilabel else probs.argmax(-1)


class _Descent:
    """The search over the gated members' candidates (the module's docstring): from every
    threshold at 1.0, one member's threshold at a time moved to a lower candidate that keeps
    the constraint and saves forwards, until none does."""

    def __init__(self, search: GateSearch, blend: _Blend, train: np.ndarray, d_full: np.ndarray, changed: np.ndarray):
        self.search, self.blend, self.train = search, blend, train
        self.d_full, self.changed = d_full, changed
        self.gated = list(search.members.values())
        self.counts = [[int(s[train].sum()) for s in g.sends] for g in self.gated]
        self.gain = search.signed(search.full) - search.signed(search.none)
        self.required = search.signed(search.none) + search.keep * self.gain
        self.memo: dict[tuple[int, ...], tuple[float, float]] = {}

    def scored(self, idx: tuple[int, ...]) -> tuple[float, float]:
        """(the signed metric, the share of the full TTA's changed decisions made) of the gates ``idx``."""
        if idx not in self.memo:
            preds = dict(self.search.fixed)
            preds.update({g.name: g.prediction(j) for g, j in zip(self.gated, idx)})
            probs = self.blend.probs(preds)
            changed = self.changed
            made = (
                float((self.blend.decisions(probs)[self.train] == self.d_full)[changed].mean())
                if changed.any()
                else 1.0
            )
            self.memo[idx] = (self.search.signed(self.blend.value(preds, self.train, probs)), made)
        return self.memo[idx]

    def keeps(self, idx: tuple[int, ...]) -> bool:
        v, made = self.scored(idx)
        return v >= self.required - EPS and made >= self.search.keep_changes - EPS

    def cost(self, idx: tuple[int, ...]) -> int:
        return sum((g.views - 1) * c[j] for g, c, j in zip(self.gated, self.counts, idx))

    def run(self) -> tuple[int, ...]:
        """The candidates chosen, one per gated member."""
        idx = tuple(0 for _ in self.gated)
        while True:
            best = self.best_move(idx)
            if best is None:
                return idx
            idx = best

    def best_move(self, idx: tuple[int, ...]) -> tuple[int, ...] | None:
        """The move from ``idx`` that loses nothing and saves the most forwards, else the one
        saving the most per unit lost; None: no lower candidate keeps the constraint and
        saves a forward."""
        (cur, cur_made), cur_cost = self.scored(idx), self.cost(idx)
        best, best_rank = None, None
        for k, g in enumerate(self.gated):
            for j in range(idx[k] + 1, len(g.candidates)):
                new = idx[:k] + (j,) + idx[k + 1 :]
                saved = cur_cost - self.cost(new)
                if saved <= 0:
                    continue
                if not self.keeps(new):
                    continue
                v, made = self.scored(new)
                # what the move gives up: its share of the full TTA's gain, plus (where counted)
                # its share of the full TTA's changed decisions
                loss = (cur - v) / self.gain + ((cur_made - made) if self.search.keep_changes > 0 else 0.0)
                rank = (1, float(saved), v) if loss <= EPS else (0, saved / loss, v)
                if best_rank is None or rank > best_rank:
                    best, best_rank = new, rank
        return best


# ---- the gates on held-out rows ------------------------------------------------------------


def held_out(
    search: GateSearch,
    tuned_nodes: dict[str, Prediction],
    pb: ClassData,
    rows: np.ndarray,
    threshold: Any,
    seed: int = 0,
) -> HeldOut | None:
    """The fold's gates scored on its held-out rows: no TTA, full TTA and the gates (the
    tuned nodes, computed through reduce_views with the gates), the rows sent on, and the
    three on BOOTSTRAP resamples of those rows (seeded by ``seed`` and the fold's first row).
    Scores a search once: it frees the search's probabilities."""
    if not search.members or not len(rows) or search.probs_none is None or search.probs_full is None:
        return None
    y = pb.y[rows]
    probs = [p[rows] for p in (search.probs_none, search.probs_full, to_probs(tuned_nodes[pb.cfg.submission_source]))]
    search.probs_none = search.probs_full = None  # [N, C] each: the held-out rows are taken, the rest is not kept
    none, full, adaptive = (float(pb.metric.fn(y, p, threshold)) for p in probs)
    per_row = pb.metric.per_row
    if per_row is not None:  # a mean over rows (accuracy, NLL): each resample is a mean of those
        values = [per_row(y, p, threshold) for p in probs]

        def again(idx: np.ndarray) -> tuple[float, float, float]:
            a, b, c = (float(v[idx].mean()) for v in values)
            return a, b, c
    else:

        def again(idx: np.ndarray) -> tuple[float, float, float]:
            try:  # a user's metric may refuse a resample (a class missing from it): that resample is left out
                a, b, c = (float(pb.metric.fn(y[idx], p[idx], threshold)) for p in probs)
            except Exception:  # noqa: BLE001 - any failure of a user's callable on a resample
                return (float("nan"),) * 3
            return a, b, c

    sent = {n: int(g.sends[g.at][rows].sum()) if search.learned else len(rows) for n, g in search.members.items()}
    boot = resampled(again, len(rows), np.random.default_rng([seed, int(rows[0])]))
    return HeldOut(len(rows), none, full, adaptive, sent, boot)


def resampled(
    again: Callable[[np.ndarray], tuple[float, float, float]], n: int, rng: np.random.Generator
) -> np.ndarray:
    """[BOOTSTRAP, 3]: ``again(idx)`` (no TTA, full TTA, the gates) on BOOTSTRAP resamples of
    ``n`` rows with replacement, paired: the three are scored on the same rows."""
    return np.array([again(rng.integers(0, n, n)) for _ in range(BOOTSTRAP)], dtype=np.float64)


def pooled_kept(search: GateSearch, folds: list[HeldOut]) -> float | None:
    """The share of the full TTA's gain the folds' gates keep on their held-out rows, each
    fold's gains weighed by its rows (None: no fold, or the full TTA gains nothing there)."""
    return _pooled(search, [(f.rows, f.none, f.full, f.adaptive) for f in folds])


def _pooled(search: GateSearch, folds: list[tuple[int, float, float, float]]) -> float | None:
    if not folds:
        return None
    s = search.signed
    gained = sum(n * (s(a) - s(none)) for n, none, _, a in folds)
    full = sum(n * (s(f) - s(none)) for n, none, f, _ in folds)
    return gained / full if full > EPS else None


def pooled_spread(search: GateSearch, folds: list[HeldOut]) -> float | None:
    """The standard error of :func:`pooled_kept`: the spread of the share over BOOTSTRAP
    resamples of each fold's held-out rows (with replacement, paired: no TTA, full TTA and the
    gates scored on the same rows, so the rows where the gates and the full TTA decide alike
    add nothing; the folds' b-th resamples pooled, the folds being disjoint). The gain kept is
    a difference of a few rows where TTA helps a few percent of the images; this is the part of
    its uncertainty that comes from which rows were held out, each fold's gates as learned
    (not the spread of learning them on other rows). None: no fold, a fold without resamples,
    no gain to keep, or fewer than two resamples with a finite share."""
    boots = [f.boot for f in folds if f.boot is not None]
    if not folds or len(boots) < len(folds) or pooled_kept(search, folds) is None:
        return None
    shares = [
        got
        for b in range(BOOTSTRAP)
        if (got := _pooled(search, [(f.rows, r[b, 0], r[b, 1], r[b, 2]) for f, r in zip(folds, boots)])) is not None
        and np.isfinite(got)
    ]
    return float(np.std(shares, ddof=1)) if len(shares) > 1 else None
