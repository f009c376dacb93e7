"""The honest estimate: what tuning is worth on rows it did not see.

The labelled set is split into k folds at random (``seed``); for each fold, everything is
tuned on the other k - 1 and the held-out fold is scored with the tuned pipeline and with
the pipeline as it is. The out-of-sample gain is the mean over folds of (tuned - as is),
with its standard deviation over folds as the spread; the in-sample gain (tuned and
scored on every row) stands beside it, so overfitting shows. Warnings say when the set is
small for the number of values tuned, or the gain is within its spread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

ROWS_PER_VALUE = 10  # fewer labelled units than this per tuned value: warn
MIN_FOLD = 20  # held-out folds smaller than this: warn


class Problem(Protocol):
    unit: str

    @property
    def n_units(self) -> int: ...
    @property
    def scores(self) -> list[tuple[str, bool]]: ...
    def untuned(self) -> Any: ...
    def fit(self, train: np.ndarray) -> Any: ...
    def score(self, tuned: Any, rows: np.ndarray) -> dict[str, float]: ...
    def n_params(self) -> dict[str, int]: ...


@dataclass
class Estimate:
    """The tuning on every row, and its scores in and out of sample."""

    tuned: Any
    untuned: Any
    scores: list[tuple[str, bool]]
    in_sample: dict[str, tuple[float, float]]  # score -> (as is, tuned), every row
    folds: list[dict[str, tuple[float, float]]] = field(default_factory=list)  # per fold, held out
    warnings: list[str] = field(default_factory=list)

    def gain(self, name: str, before: float, after: float) -> float:
        higher = dict(self.scores)[name]
        return after - before if higher else before - after

    def in_sample_gain(self, name: str) -> float:
        return self.gain(name, *self.in_sample[name])

    def out_of_sample(self, name: str) -> tuple[float, float, float, float] | None:
        """(mean gain, its std over folds, mean as-is score, mean tuned score), held out."""
        if not self.folds:
            return None
        gains = np.array([self.gain(name, *f[name]) for f in self.folds])
        spread = float(gains.std(ddof=1)) if len(gains) > 1 else 0.0
        return (
            float(gains.mean()),
            spread,
            float(np.mean([f[name][0] for f in self.folds])),
            float(np.mean([f[name][1] for f in self.folds])),
        )


def estimate(problem: Problem, folds: int, seed: int = 0) -> Estimate:
    """Tunes on every row and, with ``folds`` >= 2, k times on k - 1 folds."""
    n = problem.n_units
    every = np.ones(n, dtype=bool)
    base = problem.untuned()
    tuned = problem.fit(every)
    before, after = problem.score(base, np.arange(n)), problem.score(tuned, np.arange(n))
    est = Estimate(tuned, base, problem.scores, {k: (before[k], after[k]) for k in before})
    if folds >= 2:
        folds = min(folds, n)
        parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
        for held in parts:
            train = every.copy()
            train[held] = False
            t = problem.fit(train)
            b, a = problem.score(base, np.sort(held)), problem.score(t, np.sort(held))
            est.folds.append({k: (b[k], a[k]) for k in b})
    est.warnings = warnings(est, problem, folds)
    return est


def warnings(est: Estimate, problem: Problem, folds: int) -> list[str]:
    n, unit = problem.n_units, problem.unit
    out = []
    params = problem.n_params()
    total = sum(params.values())
    if total and n < ROWS_PER_VALUE * total:
        what = ", ".join(f"{k} {v}" for k, v in params.items())
        out.append(
            f"{n} labelled {unit} for {total} tuned values ({what}): fewer than {ROWS_PER_VALUE} per value; "
            "expect the in-sample gain to overstate, trust the out-of-sample one"
        )
    if folds < 2:
        out.append("no out-of-sample estimate (--folds 0): the in-sample gain overstates what tuning is worth")
        return out
    if n // folds < MIN_FOLD:
        out.append(
            f"held-out folds of about {n // folds} {unit}: too few for a steady estimate; "
            "label more, or use fewer folds"
        )
    name = est.scores[0][0]
    oos = est.out_of_sample(name)
    assert oos is not None
    mean, spread, _, _ = oos
    if mean < 0:
        out.append(
            f"tuning lowered the held-out {name} ({mean:+.4f} on average): keep the pipeline as it is, or tune less"
        )
    elif abs(mean) <= spread:
        out.append(
            f"the out-of-sample {name} gain ({mean:+.4f} ± {spread:.4f}) is within its spread over folds: "
            "not distinguishable from zero"
        )
    ins = est.in_sample_gain(name)
    if ins > 0 and ins > mean + 2 * spread:
        out.append(
            f"in-sample {name} gain {ins:+.4f} exceeds the out-of-sample {mean:+.4f} ± {spread:.4f}: overfitting shows"
        )
    return out
