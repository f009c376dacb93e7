"""The public operations, for the CLI and for notebooks: ``infer`` (fill the cache),
``blend`` (cache -> submission) and ``run`` (both). Each takes a pipeline as a path, a dict,
a validated config or a plan, with ``--set``-style overrides, and returns its results as
objects (RunStats, BlendResult, RunResult), not only files::

    from kaggle_tta import load_pipeline, run
    result = run("pipeline.yaml", overrides=["runtime.precision=fp32"])
    result.blend.table        # the submission as a polars DataFrame
    print(result.blend.report())
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaggle_tta.cache import DamagedView
from kaggle_tta.config import PipelineConfig, load_pipeline
from kaggle_tta.engine.blend import BlendResult, ReportRow, blend_plan, format_report, sources_for
from kaggle_tta.engine.plan import Plan, build_plan
from kaggle_tta.io.submission import check_writable

if TYPE_CHECKING:
    from kaggle_tta.dist.ranks import Ranks
    from kaggle_tta.engine.stats import RunStats

__all__ = [
    "BlendResult",
    "Pipeline",
    "ReportRow",
    "RunResult",
    "blend",
    "blend_plan",
    "format_report",
    "infer",
    "launched",
    "plan_of",
    "run",
    "sources_for",
]

Pipeline = str | Path | dict[str, Any] | PipelineConfig | Plan


def launched() -> Ranks | None:
    """This process's place among ranks a launcher started (torchrun, ``runtime.devices``), or
    None. A process that no launcher started loads no kaggle_tta.dist module."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1"):
        return None
    from kaggle_tta.dist.ranks import current

    return current()


@dataclass
class RunResult:
    stats: RunStats
    blend: BlendResult | None  # None on ranks other than 0 (rank 0 blends)


def plan_of(pipeline: Pipeline, overrides: list[str] | None = None) -> Plan:
    """A plan from any form of pipeline (overrides apply to a path or a dict only)."""
    if isinstance(pipeline, Plan):
        return pipeline
    if isinstance(pipeline, PipelineConfig):
        return build_plan(pipeline)
    return build_plan(load_pipeline(pipeline, overrides))


def infer(
    pipeline: Pipeline,
    overrides: list[str] | None = None,
    progress: bool = True,
    alone: bool = False,
    share: tuple[int, int] | None = None,
) -> RunStats:
    """Fills the cache for every (member, view) not in it yet; returns what was computed.

    Under torchrun (several ranks: kaggle_tta.dist.launch) this process computes its share and
    rank 0 assembles the entries. Otherwise, with ``runtime.devices`` above 1, the ranks are
    started here through torch's elastic launcher, and rank 0's summary is returned.
    ``alone``: this process computes everything itself, whatever the settings.
    ``share`` (k, n): only the k-th of n shares (0-based), into shard entries, with no process
    group: for machines that share no filesystem (then ``kaggle-tta cache merge``).
    """
    from kaggle_tta.engine.phases import phase

    if "torch" not in sys.modules:
        phase("importing torch")
    from kaggle_tta.engine.assembly import release_shards
    from kaggle_tta.engine.device import resolve_device, resolve_precision, world_for
    from kaggle_tta.engine.pending import all_cached
    from kaggle_tta.engine.stream import run_inference

    plan = plan_of(pipeline, overrides)
    rt = plan.cfg.runtime
    if share is not None:
        return _infer_share(plan, share, progress)
    ranks = None if alone else launched()
    if ranks is not None:
        from kaggle_tta.dist.ranked import run_ranked

        return run_ranked(plan, progress, ranks)
    world = 1 if alone else world_for(rt.devices, rt.device)
    if world > 1 and not all_cached(plan):  # nothing to compute: no ranks to start
        from kaggle_tta.dist.launch import launch

        return launch(
            world, infer, plan.cfg, None, progress
        )  # each rank: this function again, under torchrun's variables
    device = resolve_device(rt.device)
    stats = run_inference(plan, device, resolve_precision(rt.precision, device), progress=progress)
    if not stats.all_cached:  # shards that only partly covered a view: their rows are in the entry now
        release_shards(plan, stats.computed)
    plan.computed = stats.computed  # what a blend of this plan reads: blend(plan) needs no argument
    return stats


def _infer_share(plan: Plan, share: tuple[int, int], progress: bool) -> RunStats:
    from kaggle_tta.engine.device import resolve_device, resolve_precision
    from kaggle_tta.engine.precision import choose_precisions
    from kaggle_tta.engine.shares import run_share, share_rows

    k, n = share
    rt = plan.cfg.runtime
    device = resolve_device(rt.device)
    lo, hi = share_rows(len(plan.testset), k, n, rt.batch_size)
    precisions = choose_precisions(plan, device, resolve_precision(rt.precision, device))
    stats = run_share(plan, device, precisions, lo, hi, progress, label=f"share {k}/{n}")
    stats.rank = f"share {k}/{n}"
    return stats


def blend(
    pipeline: Pipeline,
    overrides: list[str] | None = None,
    computed: str | Mapping[str, str] | None = None,
    fill_hint: str = "PIPELINE",
) -> BlendResult:
    """Blends from the cache and writes the submission; builds no model, reads no image.

    ``computed`` is the precision a run just filled the cache in, or one per member
    (``RunStats.computed``: a member whose reduced precision failed its check ran in fp32;
    see plan.find_entry); by default what ``infer`` recorded on this plan, if it ran on it;
    ``fill_hint`` names the pipeline in the error that lists missing entries.
    """
    plan = plan_of(pipeline, overrides)
    from kaggle_tta.engine.phases import phase

    phase("blending and writing the submission")
    if computed is None:  # an infer on this plan recorded what it computed in
        computed = plan.computed
    return blend_plan(plan, sources_for(plan, fill_hint, computed))


def run(
    pipeline: Pipeline, overrides: list[str] | None = None, progress: bool = True, fill_hint: str = "PIPELINE"
) -> RunResult:
    """``infer`` then ``blend`` on what it computed. A cached view found damaged while
    blending (its checksum, non-finite values) is marked, recomputed and blended again.
    Under torchrun only rank 0 blends; the other ranks' result has ``blend`` None."""
    plan = plan_of(pipeline, overrides)
    check_writable(plan.cfg.resolve(plan.cfg.submission.path))  # not only after the whole inference
    stats = infer(plan, progress=progress)
    ranks = launched()
    if ranks is not None and not ranks.main:
        return RunResult(stats, None)
    try:
        return RunResult(stats, blend(plan, computed=stats.computed, fill_hint=fill_hint))
    except DamagedView as exc:
        print(
            f"kaggle-tta: {exc.entry.path(exc.view)}: damaged ({exc.reason}); recomputing it",
            file=sys.stderr,
            flush=True,
        )
    again = infer(plan, progress=progress, alone=True)  # the other ranks have finished: this process recomputes it
    again.recomputed_damaged = True
    return RunResult(again, blend(plan, computed=again.computed, fill_hint=fill_hint))
