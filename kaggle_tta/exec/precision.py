"""The check of ``precision: auto``: a member's first rows computed in the reduced precision
and in fp32 (:class:`ProbeWork`, into memory) and compared view by view
(:func:`compare_precision`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from kaggle_tta.exec.forward import MemberWork, ViewLog

AGREEMENT_BOUND = 0.995
"""Reduced precision is kept only where, in every view, the top-1 class of ``[N, C]`` outputs
(the argmax over channels of each pixel of ``[N, K, h, w]`` maps) agrees with fp32's on at
least this fraction of the probed inputs (pixels). Not applied where there is one channel
(a regressor, a binary map): there only the L2 bound decides."""
REL_L2_BOUND = 1e-2
"""... and where, in every view, ||reduced - fp32|| / ||fp32|| over all probed values is at most this."""


@dataclass
class ProbeWork(MemberWork):
    """A member's work on the first ``rows`` rows of the test set into memory instead of the
    cache: the task's own step fills it (views applied and inverted, tiles stitched, the
    cache dtype), so the precision check compares exactly what the cache would hold.

    ``ragged`` is set where the task opens ragged views (detection boxes): those are not
    compared (a box list has no element-wise error), and the step is not run.
    """

    rows: int = 0
    ragged: bool = False

    def open_dense(self, view: str, shape: tuple[int, ...], dtype: str) -> None:
        self.store[view], self.start[view] = np.zeros((self.rows, *shape[1:]), dtype=dtype), 0

    def open_ragged(self, view: str, n: int) -> None:
        self.ragged, self.start[view] = True, 0

    def open_sizes(self, n: int) -> None:
        pass

    def record(self, lo: int, hi: int, sizes: Tensor, log: ViewLog) -> None:
        for v in self.views:
            self.start[v.name] = max(self.start[v.name], hi)


@dataclass
class PrecisionCheck:
    """What the check decided for one member: ``ran_in`` (the reduced precision, or fp32
    where it failed), a one-line ``note`` saying why, and the measures behind it."""

    ran_in: str
    note: str
    details: dict[str, Any] = field(default_factory=dict)


def compare_precision(
    reduced: dict[str, np.ndarray], fp32: dict[str, np.ndarray], precision: str, nonfinite_chunks: int = 0
) -> PrecisionCheck:
    """Judges ``precision`` on the same inputs computed both ways (view -> rows as stored).

    Fails (``ran_in`` fp32) where a reduced chunk came out non-finite (``nonfinite_chunks``:
    chunks the runner had to recompute in fp32) or a reduced value is non-finite, or where
    some view is outside :data:`AGREEMENT_BOUND` or :data:`REL_L2_BOUND`; the note names the
    first bound missed and, where views disagree, the worst view. An fp32 reference that is
    itself non-finite cannot judge anything: reduced precision is kept, and the note says so.
    """
    pct = f"{100 * AGREEMENT_BOUND:.1f}%"
    inputs = sum(a.shape[0] for a in fp32.values())
    if nonfinite_chunks or not all(np.isfinite(np.asarray(a, dtype=np.float64)).all() for a in reduced.values()):
        return PrecisionCheck(
            "fp32",
            f"fp32: {precision} output was non-finite on the first {inputs} inputs",
            {"inputs": inputs, "nonfinite_chunks": nonfinite_chunks},
        )
    if not all(np.isfinite(np.asarray(a, dtype=np.float64)).all() for a in fp32.values()):
        return PrecisionCheck(
            precision, f"{precision}: not checked (the fp32 output itself is non-finite)", {"inputs": inputs}
        )
    per_view = _measure(reduced, fp32)
    what = (
        "top-1"
        if all(v.get("decisions") == v["inputs"] for v in per_view.values() if "decisions" in v)
        else "per-pixel argmax"
    )
    unit = "inputs" if what == "top-1" else "pixels"
    agreeing = [v for v in per_view.values() if "agreement" in v]
    details = _details(per_view, inputs)
    in_view = lambda v: f" in view '{v}'" if len(per_view) > 1 else ""  # noqa: E731
    worst = min(
        (v for v in per_view if "agreement" in per_view[v]), key=lambda v: per_view[v]["agreement"], default=None
    )
    if worst is not None and per_view[worst]["agreement"] < AGREEMENT_BOUND:
        w = per_view[worst]
        return PrecisionCheck(
            "fp32",
            f"fp32: {precision} {what} agreed on {100 * w['agreement']:.1f}% of {w['decisions']} "
            f"{unit}{in_view(worst)} (< {pct})",
            details,
        )
    worst = max(per_view, key=lambda v: per_view[v]["rel_l2"])
    if per_view[worst]["rel_l2"] > REL_L2_BOUND:
        return PrecisionCheck(
            "fp32",
            f"fp32: {precision} relative L2 error {per_view[worst]['rel_l2']:.1e}{in_view(worst)} (> "
            f"{REL_L2_BOUND:.0e})",
            details,
        )
    agreed = f"{what} agreed on {100 * details['agreement']:.1f}%, " if agreeing else ""
    return PrecisionCheck(
        precision,
        f"{precision}: checked against fp32 on {inputs} inputs ({agreed}relative L2 error {details['rel_l2']:.1e})",
        details,
    )


def _measure(reduced: dict[str, np.ndarray], fp32: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per view: the inputs, the relative L2 error and, over several channels, the top-1 (or
    per-pixel argmax) agreement and how many decisions it counts."""
    per_view: dict[str, dict[str, Any]] = {}
    for view, ref in fp32.items():
        r, f = np.asarray(reduced[view], dtype=np.float64), np.asarray(ref, dtype=np.float64)
        diff, norm = float(np.linalg.norm(r - f)), float(np.linalg.norm(f))
        rel = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
        rec: dict[str, Any] = {"inputs": int(f.shape[0]), "rel_l2": rel}
        if f.ndim >= 2 and f.shape[1] > 1:  # [N, C] top-1, or [N, K, h, w] per-pixel argmax
            same = r.argmax(axis=1) == f.argmax(axis=1)
            rec["agreement"], rec["decisions"] = float(same.mean()), int(same.size)
        per_view[view] = rec
    return per_view


def _details(per_view: dict[str, dict[str, Any]], inputs: int) -> dict[str, Any]:
    """What the manifest records of a check: the worst figures over the views, the bounds and
    each view's own."""
    agreeing = [v for v in per_view.values() if "agreement" in v]
    details: dict[str, Any] = {
        "inputs": inputs,
        "rel_l2": max((v["rel_l2"] for v in per_view.values()), default=0.0),
        "bounds": {"agreement": AGREEMENT_BOUND, "rel_l2": REL_L2_BOUND},
        "views": per_view,
    }
    if agreeing:
        details["agreement"] = min(v["agreement"] for v in agreeing)
    return details
