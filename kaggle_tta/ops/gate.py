"""Adaptive views: a member's first view for every image, its other views only for the images
whose first prediction is not confident (``members[].adaptive``).

The gate. A row is *confident*, and skips the member's other views, when its first view's
score is strictly above the threshold:

- ``confidence``: the top class probability (multi-label, sigmoid: the least certain class,
  ``min_k max(p_k, 1 - p_k)``);
- ``margin``: the top-1 minus the top-2 probability (multi-label: ``min_k |2 p_k - 1|``);
- segmentation: the same per pixel, averaged over the image (the mean pixel confidence).

Both scores lie in [0, 1], so a threshold of 1.0 skips nothing (every image gets every view)
and 0.0 skips every image whose score is above zero. The score is computed from the first
view's values *as cached* (after the cache dtype), through the member's activation at
temperature 1, so the engine that decides which rows to compute and every blend that reads
them later compute the same rows, bit for bit, from the same numbers.

What a gated view holds is recorded twice. Its manifest state names the gate it was computed
under (``held``: first view, rule, threshold, activation; see kaggle_tta.cache.coverage), which says
which later gates it can serve: the same first view, rule and activation at a threshold as
low or lower (a tighter gate re-blends from the cache; a looser one computes the view again).
And a companion array (``cache.entry.held_name``: uint8 ``[N]``, committed with the rows,
checksummed) says exactly which rows it holds. A blend sends a row on where the gate needs it
*and* the view holds it, so a zero row is never read as a prediction, even where the first
view's scores came out otherwise (a first view computed again, another machine's float
rounding at the threshold): such a row merges the views it has. A gate that skips nothing
(threshold >= 1) stores full views, recorded as plain views: plain TTA.

No torch here: blends, tune and the report use it from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kaggle_tta.ops.merge import activate

RULES = ("confidence", "margin")
SCORES_VERSION = 1  # how scores() computes; a gated view computed by another version is computed again


@dataclass(frozen=True)
class Gate:
    """A member's gate: its first view, the rule and the threshold."""

    first: str
    rule: str
    threshold: float

    @property
    def skips_nothing(self) -> bool:
        """Every row gets every view (scores are at most 1, compared in float32): the views
        are plain views."""
        return bool(np.float32(self.threshold) >= np.float32(1.0))

    def record(self, activation: str) -> dict[str, Any]:
        """What a gated view's manifest state records (``held``): the gate and the activation
        its scores went through."""
        return {
            "first": self.first,
            "rule": self.rule,
            "threshold": float(self.threshold),
            "activation": activation,
            "version": SCORES_VERSION,
        }

    def text(self) -> str:
        return f"{self.rule} > {self.threshold:g} on {self.first}"


def skipping(gate: Gate | None) -> Gate | None:
    """The gate where it skips rows; None for no gate or one that skips nothing (plain views)."""
    return gate if gate is not None and not gate.skips_nothing else None


def gate_of(member_cfg: Any) -> Gate | None:
    """The member's gate (None: not adaptive). ``first`` defaults to ``identity`` where the
    member has it, else its first view (resolved by the plan: see plan.resolve_gate)."""
    a = getattr(member_cfg, "adaptive", None)
    if a is None:
        return None
    rule = "confidence" if a.confidence is not None else "margin"
    return Gate(a.first or "identity", rule, float(a.confidence if a.confidence is not None else a.margin))


def scores(values: np.ndarray, activation: str, rule: str) -> np.ndarray:
    """Each row's score ``[n]`` (float32) from its first view's logits: ``[n, C]`` (one
    prediction per image), or ``[n, C, h, w]`` maps (segmentation), scored per pixel and
    averaged over the image's pixels (the mean pixel confidence)."""
    p = activate(np.asarray(values, dtype=np.float32), activation)  # channels on axis 1
    if activation == "sigmoid":
        certainty = np.maximum(p, 1.0 - p) if rule == "confidence" else np.abs(2.0 * p - 1.0)
        per = certainty.min(axis=1)
    elif p.shape[1] == 1:
        per = np.ones((p.shape[0], *p.shape[2:]), np.float32)
    elif rule == "confidence":
        per = p.max(axis=1)
    else:
        top2 = np.partition(p, p.shape[1] - 2, axis=1)
        per = top2[:, -1] - top2[:, -2]
    per = per.astype(np.float32, copy=False)
    return per.reshape(per.shape[0], -1).mean(axis=1, dtype=np.float64).astype(np.float32) if per.ndim > 1 else per


def needs(values: np.ndarray, activation: str, gate: Gate) -> np.ndarray:
    """Which rows (bool ``[n]``) get the member's other views: those not confident.
    ``values``: the first view's logits (a uint8 segmentation cache: through the task's
    Task.as_logits first)."""
    if gate.skips_nothing:
        return np.ones(np.asarray(values).shape[0], dtype=bool)
    return ~(scores(values, activation, gate.rule) > np.float32(gate.threshold))


@dataclass
class Forwards:
    """Forwards of a member: run (or held in the cache) against plain TTA's."""

    run: int = 0
    full: int = 0

    def add(self, other: Forwards) -> None:
        self.run += other.run
        self.full += other.full

    @property
    def saved(self) -> int:
        return self.full - self.run

    def text(self) -> str:
        pct = 100.0 * self.saved / self.full if self.full else 0.0
        return f"{self.run} of {self.full} forwards ({self.saved} saved, {pct:.0f}%)"
