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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kaggle_tta.exec.dag import evaluate_dag
from kaggle_tta.ops.gate import Gate, needs, scores
from kaggle_tta.ops.merge import Prediction, blend, to_probs

if TYPE_CHECKING:
    from kaggle_tta.tuning.classes import ClassProblem, Tuned

LEVELS = 40  # candidates per member: 0, 1 and the k/LEVELS quantiles (k = 1 .. LEVELS - 1) of its scores
DIGITS = 6  # significant digits of a candidate threshold (what tuned.yaml holds, and what is scored)
EPS = 1e-12  # metric values this close are equal


@dataclass
class MemberGate:
    """One gated member's candidates, and the two merges its rows are selected from."""

    name: str
    rule: str
    first: str
    views: int  # V: the member's tuned views (V - 1 extra forwards per row sent on)
    candidates: list[float]  # descending; candidates[0] == 1.0 (every row sent on: plain TTA)
    sends: list[np.ndarray]  # per candidate, the rows sent on (bool [N])
    every: Prediction  # the masked merge with every row sent on
    alone: Prediction  # the masked merge with no row sent on: the first view alone
    full: Prediction  # plain TTA (no masks: what the blend merges for a gate at 1.0)
    at: int = 0  # the chosen candidate

    @property
    def threshold(self) -> float:
        return self.candidates[self.at]

    def gate(self, j: int | None = None) -> Gate:
        return Gate(self.first, self.rule, self.candidates[self.at if j is None else j])

    def prediction(self, j: int) -> Prediction:
        if self.candidates[j] >= 1.0:
            return self.full
        send = self.sends[j].reshape((-1,) + (1,) * (self.every.values.ndim - 1))
        return Prediction(np.where(send, self.every.values, self.alone.values), self.every.kind, self.every.activation)


@dataclass
class HeldOut:
    """A fold's gates scored on its held-out rows (the metric, as the metric gives it)."""

    rows: int
    none: float
    full: float
    adaptive: float
    sent: dict[str, int]  # member -> held-out rows sent on
    boot: np.ndarray | None = field(default=None, repr=False)
    """[BOOTSTRAP, 3]: (none, full, adaptive) on resamples of the held-out rows (see
    :func:`resampled`), for :func:`pooled_spread`; None: no spread known. Kept instead of the
    rows' probabilities, which the calibration would hold for every fold and keep."""


@dataclass
class GateSearch:
    """The gates learned on the training rows, with what they cost and keep there."""

    metric: str
    higher: bool
    keep: float
    rows: int  # training rows
    members: dict[str, MemberGate]
    ungated: dict[str, int]  # members with other views and no gate: V - 1 (every row gets them)
    none: float = float("nan")  # the metric of no TTA, full TTA and the gates, on the training rows
    full: float = float("nan")
    adaptive: float = float("nan")
    evaluations: int = 0
    keep_changes: float = 0.0
    calibration: list[tuple[float, float | None, float | None]] = field(
        default_factory=list
    )  # --calibrate-keep: (in-sample keep, held-out kept pooled, its SE)
    changed: int = 0  # training rows (multi-label: row x class) whose decision the full TTA changes
    changes_made: float = float("nan")  # the share of those decisions the gates make as the full TTA does
    notes: list[str] = field(default_factory=list)
    learned: bool = False  # False: no gate written (the full TTA gains nothing, or no member can be gated)
    value: Any = field(default=None, repr=False)  # (member predictions, rows) -> the source's metric
    fixed: dict[str, Prediction] = field(default_factory=dict, repr=False)  # every member's full TTA
    alone: dict[str, Prediction] = field(default_factory=dict, repr=False)  # every member's first view alone
    probs_none: np.ndarray | None = field(
        default=None, repr=False
    )  # the submission node's probabilities, every row: first views alone
    probs_full: np.ndarray | None = field(default=None, repr=False)  # ... and full TTA

    @property
    def gates(self) -> dict[str, Gate]:
        return {n: g.gate() for n, g in self.members.items()} if self.learned else {}

    def signed(self, v: float) -> float:
        return v if self.higher else -v

    def kept(self, none: float, full: float, adaptive: float) -> float | None:
        """The share of the full TTA's gain the gates keep (None: the full TTA gains nothing)."""
        g = self.signed(full) - self.signed(none)
        return (self.signed(adaptive) - self.signed(none)) / g if g > EPS else None


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


def learn(
    pb: ClassProblem, tuned: Tuned, train: np.ndarray, rules: dict[str, str], keep: float | None = None
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
    fixed, alone = search.fixed, search.alone
    for name, p in tuned.members.items():
        m = pb.members[name]
        views = [m.views[k] for k in p.kept()]
        cfg_adaptive = pb.cfg.member(name).adaptive
        configured = cfg_adaptive.first if cfg_adaptive is not None else None
        first = first_view(configured, views)
        fixed[name] = pb._member_pred(name, p)
        alone[name] = m.predict([first], None, p.temperature)
        rule = rules.get(name)
        if rule is None:
            if len(views) > 1:
                search.ungated[name] = len(views) - 1
            continue
        if len(views) < 2:
            search.notes.append(f"members.{name}: one tuned view ({views[0]}): no other views to skip, no gate")
            continue
        if m.activation == "none":
            search.notes.append(f"members.{name}: activation none gives no probabilities for the gate to read: no gate")
            search.ungated[name] = len(views) - 1
            continue
        if configured is not None and configured != first:
            search.notes.append(
                f"members.{name}: adaptive.first {configured} is not among the tuned views {views}: the gate reads {first}"
            )
        z = m.z[m.views.index(first)]
        cands = candidates(scores(z, m.activation, rule)[train])
        sends = [needs(z, m.activation, Gate(first, rule, c)) for c in cands]
        kept = p.kept()
        w = p.weights[kept]
        uniform = w.ndim == 1 and np.all(w == w[0])
        wv = None if uniform else w
        every = m.predict(views, wv, p.temperature, gate=Gate(first, rule, 0.0), send=np.ones(len(z), bool))
        none = m.predict(views, wv, p.temperature, gate=Gate(first, rule, 0.0), send=np.zeros(len(z), bool))
        alone[name] = none
        search.members[name] = MemberGate(name, rule, first, len(views), cands, sends, every, none, fixed[name])
    if not search.members:
        return search

    def probs_of(preds: dict[str, Prediction]) -> np.ndarray:
        search.evaluations += 1
        nodes = evaluate_dag(
            pb.cfg, preds, lambda b, ins: blend(str(b.method), ins, tuned.blends[b.name], b.space, b.power)
        )
        return to_probs(nodes[pb.cfg.submission_source])

    def value(preds: dict[str, Prediction], rows: np.ndarray, probs: np.ndarray | None = None) -> float:
        probs = probs_of(preds) if probs is None else probs
        return float(pb.metric.fn(pb.y[rows], probs[rows], tuned.threshold))

    def decisions(probs: np.ndarray) -> np.ndarray:
        """What the submission decides per row: the class, or (multi-label) each class's yes/no."""
        return probs >= np.asarray(tuned.threshold) if pb.multilabel else probs.argmax(-1)

    gated = list(search.members.values())
    search.value = value
    p_none, p_full = search.probs_none, search.probs_full = probs_of(alone), probs_of(fixed)
    search.none = value(alone, train, p_none)
    search.full = value(fixed, train, p_full)
    d_full = decisions(p_full)[train]
    changed = d_full != decisions(p_none)[train]  # the decisions the full TTA changes: what a gate must keep
    search.changed = int(changed.sum())
    if search.signed(search.full) - search.signed(search.none) <= EPS:
        search.notes.append(
            f"adaptive: the full TTA gains nothing over each member's first view alone on these rows ({search.metric} {search.full:.4f} against "
            f"{search.none:.4f}): no gate learned (a gate at 0 would only say 'fewer views'; see the views table)"
        )
        search.adaptive = search.full
        return search
    counts = [[int(s[train].sum()) for s in g.sends] for g in gated]
    gain = search.signed(search.full) - search.signed(search.none)
    required = search.signed(search.none) + search.keep * gain
    memo: dict[tuple[int, ...], tuple[float, float]] = {}

    def scored(idx: tuple[int, ...]) -> tuple[float, float]:
        """(the signed metric, the share of the full TTA's changed decisions made) of the gates ``idx``."""
        if idx not in memo:
            preds = dict(fixed)
            preds.update({g.name: g.prediction(j) for g, j in zip(gated, idx)})
            probs = probs_of(preds)
            made = float((decisions(probs)[train] == d_full)[changed].mean()) if changed.any() else 1.0
            memo[idx] = (search.signed(value(preds, train, probs)), made)
        return memo[idx]

    def keeps(idx: tuple[int, ...]) -> bool:
        v, made = scored(idx)
        return v >= required - EPS and made >= search.keep_changes - EPS

    def cost(idx: tuple[int, ...]) -> int:
        return sum((g.views - 1) * c[j] for g, c, j in zip(gated, counts, idx))

    idx = tuple(0 for _ in gated)
    while True:
        (cur, cur_made), cur_cost = scored(idx), cost(idx)
        best, best_rank = None, None
        for k, g in enumerate(gated):
            for j in range(idx[k] + 1, len(g.candidates)):
                new = idx[:k] + (j,) + idx[k + 1 :]
                saved = cur_cost - cost(new)
                if saved <= 0:
                    continue
                if not keeps(new):
                    continue
                v, made = scored(new)
                # what the move gives up: its share of the full TTA's gain, plus (where counted)
                # its share of the full TTA's changed decisions
                loss = (cur - v) / gain + ((cur_made - made) if search.keep_changes > 0 else 0.0)
                rank = (1, float(saved), v) if loss <= EPS else (0, saved / loss, v)
                if best_rank is None or rank > best_rank:
                    best, best_rank = new, rank
        if best is None:
            break
        idx = best
    for g, j in zip(gated, idx):
        g.at = j
    search.learned = True
    v, search.changes_made = scored(idx)
    search.adaptive = search.signed(v)
    return search


def held_out(
    search: GateSearch,
    tuned_nodes: dict[str, Prediction],
    pb: ClassProblem,
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
    whole = tuple(float(pb.metric.fn(y, p, threshold)) for p in probs)
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
    return HeldOut(len(rows), *whole, sent, resampled(again, len(rows), np.random.default_rng([seed, int(rows[0])])))


def resampled(
    again: Callable[[np.ndarray], tuple[float, float, float]], n: int, rng: np.random.Generator
) -> np.ndarray:
    """[BOOTSTRAP, 3]: ``again(idx)`` (no TTA, full TTA, the gates) on BOOTSTRAP resamples of
    ``n`` rows with replacement, paired: the three are scored on the same rows."""
    return np.array([again(rng.integers(0, n, n)) for _ in range(BOOTSTRAP)], dtype=np.float64)


def table(search: GateSearch, folds: list[HeldOut], n: int) -> Any:
    """Per member: rule, first view, threshold, rows sent on, extra forwards run and saved;
    then every member together with the share of the full TTA's gain kept, in sample and
    held out (pooled over the folds: each fold's gains weighed by its rows)."""
    import polars as pl

    rows = []
    run_total, full_total = 0, 0
    for name, g in search.members.items():
        sent = int(g.sends[g.at].sum()) if search.learned else n
        run, full = (g.views - 1) * sent, (g.views - 1) * n
        held = [f.sent[name] / f.rows for f in folds if name in f.sent]
        rows.append(
            _row(
                name,
                g.rule,
                g.first,
                g.views,
                g.threshold if search.learned else None,
                sent / n if n else None,
                run,
                full,
                float(np.mean(held)) if held else None,
            )
        )
        run_total += run
        full_total += full
    for name, extra in search.ungated.items():
        rows.append(_row(name, None, None, extra + 1, None, 1.0, extra * n, extra * n, 1.0 if folds else None))
        run_total += extra * n
        full_total += extra * n
    total = _row("(all)", None, None, None, None, None, run_total, full_total, None)
    total["gain kept (in sample)"] = search.kept(search.none, search.full, search.adaptive)
    total["gain kept (held out)"] = pooled_kept(search, folds)
    rows.append(total)
    return pl.DataFrame(rows, infer_schema_length=None)


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


BOOTSTRAP = 200  # resamples of the held-out rows behind pooled_spread


def pooled_spread(search: GateSearch, folds: list[HeldOut]) -> float | None:
    """The standard error of :func:`pooled_kept`: the spread of the share over BOOTSTRAP
    resamples of each fold's held-out rows (with replacement, paired: no TTA, full TTA and the
    gates scored on the same rows, so the rows where the gates and the full TTA decide alike
    add nothing; the folds' b-th resamples pooled, the folds being disjoint). The gain kept is
    a difference of a few rows where TTA helps a few percent of the images; this is the part of
    its uncertainty that comes from which rows were held out, each fold's gates as learned
    (not the spread of learning them on other rows). None: no fold, a fold without resamples,
    no gain to keep, or fewer than two resamples with a finite share."""
    if not folds or any(f.boot is None for f in folds) or pooled_kept(search, folds) is None:
        return None
    shares = [
        got
        for b in range(BOOTSTRAP)
        if (got := _pooled(search, [(f.rows, *f.boot[b]) for f in folds])) is not None and np.isfinite(got)
    ]  # type: ignore[index]
    return float(np.std(shares, ddof=1)) if len(shares) > 1 else None


def _row(
    member: str,
    rule: str | None,
    first: str | None,
    views: int | None,
    threshold: float | None,
    share: float | None,
    run: int,
    full: int,
    held_share: float | None,
) -> dict[str, Any]:
    return {
        "member": member,
        "rule": rule,
        "first view": first,
        "views": views,
        "threshold": threshold,
        "share sent on": share,
        "share sent on (held out)": held_share,
        "extra forwards run": run,
        "extra forwards saved": full - run,
        "saved": (full - run) / full if full else None,
        "gain kept (in sample)": None,
        "gain kept (held out)": None,
    }


def summary(search: GateSearch, folds: list[HeldOut], n: int) -> str:
    """One line: what the gates keep and cost, in sample and held out."""
    t = table(search, folds, n).row(-1, named=True)
    run, saved = t["extra forwards run"], t["extra forwards saved"]
    kept, held = t["gain kept (in sample)"], t["gain kept (held out)"]
    pct = f"{100 * run / (run + saved):.1f}%" if run + saved else "—"
    text = (
        f"adaptive: the gates keep {_pct(kept)} of the full TTA's {search.metric} gain in sample ({search.none:.4f} with each member's first view "
        f"alone, {search.full:.4f} full TTA, {search.adaptive:.4f} gated) at {run} of {run + saved} extra forwards ({pct}), "
        f"keep-gain {search.keep:g}"
    )
    if search.learned and search.changed:
        text += f"; they make {_pct(search.changes_made)} of the {search.changed} decisions the full TTA changes as it does (keep-changes {search.keep_changes:g})"
    if folds:
        se = pooled_spread(search, folds)
        text += f"; held out ({len(folds)} folds, each tuned and gated on the others) {_pct(held)}" + (
            "" if se is None or held is None else f" ± {100 * se:.1f}% (bootstrap SE)"
        )
        if search.calibration:
            text += " (the in-sample keep was chosen on these folds: this overstates a little; new images tell)"
    return text


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"
