"""The pipeline end to end: run, cache reuse, blend without models, resume, invalidation.

Through the public API (kaggle_tta.run / infer / blend), asserting on the RunStats and
BlendResult they return; one test checks what the CLI prints and its exit statuses.
"""

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

from kaggle_tta import blend, build_plan, infer, load_pipeline, run
from kaggle_tta.cli import main
from kaggle_tta.config.errors import CacheError, DataError, KaggleTTAError

D4 = ["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "transverse"]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _manifests(cache: Path) -> dict[str, dict]:
    return {
        f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text()) for p in cache.glob("*/*/manifest.json")
    }


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _cached_views(cache: Path, member: str) -> dict[str, np.ndarray]:
    (d,) = (cache / member).iterdir()
    return {p.stem: np.load(p) for p in d.glob("*.npy")}


def test_run_writes_submission_then_reuses_the_cache(pipeline, tmp_path):
    write, cfg = pipeline
    path = write(cfg)
    result = run(path, progress=False)
    stats, res = result.stats, result.blend
    assert stats.members["a"].views_computed == ["identity", "hflip"] and stats.members["a"].views_cached == []
    assert sorted(stats.members["b"].views_computed) == sorted(D4)
    assert stats.rows_computed == N_IMAGES and stats.images == N_IMAGES and not stats.all_cached
    assert (stats.device, stats.precision) == ("cpu", "fp32")
    sub = pl.read_csv(tmp_path / "submission.csv")
    assert res.path == str(tmp_path / "submission.csv") and res.n_rows == N_IMAGES
    assert sub.equals(res.table)
    assert sub.columns == ["id", "label"]
    assert sub.height == N_IMAGES
    assert set(sub["label"]) <= set(CLASSES)
    assert sub["id"].to_list() == sorted(sub["id"].to_list())
    # The report has a row per member and blend, scored with and without TTA.
    assert res.source == "ens" and res.metrics == ["accuracy"]
    assert [(r.node, r.kind, r.views) for r in res.rows] == [
        ("a", "member", 2),
        ("b", "member", 8),
        ("ens", "blend", 10),
    ]
    for r in res.rows:
        assert set(r.scores_tta) == set(r.scores_plain) == {"accuracy"}
        assert 0.0 <= r.scores_tta["accuracy"] <= 1.0 and r.seconds > 0 and 0 < r.seconds_plain < r.seconds
    assert res.row("ens").seconds == pytest.approx(res.row("a").seconds + res.row("b").seconds)
    npys = sorted((tmp_path / "cache").glob("*/*/*.npy"))
    assert len(npys) == 10 and not list((tmp_path / "cache").glob("*/*/*.partial"))
    mtimes = [p.stat().st_mtime_ns for p in npys]
    for m in _manifests(tmp_path / "cache").values():
        assert all(
            v["status"] == "complete" and v["rows_done"] == N_IMAGES and v["seconds"] > 0 for v in m["views"].values()
        )
    again = run(path, progress=False)
    assert again.stats.all_cached and again.stats.rows_computed == 0
    assert sum(len(m.views_cached) for m in again.stats.members.values()) == 10
    assert [p.stat().st_mtime_ns for p in npys] == mtimes
    assert pl.read_csv(tmp_path / "submission.csv").equals(sub)
    assert [r.scores_tta for r in again.blend.rows] == [r.scores_tta for r in res.rows]


def test_reported_accuracy_equals_one_computed_from_the_submission(pipeline, tmp_path, demo_images):
    write, cfg = pipeline
    res = run(write(cfg), progress=False).blend
    truth = dict(pl.read_csv(demo_images / "labels.csv").iter_rows())
    sub = res.table
    acc = float(np.mean([truth[i] == lab for i, lab in sub.iter_rows()]))
    assert res.row("ens").scores_tta["accuracy"] == pytest.approx(acc)
    # without TTA: each member's identity view alone, blended the same way
    a, b = _cached_views(tmp_path / "cache", "a"), _cached_views(tmp_path / "cache", "b")
    plain = (_softmax(a["identity"]) + _softmax(b["identity"])) / 2
    ids = sub["id"].to_list()
    acc_plain = float(np.mean([truth[i] == CLASSES[k] for i, k in zip(ids, plain.argmax(1))]))
    assert res.row("ens").scores_plain["accuracy"] == pytest.approx(acc_plain)


def test_cli_prints_the_outcome_and_its_exit_status(pipeline, capsys, tmp_path, monkeypatch):
    """The CLI is a product too: one line says what was written, reruns say nothing was
    computed, a user error is one line and exit 2, an interrupt exits 130."""
    write, cfg = pipeline
    path = write(cfg)
    code, out, err = _run(capsys, "run", str(path), "-q")
    assert code == 0, err
    assert out.splitlines()[-1] == f"wrote {tmp_path / 'submission.csv'} ({N_IMAGES} rows) from 'ens'"
    code, out, _ = _run(capsys, "run", str(path), "-q")
    assert code == 0
    assert "all 10 (member, view) predictions reused — no model was run" in out
    code, out, err = _run(capsys, "blend", str(path), "--set", "members.a.tta=[identity, vflip, rot90]")
    assert code == 2 and out == ""
    assert err.startswith("kaggle-tta: error: ") and err.count("\n") == 1 and "Traceback" not in err
    cfg["cache"]["dir"] = str(tmp_path / "cache2")
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        code, _, err = _run(capsys, "run", str(write(cfg, "other.yaml")), "-q")
    assert code == 130 and "rerun to resume" in err


def test_submission_matches_a_manual_merge_of_the_cached_views(pipeline, tmp_path):
    write, cfg = pipeline
    cfg["submission"]["format"] = "probs"
    res = run(write(cfg), progress=False).blend
    cache = tmp_path / "cache"
    a, b = _cached_views(cache, "a"), _cached_views(cache, "b")
    assert set(a) == {"identity", "hflip"} and set(b) == set(D4)
    pa = _softmax(np.mean([a["identity"], a["hflip"]], axis=0))
    pb = _softmax(np.mean(list(b.values()), axis=0))
    expected = (pa + pb) / 2
    sub = pl.read_csv(tmp_path / "submission.csv")
    np.testing.assert_allclose(sub.select(CLASSES).to_numpy(), expected, atol=2e-6)
    np.testing.assert_allclose(res.table.select(CLASSES).to_numpy(), expected, atol=2e-6)


def test_blend_builds_no_model_and_reads_no_image(pipeline, tmp_path, monkeypatch):
    write, cfg = pipeline
    path = write(cfg)
    run(path, progress=False)
    before = (tmp_path / "submission.csv").read_text()
    (tmp_path / "submission.csv").unlink()

    def forbidden(*a, **k):
        raise AssertionError("blend must not build a model or read an image")

    import cv2
    import timm

    import kaggle_tta.engine.stream
    import kaggle_tta.exec.forward
    import kaggle_tta.io.data
    import kaggle_tta.io.models

    monkeypatch.setattr(timm, "create_model", forbidden)
    monkeypatch.setattr(kaggle_tta.io.models, "build_model", forbidden)
    monkeypatch.setattr(kaggle_tta.engine.stream, "run_inference", forbidden)
    monkeypatch.setattr(kaggle_tta.exec.forward.Runner, "__call__", forbidden)
    monkeypatch.setattr(kaggle_tta.io.data, "decode_image", forbidden)
    monkeypatch.setattr(cv2, "imdecode", forbidden)
    monkeypatch.setattr(cv2, "imread", forbidden)
    res = blend(path)
    assert (tmp_path / "submission.csv").read_text() == before
    assert res.n_rows == N_IMAGES and res.source == "ens"
    # Re-blending: new weights, a subset of views, another merge rule, a subset of members.
    res = blend(
        path, ["blends.ens.weights=[3, 1]", "members.b.tta=[identity, hflip, rot90]", "members.b.merge=geomean"]
    )
    assert res.row("b").views == 3 and res.row("ens").views == 5
    res = blend(path, ["blends.ens.inputs=[b]", "blends.ens.weights=null"])
    assert res.row("ens").views == 8
    assert res.row("ens").scores_tta == res.row("b").scores_tta  # a blend of one member is that member


def test_blend_names_what_is_missing_and_how_to_fill_it(pipeline, tmp_path):
    write, cfg = pipeline
    path = write(cfg)
    run(path, progress=False)
    with pytest.raises(CacheError) as exc:
        blend(path, ["members.a.tta=[identity, vflip, rot90]"], fill_hint=str(path))
    msg = str(exc.value)
    assert "\n" not in msg
    assert "a: vflip, rot90" in msg and f"kaggle-tta infer {path}" in msg and "b:" not in msg


def test_changed_checkpoint_invalidates_its_entries_only(pipeline, capsys, tmp_path):
    from kaggle_tta.cache import list_entries

    write, cfg = pipeline
    ckpt = save_random_checkpoint(tmp_path / "a.safetensors", "test_resnet", 0)
    cfg["members"][0]["checkpoint"] = str(ckpt)
    path = write(cfg)
    run(path, progress=False)
    save_random_checkpoint(ckpt, "test_resnet", 123)  # same path, new content
    stats = run(path, progress=False).stats
    assert stats.members["a"].views_computed == ["identity", "hflip"]
    assert stats.members["b"].views_computed == [] and sorted(stats.members["b"].views_cached) == sorted(D4)
    plan = build_plan(load_pipeline(path))
    current = {(m.name, m.fingerprint("fp32")) for m in plan.members}
    entries = {(member, fp) for member, fp, _ in list_entries(plan.cache_root)}
    stale = entries - current
    assert len([e for e in entries if e[0] == "a"]) == 2 and len(stale) == 1 and next(iter(stale))[0] == "a"
    # The old entry is still there but stale; `cache ls` says so and `cache prune` removes it.
    ((_, old_fp),) = stale
    code, out, _ = _run(capsys, "cache", "ls", str(path))
    assert code == 0
    (line,) = [x for x in out.splitlines() if old_fp in x]
    assert "stale" in line
    code, out, _ = _run(capsys, "cache", "prune", str(path))
    assert code == 0
    assert {(member, fp) for member, fp, _ in list_entries(plan.cache_root)} == current


@pytest.mark.parametrize("change", ["preprocess", "testset", "precision"])
def test_other_inputs_change_the_fingerprint(pipeline, tmp_path, change, demo_images):
    write, cfg = pipeline
    cfg["members"] = cfg["members"][:1]
    cfg["blends"] = []
    path = write(cfg)
    assert run(path, progress=False).stats.members["a"].views_computed == ["identity", "hflip"]
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
    stats = run(write(cfg), progress=False).stats
    assert stats.members["a"].views_computed == ["identity", "hflip"] and stats.members["a"].views_cached == []
    assert stats.rows_computed == (N_IMAGES - 1 if change == "testset" else N_IMAGES)


def _interrupt_after(monkeypatch, calls: int):
    from kaggle_tta.exec.forward import Runner

    original = Runner.__call__
    count = {"n": 0}

    def flaky(self, x):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(Runner, "__call__", flaky)


def test_interrupted_run_resumes_and_gives_the_same_submission(pipeline, tmp_path, monkeypatch):
    write, cfg = pipeline
    full = write(cfg, "full.yaml")
    expected = run(full, progress=False).blend.table
    (tmp_path / "submission.csv").unlink()

    cfg["cache"]["dir"] = str(tmp_path / "cache2")
    path = write(cfg, "resumed.yaml")
    with monkeypatch.context() as m:
        _interrupt_after(m, 5)  # mid-way through the second batch
        with pytest.raises(KeyboardInterrupt):
            run(path, progress=False)
    assert not (tmp_path / "submission.csv").exists()
    states = [v for man in _manifests(tmp_path / "cache2").values() for v in man["views"].values()]
    assert states and all(v["status"] == "partial" and 0 < v["rows_done"] < N_IMAGES for v in states)
    assert not list((tmp_path / "cache2").glob("*/*/*.npy"))  # nothing a blend could take as complete
    with pytest.raises(CacheError, match="not in the cache"):
        blend(path)
    stats = run(path, progress=False).stats
    assert 0 < stats.rows_computed < N_IMAGES  # only what the interrupted run had not committed
    assert pl.read_csv(tmp_path / "submission.csv").equals(expected)
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
    proc = subprocess.Popen(
        [sys.executable, "-m", "kaggle_tta", "infer", str(path), "-q"], env=env, stderr=subprocess.PIPE
    )
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
    r = subprocess.run(
        [sys.executable, "-m", "kaggle_tta", "infer", str(path), "-q"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    (man,) = _manifests(tmp_path / "cache").values()
    assert all(v["status"] == "complete" for v in man["views"].values())
    # Same numbers as a run that was never killed (in-process: a third interpreter adds nothing).
    cfg["cache"]["dir"] = str(tmp_path / "clean")
    infer(write(cfg, "clean.yaml"), progress=False)
    d1, d2 = next((tmp_path / "cache" / "b").iterdir()), next((tmp_path / "clean" / "b").iterdir())
    for f in d2.glob("*.npy"):
        np.testing.assert_allclose(np.load(d1 / f.name), np.load(f), atol=1e-5)


def test_reduced_precision_falls_back_to_fp32_on_non_finite_chunks(pipeline, tmp_path):
    write, cfg = pipeline
    cfg["runtime"]["precision"] = "bf16"
    cfg["members"] = [
        {
            "name": "n",
            "factory": "helpers:nan_model",
            "preprocess": {"input_size": [3, 56, 56], "crop_pct": 0.875},
            "tta": "hflip",
        }
    ]
    cfg["blends"] = []
    stats = run(write(cfg), progress=False).stats
    # 24 images, 8 per loader batch: one chunk of 16 (both views) per batch, each recomputed
    n = stats.members["n"]
    assert stats.precision == "bf16"
    assert n.views_computed == ["identity", "hflip"]
    assert (n.forward_batch, n.channels_last, n.nonfinite_recomputed) == (16, True, 3)
    d = next((tmp_path / "cache" / "n").iterdir())
    assert np.isfinite(np.load(d / "identity.npy")).all()
    views = json.loads((d / "manifest.json").read_text())["views"]
    assert {v: views[v]["nonfinite_recomputed"] for v in ("identity", "hflip")} == {"identity": 3, "hflip": 3}


def test_invariant_model_gives_the_same_scores_with_and_without_tta(pipeline, tmp_path):
    write, cfg = pipeline
    cfg["members"] = [
        {
            "name": "inv",
            "factory": "helpers:invariant_model",
            "preprocess": {"input_size": [3, 56, 56], "crop_pct": 1.0},
            "tta": "d4",
        }
    ]
    cfg["blends"] = []
    res = run(write(cfg), progress=False).blend
    d = next((tmp_path / "cache" / "inv").iterdir())
    ident = np.load(d / "identity.npy")
    for f in d.glob("*.npy"):
        np.testing.assert_allclose(np.load(f), ident, atol=1e-6)
    assert res.row("inv").scores_tta == res.row("inv").scores_plain


def test_ttach_wrapper_gives_the_same_mean_logits(pipeline, tmp_path):
    """hflip and d4 mean-of-logits equal ttach's ClassificationTTAWrapper (fp32, 1e-5)."""
    import ttach

    from kaggle_tta.io.data import decode_image
    from kaggle_tta.io.models import build_model

    write, cfg = pipeline
    cfg["members"][0]["tta"] = "hflip"
    plan = build_plan(load_pipeline(write(cfg)))
    assert not infer(plan, progress=False).all_cached
    for name, transforms in (("a", ttach.aliases.hflip_transform()), ("b", ttach.aliases.d4_transform())):
        m = plan.member(name)
        model = build_model(plan.cfg, m.cfg, len(CLASSES))
        make = m.canvas.build()  # the member's own canvas, as the loader makes it
        canvases = np.stack([make(decode_image(p)) for p in plan.testset.paths])
        if m.canvas.stacked:  # [N, P, h, w, 3]: the loader cuts the crops the views start from
            canvases = canvases[:, m.canvas.positions.index("center")]
        x = torch.from_numpy(canvases).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(m.preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(m.preprocess.std).view(1, 3, 1, 1)
        top = (x.shape[-2] - 56) // 2
        x = x[..., top : top + 56, top : top + 56]
        with torch.inference_mode():
            ref = ttach.ClassificationTTAWrapper(model, transforms, merge_mode="mean")(x).numpy()
        d = next((tmp_path / "cache" / name).iterdir())
        ours = np.mean([np.load(d / f"{v.name}.npy") for v in m.views], axis=0)
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["probs", "topk", "multilabel"])
def test_submission_formats(pipeline, tmp_path, fmt):
    write, cfg = pipeline
    cfg["submission"].update({"format": fmt, "k": 2, "threshold": 0.3})
    if fmt == "multilabel":
        cfg["multilabel"] = True
        cfg["data"].pop("labels")
        # a member whose sigmoid probabilities spread around the threshold (the random timm
        # members give ~0.5 for every class: every row would hold all four, or none)
        cfg["members"][1] = {
            "name": "b",
            "factory": "helpers:invariant_model",
            "preprocess": {"input_size": [3, 56, 56], "crop_pct": 1.0},
            "tta": "d4",
        }
        cfg["submission"]["threshold"] = 0.5
    res = run(write(cfg), progress=False).blend
    sub = pl.read_csv(tmp_path / "submission.csv")
    assert sub.height == N_IMAGES
    if fmt == "probs":
        assert sub.columns == ["id", *CLASSES]
        np.testing.assert_allclose(sub.select(CLASSES).to_numpy().sum(1), 1.0, atol=1e-5)
    elif fmt == "topk":
        assert all(len(s.split()) == 2 and set(s.split()) <= set(CLASSES) for s in sub["label"])
    else:
        # The decision made independently: each member's mean logits -> sigmoid, the blend's
        # equal-weight mean of probabilities, every class at or above the threshold, in class order.
        a, b = _cached_views(tmp_path / "cache", "a"), _cached_views(tmp_path / "cache", "b")
        pa = _sigmoid(np.mean(list(a.values()), axis=0, dtype=np.float64))
        pb = _sigmoid(np.mean(list(b.values()), axis=0, dtype=np.float64))
        ens = (pa + pb) / 2
        assert np.abs(ens - 0.5).min() > 1e-5  # no decision rests on float32 rounding
        hit = ens >= 0.5
        expected = [" ".join(c for c, on in zip(CLASSES, row) if on) for row in hit]
        got = [s or "" for s in sub["label"]]
        assert got == expected
        assert res.table["label"].to_list() == expected
        # a real decision: most rows name a class, and rows differ (not all full, not all empty)
        assert sum(bool(s) for s in got) >= N_IMAGES // 2
        assert 0 < hit.sum() < hit.size and len(set(got)) >= 3
        assert res.metrics == []  # no ground truth given


def test_csv_and_glob_sources_and_image_conversions(pipeline, tmp_path):
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
    from kaggle_tta.io.data import decode_image

    np.testing.assert_array_equal(decode_image(imgs / "gray.png"), np.repeat(rgb[:, :, :1], 3, axis=2))
    np.testing.assert_array_equal(decode_image(imgs / "rgba.png"), rgb)
    np.testing.assert_array_equal(decode_image(imgs / "deep.png"), rgb)
    pl.DataFrame({"image_id": ["gray", "rgba", "deep", "plain"]}).write_csv(tmp_path / "test.csv")
    cfg["data"] = {
        "csv": {"path": str(tmp_path / "test.csv"), "id_column": "image_id", "path_template": "mixed/{id}.png"},
        "classes": CLASSES,
    }
    with pytest.raises(DataError, match="plain.png"):  # the template names a file that does not exist
        run(write(cfg), progress=False)
    pl.DataFrame(
        {
            "image_id": ["gray", "rgba", "deep", "plain"],
            "file": ["mixed/gray.png", "mixed/rgba.png", "mixed/deep.png", "mixed/plain.jpg"],
        }
    ).write_csv(tmp_path / "test.csv")
    cfg["data"]["csv"] = {"path": str(tmp_path / "test.csv"), "id_column": "image_id", "path_column": "file"}
    res = run(write(cfg), progress=False).blend
    assert res.table["id"].to_list() == ["gray", "rgba", "deep", "plain"]
    assert pl.read_csv(tmp_path / "submission.csv")["id"].to_list() == ["gray", "rgba", "deep", "plain"]
    cfg["data"] = {"glob": str(imgs / "*.png"), "classes": CLASSES}
    res = run(write(cfg), progress=False).blend
    assert (
        pl.read_csv(tmp_path / "submission.csv")["id"].to_list()
        == ["deep", "gray", "rgba"]
        == res.table["id"].to_list()
    )


def test_loader_workers_and_auto_forward_batch(pipeline, tmp_path, trials_always):
    from kaggle_tta.exec.chunks import ChunkSizer

    write, cfg = pipeline
    fixed = run(write(cfg, "fixed.yaml"), progress=False).stats
    cfg["runtime"].update({"workers": 2, "forward_batch": "auto"})
    cfg["cache"]["dir"] = str(tmp_path / "cache_auto")
    stats = run(write(cfg), progress=False).stats
    assert fixed.forward_batch == "16"
    sizes = [m.forward_batch for m in stats.members.values()]
    assert all(s in ChunkSizer.CANDIDATES for s in sizes)
    assert stats.forward_batch in {str(sizes[0]), "/".join(map(str, sizes))}
    # decode workers and another chunk size change no number
    for member in ("a", "b"):
        ref, got = _cached_views(tmp_path / "cache", member), _cached_views(tmp_path / "cache_auto", member)
        assert set(got) == set(ref)
        for v in ref:
            np.testing.assert_allclose(got[v], ref[v], atol=1e-5, err_msg=f"{member}/{v}")


def test_albumentations_preprocessing_in_its_serialized_form(pipeline, tmp_path):
    """A.to_dict pipelines replace resize + crop; the same ops give the same numbers."""
    import albumentations as A

    write, cfg = pipeline
    cfg["members"] = cfg["members"][:1]
    cfg["blends"] = []
    cfg["members"][0]["preprocess"] = {"input_size": [3, 56, 56], "crop_pct": 0.875, "interpolation": "bilinear"}
    infer(write(cfg), progress=False)
    alb = A.to_dict(A.Compose([A.SmallestMaxSize(max_size=64, interpolation=1), A.CenterCrop(64, 64)]))
    (tmp_path / "pre.json").write_text(json.dumps(alb))
    cfg["members"][0]["preprocess"] = {"input_size": [3, 56, 56], "albumentations": str(tmp_path / "pre.json")}
    cfg["cache"]["dir"] = str(tmp_path / "cache_alb")
    stats = infer(write(cfg), progress=False)
    assert stats.members["a"].views_computed == ["identity", "hflip"]
    d1, d2 = next((tmp_path / "cache" / "a").iterdir()), next((tmp_path / "cache_alb" / "a").iterdir())
    assert d1.name != d2.name  # another preprocessing is another entry, with the same numbers
    for f in d1.glob("*.npy"):
        np.testing.assert_allclose(np.load(d2 / f.name), np.load(f), atol=1e-6)
    # A pipeline that normalizes on the CPU is refused with the fix.
    alb = A.to_dict(A.Compose([A.Resize(64, 64), A.Normalize()]))
    cfg["members"][0]["preprocess"]["albumentations"] = alb
    cfg["cache"]["dir"] = str(tmp_path / "cache_bad")
    with pytest.raises(KaggleTTAError, match="must return uint8 HWC images"):
        infer(write(cfg), progress=False)


@pytest.mark.parametrize("fmt,multilabel", [("label", False), ("probs", False), ("topk", False), ("multilabel", True)])
def test_blending_in_blocks_of_rows_changes_nothing(pipeline, tmp_path, monkeypatch, fmt, multilabel):
    """The re-blend streams blocks of rows; blocks of 5 rows (24 images: 5 blocks, the last
    short) give the same submission and the same scores as one block."""
    from kaggle_tta.tasks import classification

    write, cfg = pipeline
    cfg["submission"]["format"] = fmt
    cfg["multilabel"] = multilabel
    cfg["blends"].append({"name": "top", "inputs": ["ens", "a"], "method": "power_mean", "weights": [2, 1]})
    plan = build_plan(load_pipeline(write(cfg)))
    infer(plan, progress=False)
    one = blend(plan)
    whole = pl.read_csv(one.path)
    monkeypatch.setattr(classification, "BLOCK_ROWS", 5)
    blocked = blend(plan)
    assert pl.read_csv(blocked.path).equals(whole) and blocked.table.equals(one.table)
    metric = "F1" if multilabel else "accuracy"  # labels.csv names one class per image: F1 for multi-label
    assert one.metrics == [metric] and one.rows[-1].scores_tta[metric] > 0
    assert [r.node for r in one.rows] == ["a", "b", "ens", "top"]
    for a, b in zip(one.rows, blocked.rows, strict=True):
        assert a.node == b.node
        assert a.scores_tta == pytest.approx(b.scores_tta) and a.scores_plain == pytest.approx(b.scores_plain)


def test_blend_after_infer_on_a_plan_needs_no_argument(pipeline):
    """The notebook's path: infer(plan) records what it computed; blend(plan) reads it; the
    log line's precision is a word, never None (also when everything was cached)."""
    import kaggle_tta
    from kaggle_tta.api import plan_of

    write, cfg = pipeline
    for m in cfg["members"]:
        m["tta"] = "hflip"
    plan = plan_of(write(cfg))
    stats = kaggle_tta.infer(plan, progress=False)
    assert stats.precision_text in ("fp32", "bf16", "fp16") and plan.computed == stats.computed
    first = kaggle_tta.blend(plan)
    again = kaggle_tta.infer(plan, progress=False)  # all cached now
    assert again.rows_computed == 0 and again.precision_text not in ("", "None")
    assert kaggle_tta.blend(plan).path == first.path


def test_a_kaggle_model_that_is_not_mounted_is_one_line(pipeline, capsys, monkeypatch, tmp_path):
    from kaggle_tta.cli import main

    monkeypatch.setenv("KAGGLE_INPUT_ROOT", str(tmp_path / "no-input"))
    write, cfg = pipeline
    cfg["members"][0].update(kaggle_model="me/effnet/pytorch/fold0/3", checkpoint="model.safetensors")
    assert main(["run", str(write(cfg)), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kaggle_model: me/effnet/pytorch/fold0/3 is not mounted here" in err[0]
    assert "runtime.kaggle_models" in err[0]
    cfg["members"][0]["kaggle_model"] = "me/effnet/pytorch/fold0"  # no version
    assert main(["run", str(write(cfg)), "-q"]) == 2
    assert "owner/model/framework/variation/version" in capsys.readouterr().err


def test_phases_are_announced_from_the_first_second_and_add_up_to_the_wall_time(pipeline, capsys):
    """Each phase on its own stderr line as it starts, in order; the summary's times add up to
    the total (each shown to 0.1 s), which is the command's wall time."""
    import re
    import time

    from kaggle_tta.cli import main

    write, cfg = pipeline
    for m in cfg["members"]:
        m["tta"] = "hflip"
    path = write(cfg)
    t0 = time.perf_counter()
    assert main(["run", str(path)]) == 0
    wall = time.perf_counter() - t0
    out, err = capsys.readouterr()
    said = [line.split("] ", 1)[1] for line in err.splitlines() if line.startswith("kaggle-tta: [")]
    assert said[:3] == ["reading the pipeline", "listing the test set", f"hashing the test set's {24} item(s)"]
    assert said[-1] == "blending and writing the submission"
    assert any(s.startswith("building ") for s in said) and any(s.startswith("streaming ") for s in said)
    line = next(x for x in err.splitlines() if x.startswith("kaggle-tta: time: ")).removeprefix("kaggle-tta: ")
    total = float(re.match(r"time: ([\d.]+)s", line).group(1))
    parts = [float(v) for v in re.findall(r" ([\d.]+)s \(\d+%\)", line)]
    assert abs(sum(parts) - total) <= 0.05 * len(parts) + 0.051 and total <= wall + 0.05
