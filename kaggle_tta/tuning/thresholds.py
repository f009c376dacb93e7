"""Per-class multi-label thresholds that maximize the micro F1 of the training rows (the
score the blend reports for ``format: multilabel``), or the macro F1 (``metric: macro_f1``).

Micro F1 pools true and false positives over classes, so the classes' thresholds are not
independent: the search starts from the best single threshold for every class, then sweeps
the classes, each time moving one class's threshold to the grid value that maximizes the
pooled F1 with the others fixed (coordinate ascent; two sweeps).
"""

from __future__ import annotations

import numpy as np

GRID = np.round(np.arange(0.02, 0.99, 0.01), 2)


def class_counts(
    probs: np.ndarray, y: np.ndarray, grid: np.ndarray = GRID
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class and grid threshold ``[C, G]``: true positives, false positives, false
    negatives of ``probs >= threshold``."""
    c = probs.shape[1]
    tp = np.empty((c, len(grid)))
    fp = np.empty((c, len(grid)))
    fn = np.empty((c, len(grid)))
    for k in range(c):
        pos = np.sort(probs[y[:, k] == 1, k])
        neg = np.sort(probs[y[:, k] == 0, k])
        tp[k] = len(pos) - np.searchsorted(pos, grid, side="left")
        fp[k] = len(neg) - np.searchsorted(neg, grid, side="left")
        fn[k] = len(pos) - tp[k]
    return tp, fp, fn


def _f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / max(2 * tp + fp + fn, 1.0)


def tune_thresholds(
    probs: np.ndarray, y: np.ndarray, grid: np.ndarray = GRID, sweeps: int = 2, macro: bool = False
) -> np.ndarray:
    """One threshold per class (values of ``grid``): maximizing the pooled (micro) F1, or with
    ``macro`` the macro F1, whose classes are independent: each class's best F1 alone."""
    probs = np.asarray(probs, dtype=np.float32)
    grid = grid.astype(np.float32)
    tp, fp, fn = class_counts(probs, y, grid)
    if macro:
        f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1.0)
        return np.round(grid[f1.argmax(axis=1)].astype(np.float64), 2)
    g0 = int(np.argmax([_f1(tp[:, g].sum(), fp[:, g].sum(), fn[:, g].sum()) for g in range(len(grid))]))
    pick = np.full(probs.shape[1], g0)
    rows = np.arange(probs.shape[1])
    for _ in range(sweeps):
        for k in range(probs.shape[1]):
            others = rows != k
            t, f, n = tp[others, pick[others]].sum(), fp[others, pick[others]].sum(), fn[others, pick[others]].sum()
            scores = 2 * (t + tp[k]) / np.maximum(2 * (t + tp[k]) + f + fp[k] + n + fn[k], 1.0)
            pick[k] = int(np.argmax(scores))
    return np.round(grid[pick].astype(np.float64), 2)
