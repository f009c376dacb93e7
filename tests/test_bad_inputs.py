"""Bad input ("Trust the cache", items 5, 6, 8, 9): one line naming the file or YAML path and
the fix, exit 2, no traceback, as early as it can be known, never a silently wrong result."""

from __future__ import annotations

import math
import os
import shutil
import sys
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import CLASSES

from kaggle_tta.cli import main
from kaggle_tta.config import load_pipeline


def _fails(capsys, *argv: str | Path) -> str:
    """Runs the CLI; asserts exit 2 and exactly one error line without a traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("kaggle-tta: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def _run_fails(capsys, path: Path, *extra: str) -> str:
    return _fails(capsys, "run", path, "-q", *extra)


def _text(cfg: dict, marker: str, replacement: str) -> str:
    """The pipeline's YAML with the scalar ``marker`` replaced by raw YAML text."""
    text = yaml.safe_dump(cfg, sort_keys=False)
    assert marker in text
    return text.replace(marker, replacement)


def _fast(cfg: dict, tmp_path: Path) -> dict:
    """One tiny factory member without TTA: a whole run takes a fraction of a second."""
    cfg["members"] = [
        {"name": "a", "factory": "helpers:invariant_model", "preprocess": {"input_size": [3, 32, 32]}, "tta": "none"}
    ]
    cfg["blends"] = []
    return cfg


# ---- pipeline.yaml as a file -----------------------------------------------------------------


def test_pipeline_that_is_not_utf8(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"# r\xe9sum\xe9 of the run\n" + yaml.safe_dump(cfg).encode())
    err = _run_fails(capsys, path)
    assert str(path) in err and "not UTF-8" in err and "line 1" in err


def test_pipeline_that_cannot_be_read(pipeline, capsys, tmp_path):
    folder = tmp_path / "pipeline.yaml"
    folder.mkdir()
    err = _run_fails(capsys, folder)
    assert str(folder) in err and "is a folder" in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_pipeline_without_read_permission(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    path = write(cfg)
    path.chmod(0)
    try:
        err = _run_fails(capsys, path)
    finally:
        path.chmod(0o644)
    assert str(path) in err and "cannot read" in err


def test_recursive_anchor(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    cfg["members"][0]["kwargs"] = "KWARGS"
    path = tmp_path / "p.yaml"
    path.write_text(_text(cfg, "KWARGS", "&k {x: *k}"))
    err = _run_fails(capsys, path)
    assert str(path) in err and "members[0].kwargs.x" in err and "recursive anchor" in err


def _alias_bomb(levels: int = 8, width: int = 10) -> str:
    """``levels`` anchors, each a list of ``width`` aliases of the one before: width**levels nodes."""
    lines = ["{l0: &l0 [" + ", ".join(["x"] * width) + "],"]
    for i in range(1, levels):
        lines.append(f" l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "],")
    return "\n".join(lines).rstrip(",") + "}"


def test_alias_bomb_is_refused_at_once(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    cfg["members"][0]["kwargs"] = "KWARGS"
    path = tmp_path / "bomb.yaml"
    path.write_text(_text(cfg, "KWARGS", _alias_bomb()))
    assert len(_alias_bomb().encode()) < 1000
    tracemalloc.start()
    try:
        err = _run_fails(capsys, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50e6  # it once took 10.9 GB (and 75 s)
    assert str(path) in err and "YAML aliases expand to more than 100000 nodes" in err and "members[0].kwargs" in err


def test_ordinary_anchors_still_work(pipeline, tmp_path):
    write, cfg = pipeline
    for m in cfg["members"]:
        m["preprocess"] = "PRE"
    text = yaml.safe_dump(cfg, sort_keys=False)
    text = text.replace("preprocess: PRE", "preprocess: &p {input_size: [3, 56, 56], crop_pct: 0.875}", 1).replace(
        "preprocess: PRE", "preprocess: *p"
    )
    path = tmp_path / "anchors.yaml"
    path.write_text(text)
    loaded = load_pipeline(path)
    assert loaded.members[0].preprocess == loaded.members[1].preprocess
    assert loaded.members[1].preprocess.crop_pct == 0.875


def test_duplicate_key_names_its_path_and_line(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    path = tmp_path / "dup.yaml"
    text = yaml.safe_dump(cfg, sort_keys=False)
    assert "  precision: fp32\n" in text
    path.write_text(text.replace("  precision: fp32\n", "  precision: fp32\n  precision: bf16\n"))
    line = text.splitlines().index("  precision: fp32") + 1
    err = _run_fails(capsys, path)
    assert str(path) in err and f"line {line + 1}: runtime.precision is given twice (first on line {line})" in err


def test_override_with_invalid_yaml_is_one_line(pipeline, capsys):
    write, cfg = pipeline
    err = _run_fails(capsys, write(cfg), "--set", "runtime.threads=[1, 2")
    assert "--set runtime.threads=[1, 2: value: not valid YAML" in err


# ---- fields accepted silently, or failing late ------------------------------------------------


def _field_cases():
    def sub(**kw):
        return lambda c: c["submission"].update(kw)

    def section(name, **kw):
        return lambda c: c.setdefault(name, {}).update(kw)

    return [
        (section("runtime", threads=-1), "runtime.threads: must be at least 1, or null"),
        (section("runtime", threads=0), "runtime.threads: must be at least 1, or null"),
        (sub(k=0), "submission.k: must be at least 1"),
        (sub(threshold=math.nan), "submission.threshold: must be in [0, 1], got nan"),
        (sub(threshold=1.5), "submission.threshold: must be in [0, 1]"),
        (section("segmentation", threshold=5), "segmentation.threshold: must be in [0, 1]"),
        (section("segmentation", min_area=-1), "segmentation.min_area: must be 0"),
        (section("detection", max_boxes=-1), "detection.max_boxes: must be at least 1, or null"),
        (section("detection", max_boxes=0), "detection.max_boxes: must be at least 1, or null"),
        (section("detection", iou_thr=1.5), "detection.iou_thr: must be in [0, 1]"),
        (section("detection", iou_thr=math.nan), "detection.iou_thr: must be in [0, 1]"),
        (section("detection", skip_box_thr=-0.1), "detection.skip_box_thr: must be in [0, 1]"),
        (section("detection", thresh=2), "detection.thresh: must be in [0, 1]"),
        (section("detection", sigma=0), "detection.sigma: must be positive"),
        (
            lambda c: c["data"].update(masks={"folder": "m", "template": "{id.png"}),
            "data.masks.template: '{id.png' is not a valid template",
        ),
        (
            sub(rle={"id_template": "{id}_{klass}"}),
            "submission.rle.id_template: '{id}_{klass}': unknown field '{klass}'",
        ),
    ]


@pytest.mark.parametrize("mutate,message", _field_cases())
def test_bad_values_fail_at_load(pipeline, capsys, tmp_path, mutate, message):
    write, cfg = pipeline
    mutate(cfg)
    path = write(cfg)
    err = _run_fails(capsys, path)
    assert str(path) in err and message in err
    assert not (tmp_path / "cache").exists()  # refused before anything was resolved


@pytest.mark.skipif(sys.platform == "darwin", reason="a Mac may have an MPS device")
def test_mps_without_mps(pipeline, capsys, tmp_path):
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    write, cfg = pipeline
    cfg["runtime"]["device"] = "mps"
    err = _run_fails(capsys, write(cfg))
    assert "runtime.device: 'mps' but torch has no Apple MPS device" in err


def test_malformed_path_template(pipeline, capsys, tmp_path, demo_images):
    write, cfg = pipeline
    (tmp_path / "test.csv").write_text("id\nimg_00000\n")
    cfg["data"] = {"csv": {"path": str(tmp_path / "test.csv"), "path_template": "imgs/{id.png"}, "classes": CLASSES}
    path = write(cfg)
    err = _run_fails(capsys, path)
    assert str(path) in err and "data.csv.path_template: 'imgs/{id.png' is not a valid template" in err
    cfg["data"]["csv"]["path_template"] = "imgs/{id.stem}.png"  # an attribute of a str: once an AttributeError
    assert "unknown field '{id.stem}'" in _run_fails(capsys, write(cfg))


# ---- checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,damage,message",
    [
        ("empty.pt", lambda data: b"", "is empty (0 bytes)"),
        ("garbage.pt", lambda data: b"not a checkpoint" * 8, "is not a torch checkpoint"),
        ("empty.safetensors", lambda data: b"", "is empty (0 bytes)"),
        ("cut.safetensors", lambda data: data[: len(data) // 2], "is not a complete safetensors file (truncated"),
        ("header.safetensors", lambda data: data[:20], "is not a complete safetensors file (its header claims"),
        (
            "garbage.safetensors",
            lambda data: b"not safetensors at all" * 8,
            "is not a safetensors file (it does not start",
        ),
        (
            "torch.safetensors",
            lambda data: b"PK\x03\x04" + data[4:],
            "is a torch.save file, not safetensors; rename it to .pt",
        ),
    ],
)
def test_damaged_checkpoint(pipeline, capsys, tmp_path, checkpoints, name, damage, message):
    write, cfg = pipeline
    bad = tmp_path / name
    bad.write_bytes(damage(checkpoints["test_resnet"].read_bytes()))
    cfg["members"][0]["checkpoint"] = str(bad)
    err = _run_fails(capsys, write(cfg))
    assert f"members.a.checkpoint: {bad}" in err and message in err
    assert not (tmp_path / "submission.csv").exists()


# ---- the test set and its ground truth -----------------------------------------------------------


def test_broken_symlink_in_the_test_folder(pipeline, capsys, tmp_path, demo_images):
    d = tmp_path / "imgs"
    d.mkdir()
    for p in sorted(demo_images.glob("*.png"))[:4]:
        shutil.copy(p, d / p.name)
    (d / "img_99999.png").symlink_to(tmp_path / "gone.png")
    write, cfg = pipeline
    cfg["data"] = {"folder": str(d), "classes": CLASSES}
    err = _run_fails(capsys, write(_fast(cfg, tmp_path)))
    assert "data.folder" in err and str(d / "img_99999.png") in err and "broken symbolic link" in err
    cfg["data"] = {"glob": str(d / "*.png"), "classes": CLASSES}
    assert "broken symbolic link" in _run_fails(capsys, write(cfg))


def test_ids_with_line_breaks_list_and_are_quoted(pipeline, capsys, tmp_path, demo_images):
    from kaggle_tta.io.data import list_test_set

    d = tmp_path / "odd_ids"
    d.mkdir()
    src = demo_images / "img_00000.png"
    names = ["a\nb", "c\rd", "e\u2028f", "g\x85h", "plain"]
    for n in names:
        shutil.copy(src, d / f"{n}.png")
    write, cfg = pipeline
    cfg["data"] = {"folder": str(d), "classes": CLASSES}
    ts = list_test_set(load_pipeline(write(_fast(cfg, tmp_path))))
    assert sorted(ts.ids) == sorted(names) and len(ts.paths) == len(names)
    shutil.copy(src, d / "a\nb.jpg")  # a duplicate id with a line break: still one line
    err = _run_fails(capsys, write(cfg))
    assert "duplicate id 'a\\nb'" in err


def test_labels_csv_not_utf8(pipeline, capsys, tmp_path, demo_images):
    write, cfg = pipeline
    labels = tmp_path / "labels.csv"
    labels.write_bytes(
        b"id,label\n"
        + b"".join(f"{p.stem},circle\n".encode() for p in sorted(demo_images.glob("*.png")))
        + b"caf\xe9,circle\n"
    )
    cfg["data"]["labels"]["path"] = str(labels)
    err = _run_fails(capsys, write(_fast(cfg, tmp_path)))
    assert str(labels) in err and "not UTF-8 text (byte 0xe9 on line 26)" in err
    assert not (tmp_path / "submission.csv").exists()


def test_test_csv_and_classes_file_not_utf8(pipeline, capsys, tmp_path, demo_images):
    write, cfg = pipeline
    listing = tmp_path / "test.csv"
    listing.write_bytes(b"id,file\nimg_00000,img_00000.png\ncaf\xe9,img_00001.png\n")
    cfg["data"] = {"csv": {"path": str(listing), "path_column": "file", "root": str(demo_images)}, "classes": CLASSES}
    err = _run_fails(capsys, write(_fast(cfg, tmp_path)))
    assert str(listing) in err and "not UTF-8 text (byte 0xe9 on line 3)" in err and "data.csv.path" in err
    classes = tmp_path / "classes.txt"
    classes.write_bytes("\n".join(CLASSES).encode("utf-16"))
    cfg["data"] = {"folder": str(demo_images), "classes_file": str(classes)}
    err = _run_fails(capsys, write(cfg))
    assert f"data.classes_file: {classes}: not UTF-8 text" in err


def test_labels_csv_with_a_duplicate_id(pipeline, capsys, tmp_path, demo_images):
    write, cfg = pipeline
    labels = tmp_path / "labels.csv"
    stems = [p.stem for p in sorted(demo_images.glob("*.png"))]
    labels.write_text("id,label\n" + "".join(f"{s},circle\n" for s in stems) + f"{stems[3]},square\n")
    cfg["data"]["labels"]["path"] = str(labels)
    err = _run_fails(capsys, write(_fast(cfg, tmp_path)))
    assert str(labels) in err and f"id '{stems[3]}' has two rows (data rows 4 and {len(stems) + 1})" in err
    assert not (tmp_path / "submission.csv").exists()


def _det_pipeline(tmp_path: Path, boxes_csv: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for k in range(3):
        img = np.zeros((24, 24, 3), np.uint8)
        img[4:12, 5:15, 0] = 250
        cv2.imwrite(str(images / f"im{k}.png"), img)
    cfg = {
        "task": "detection",
        "data": {"folder": str(images), "classes": CLASSES[:3], "boxes": {"path": str(boxes_csv)}},
        "runtime": {"device": "cpu", "precision": "fp32", "workers": 0},
        "cache": {"dir": str(tmp_path / "cache")},
        "members": [
            {
                "name": "bright",
                "factory": "helpers:bright_boxes",
                "adapter": "boxes",
                "preprocess": {"input_size": [24, 24]},
            }
        ],
        "submission": {"path": str(tmp_path / "sub.csv")},
    }
    path = tmp_path / "det.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_boxes_csv_not_utf8(capsys, tmp_path):
    boxes = tmp_path / "boxes.csv"
    boxes.write_bytes(b"id,x1,y1,x2,y2,label\nim0,5,4,15,12,circle\nim\xe91,5,4,15,12,circle\n")
    err = _run_fails(capsys, _det_pipeline(tmp_path, boxes))
    assert str(boxes) in err and "not UTF-8 text" in err


def test_mask_value_above_the_classes(capsys, tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for k in range(2):
        cv2.imwrite(str(images / f"im{k}.png"), np.full((16, 16, 3), 100, np.uint8))
        mask = np.zeros((16, 16), np.uint8)
        mask[2:6, 2:6] = 9 if k == 1 else 1  # 4 classes: 9 is no class
        cv2.imwrite(str(masks / f"im{k}.png"), mask)
    cfg = {
        "task": "segmentation",
        "data": {"folder": str(images), "classes": CLASSES, "masks": {"folder": str(masks)}},
        "runtime": {"device": "cpu", "precision": "fp32", "workers": 0},
        "cache": {"dir": str(tmp_path / "cache")},
        "members": [{"name": "px", "factory": "helpers:per_pixel"}],
        "submission": {"path": str(tmp_path / "sub.csv")},
    }
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    err = _run_fails(capsys, path)
    assert str(masks / "im1.png") in err and "9" in err


# ---- outputs ---------------------------------------------------------------------------------------


def test_cache_dir_that_is_a_file(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    (tmp_path / "cache_file").write_text("not a folder")
    cfg["cache"]["dir"] = str(tmp_path / "cache_file")
    path = write(cfg)
    err = _run_fails(capsys, path)
    assert str(path) in err and f"cache.dir: {tmp_path / 'cache_file'} is a file, not a folder" in err
    cfg["cache"]["dir"] = str(tmp_path / "cache_file" / "below")
    assert "cache.dir:" in _run_fails(capsys, write(cfg))


def test_submission_path_that_is_a_folder(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    (tmp_path / "out").mkdir()
    cfg["submission"]["path"] = str(tmp_path / "out")
    path = write(cfg)
    err = _run_fails(capsys, path)
    assert str(path) in err and f"submission.path: {tmp_path / 'out'} is a folder" in err
    assert not (tmp_path / "cache").exists()  # refused at load, before any forward


def _no_tmp_left(folder: Path) -> None:
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_submission_that_cannot_be_written(pipeline, capsys, tmp_path, monkeypatch):
    write, cfg = pipeline
    path = write(_fast(cfg, tmp_path))
    assert main(["run", str(path), "-q"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    (tmp_path / "submission.csv").unlink()

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr("kaggle_tta.io.submission.os.replace", refuse)
    err = _fails(capsys, "blend", path)
    assert f"submission.path: cannot write {tmp_path / 'submission.csv'} (Permission denied)" in err
    _no_tmp_left(tmp_path)
    monkeypatch.undo()
    if sys.platform == "linux" and os.path.isdir("/proc/self"):  # a read-only location, even for root
        err = _fails(capsys, "blend", path, "--set", "submission.path=/proc/kaggle_tta_test/submission.csv")
        assert "submission.path: cannot write /proc/kaggle_tta_test/submission.csv" in err


def test_check_writable_probes_without_leaving_a_file(tmp_path):
    from kaggle_tta.config.errors import ConfigError
    from kaggle_tta.io.submission import check_writable

    check_writable(tmp_path / "sub" / "submission.csv")
    assert (tmp_path / "sub").is_dir() and not list((tmp_path / "sub").iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^submission.path: cannot write .*file/submission.csv"):
        check_writable(tmp_path / "file" / "submission.csv")
    with pytest.raises(ConfigError, match=r"^submission.path: .* is a folder"):
        check_writable(tmp_path)
