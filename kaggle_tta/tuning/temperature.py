"""A temperature per member (calibration): the T that minimizes the training rows' NLL of
the member's merge, each view's logits divided by T.

For a mean of logits the NLL is convex in 1/T (the logits are scaled once), and Newton's
method on 1/T converges in a few passes over the rows. Other merges put T inside each view's
activation: a golden-section search on log T, in [T_MIN, T_MAX].
"""

from __future__ import annotations

import math

import numpy as np

from kaggle_tta.tuning import losses
from kaggle_tta.tuning.member import MemberData

T_MIN, T_MAX = 0.05, 20.0
DIGITS = 3  # significant digits of the temperature written to tuned.yaml (and scored)


def fit_temperature(
    m: MemberData, w: np.ndarray, train: np.ndarray, start: float = 1.0, iters: int = 30, acc: np.ndarray | None = None
) -> float:
    """The temperature minimizing the mean NLL over ``train``, rounded to DIGITS significant
    digits (the NLL is flat there: < 1e-5 apart; and folds that land on the same value
    share their later evaluations). ``iters``: Newton iterations (GPS refits with 2, warm);
    ``acc``: the merge's sum with weights ``w`` normalized, if the caller holds it."""
    if m.linear and m.activation in ("softmax", "sigmoid"):
        t = _newton(m, w, train, start, iters, acc)
    else:
        t = _golden(lambda t: m.loss(w, t, train), math.log(T_MIN), math.log(T_MAX))
    t = min(max(t, T_MIN), T_MAX)
    return float(f"{t:.{DIGITS}g}")


def _fgh(acc: np.ndarray, beta: float, y: np.ndarray, activation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the NLL of ``beta * acc`` and its first and second derivatives in beta."""
    n = acc.shape[0]
    f, g, h = np.empty(n), np.empty(n), np.empty(n)
    e = np.empty((min(losses.BLOCK, n), acc.shape[1]), dtype=np.float32)
    for lo in range(0, n, losses.BLOCK):
        rows = slice(lo, min(n, lo + losses.BLOCK))
        a = acc[rows]
        b = np.multiply(a, np.float32(beta), out=e[: len(a)])
        if activation == "softmax":
            true = a[np.arange(len(a)), y[rows]].astype(np.float64)
            m = b.max(axis=1, keepdims=True)
            b -= m
            np.exp(b, out=b)  # e: exp(beta * a - m)
            z = b.sum(axis=1).astype(np.float64)
            b *= a
            mean_a = b.sum(axis=1).astype(np.float64) / z
            b *= a
            f[rows] = np.log(z) + m[:, 0] - beta * true
            g[rows] = mean_a - true
            h[rows] = b.sum(axis=1).astype(np.float64) / z - mean_a**2
        else:
            s = losses.sigmoid(b)
            yy = y[rows]
            f[rows] = (np.maximum(b, 0) - b * yy + np.log1p(np.exp(-np.abs(b)))).mean(axis=1, dtype=np.float64)
            g[rows] = ((s - yy) * a).mean(axis=1, dtype=np.float64)
            h[rows] = (s * (1 - s) * a * a).mean(axis=1, dtype=np.float64)
    return f, g, h


def _newton(
    m: MemberData, w: np.ndarray, train: np.ndarray, start: float, iters: int = 30, acc: np.ndarray | None = None
) -> float:
    """Newton on beta = 1/T (the NLL is convex in it), halving a step that raises the loss;
    one pass over the rows per evaluation of (f, f', f'')."""
    if acc is None:
        acc, _ = m.acc(w, 1.0)
    beta = 1.0 / start

    def at(b: float) -> tuple[float, float, float]:
        f, g, h = _fgh(acc, b, m.y, m.activation)
        return float(f[train].mean()), float(g[train].mean()), float(h[train].mean())

    f0, g0, h0 = at(beta)
    for _ in range(iters):
        step = g0 / h0 if h0 > 1e-12 else math.copysign(0.5 * beta, g0)
        for _ in range(20):
            nb = min(max(beta - step, 1.0 / T_MAX), 1.0 / T_MIN)
            f1, g1, h1 = at(nb)
            if f1 <= f0 + 1e-12:
                break
            step /= 2
        else:
            break
        done = abs(nb - beta) <= 1e-5 * beta
        beta, f0, g0, h0 = nb, f1, g1, h1
        if done:
            break
    return 1.0 / beta


def _golden(f, lo: float, hi: float, tol: float = 2e-3) -> float:  # noqa: ANN001
    """The minimizer's exp over log T in [lo, hi] (a unimodal f)."""
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(math.exp(d))
    return math.exp((a + b) / 2)
