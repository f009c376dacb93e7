"""Reducers, by name: how a member's views merge and how blends combine their inputs.

Reducers stream: they take one ``[N, C]`` array at a time and keep one float32 accumulator,
so merging eight views of a large test set costs eight reads and one buffer, never a stack.
A prediction carries its *kind*: ``logits``, ``probs``, or ``scores`` (ranks, in [0, 1]),
and, for logits, the *activation* that turns them into probabilities: the member's own
(``activation: sigmoid`` on a member is honoured through every blend, writer and report).

Each blend combines in one stated space (``space``): ``probs`` (the default: every input as
its own probabilities), or ``logits`` (every input must be logits of one activation; the
schema checks it at load, naming the blend).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from kaggle_tta.config.errors import ConfigError, did_you_mean


@dataclass
class Prediction:
    values: np.ndarray  # float32 [N, C]
    kind: str  # logits | probs | scores
    activation: str = "softmax"  # what turns these logits into probabilities (kind logits)


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """Logits -> probabilities (float32), without overflow."""
    x = np.asarray(logits, dtype=np.float32)
    if activation == "softmax":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        e /= e.sum(axis=1, keepdims=True)
        return e
    if activation == "sigmoid":
        return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)
    return x.copy()


def to_probs(p: Prediction) -> np.ndarray:
    """Probabilities (or scores) of a prediction, through its own activation."""
    return activate(p.values, p.activation) if p.kind == "logits" else p.values


def _normalize_rows(x: np.ndarray, activation: str) -> np.ndarray:
    if activation == "softmax":
        x /= np.maximum(x.sum(axis=1, keepdims=True), 1e-30)
    return x


# ---- view reducers (a member's views; inputs are logits) ------------------------------------


def reduce_views(
    name: str,
    arrays: Iterable[np.ndarray],
    activation: str,
    weights: np.ndarray | Sequence[float] | None = None,
    temperature: float = 1.0,
    masks: Sequence[np.ndarray | None] | None = None,
) -> Prediction:
    """Merges a member's per-view logits with the reducer called ``name``.

    mean: mean of logits; mean_prob: mean of probabilities; geomean: geometric mean of
    probabilities (renormalized for softmax); max: element-wise max of probabilities;
    tsharpen: mean of sqrt(probabilities) (renormalized for softmax).

    ``weights``: one per view ``[V]`` (AugTTA), or one per (view, channel) ``[V, C]``
    (ClassTTA; the channel is axis 1 of each array), normalized over the views (per
    channel); the means become weighted means. ``temperature``: each view's logits are
    divided by it first. Neither applies to max (the schema refuses weights there).

    ``masks`` (adaptive views, kaggle_tta.ops.gate): per view, which rows it holds (bool
    ``[N]``; None: every row); each row merges the views it holds, its weights normalized
    over those (at least one view must hold every row: the gate's first view).
    """
    if name not in VIEW_REDUCERS:
        raise ConfigError(
            f"unknown merge '{name}'{did_you_mean(name, VIEW_REDUCERS)}; choose one of {', '.join(VIEW_REDUCERS)}"
        )
    if masks is not None and any(m is not None for m in masks):
        return _reduce_masked(name, arrays, activation, weights, temperature, masks)
    if weights is not None or temperature != 1.0:
        return _reduce_weighted(name, arrays, activation, weights, temperature)
    transform, combine, finish, kind = VIEW_REDUCERS[name]
    acc: np.ndarray | None = None
    n = 0
    for a in arrays:
        if name == "mean":  # add float16/32 views straight into one float32 buffer: no copies
            acc = np.array(a, dtype=np.float32) if acc is None else np.add(acc, a, out=acc, dtype=np.float32)
        else:
            x = transform(np.asarray(a, dtype=np.float32), activation)
            acc = x if acc is None else combine(acc, x)
        n += 1
    if acc is None:
        raise ValueError("no views to merge")
    return Prediction(finish(acc, n, activation), kind, activation)


def normalized_view_weights(weights: np.ndarray | Sequence[float], n_views: int) -> np.ndarray:
    """Weights ``[V]`` or ``[V, C]`` as float32 summing to 1 over the views (per channel)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape[0] != n_views:
        raise ValueError(f"{w.shape[0]} view weights for {n_views} views")
    total = w.sum(axis=0, keepdims=True)
    return (w / np.where(total > 0, total, 1.0)).astype(np.float32)


def _reduce_weighted(
    name: str,
    arrays: Iterable[np.ndarray],
    activation: str,
    weights: np.ndarray | Sequence[float] | None,
    temperature: float,
) -> Prediction:
    """The weighted (and temperature-scaled) form of each reducer: the sum of the views'
    transforms, each times its normalized weight, finished as a mean of one."""
    transform, combine, finish, kind = VIEW_REDUCERS[name]
    arrays = list(arrays)
    if not arrays:
        raise ValueError("no views to merge")
    if name == "max" and weights is not None:
        raise ConfigError("merge max takes no view weights; use mean, mean_prob, geomean or tsharpen")
    w = normalized_view_weights(weights if weights is not None else [1.0] * len(arrays), len(arrays))
    acc: np.ndarray | None = None
    for a, wv in zip(arrays, w):
        x = np.asarray(a, dtype=np.float32)
        if temperature != 1.0:
            x = x / np.float32(temperature)
        x = transform(x, activation) if name != "mean" else x
        if name == "max":
            acc = x.copy() if acc is None else combine(acc, x)
            continue
        term = x * (wv.reshape((1, -1) + (1,) * (x.ndim - 2)) if wv.ndim else wv)  # a channel weight on axis 1
        acc = term.astype(np.float32, copy=False) if acc is None else acc.__iadd__(term)
    assert acc is not None
    return Prediction(finish(acc, 1 if name != "max" else len(arrays), activation), kind, activation)


def _masked_rows(masks: Sequence[np.ndarray | None]) -> tuple[list[np.ndarray | None], int, np.ndarray]:
    """The views' row masks as booleans, the number of rows, and per row how many views hold it."""
    held = [None if m is None else np.asarray(m, bool) for m in masks]
    if not held:
        raise ValueError("no views to merge")
    sizes = {len(m) for m in held if m is not None}
    if len(sizes) != 1:
        raise ValueError("row masks of different lengths")
    (n,) = sizes
    count = cast(np.ndarray, sum(np.ones(n, np.float32) if m is None else m.astype(np.float32) for m in held))
    if not (count > 0).all():
        raise ConfigError(
            "adaptive views: a row is held by none of the views merged; merge the gate's first view with them"
        )
    return held, n, count


def _held_weight_total(held: Sequence[np.ndarray | None], w: np.ndarray | None, n: int) -> np.ndarray:
    """Per row (and channel): the sum of the weights of the views held there."""
    ws = w if w is not None else np.ones(len(held))
    return cast(
        np.ndarray,
        sum(
            (np.ones(n) if m is None else m.astype(np.float64))[:, None] * np.atleast_1d(wv)[None, :]
            for m, wv in zip(held, ws)
        ),
    )


def _held_row_weights(
    m: np.ndarray | None, wk: np.ndarray, n: int, count: np.ndarray, total: np.ndarray, zero: np.ndarray
) -> np.ndarray:
    """One view's weight per row (and channel), renormalized over the views holding the row
    (where those all weigh zero: equally)."""
    wv = np.atleast_1d(wk)[None, :]
    mm = (np.ones(n) if m is None else m.astype(np.float64))[:, None]
    return np.where(zero, mm / count[:, None], mm * wv / np.where(zero, 1.0, total)).astype(np.float32)


def _reduce_masked(
    name: str,
    arrays: Iterable[np.ndarray],
    activation: str,
    weights: np.ndarray | Sequence[float] | None,
    temperature: float,
    masks: Sequence[np.ndarray | None],
) -> Prediction:
    """The merge of views that hold only some rows: per row, the reducer over the views
    holding it. Unweighted at temperature 1 it sums the rows held and divides by their count,
    so a row every view holds is bit for bit the plain merge; weighted, each row's weights are
    renormalized over the views it holds (where those all weigh zero: equally). One view is
    read at a time; memory is the accumulator and the weights' denominator."""
    transform, combine, finish, kind = VIEW_REDUCERS[name]
    held, n, count = _masked_rows(masks)
    plain = weights is None and temperature == 1.0
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if w is not None and w.shape[0] != len(held):
        raise ValueError(f"{w.shape[0]} view weights for {len(held)} views")
    total = zero = None
    if not plain:
        total = _held_weight_total(held, w, n)
        zero = total <= 0
    acc: np.ndarray | None = None
    k = 0
    for a, m in zip(arrays, held):
        x = np.asarray(a, dtype=np.float32)
        extra = (1,) * (x.ndim - 2)
        if temperature != 1.0:
            x = x / np.float32(temperature)
        x = transform(x, activation) if name != "mean" else np.array(x, dtype=np.float32)
        if name == "max":
            if m is not None:
                x = np.where(m.reshape((n, 1) + extra), x, np.float32(-np.inf))
            acc = x if acc is None else combine(acc, x)
            k += 1
            continue
        if plain:
            if m is not None:
                x = np.where(m.reshape((n, 1) + extra), x, np.float32(0.0))
        else:
            assert total is not None and zero is not None
            wk = (w if w is not None else np.ones(len(held)))[k]
            eff = _held_row_weights(m, wk, n, count, total, zero)
            x = x * eff.reshape(eff.shape + extra)
        acc = x if acc is None else acc.__iadd__(x)
        k += 1
    if acc is None or k != len(held):
        raise ValueError(f"{len(held)} row masks for {k} views")
    if name == "max":
        return Prediction(finish(acc, k, activation), kind, activation)
    per_row = count.reshape((n, 1) + (1,) * (acc.ndim - 2)) if plain else 1
    return Prediction(finish(acc, per_row, activation), kind, activation)


def _add(acc: np.ndarray, x: np.ndarray) -> np.ndarray:
    acc += x
    return acc


def _max(acc: np.ndarray, x: np.ndarray) -> np.ndarray:
    np.maximum(acc, x, out=acc)
    return acc


def _mean(acc: np.ndarray, n: int, act: str) -> np.ndarray:
    acc /= n
    return acc


def _log_probs(x: np.ndarray, act: str) -> np.ndarray:
    return np.log(np.maximum(activate(x, act), 1e-30))


VIEW_REDUCERS: dict[str, tuple[Callable, Callable, Callable, str]] = {
    "mean": (lambda x, act: x, _add, _mean, "logits"),
    "mean_prob": (lambda x, act: activate(x, act), _add, _mean, "probs"),
    "geomean": (_log_probs, _add, lambda acc, n, act: _normalize_rows(np.exp(acc / n), act), "probs"),
    "max": (lambda x, act: activate(x, act), _max, lambda acc, n, act: acc, "probs"),
    "tsharpen": (
        lambda x, act: np.sqrt(activate(x, act)),
        _add,
        lambda acc, n, act: _normalize_rows(acc / n, act),
        "probs",
    ),
}


# ---- blend methods (members and blends) ----------------------------------------------------


def rank_columns(x: np.ndarray) -> np.ndarray:
    """Per-column ranks scaled to [0, 1] (ties broken by order, as rank averaging usually is)."""
    n = x.shape[0]
    order = np.argsort(x, axis=0, kind="stable")
    ranks = np.empty_like(x, dtype=np.float32)
    np.put_along_axis(ranks, order, np.arange(n, dtype=np.float32)[:, None].repeat(x.shape[1], axis=1), axis=0)
    return ranks / max(n - 1, 1)


def _space(inputs: Sequence[Prediction], space: str) -> Iterator[np.ndarray]:
    """Each input in the blend's space: its logits, or its own probabilities."""
    if space == "logits":
        bad = [q.kind for q in inputs if q.kind != "logits"] + sorted({q.activation for q in inputs})[1:]
        if bad:  # the schema rules this out at load; a direct caller gets the same rule
            raise ConfigError(
                "space: logits needs every input to be logits of one activation, got "
                f"{[(q.kind, q.activation) for q in inputs]}"
            )
        return (q.values for q in inputs)
    return (to_probs(q) for q in inputs)


def _blend_mean(inputs: Sequence[Prediction], space: str, power: float) -> tuple[Iterator[np.ndarray], str]:
    return _space(inputs, space), "logits" if space == "logits" else "probs"


def _blend_rank(inputs: Sequence[Prediction], space: str, power: float) -> tuple[Iterator[np.ndarray], str]:
    return (rank_columns(x) for x in _space(inputs, space)), "scores"


def _blend_power(inputs: Sequence[Prediction], space: str, power: float) -> tuple[Iterator[np.ndarray], str]:
    if space != "probs":
        raise ConfigError("power_mean combines probabilities: use space: probs")
    return (np.power(np.clip(x, 0, None), power) for x in _space(inputs, space)), "probs"


# Blend methods, one signature: (inputs, space, power) -> (each input as it enters the
# weighted sum, made lazily one at a time; the kind of the result), and whether the sum's
# power is undone after it (power_mean).
BlendMethod = Callable[[Sequence[Prediction], str, float], tuple[Iterable[np.ndarray], str]]
BLEND_METHODS: dict[str, tuple[BlendMethod, bool]] = {
    "mean": (_blend_mean, False),
    "rank_mean": (_blend_rank, False),
    "power_mean": (_blend_power, True),
}
# What a member's view merge gives: logits (mean of logits) or probabilities (the others).
MERGE_KINDS = {name: kind for name, (_, _, _, kind) in VIEW_REDUCERS.items()}


def blend(
    method: str, inputs: Sequence[Prediction], weights: Sequence[float] | None, space: str = "probs", power: float = 2.0
) -> Prediction:
    """Combines predictions with normalized weights, in ``space`` (probs or logits).

    mean: weighted mean; rank_mean: weighted mean of per-class ranks (of probabilities, or of
    logits); power_mean: (sum w p^power)^(1/power) of probabilities.
    """
    values, kind, root = blend_terms(method, inputs, space, power)
    return weighted_sum(values, weights, kind, inputs[0].activation, power if root else None)


def blend_terms(
    method: str, inputs: Sequence[Prediction], space: str = "probs", power: float = 2.0
) -> tuple[Iterable[np.ndarray], str, bool]:
    """Each input as it enters the blend's weighted sum (made lazily), the result's kind,
    and whether the sum's power is undone after it (power_mean)."""
    if method not in BLEND_METHODS:
        raise ConfigError(
            f"unknown blend method '{method}'{did_you_mean(method, BLEND_METHODS)}; "
            f"choose one of {', '.join(BLEND_METHODS)}"
        )
    transform, root = BLEND_METHODS[method]
    values, kind = transform(inputs, space, power)
    return values, kind, root


def weighted_sum(
    values: Iterable[np.ndarray],
    weights: Sequence[float] | np.ndarray | None,
    kind: str,
    activation: str,
    root: float | None = None,
) -> Prediction:
    """The blend of terms (see blend_terms) with weights normalized to sum 1; ``root``: the
    power to undo after the sum (power_mean)."""
    values = list(values) if weights is None else values
    w = np.asarray(weights if weights is not None else [1.0] * len(values), dtype=np.float64)  # type: ignore[arg-type]
    w = w / w.sum()
    acc: np.ndarray | None = None
    for x, wi in zip(values, w):
        term = np.multiply(x, np.float32(wi), dtype=np.float32)  # one temporary, not two
        acc = term if acc is None else acc.__iadd__(term)
    assert acc is not None
    if root is not None:
        acc = np.power(acc, 1.0 / root)
    return Prediction(acc, kind, activation)
