"""Blending from the cache into a submission, and the with/without-TTA report: reads cached
views only, never builds a model or reads an image."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import polars as pl

from kaggle_tta.cache import DamagedView
from kaggle_tta.config import PipelineConfig
from kaggle_tta.engine.plan import Plan, find_entry
from kaggle_tta.exec.dag import MemberSource, check_complete
from kaggle_tta.io.groups import group_table
from kaggle_tta.io.submission import align, appended_rows, formatted_ids, long_rows, with_appended, write_submission
from kaggle_tta.ops.gate import Forwards, skipping


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
                str(m.cfg.merge),
                f"kaggle-tta infer {pipeline_arg}",
                skipping(m.gate),
            )
        )
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
    if plan.groups is not None:  # one row per group of images
        out.table = group_table(out.table, plan.groups, cfg.submission.group.aggregate)  # type: ignore[union-attr]
    spec = cfg.submission
    finished = task.finish(out.table, plan)
    if spec.rows == "class":  # a long table: one row per class
        out.table = long_rows(finished, spec.id_format, spec.label_column)
    else:
        out.table = formatted_ids(finished, spec.id_format)
    if spec.append:  # other submissions' rows after ours
        extra = appended_rows([cfg.resolve(p) for p in spec.append], out.table.columns)
        out.table = with_appended(out.table, extra, spec.decimals)
    if plan.sample is not None:
        out.table = align(out.table, plan.sample)
    out_path = cfg.resolve(spec.path)
    write_submission(out.table, out_path, decimals=spec.decimals)
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


VALUE_METRICS = frozenset({"RMSE", "MAE", "logloss"})  # errors (lower is better): shown as numbers, not percents


def _percent(x: float | None, gain: bool = False) -> str:
    return "—" if x is None else f"{100 * x:+.2f}" if gain else f"{100 * x:.2f}%"


def _value(x: float | None, gain: bool = False) -> str:
    return "—" if x is None else f"{x:+.4g}" if gain else f"{x:.4g}"


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
            shown = _value if m in VALUE_METRICS else _percent
            cells += [shown(plain), shown(tta)]
            gain = None if tta is None or plain is None else plain - tta if m in VALUE_METRICS else tta - plain
            cells.append(shown(gain, gain=True))  # an error's gain is how much TTA lowered it
        rel = f"{r.seconds / r.seconds_plain:.1f}×" if r.seconds_plain else "—"
        fw = (
            f" {r.forwards.run} of {r.forwards.full} ({100 * r.forwards.saved / r.forwards.full:.0f}% saved) |"
            if adaptive and r.forwards and r.forwards.full
            else (" — |" if adaptive else "")
        )
        lines.append(
            f"| {r.node}{' ◀' if r.node == result.source else ''} | {r.kind} | {r.views} | {' | '.join(cells)} | "
            f"{r.seconds:.2f} | {rel} |{fw}"
        )
    return "\n".join(lines)
