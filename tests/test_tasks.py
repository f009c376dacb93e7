"""Segmentation and detection end to end: exact equivariance, tiling, compact caches, RLE and
PredictionString submissions, ragged box caches that resume."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
import yaml

from kaggle_tta import blend, build_plan, infer
from kaggle_tta.api import sources_for
from kaggle_tta.cache import CacheEntry
from kaggle_tta.config import PipelineConfig, load_pipeline
from kaggle_tta.config.errors import ConfigError, KaggleTTAError
from kaggle_tta.engine.plan import Plan
from kaggle_tta.engine.stats import RunStats
from kaggle_tta.ops.rle import rle_to_mask
from kaggle_tta.tasks import detection as det
from kaggle_tta.tasks import seg_maps as seg

CLASSES = ["circle", "square", "triangle", "cross"]
H, W = 37, 53  # odd and non-square on purpose


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> Path:
    """Six 37x53 images with masks: noise plus one bright rectangle per colour channel."""
    root = tmp_path_factory.mktemp("odd")
    out, masks = root / "images", root / "masks"
    out.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(3)
    rows = []
    for k in range(6):
        img = rng.integers(0, 120, (H, W, 3), dtype=np.uint8)
        mask = np.zeros((H, W), np.uint8)
        for c in range(3):
            y1, x1 = int(rng.integers(0, H - 12)), int(rng.integers(0, W - 14))
            y2, x2 = y1 + int(rng.integers(4, 12)), x1 + int(rng.integers(4, 14))
            img[y1:y2, x1:x2, c] = 250
            mask[y1:y2, x1:x2] = c + 1
            rows.append((f"im{k}", x1, y1, x2, y2, CLASSES[c]))
        cv2.imwrite(str(out / f"im{k}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(masks / f"im{k}.png"), mask)
    pl.DataFrame(rows, schema=["id", "x1", "y1", "x2", "y2", "label"], orient="row").write_csv(root / "boxes.csv")
    return root


def _write(tmp: Path, cfg: dict, name: str = "p.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _seg_cfg(root: Path, tmp: Path, **member) -> dict:
    m = {"name": "px", "factory": "helpers:per_pixel", "tta": "none"}
    m.update(member)
    return {
        "task": "segmentation",
        "data": {"folder": str(root / "images"), "classes": CLASSES, "masks": {"folder": str(root / "masks")}},
        "runtime": {"device": "cpu", "precision": "fp32", "forward_batch": 5, "batch_size": 4, "workers": 0},
        "cache": {"dir": str(tmp / "cache")},
        "members": [m],
        "submission": {"path": str(tmp / "sub.csv")},
    }


def _infer(pipeline: Path | PipelineConfig) -> tuple[Plan, RunStats]:
    """The plan, with its cache filled, and what filling it computed."""
    plan = build_plan(load_pipeline(pipeline) if isinstance(pipeline, Path) else pipeline)
    return plan, infer(plan, progress=False)


def _maps(path: Path, views: list[str] | None = None) -> np.ndarray:
    plan, _ = _infer(path)
    (src,) = sources_for(plan)
    return seg.member_maps(src, 0, len(plan.testset), views).values


@pytest.mark.parametrize(
    "tiling",
    [None, {"tile": [24, 20], "overlap": 0.3, "weight": "gaussian"}, {"tile": 16, "overlap": 0.5, "weight": "uniform"}],
)
def test_equivariant_model_gives_the_same_map_with_and_without_d4(odd_images, tmp_path, tiling):
    plain = _maps(_write(tmp_path, _seg_cfg(odd_images, tmp_path), "plain.yaml"))
    assert plain.shape == (6, 5, H, W)
    cfg = _seg_cfg(odd_images, tmp_path, tta="d4", tiling=tiling)
    path = _write(tmp_path, cfg, "d4.yaml")
    tta = _maps(path)
    np.testing.assert_allclose(tta, plain, rtol=0, atol=1e-5)
    # each inverted view, not only their mean, is the plain map
    for v in ("hflip", "vflip", "rot90", "transpose"):
        np.testing.assert_allclose(_maps(path, [v]), plain, rtol=0, atol=1e-5)


def test_a_strided_model_is_upsampled_to_its_input_before_inverting(odd_images, tmp_path):
    cfg = _seg_cfg(odd_images, tmp_path, factory="helpers:strided_per_pixel", tta="d4")
    maps = _maps(_write(tmp_path, cfg))
    assert maps.shape == (6, 5, H, W)
    assert np.isfinite(maps).all()


def test_rle_submission_decodes_to_the_blended_masks(odd_images, tmp_path):
    cfg = _seg_cfg(odd_images, tmp_path, tta="flips")
    cfg["segmentation"] = {"size": [32, 48], "min_area": 3}  # resized canvas: masks go back to 37x53
    cfg["submission"]["rle"] = {"order": "row", "one_indexed": False, "empty": "-", "id_template": "{id}:{index}"}
    path = _write(tmp_path, cfg)
    plan, _ = _infer(load_pipeline(path))
    result = blend(plan)
    table = pl.read_csv(result.path, schema_overrides={"EncodedPixels": pl.String})
    assert table.height == 6 * 4 and table["id"][1] == "im0:1"
    (src,) = sources_for(plan)
    maps = seg.member_maps(src, 0, 6).values
    assert maps.shape == (6, 5, 32, 48)
    for i, image_id in enumerate(plan.testset.ids):
        masks = seg.masks_of(
            seg.to_probs(seg.Prediction(maps[i : i + 1], "logits", "softmax"))[0], (H, W), "softmax", 0.5, 3
        )
        for k in range(4):
            rle = table.filter(pl.col("id") == f"{image_id}:{k}")["EncodedPixels"][0] or ""
            decoded = rle_to_mask(rle, (H, W), order="C", one_indexed=False, empty="-")
            np.testing.assert_array_equal(decoded, masks[k])
    assert result.metrics == ["Dice", "IoU"] and 0.0 <= result.rows[0].scores_tta["Dice"] <= 1.0


@pytest.mark.parametrize(
    "dtype,scale,tolerance", [("uint8", 1.0, 0.005), ("float16", 1.0, 0.001), ("uint8", 0.5, 0.12)]
)
def test_compact_caches_score_like_float32(odd_images, tmp_path, dtype, scale, tolerance):
    """uint8 probabilities, float16 logits, and a quarter of the pixels: Dice as with float32
    logits, within the stated tolerance. Half resolution is a real loss on these 4-12 px
    objects (measured: Dice 0.89 against 1.00); it is meant for large maps of large objects."""
    full = _seg_cfg(odd_images, tmp_path, factory="helpers:bright_pixels", tta="flips")
    plan, _ = _infer(load_pipeline(_write(tmp_path, full, "full.yaml")))
    dice_full = blend(plan).rows[0].scores_tta["Dice"]
    assert dice_full > 0.95
    small = _seg_cfg(odd_images, tmp_path, factory="helpers:bright_pixels", tta="flips")
    small["cache"].update(dtype=dtype, scale=scale)
    plan_s, _ = _infer(load_pipeline(_write(tmp_path, small, "small.yaml")))
    dice_small = blend(plan_s).rows[0].scores_tta["Dice"]
    (s_full,), (s_small,) = sources_for(plan), sources_for(plan_s)
    a, b = s_full.entry.read("identity"), s_small.entry.read("identity")
    assert b.dtype == np.dtype(dtype) and b.shape == (6, 5, round(H * scale), round(W * scale))
    assert a.nbytes / b.nbytes == pytest.approx(4 / np.dtype(dtype).itemsize / (b.shape[2] * b.shape[3] / (H * W)))
    assert abs(dice_full - dice_small) <= tolerance


def test_native_size_must_be_uniform(odd_images, tmp_path):
    other = tmp_path / "mixed"
    other.mkdir()
    for p in sorted((odd_images / "images").glob("*.png"))[:5]:
        (other / p.name).write_bytes(p.read_bytes())
    cv2.imwrite(str(other / "zz.png"), np.zeros((40, 40, 3), np.uint8))
    cfg = _seg_cfg(odd_images, tmp_path)
    cfg["data"] = {"folder": str(other), "classes": CLASSES}
    with pytest.raises(KaggleTTAError, match=r"segmentation.size"):
        _infer(load_pipeline(_write(tmp_path, cfg)))


# ---- detection -----------------------------------------------------------------------------


def _det_cfg(root: Path, tmp: Path, tta: str, **extra) -> dict:
    cfg = {
        "task": "detection",
        "data": {"folder": str(root / "images"), "classes": CLASSES[:3], "boxes": {"path": str(root / "boxes.csv")}},
        "runtime": {"device": "cpu", "precision": "fp32", "forward_batch": 7, "batch_size": 4, "workers": 0},
        "cache": {"dir": str(tmp / "cache")},
        "members": [
            {
                "name": "bright",
                "factory": "helpers:bright_boxes",
                "adapter": "boxes",
                "preprocess": {"input_size": [H, W]},
                "tta": tta,
            }
        ],
        "submission": {"path": str(tmp / "sub.csv"), "template": "open_images"},
    }
    cfg.update(extra)
    return cfg


def _boxes(path: Path) -> tuple[list, object]:
    plan, _ = _infer(load_pipeline(path))
    (src,) = sources_for(plan)
    sizes = src.entry.read_sizes()
    return det.member_boxes(src, sizes, plan.cfg.detection), plan


def test_deterministic_detector_gives_the_same_boxes_after_d4_and_wbf(odd_images, tmp_path):
    plain, plan = _boxes(_write(tmp_path, _det_cfg(odd_images, tmp_path, "none"), "plain.yaml"))
    tta, _ = _boxes(_write(tmp_path, _det_cfg(odd_images, tmp_path, "d4"), "d4.yaml"))
    truth = det.load_truth(plan.cfg, plan.testset.ids, CLASSES[:3])
    for (b0, s0, l0), (b1, s1, l1), (bt, lt) in zip(plain, tta, truth):
        order0, order1, order_t = np.argsort(l0), np.argsort(l1), np.argsort(lt)
        np.testing.assert_array_equal(l0[order0], l1[order1])
        np.testing.assert_allclose(b1[order1], b0[order0], atol=1e-3)  # pixels (cached as float32)
        np.testing.assert_allclose(s1[order1], s0[order0], atol=1e-6)
        np.testing.assert_allclose(b0[order0], bt[order_t], atol=1e-3)  # and they are the drawn rectangles
    result = blend(plan)
    assert result.rows[0].scores_tta["mAP@0.5 (VOC all-point)"] == pytest.approx(1.0)
    first = pl.read_csv(result.path)["PredictionString"][0].split()
    assert len(first) == 6 * 3 and first[0] in CLASSES


def test_member_view_fusion_equals_ensemble_boxes_called_directly(odd_images, tmp_path):
    import ensemble_boxes

    cfg = _det_cfg(odd_images, tmp_path, "flips")
    cfg["members"][0]["kwargs"] = {"threshold": 0.3}  # noise passes too: views now disagree
    cfg["detection"] = {"iou_thr": 0.4, "conf_type": "box_and_model_avg"}
    fused, plan = _boxes(_write(tmp_path, cfg))
    (src,) = sources_for(plan)
    for i, (h, w) in enumerate(src.entry.read_sizes().tolist()):
        parts = []
        for v in src.views:
            rows, off = src.entry.read_ragged(v)
            parts.append(np.asarray(rows[off[i] : off[i + 1]], dtype=np.float64))
        b, s, lab = ensemble_boxes.weighted_boxes_fusion(
            [p[:, :4] for p in parts],
            [p[:, 4] for p in parts],
            [p[:, 5] for p in parts],
            iou_thr=0.4,
            conf_type="box_and_model_avg",
        )
        ours = fused[i]
        np.testing.assert_allclose(ours[0], b * [w, h, w, h], atol=1e-6)
        np.testing.assert_allclose(ours[1], s, atol=1e-9)
        np.testing.assert_array_equal(ours[2], lab.astype(np.int64))


def test_ragged_cache_resumes_after_an_uncommitted_write(tmp_path):
    e = CacheEntry(tmp_path, "m", "fp")
    w, start = e.open_ragged("hflip", 4)
    assert start == 0
    rows = [np.full((k, 6), k, np.float32) for k in (2, 0, 3, 1)]
    w.write(0, rows[:2])
    e.record("hflip", 2, 0.1)
    e.commit()
    w.write(2, rows[2:3])  # written, never committed: a kill here must not keep it
    e.close()
    e2 = CacheEntry(tmp_path, "m", "fp")
    w2, start = e2.open_ragged("hflip", 4)
    assert start == 2
    w2.write(2, rows[2:])
    e2.record("hflip", 4, 0.1)
    e2.commit()
    got, off = CacheEntry(tmp_path, "m", "fp").read_ragged("hflip")
    assert off.tolist() == [0, 2, 2, 5, 6]
    np.testing.assert_array_equal(got, np.concatenate(rows))
    assert not list(tmp_path.glob("m/fp/*.partial"))


@pytest.mark.parametrize("ragged", [False, True])
def test_a_kill_after_the_rename_keeps_the_completed_view(tmp_path, monkeypatch, ragged):
    """Killed after a finished view was moved into place but before the manifest said so:
    the next open finds it complete (the manifest already counted all its rows), nothing is
    recomputed, and a damaged or mismatched file would not be taken."""
    e = CacheEntry(tmp_path, "m", "fp")
    rows = [np.full((k, 6), k, np.float32) for k in (2, 0, 3)]
    dense = np.arange(6, dtype=np.float32).reshape(3, 2)
    if ragged:
        w, _ = e.open_ragged("v", 3)
        w.write(0, rows)
    else:
        mm, _ = e.open_for_write("v", (3, 2), "float32")
        mm[:] = dense
    e.record("v", 3, 0.1)
    final = tmp_path / "m" / "fp" / ("v.boxes.npy" if ragged else "v.npy")
    real_save = CacheEntry.save

    def save(self):
        if final.exists():  # the save that follows the move
            raise KeyboardInterrupt
        real_save(self)

    monkeypatch.setattr(CacheEntry, "save", save)
    with pytest.raises(KeyboardInterrupt):
        e.commit()
    monkeypatch.setattr(CacheEntry, "save", real_save)
    e.close()
    assert json.loads((tmp_path / "m" / "fp" / "manifest.json").read_text())["views"]["v"]["status"] == "partial"
    e2 = CacheEntry(tmp_path, "m", "fp")
    assert e2.is_complete("v") and e2.rows_done("v") == 3
    if ragged:
        got, off = e2.read_ragged("v")
        assert off.tolist() == [0, 2, 2, 5]
        np.testing.assert_array_equal(got, np.concatenate(rows))
    else:
        np.testing.assert_array_equal(e2.read("v"), dense)
        np.save(final, dense[:2])  # a file of another shape is not taken as the view
        assert not CacheEntry(tmp_path, "m", "fp").is_complete("v")


def test_torchvision_detector_through_the_adapter(odd_images, tmp_path):
    """A torchvision Faster R-CNN (random weights, built offline) runs under hflip TTA; its
    labels come back 0-based (torchvision's 0 is the background)."""
    torchvision = pytest.importorskip("torchvision")
    torch = pytest.importorskip("torch")
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=4, box_score_thresh=0.0
    )
    torch.save(model.state_dict(), tmp_path / "frcnn.pt")
    cfg = _det_cfg(odd_images, tmp_path, "hflip")
    cfg["members"][0] = {
        "name": "frcnn",
        "factory": "torchvision.models.detection:fasterrcnn_mobilenet_v3_large_320_fpn",
        "kwargs": {"weights": None, "weights_backbone": None, "num_classes": 4, "box_score_thresh": 0.0},
        "checkpoint": str(tmp_path / "frcnn.pt"),
        "preprocess": {"input_size": [H, W], "mean": [0, 0, 0], "std": [1, 1, 1]},
        "tta": "hflip",
    }
    plan, _ = _infer(load_pipeline(_write(tmp_path, cfg)))
    (src,) = sources_for(plan)
    rows, _ = src.entry.read_ragged("hflip")
    assert len(rows) > 0 and set(np.unique(rows[:, 5])) <= {0.0, 1.0, 2.0}
    assert (rows[:, :4] >= 0).all() and (rows[:, :4] <= 1).all()
    assert blend(plan).n_rows == 6


@pytest.mark.parametrize(
    "task,change,message",
    [
        ("segmentation", lambda c: c["members"][0].update(tta="five_crop"), "cannot be inverted on masks"),
        ("segmentation", lambda c: c["members"][0].update(merge="wbf"), "is not a segmentation view merge"),
        ("segmentation", lambda c: c["members"][0].update(preprocess={"input_size": [32, 32]}), "remove input_size"),
        ("segmentation", lambda c: c["submission"].update(format="label"), "is not a segmentation format"),
        ("detection", lambda c: c["members"][0].update(tiling={"tile": 16}), "tiling is for segmentation"),
        ("detection", lambda c: c["members"][0]["preprocess"].update(albumentations={"transform": {}}), "plain resize"),
        (
            "detection",
            lambda c: c.update(blends=[{"name": "b", "inputs": ["bright"], "method": "rank_mean"}]),
            "is not a detection blend",
        ),
        ("detection", lambda c: c["cache"].update(dtype="uint8"), "uint8 stores segmentation"),
        ("detection", lambda c: c["submission"].update(template="kaggle"), "submission.template"),
    ],
)
def test_task_config_errors_name_the_field(odd_images, tmp_path, task, change, message):
    from kaggle_tta.engine.plan import build_plan

    cfg = _seg_cfg(odd_images, tmp_path) if task == "segmentation" else _det_cfg(odd_images, tmp_path, "none")
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        build_plan(load_pipeline(_write(tmp_path, cfg)))


# ---- the shipped examples, on the 24-image demo set ----------------------------------------


@pytest.mark.parametrize(
    "example,metric,floor", [("segmentation", "Dice", 0.6), ("detection", "mAP@0.5 (VOC all-point)", 0.6)]
)
def test_examples_run_with_their_trained_members(demo_images, tmp_path, example, metric, floor):
    """examples/*.yaml with the committed weights: TTA does not hurt and the members are
    trained (a broken inverse would drop the TTA score far below the plain one)."""
    repo = Path(__file__).resolve().parents[1]
    sets = [
        f"data.folder={demo_images}",
        f"cache.dir={tmp_path / 'cache'}",
        f"submission.path={tmp_path / 'sub.csv'}",
        "runtime.workers=0",
        "runtime.precision=fp32",
    ]
    sets.append(
        f"data.masks.folder={demo_images.parent / 'test_masks'}"
        if example == "segmentation"
        else f"data.boxes.path={demo_images / 'boxes.csv'}"
    )
    cfg = load_pipeline(repo / "examples" / f"{example}.yaml", sets)
    plan, _ = _infer(cfg)
    result = blend(plan)
    for row in result.rows:
        assert row.scores_tta[metric] > floor, (row.node, row.scores_tta)
        assert row.scores_tta[metric] >= row.scores_plain[metric] - 0.03, (row.node, row.scores_plain, row.scores_tta)
    assert result.n_rows == (24 * 4 if example == "segmentation" else 24)


# ---- resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_an_interrupted_run_resumes_to_the_same_submission(odd_images, tmp_path, monkeypatch, task):
    """Killed mid-run (after the first loader batch), the rerun computes only what is missing
    and writes the submission a clean run writes."""
    from kaggle_tta.exec.forward import Runner

    def cfg_for(cache: str) -> dict:
        c = (
            _seg_cfg(odd_images, tmp_path, factory="helpers:bright_pixels", tta="flips")
            if task == "segmentation"
            else _det_cfg(odd_images, tmp_path, "flips")
        )
        c["cache"]["dir"] = str(tmp_path / cache)
        c["runtime"]["forward_batch"] = 4  # one loader batch of 4 images = one chunk per view
        return c

    clean, _ = _infer(load_pipeline(_write(tmp_path, cfg_for("clean"), "clean.yaml")))
    expected = pl.read_csv(blend(clean).path).to_dicts()

    original = Runner.__call__
    calls = {"n": 0}

    def flaky(self, x):
        calls["n"] += 1
        if calls["n"] > 3:  # the first batch's three views done, then killed
            raise KeyboardInterrupt
        return original(self, x)

    path = _write(tmp_path, cfg_for("resumed"), "resumed.yaml")
    with monkeypatch.context() as m:
        m.setattr(Runner, "__call__", flaky)
        with pytest.raises(KeyboardInterrupt):
            _infer(load_pipeline(path))
    (entry_dir,) = (tmp_path / "resumed").glob("[!.]*/*")  # the member/fingerprint folder (.digests is a memo)
    assert not list(entry_dir.glob("hflip.npy")) and not list(
        entry_dir.glob("hflip.boxes.npy")
    )  # nothing complete to misread
    plan, stats = _infer(load_pipeline(path))
    assert stats.rows_computed == 2  # images 4 and 5 only
    assert pl.read_csv(blend(plan).path).to_dicts() == expected


def test_adding_a_view_keeps_the_image_sizes_of_a_complete_entry(odd_images, tmp_path, monkeypatch):
    """A run that adds a view and is interrupted must not spoil what was complete: the old
    pipeline still blends without computing anything."""
    from kaggle_tta.exec.forward import Runner

    old = _write(tmp_path, _seg_cfg(odd_images, tmp_path, factory="helpers:bright_pixels"), "old.yaml")
    plan, _ = _infer(load_pipeline(old))
    expected = pl.read_csv(blend(plan).path).to_dicts()
    with monkeypatch.context() as m:
        m.setattr(Runner, "__call__", lambda self, x: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            _infer(
                load_pipeline(
                    _write(
                        tmp_path,
                        _seg_cfg(odd_images, tmp_path, factory="helpers:bright_pixels", tta="flips"),
                        "new.yaml",
                    )
                )
            )
    plan, stats = _infer(load_pipeline(old))
    assert stats.all_cached
    assert pl.read_csv(blend(plan).path).to_dicts() == expected


def test_an_interrupt_inside_the_last_commit_is_completed_on_the_next_run(odd_images, tmp_path, monkeypatch):
    """All rows recorded, then killed while the finished file was being renamed into place:
    the next run completes the view from what is on disk, computing nothing."""
    import os

    path = _write(tmp_path, _seg_cfg(odd_images, tmp_path, factory="helpers:bright_pixels", tta="hflip"))
    real = os.replace  # what moves a finished file into place (Path.replace calls it too)
    hit = {"n": 0}

    def replace(src, dst):
        # a view's file, not the image sizes' (those may complete first: rows computed while
        # the layout is on trial are computed again, the sizes are kept)
        if Path(src).name in ("identity.npy.partial", "hflip.npy.partial") and not hit["n"]:
            hit["n"] += 1
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _infer(load_pipeline(path))
    monkeypatch.setattr(os, "replace", real)
    plan, stats = _infer(load_pipeline(path))
    assert stats.rows_computed == 0
    (src,) = sources_for(plan)
    assert all(src.entry.is_complete(v) for v in ("identity", "hflip")) and src.entry.sizes_complete()
    assert blend(plan).n_rows == 6 * 4


def test_segmentation_members_must_share_an_activation(odd_images, tmp_path):
    from kaggle_tta.engine.plan import build_plan

    cfg = _seg_cfg(odd_images, tmp_path)
    cfg["members"].append(
        {"name": "sig", "factory": "helpers:per_pixel", "kwargs": {"out_channels": 4}, "activation": "sigmoid"}
    )
    cfg["blends"] = [{"name": "b", "inputs": ["px", "sig"]}]
    with pytest.raises(ConfigError, match="share one activation"):
        build_plan(load_pipeline(_write(tmp_path, cfg)))


def test_adapters_drop_background_and_reject_labels_outside_the_classes():
    import torch

    out = [
        {
            "boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 5]]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([0, 2]),
        }
    ]
    ((b, s, lab),) = det.torchvision_adapter(out, (8, 8))
    assert lab.tolist() == [1] and s.tolist() == pytest.approx([0.8]) and b.shape == (1, 4)
    post = det.detection_post("boxes", "members.m.adapter", n_classes=2)
    bad = (torch.zeros(1, 1, 4) + torch.tensor([0.0, 0, 2, 2]), torch.ones(1, 1), torch.tensor([[5]]))
    with pytest.raises(KaggleTTAError, match="label 5"):
        post(bad, torch.zeros(1, 3, 8, 8))
