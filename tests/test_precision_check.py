"""precision: auto checks itself: a member that auto put in bf16 is compared with fp32 on its
first rows and runs (and is cached) in fp32 where it misses the bounds.

Whether auto means bf16 depends on the CPU (native bf16 or not), so every test here makes
auto resolve to bf16 (bf16 autocast runs on any x86 CPU, emulated where not native)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import kaggle_tta
from kaggle_tta import cli
from kaggle_tta.config import load_pipeline
from kaggle_tta.engine import device, pending
from kaggle_tta.engine import plan as plan_mod
from kaggle_tta.engine import precision as precision_mod
from kaggle_tta.engine.plan import build_plan
from kaggle_tta.exec.precision import AGREEMENT_BOUND, REL_L2_BOUND, compare_precision
from kaggle_tta.io import models as model_io

PRE = {"input_size": [3, 56, 56], "crop_pct": 0.875, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture
def auto_is_bf16(monkeypatch):
    """precision auto resolves to bf16 on this CPU, whatever its kind (and is checked however
    small the test set: by default a run must forward CHECK_REPAY times the check's inputs)."""
    monkeypatch.setattr(precision_mod, "CHECK_REPAY", 0)
    orig = device.resolve_precision

    def resolve(name, device):
        return "bf16" if name == "auto" else orig(name, device)

    monkeypatch.setattr(plan_mod, "resolve_precision", resolve)  # plan.find_entry
    monkeypatch.setattr(device, "resolve_precision", resolve)  # api.infer
    monkeypatch.setattr(pending, "resolve_precision", resolve)  # pending.all_cached


def _member(name: str, factory: str) -> dict:
    return {"name": name, "factory": f"helpers:{factory}", "preprocess": dict(PRE), "tta": "hflip"}


def _entries(cache: Path, member: str) -> list[str]:
    """The fingerprints holding a manifest (the folder of a lock alone is no entry)."""
    return (
        sorted(p.name for p in (cache / member).iterdir() if (p / "manifest.json").is_file())
        if (cache / member).is_dir()
        else []
    )


def _forbid(monkeypatch, *names: str) -> None:
    def fail(*a, **k):
        raise AssertionError("called on a run with everything cached")

    where = {"_probe": (precision_mod, "probe_precisions"), "build_model": (model_io, "build_model")}
    for n in names:
        monkeypatch.setattr(*where[n], fail)


def test_auto_bf16_falls_back_to_fp32_for_a_fragile_member_only(pipeline, tmp_path, auto_is_bf16, monkeypatch, capsys):
    write, cfg = pipeline
    cfg["runtime"]["precision"] = "auto"
    cfg["members"] = [_member("frag", "nearly_tied_model"), _member("rob", "well_separated_model")]
    cfg["blends"] = [{"name": "ens", "inputs": ["frag", "rob"], "method": "mean", "weights": [1, 1]}]
    path = write(cfg)
    res = kaggle_tta.run(path, progress=False)
    frag, rob = res.stats.members["frag"], res.stats.members["rob"]

    # the fragile member: fp32, and the note says why (24 images x 2 views were probed)
    assert frag.precision == "fp32"
    assert (
        frag.precision_note.startswith("fp32: bf16 top-1 agreed on ")
        and f"of 24 inputs in view 'identity' (< {100 * AGREEMENT_BOUND:.1f}%)" in frag.precision_note
    )
    assert rob.precision == "bf16" and rob.precision_note.startswith(
        "bf16: checked against fp32 on 48 inputs (top-1 agreed on 100.0%"
    )
    assert res.stats.precision is None  # the members differ: each MemberStats says
    assert frag.views_computed == rob.views_computed == ["identity", "hflip"]

    # the fragile member's rows are in its fp32 entry only; the robust one's in bf16 only
    plan = build_plan(load_pipeline(path))
    cache = tmp_path / "cache"
    assert _entries(cache, "frag") == [plan.member("frag").fingerprint("fp32")]
    assert _entries(cache, "rob") == [plan.member("rob").fingerprint("bf16")]
    man = json.loads((cache / "frag" / plan.member("frag").fingerprint("fp32") / "manifest.json").read_text())
    assert (
        man["precision_checks"]["bf16"]["ran_in"] == "fp32"
        and man["precision_checks"]["bf16"]["note"] == frag.precision_note
    )
    assert all(v["status"] == "complete" for v in man["views"].values())

    # the blend read each from where it is, and wrote the submission
    assert res.blend.n_rows == 24 and Path(res.blend.path).is_file()
    assert {r.node for r in res.blend.rows} == {"frag", "rob", "ens"}

    # ... and the run summary names the member and why
    cli._print_stats(res.stats)
    out = capsys.readouterr().out
    assert "cache: frag: 2 view(s) computed" in out and f"precision {frag.precision_note}" in out
    assert "precision bf16: checked against fp32" in out and "(fp32/bf16, forward batch 16)" in out

    # the fragile member's rows are exactly those of a plain fp32 run
    plain = copy.deepcopy(cfg)
    plain["runtime"]["precision"] = "fp32"
    plain["cache"]["dir"] = str(tmp_path / "plain")
    plain["submission"]["path"] = str(tmp_path / "plain.csv")
    kaggle_tta.run(write(plain, "plain.yaml"), progress=False)
    fp = plan.member("frag").fingerprint("fp32")
    for view in ("identity", "hflip"):
        np.testing.assert_array_equal(
            np.load(cache / "frag" / fp / f"{view}.npy"), np.load(tmp_path / "plain" / "frag" / fp / f"{view}.npy")
        )

    # again: the verdicts are recorded, so nothing is checked, built or computed
    _forbid(monkeypatch, "_probe", "build_model")
    again = kaggle_tta.run(path, progress=False)
    assert again.stats.all_cached
    assert (again.stats.members["frag"].precision, again.stats.members["frag"].precision_note) == (
        "fp32",
        frag.precision_note,
    )
    assert again.stats.members["rob"].precision == "bf16"
    assert again.blend.table.equals(res.blend.table)
    cli._print_stats(again.stats)
    out = capsys.readouterr().out
    assert f"cache: frag: precision {frag.precision_note}" in out and "cache: rob:" not in out
    # a blend in another process (no run before it) finds the fp32 entry too
    assert kaggle_tta.blend(path).table.equals(res.blend.table)


def test_all_members_robust_stay_bf16(pipeline, tmp_path, auto_is_bf16):
    write, cfg = pipeline
    cfg["runtime"]["precision"] = "auto"
    cfg["members"] = [_member("rob", "well_separated_model")]
    cfg["blends"] = []
    path = write(cfg)
    res = kaggle_tta.run(path, progress=False)
    assert res.stats.precision == "bf16" and res.stats.members["rob"].precision == "bf16"
    plan = build_plan(load_pipeline(path))
    assert _entries(tmp_path / "cache", "rob") == [plan.member("rob").fingerprint("bf16")]
    assert res.blend.n_rows == 24


@pytest.mark.parametrize("setting", ["bf16", "auto-fp32"])
def test_an_explicit_precision_is_not_checked_nor_overridden(pipeline, tmp_path, auto_is_bf16, monkeypatch, setting):
    write, cfg = pipeline
    if setting == "auto-fp32":  # auto on a CPU without native bf16: fp32, nothing to check
        monkeypatch.setattr(device, "resolve_precision", lambda name, device: "fp32")
    cfg["runtime"]["precision"] = "auto" if setting == "auto-fp32" else setting
    cfg["members"] = [_member("frag", "nearly_tied_model")]
    cfg["blends"] = []
    path = write(cfg)
    _forbid(monkeypatch, "_probe")
    res = kaggle_tta.run(path, progress=False)
    want = "bf16" if setting == "bf16" else "fp32"
    frag = res.stats.members["frag"]
    assert (res.stats.precision, frag.precision, frag.precision_note) == (want, want, None)
    assert _entries(tmp_path / "cache", "frag") == [build_plan(load_pipeline(path)).member("frag").fingerprint(want)]
    assert res.blend.n_rows == 24 and Path(res.blend.path).is_file()


# ---- segmentation and detection ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(5)
    for k in range(5):
        img = rng.integers(0, 120, (21, 30, 3), dtype=np.uint8)
        img[3:9, 4:15, k % 3] = 250
        cv2.imwrite(str(out / f"s{k}.png"), img)
    return out


def _task_cfg(images: Path, tmp: Path, task: str, members: list[dict]) -> Path:
    cfg = {
        "task": task,
        "data": {"folder": str(images), "classes": ["a", "b", "c"] if task == "detection" else ["a", "b", "c", "d"]},
        "runtime": {"device": "cpu", "precision": "auto", "forward_batch": 4, "batch_size": 2, "workers": 0},
        "cache": {"dir": str(tmp / "cache")},
        "members": members,
        "submission": {"path": str(tmp / "sub.csv")},
    }
    if task == "segmentation" and len(members) > 1:
        cfg["blends"] = [{"name": "ens", "inputs": [m["name"] for m in members], "method": "mean"}]
    p = tmp / f"{task}.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def test_segmentation_is_checked_per_pixel(small_images, tmp_path, auto_is_bf16):
    path = _task_cfg(
        small_images,
        tmp_path,
        "segmentation",
        [
            {"name": "tied", "factory": "helpers:nearly_tied_pixels", "tta": "flips"},
            {"name": "px", "factory": "helpers:well_separated_pixels", "tta": "flips"},
        ],
    )
    res = kaggle_tta.run(path, progress=False)
    tied, px = res.stats.members["tied"], res.stats.members["px"]
    # 5 images of 21 x 30 in 3 views: every image is probed (fewer than 64 / 3 of them)
    assert tied.precision == "fp32" and tied.precision_note.startswith("fp32: bf16 per-pixel argmax agreed on ")
    assert "of 3150 pixels" in tied.precision_note
    assert px.precision == "bf16" and px.precision_note.startswith(
        "bf16: checked against fp32 on 15 inputs (per-pixel argmax agreed on 100.0%"
    )
    plan = build_plan(load_pipeline(path))
    assert _entries(tmp_path / "cache", "tied") == [plan.member("tied").fingerprint("fp32")]
    assert _entries(tmp_path / "cache", "px") == [plan.member("px").fingerprint("bf16")]
    assert res.blend.n_rows > 0 and Path(res.blend.path).is_file()


def test_detection_is_not_checked_and_says_so(small_images, tmp_path, auto_is_bf16, monkeypatch):
    path = _task_cfg(
        small_images,
        tmp_path,
        "detection",
        [
            {
                "name": "bright",
                "factory": "helpers:bright_boxes",
                "adapter": "boxes",
                "preprocess": {"input_size": [21, 30]},
                "tta": "hflip",
            },
        ],
    )
    res = kaggle_tta.run(path, progress=False)
    m = res.stats.members["bright"]
    assert (m.precision, m.precision_note) == (
        "bf16",
        "bf16: not checked against fp32 (its outputs are lists of boxes, with no element-wise error)",
    )
    assert _entries(tmp_path / "cache", "bright") == [
        build_plan(load_pipeline(path)).member("bright").fingerprint("bf16")
    ]
    assert Path(res.blend.path).is_file()
    _forbid(monkeypatch, "build_model")  # cached: the "not checked" answer needs no model either
    assert kaggle_tta.run(path, progress=False).stats.all_cached


# ---- the bounds ----------------------------------------------------------------------------


def test_compare_precision_bounds():
    rng = np.random.default_rng(0)
    ref = {"identity": rng.normal(size=(200, 10)).astype(np.float32) * 5}
    close = {"identity": ref["identity"] * (1 + 1e-3)}
    ok = compare_precision(close, ref, "bf16")
    assert (
        ok.ran_in == "bf16"
        and ok.note == "bf16: checked against fp32 on 200 inputs (top-1 agreed on 100.0%, relative L2 error 1.0e-03)"
    )
    # one flip in 200 rows is 99.5%: still in; two are out (flips between nearly tied logits)
    for flips, ran_in in ((1, "bf16"), (2, "fp32")):
        f = ref["identity"].copy()
        f[:flips, :2] = [20.0, 20.01]
        r = f.copy()
        r[:flips, :2] = [20.01, 20.0]
        got = compare_precision({"identity": r}, {"identity": f}, "bf16")
        assert got.ran_in == ran_in, got.note
    assert got.note == f"fp32: bf16 top-1 agreed on 99.0% of 200 inputs (< {100 * AGREEMENT_BOUND:.1f}%)"
    # large error with the same top-1: the L2 bound decides
    far = compare_precision({"identity": ref["identity"] * 1.05}, ref, "bf16")
    assert far.ran_in == "fp32" and far.note == f"fp32: bf16 relative L2 error 5.0e-02 (> {REL_L2_BOUND:.0e})"
    # non-finite reduced outputs fail, whether the runner saw them or they are in the rows
    nan = ref["identity"].copy()
    nan[3, 2] = np.nan
    assert (
        compare_precision({"identity": nan}, ref, "fp16").note
        == "fp32: fp16 output was non-finite on the first 200 inputs"
    )
    assert compare_precision(close, ref, "bf16", nonfinite_chunks=1).ran_in == "fp32"
    # maps: per-pixel argmax, and the worst view is named
    maps = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    flipped = maps.copy()
    flipped[:, [0, 1]] = flipped[:, [1, 0]]
    got = compare_precision({"identity": maps, "hflip": flipped}, {"identity": maps, "hflip": maps}, "bf16")
    assert (
        got.ran_in == "fp32"
        and got.note.startswith("fp32: bf16 per-pixel argmax agreed on")
        and "of 128 pixels in view 'hflip'" in got.note
    )
    # one channel (a regressor): no top-1 to compare, only the L2 bound
    one = {"identity": rng.normal(size=(50, 1)).astype(np.float32)}
    assert (
        compare_precision({"identity": one["identity"] * (1 + 1e-3)}, one, "bf16").note
        == "bf16: checked against fp32 on 50 inputs (relative L2 error 1.0e-03)"
    )


def test_a_second_run_on_new_images_checks_nothing_it_already_knows(
    pipeline, demo_images, tmp_path, auto_is_bf16, monkeypatch, trials_always
):
    """The precision verdict and the chunk size and layout are the model's on this machine, not
    the test set's: a run on other images, into another cache, neither probes precision nor
    times layouts again, and its fragile member is in fp32 again, its robust one in bf16."""
    import shutil

    write, cfg = pipeline
    cfg["runtime"].update(precision="auto", forward_batch="auto", channels_last="auto")
    cfg["members"] = [_member("frag", "nearly_tied_model"), _member("rob", "well_separated_model")]
    cfg["blends"] = [{"name": "both", "inputs": ["frag", "rob"]}]
    first = kaggle_tta.run(write(cfg), progress=False)
    assert first.stats.members["frag"].precision == "fp32" and first.stats.members["rob"].precision == "bf16"
    other = tmp_path / "other"
    other.mkdir()
    for p in sorted(demo_images.glob("*.png"))[:10]:  # other images: another test set, another entry
        shutil.copy(p, other / p.name)
    cfg["data"] = {"folder": str(other), "classes": cfg["data"]["classes"]}
    cfg["cache"]["dir"] = str(tmp_path / "cache2")
    cfg["submission"]["path"] = str(tmp_path / "other.csv")

    def fail(*a, **k):
        raise AssertionError("a verdict known for this model and machine was checked again")

    monkeypatch.setattr(precision_mod, "probe_precisions", fail)
    second = kaggle_tta.run(write(cfg, "other.yaml"), progress=False)
    assert second.stats.members["frag"].precision == "fp32" and second.stats.members["rob"].precision == "bf16"
    assert second.blend.n_rows == 10


def test_a_run_too_small_to_repay_the_check_runs_fp32_and_says_so(pipeline, tmp_path, auto_is_bf16, monkeypatch):
    """24 images x hflip: the check would forward all 48 inputs twice, so auto runs fp32
    unchecked (CHECK_REPAY), says why, records it in the fp32 entry (a re-blend and a second
    run find everything there) and remembers nothing for the model."""
    monkeypatch.setattr(precision_mod, "CHECK_REPAY", 3)
    monkeypatch.setattr(precision_mod, "probe_precisions", lambda *a, **k: pytest.fail("checked"))
    monkeypatch.setenv("KAGGLE_TTA_TUNING_DIR", str(tmp_path / "tuning"))  # a verdict known for the model wins
    write, cfg = pipeline
    cfg["runtime"]["precision"] = "auto"
    cfg["members"] = [_member("rob", "well_separated_model")]
    cfg["blends"] = []
    path = write(cfg)
    res = kaggle_tta.run(path, progress=False)
    m = res.stats.members["rob"]
    assert m.precision == "fp32" and m.precision_note == (
        "fp32: 48 inputs to forward, too few to repay checking bf16 against fp32 (which forwards 48 inputs twice)"
    )
    plan = build_plan(load_pipeline(path))
    assert _entries(tmp_path / "cache", "rob") == [plan.member("rob").fingerprint("fp32")]
    assert pending.all_cached(plan)
    assert kaggle_tta.blend(path).n_rows == 24
    again = kaggle_tta.run(path, progress=False)
    assert again.stats.all_cached and again.stats.members["rob"].precision == "fp32"
