"""The tables of a classification tuning (in-sample, on every labelled row): per view, per
member, per blend, how well the per-image uncertainty ranks errors, and the points of the
gain-against-cost picture.

A view's *gain* is what having it is worth to its member's NLL, positive when it helps:
for a kept view, the NLL without it (the others renormalized) minus the NLL with it; for a
dropped view, the NLL now minus the NLL with it added back at the kept views' mean weight.
A member's gain is the same for the source node, the member's weight set to zero in every
blend.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import polars as pl

from kaggle_tta.config import BlendConfig
from kaggle_tta.exec.dag import evaluate_dag, members_under
from kaggle_tta.ops.gate import skipping
from kaggle_tta.ops.merge import Prediction, activate, to_probs
from kaggle_tta.tuning import losses
from kaggle_tta.tuning.class_data import ClassData, Tuned, blend_node
from kaggle_tta.tuning.problem import Point
from kaggle_tta.tuning.views import ViewPolicy


def _weights_text(w: np.ndarray) -> str:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim == 2:
        return f"per class [{w.shape[0]}x{w.shape[1]}]"
    return ", ".join(f"{x:g}" for x in np.round(w / w.sum(), 3))


def view_table(pb: ClassData, before: Tuned, after: Tuned) -> pl.DataFrame:
    rows = []
    every = np.ones(pb.n_units, dtype=bool)
    for name, m in pb.members.items():
        p = after.members[name]
        w = p.weights.reshape(len(m.views), -1).astype(np.float64)
        kept = set(p.kept().tolist())
        now = m.loss(p.weights, p.temperature, every)
        wb = before.members[name].weights.reshape(len(m.views), -1)
        for k, v in enumerate(m.views):
            alt = w.copy()
            if k in kept:
                alt[k] = 0.0
                gain = (
                    m.loss(alt.reshape(p.weights.shape), p.temperature, every) - now if len(kept) > 1 else float("nan")
                )
            else:
                alt[k] = w[sorted(kept)].mean(axis=0)
                gain = now - m.loss(alt.reshape(p.weights.shape), p.temperature, every)
            rows.append(
                {
                    "member": name,
                    "view": v,
                    "kept": k in kept,
                    "weight before": float(wb[k].sum() / wb.sum()),
                    "weight after": float(w[k].sum() / w.sum()),
                    "gain (NLL)": float(gain),
                    "gain when added (NLL)": p.added_gain.get(k, float("nan")),
                    "seconds": m.seconds[k],
                }
            )
    return pl.DataFrame(rows)


def _ece(pb: ClassData, name: str, p: ViewPolicy) -> float:
    probs = to_probs(pb.member_prediction(name, p))
    return losses.ece(pb.y, probs)


def member_table(pb: ClassData, before: Tuned, after: Tuned) -> pl.DataFrame:
    rows = []
    every = np.arange(pb.n_units)
    for name, m in pb.members.items():
        b, a = before.members[name], after.members[name]
        sb, sa = (
            pb.score(before, every, pred=pb.member_prediction(name, b)),
            pb.score(after, every, pred=pb.member_prediction(name, a)),
        )
        metric = pb.metric.name
        rows.append(
            {
                "member": name,
                "views before": len(b.kept()),
                "views after": len(a.kept()),
                "seconds before": float(sum(m.seconds[k] for k in b.kept())),
                "seconds after": float(sum(m.seconds[k] for k in a.kept())),
                "T before": float(b.temperature),
                "T after": float(a.temperature),
                "NLL before": sb.get("NLL", float("nan")),
                "NLL after": sa.get("NLL", float("nan")),
                "ECE before": _ece(pb, name, b),
                "ECE after": _ece(pb, name, a),
                f"{metric} before": sb[metric],
                f"{metric} after": sa[metric],
                "notes": "; ".join(a.notes),
            }
        )
    return pl.DataFrame(rows)


def blend_table(pb: ClassData, before: Tuned, after: Tuned) -> pl.DataFrame:
    rows = []
    every = np.arange(pb.n_units)
    metric = pb.metric.name
    for b in pb.cfg.blends:
        sb, sa = pb.score(before, every, node=b.name), pb.score(after, every, node=b.name)
        rows.append(
            {
                "blend": b.name,
                "method": str(b.method),
                "inputs": ", ".join(b.inputs),
                "weights before": _weights_text(before.blends[b.name]),
                "weights after": _weights_text(after.blends[b.name]),
                f"{metric} before": sb[metric],
                f"{metric} after": sa[metric],
                "NLL before": sb.get("NLL", float("nan")),
                "NLL after": sa.get("NLL", float("nan")),
            }
        )
    return pl.DataFrame(rows)


def member_gains(pb: ClassData, tuned: Tuned) -> dict[str, float]:
    """Each member's gain to the source node's NLL (NaN where it is the source, or a blend
    would be left without inputs)."""
    src = pb.cfg.submission_source
    nll = losses.prediction_nll(pb.nodes(tuned)[src], pb.y)
    out = {}
    for name in pb.members:
        if name == src or nll is None:
            out[name] = float("nan")
            continue
        weights = {b.name: np.where(np.asarray(b.inputs) == name, 0.0, tuned.blends[b.name]) for b in pb.cfg.blends}
        if any(w.sum() <= 0 for w in weights.values()):
            out[name] = float("nan")
            continue
        preds = {n: pb.member_prediction(n, p) for n, p in tuned.members.items()}
        nodes = evaluate_dag(pb.cfg, preds, _blended_with(weights))
        without = losses.prediction_nll(nodes[src], pb.y)
        out[name] = float(without.mean() - nll.mean()) if without is not None else float("nan")
    return out


def _blended_with(weights: dict[str, np.ndarray]) -> Callable[[BlendConfig, list[Prediction]], Prediction]:
    """Each blend's prediction with these member weights (blend -> weights)."""
    return lambda b, ins: blend_node(b, ins, weights[b.name])


def uncertainty(pb: ClassData, tuned: Tuned) -> dict[str, np.ndarray]:
    """Per row, as ``submission.uncertainty`` writes them: ``tta_std`` (spread over the
    source's (member, view) predictions of the top class's probability) and
    ``tta_entropy``; and whether the row is an error."""
    src = pb.cfg.submission_source
    probs = to_probs(pb.nodes(tuned)[src])
    top = probs.argmax(axis=1)
    views = []
    rows = np.arange(len(top))
    for name in members_under(pb.cfg, src):
        m, p = pb.members[name], tuned.members[name]
        gate = skipping(p.gate)
        send, first = (m.sends(gate), gate.first) if gate is not None else (None, None)
        for k in p.kept():
            z_top = m.z[k][rows, top].astype(np.float64) / p.temperature
            if m.activation == "softmax":  # the top class's probability without the whole softmax
                views.append(np.exp(z_top - losses.log_sum_exp(m.z[k], 1.0 / p.temperature)))
            else:
                views.append(activate(z_top[:, None].astype(np.float32), m.activation)[:, 0].astype(np.float64))
            # adaptive: a row's spread is over the views it holds, as the blend's
            if send is not None and m.views[k] != first:
                views[-1][~send] = np.nan
    std = np.nanstd(np.stack(views), axis=0)
    q = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    if pb.multilabel:
        r = np.clip(1.0 - probs.astype(np.float64), 1e-12, 1.0)
        entropy = -(q * np.log(q) + r * np.log(r)).mean(axis=1)
        error = ((probs >= np.asarray(tuned.threshold)) != (pb.y == 1)).any(axis=1)
    else:
        entropy = -(q * np.log(q)).sum(axis=1)
        error = top != pb.y
    return {"tta_std": std, "tta_entropy": entropy, "error": error}


def uncertainty_table(pb: ClassData, before: Tuned, after: Tuned) -> pl.DataFrame:
    rows = []
    for label, t in (("before", before), ("after", after)):
        u = uncertainty(pb, t)
        for col in ("tta_std", "tta_entropy"):
            rows.append(
                {
                    "pipeline": label,
                    "column": col,
                    "errors": int(u["error"].sum()),
                    "AUROC (ranks errors)": losses.auroc(u[col], u["error"]),
                }
            )
    return pl.DataFrame(rows)


def picture_points(pb: ClassData, tuned: Tuned, views: pl.DataFrame) -> list[Point]:
    """(kind, label, seconds, gain) of every view and member."""
    pts = [("view", f"{r['member']}/{r['view']}", r["seconds"], r["gain (NLL)"]) for r in views.iter_rows(named=True)]
    gains = member_gains(pb, tuned)
    for name, m in pb.members.items():
        secs = float(sum(m.seconds[k] for k in tuned.members[name].kept()))
        pts.append(("member", name, secs, gains[name]))
    return pts
