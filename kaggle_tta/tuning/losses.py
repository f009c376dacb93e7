"""Per-row losses and scores of merged predictions, in blocks of rows; calibration (ECE) and
how well an uncertainty ranks errors (AUROC).

Every loss here is of a member's merge written as ``finish(acc)``, ``acc`` being the weighted
sum of the views' transforms (kaggle_tta.ops.merge.VIEW_REDUCERS): what a view merge gives
after its weights are normalized. A row's negative log-likelihood is ``-log q[y]`` for
softmax and the mean binary cross-entropy over the classes for multi-label (sigmoid).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kaggle_tta.ops.merge import VIEW_REDUCERS, Prediction

BLOCK = 256  # rows at a time: a [BLOCK, C] float32 buffer stays in the CPU's cache (1.6x faster than 4096 at C = 1000)
EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] in a log


def _blocks(n: int) -> range:
    return range(0, n, BLOCK)


def log_sum_exp(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Per-row ``log sum_c exp(scale * x[:, c])`` (float64 ``[N]``), in blocks."""
    n = x.shape[0]
    out = np.empty(n)
    buf = np.empty((min(BLOCK, n), x.shape[1]), dtype=np.float32)
    for lo in _blocks(n):
        a = np.multiply(x[lo : lo + BLOCK], np.float32(scale), out=buf[: min(BLOCK, n - lo)], dtype=np.float32)
        m = a.max(axis=1, keepdims=True)
        a -= m
        np.exp(a, out=a)
        out[lo : lo + len(a)] = np.log(a.sum(axis=1)) + m[:, 0]
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def probabilities(acc: np.ndarray, merge: str, activation: str) -> np.ndarray:
    """``finish(acc)`` as probabilities (float32): what the merge gives, activated."""
    _, _, finish, kind = VIEW_REDUCERS[merge]
    q = finish(np.array(acc, dtype=np.float32), 1, activation)
    if kind == "logits":
        return softmax(q) if activation == "softmax" else sigmoid(q) if activation == "sigmoid" else q
    return q


Terms = list[tuple[np.ndarray, "float | np.ndarray"]]  # (array [N, C], its coefficient: a number or [C])


def combine(
    terms: Terms, rows: slice | np.ndarray, out: np.ndarray | None = None, tmp: np.ndarray | None = None
) -> np.ndarray:
    """``sum_k coef_k * array_k[rows]`` as float32 (a block of a weighted merge), into
    ``out`` when given (its first rows; ``tmp``: a second scratch block). Equal scalar
    coefficients are summed first and multiplied once."""
    coefs = [np.asarray(c, dtype=np.float32) for _, c in terms]
    blocks = [arr[rows] for arr, _ in terms]
    n = len(blocks[0])
    acc = np.empty(blocks[0].shape, dtype=np.float32) if out is None else out[:n]
    if all(c.ndim == 0 and c == coefs[0] for c in coefs):
        np.copyto(acc, blocks[0], casting="same_kind")
        for b in blocks[1:]:
            np.add(acc, b, out=acc)
        if coefs[0] != 1.0:
            acc *= coefs[0]
        return acc
    np.multiply(blocks[0], coefs[0], out=acc)
    t = np.empty_like(acc) if tmp is None else tmp[:n]
    for b, c in zip(blocks[1:], coefs[1:]):
        np.multiply(b, c, out=t)
        acc += t
    return acc


def nll_rows(acc: np.ndarray | Terms, merge: str, activation: str, y: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Per-row NLL ``[N]`` (float64) of the merge ``finish(scale * acc)``; ``acc`` is an
    array or terms summed block by block (no [N, C] sum is held); ``y``: class indices
    ``[N]`` or ``[N, C]`` 0/1 (multi-label)."""
    terms: Terms = [(acc, 1.0)] if isinstance(acc, np.ndarray) else acc
    n, c = terms[0][0].shape[0], terms[0][0].shape[1]
    out = np.empty(n, dtype=np.float64)
    kind = VIEW_REDUCERS[merge][3]
    buf, tmp = np.empty((min(BLOCK, n), c), dtype=np.float32), np.empty((min(BLOCK, n), c), dtype=np.float32)
    scaled = [(t, np.asarray(k, dtype=np.float32) * np.float32(scale)) for t, k in terms]
    for lo in _blocks(n):
        rows = slice(lo, min(n, lo + BLOCK))
        out[rows] = block_nll(combine(scaled, rows, buf, tmp), merge, activation, y[rows], kind)
    return out


def block_nll(a: np.ndarray, merge: str, activation: str, y: np.ndarray, kind: str) -> np.ndarray:
    """Per-row NLL of one block of ``finish(a)`` (``a`` may be overwritten)."""
    if kind == "logits" and activation == "softmax":  # log-sum-exp minus the true logit
        true = a[np.arange(len(a)), y].astype(np.float64)
        m = a.max(axis=1, keepdims=True)
        a -= m
        np.exp(a, out=a)
        return np.log(a.sum(axis=1)).astype(np.float64) + m[:, 0] - true
    if kind == "logits" and activation == "sigmoid":  # BCE with logits, stable
        return (np.maximum(a, 0) - a * y + np.log1p(np.exp(-np.abs(a)))).mean(axis=1, dtype=np.float64)
    q = np.clip(probabilities(a, merge, activation), EPS, 1 - EPS)
    return _nll_of_probs(q, y, activation)


def _nll_of_probs(q: np.ndarray, y: np.ndarray, activation: str) -> np.ndarray:
    """Softmax: -log of the true class's share of the row (rows that do not sum to one, as
    max or power_mean give, are normalized); multi-label: the mean binary cross-entropy."""
    if y.ndim == 1:
        return np.log(q.sum(axis=1)) - np.log(np.take_along_axis(q, y[:, None], axis=1)[:, 0])
    return -(y * np.log(q) + (1 - y) * np.log1p(-q)).mean(axis=1)


def nll_of_probs(q: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row NLL of probabilities ``[N, C]`` (clipped)."""
    return _nll_of_probs(np.clip(np.asarray(q, dtype=np.float64), EPS, 1 - EPS), y, "softmax")


def prediction_nll(pred: Prediction, y: np.ndarray) -> np.ndarray | None:
    """Per-row NLL of a node's prediction; None for rank scores (no likelihood)."""
    if pred.kind == "scores" or pred.activation == "none":
        return None
    if pred.kind == "logits":
        return nll_rows(pred.values, "mean", pred.activation, y)
    return nll_of_probs(pred.values, y)


def acc_gradient(acc: np.ndarray, merge: str, activation: str, y: np.ndarray) -> np.ndarray:
    """d(mean-over-rows NLL of one row)/d(acc), ``[n, C]``: the gradient the weight
    optimisers chain through ``acc = sum_v w_v t_v`` (one formula per merge family)."""
    kind = VIEW_REDUCERS[merge][3]
    onehot = _onehot(y, acc.shape[1])
    c = acc.shape[1]
    if activation == "softmax":
        if kind == "logits" or merge == "geomean":  # softmax of acc (geomean: exp(acc) renormalized)
            return softmax(acc) - onehot
        a = np.maximum(acc, EPS)  # mean_prob, tsharpen: q = acc / sum(acc)
        return -onehot / a + 1.0 / a.sum(axis=1, keepdims=True)
    if kind == "logits":
        return (sigmoid(acc) - onehot) / c
    if merge == "geomean":  # q = exp(acc)
        q = np.clip(np.exp(acc), EPS, 1 - EPS)
        return (-onehot + (1 - onehot) * q / (1 - q)) / c
    q = np.clip(acc, EPS, 1 - EPS)
    return (-onehot / q + (1 - onehot) / (1 - q)) / c


def _onehot(y: np.ndarray, c: int) -> np.ndarray:
    if y.ndim == 2:
        return y.astype(np.float32)
    out = np.zeros((len(y), c), dtype=np.float32)
    out[np.arange(len(y)), y] = 1.0
    return out


# ---- scores ----------------------------------------------------------------------------------


def accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == y).mean())


def micro_f1(y: np.ndarray, probs: np.ndarray, threshold: float | np.ndarray = 0.5) -> float:
    """Micro F1 of every class at or above its threshold (the multilabel writer's rule)."""
    hit = probs >= threshold
    tp = float((hit & (y == 1)).sum())
    fp = float((hit & (y == 0)).sum())
    fn = float((~hit & (y == 1)).sum())
    return 2 * tp / max(2 * tp + fp + fn, 1.0)


def ece(y: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: equal-width bins of the top-class confidence (softmax),
    or of every (row, class) probability (multi-label); |accuracy - confidence| weighted by
    the bin's share."""
    if y.ndim == 2:
        conf, hit = probs.ravel(), (y.ravel() == 1)
    else:
        conf, hit = probs.max(axis=1), probs.argmax(axis=1) == y
    idx = np.minimum((conf * bins).astype(np.int64), bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    gap = np.abs(np.bincount(idx, hit.astype(np.float64), bins) - np.bincount(idx, conf.astype(np.float64), bins))
    return float(gap.sum() / max(count.sum(), 1.0))


def auroc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` ranking the ``positive`` rows first (ties count
    half: the Mann-Whitney U statistic); None without both classes."""
    pos = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


Metric = Callable[[np.ndarray, np.ndarray], float]
