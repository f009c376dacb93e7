"""The pipeline end to end: run, cache reuse, blend without models, resume, invalidation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from conftest import CLASSES, N_IMAGES, save_random_checkpoint
from kaggle_tta.cli import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _manifests(cache: Path) -> dict[str, dict]:
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text()) for p in cache.glob("*/*/manifest.json")}


def test_run_writes_submission_then_reuses_the_cache(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    path = write(cfg)
    code, out, err = _run(capsys, "run", str(path), "-q")
    assert code == 0, err
    assert "a: 2 view(s) computed" in out and "b: 8 view(s) computed" in out
    sub = pl.read_csv(tmp_path / "submission.csv")
    assert sub.columns == ["id", "label"]
    assert sub.height == N_IMAGES
    assert set(sub["label"]) <= set(CLASSES)
    assert sub["id"].to_list() == sorted(sub["id"].to_list())
    # The report has a row per member and blend, with and without TTA.
    assert "| ens ◀ | blend | 10 |" in out
    npys = sorted((tmp_path / "cache").glob("*/*/*.npy"))
    assert len(npys) == 10 and not list((tmp_path / "cache").glob("*/*/*.partial"))
    mtimes = [p.stat().st_mtime_ns for p in npys]
    for m in _manifests(tmp_path / "cache").values():
        assert all(v["status"] == "complete" and v["rows_done"] == N_IMAGES and v["seconds"] > 0 for v in m["views"].values())
    first = sub
    code, out, _ = _run(capsys, "run", str(path), "-q")
    assert code == 0
    assert "all 10 (member, view) predictions reused — no model was run" in out
    assert [p.stat().st_mtime_ns for p in npys] == mtimes
    assert pl.read_csv(tmp_path / "submission.csv").equals(first)


def test_submission_matches_a_manual_merge_of_the_cached_views(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    cfg["submission"]["format"] = "probs"
    assert _run(capsys, "run", str(write(cfg)), "-q")[0] == 0
    cache = tmp_path / "cache"

    def load(member):
        d = next((cache / member).iterdir())
        return {p.stem: np.load(p) for p in d.glob("*.npy")}

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    a, b = load("a"), load("b")
    assert set(a) == {"identity", "hflip"} and len(b) == 8
    pa = softmax(np.mean([a["identity"], a["hflip"]], axis=0))
    pb = softmax(np.mean(list(b.values()), axis=0))
    expected = (pa + pb) / 2
    sub = pl.read_csv(tmp_path / "submission.csv")
    np.testing.assert_allclose(sub.select(CLASSES).to_numpy(), expected, atol=2e-6)


def test_blend_builds_no_model_and_reads_no_image(pipeline, capsys, tmp_path, monkeypatch):
    write, cfg = pipeline
    path = write(cfg)
    assert _run(capsys, "run", str(path), "-q")[0] == 0
    before = (tmp_path / "submission.csv").read_text()
    (tmp_path / "submission.csv").unlink()

    def forbidden(*a, **k):
        raise AssertionError("blend must not build a model or read an image")

    import cv2
    import timm

    import kaggle_tta.data
    import kaggle_tta.engine
    import kaggle_tta.models

    monkeypatch.setattr(timm, "create_model", forbidden)
    monkeypatch.setattr(kaggle_tta.models, "build_model", forbidden)
    monkeypatch.setattr(kaggle_tta.engine, "run_inference", forbidden)
    monkeypatch.setattr(kaggle_tta.data, "decode_image", forbidden)
    monkeypatch.setattr(cv2, "imdecode", forbidden)
    monkeypatch.setattr(cv2, "imread", forbidden)
    code, out, err = _run(capsys, "blend", str(path))
    assert code == 0, err
    assert (tmp_path / "submission.csv").read_text() == before
    # Re-blending: new weights, a subset of views, another merge rule, a subset of members.
    code, _, err = _run(capsys, "blend", str(path), "--set", "blends.ens.weights=[3, 1]", "--set", "members.b.tta=[identity, hflip, rot90]", "--set", "members.b.merge=geomean")
    assert code == 0, err
    code, _, err = _run(capsys, "blend", str(path), "--set", "blends.ens.inputs=[b]", "--set", "blends.ens.weights=null")
    assert code == 0, err


def test_blend_names_what_is_missing_and_how_to_fill_it(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    path = write(cfg)
    assert _run(capsys, "run", str(path), "-q")[0] == 0
    code, out, err = _run(capsys, "blend", str(path), "--set", "members.a.tta=[identity, vflip, rot90]")
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "a: vflip, rot90" in err and f"kaggle-tta infer {path}" in err


def test_changed_checkpoint_invalidates_its_entries_only(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    ckpt = save_random_checkpoint(tmp_path / "a.safetensors", "test_resnet", 0)
    cfg["members"][0]["checkpoint"] = str(ckpt)
    path = write(cfg)
    assert _run(capsys, "run", str(path), "-q")[0] == 0
    save_random_checkpoint(ckpt, "test_resnet", 123)  # same path, new content
    code, out, _ = _run(capsys, "run", str(path), "-q")
    assert code == 0
    assert "a: 2 view(s) computed" in out
    assert "b: 8 reused from the cache" in out
    # The old entry is still there but stale; `cache ls` says so and `cache prune` removes it.
    code, out, _ = _run(capsys, "cache", "ls", str(path))
    assert out.count("| a |") == 2 and "stale" in out
    code, out, _ = _run(capsys, "cache", "prune", str(path))
    assert "removed 1 stale entry" in out


@pytest.mark.parametrize("change", ["preprocess", "testset", "precision"])
def test_other_inputs_change_the_fingerprint(pipeline, capsys, tmp_path, change, demo_images):
    write, cfg = pipeline
    cfg["members"] = cfg["members"][:1]
    cfg["blends"] = []
    path = write(cfg)
    assert _run(capsys, "run", str(path), "-q")[0] == 0
    if change == "preprocess":
        cfg["members"][0]["preprocess"]["mean"] = [0.4, 0.4, 0.4]
    elif change == "testset":
        import shutil

        copy = tmp_path / "imgs"
        shutil.copytree(demo_images, copy)
        (copy / "img_00003.png").unlink()
        cfg["data"]["folder"] = str(copy)
        cfg["data"]["labels"]["path"] = str(copy / "labels.csv")
    else:
        cfg["runtime"]["precision"] = "bf16"
    code, out, err = _run(capsys, "run", str(write(cfg)), "-q")
    assert code == 0, err
    assert "a: 2 view(s) computed" in out


def _interrupt_after(monkeypatch, calls: int):
    import kaggle_tta.engine as engine

    original = engine._Runner.__call__
    count = {"n": 0}

    def flaky(self, x):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(engine._Runner, "__call__", flaky)


def test_interrupted_run_resumes_and_gives_the_same_submission(pipeline, capsys, tmp_path, monkeypatch):
    write, cfg = pipeline
    full = write(cfg, "full.yaml")
    assert _run(capsys, "run", str(full), "-q")[0] == 0
    expected = pl.read_csv(tmp_path / "submission.csv")
    (tmp_path / "submission.csv").unlink()

    cfg["cache"]["dir"] = str(tmp_path / "cache2")
    path = write(cfg, "resumed.yaml")
    with monkeypatch.context() as m:
        _interrupt_after(m, 5)  # mid-way through the second batch
        code, _, err = _run(capsys, "run", str(path), "-q")
    assert code == 130 and "rerun to resume" in err
    assert not (tmp_path / "submission.csv").exists()
    states = [v for man in _manifests(tmp_path / "cache2").values() for v in man["views"].values()]
    assert states and all(v["status"] == "partial" and 0 < v["rows_done"] < N_IMAGES for v in states)
    assert not list((tmp_path / "cache2").glob("*/*/*.npy"))  # nothing a blend could take as complete
    code, out, _ = _run(capsys, "blend", str(path))
    assert code == 2
    code, out, err = _run(capsys, "run", str(path), "-q")
    assert code == 0, err
    got = pl.read_csv(tmp_path / "submission.csv")
    assert got.equals(expected)
    for member in ("a", "b"):
        d1, d2 = next((tmp_path / "cache" / member).iterdir()), next((tmp_path / "cache2" / member).iterdir())
        for f in d1.glob("*.npy"):
            np.testing.assert_allclose(np.load(d2 / f.name), np.load(f), atol=1e-5)


def test_killed_process_resumes(pipeline, tmp_path):
    """SIGKILL at an arbitrary moment: the next run resumes from the last committed batch."""
    write, cfg = pipeline
    cfg["members"] = cfg["members"][1:]
    cfg["blends"] = []
    cfg["runtime"]["batch_size"] = 4
    cfg["members"][0]["tta"] = [{"product": ["d4", {"scales": [1.0, 1.5, 2.0]}]}]
    path = write(cfg)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "kaggle_tta", "infer", str(path), "-q"], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    rows = 0
    while time.time() < deadline and proc.poll() is None:
        mans = _manifests(tmp_path / "cache")
        rows = min((v["rows_done"] for m in mans.values() for v in m["views"].values()), default=0)
        if rows >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    mans = _manifests(tmp_path / "cache")
    (man,) = mans.values()
    assert all(v["status"] == "partial" for v in man["views"].values())
    done = min(v["rows_done"] for v in man["views"].values())
    assert 0 < done < N_IMAGES
    r = subprocess.run([sys.executable, "-m", "kaggle_tta", "infer", str(path), "-q"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (man,) = _manifests(tmp_path / "cache").values()
    assert all(v["status"] == "complete" for v in man["views"].values())
    # Same numbers as a run that was never killed.
    cfg["cache"]["dir"] = str(tmp_path / "clean")
    r = subprocess.run([sys.executable, "-m", "kaggle_tta", "infer", str(write(cfg, "clean.yaml")), "-q"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d1, d2 = next((tmp_path / "cache" / "b").iterdir()), next((tmp_path / "clean" / "b").iterdir())
    for f in d2.glob("*.npy"):
        np.testing.assert_allclose(np.load(d1 / f.name), np.load(f), atol=1e-5)


def test_reduced_precision_falls_back_to_fp32_on_non_finite_chunks(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    cfg["runtime"]["precision"] = "bf16"
    cfg["members"] = [{"name": "n", "factory": "helpers:nan_model", "preprocess": {"input_size": [3, 56, 56], "crop_pct": 0.875}, "tta": "hflip"}]
    cfg["blends"] = []
    code, out, err = _run(capsys, "run", str(write(cfg)), "-q")
    assert code == 0, err
    # 24 images, 8 per loader batch: one chunk of 16 (both views) per batch, each recomputed
    assert "n: 2 view(s) computed (forward batch 16, channels_last), 3 non-finite chunk(s) recomputed in fp32" in out
    d = next((tmp_path / "cache" / "n").iterdir())
    assert np.isfinite(np.load(d / "identity.npy")).all()
    views = json.loads((d / "manifest.json").read_text())["views"]
    assert {v: views[v]["nonfinite_recomputed"] for v in ("identity", "hflip")} == {"identity": 3, "hflip": 3}


def test_invariant_model_gives_the_same_scores_with_and_without_tta(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    cfg["members"] = [{"name": "inv", "factory": "helpers:invariant_model", "preprocess": {"input_size": [3, 56, 56], "crop_pct": 1.0}, "tta": "d4"}]
    cfg["blends"] = []
    assert _run(capsys, "run", str(write(cfg)), "-q")[0] == 0
    d = next((tmp_path / "cache" / "inv").iterdir())
    ident = np.load(d / "identity.npy")
    for f in d.glob("*.npy"):
        np.testing.assert_allclose(np.load(f), ident, atol=1e-6)


def test_ttach_wrapper_gives_the_same_mean_logits(pipeline, capsys, tmp_path):
    """hflip and d4 mean-of-logits equal ttach's ClassificationTTAWrapper (fp32, 1e-5)."""
    import timm
    import ttach

    from kaggle_tta.config import load_pipeline
    from kaggle_tta.data import decode_image
    from kaggle_tta.models import build_model
    from kaggle_tta.plan import build_plan

    write, cfg = pipeline
    cfg["members"][0]["tta"] = "hflip"
    path = write(cfg)
    assert _run(capsys, "infer", str(path), "-q")[0] == 0
    plan = build_plan(load_pipeline(path))
    for name, transforms in (("a", ttach.aliases.hflip_transform()), ("b", ttach.aliases.d4_transform())):
        m = plan.member(name)
        model = build_model(plan.cfg, m.cfg, len(CLASSES))
        t = m.canvas.build()
        canvases = np.stack([t(image=decode_image(p))["image"] for p in plan.testset.paths])
        x = torch.from_numpy(canvases).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(m.preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(m.preprocess.std).view(1, 3, 1, 1)
        top = (x.shape[-2] - 56) // 2
        x = x[..., top : top + 56, top : top + 56]
        with torch.inference_mode():
            ref = ttach.ClassificationTTAWrapper(model, transforms, merge_mode="mean")(x).numpy()
        d = next((tmp_path / "cache" / name).iterdir())
        ours = np.mean([np.load(d / f"{v.name}.npy") for v in m.views], axis=0)
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    del timm


@pytest.mark.parametrize("fmt", ["probs", "topk", "multilabel"])
def test_submission_formats(pipeline, capsys, tmp_path, fmt):
    write, cfg = pipeline
    cfg["submission"].update({"format": fmt, "k": 2, "threshold": 0.3})
    if fmt == "multilabel":
        cfg["multilabel"] = True
        cfg["data"].pop("labels")
    code, _, err = _run(capsys, "run", str(write(cfg)), "-q")
    assert code == 0, err
    sub = pl.read_csv(tmp_path / "submission.csv")
    if fmt == "probs":
        assert sub.columns == ["id", *CLASSES]
        np.testing.assert_allclose(sub.select(CLASSES).to_numpy().sum(1), 1.0, atol=1e-5)
    elif fmt == "topk":
        assert all(len(s.split()) == 2 and set(s.split()) <= set(CLASSES) for s in sub["label"])
    else:
        assert all(set((s or "").split()) <= set(CLASSES) for s in sub["label"])


def test_csv_and_glob_sources_and_image_conversions(pipeline, capsys, tmp_path):
    import cv2

    write, cfg = pipeline
    imgs = tmp_path / "mixed"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (60, 70, 3), dtype=np.uint8)
    cv2.imwrite(str(imgs / "gray.png"), rgb[:, :, 0])
    cv2.imwrite(str(imgs / "rgba.png"), np.dstack([rgb[:, :, ::-1], np.full((60, 70), 128, np.uint8)]))
    cv2.imwrite(str(imgs / "deep.png"), rgb[:, :, ::-1].astype(np.uint16) * 257)
    cv2.imwrite(str(imgs / "plain.jpg"), rgb[:, :, ::-1])
    from kaggle_tta.data import decode_image

    np.testing.assert_array_equal(decode_image(imgs / "gray.png"), np.repeat(rgb[:, :, :1], 3, axis=2))
    np.testing.assert_array_equal(decode_image(imgs / "rgba.png"), rgb)
    np.testing.assert_array_equal(decode_image(imgs / "deep.png"), rgb)
    pl.DataFrame({"image_id": ["gray", "rgba", "deep", "plain"]}).write_csv(tmp_path / "test.csv")
    cfg["data"] = {"csv": {"path": str(tmp_path / "test.csv"), "id_column": "image_id", "path_template": "mixed/{id}.png"}, "classes": CLASSES}
    code, _, err = _run(capsys, "run", str(write(cfg)), "-q")
    assert code == 2 and "plain.png" in err  # the template names a file that does not exist
    pl.DataFrame({"image_id": ["gray", "rgba", "deep", "plain"], "file": ["mixed/gray.png", "mixed/rgba.png", "mixed/deep.png", "mixed/plain.jpg"]}).write_csv(tmp_path / "test.csv")
    cfg["data"]["csv"] = {"path": str(tmp_path / "test.csv"), "id_column": "image_id", "path_column": "file"}
    code, _, err = _run(capsys, "run", str(write(cfg)), "-q")
    assert code == 0, err
    assert pl.read_csv(tmp_path / "submission.csv")["id"].to_list() == ["gray", "rgba", "deep", "plain"]
    cfg["data"] = {"glob": str(imgs / "*.png"), "classes": CLASSES}
    code, _, err = _run(capsys, "run", str(write(cfg)), "-q")
    assert code == 0, err
    assert pl.read_csv(tmp_path / "submission.csv")["id"].to_list() == ["deep", "gray", "rgba"]


def test_loader_workers_and_auto_forward_batch(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    cfg["runtime"].update({"workers": 2, "forward_batch": "auto"})
    code, out, err = _run(capsys, "run", str(write(cfg)), "-q")
    assert code == 0, err
    assert "forward batch" in out


def test_albumentations_preprocessing_in_its_serialized_form(pipeline, capsys, tmp_path):
    """A.to_dict pipelines replace resize + crop; the same ops give the same numbers."""
    import albumentations as A

    write, cfg = pipeline
    cfg["members"] = cfg["members"][:1]
    cfg["blends"] = []
    cfg["members"][0]["preprocess"] = {"input_size": [3, 56, 56], "crop_pct": 0.875, "interpolation": "bilinear"}
    assert _run(capsys, "infer", str(write(cfg)), "-q")[0] == 0
    alb = A.to_dict(A.Compose([A.SmallestMaxSize(max_size=64, interpolation=1), A.CenterCrop(64, 64)]))
    (tmp_path / "pre.json").write_text(json.dumps(alb))
    cfg["members"][0]["preprocess"] = {"input_size": [3, 56, 56], "albumentations": str(tmp_path / "pre.json")}
    cfg["cache"]["dir"] = str(tmp_path / "cache_alb")
    code, _, err = _run(capsys, "infer", str(write(cfg)), "-q")
    assert code == 0, err
    d1, d2 = next((tmp_path / "cache" / "a").iterdir()), next((tmp_path / "cache_alb" / "a").iterdir())
    for f in d1.glob("*.npy"):
        np.testing.assert_allclose(np.load(d2 / f.name), np.load(f), atol=1e-6)
    # A pipeline that normalizes on the CPU is refused with the fix.
    alb = A.to_dict(A.Compose([A.Resize(64, 64), A.Normalize()]))
    cfg["members"][0]["preprocess"]["albumentations"] = alb
    cfg["cache"]["dir"] = str(tmp_path / "cache_bad")
    code, _, err = _run(capsys, "infer", str(write(cfg)), "-q")
    assert code == 2 and "must return uint8 HWC images" in err


@pytest.mark.parametrize("fmt,multilabel", [("label", False), ("probs", False), ("topk", False), ("multilabel", True)])
def test_blending_in_blocks_of_rows_changes_nothing(pipeline, tmp_path, monkeypatch, fmt, multilabel):
    """The re-blend streams blocks of rows; blocks of 5 rows (24 images: 5 blocks, the last
    short) give the same submission and the same scores as one block."""
    import kaggle_tta.api as api
    from kaggle_tta.config import load_pipeline
    from kaggle_tta.data import load_labels

    write, cfg = pipeline
    cfg["submission"]["format"] = fmt
    cfg["multilabel"] = multilabel
    cfg["blends"].append({"name": "top", "inputs": ["ens", "a"], "method": "power_mean", "weights": [2, 1]})
    plan, _ = api.infer(load_pipeline(write(cfg)), progress=False)
    labels = None if multilabel else load_labels(plan.cfg, plan.testset.ids, plan.classes)
    one = api.blend_and_write(plan, labels=labels)
    whole = pl.read_csv(one.path)
    monkeypatch.setattr(api, "BLOCK_ROWS", 5)
    blocked = api.blend_and_write(plan, labels=labels)
    assert pl.read_csv(blocked.path).equals(whole)
    assert multilabel or one.rows[-1].scores_tta["accuracy"] > 0
    for a, b in zip(one.rows, blocked.rows):
        assert a.node == b.node
        assert a.scores_tta == pytest.approx(b.scores_tta) and a.scores_plain == pytest.approx(b.scores_plain)
