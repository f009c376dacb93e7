"""The three operations the CLI and notebooks call: infer (fill the cache), blend (cache ->
submission) and run (both), plus the with/without-TTA report."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from kaggle_tta.cache import IMAGE_SIZE
from kaggle_tta.blend import MemberSource, blocks, check_complete, node_predictions
from kaggle_tta.config import PipelineConfig
from kaggle_tta.merge import Prediction, to_probs
from kaggle_tta.plan import Plan, build_plan, find_entry, resolve_device, resolve_precision
from kaggle_tta.submission import build_table, write_submission


@dataclass
class ReportRow:
    node: str
    kind: str  # member | blend
    views: int
    scores_plain: dict[str, float]  # metric -> value with the identity view alone ({} if unknown)
    scores_tta: dict[str, float]  # metric -> value with every view
    seconds_plain: float | None
    seconds: float


@dataclass
class BlendResult:
    path: str
    source: str
    rows: list[ReportRow] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)  # empty without ground truth
    n_rows: int = 0  # rows written


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


def _counts(pred: Prediction, y: np.ndarray, plan: Plan) -> np.ndarray:
    """What a score is made of, additive over blocks of rows: (correct, rows), or for
    multi-label (true positives, false positives, false negatives)."""
    p = to_probs(pred, _activation(plan))
    if plan.cfg.multilabel:
        hit = p >= plan.cfg.submission.threshold
        return np.array([(hit & (y == 1)).sum(), (hit & (y == 0)).sum(), (~hit & (y == 1)).sum()], dtype=np.float64)
    return np.array([(p.argmax(axis=1) == y).sum(), len(y)], dtype=np.float64)


def _score(counts: np.ndarray, plan: Plan) -> float:
    if plan.cfg.multilabel:
        tp, fp, fn = counts
        return float(2 * tp / max(2 * tp + fp + fn, 1.0))
    return float(counts[0] / max(counts[1], 1.0))


def blend_and_write(plan: Plan, sources: list[MemberSource] | None = None, labels: np.ndarray | None = None) -> BlendResult:
    """Merges cached views, evaluates the blend DAG, writes the submission; reads no image.

    With ground truth (``labels`` for classification, ``data.masks`` or ``data.boxes``) every
    node is scored with TTA and, where each member has the identity view, without it.
    """
    cfg = plan.cfg
    sources = sources if sources is not None else sources_for(plan)
    check_complete(sources, plan.testset.ids, extra=() if cfg.task == "classification" else (IMAGE_SIZE,))
    has_identity = all("identity" in s.views for s in sources)
    write = {"classification": _classification, "segmentation": _segmentation, "detection": _detection}[cfg.task]
    table, metrics, tta, plain = write(plan, sources, labels, has_identity)
    out_path = cfg.resolve(cfg.submission.path)
    write_submission(table, out_path)
    result = BlendResult(str(out_path), cfg.submission_source, metrics=metrics if tta else [], n_rows=table.height)
    secs = {s.name: {v: float(s.entry.view_state(v).get("seconds", 0.0)) for v in s.views} for s in sources}  # type: ignore[union-attr]
    members_of = _members_of(cfg)
    for name in [s.name for s in sources] + [b.name for b in cfg.blends]:
        ms = members_of[name]
        total = sum(sum(secs[m].values()) for m in ms)
        plain_s = sum(secs[m].get("identity", 0.0) for m in ms) if has_identity else None
        views = sum(len(secs[m]) for m in ms)
        kind = "member" if name in secs else "blend"
        result.rows.append(ReportRow(name, kind, views, plain.get(name, {}), tta.get(name, {}), plain_s, total))
    return result


Scored = tuple[pl.DataFrame, list[str], dict[str, dict[str, float]], dict[str, dict[str, float]]]


BLOCK_ROWS = 2048  # rows merged and blended at a time: accumulators stay small and in cache


def _classification(plan: Plan, sources: list[MemberSource], labels: np.ndarray | None, has_identity: bool) -> Scored:
    """Blends in blocks of rows (every view, member and blend of a block at once), so memory
    is a few blocks whatever the test-set size; rank_mean ranks whole columns, so a DAG that
    uses it is evaluated in one block."""
    cfg = plan.cfg
    act = _activation(plan)
    n = len(plan.testset)
    # label and topk only rank each row: logits rank as their probabilities do, so the
    # softmax over [N, C] is skipped for them.
    ranked_only = cfg.submission.format in ("label", "topk")
    step = n if any(b.method == "rank_mean" for b in cfg.blends) else BLOCK_ROWS
    metric = "F1" if cfg.multilabel else "accuracy"
    tables, tta, plain = [], {}, {}
    for lo, hi in blocks(n, step):
        nodes = node_predictions(cfg, sources, lo, hi, act)
        src = nodes[cfg.submission_source]
        tables.append(build_table(plan.testset.ids[lo:hi], src.values if ranked_only else to_probs(src, act), plan.classes, cfg.submission))
        if labels is None:
            continue
        for name, pred in nodes.items():
            tta[name] = tta.get(name, 0) + _counts(pred, labels[lo:hi], plan)
        if has_identity:  # without TTA: each member's identity view alone, blended the same way
            for name, pred in node_predictions(cfg, sources, lo, hi, act, ["identity"]).items():
                plain[name] = plain.get(name, 0) + _counts(pred, labels[lo:hi], plan)
    table = pl.concat(tables) if len(tables) > 1 else tables[0]
    return table, [metric], {k: {metric: _score(c, plan)} for k, c in tta.items()}, {k: {metric: _score(c, plan)} for k, c in plain.items()}


def _segmentation(plan: Plan, sources: list[MemberSource], labels: np.ndarray | None, has_identity: bool) -> Scored:
    from kaggle_tta.tasks import segmentation

    act = plan.members[0].activation
    table, tta, plain = segmentation.write_and_score(plan.cfg, plan.testset.ids, plan.classes, sources, act, has_identity)
    return table, ["Dice", "IoU"], tta, plain


def _detection(plan: Plan, sources: list[MemberSource], labels: np.ndarray | None, has_identity: bool) -> Scored:
    from kaggle_tta.tasks import detection

    cfg = plan.cfg
    sizes = np.asarray(sources[0].entry.read(IMAGE_SIZE))  # type: ignore[union-attr]
    nodes = detection.evaluate_boxes(cfg, {s.name: detection.member_boxes(s, sizes, cfg.detection) for s in sources}, sizes)
    table = detection.submission_table(cfg, plan.testset.ids, nodes[cfg.submission_source], sizes, plan.classes)
    if cfg.data.boxes is None:
        return table, ["mAP@0.5"], {}, {}
    truth = detection.load_truth(cfg, plan.testset.ids, plan.classes)
    tta = {name: {"mAP@0.5": detection.mean_ap(b, truth, len(plan.classes))} for name, b in nodes.items()}
    plain = {}
    if has_identity:
        plain_nodes = detection.evaluate_boxes(cfg, {s.name: detection.member_boxes(s, sizes, cfg.detection, ["identity"]) for s in sources}, sizes)
        plain = {name: {"mAP@0.5": detection.mean_ap(b, truth, len(plan.classes))} for name, b in plain_nodes.items()}
    return table, ["mAP@0.5"], tta, plain


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
    lines = [f"| node | kind | views | {head} | seconds | relative cost |", "|---|---|---|" + "---|---|---|" * len(metrics) + "---|---|"]
    for r in result.rows:
        cells = []
        for m in metrics:
            plain, tta = r.scores_plain.get(m), r.scores_tta.get(m)
            cells += [f"{100 * plain:.2f}%" if plain is not None else "—", f"{100 * tta:.2f}%" if tta is not None else "—"]
            cells.append(f"{100 * (tta - plain):+.2f}" if tta is not None and plain is not None else "—")
        rel = f"{r.seconds / r.seconds_plain:.1f}×" if r.seconds_plain else "—"
        lines.append(f"| {r.node}{' ◀' if r.node == result.source else ''} | {r.kind} | {r.views} | {' | '.join(cells)} | {r.seconds:.2f} | {rel} |")
    return "\n".join(lines)
