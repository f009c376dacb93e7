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

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import polars as pl

from kaggle_tta.cache import DamagedView
from kaggle_tta.config import PipelineConfig, load_pipeline
from kaggle_tta.engine.plan import Plan, build_plan, find_entry, resolve_device, resolve_precision
from kaggle_tta.exec.dag import MemberSource, check_complete
from kaggle_tta.io.submission import align, check_writable, write_submission
from kaggle_tta.ops.gate import Forwards, skipping

if TYPE_CHECKING:
    from kaggle_tta.engine.stream import RunStats

Pipeline = Union[str, Path, dict[str, Any], PipelineConfig, Plan]


@dataclass
class ReportRow:
    node: str
    kind: str  # member | blend
    views: int
    scores_plain: dict[str, float]  # metric -> value with the identity view alone ({} if unknown)
    scores_tta: dict[str, float]  # metric -> value with every view
    seconds_plain: float | None
    seconds: float
    forwards: Forwards | None = None  # rows x views the cache holds, against plain TTA's (adaptive views)


@dataclass
class BlendResult:
    path: str
    source: str
    rows: list[ReportRow] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)  # empty without ground truth
    n_rows: int = 0  # rows written
    table: pl.DataFrame | None = None  # what was written

    def row(self, node: str) -> ReportRow:
        """The report row of a member or blend."""
        return next(r for r in self.rows if r.node == node)

    def report(self) -> str:
        """The with/without-TTA table, in markdown."""
        return format_report(self)


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
    from kaggle_tta.dist import launch as dist
    from kaggle_tta.dist.ranked import run_ranked  # torch models: only where a run needs them
    from kaggle_tta.engine.stream import run_inference

    plan = plan_of(pipeline, overrides)
    rt = plan.cfg.runtime
    if share is not None:
        return _infer_share(plan, share, progress)
    ranks = None if alone else dist.current()
    if ranks is not None:
        return run_ranked(plan, progress, ranks)
    world = 1 if alone else dist.world_for(rt.devices, rt.device)
    if world > 1 and not _all_cached(plan):  # nothing to compute: no ranks to start
        return dist.launch(world, plan.cfg, progress)
    device = resolve_device(rt.device)
    stats = run_inference(plan, device, resolve_precision(rt.precision, device), progress=progress)
    if not stats.all_cached:  # shards that only partly covered a view: their rows are in the entry now
        from kaggle_tta.dist.ranked import release_shards

        release_shards(plan, stats.computed)
    return stats


def _infer_share(plan: Plan, share: tuple[int, int], progress: bool) -> RunStats:
    from kaggle_tta.dist import launch as dist
    from kaggle_tta.dist.ranked import run_share
    from kaggle_tta.engine.stream import choose_precisions

    k, n = share
    rt = plan.cfg.runtime
    device = resolve_device(rt.device)
    lo, hi = dist.Ranks(k, n, 0, 1).share(len(plan.testset), rt.batch_size)
    precisions = choose_precisions(plan, device, resolve_precision(rt.precision, device))
    stats = run_share(plan, device, precisions, lo, hi, progress, label=f"share {k}/{n}")
    stats.rank = f"share {k}/{n}"
    return stats


def _all_cached(plan: Plan) -> bool:
    """Whether every member's entry, in the precision this run would compute it in, holds
    all its views (and image sizes): then ``runtime.devices`` starts no ranks. Under
    ``precision: auto`` resolved to a reduced precision that is the verdict an earlier check
    recorded (engine._recorded_check); a member with none would be checked first, so it is
    not cached (an entry complete in another precision is not this run's). Detection members
    are never checked: their reduced entry is theirs."""
    from kaggle_tta.cache import CacheEntry
    from kaggle_tta.engine.stream import REDUCED, _fits, _recorded_check
    from kaggle_tta.exec.forward import ProbeWork

    rt = plan.cfg.runtime
    precision = resolve_precision(rt.precision, resolve_device(rt.device))
    for m in plan.members:
        ran_in = precision
        if rt.precision == "auto" and precision in REDUCED:
            known = _recorded_check(plan, m, precision)
            if known is not None:
                ran_in = known.ran_in
            else:
                trial = ProbeWork(m, None, list(m.views))  # type: ignore[arg-type]
                plan.task.open_views(trial, plan)  # as engine._probe tells the members it does not check
                if not trial.ragged:
                    return False
        entry = CacheEntry(plan.cache_root, m.name, m.fingerprint(ran_in), m.inputs)
        fits = _fits(skipping(m.gate), m)  # adaptive: the rows this run's gate needs
        if not all(entry.is_complete(v.name) and fits(entry, v.name) for v in m.views) or (
            plan.task.stores_image_sizes and not entry.sizes_complete()
        ):
            return False
    return True


def blend(
    pipeline: Pipeline,
    overrides: list[str] | None = None,
    computed: str | Mapping[str, str] | None = None,
    fill_hint: str = "PIPELINE",
) -> BlendResult:
    """Blends from the cache and writes the submission; builds no model, reads no image.

    ``computed`` is the precision a run just filled the cache in, or one per member
    (``RunStats.computed``: a member whose reduced precision failed its check ran in fp32;
    see plan.find_entry);
    ``fill_hint`` names the pipeline in the error that lists missing entries.
    """
    plan = plan_of(pipeline, overrides)
    return blend_plan(plan, sources_for(plan, fill_hint, computed))


def run(
    pipeline: Pipeline, overrides: list[str] | None = None, progress: bool = True, fill_hint: str = "PIPELINE"
) -> RunResult:
    """``infer`` then ``blend`` on what it computed. A cached view found damaged while
    blending (its checksum, non-finite values) is marked, recomputed and blended again.
    Under torchrun only rank 0 blends; the other ranks' result has ``blend`` None."""
    from kaggle_tta.dist import launch as dist

    plan = plan_of(pipeline, overrides)
    check_writable(plan.cfg.resolve(plan.cfg.submission.path))  # not only after the whole inference
    stats = infer(plan, progress=progress)
    ranks = dist.current()
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


def sources_for(
    plan: Plan, pipeline_arg: str = "PIPELINE", computed: str | Mapping[str, str] | None = None
) -> list[MemberSource]:
    """Where each member's cached views are (see plan.find_entry); ``computed`` is the
    precision a run just filled the cache in."""
    cfg = plan.cfg
    out = []
    for m in plan.members:
        mine = computed.get(m.name) if isinstance(computed, Mapping) else computed
        entry = find_entry(plan, m, cfg.runtime.precision, mine)
        out.append(
            MemberSource(
                m.name,
                entry,
                [v.name for v in m.views],
                m.activation,
                m.cfg.merge,
                f"kaggle-tta infer {pipeline_arg}",
                skipping(m.gate),
            )
        )  # type: ignore[arg-type]
    return out


def blend_plan(plan: Plan, sources: list[MemberSource]) -> BlendResult:
    """Merges cached views, evaluates the blend DAG through the task, writes the submission.

    With ground truth every node is scored with TTA and, where each member has the identity
    view, without it.
    """
    cfg, task = plan.cfg, plan.task
    check_complete(sources, plan.testset.ids, sizes=task.stores_image_sizes)
    has_identity = all(s.plain_view in s.views for s in sources)  # identity, or a gate's first view
    try:
        sizes = sources[0].entry.read_sizes() if task.stores_image_sizes else None  # type: ignore[union-attr]
        out = task.blend(plan, sources, sizes, has_identity)
    except DamagedView as exc:  # marked: the next infer recomputes it; say which command
        raise DamagedView(exc.entry, exc.view, exc.reason, sources[0].fill_hint) from None
    if plan.sample is not None:
        out.table = align(out.table, plan.sample)
    out_path = cfg.resolve(cfg.submission.path)
    write_submission(out.table, out_path)
    result = BlendResult(
        str(out_path),
        cfg.submission_source,
        metrics=out.metrics if out.tta else [],
        n_rows=out.table.height,
        table=out.table,
    )
    secs = {s.name: {v: float(s.entry.view_state(v).get("seconds", 0.0)) for v in s.views} for s in sources}  # type: ignore[union-attr]
    members_of = _members_of(cfg)
    held = {s.name: _held_forwards(s, len(plan.testset)) for s in sources}
    plain_view = {s.name: s.plain_view for s in sources}
    for name in [s.name for s in sources] + [b.name for b in cfg.blends]:
        ms = members_of[name]
        fw = Forwards()
        for m in ms:
            fw.add(held[m])
        total = sum(sum(secs[m].values()) for m in ms)
        plain_s = sum(secs[m].get(plain_view[m], 0.0) for m in ms) if has_identity else None
        views = sum(len(secs[m]) for m in ms)
        kind = "member" if name in secs else "blend"
        result.rows.append(
            ReportRow(name, kind, views, out.plain.get(name, {}), out.tta.get(name, {}), plain_s, total, fw)
        )
    return result


def _held_forwards(s: MemberSource, n: int) -> Forwards:
    """The forwards a member's blend stands on: every view of every row, or, with adaptive
    views, the first view of every row and the rows of its other views that the blend merged
    (counted as it merged them)."""
    full = n * len(s.views)
    if s.gate is None or not s.merged:
        return Forwards(full, full)
    return Forwards(n + sum(s.merged.values()), full)


def _members_of(cfg: PipelineConfig) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {m.name: [m.name] for m in cfg.members}
    blends = {b.name: b.inputs for b in cfg.blends}

    def expand(n: str) -> list[str]:
        if n in out:
            return out[n]
        res: list[str] = []
        for i in blends[n]:
            for m in expand(i):
                if m not in res:
                    res.append(m)
        out[n] = res
        return res

    for b in cfg.blends:
        expand(b.name)
    return out


def format_report(result: BlendResult) -> str:
    """A markdown table like the reference document's: with and without TTA per node."""
    metrics = result.metrics or ["score"]
    head = " | ".join(f"{m} (no TTA) | {m} (TTA) | gain" for m in metrics)
    adaptive = any(r.forwards is not None and r.forwards.saved for r in result.rows)
    lines = [
        f"| node | kind | views | {head} | seconds | relative cost |{' forwards |' if adaptive else ''}",
        "|---|---|---|" + "---|---|---|" * len(metrics) + "---|---|" + ("---|" if adaptive else ""),
    ]
    for r in result.rows:
        cells = []
        for m in metrics:
            plain, tta = r.scores_plain.get(m), r.scores_tta.get(m)
            cells += [
                f"{100 * plain:.2f}%" if plain is not None else "—",
                f"{100 * tta:.2f}%" if tta is not None else "—",
            ]
            cells.append(f"{100 * (tta - plain):+.2f}" if tta is not None and plain is not None else "—")
        rel = f"{r.seconds / r.seconds_plain:.1f}×" if r.seconds_plain else "—"
        fw = (
            f" {r.forwards.run} of {r.forwards.full} ({100 * r.forwards.saved / r.forwards.full:.0f}% saved) |"
            if adaptive and r.forwards and r.forwards.full
            else (" — |" if adaptive else "")
        )
        lines.append(
            f"| {r.node}{' ◀' if r.node == result.source else ''} | {r.kind} | {r.views} | {' | '.join(cells)} | {r.seconds:.2f} | {rel} |{fw}"
        )
    return "\n".join(lines)
