"""Evaluating the blend DAG from the cache alone.

This module reads cached views and merges them; it never builds a model or reads an image
(it imports neither models, data nor engine), so re-blending runs in seconds anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from kaggle_tta.cache import CacheEntry
from kaggle_tta.config import BlendConfig, PipelineConfig
from kaggle_tta.errors import CacheError
from kaggle_tta.merge import Prediction, blend, reduce_views


T = TypeVar("T")


@dataclass
class MemberSource:
    """Where a member's predictions are: its cache entry, the views to merge, the activation."""

    name: str
    entry: CacheEntry | None
    views: Sequence[str]
    activation: str
    merge: str
    fill_hint: str = "kaggle-tta infer PIPELINE"


def check_complete(sources: Sequence[MemberSource], ids: Sequence[str], sizes: bool = False) -> None:
    """Raises one CacheError naming every missing (member, view) and how to fill it; with
    ``sizes``, each entry's image sizes must be complete too."""
    missing = []
    for s in sources:
        why = {v: "not computed" if s.entry is None else s.entry.lacks(v) for v in s.views}
        lacking = [v if w in ("not computed", None) else f"{v} ({w})" for v, w in why.items() if w is not None]
        if sizes and (s.entry is None or not s.entry.sizes_complete()):
            lacking.append("image sizes")
        if lacking:
            missing.append(f"{s.name}: {', '.join(lacking)}")
    if missing:
        raise CacheError(f"not in the cache: {'; '.join(missing)} — run '{sources[0].fill_hint}' to compute them (blend runs no model)")
    for s in sources:
        if s.entry.read_ids() != list(ids):  # type: ignore[union-attr]
            raise CacheError(f"{s.entry.dir}: row ids differ from the test set; delete that folder and rerun infer")  # type: ignore[union-attr]


def member_prediction(
    s: MemberSource, lo: int, hi: int, views: Sequence[str] | None = None, transform: Callable[[np.ndarray, str], np.ndarray] | None = None
) -> Prediction:
    """Merges a member's cached views (all of them, or the given subset) for rows ``lo:hi``
    (sliced from the memory-mapped files: only those rows are read, and verified as they
    stream: see CacheEntry.rows), each first passed
    through ``transform(values, activation)`` where given (segmentation: uint8 -> logits)."""
    assert s.entry is not None
    names = list(views) if views is not None else list(s.views)
    arrays = (s.entry.rows(v, lo, hi) for v in names)
    if transform is not None:
        arrays = (transform(a, s.activation) for a in arrays)
    pred = reduce_views(s.merge, arrays, s.activation)
    if not np.isfinite(pred.values).all():  # a non-finite cached value reaches every reducer's result
        s.entry.nonfinite(names, lo, hi)
    return pred


def blocks(n: int, block: int) -> Iterator[tuple[int, int]]:
    """Row ranges ``(lo, hi)`` of ``block`` rows covering ``0:n``."""
    for lo in range(0, n, block):
        yield lo, min(n, lo + block)


def node_predictions(
    cfg: PipelineConfig, sources: Sequence[MemberSource], lo: int, hi: int, *,
    views: Sequence[str] | None = None, transform: Callable[[np.ndarray, str], np.ndarray] | None = None,
) -> dict[str, Prediction]:
    """Every node's prediction for rows ``lo:hi``: members from their views (each with its
    own activation), then blends."""
    return evaluate(cfg, {s.name: member_prediction(s, lo, hi, views, transform) for s in sources})


def evaluate_dag(cfg: PipelineConfig, members: Mapping[str, T], combine: Callable[[BlendConfig, list[T]], T]) -> dict[str, T]:
    """Every node's value: the members' as given, then each blend, ``combine(blend, its
    inputs' values)``, in dependency order (the config validator has ruled out cycles)."""
    out: dict[str, T] = dict(members)
    remaining = list(cfg.blends)
    while remaining:
        ready = [b for b in remaining if all(i in out for i in b.inputs)]
        for b in ready:
            out[b.name] = combine(b, [out[i] for i in b.inputs])
        remaining = [b for b in remaining if b not in ready]
    return out


def evaluate(cfg: PipelineConfig, members: Mapping[str, Prediction]) -> dict[str, Prediction]:
    """Every node's prediction (classification, segmentation maps)."""
    return evaluate_dag(cfg, members, lambda b, ins: blend(b.method, ins, b.weights, b.space, b.power))
