"""What learning the adaptive gates gives (kaggle_tta.tuning.gates): each gated member's
candidates and the two merges its rows are selected from (:class:`MemberGate`), the search's
result on the training rows (:class:`GateSearch`) and a fold's gates scored on its held-out
rows (:class:`HeldOut`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kaggle_tta.ops.gate import Gate
from kaggle_tta.ops.merge import Prediction

EPS = 1e-12  # metric values this close are equal


@dataclass
class MemberGate:
    """One gated member's candidates, and the two merges its rows are selected from."""

    name: str
    rule: str
    first: str
    views: int  # V: the member's tuned views (V - 1 extra forwards per row sent on)
    candidates: list[float]  # descending; candidates[0] == 1.0 (every row sent on: plain TTA)
    sends: list[np.ndarray]  # per candidate, the rows sent on (bool [N])
    every: Prediction  # the masked merge with every row sent on
    alone: Prediction  # the masked merge with no row sent on: the first view alone
    full: Prediction  # plain TTA (no masks: what the blend merges for a gate at 1.0)
    at: int = 0  # the chosen candidate

    @property
    def threshold(self) -> float:
        return self.candidates[self.at]

    def gate(self, j: int | None = None) -> Gate:
        return Gate(self.first, self.rule, self.candidates[self.at if j is None else j])

    def prediction(self, j: int) -> Prediction:
        if self.candidates[j] >= 1.0:
            return self.full
        send = self.sends[j].reshape((-1,) + (1,) * (self.every.values.ndim - 1))
        return Prediction(np.where(send, self.every.values, self.alone.values), self.every.kind, self.every.activation)


@dataclass
class HeldOut:
    """A fold's gates scored on its held-out rows (the metric, as the metric gives it)."""

    rows: int
    none: float
    full: float
    adaptive: float
    sent: dict[str, int]  # member -> held-out rows sent on
    boot: np.ndarray | None = field(default=None, repr=False)
    """[BOOTSTRAP, 3]: (none, full, adaptive) on resamples of the held-out rows (see
    :func:`kaggle_tta.tuning.gates.resampled`), for :func:`kaggle_tta.tuning.gates.pooled_spread`;
    None: no spread known. Kept instead of the rows' probabilities, which the calibration
    would hold for every fold and keep."""


@dataclass
class GateSearch:
    """The gates learned on the training rows, with what they cost and keep there."""

    metric: str
    higher: bool
    keep: float
    rows: int  # training rows
    members: dict[str, MemberGate]
    ungated: dict[str, int]  # members with other views and no gate: V - 1 (every row gets them)
    none: float = float("nan")  # the metric of no TTA, full TTA and the gates, on the training rows
    full: float = float("nan")
    adaptive: float = float("nan")
    evaluations: int = 0
    keep_changes: float = 0.0
    calibration: list[tuple[float, float | None, float | None]] = field(
        default_factory=list
    )  # --calibrate-keep: (in-sample keep, held-out kept pooled, its SE)
    changed: int = 0  # training rows (multi-label: row x class) whose decision the full TTA changes
    changes_made: float = float("nan")  # the share of those decisions the gates make as the full TTA does
    notes: list[str] = field(default_factory=list)
    learned: bool = False  # False: no gate written (the full TTA gains nothing, or no member can be gated)
    value: Callable[..., float] | None = field(
        default=None, repr=False
    )  # (member predictions, rows) -> the source's metric
    fixed: dict[str, Prediction] = field(default_factory=dict, repr=False)  # every member's full TTA
    alone: dict[str, Prediction] = field(default_factory=dict, repr=False)  # every member's first view alone
    probs_none: np.ndarray | None = field(
        default=None, repr=False
    )  # the submission node's probabilities, every row: first views alone
    probs_full: np.ndarray | None = field(default=None, repr=False)  # ... and full TTA

    @property
    def gates(self) -> dict[str, Gate]:
        return {n: g.gate() for n, g in self.members.items()} if self.learned else {}

    def signed(self, v: float) -> float:
        return v if self.higher else -v

    def kept(self, none: float, full: float, adaptive: float) -> float | None:
        """The share of the full TTA's gain the gates keep (None: the full TTA gains nothing)."""
        g = self.signed(full) - self.signed(none)
        return (self.signed(adaptive) - self.signed(none)) / g if g > EPS else None
