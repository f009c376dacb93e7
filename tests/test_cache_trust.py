"""Trust the cache: concurrent runs, changed bytes, damage, full disks, odd ids, prune,
litter and reproducible forward tuning. Every failure is one line; nothing is lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kaggle_tta import blend, build_plan, infer, load_pipeline, run
from kaggle_tta.cli import main

REPO = Path(__file__).resolve().parents[1]


def _write(tmp: Path, cfg: dict, name: str = "p.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _example(name: str, demo_images: Path, tmp: Path, cache: Path) -> Path:
    """examples/<name>.yaml pointed at the 24-image demo set, written to ``tmp``."""
    cfg = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
    cfg["data"]["folder"] = str(demo_images)
    if name == "segmentation":
        cfg["data"]["masks"]["folder"] = str(demo_images.parent / "test_masks")
    else:
        cfg["data"]["boxes"]["path"] = str(demo_images / "boxes.csv")
    for m in cfg["members"]:
        m["checkpoint"] = str((REPO / "examples" / m["checkpoint"]).resolve())
    cfg["runtime"] = {
        **cfg.get("runtime", {}),
        "precision": "fp32",
        "workers": 0,
        "device": "cpu",
        "channels_last": False,
    }  # one layout: see below
    cfg["cache"] = {**cfg.get("cache", {}), "dir": str(cache)}
    cfg["submission"]["path"] = str(tmp / "sub.csv")
    return _write(tmp, cfg, f"{name}.yaml")


def _files(cache: Path) -> dict[str, bytes]:
    """Every prediction file of a cache, by path relative to it."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.glob("*/*/*.npy"))}


# ---- 1. concurrent runs ---------------------------------------------------------------------


@pytest.mark.parametrize("task", ["classification", "detection"])
def test_concurrent_runs_on_one_cache_equal_a_single_run(task, pipeline, demo_images, tmp_path):
    """3 `kaggle-tta run` processes (detection: 2) started together on one empty cache: all
    exit 0 with no traceback, and the entries are byte-identical to a single run's. The locks
    are the cache's, not the task's: 3 processes on every task, or 2 then 3, repeated the same
    waits at 10-20 s a round. Classification writes dense rows (as segmentation does, whose
    maps and image sizes go through the same memory-mapped files), detection ragged ones;
    segmentation's own rows under several writers are checked by the rank tests
    (test_torchrun: two ranks as two nodes)."""
    write, cfg = pipeline
    # one memory layout for every run: `auto` times both on a CPU in fp32, and processes timing
    # against each other may pick the other one (equal predictions, not equal bits)
    cfg["runtime"]["channels_last"] = False

    def pipeline_for(cache: Path, name: str) -> Path:
        if task == "classification":
            c = json.loads(json.dumps(cfg))
            c["cache"]["dir"] = str(cache)
            c["submission"]["path"] = str(tmp_path / f"{name}.csv")
            return write(c, f"{name}.yaml")
        p = _example(task, demo_images, tmp_path / name, cache) if (tmp_path / name).mkdir() is None else None
        return p

    single = pipeline_for(tmp_path / "single", "one")
    run(single, progress=False)
    reference = _files(tmp_path / "single")
    assert reference
    for n in (3,) if task == "classification" else (2,):
        cache = tmp_path / f"shared{n}"
        paths = [pipeline_for(cache, f"c{n}_{k}") for k in range(n)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "kaggle_tta", "run", str(p), "-q"],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for p in paths
        ]
        outs = [p.communicate(timeout=300) for p in procs]
        for proc, (_out, err) in zip(procs, outs):
            assert proc.returncode == 0, err
            assert "Traceback" not in err, err
        assert _files(cache) == reference
        subs = {Path(yaml.safe_load(p.read_text())["submission"]["path"]).read_bytes() for p in paths}
        assert len(subs) == 1


# ---- 2. changed bytes -----------------------------------------------------------------------


def _same_stat_rewrite(path: Path, flip_at: int) -> None:
    """Flips one byte of ``path`` and sets its mtime back: size and mtime are unchanged."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[flip_at] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_a_checkpoint_rewritten_with_the_same_size_and_mtime_is_recomputed(pipeline, checkpoints, tmp_path):
    write, cfg = pipeline
    ckpt = tmp_path / "copy.safetensors"
    shutil.copy(checkpoints["test_resnet"], ckpt)
    cfg["members"] = cfg["members"][:1]
    cfg["members"][0]["checkpoint"] = str(ckpt)
    cfg["blends"] = []
    p = write(cfg)
    assert not infer(p, progress=False).all_cached
    assert infer(p, progress=False).all_cached
    _same_stat_rewrite(ckpt, ckpt.stat().st_size - 3)  # a weight's low byte
    again = infer(p, progress=False)
    assert again.members["a"].views_computed == ["identity", "hflip"]


def test_an_image_rewritten_with_the_same_size_and_mtime_is_recomputed(pipeline, demo_images, tmp_path):
    write, cfg = pipeline
    import cv2

    images = tmp_path / "images"
    images.mkdir()
    for png in sorted(demo_images.glob("*.png")):  # BMP: a pixel byte can change, the file stays valid
        cv2.imwrite(str(images / f"{png.stem}.bmp"), cv2.imread(str(png)))
    shutil.copy(demo_images / "labels.csv", images / "labels.csv")
    cfg["data"]["folder"] = str(images)
    cfg["data"]["labels"]["path"] = str(images / "labels.csv")
    p = write(cfg)
    infer(p, progress=False)
    assert infer(p, progress=False).all_cached
    bmp = sorted(images.glob("*.bmp"))[0]
    _same_stat_rewrite(bmp, bmp.stat().st_size // 2)
    assert not infer(p, progress=False).all_cached


def test_an_edited_factory_is_a_new_entry(pipeline, tmp_path, monkeypatch):
    write, cfg = pipeline
    mod = tmp_path / "mymodels.py"
    src = "import torch\n\ndef make(num_classes=4):\n    torch.manual_seed(0)\n    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, num_classes))\n"
    mod.write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg["members"] = [
        {
            "name": "f",
            "factory": "mymodels:make",
            "preprocess": {"input_size": [3, 56, 56], "crop_pct": 0.875, "mean": [0.5] * 3, "std": [0.5] * 3},
            "tta": "none",
        }
    ]
    cfg["blends"] = []
    p = write(cfg)
    infer(p, progress=False)
    assert infer(p, progress=False).all_cached
    mod.write_text(src.replace("return torch.nn.Sequential(", "return torch.nn.Sequential(torch.nn.Identity(), "))
    assert not infer(p, progress=False).all_cached


# ---- 3. damage --------------------------------------------------------------------------------


def _damage(path: Path, kind: str) -> None:
    if kind == "nan":
        a = np.load(path, mmap_mode="r+")
        a[1, 0] = np.nan
        a.flush()
    elif kind == "bits":  # a flipped exponent bit: finite, plausible, wrong
        a = np.load(path, mmap_mode="r+")
        a[2, 1] = a[2, 1] * 2.0**9
        a.flush()
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "header":
        data = bytearray(path.read_bytes())
        data[:6] = b"XXXXXX"
        path.write_bytes(bytes(data))
    elif kind == "shape":
        np.save(path, np.zeros((3, 4), np.float32))


@pytest.mark.parametrize("kind", ["nan", "bits", "truncated", "header", "shape"])
def test_damage_is_named_by_blend_and_verify_and_recomputed_by_run(pipeline, tmp_path, capsys, kind):
    write, cfg = pipeline
    p = write(cfg)
    first = run(p, progress=False)
    before = Path(first.blend.path).read_bytes()
    entry = next((tmp_path / "cache" / "b").iterdir())
    _damage(entry / "rot90.npy", kind)
    capsys.readouterr()
    assert main(["blend", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rot90" in err[0] and "damaged" in err[0] and "Traceback" not in err[0], err
    assert main(["cache", "verify", str(p)]) == 2
    out, err = capsys.readouterr()
    assert "rot90" in err and "| b |" in out
    again = run(p, progress=False)
    assert again.stats.members["b"].views_computed == ["rot90"]
    assert Path(again.blend.path).read_bytes() == before
    assert main(["cache", "verify", str(p)]) == 0


def test_run_recomputes_a_view_found_damaged_while_blending(pipeline, tmp_path):
    write, cfg = pipeline
    p = write(cfg)
    before = Path(run(p, progress=False).blend.path).read_bytes()
    _damage(next((tmp_path / "cache" / "a").iterdir()) / "hflip.npy", "bits")
    again = run(p, progress=False)
    assert again.stats.recomputed_damaged and again.stats.members["a"].views_computed == ["hflip"]
    assert Path(again.blend.path).read_bytes() == before


# ---- 4. full disk -----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only); skipped where it cannot be mounted."""
    where = tmp_path / "disk"
    where.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_run_that_cannot_fit_stops_before_the_first_forward(pipeline, small_disk, capsys, monkeypatch):
    write, cfg = pipeline
    cfg["cache"]["dir"] = str(small_disk / "cache")
    cfg["data"].pop("labels")
    big = 3_000_000 // (24 * 4 * 8)  # classes enough for 8 float32 views of 24 images to need 3 MB
    cfg["data"]["classes"] = [f"c{k}" for k in range(big)]
    cfg["members"] = [
        {
            "name": "f",
            "factory": "helpers:invariant_model",
            "kwargs": {"num_classes": big},
            "preprocess": {"input_size": [3, 56, 56], "crop_pct": 0.875, "mean": [0.5] * 3, "std": [0.5] * 3},
            "tta": "d4",
        }
    ]
    cfg["blends"] = []
    import kaggle_tta.io.models as engine  # every model is built through it

    monkeypatch.setattr(engine, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    assert main(["run", str(write(cfg)), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cache.dir" in err[0] and "MB" in err[0] and "free" in err[0], err


def test_a_disk_that_fills_mid_run_is_one_line(pipeline, tmp_path, capsys, monkeypatch):
    """ENOSPC where blocks are reserved (the estimate passed, the disk filled meanwhile)."""
    write, cfg = pipeline

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert main(["run", str(write(cfg)), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0] and str(tmp_path / "cache") in err[0], err
    assert not list((tmp_path / "cache").glob("*/*/*.npy"))  # nothing a later run could take as complete


def test_a_full_disk_at_the_manifest_is_one_line_and_the_next_run_completes(pipeline, tmp_path, capsys, monkeypatch):
    import kaggle_tta.cache.files as files

    write, cfg = pipeline
    p = write(cfg)
    real = files.os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    assert main(["run", str(p), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0], err
    monkeypatch.setattr(files.os, "replace", real)
    assert not list((tmp_path / "cache").rglob(".*.tmp"))  # the failed write left no temporary
    assert main(["run", str(p), "-q"]) == 0


# ---- 7. ids that hold line breaks --------------------------------------------------------------


def test_ids_with_line_breaks_round_trip(pipeline, demo_images, tmp_path):
    write, cfg = pipeline
    images = tmp_path / "odd ids"
    images.mkdir()
    names = ["plain", "two\nlines", "para\u2028sep", "next\x85line"]
    for name, src in zip(names, sorted(demo_images.glob("*.png"))):
        shutil.copy(src, images / f"{name}.png")
    cfg["data"] = {"folder": str(images), "classes": cfg["data"]["classes"]}
    cfg["submission"]["format"] = "probs"
    result = run(write(cfg), progress=False)
    assert sorted(result.blend.table["id"].to_list()) == sorted(names)
    assert blend(build_plan(load_pipeline(write(cfg)))).table["id"].to_list() == result.blend.table["id"].to_list()


# ---- 10. prune ------------------------------------------------------------------------------


def test_prune_touches_only_this_pipelines_members_and_says_what_it_keeps(pipeline, tmp_path, capsys):
    write, cfg = pipeline
    a = write(cfg, "a.yaml")
    infer(a, progress=False)
    other = json.loads(json.dumps(cfg))
    other["members"] = [dict(other["members"][1], name="c")]
    other["blends"] = []
    c = write(other, "c.yaml")
    infer(c, progress=False)
    # a third pipeline whose member has a's name but other inputs: another entry under cache/a
    third = json.loads(json.dumps(cfg))
    third["members"][0]["preprocess"]["crop_pct"] = 1.0
    t = write(third, "third.yaml")
    infer(t, progress=False)
    assert len(list((tmp_path / "cache" / "a").iterdir())) == 2
    assert main(["cache", "prune", str(c)]) == 0
    assert len(list((tmp_path / "cache" / "a").iterdir())) == 2 and len(list((tmp_path / "cache" / "b").iterdir())) == 1
    capsys.readouterr()
    assert main(["cache", "prune", str(a), "--dry-run"]) == 0
    assert "kept a/" in capsys.readouterr().out  # third.yaml still uses its entry
    assert len(list((tmp_path / "cache" / "a").iterdir())) == 2
    t.unlink()
    assert main(["cache", "prune", str(a), "--dry-run"]) == 0
    assert "would remove a/" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "a").iterdir())) == 2
    assert main(["cache", "prune", str(a)]) == 0
    assert len(list((tmp_path / "cache" / "a").iterdir())) == 1
    assert infer(a, progress=False).all_cached and infer(c, progress=False).all_cached


# ---- 11. litter -------------------------------------------------------------------------------


def test_the_next_run_sweeps_what_killed_runs_left(pipeline, tmp_path):
    write, cfg = pipeline
    p = write(cfg)
    infer(p, progress=False)
    entry = next((tmp_path / "cache" / "a").iterdir())
    litter = [entry / ".manifest.json.99999999.tmp", entry / "hflip.npy.partial", entry / "hflip.offsets.npy.partial"]
    for f in litter:
        f.write_bytes(b"x")
    cfg["members"][0]["tta"] = "flips"  # one more view: the run opens the entry for writing
    infer(write(cfg), progress=False)
    assert not any(f.exists() for f in litter)


# ---- 12. forward tuning decided once ----------------------------------------------------------


def _layout_reporter(cfg: dict, tmp_path, monkeypatch, **runtime) -> dict:
    """``cfg`` with one member whose output says which memory layout it was given (d4), a
    decisions store of its own and ``runtime``."""
    monkeypatch.setenv("KAGGLE_TTA_TUNING_DIR", str(tmp_path / "tuning"))
    cfg["members"] = [
        {
            "name": "l",
            "factory": "helpers:layout_reporter",
            "preprocess": {"input_size": [3, 56, 56], "crop_pct": 0.875, "mean": [0.5] * 3, "std": [0.5] * 3},
            "tta": "d4",
        }
    ]
    cfg["blends"] = []
    cfg["runtime"].update(runtime)
    return cfg


def _layout_flags(tmp_path) -> set[float]:
    entry = next((tmp_path / "cache" / "l").iterdir())
    return set(
        np.concatenate([np.load(f)[:, 0] for f in sorted(entry.glob("*.npy")) if f.name != "_image_size.npy"]).tolist()
    )


def test_rows_computed_on_trial_are_computed_again_in_the_decided_layout(
    pipeline, tmp_path, monkeypatch, trials_always
):
    """A model whose output says which memory layout it was given: with channels_last timed
    on the first chunks (CPU, fp32), every cached row still comes from the one decided."""
    write, cfg = pipeline
    cfg = _layout_reporter(cfg, tmp_path, monkeypatch, channels_last="auto", forward_batch=8, batch_size=8)
    stats = infer(write(cfg), progress=False)
    assert stats.members["l"].channels_last is not None  # decided
    assert _layout_flags(tmp_path) == {float(stats.members["l"].channels_last)}


def test_a_small_run_times_nothing_and_says_so(pipeline, tmp_path, monkeypatch, capsys):
    """24 images x d4 (192 inputs) cannot repay a layout and chunk-size trial: the run takes
    channels_last and a chunk of 32 untimed, says so on its phase lines, every row comes from
    that one configuration, and nothing is remembered as decided."""
    write, cfg = pipeline
    cfg = _layout_reporter(cfg, tmp_path, monkeypatch, channels_last="auto", forward_batch="auto", batch_size=8)
    assert main(["infer", str(write(cfg))]) == 0
    err = capsys.readouterr().err
    assert "l: 192 inputs to forward, too few to repay a chunk-size and layout trial: chunk 32, channels_last" in err
    assert "timing chunk sizes" not in err
    assert _layout_flags(tmp_path) == {1.0}
    assert not (tmp_path / "tuning" / "decisions.json").exists()


def test_a_trial_computes_again_only_the_views_that_ran_in_the_losing_layout(
    pipeline, tmp_path, monkeypatch, trials_always
):
    """24 images x d4 in one loader batch, the layout timed at chunks of 8 (a warm-up chunk and
    32 inputs per layout: 80 inputs, 10 rows): the stream cuts the batch after 16 rows (whole
    chunks of every view), so each view's 16 inputs are two chunks: views 0-1 ran in the first
    layout, view 2 in both, views 3-4 in the second, views 5-7 in the decided one. Only the three
    views that touched the layout that lost are computed again (48 inputs), not the trial's
    rows (80) or the whole batch (192): the model sees 192 + 48 inputs, and every cached row
    comes from the decided layout."""
    import helpers

    from kaggle_tta.exec.chunks import ChunkSizer

    write, cfg = pipeline
    cfg = _layout_reporter(cfg, tmp_path, monkeypatch, channels_last="auto", forward_batch=8, batch_size=64)
    cfg["members"][0]["factory"] = "helpers:input_counter"
    helpers.InputCounter.seen = 0
    stats = infer(write(cfg), progress=False)
    assert ChunkSizer(8, 8, (False, True)).trial_inputs() == 80 and stats.members["l"].channels_last is not None
    assert helpers.InputCounter.seen == 24 * 8 + 3 * 16, helpers.InputCounter.seen
    assert _layout_flags(tmp_path) == {float(stats.members["l"].channels_last)}


@pytest.mark.parametrize("forward_batch", ["auto", 8])
def test_two_clean_runs_give_byte_identical_caches(pipeline, tmp_path, monkeypatch, trials_always, forward_batch):
    """The first run times chunk sizes and layouts (at a fixed chunk size, keeping the views
    that ran in the decided layout); the second remembers and times nothing: the same bytes."""
    write, cfg = pipeline
    monkeypatch.setenv("KAGGLE_TTA_TUNING_DIR", str(tmp_path / "tuning"))
    cfg["runtime"].update(channels_last="auto", forward_batch=forward_batch)
    caches = []
    for k in range(2):
        cfg["cache"]["dir"] = str(tmp_path / f"cache{k}")
        infer(write(cfg), progress=False)
        caches.append(_files(tmp_path / f"cache{k}"))
    assert caches[0] == caches[1] and len(caches[0]) == 10


def test_a_run_stopped_during_the_trial_counts_none_of_its_trial_rows(pipeline, tmp_path, monkeypatch, trials_always):
    """Rows computed while the layout is on trial are never counted: stopped mid-trial, the
    manifest holds no row of the view, and the resumed run's rows all come from one layout."""
    import kaggle_tta.tasks.classification as cls

    write, cfg = pipeline
    # the trial spans batches
    cfg = _layout_reporter(cfg, tmp_path, monkeypatch, channels_last="auto", forward_batch=8, batch_size=4)
    cfg["members"][0]["tta"] = "none"
    p = write(cfg)
    real, calls = cls.Classification.step, {"n": 0}

    def stop_on_the_third(self, work, batch, plan):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, work, batch, plan)

    monkeypatch.setattr(cls.Classification, "step", stop_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        infer(p, progress=False)
    entry = next((tmp_path / "cache" / "l").iterdir())
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["views"]["identity"]["rows_done"] == 0
    monkeypatch.setattr(cls.Classification, "step", real)
    stats = infer(p, progress=False)
    flags = np.load(entry / "identity.npy")[:, 0]
    assert set(flags.tolist()) == {float(stats.members["l"].channels_last)}
