"""The metric registry: what the report prints and ``tune`` optimizes (``metric: qwk``).

Each metric takes the labels and the predicted probabilities (values for regression) of
every row at once and returns a float, with its direction. They are written in numpy here
(scikit-learn is a test-time reference, not a runtime dependency: the Kaggle bundle stays
small) and each is tested equal to its reference on random inputs: scikit-learn's
``roc_auc_score``, ``log_loss``, ``cohen_kappa_score(weights='quadratic')``, ``f1_score``,
``fbeta_score``, ``mean_squared_error``, ``mean_absolute_error``, and the MAP@k of the Kaggle
competitions that score it (Humpback Whale, Landmark Recognition).

Labels: single-label ``y [N]`` class indices; multi-label ``y [N, C]`` 0/1; regression ``y
[N, T]`` floats. ``probs`` is ``[N, C]`` (or ``[N, T]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Score = Callable[[np.ndarray, np.ndarray, "float | np.ndarray"], float]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Score  # (y, probs, thresholds) -> value
    higher_is_better: bool = True
    kinds: tuple[str, ...] = ("single",)  # single-label, multilabel, regression
    per_row: Callable[[np.ndarray, np.ndarray, float | np.ndarray], np.ndarray] | None = None


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric, *aliases: str) -> Metric:
    for key in (metric.name.lower(), *aliases):
        METRICS[key] = metric
    return metric


def metric_named(name: str) -> Metric | None:
    return METRICS.get(name.lower())


# ---- single-label ---------------------------------------------------------------------------


def accuracy(y: np.ndarray, p: np.ndarray, t: float | np.ndarray = 0.5) -> float:
    return float((p.argmax(axis=1) == y).mean()) if len(y) else 0.0


def log_loss(y: np.ndarray, p: np.ndarray, t: float | np.ndarray = 0.5) -> float:
    """Mean negative log-probability of the true class, rows renormalized and clipped to
    [1e-15, 1 - 1e-15] as Kaggle's and scikit-learn's log loss do; multi-label: the mean
    binary cross-entropy over every (row, class)."""
    p = np.asarray(p, dtype=np.float64)
    if y.ndim == 2:
        q = np.clip(p, 1e-15, 1 - 1e-15)
        return float(-(y * np.log(q) + (1 - y) * np.log1p(-q)).mean())
    q = np.clip(p / p.sum(axis=1, keepdims=True), 1e-15, 1 - 1e-15)
    return float(-np.log(q[np.arange(len(y)), y]).mean())


def _fbeta(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, beta: float) -> np.ndarray:
    b2 = beta * beta
    den = (1 + b2) * tp + b2 * fn + fp
    return np.where(den > 0, (1 + b2) * tp / np.maximum(den, 1e-300), 0.0)


def _hits(y: np.ndarray, p: np.ndarray, t: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true [N, C] bool, predicted [N, C] bool): multi-label by threshold, single-label the argmax."""
    if y.ndim == 2:
        return y.astype(bool), p >= t
    c = p.shape[1]
    return np.eye(c, dtype=bool)[y], np.eye(c, dtype=bool)[p.argmax(axis=1)]


def _counts(y: np.ndarray, p: np.ndarray, t: float | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    true, pred = _hits(y, p, t)
    return (true & pred).sum(0).astype(float), (~true & pred).sum(0).astype(float), (true & ~pred).sum(0).astype(float)


def macro_f1(y: np.ndarray, p: np.ndarray, t: float | np.ndarray = 0.5) -> float:
    """The mean over classes of each class's F1 (a class never true nor predicted scores 0,
    as scikit-learn's ``zero_division=0``)."""
    tp, fp, fn = _counts(y, p, t)
    return float(_fbeta(tp, fp, fn, 1.0).mean())


def micro_f1(y: np.ndarray, p: np.ndarray, t: float | np.ndarray = 0.5) -> float:
    tp, fp, fn = (a.sum() for a in _counts(y, p, t))
    return float(_fbeta(np.array(tp), np.array(fp), np.array(fn), 1.0))


def samples_f2(y: np.ndarray, p: np.ndarray, t: float | np.ndarray = 0.5) -> float:
    """Multi-label F2 averaged over rows (Planet's metric; scikit-learn ``average='samples'``)."""
    true, pred = _hits(y, p, t)
    tp = (true & pred).sum(1).astype(float)
    return float(_fbeta(tp, (~true & pred).sum(1).astype(float), (true & ~pred).sum(1).astype(float), 2.0).mean())


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    out = np.empty(len(x))
    out[order] = np.repeat(avg, ends - starts)
    return out


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the rank statistic, ties counted half (equal to scikit-learn's)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _ranks(np.asarray(score, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(y: np.ndarray, p: np.ndarray, t: float | np.ndarray = 0.5) -> float:
    """Binary: the positive class's (the last column's) AUC; several classes or multi-label:
    the mean over classes of one-vs-rest AUC (scikit-learn's ``macro``), classes with one
    kind of label left out."""
    true, _ = _hits(y, p, t)
    if y.ndim == 1 and p.shape[1] == 2:
        return _auc(p[:, 1], true[:, 1])
    values = [_auc(p[:, k], true[:, k]) for k in range(p.shape[1])]
    kept = [v for v in values if not np.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def qwk(y: np.ndarray, p: np.ndarray, t: float | np.ndarray = 0.5) -> float:
    """Quadratic weighted kappa of the argmax class against the label (classes ordered as
    data.classes: APTOS, PetFinder adoption)."""
    c = p.shape[1]
    pred = p.argmax(axis=1)
    observed = np.zeros((c, c))
    np.add.at(observed, (y, pred), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / max(len(y), 1)
    i, j = np.indices((c, c))
    w = (i - j) ** 2 / max((c - 1) ** 2, 1)
    den = (w * expected).sum()
    return float(1.0 - (w * observed).sum() / den) if den > 0 else 0.0


def map_at_k(k: int) -> Score:
    """MAP@k with one true class per row: 1 / rank of the true class among the k best, else 0."""

    def score(y: np.ndarray, p: np.ndarray, t: float | np.ndarray = 0.5) -> float:
        top = np.argsort(-p, axis=1, kind="stable")[:, :k]
        hit = top == y[:, None]
        return float((hit / np.arange(1, top.shape[1] + 1)).sum(1).mean())

    return score


# ---- regression -----------------------------------------------------------------------------


def rmse(y: np.ndarray, p: np.ndarray, t: float | np.ndarray = 0.5) -> float:
    return float(np.sqrt(np.mean((np.asarray(p, np.float64) - y) ** 2)))


def mae(y: np.ndarray, p: np.ndarray, t: float | np.ndarray = 0.5) -> float:
    return float(np.mean(np.abs(np.asarray(p, np.float64) - y)))


register_metric(Metric("accuracy", accuracy, per_row=lambda y, p, t: (p.argmax(axis=1) == y).astype(np.float64)))
register_metric(Metric("logloss", log_loss, False, ("single", "multilabel")), "log_loss", "nll")
register_metric(Metric("macro_f1", macro_f1, True, ("single", "multilabel")))
register_metric(Metric("F1", micro_f1, True, ("multilabel",)), "micro_f1")
register_metric(Metric("F2", samples_f2, True, ("multilabel",)), "samples_f2")
register_metric(Metric("AUC", auc, True, ("single", "multilabel")), "roc_auc")
register_metric(Metric("QWK", qwk), "kappa")
for _k in (3, 5):
    register_metric(Metric(f"MAP@{_k}", map_at_k(_k)), f"map{_k}")
register_metric(Metric("RMSE", rmse, False, ("regression",)))
register_metric(Metric("MAE", mae, False, ("regression",)))


def names_for(kind: str) -> list[str]:
    """The registered names a pipeline of this kind may ask for."""
    return sorted(k for k, m in METRICS.items() if kind in m.kinds)


def check_metric(name: str | None, kind: str) -> None:
    """``metric``: a registered name that scores this kind of pipeline, else one line at load."""
    from kaggle_tta.config.errors import ConfigError

    if name is None:
        return
    m = metric_named(name)
    if m is None or kind not in m.kinds:
        what = "unknown" if m is None else f"'{name}' does not score {kind.replace('single', 'single-label')} pipelines"
        raise ConfigError(
            f"metric: {what if m is not None else f'unknown metric {name!r}'}; use one of {', '.join(names_for(kind))}"
        )
