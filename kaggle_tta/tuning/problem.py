"""What every tuning problem gives :func:`kaggle_tta.tuning.run.tune` (``classes``, ``masks``,
``boxes``; ``Task.tuner`` names one): fitting and scoring on rows of the labelled set for the
honest estimate (:mod:`kaggle_tta.tuning.honest`), and what is written (tuned.yaml, the
report's tables, the picture's points). ``T`` is the problem's tuning (what ``fit`` returns).

The steps only some problems take have defaults here that do nothing, so ``tune`` calls
every step of every problem.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")

Point = tuple[str, str, float, float]  # (kind, label, seconds, gain) of the picture


class TuningProblem(ABC, Generic[T]):
    """A task's tuning problem, built from the plan, its cache sources and the options."""

    unit: str  # what a row of the labelled set is (rows, images): the warnings name it
    gain_label: str  # the picture's gain axis

    @property
    @abstractmethod
    def n_units(self) -> int:
        """The labelled rows (images) to fit and score on."""

    @property
    @abstractmethod
    def scores(self) -> list[tuple[str, bool]]:
        """(name, higher is better) of what is scored; the first is the metric."""

    @abstractmethod
    def untuned(self) -> T:
        """The pipeline as it is."""

    @abstractmethod
    def fit(self, train: np.ndarray) -> T:
        """Tunes on the rows where ``train`` (bool ``[N]``) is True."""

    @abstractmethod
    def score(self, tuned: T, rows: np.ndarray) -> dict[str, float]:
        """Each score of :attr:`scores` on ``rows`` (indices)."""

    @abstractmethod
    def n_params(self) -> dict[str, int]:
        """How many values each tuner sets (for the too-few-rows warning)."""

    @abstractmethod
    def overrides(self, tuned: T) -> dict[str, Any]:
        """tuned.yaml: the partial pipeline the tuning writes."""

    @abstractmethod
    def tables(self, before: T, after: T) -> dict[str, Any]:
        """The report's tables (polars), by key of :data:`kaggle_tta.tuning.report.TITLES`."""

    @abstractmethod
    def points(self, tuned: T, tables: dict[str, Any]) -> list[Point]:
        """The picture's points (none: no picture)."""

    def calibrate_keep(self, folds: int, seed: int) -> None:
        """Chooses what is learned in sample from the folds, before the estimate (its folds
        then learn at what was chosen). Default: nothing to choose."""

    def report_notes(self, tuned: T) -> list[str]:
        """What the report adds below its tables. Default: nothing."""
        return []
