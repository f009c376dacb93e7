"""Evaluating the blend DAG from the cache alone.

This module reads cached views and merges them; it never builds a model or reads an image
(it imports neither models, data nor engine), so re-blending runs in seconds anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from kaggle_tta.cache import CacheEntry
from kaggle_tta.cache.coverage import Coverage, held_by
from kaggle_tta.cache.entry import held_name
from kaggle_tta.config import BlendConfig, MemberConfig, PipelineConfig
from kaggle_tta.config.errors import CacheError
from kaggle_tta.ops.gate import Gate, needs
from kaggle_tta.ops.merge import Prediction, blend, reduce_views

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
    gate: Gate | None = None  # adaptive views: rows the first view is sure of merge it alone
    merged: dict = field(
        default_factory=dict
    )  # adaptive views: (lo, hi) -> rows of gated views merged there (the report's forwards)

    @property
    def plain_view(self) -> str:
        """The view "without TTA" stands for: the gate's first view, else identity."""
        return self.gate.first if self.gate is not None else "identity"

    def lacks(self, view: str) -> str | None:
        """Why a view cannot be read for this blend (see CacheEntry.lacks), including a view
        computed under a gate that does not hold every row this one needs."""
        if self.entry is None:
            return "not computed"
        return Coverage(self.gate, self.activation).lacks(self.entry, view)

    def masks(
        self, views: Sequence[str], lo: int, hi: int, transform: Callable[[np.ndarray, str], np.ndarray] | None = None
    ) -> list[np.ndarray | None] | None:
        """Per view, which rows ``lo:hi`` it merges (None: every row); None when every view
        merges every row. A gated view merges the rows the gate sends on *and* it holds (its
        companion, cache.entry.held_name), so a row it did not compute is never read.
        ``transform``: cached values to logits (see member_prediction)."""
        gated = [v for v in views if self.gate is not None and v != self.gate.first]
        if not gated:
            return None
        assert self.entry is not None and self.gate is not None
        first = self.entry.rows(self.gate.first, lo, hi)
        send = needs(transform(first, self.activation) if transform is not None else first, self.activation, self.gate)
        out: list[np.ndarray | None] = []
        for v in views:
            held = held_by(self.entry, v) if v in gated else None
            out.append(
                None
                if v not in gated
                else send & (np.asarray(self.entry.rows(held_name(v), lo, hi)) != 0)
                if held is not None
                else send
            )
        if len(gated) == len(self.views) - 1:  # the member's whole merge (not a subset of its views)
            self.merged[(lo, hi)] = int(sum(int(m.sum()) for m in out if m is not None))
        return out


def check_complete(sources: Sequence[MemberSource], ids: Sequence[str], sizes: bool = False) -> None:
    """Raises one CacheError naming every missing (member, view) and how to fill it; with
    ``sizes``, each entry's image sizes must be complete too."""
    missing = []
    for s in sources:
        why = {v: s.lacks(v) for v in s.views}
        lacking = [v if w in ("not computed", None) else f"{v} ({w})" for v, w in why.items() if w is not None]
        if sizes and (s.entry is None or not s.entry.sizes_complete()):
            lacking.append("image sizes")
        if lacking:
            missing.append(f"{s.name}: {', '.join(lacking)}")
    if missing:
        raise CacheError(
            f"not in the cache: {'; '.join(missing)} — run '{sources[0].fill_hint}' to compute them (blend runs no "
            "model)"
        )
    for s in sources:
        if s.entry.read_ids() != list(ids):  # type: ignore[union-attr]
            raise CacheError(f"{s.entry.dir}: row ids differ from the test set; delete that folder and rerun infer")  # type: ignore[union-attr]


def view_weights(m: MemberConfig, all_views: Sequence[str], views: Sequence[str]) -> np.ndarray | None:
    """The member's ``view_weights`` (``[V]``) or ``view_class_weights`` (``[V, C]``) for the
    views merged (a subset of ``all_views``, the member's views in ``tta`` order); None: equal."""
    w = m.view_class_weights if m.view_class_weights is not None else m.view_weights
    if w is None or len(views) == 1:  # one view (the identity alone, without TTA): nothing to weigh
        return None
    at = {v: k for k, v in enumerate(all_views)}
    out = np.asarray([w[at[v]] for v in views], dtype=np.float64)
    return out if out.sum() > 0 else None  # a subset of views weighted zero (the identity alone): equal


def member_prediction(
    s: MemberSource,
    lo: int,
    hi: int,
    views: Sequence[str] | None = None,
    transform: Callable[[np.ndarray, str], np.ndarray] | None = None,
    weights: np.ndarray | None = None,
    temperature: float = 1.0,
) -> Prediction:
    """Merges a member's cached views (all of them, or the given subset) for rows ``lo:hi``
    (sliced from the memory-mapped files: only those rows are read, and verified as they
    stream: see CacheEntry.rows), each first passed
    through ``transform(values, activation)`` where given (segmentation: uint8 -> logits),
    with the views' ``weights`` and ``temperature`` (see merge.reduce_views)."""
    assert s.entry is not None
    names = list(views) if views is not None else list(s.views)
    arrays = (s.entry.rows(v, lo, hi) for v in names)
    if transform is not None:
        arrays = (transform(a, s.activation) for a in arrays)
    pred = reduce_views(s.merge, arrays, s.activation, weights, temperature, s.masks(names, lo, hi, transform))
    if not np.isfinite(pred.values).all():  # a non-finite cached value reaches every reducer's result
        s.entry.nonfinite(names, lo, hi)
    return pred


def blocks(n: int, block: int) -> Iterator[tuple[int, int]]:
    """Row ranges ``(lo, hi)`` of ``block`` rows covering ``0:n``."""
    for lo in range(0, n, block):
        yield lo, min(n, lo + block)


def node_predictions(
    cfg: PipelineConfig,
    sources: Sequence[MemberSource],
    lo: int,
    hi: int,
    *,
    views: Sequence[str] | None = None,
    transform: Callable[[np.ndarray, str], np.ndarray] | None = None,
    plain: bool = False,
) -> dict[str, Prediction]:
    """Every node's prediction for rows ``lo:hi``: members from their views (each with its
    own activation, view weights and temperature), then blends. ``plain``: each member's
    view "without TTA" alone (MemberSource.plain_view: identity, or its gate's first view)."""
    members = {}
    for s in sources:
        m = cfg.member(s.name)
        mine = [s.plain_view] if plain else views
        w = view_weights(m, s.views, mine if mine is not None else s.views)
        members[s.name] = member_prediction(s, lo, hi, mine, transform, w, m.temperature)
    return evaluate(cfg, members)


def members_under(cfg: PipelineConfig, node: str) -> list[str]:
    """The members a node blends (itself, for a member), each once, in first-use order."""
    blends = {b.name: b.inputs for b in cfg.blends}
    if node not in blends:
        return [node]
    out: list[str] = []
    for i in blends[node]:
        out += [m for m in members_under(cfg, i) if m not in out]
    return out


def evaluate_dag(
    cfg: PipelineConfig, members: Mapping[str, T], combine: Callable[[BlendConfig, list[T]], T]
) -> dict[str, T]:
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
    return evaluate_dag(cfg, members, lambda b, ins: blend(str(b.method), ins, b.weights, b.space, b.power))
