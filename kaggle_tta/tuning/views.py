"""Which views a member keeps and how much each weighs, learned on training rows.

- Greedy Policy Search (Molchanov et al., 2020): starting from no view, add the view whose
  addition most lowers the training NLL of the member's merge, at the temperature fitted to
  the policy so far (refitted after each addition, and taken to 2 significant digits to rank
  the candidates: an approximation of their calibrated log-likelihood, which refits it for
  every candidate); stop when no addition lowers it by more than ``tol`` or after
  ``max_views`` additions. **With replacement**: a view may be
  added again, so the policy is a multiset and its counts are the views' weights.
- AugTTA (Shanmugam et al., ICCV 2021): per-view weights on the simplex (non-negative, sum
  one), refined from the policy's by exponentiated gradient on the training NLL plus
  ``view_l2 * ||w - w_start||^2``; kept only if they lower the training NLL.
- ClassTTA: per-(view, class) weights, each class's column on the simplex, regularized
  toward the view weights by ``class_l2 * mean_c ||W[:, c] - w||^2``; kept only if they
  lower the training NLL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kaggle_tta.ops.gate import Gate
from kaggle_tta.tuning import losses
from kaggle_tta.tuning.member import MemberData
from kaggle_tta.tuning.temperature import fit_temperature

WEIGHT_DIGITS = 6


@dataclass
class ViewSettings:
    """What the view tuners may do (the CLI's switches)."""

    views: bool = True
    view_weights: bool = True
    class_weights: bool = False
    temperature: bool = True
    max_views: int | None = None  # GPS additions (default: the member's number of views)
    tol: float = 1e-4  # GPS stops when the best addition lowers the NLL by no more than this
    view_l2: float = 0.1
    class_l2: float = 1.0
    steps: int = 40  # exponentiated-gradient iterations
    batch: int = 1024  # rows per iteration
    seed: int = 0


@dataclass
class ViewPolicy:
    """A member's tuned merge: the weight of each of its views (zero: dropped), ``[V]`` or
    ``[V, C]``, and its temperature; with what GPS found on the way."""

    weights: np.ndarray
    temperature: float
    counts: np.ndarray | None = None  # GPS's multiset (None: GPS off)
    added_gain: dict[int, float] = field(
        default_factory=dict
    )  # view -> NLL drop when GPS first added it (NaN: the first pick)
    notes: list[str] = field(default_factory=list)
    gate: Gate | None = None  # adaptive views (kaggle_tta.tuning.gates): rows its first view is sure of merge it alone

    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.weights.reshape(len(self.weights), -1).sum(axis=1) > 0)


def tune_views(m: MemberData, train: np.ndarray, s: ViewSettings) -> ViewPolicy:
    """Tunes one member on the training rows ``train`` (a bool mask over its rows)."""
    w = m.pipeline_weights()
    t = m.temperature
    if m.activation == "none":
        return ViewPolicy(w, t, notes=["activation none: nothing to calibrate or weigh"])
    if s.temperature:
        t = fit_temperature(m, w, train, t)
    if m.merge == "max":
        return ViewPolicy(w, t, notes=["merge max takes no view weights: views kept"])
    policy = ViewPolicy(w, t)
    if s.views:
        policy = greedy_policy_search(m, train, s, t)
        w, t = policy.weights, policy.temperature
    if s.view_weights and len(m.views) > 1:
        w = _refine(m, w, t, train, s, s.view_l2, policy.notes, "view weights")
        t = fit_temperature(m, w, train, t) if s.temperature else t
    if s.class_weights and len(m.views) > 1:
        start = np.repeat((w / w.sum())[:, None], m.z[0].shape[1], axis=1)
        w = _refine(m, start, t, train, s, s.class_l2, policy.notes, "class weights")
        t = fit_temperature(m, w, train, t) if s.temperature else t
    policy.weights, policy.temperature = _rounded(w), t
    return policy


def greedy_policy_search(m: MemberData, train: np.ndarray, s: ViewSettings, temperature: float) -> ViewPolicy:
    """GPS with replacement; the counts are the weights. Each candidate is the running sum
    of the policy's views plus one view: two arrays a block, whatever the policy's size."""
    n_views = len(m.views)
    counts = np.zeros(n_views)
    t = temperature
    gains: dict[int, float] = {}
    total: np.ndarray | None = None  # sum of counts[v] * t_v

    for _ in range(s.max_views or n_views):
        # Candidates are ranked at the temperature to 2 significant digits: the ranking does
        # not see the third, and the k folds (whose fitted temperatures differ there) then
        # share the per-row losses of the policies they have in common.
        t_rank = float(f"{t:.2g}")
        if not m.linear and t_rank != t:
            t_rank = t  # the views' transforms would have to be made again: rank at t itself
        views = m.transformed(t_rank)
        if total is None and counts.any():  # the transforms changed with the temperature
            total = losses.combine([(views[u], np.float32(c)) for u, c in enumerate(counts) if c], slice(None))
        k = counts.sum()
        scale = (1.0 / t_rank if m.linear else 1.0) / (k + 1)
        trial = []
        for v in range(n_views):
            c = counts.copy()
            c[v] += 1
            terms: losses.Terms = [(views[v], 1.0)] + ([(total, 1.0)] if total is not None else [])
            trial.append(float(m.loss_rows(c, t_rank, terms, scale)[train].mean()))
        v = int(np.argmin(trial))
        current = m.loss(counts, t_rank, train) if counts.any() else np.inf
        if np.isfinite(current) and trial[v] > current - s.tol:
            break
        if v not in gains:
            gains[v] = (current - trial[v]) if np.isfinite(current) else float("nan")  # the first pick: from nothing
        counts[v] += 1
        total = views[v].copy() if total is None else total.__iadd__(views[v])
        if s.temperature:  # warm, 2 Newton steps: the policy changed by one view
            t_new = fit_temperature(
                m, counts, train, t, iters=2, acc=total * np.float32(1.0 / counts.sum()) if m.linear else None
            )
            if t_new != t and not m.linear:  # the views' transforms change with T: sum them again
                total = None
            t = t_new
    return ViewPolicy(counts.copy(), t, counts=counts, added_gain=gains)


def _refine(
    m: MemberData,
    start: np.ndarray,
    t: float,
    train: np.ndarray,
    s: ViewSettings,
    l2: float,
    notes: list[str],
    what: str,
) -> np.ndarray:
    """Exponentiated gradient (AdaGrad steps) on the simplex of the support of ``start``,
    regularized toward it; the result if it lowers the training NLL, else ``start``."""
    rng = np.random.default_rng(s.seed)
    idx = np.flatnonzero(train)
    prior = start / start.sum(axis=0, keepdims=True)
    w = prior.copy()
    g2 = np.zeros_like(w)
    per_class = w.ndim == 2
    for _ in range(s.steps):
        rows = idx if len(idx) <= s.batch else np.sort(rng.choice(idx, s.batch, replace=False))
        g = m.gradient(w, t, rows) + 2 * l2 * (w - prior) / (w.shape[1] if per_class else 1)
        g2 += g * g
        w = w * np.exp(-0.5 * g / np.sqrt(g2 + 1e-12))
        w = np.where(prior > 0, w, 0.0)
        w /= w.sum(axis=0, keepdims=True)
    before, after = m.loss(prior, t, train), m.loss(_rounded(w), t, train)
    if after < before:
        notes.append(f"{what}: training NLL {before:.4f} -> {after:.4f}")
        return w
    notes.append(f"{what}: no lower training NLL ({after:.4f} vs {before:.4f}); kept the previous weights")
    return start


def _rounded(w: np.ndarray) -> np.ndarray:
    """Counts stay as they are (whole numbers: written exactly); fractions are normalized
    and rounded to WEIGHT_DIGITS decimals (what tuned.yaml holds and the blend reads)."""
    if np.all(w == np.round(w)):
        return w.astype(np.float64)
    return np.round(w / w.sum(axis=0, keepdims=True), WEIGHT_DIGITS)
