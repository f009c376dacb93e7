"""What tune reads: the pipeline's cache entries (every view complete, or one line naming
what is missing and the command that fills it), each view whole and verified, and the
seconds each view took (from the manifest). No model is built and no image is read.

Every view of every row: a view computed under an adaptive gate (its manifest state has
``held``, kaggle_tta.ops.gate) holds zeros on the rows its gate skipped, and tuning on them
would learn from zeros. tune refuses such a view (GatedViewError) rather than reading it;
it learns the gate itself from full views (``--adaptive``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from kaggle_tta.cache import DamagedView
from kaggle_tta.cache.coverage import held_by
from kaggle_tta.config.errors import CacheError, ConfigError
from kaggle_tta.exec.dag import MemberSource, check_complete

if TYPE_CHECKING:
    from kaggle_tta.engine.plan import Plan


class GatedViewError(CacheError):
    """A cached view holds only the rows of an adaptive gate: tune needs every row."""


def fill_command(pipeline: str, override_files: Sequence[str] = (), sets: Sequence[str] = ()) -> str:
    """``PIPELINE --overrides F ... --set K=V ...``: the pipeline as the user gave it."""
    parts = [pipeline, *(f"--overrides {f}" for f in override_files), *(f"--set {s}" for s in sets)]
    return " ".join(parts)


def open_sources(plan: Plan, pipeline_arg: str) -> list[MemberSource]:
    """Every member's cache entry, checked complete for its views (CacheError otherwise:
    ``not in the cache: ... — run 'kaggle-tta infer PIPELINE'``)."""
    from kaggle_tta.api import sources_for

    task = plan.task
    truth = task.truth
    if truth is None or getattr(plan.cfg.data, truth) is None:
        need = f"data.{truth}" if truth else "ground truth"
        raise ConfigError(
            f"data.{truth or 'labels'}: kaggle-tta tune learns from a labelled fold; "
            f"give {need} in the pipeline (task: {task.name})"
        )
    sources = sources_for(plan, pipeline_arg)
    check_full_rows(sources, pipeline_arg)
    check_complete(sources, plan.testset.ids, sizes=task.stores_image_sizes)
    return sources


def check_full_rows(sources: Sequence[MemberSource], pipeline_arg: str = "PIPELINE") -> None:
    """GatedViewError naming the first member whose cached views hold only the rows of an
    adaptive gate (manifest ``held``), and the fix: fill them for every row once."""
    for s in sources:
        if s.entry is None:
            continue
        entry = s.entry
        gated = {v: h for v in s.views if (h := held_by(entry, v)) is not None}
        if not gated:
            continue
        h = next(iter(gated.values()))
        what = (
            f"{', '.join(gated)} {'holds' if len(gated) == 1 else 'hold'} only the rows of the gate "
            f"{h.rule} > {h.threshold} on {h.first}"
        )
        raise GatedViewError(
            f"{s.entry.dir}: members.{s.name}: {what} (adaptive; the other rows are zeros): "
            "tune needs every view of every row: "
            "run once without adaptive or with confidence: 1.0 "
            f"('kaggle-tta infer {pipeline_arg} --set members.{s.name}.adaptive=null'), "
            "then tune learns the gate (--adaptive)"
        )


def read_view(s: MemberSource, view: str) -> np.ndarray:
    """A dense view whole as float32, its CRC-32 checked as it is read and its values
    finite (DamagedView otherwise, marked for recomputing, naming the fill command)."""
    assert s.entry is not None
    n = int(s.entry.view_state(view)["rows"])
    try:
        arr = np.asarray(s.entry.rows(view, 0, n), dtype=np.float32)
        if not np.isfinite(arr).all():
            s.entry.nonfinite([view], 0, n)
    except DamagedView as exc:
        raise DamagedView(exc.entry, exc.view, exc.reason, s.fill_hint) from None
    return arr


def view_seconds(s: MemberSource) -> list[float]:
    """Seconds each view of the member took to compute, as the manifest recorded them."""
    assert s.entry is not None
    return [float(s.entry.view_state(v).get("seconds", 0.0)) for v in s.views]
