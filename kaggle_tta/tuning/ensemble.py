"""Member weights of a blend: hill climbing with replacement (Caruana et al., 2004,
"Ensemble selection from libraries of models"), or a constrained optimiser.

Both minimize an ``objective(weights) -> float`` over non-negative weights (normalized by
the blend, so only their ratios matter): the training rows' NLL of the blend, or the
negated metric.

Hill climbing: start from no input; add (with replacement) the input whose extra copy most
lowers the objective, up to ``max_steps`` copies, stopping after ``patience`` additions that
do not improve on the best; keep the best ensemble seen (Caruana's selection), then move to
the best neighbour (one copy added, removed, or moved from one input to another, from the
counts or any multiple of their ratio, at most ``max_steps`` copies) while that improves it.
The result is a multiset: whole-number weights, written exactly. The neighbour moves reach,
on every small case the tests try, the brute-force optimum over all multisets of at most
``max_steps`` copies, which pure forward selection does not always.

The optimiser: Nelder-Mead on ``w = softmax(theta)`` (every weight positive, summing to one),
from the hill-climbing weights; derivative-free, so it takes the metric as readily as NLL.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

Objective = Callable[[np.ndarray], float]


def _memo(objective: Objective) -> Callable[[tuple[int, ...]], float]:
    seen: dict[tuple[int, ...], float] = {}

    def f(counts: tuple[int, ...]) -> float:
        key = _reduced(counts)
        if key not in seen:
            seen[key] = float(objective(np.asarray(counts, dtype=np.float64)))
        return seen[key]

    return f


def _reduced(counts: tuple[int, ...]) -> tuple[int, ...]:
    """(2, 2, 0) and (1, 1, 0) weigh alike: one key for both."""
    g = np.gcd.reduce([c for c in counts if c]) if any(counts) else 1
    return tuple(c // g for c in counts)


def hill_climb(objective: Objective, n_inputs: int, max_steps: int = 20, patience: int = 3) -> tuple[np.ndarray, float]:
    """(counts ``[n_inputs]``, objective) of the best multiset found (see the module doc)."""
    f = _memo(objective)
    counts = [0] * n_inputs
    best, best_counts, stale = np.inf, None, 0
    for _ in range(max_steps):
        trials = [f(tuple(c + (k == i) for k, c in enumerate(counts))) for i in range(n_inputs)]
        i = int(np.argmin(trials))
        counts[i] += 1
        if trials[i] < best - 1e-12:
            best, best_counts, stale = trials[i], list(counts), 0
        else:
            stale += 1
            if stale >= patience:
                break
    assert best_counts is not None
    return _local_search(f, best_counts, best, max_steps)


def _local_search(
    f: Callable[[tuple[int, ...]], float], counts: list[int], best: float, max_steps: int
) -> tuple[np.ndarray, float]:
    while True:
        moves = list(_neighbours(counts, max_steps))
        if not moves:
            break
        scores = [f(tuple(m)) for m in moves]
        k = int(np.argmin(scores))
        if scores[k] >= best - 1e-12:
            break
        counts, best = moves[k], scores[k]
    return np.asarray(counts, dtype=np.float64), best


def _neighbours(counts: list[int], max_steps: int):  # noqa: ANN202
    """One copy added, removed or moved, from the counts or any multiple of their ratio that
    fits (from one copy of A, five of A and one of B is a neighbour: a small weight)."""
    base = _reduced(tuple(counts))
    for mult in range(1, max_steps // max(sum(base), 1) + 1):
        c0 = [c * mult for c in base]
        n, total = len(c0), sum(c0)
        for i in range(n):
            if total < max_steps:
                yield [c + (k == i) for k, c in enumerate(c0)]
            if c0[i] > 0 and total > 1:
                yield [c - (k == i) for k, c in enumerate(c0)]
            for j in range(n):
                if i != j and c0[i] > 0:
                    yield [c - (k == i) + (k == j) for k, c in enumerate(c0)]


def brute_force(objective: Objective, n_inputs: int, max_steps: int) -> tuple[np.ndarray, float]:
    """The best multiset of 1..max_steps copies, by trying every one (small cases only)."""
    f = _memo(objective)
    best, best_counts = np.inf, None
    for counts in itertools.product(range(max_steps + 1), repeat=n_inputs):
        if 0 < sum(counts) <= max_steps:
            v = f(counts)
            if v < best - 1e-12:
                best, best_counts = v, counts
    return np.asarray(best_counts, dtype=np.float64), best


def optimise_weights(
    objective: Objective, start: np.ndarray, iters: int = 200, digits: int = 6
) -> tuple[np.ndarray, float]:
    """Nelder-Mead on softmax-parametrized weights from ``start``; weights rounded to
    ``digits`` decimals. Returns the start when nothing lower is found."""
    w0 = np.asarray(start, dtype=np.float64)
    w0 = np.maximum(w0 / w0.sum(), 1e-3)
    theta = np.log(w0 / w0.sum())

    def f(th: np.ndarray) -> float:
        return float(objective(_softmax_rounded(th, digits)))

    simplex = [theta] + [theta + np.eye(len(theta))[i] * 0.5 for i in range(len(theta))]
    values = [f(s) for s in simplex]
    for _ in range(iters):
        order = np.argsort(values)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        centroid = np.mean(simplex[:-1], axis=0)
        worst = simplex[-1]
        cand = [centroid + a * (centroid - worst) for a in (1.0, 2.0, 0.5, -0.5)]  # reflect, expand, contract out, in
        cv = [f(c) for c in cand]
        k = int(np.argmin(cv))
        if cv[k] < values[-1]:
            simplex[-1], values[-1] = cand[k], cv[k]
        else:  # shrink toward the best
            simplex = [simplex[0]] + [simplex[0] + 0.5 * (s - simplex[0]) for s in simplex[1:]]
            values = [values[0]] + [f(s) for s in simplex[1:]]
        if max(values) - min(values) < 1e-10:
            break
    k = int(np.argmin(values))
    start_value = float(objective(np.asarray(start, dtype=np.float64)))
    if values[k] < start_value:
        return _softmax_rounded(simplex[k], digits), values[k]
    return np.asarray(start, dtype=np.float64), start_value


def _softmax_rounded(theta: np.ndarray, digits: int) -> np.ndarray:
    e = np.exp(theta - theta.max())
    w = np.round(e / e.sum(), digits)
    return w if w.sum() > 0 else np.full_like(w, 1.0 / len(w))
