"""The three operations the CLI and notebooks call: infer (fill the cache), blend (cache ->
submission) and run (both), plus the with/without-TTA report."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kaggle_tta.blend import MemberSource, check_complete, evaluate, member_prediction
from kaggle_tta.config import PipelineConfig
from kaggle_tta.merge import Prediction, to_probs
from kaggle_tta.plan import Plan, build_plan, find_entry, resolve_device, resolve_precision
from kaggle_tta.submission import build_table, write_submission


@dataclass
class ReportRow:
    node: str
    kind: str  # member | blend
    views: int
    score_plain: float | None
    score_tta: float | None
    seconds_plain: float | None
    seconds: float


@dataclass
class BlendResult:
    path: str
    source: str
    rows: list[ReportRow] = field(default_factory=list)
    metric: str | None = None


def infer(cfg: PipelineConfig, progress: bool = True):
    """Builds the plan and fills the cache; returns (plan, RunStats)."""
    from kaggle_tta.engine import run_inference  # torch models: only where a run needs them

    plan = build_plan(cfg)
    device = resolve_device(cfg.runtime.device)
    precision = resolve_precision(cfg.runtime.precision, device)
    stats = run_inference(plan, device, precision, progress=progress)
    return plan, stats


def sources_for(plan: Plan, pipeline_arg: str = "PIPELINE", computed: str | None = None) -> list[MemberSource]:
    """Where each member's cached views are (see plan.find_entry); ``computed`` is the
    precision a run just filled the cache in."""
    cfg = plan.cfg
    out = []
    for m in plan.members:
        entry = find_entry(plan, m, cfg.runtime.precision, computed)
        out.append(MemberSource(m.name, entry, [v.name for v in m.views], m.activation, m.cfg.merge, f"kaggle-tta infer {pipeline_arg}"))
    return out


def _activation(plan: Plan) -> str:
    return "sigmoid" if plan.cfg.multilabel else "softmax"


def _score(pred: Prediction, y: np.ndarray | None, plan: Plan) -> float | None:
    if y is None:
        return None
    p = to_probs(pred, _activation(plan))
    if plan.cfg.multilabel:
        hit = p >= plan.cfg.submission.threshold
        tp = float((hit & (y == 1)).sum())
        fp = float((hit & (y == 0)).sum())
        fn = float((~hit & (y == 1)).sum())
        return 2 * tp / max(2 * tp + fp + fn, 1.0)
    return float((p.argmax(axis=1) == y).mean())


def blend_and_write(plan: Plan, sources: list[MemberSource] | None = None, labels: np.ndarray | None = None) -> BlendResult:
    """Merges cached views, evaluates the blend DAG, writes the submission; reads no image."""
    cfg = plan.cfg
    sources = sources if sources is not None else sources_for(plan)
    check_complete(sources, plan.testset.ids)
    act = _activation(plan)
    preds = {s.name: member_prediction(s) for s in sources}
    nodes = evaluate(cfg, preds, act)
    src = cfg.submission_source
    # label and topk only rank each row: logits rank as their probabilities do, so the
    # softmax over [N, C] is skipped for them.
    ranked_only = cfg.submission.format in ("label", "topk")
    probs = nodes[src].values if ranked_only else to_probs(nodes[src], act)
    table = build_table(plan.testset.ids, probs, plan.classes, cfg.submission)
    out_path = cfg.resolve(cfg.submission.path)
    write_submission(table, out_path)
    result = BlendResult(str(out_path), src, metric=("F1" if cfg.multilabel else "accuracy") if labels is not None else None)

    # Without TTA: each member's identity view alone, blended the same way.
    has_identity = all("identity" in s.views for s in sources)
    plain_ok = labels is not None and has_identity
    plain_nodes = evaluate(cfg, {s.name: member_prediction(s, ["identity"]) for s in sources}, act) if plain_ok else {}
    secs = {s.name: {v: float(s.entry.view_state(v).get("seconds", 0.0)) for v in s.views} for s in sources}  # type: ignore[union-attr]
    members_of = _members_of(cfg)
    for name, pred in nodes.items():
        ms = members_of[name]
        total = sum(sum(secs[m].values()) for m in ms)
        plain_s = sum(secs[m].get("identity", 0.0) for m in ms) if has_identity else None
        views = sum(len(secs[m]) for m in ms)
        kind = "member" if name in preds else "blend"
        result.rows.append(ReportRow(name, kind, views, _score(plain_nodes[name], labels, plan) if plain_ok else None, _score(pred, labels, plan), plain_s, total))
    return result


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
    metric = result.metric or "score"
    lines = [
        f"| node | kind | views | {metric} (no TTA) | {metric} (TTA) | gain | seconds | relative cost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        fmt = (lambda v: f"{100 * v:.2f}%") if r.score_tta is not None else (lambda v: "—")
        plain = fmt(r.score_plain) if r.score_plain is not None else "—"
        tta = fmt(r.score_tta) if r.score_tta is not None else "—"
        gain = f"{100 * (r.score_tta - r.score_plain):+.2f}" if r.score_tta is not None and r.score_plain is not None else "—"
        rel = f"{r.seconds / r.seconds_plain:.1f}×" if r.seconds_plain else "—"
        lines.append(f"| {r.node}{' ◀' if r.node == result.source else ''} | {r.kind} | {r.views} | {plain} | {tta} | {gain} | {r.seconds:.2f} | {rel} |")
    return "\n".join(lines)
