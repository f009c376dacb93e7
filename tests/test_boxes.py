"""Box fusion against ensemble-boxes called directly; validation; PredictionString formats."""

from __future__ import annotations

import ensemble_boxes
import numpy as np
import pytest

from kaggle_tta.config.errors import KaggleTTAError
from kaggle_tta.ops.boxes import CONF_TYPES, PRESETS, BoxesError, fuse_boxes, prediction_string

H, W = 480, 640  # non-square, so a swapped H/W cannot hide
SCALE = np.array([W, H, W, H], dtype=np.float64)


def make_models(seed: int, n_models: int = 3, n_objects: int = 12, n_classes: int = 3) -> tuple[list, list, list]:
    """Models that see the same objects with jitter, misses and false positives (pixels)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform([0, 0], [W - 60, H - 60], (n_objects, 2))
    wh = rng.uniform(15, 120, (n_objects, 2))
    objects = np.concatenate([xy, xy + wh], axis=1)
    classes = rng.integers(0, n_classes, n_objects)
    boxes, scores, labels = [], [], []
    for _ in range(n_models):
        seen = rng.random(n_objects) < 0.8
        b = objects[seen] + rng.normal(0, 4, (seen.sum(), 4))
        fp_xy = rng.uniform([0, 0], [W - 40, H - 40], (3, 2))
        b = np.concatenate([b, np.concatenate([fp_xy, fp_xy + rng.uniform(10, 40, (3, 2))], axis=1)])
        b = np.clip(b, 0, SCALE)  # inside the image, so that clipping does not enter the comparison
        boxes.append(b)
        scores.append(rng.uniform(0.05, 1.0, len(b)))
        labels.append(np.concatenate([classes[seen], rng.integers(0, n_classes, 3)]))
    return boxes, scores, labels


def oracle(fn, boxes, scores, labels, **kw):
    """ensemble-boxes on normalized copies, in our output order (descending score, stable)."""
    b, s, lab = fn([x / SCALE for x in boxes], [x.copy() for x in scores], [x.copy() for x in labels], **kw)
    order = np.argsort(-np.asarray(s), kind="stable")
    return np.asarray(b)[order], np.asarray(s)[order], np.asarray(lab)[order]


def assert_same(ours, expected):
    b, s, lab = ours
    eb, es, elab = expected
    assert b.dtype == np.float64 and s.dtype == np.float64 and lab.dtype == np.int64
    assert b.shape == (len(es), 4) and len(s) == len(lab) == len(es)
    assert len(es) > 0
    np.testing.assert_allclose(b / SCALE, eb, rtol=0, atol=1e-12)
    np.testing.assert_allclose(s, es, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(lab, elab.astype(np.int64))


# ---- agreement with ensemble-boxes ----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("conf_type", CONF_TYPES)
@pytest.mark.parametrize("weights", [None, [2.0, 1.0, 0.5]])
def test_wbf_matches_ensemble_boxes(seed, conf_type, weights):
    models = make_models(seed)
    kw = dict(weights=weights, iou_thr=0.5, skip_box_thr=0.1, conf_type=conf_type)
    assert_same(fuse_boxes(*models, (H, W), "wbf", **kw), oracle(ensemble_boxes.weighted_boxes_fusion, *models, **kw))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("weights", [None, [2.0, 1.0, 0.5]])
def test_nms_and_soft_nms_match_ensemble_boxes(seed, weights):
    models = make_models(seed)
    assert_same(
        fuse_boxes(*models, (H, W), "nms", weights=weights, iou_thr=0.4),
        oracle(ensemble_boxes.nms, *models, weights=weights, iou_thr=0.4),
    )
    kw = dict(weights=weights, iou_thr=0.4, sigma=0.3, thresh=0.05)
    assert_same(fuse_boxes(*models, (H, W), "soft_nms", **kw), oracle(ensemble_boxes.soft_nms, *models, **kw))


@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 1.0]])
def test_nmw_matches_ensemble_boxes(weights):
    models = make_models(5)
    kw = dict(weights=weights, iou_thr=0.5, skip_box_thr=0.2)
    assert_same(fuse_boxes(*models, (H, W), "nmw", **kw), oracle(ensemble_boxes.non_maximum_weighted, *models, **kw))


def test_some_models_without_boxes_match_ensemble_boxes():
    boxes, scores, labels = make_models(3)
    boxes[1], scores[1], labels[1] = np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    for method, fn in (("wbf", ensemble_boxes.weighted_boxes_fusion), ("nms", ensemble_boxes.nms)):
        assert_same(fuse_boxes(boxes, scores, labels, (H, W), method), oracle(fn, boxes, scores, labels))


# ---- pixels in, pixels out --------------------------------------------------------------------


def test_denormalization_on_a_non_square_image():
    box = np.array([[64.0, 48.0, 320.0, 400.0]])
    b, s, lab = fuse_boxes([box], [np.array([0.9])], [np.array([2])], (H, W))
    np.testing.assert_allclose(b, box, rtol=0, atol=1e-9)
    np.testing.assert_allclose(s, [0.9])
    assert lab.tolist() == [2] and lab.dtype == np.int64

    # two models agreeing on one box: the box stays, the confidence is averaged
    b, s, lab = fuse_boxes([box, box], [np.array([0.8]), np.array([0.6])], [np.array([1.0]), np.array([1.0])], (H, W))
    np.testing.assert_allclose(b, box, rtol=0, atol=1e-4)  # WBF averages in float32
    np.testing.assert_allclose(s, [0.7], atol=1e-6)
    assert lab.tolist() == [1] and lab.dtype == np.int64


def test_boxes_outside_the_image_are_clipped_or_dropped():
    boxes = np.array(
        [
            [-10.0, -5.0, 700.0, 500.0],  # larger than the image: clipped to it
            [600.0, 100.0, 660.0, 140.0],  # reaching past the right edge: clipped
            [650.0, 10.0, 700.0, 30.0],  # wholly outside: dropped
            [50.0, 50.0, 50.0, 90.0],  # zero width: dropped
        ]
    )
    b, s, lab = fuse_boxes([boxes], [np.array([0.9, 0.8, 0.7, 0.6])], [np.array([0, 1, 2, 3])], (H, W))
    np.testing.assert_allclose(b, [[0, 0, W, H], [600, 100, W, 140]], atol=1e-9)
    np.testing.assert_allclose(s, [0.9, 0.8])
    assert lab.tolist() == [0, 1]


def test_inputs_are_not_mutated():
    models = make_models(0)
    before = [[x.copy() for x in part] for part in models]
    for method in ("wbf", "nms", "soft_nms", "nmw"):
        fuse_boxes(*models, (H, W), method, weights=[1.0, 2.0, 3.0])
    for part, copy in zip(models, before):
        for x, y in zip(part, copy):
            np.testing.assert_array_equal(x, y)


# ---- empty inputs -----------------------------------------------------------------------------


def _assert_empty(out):
    b, s, lab = out
    assert b.shape == (0, 4) and b.dtype == np.float64
    assert s.shape == (0,) and s.dtype == np.float64
    assert lab.shape == (0,) and lab.dtype == np.int64


@pytest.mark.parametrize("method", ["wbf", "nms", "soft_nms", "nmw"])
def test_empty_inputs(method):
    none = np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    _assert_empty(fuse_boxes([none[0]] * 2, [none[1]] * 2, [none[2]] * 2, (H, W), method))
    _assert_empty(fuse_boxes([[]], [[]], [[]], (H, W), method))  # plain empty lists
    # every box below skip_box_thr
    boxes, scores, labels = make_models(0, n_models=2)
    _assert_empty(fuse_boxes(boxes, scores, labels, (H, W), method, skip_box_thr=1.5))
    # one model with boxes, one without
    b, s, lab = fuse_boxes([boxes[0], none[0]], [scores[0], none[1]], [labels[0], none[2]], (H, W), method)
    assert len(b) > 0 and lab.dtype == np.int64


# ---- validation -------------------------------------------------------------------------------


def _valid() -> dict:
    boxes, scores, labels = make_models(0, n_models=2)
    return dict(boxes_list=boxes, scores_list=scores, labels_list=labels, image_size=(H, W))


def _set(key, fn):
    def change(kw):
        kw[key] = fn(kw[key]) if callable(fn) else fn

    return change


def _model0(key, fn):
    return _set(key, lambda lst: [fn(lst[0]), *lst[1:]])


def _bad_box(b):
    b = b.copy()
    b[3, 0], b[3, 2] = 200.0, 100.0
    return b


@pytest.mark.parametrize(
    "change,match",
    [
        (_set("scores_list", lambda lst: lst[:1]), r"boxes_list has 2, scores_list 1, labels_list 2"),
        (_set("labels_list", lambda lst: lst * 2), r"boxes_list has 2, scores_list 2, labels_list 4"),
        (_set("boxes_list", []), r"no models to fuse"),
        (_set("weights", [1.0]), r"1 weights for 2 models"),
        (_set("weights", [1.0, 1.0, 1.0]), r"3 weights for 2 models"),
        (_set("weights", [1.0, -0.5]), r"weights must be positive"),
        (_set("weights", [1.0, 0.0]), r"weights must be positive"),
        (_set("weights", [1.0, np.nan]), r"weights must be positive and finite"),
        (_model0("boxes_list", lambda b: b[:, :3]), r"model 0: boxes must be \[N, 4\]"),
        (_model0("boxes_list", lambda b: b.reshape(-1)), r"model 0: boxes must be \[N, 4\]"),
        (_model0("scores_list", lambda s: s[:-1]), r"model 0: \d+ scores for \d+ boxes"),
        (_model0("labels_list", lambda lab: lab[1:]), r"model 0: \d+ labels for \d+ boxes"),
        (
            _model0("boxes_list", lambda b: np.where(np.arange(b.size).reshape(b.shape) == 5, np.nan, b)),
            r"model 0: boxes contain NaN",
        ),
        (
            _model0("scores_list", lambda s: np.where(np.arange(len(s)) == 0, np.inf, s)),
            r"model 0: scores contain NaN or infinity",
        ),
        (_model0("labels_list", lambda lab: lab + 0.5), r"model 0: labels must be integer class ids"),
        (_model0("labels_list", lambda lab: lab.astype(str)), r"model 0: labels must be integer class ids"),
        (_model0("boxes_list", _bad_box), r"model 0, box 3: .* x2 < x1 or y2 < y1"),
        (_set("image_size", (0, 640)), r"image_size must be positive"),
        (_set("image_size", 640), r"image_size must be \(H, W\)"),
        (_set("method", "wbff"), r"unknown box fusion method 'wbff' — did you mean 'wbf'\?"),
        (_set("conf_type", "mean"), r"unknown conf_type 'mean'"),
        (_set("iou_thr", 1.5), r"iou_thr must be in \[0, 1\]"),
    ],
)
def test_validation_raises_boxes_error_never_exit(change, match):
    kw = _valid()
    change(kw)
    try:
        with pytest.raises(BoxesError, match=match) as e:
            fuse_boxes(**kw)
    except SystemExit:  # what ensemble-boxes does on some of these inputs
        pytest.fail("fuse_boxes called exit()")
    assert isinstance(e.value, KaggleTTAError)


def test_ensemble_boxes_itself_exits_on_mismatched_lists():
    """Why the checks exist: the unwrapped library ends the process."""
    kw = _valid()
    normalized = [b / SCALE for b in kw["boxes_list"]]
    with pytest.raises(SystemExit):
        ensemble_boxes.weighted_boxes_fusion(
            normalized, [kw["scores_list"][0][:-1], kw["scores_list"][1]], kw["labels_list"]
        )


def test_float_labels_with_integer_values_pass():
    boxes, scores, labels = make_models(1, n_models=2)
    ours = fuse_boxes(boxes, scores, [x.astype(np.float32) for x in labels], (H, W))
    ref = fuse_boxes(boxes, scores, labels, (H, W))
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)
    assert ours[2].dtype == np.int64


# ---- PredictionString -------------------------------------------------------------------------

BOXES = np.array([[19.2, 26.4, 320.6, 240.2], [96.0, 192.0, 150.7, 264.0]])
SCORES = np.array([0.91234, 0.5])
LABELS = np.array([1, 0])


def test_global_wheat_preset():
    # corners rounded: (19, 26, 321, 240) -> w 302, h 214; (96, 192, 151, 264) -> w 55, h 72
    expected = "0.9123 19 26 302 214 0.5000 96 192 55 72"
    assert prediction_string(BOXES, SCORES, LABELS, (H, W), PRESETS["global_wheat"]) == expected
    assert prediction_string(BOXES, SCORES, LABELS, (H, W), "global_wheat") == expected


def test_open_images_preset():
    # 19.2/640 = 0.03, 26.4/480 = 0.055, 320.6/640 = 0.50094, 240.2/480 = 0.50042
    # 96/640 = 0.15, 192/480 = 0.4, 150.7/640 = 0.23547, 264/480 = 0.55
    numbers = ["0.9123 0.0300 0.0550 0.5009 0.5004", "0.5000 0.1500 0.4000 0.2355 0.5500"]
    got = prediction_string(BOXES, SCORES, LABELS, (H, W), "open_images", classes=["/m/cat", "/m/dog"])
    assert got == f"/m/dog {numbers[0]} /m/cat {numbers[1]}"
    assert prediction_string(BOXES, SCORES, LABELS, (H, W), PRESETS["open_images"]) == f"1 {numbers[0]} 0 {numbers[1]}"


def test_custom_template_pixel_fields():
    got = prediction_string(BOXES[:1], SCORES[:1], LABELS[:1], (H, W), "{label}:{x1:.1f},{y1:.1f},{x2:.1f},{y2:.1f}")
    assert got == "1:19.2,26.4,320.6,240.2"


@pytest.mark.parametrize("template", ["global_wheat", "open_images", "{conf}"])
def test_prediction_string_empty(template):
    assert prediction_string(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64), (H, W), template) == ""
    assert prediction_string([], [], [], (H, W), template, classes=["a"]) == ""


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            dict(template="global_whet"),
            r"unknown PredictionString preset 'global_whet' — did you mean 'global_wheat'\?",
        ),
        (dict(template="{conf} {xmin}"), r"unknown field '\{xmin\}'"),
        (dict(template="{label:.2f}", classes=["a", "b"]), r"cannot format a box"),
        (dict(template="open_images", classes=["only_one"]), r"label 1 has no name: classes lists 1 names"),
        (dict(scores=SCORES[:1]), r"2 boxes, 1 scores and 2 labels"),
        (dict(labels=np.array([0.5, 1.0])), r"labels must be integer class ids"),
    ],
)
def test_prediction_string_errors(kw, match):
    args = dict(boxes=BOXES, scores=SCORES, labels=LABELS, image_size=(H, W), template="global_wheat") | kw
    with pytest.raises(BoxesError, match=match):
        prediction_string(**args)
