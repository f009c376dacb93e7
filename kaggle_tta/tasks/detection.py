"""Detection: adapters from a model's output to boxes, and boxes from the cache to a submission.

Adapter protocol. A member's ``adapter`` turns the model's raw output for a chunk of inputs
into one ``(boxes, scores, labels)`` per input: boxes ``[n, 4]`` as x1, y1, x2, y2 in pixels
of the tensor the model was given (``input_size = (H, W)``), scores ``[n]``, integer labels
``[n]`` indexing ``data.classes``. Built in: ``torchvision`` (torchvision's detection models:
a list of dicts; their label 0 is the background, so labels are shifted down by one) and
``boxes`` (a dict or tuple of batched ``boxes [B, n, 4], scores [B, n], labels [B, n]``). Any
``module:callable`` with the signature ``fn(output, input_size)`` is used as given (e.g. a
YOLO-style decoder of raw grids; see kaggle_tta.demo.models.decode_centernet).

From the cache, each member's views of an image are fused (wbf by default) and members are
fused again by the blends, per image, through kaggle_tta.ops.boxes (ensemble-boxes, checked).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import polars as pl

from kaggle_tta.config import BlendConfig, DetectionConfig, MemberConfig, PipelineConfig
from kaggle_tta.config.errors import CheckpointError, ConfigError, DataError
from kaggle_tta.exec.dag import MemberSource, evaluate_dag
from kaggle_tta.io.canvas import CanvasSpec
from kaggle_tta.io.models import import_callable
from kaggle_tta.io.tables import read_csv_table
from kaggle_tta.ops.boxes import (
    FUSION_METHODS,
    BoxesError,
    Method,
    fuse_boxes,
    resolve_template,
    valid_boxes,
)
from kaggle_tta.tasks.base import Task, TaskOutput, register_task
from kaggle_tta.tasks.det_rows import Boxes, pseudo_probabilities, submission_table

if TYPE_CHECKING:
    from kaggle_tta.engine.plan import Plan
    from kaggle_tta.exec.forward import MemberWork
    from kaggle_tta.io.data import Batch
    from kaggle_tta.io.models import Preprocess


# ---- adapters (engine side; tensors are duck-typed, torch is not imported here) ------------


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def torchvision_adapter(output: Any, input_size: tuple[int, int]) -> list[Boxes]:
    """torchvision detection models (Faster R-CNN, RetinaNet, FCOS, SSD, ...) in eval mode."""
    out = []
    for d in output:
        lab = _np(d["labels"]).astype(np.int64)
        keep = lab > 0  # RetinaNet and FCOS can emit label 0 (the background index): not an object
        out.append((_np(d["boxes"])[keep], _np(d["scores"])[keep], lab[keep] - 1))
    return out


def boxes_adapter(output: Any, input_size: tuple[int, int]) -> list[Boxes]:
    """A dict (boxes, scores, labels) or a 3-tuple of batched, padded arrays; rows with a
    negative label or a non-positive score are padding."""
    b, s, lab = (output["boxes"], output["scores"], output["labels"]) if isinstance(output, dict) else output
    b, s, lab = _np(b), _np(s), _np(lab)
    out = []
    for i in range(b.shape[0]):
        keep = (lab[i] >= 0) & (s[i] > 0)
        out.append((b[i][keep], s[i][keep], lab[i][keep].astype(np.int64)))
    return out


ADAPTERS: dict[str, Callable[[Any, tuple[int, int]], list[Boxes]]] = {
    "torchvision": torchvision_adapter,
    "boxes": boxes_adapter,
}


def resolve_adapter(spec: str, where: str) -> Callable[[Any, tuple[int, int]], list[Boxes]]:
    if spec in ADAPTERS:
        return ADAPTERS[spec]
    if ":" not in spec:
        raise ConfigError(f"{where}: unknown adapter '{spec}'; use {', '.join(ADAPTERS)} or 'module:callable'")
    return import_callable(spec, where)


def detection_post(spec: str, where: str, n_classes: int) -> Callable[[Any, Any], list[Boxes]]:
    """The runner's post-processing for a detection member: adapter, then checks (so a bad
    adapter fails during inference, naming the member, not at blend time)."""
    adapter = resolve_adapter(spec, where)

    def post(output: Any, x: Any) -> list[Boxes]:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        res = adapter(output, size)
        if not isinstance(res, (list, tuple)) or len(res) != x.shape[0]:
            raise CheckpointError(
                f"{where}: the adapter returned {type(res).__name__} of length "
                f"{len(res) if hasattr(res, '__len__') else '?'} for {x.shape[0]} inputs; return one (boxes, "
                "scores, labels) per input"
            )
        out = []
        for b, s, lab in res:
            b = np.asarray(_np(b), dtype=np.float64).reshape(-1, 4)
            s = np.asarray(_np(s), dtype=np.float64).reshape(-1)
            lab = np.asarray(_np(lab)).reshape(-1)
            if not len(b) == len(s) == len(lab):
                raise CheckpointError(
                    f"{where}: the adapter gave {len(b)} boxes, {len(s)} scores and {len(lab)} labels for one image"
                )
            if len(lab) and (lab.min() < 0 or lab.max() >= n_classes):
                raise CheckpointError(
                    f"{where}: the adapter gave label {int(lab.min() if lab.min() < 0 else lab.max())}; labels "
                    f"must index data.classes (0..{n_classes - 1})"
                )
            out.append((b, s, lab.astype(np.int64)))
        return out

    return post


# ---- from the cache ------------------------------------------------------------------------


def _rows_of(x: Any) -> Callable[[int, int], Any]:
    """A :class:`Piece`'s ``make``: rows ``a:b`` of ``x``."""
    return lambda a, b: x[a:b]


def _options(d: DetectionConfig) -> dict[str, Any]:
    return {
        "iou_thr": d.iou_thr,
        "skip_box_thr": d.skip_box_thr,
        "conf_type": d.conf_type,
        "sigma": d.sigma,
        "thresh": d.thresh,
    }


def _cap(b: Boxes, max_boxes: int | None) -> Boxes:
    return b if max_boxes is None else (b[0][:max_boxes], b[1][:max_boxes], b[2][:max_boxes])


def member_boxes(
    s: MemberSource,
    sizes: np.ndarray,
    d: DetectionConfig,
    views: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
) -> list[Boxes]:
    """Per image, the member's views fused with its merge rule (one view passes through,
    sorted by score) and ``weights`` (one per view: the member's view_weights), in pixels
    of the original image."""
    names = list(views) if views is not None else list(s.views)
    data = [s.entry.read_ragged(v) for v in names]  # type: ignore[union-attr]
    out = []
    for i, (h, w) in enumerate(sizes.tolist()):
        scale = np.array([w, h, w, h], dtype=np.float64)
        per_view = [np.asarray(rows[off[i] : off[i + 1]], dtype=np.float64) for rows, off in data]
        if len(per_view) == 1:  # nothing to fuse; the same filters fusion applies
            r = per_view[0]
            r = r[valid_boxes(r[:, :4], r[:, 4], d.skip_box_thr)]
            order = np.argsort(-r[:, 4], kind="stable")
            out.append((r[order, :4] * scale, r[order, 4], r[order, 5].astype(np.int64)))
            continue
        out.append(
            fuse_boxes(
                [r[:, :4] * scale for r in per_view],
                [r[:, 4] for r in per_view],
                [r[:, 5] for r in per_view],
                (h, w),
                cast(Method, s.merge),
                weights,
                **_options(d),
            )
        )
    return out


def evaluate_boxes(cfg: PipelineConfig, members: dict[str, list[Boxes]], sizes: np.ndarray) -> dict[str, list[Boxes]]:
    """Every node's boxes: the members', then each blend fused over its inputs, per image."""
    d = cfg.detection

    def fuse(bl: BlendConfig, inputs: list[list[Boxes]]) -> list[Boxes]:
        out = []
        for i, (h, w) in enumerate(sizes.tolist()):
            ins = [x[i] for x in inputs]
            out.append(
                _cap(
                    fuse_boxes(
                        [x[0] for x in ins],
                        [x[1] for x in ins],
                        [x[2] for x in ins],
                        (h, w),
                        cast(Method, bl.method),
                        bl.weights,
                        **_options(d),
                    ),
                    d.max_boxes,
                )
            )
        return out

    return evaluate_dag(cfg, {k: [_cap(b, d.max_boxes) for b in v] for k, v in members.items()}, fuse)


# ---- ground truth and mAP ------------------------------------------------------------------


def load_truth(cfg: PipelineConfig, ids: Sequence[str], classes: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, ground-truth (pixel xyxy boxes, labels) from ``data.boxes``."""
    spec = cfg.data.boxes
    assert spec is not None
    path = cfg.resolve(spec.path)
    df = read_csv_table(
        path, "data.boxes.path", schema_overrides={spec.id_column: pl.String, spec.label_column: pl.String}
    )
    need = [spec.id_column, *spec.columns, spec.label_column]
    if len(spec.columns) != 4 or any(c not in df.columns for c in need):
        raise DataError(f"{path}: needs columns {need} (data.boxes.columns gives x1, y1, x2, y2), has {df.columns}")
    index = {c: k for k, c in enumerate(classes)}
    unknown = set(df[spec.label_column].to_list()) - set(index)
    if unknown:
        raise DataError(f"{path}: label '{sorted(unknown)[0]}' is not in data.classes")
    groups = {k[0]: g for k, g in df.group_by(spec.id_column)}
    out = []
    for i in ids:
        g = groups.get(i)
        if g is None:
            out.append((np.zeros((0, 4)), np.zeros(0, np.int64)))
        else:
            out.append(
                (
                    g.select(spec.columns).to_numpy().astype(np.float64),
                    np.array([index[x] for x in g[spec.label_column].to_list()], np.int64),
                )
            )
    return out


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1]) + (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1]) - inter
    return inter / np.maximum(area, 1e-12)


def _ap_voc(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2010+ all-point AP: the area under the precision envelope."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _ap_coco(recall: np.ndarray, precision: np.ndarray) -> float:
    """COCO's 101-point AP (pycocotools): the envelope sampled at recall 0, 0.01, ..., 1."""
    env = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    at = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
    return float(np.mean([env[i] if i < len(env) else 0.0 for i in at]))


# How AP is read off the precision/recall curve, by detection.map_rule; COCO also keeps at
# most 100 detections per image and class, as pycocotools' maxDets does.
MAP_RULES = {"voc": (_ap_voc, None, "mAP@0.5 (VOC all-point)"), "coco": (_ap_coco, 100, "mAP@0.5 (COCO 101-point)")}


def mean_ap(
    pred: list[Boxes],
    truth: list[tuple[np.ndarray, np.ndarray]],
    n_classes: int,
    iou_thr: float = 0.5,
    rule: str = "voc",
) -> float:
    """mAP at one IoU threshold: per class, detections matched greedily by descending score
    (each ground-truth box once, the best IoU first, as pycocotools does), AP by ``rule``
    (MAP_RULES), averaged over the classes that have ground truth."""
    ap_of, max_dets, _ = MAP_RULES[rule]
    aps = []
    for c in range(n_classes):
        n_truth = sum(int((lab == c).sum()) for _, lab in truth)
        if n_truth == 0:
            continue
        dets = []  # (score, image, box)
        for i, (b, s, lab) in enumerate(pred):
            ks = np.flatnonzero(lab == c)
            if max_dets is not None:
                ks = ks[np.argsort(-s[ks], kind="stable")][:max_dets]
            for k in ks:
                dets.append((float(s[k]), i, b[k]))
        dets.sort(key=lambda t: -t[0])
        used = {i: np.zeros(int((lab == c).sum()), bool) for i, (_, lab) in enumerate(truth)}
        tp = np.zeros(len(dets))
        for t, (_, i, box) in enumerate(dets):
            gt = truth[i][0][truth[i][1] == c]
            if len(gt) == 0:
                continue
            ious = _iou(box, gt)
            ious[used[i]] = -1.0
            j = int(ious.argmax())
            if ious[j] >= iou_thr:
                used[i][j] = True
                tp[t] = 1.0
        ctp = np.cumsum(tp)
        precision = ctp / np.arange(1, len(dets) + 1) if len(dets) else np.zeros(0)
        aps.append(ap_of(ctp / n_truth, precision))
    return float(np.mean(aps)) if aps else 0.0


# ---- the task ------------------------------------------------------------------------------


def write_boxes(
    cfg: PipelineConfig, plan: Plan, sources: Sequence[MemberSource], sizes: np.ndarray, plain: bool
) -> TaskOutput:
    """Fuses every node's boxes per image, writes the source node's PredictionStrings and,
    with ``data.boxes``, scores every node's mAP@0.5 (``plain``: also the identity view alone)."""
    classes = plan.classes
    nodes = evaluate_boxes(
        cfg,
        {s.name: member_boxes(s, sizes, cfg.detection, weights=cfg.member(s.name).view_weights) for s in sources},
        sizes,
    )
    table = Detection.writers[cast(str, cfg.submission.format)](
        cfg, plan.testset.ids, nodes[cfg.submission_source], sizes, classes
    )
    rule = cfg.detection.map_rule
    metric = MAP_RULES[rule][2]
    if cfg.data.boxes is None:
        return TaskOutput(table, [metric])
    truth = load_truth(cfg, plan.testset.ids, classes)
    tta = {name: {metric: mean_ap(b, truth, len(classes), rule=rule)} for name, b in nodes.items()}
    no_tta = {}
    if plain:
        plain_nodes = evaluate_boxes(
            cfg, {s.name: member_boxes(s, sizes, cfg.detection, ["identity"]) for s in sources}, sizes
        )
        no_tta = {name: {metric: mean_ap(b, truth, len(classes), rule=rule)} for name, b in plain_nodes.items()}
    return TaskOutput(table, [metric], tta, no_tta)


@register_task
class Detection(Task):
    name = "detection"
    target = "boxes"
    merges = FUSION_METHODS
    blends = FUSION_METHODS
    writers = {"boxes": submission_table}
    truth = "boxes"
    stores_image_sizes = True
    logit_views = False
    tuner = "boxes"

    def validate(self, cfg: PipelineConfig) -> None:
        try:
            resolve_template(cfg.submission.template)
        except BoxesError as exc:
            raise ConfigError(f"submission.template: {exc}") from None

    def canvas(self, cfg: PipelineConfig, pre: Preprocess) -> CanvasSpec:
        return CanvasSpec(pre.size, 1.0, pre.interpolation, pre.albumentations, "resize")

    def check_plan(self, plan: Plan) -> None:
        super().check_plan(plan)
        for m in plan.members:
            if m.cfg.view_weights is not None and min(m.cfg.view_weights) <= 0:
                raise ConfigError(
                    f"members.{m.name}.view_weights: box fusion takes positive weights, got {m.cfg.view_weights}; "
                    "drop a view from tta instead of weighing it zero"
                )
        if plan.cfg.data.boxes is not None:  # a bad ground-truth file fails before the first forward
            load_truth(plan.cfg, plan.testset.ids, plan.classes)
        if plan.cfg.submission.pseudo_box is not None:  # so does a bad pseudo-box file
            pseudo_probabilities(plan.cfg, plan.testset.ids)

    def fingerprint(self, cfg: PipelineConfig, m: MemberConfig, canvas: CanvasSpec, activation: str) -> dict[str, Any]:
        return {"canvas": canvas.__dict__, "adapter": m.adapter}

    def columns(self, plan: Plan) -> list[str]:
        return [plan.cfg.submission.id_column, plan.cfg.submission.prediction_column]

    # ---- engine side ---------------------------------------------------------------------

    def post(self, plan: Plan, m: MemberConfig) -> Callable[[Any, Any], list[Boxes]]:
        return detection_post(m.adapter, f"members.{m.name}.adapter", len(plan.classes))

    def open_views(self, work: MemberWork, plan: Plan) -> None:
        for v in work.views:
            work.open_ragged(v.name, len(plan.testset))

    def step(self, work: MemberWork, batch: Batch, plan: Plan) -> None:
        """Views -> forward -> adapter boxes (view pixels) -> normalized -> inverted -> stored."""
        from kaggle_tta.exec.forward import Piece, ViewLog, normalize, run_chunks

        pre, runner = work.member.preprocess, work.runner
        assert runner is not None
        x = normalize(batch.canvases[work.member.canvas.key], pre.mean, pre.std, runner.device)
        size = tuple(x.shape[-2:])
        log = ViewLog()
        for v, first in work.todo(batch.lo, batch.hi):
            xv = v.apply(x[first - batch.lo :])
            vh, vw = xv.shape[-2:]
            scale = np.array([vw, vh, vw, vh], dtype=np.float64)
            rows: list[np.ndarray] = []

            def invert(out: list[Boxes], slots: list, v: Any = v, rows: list = rows, scale: np.ndarray = scale) -> None:
                for boxes, scores, labels in out:
                    b = v.invert_boxes(np.clip(boxes / scale, 0.0, 1.0), size)
                    rows.append(np.column_stack([b, scores, labels]).astype(np.float32))

            run_chunks(runner, [Piece(v.name, xv.shape[0], _rows_of(xv))], invert, log)
            work.store[v.name].write(first, rows)
        work.record(batch.lo, batch.hi, batch.sizes, log)

    # ---- from the cache ------------------------------------------------------------------

    def blend(self, plan: Plan, sources: Sequence[MemberSource], sizes: np.ndarray | None, plain: bool) -> TaskOutput:
        assert sizes is not None
        return write_boxes(plan.cfg, plan, sources, sizes, plain)
