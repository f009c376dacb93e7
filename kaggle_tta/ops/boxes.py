"""Fusing detection boxes across models or views, and writing them as a PredictionString.

An adapter over ensemble-boxes that keeps its algorithms and fixes its edges: inputs are
checked here and a bad one raises :class:`BoxesError` (ensemble-boxes prints and calls
``exit()`` on mismatched lists and silently replaces wrong-length weights); boxes are in
pixels at the edges and normalized only for the call; labels come back as int64, not float.

Boxes are ``x_min, y_min, x_max, y_max`` in pixels of an image of ``(H, W)``. Boxes reaching
outside the image are clipped to it; boxes with no area left after clipping (degenerate or
wholly outside) are dropped, as ensemble-boxes would drop them, but without its warnings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from kaggle_tta.config.errors import KaggleTTAError, check_hw, did_you_mean, template_fields

Method = Literal["wbf", "nms", "soft_nms", "nmw"]
ConfType = Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]
CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")
FUSION_METHODS = ("wbf", "nms", "soft_nms", "nmw")


class BoxesError(KaggleTTAError):
    """Detection boxes, scores, labels, weights or a PredictionString template are invalid."""


# ---- fusion --------------------------------------------------------------------------------

# One signature for every algorithm: (boxes, scores, labels, weights, options) -> ensemble-boxes'
# (boxes, scores, labels). Each passes on only the options its algorithm has.


def _eb():  # noqa: ANN202
    import ensemble_boxes  # 0.6 s to import (pandas): only where boxes are actually fused

    return ensemble_boxes


def _wbf(boxes: list, scores: list, labels: list, weights: list[float] | None, o: dict) -> tuple:
    return _eb().weighted_boxes_fusion(
        boxes,
        scores,
        labels,
        weights=weights,
        iou_thr=o["iou_thr"],
        skip_box_thr=o["skip_box_thr"],
        conf_type=o["conf_type"],
    )


def _nms(boxes: list, scores: list, labels: list, weights: list[float] | None, o: dict) -> tuple:
    return _eb().nms(boxes, scores, labels, iou_thr=o["iou_thr"], weights=weights)


def _soft_nms(boxes: list, scores: list, labels: list, weights: list[float] | None, o: dict) -> tuple:
    return _eb().soft_nms(
        boxes, scores, labels, iou_thr=o["iou_thr"], sigma=o["sigma"], thresh=o["thresh"], weights=weights
    )


def _nmw(boxes: list, scores: list, labels: list, weights: list[float] | None, o: dict) -> tuple:
    return _eb().non_maximum_weighted(
        boxes, scores, labels, weights=weights, iou_thr=o["iou_thr"], skip_box_thr=o["skip_box_thr"]
    )


_FUSERS: dict[str, Callable[..., tuple]] = {"wbf": _wbf, "nms": _nms, "soft_nms": _soft_nms, "nmw": _nmw}


def fuse_boxes(
    boxes_list: Sequence[np.ndarray],
    scores_list: Sequence[np.ndarray],
    labels_list: Sequence[np.ndarray],
    image_size: tuple[int, int],
    method: Method = "wbf",
    weights: Sequence[float] | None = None,
    iou_thr: float = 0.55,
    skip_box_thr: float = 0.0,
    conf_type: ConfType = "avg",
    sigma: float = 0.5,
    thresh: float = 0.001,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuses the boxes of several models (or TTA views) of one image.

    Args:
        boxes_list: per model, ``[N_i, 4]`` pixel ``x1, y1, x2, y2`` (``N_i`` may be 0).
        scores_list: per model, ``[N_i]`` confidences.
        labels_list: per model, ``[N_i]`` integer class ids (integer-valued floats pass).
        image_size: ``(H, W)`` in pixels; boxes are clipped to it.
        method: ``wbf`` (weighted boxes fusion), ``nms``, ``soft_nms`` (Gaussian) or
            ``nmw`` (non-maximum weighted).
        weights: one positive weight per model; None weighs them equally. For ``nms`` and
            ``soft_nms``, ensemble-boxes scales model i's scores by ``w_i / sum(w)``, so
            passing weights (even all ones) changes the scores that come back.
        iou_thr: IoU above which two boxes of a label match (cluster, or suppress).
        skip_box_thr: boxes scoring below this (before weighting) are dropped first, for
            every method (ensemble-boxes has it only for ``wbf`` and ``nmw``).
        conf_type: ``wbf`` only: how a cluster's confidence is computed.
        sigma: ``soft_nms`` only: the Gaussian's width.
        thresh: ``soft_nms`` only: boxes whose decayed score falls to this are dropped.
            The boxes kept carry their original (weighted) scores, not the decayed ones:
            that is what ensemble-boxes returns, and it is kept so results match it.

    Returns:
        ``(boxes [M, 4] float64 pixel xyxy, scores [M] float64, labels [M] int64)``, in
        descending score order (stable); empty arrays of these shapes when no box is left.

    Raises:
        BoxesError: an unknown method or conf_type, lists of different lengths, a weight
            count other than the number of models, a non-positive or non-finite weight, a
            boxes array not ``[N, 4]``, scores or labels of the wrong length, non-finite
            values, non-integer labels, or a box with ``x2 < x1`` or ``y2 < y1``.
    """
    options = dict(iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type=conf_type, sigma=sigma, thresh=thresh)
    _check_options(method, options)
    h, w = _check_image_size(image_size)
    n_models = _check_lists(boxes_list, scores_list, labels_list)
    weight_list = _check_weights(weights, n_models)
    scale = np.array([w, h, w, h], dtype=np.float64)
    boxes_n, scores_n, labels_n = _normalized(boxes_list, scores_list, labels_list, scale, skip_box_thr)
    return _fused(method, boxes_n, scores_n, labels_n, weight_list, options, scale)


def _normalized(
    boxes_list: Sequence[np.ndarray],
    scores_list: Sequence[np.ndarray],
    labels_list: Sequence[np.ndarray],
    scale: np.ndarray,
    skip_box_thr: float,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Each model's boxes, checked, clipped to the image and normalized (``scale``: ``W, H, W,
    H``), with their scores and labels; only the boxes fusion keeps (:func:`valid_boxes`)."""
    boxes_n, scores_n, labels_n = [], [], []
    for i in range(len(boxes_list)):
        b, s, lab = _check_model(i, boxes_list[i], scores_list[i], labels_list[i])
        b = np.clip(b, 0.0, scale) / scale  # clip to the image, then normalize
        keep = valid_boxes(b, s, skip_box_thr)
        boxes_n.append(b[keep])
        scores_n.append(s[keep])
        labels_n.append(lab[keep])
    return boxes_n, scores_n, labels_n


def _fused(
    method: str,
    boxes_n: list[np.ndarray],
    scores_n: list[np.ndarray],
    labels_n: list[np.ndarray],
    weights: list[float] | None,
    options: dict[str, Any],
    scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The normalized boxes fused by ensemble-boxes, back in pixels (``scale``), in descending
    score order (stable)."""
    if sum(len(s) for s in scores_n) == 0:
        # ensemble-boxes' nms crashes on no boxes at all; WBF returns float labels
        return _empty()
    fused_b, fused_s, fused_l = _FUSERS[method](boxes_n, scores_n, labels_n, weights, options)
    fused_b = np.asarray(fused_b, dtype=np.float64).reshape(-1, 4)
    fused_s = np.asarray(fused_s, dtype=np.float64).reshape(-1)
    fused_l = np.rint(np.asarray(fused_l, dtype=np.float64)).astype(np.int64).reshape(-1)
    # ensemble-boxes' NMS returns boxes grouped by label; one order for every method helps
    # writers. WBF's output is already sorted, and a stable sort keeps it as it is.
    order = np.argsort(-fused_s, kind="stable")
    return fused_b[order] * scale, fused_s[order], fused_l[order]


def _check_lists(
    boxes_list: Sequence[np.ndarray], scores_list: Sequence[np.ndarray], labels_list: Sequence[np.ndarray]
) -> int:
    """The number of models: one entry each in every list, at least one."""
    n_models = len(boxes_list)
    if n_models == 0:
        raise BoxesError("no models to fuse: boxes_list is empty")
    if len(scores_list) != n_models or len(labels_list) != n_models:
        raise BoxesError(
            f"one entry per model is needed in each list: boxes_list has {n_models}, "
            f"scores_list {len(scores_list)}, labels_list {len(labels_list)}"
        )
    return n_models


def _check_options(method: str, o: dict[str, Any]) -> None:
    if method not in _FUSERS:
        raise BoxesError(
            f"unknown box fusion method '{method}'{did_you_mean(method, _FUSERS)}; choose one of {', '.join(_FUSERS)}"
        )
    if o["conf_type"] not in CONF_TYPES:
        raise BoxesError(
            f"unknown conf_type '{o['conf_type']}'{did_you_mean(o['conf_type'], CONF_TYPES)}; "
            f"choose one of {', '.join(CONF_TYPES)}"
        )
    for name in ("iou_thr", "skip_box_thr", "sigma", "thresh"):
        if not np.isfinite(o[name]):
            raise BoxesError(f"{name} must be finite, got {o[name]}")
    if not 0.0 <= o["iou_thr"] <= 1.0:
        raise BoxesError(f"iou_thr must be in [0, 1], got {o['iou_thr']}")
    if o["sigma"] <= 0:
        raise BoxesError(f"sigma must be positive, got {o['sigma']}")


def valid_boxes(boxes: np.ndarray, scores: np.ndarray, skip_box_thr: float) -> np.ndarray:
    """The rows fusion keeps: positive width and height, score at least ``skip_box_thr``."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (scores >= skip_box_thr)


def _check_model(
    i: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model i's boxes [N, 4] float64, scores [N] float64 and labels [N] int64, checked."""
    try:
        b = np.asarray(boxes, dtype=np.float64)
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise BoxesError(f"model {i}: boxes and scores must be numeric arrays ({e})") from None
    if b.size == 0:
        b = b.reshape(0, 4)  # [] and np.zeros((0,)) are a model with no boxes
    if b.ndim != 2 or b.shape[1] != 4:
        raise BoxesError(f"model {i}: boxes must be [N, 4] (x1, y1, x2, y2), got shape {b.shape}")
    lab = np.asarray(labels).reshape(-1)
    lab = lab.astype(np.int64) if lab.size == 0 else lab  # [] is float64 to numpy
    if len(s) != len(b):
        raise BoxesError(f"model {i}: {len(s)} scores for {len(b)} boxes")
    if len(lab) != len(b):
        raise BoxesError(f"model {i}: {len(lab)} labels for {len(b)} boxes")
    if not np.isfinite(b).all():
        raise BoxesError(f"model {i}: boxes contain NaN or infinity")
    if not np.isfinite(s).all():
        raise BoxesError(f"model {i}: scores contain NaN or infinity")
    lab = _check_labels(lab, f"model {i}: ")
    if (bad := np.flatnonzero((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]))).size:
        j = bad[0]
        raise BoxesError(
            f"model {i}, box {j}: {b[j].tolist()} has x2 < x1 or y2 < y1; boxes must be x_min, y_min, x_max, y_max "
            "(convert xywh with x2 = x + w, y2 = y + h)"
        )
    return b, s, lab


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """Labels as int64; integer-valued floats pass, since detectors often emit them."""
    if labels.dtype == np.bool_ or np.issubdtype(labels.dtype, np.integer):
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.floating):
        raise BoxesError(f"{where}labels must be integer class ids, got {labels.dtype}")
    f = labels.astype(np.float64)
    if not (np.isfinite(f).all() and (f == np.rint(f)).all()):
        raise BoxesError(f"{where}labels must be integer class ids, got non-integer values")
    return f.astype(np.int64)


def _check_weights(weights: Sequence[float] | None, n_models: int) -> list[float] | None:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != n_models:
        raise BoxesError(f"{len(w)} weights for {n_models} models; give one weight per model")
    # Zero is refused too: WBF divides by a cluster's summed weight, so a cluster of
    # zero-weight boxes would come out as NaN. Drop the model instead.
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise BoxesError(f"weights must be positive and finite, got {w.tolist()}; drop a model rather than weigh it 0")
    return w.tolist()


def _check_image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    return check_hw(image_size, "image_size", BoxesError)


def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros((0, 4), dtype=np.float64), np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64)


# ---- PredictionString ----------------------------------------------------------------------

PRESETS: dict[str, str] = {
    # Global Wheat Detection: "conf x y w h" per box, integer pixels
    "global_wheat": "{conf:.4f} {x} {y} {w} {h}",
    # Open Images: "label conf x_min y_min x_max y_max" per box, normalized to [0, 1]
    "open_images": "{label} {conf:.4f} {nx1:.4f} {ny1:.4f} {nx2:.4f} {ny2:.4f}",
    # VinBigData chest X-ray: "class_id conf x_min y_min x_max y_max" per box, pixels of the DICOM
    "vinbigdata": "{index} {conf:.4f} {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}",
}

FIELDS = ("label", "index", "conf", "cx", "cy", "x1", "y1", "x2", "y2", "nx1", "ny1", "nx2", "ny2", "x", "y", "w", "h")


def prediction_string(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    image_size: tuple[int, int],
    template: str,
    classes: Sequence[str] | None = None,
) -> str:
    """Renders one image's boxes as a PredictionString: each box through ``template``,
    joined by single spaces; ``''`` for no boxes.

    Args:
        boxes: ``[M, 4]`` pixel ``x1, y1, x2, y2`` (as :func:`fuse_boxes` returns them).
        scores: ``[M]`` confidences.
        labels: ``[M]`` integer class ids.
        image_size: ``(H, W)``, to normalize.
        template: a ``str.format`` template, or the name of one in :data:`PRESETS`. Fields:
            ``label`` (the class name when ``classes`` is given, else the integer id),
            ``index`` (the class id), ``cx, cy`` (the centre, float pixels: Kuzushiji's),
            ``conf``; ``x1, y1, x2, y2`` (float pixels); ``nx1, ny1, nx2, ny2`` (normalized
            to [0, 1]); ``x, y, w, h`` (integer pixels: the corners rounded to the nearest
            pixel, ``w = round(x2) - round(x1)``, so ``x + w`` is the rounded right edge).
        classes: names for the label ids.

    Raises:
        BoxesError: mismatched lengths, an unknown preset or template field, a template
            that cannot format its field, or a label with no name in ``classes``.
    """
    template = resolve_template(template)
    h, w = _check_image_size(image_size)
    b = np.asarray(boxes, dtype=np.float64)
    b = b.reshape(0, 4) if b.size == 0 else b
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    lab = _check_labels(np.asarray(labels).reshape(-1), "")
    if b.ndim != 2 or b.shape[1] != 4:
        raise BoxesError(f"boxes must be [M, 4] (x1, y1, x2, y2), got shape {b.shape}")
    if not len(s) == len(lab) == len(b):
        raise BoxesError(f"{len(b)} boxes, {len(s)} scores and {len(lab)} labels; they must match")
    if len(b) == 0:
        return ""
    if not (np.isfinite(b).all() and np.isfinite(s).all()):
        raise BoxesError("boxes or scores contain NaN or infinity")
    if classes is not None:
        if (bad := np.flatnonzero((lab < 0) | (lab >= len(classes)))).size:
            raise BoxesError(f"label {lab[bad[0]]} has no name: classes lists {len(classes)} names")
        names = [classes[k] for k in lab.tolist()]
    else:
        names = lab.tolist()
    norm = b / np.array([w, h, w, h], dtype=np.float64)
    ri = np.rint(b).astype(np.int64)
    rows = zip(names, lab.tolist(), s.tolist(), b.tolist(), norm.tolist(), ri.tolist())
    out = []
    for name, index, conf, (x1, y1, x2, y2), (nx1, ny1, nx2, ny2), (rx1, ry1, rx2, ry2) in rows:
        fields = dict(label=name, index=index, conf=conf, x1=x1, y1=y1, x2=x2, y2=y2, nx1=nx1, ny1=ny1, nx2=nx2)
        fields.update(ny2=ny2, x=rx1, y=ry1, w=rx2 - rx1, h=ry2 - ry1, cx=(x1 + x2) / 2, cy=(y1 + y2) / 2)
        try:
            out.append(template.format(**fields))
        except (ValueError, TypeError) as e:
            raise BoxesError(f"PredictionString template '{template}' cannot format a box: {e}") from None
    return " ".join(out)


def resolve_template(template: str) -> str:
    """A preset's template, or the template itself once its field names are checked."""
    if template in PRESETS:
        return PRESETS[template]
    if "{" not in template:
        raise BoxesError(
            f"unknown PredictionString preset '{template}'{did_you_mean(template, PRESETS)}; "
            f"choose one of {', '.join(PRESETS)} or give a template"
        )
    try:
        names = template_fields(template)
    except ValueError as e:
        raise BoxesError(f"PredictionString template '{template}' is malformed: {e}") from None
    for f in names:
        if f not in FIELDS:
            raise BoxesError(
                f"PredictionString template '{template}': unknown field '{{{f}}}'{did_you_mean(f, FIELDS)}; "
                f"fields are {', '.join(FIELDS)}"
            )
    return template
