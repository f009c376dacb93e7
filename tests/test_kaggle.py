"""Kaggle as it really is: precision on a T4, and the competition's sample_submission.csv."""

from __future__ import annotations

import random

import polars as pl
import pytest
import torch

from kaggle_tta import build_plan, load_pipeline, run
from kaggle_tta.config.errors import ConfigError
from kaggle_tta.engine.device import resolve_precision


@pytest.mark.parametrize(
    "capability,expected",
    [((7, 5), "fp16"), ((6, 0), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16")],
)
def test_auto_precision_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    """torch says bf16 is supported on a T4 (through emulation, slower than fp32): auto must
    still pick fp16 below compute capability 8.0."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"


def _sample(tmp_path, ids, header=("image_id", "label"), name="sample_submission.csv"):
    path = tmp_path / name
    pl.DataFrame({header[0]: ids, **{h: ["x"] * len(ids) for h in header[1:]}}).write_csv(path)
    return path


def test_the_submission_takes_the_samples_header_ids_and_order(pipeline, demo_images, tmp_path):
    write, cfg = pipeline
    ids = sorted(p.name for p in demo_images.glob("*.png"))  # with their suffix, as competitions write them
    random.Random(0).shuffle(ids)
    cfg["submission"]["sample"] = str(_sample(tmp_path, ids, ("image_id", "target")))
    plain = run(
        write(dict(cfg, submission={k: v for k, v in cfg["submission"].items() if k != "sample"}), "plain.yaml"),
        progress=False,
    ).blend.table
    result = run(write(cfg), progress=False)
    out = pl.read_csv(result.blend.path)
    assert out.columns == ["image_id", "target"]
    assert out["image_id"].to_list() == ids
    by_id = dict(zip(plain["id"].to_list(), plain["label"].to_list()))
    assert out["target"].to_list() == [by_id[i.removesuffix(".png")] for i in ids]


def test_a_sample_id_missing_from_the_test_set_fails_before_the_first_forward(
    pipeline, demo_images, tmp_path, monkeypatch
):
    import kaggle_tta.io.models as engine  # every model is built through it

    write, cfg = pipeline
    ids = sorted(p.stem for p in demo_images.glob("*.png"))
    cfg["submission"]["sample"] = str(_sample(tmp_path, ids[:-1] + ["img_99999"]))
    monkeypatch.setattr(engine, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(
        ConfigError,
        match=r"submission\.sample .*1 of 24 sample ids match no test image \('img_99999'\); 1 of 24 rows to write are not in the sample",
    ):
        build_plan(load_pipeline(write(cfg)))


def test_a_sample_of_another_width_fails_before_the_first_forward(pipeline, demo_images, tmp_path):
    write, cfg = pipeline
    ids = sorted(p.stem for p in demo_images.glob("*.png"))
    cfg["submission"]["sample"] = str(_sample(tmp_path, ids, ("id", "a", "b")))
    with pytest.raises(ConfigError, match=r"the sample has 3 columns"):
        build_plan(load_pipeline(write(cfg)))


def test_a_segmentation_sample_of_image_class_rows(demo_images, tmp_path):
    """A per-(image, class) RLE sample: rows in its order, ids as the sample writes them."""
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((repo / "examples" / "segmentation.yaml").read_text())
    cfg["data"]["folder"] = str(demo_images)
    cfg["data"]["masks"]["folder"] = str(demo_images.parent / "test_masks")
    for m in cfg["members"]:
        m["checkpoint"] = str((repo / "examples" / m["checkpoint"]).resolve())
    cfg["members"] = cfg["members"][:1]
    cfg["blends"] = []
    cfg["submission"].pop("source", None)
    cfg["runtime"] = {"precision": "fp32", "workers": 0, "device": "cpu"}
    cfg["cache"] = {"dir": str(tmp_path / "cache")}
    cfg["submission"]["path"] = str(tmp_path / "sub.csv")
    plan = build_plan(load_pipeline(cfg))
    rows = [rid for rid, _ in plan.task.row_ids(plan)]
    random.Random(1).shuffle(rows)
    cfg["submission"]["sample"] = str(_sample(tmp_path, rows, ("ImageId_ClassId", "EncodedPixels")))
    out = pl.read_csv(run(cfg, progress=False).blend.path, infer_schema=False)
    assert out.columns == ["ImageId_ClassId", "EncodedPixels"] and out["ImageId_ClassId"].to_list() == rows


def test_the_coco_map_rule_equals_pycocotools_and_voc_is_named():
    """Random detections on random ground truth: detection.map_rule coco gives pycocotools'
    AP@0.5 (its 101-point rule, at most 100 boxes per image and class)."""
    pytest.importorskip("pycocotools")
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from kaggle_tta.tasks.detection import MAP_RULES, mean_ap

    rng = np.random.default_rng(0)
    n_img, n_cls = 12, 3
    truth, pred, images, anns, dets = [], [], [], [], []
    for i in range(n_img):
        g = rng.uniform(0, 80, (5, 2))
        gt = np.concatenate([g, g + rng.uniform(8, 30, (5, 2))], 1)
        gl = rng.integers(0, n_cls, 5)
        jitter = rng.normal(0, 4, (5, 4))
        extra = rng.uniform(0, 100, (3, 2))
        pb = np.concatenate([gt + jitter, np.concatenate([extra, extra + 15], 1)])
        pl_ = np.concatenate([gl, rng.integers(0, n_cls, 3)])
        ps = rng.uniform(0.05, 1.0, 8)
        truth.append((gt, gl))
        pred.append((pb, ps, pl_))
        images.append({"id": i, "width": 128, "height": 128})
        for b, lab in zip(gt, gl):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(lab),
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "area": float((b[2] - b[0]) * (b[3] - b[1])),
                    "iscrowd": 0,
                }
            )
        for b, s, lab in zip(pb, ps, pl_):
            dets.append(
                {
                    "image_id": i,
                    "category_id": int(lab),
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "score": float(s),
                }
            )
    gt_api = COCO()
    gt_api.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in range(n_cls)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt_api.createIndex()
        ev = COCOeval(gt_api, gt_api.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert mean_ap(pred, truth, n_cls, rule="coco") == pytest.approx(ev.stats[1], abs=1e-6)
    assert abs(mean_ap(pred, truth, n_cls, rule="voc") - ev.stats[1]) > 1e-3  # the two rules differ on this data
    assert "VOC" in MAP_RULES["voc"][2] and "COCO" in MAP_RULES["coco"][2]
