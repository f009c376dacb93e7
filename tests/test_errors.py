"""Bad input: one clear line naming the file or YAML path, exit 2, nothing half-written."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
import torch
from conftest import CLASSES, save_random_checkpoint

from kaggle_tta.cli import main


def _fails(capsys, path, *extra) -> str:
    code = main(["run", str(path), "-q", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("kaggle-tta: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def _nothing_written(tmp_path):
    assert not (tmp_path / "submission.csv").exists()
    assert not list((tmp_path / "cache").glob("*/*/*.npy"))


def _config_cases():
    def unknown_key(c):
        c["runtime"]["precison"] = "fp16"

    def unknown_arch(c):
        c["members"][0]["arch"] = "resnet_18"

    def unknown_view(c):
        c["members"][1]["tta"] = ["identity", "hfilp"]

    def cannot_invert(c):
        c["task"] = "segmentation"
        c["members"][0]["tta"] = "five_crop"

    def cycle(c):
        c["blends"] = [{"name": "x", "inputs": ["a", "y"]}, {"name": "y", "inputs": ["x", "b"]}]

    def unknown_input(c):
        c["blends"][0]["inputs"] = ["a", "bb"]

    def weights(c):
        c["blends"][0]["weights"] = [1, 2, 3]

    def negative_weight(c):
        c["blends"][0]["weights"] = [1, -1]

    def unknown_merge(c):
        c["members"][0]["merge"] = "median"

    def bad_precision(c):
        c["runtime"]["precision"] = "int8"

    return [
        (unknown_key, "runtime: unknown key 'precison' — did you mean 'precision'?"),
        (unknown_arch, "members.a.arch: unknown timm architecture 'resnet_18' — did you mean"),
        (unknown_view, "members.b.tta[1]: unknown view 'hfilp' — did you mean 'hflip'?"),
        (cannot_invert, "members.a.tta: view 'crop_tl' cannot be inverted on masks (task: segmentation)"),
        (cycle, "blends form a cycle: x -> y -> x"),
        (unknown_input, "blends[0].inputs[1]: unknown input 'bb' — did you mean 'b'?"),
        (weights, "blends[0]: 3 weights for 2 inputs"),
        (negative_weight, "weights must be finite and non-negative"),
        (unknown_merge, "members.a.merge: 'median' is not a classification view merge"),
        (bad_precision, "runtime.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
    ]


@pytest.mark.parametrize("mutate,message", _config_cases(), ids=lambda x: getattr(x, "__name__", ""))
def test_bad_pipeline_fields(pipeline, capsys, tmp_path, mutate, message):
    write, cfg = pipeline
    mutate(cfg)
    err = _fails(capsys, write(cfg))
    assert message in err
    _nothing_written(tmp_path)


def test_bad_override_and_missing_file(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    path = write(cfg)
    assert "runtime.forward_batch: must be at least 1" in _fails(capsys, path, "--set", "runtime.forward_batch=0")
    assert "--set nonsense: expected key.path=value" in _fails(capsys, path, "--set", "nonsense")
    assert "no such pipeline file" in _fails(capsys, tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("members: [\n")
    assert "not valid YAML" in _fails(capsys, tmp_path / "broken.yaml")


def test_missing_checkpoint(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    cfg["members"][0]["checkpoint"] = str(tmp_path / "missing.safetensors")
    err = _fails(capsys, write(cfg))
    assert "members.a.checkpoint:" in err and "missing.safetensors not found" in err
    _nothing_written(tmp_path)


def test_checkpoint_with_other_class_count(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    cfg["members"][0]["checkpoint"] = str(
        save_random_checkpoint(tmp_path / "ten.safetensors", "test_resnet", 0, n_classes=10)
    )
    err = _fails(capsys, write(cfg))
    assert "members.a.checkpoint: ten.safetensors:" in err
    assert "the checkpoint has 10 classes, the pipeline declares 4 (data.classes)" in err
    _nothing_written(tmp_path)


def test_checkpoint_of_another_arch(pipeline, capsys, tmp_path, checkpoints):
    write, cfg = pipeline
    cfg["members"][0]["checkpoint"] = str(checkpoints["test_efficientnet"])
    err = _fails(capsys, write(cfg))
    assert "does not match the model" in err and "missing keys" in err


def test_nested_and_prefixed_torch_checkpoints_load(pipeline, capsys, tmp_path, checkpoints):
    from safetensors.torch import load_file

    sd = load_file(str(checkpoints["test_resnet"]))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "nested.pth")
    write, cfg = pipeline
    cfg["members"][0]["checkpoint"] = str(tmp_path / "nested.pth")
    assert main(["run", str(write(cfg)), "-q"]) == 0, capsys.readouterr().err


def test_pickled_code_is_refused(pipeline, capsys, tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": np.dtype}, tmp_path / "evil.pth")  # not weights-only
    write, cfg = pipeline
    cfg["members"][0]["checkpoint"] = str(tmp_path / "evil.pth")
    err = _fails(capsys, write(cfg))
    assert "cannot load" in err and "safely" in err


def test_empty_test_set(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    (tmp_path / "empty").mkdir()
    cfg["data"]["folder"] = str(tmp_path / "empty")
    cfg["data"].pop("labels")
    err = _fails(capsys, write(cfg))
    assert "the test set is empty" in err and "data.folder" in err
    for k in range(3):  # a folder of DICOMs under the default suffixes: the refusal says what it holds
        (tmp_path / "empty" / f"{k}.dcm").write_bytes(b"x")
    (tmp_path / "empty" / "notes.txt").write_text("x")
    err = _fails(capsys, write(cfg))
    assert "(the folder holds 3 .dcm, 1 .txt files: add their suffix)" in err, err


def test_duplicate_ids(pipeline, capsys, tmp_path, demo_images):
    d = tmp_path / "dup"
    (d / "x").mkdir(parents=True)
    shutil.copy(demo_images / "img_00000.png", d / "img_00000.png")
    shutil.copy(demo_images / "img_00001.png", d / "img_00001.jpg")
    shutil.copy(demo_images / "img_00001.png", d / "img_00001.png")
    write, cfg = pipeline
    cfg["data"] = {"glob": str(d / "*"), "classes": CLASSES}
    err = _fails(capsys, write(cfg))
    assert "duplicate id 'img_00001'" in err


@pytest.mark.parametrize("damage", ["zero", "truncated", "garbage"])
def test_bad_image_is_named(pipeline, capsys, tmp_path, demo_images, damage):
    d = tmp_path / "imgs"
    shutil.copytree(demo_images, d)
    victim = d / "img_00013.png"
    data = victim.read_bytes()
    victim.write_bytes(
        {"zero": b"", "truncated": data[: len(data) // 2], "garbage": b"not an image at all" * 10}[damage]
    )
    write, cfg = pipeline
    cfg["data"]["folder"] = str(d)
    cfg["data"]["labels"]["path"] = str(d / "labels.csv")
    err = _fails(capsys, write(cfg))
    assert str(victim) in err
    assert ("zero-byte" in err) if damage == "zero" else ("unreadable or truncated" in err)
    assert not (tmp_path / "submission.csv").exists()
    assert not list((tmp_path / "cache").glob("*/*/*.npy"))  # the rows before it stay partial


def test_factory_that_does_not_import(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    cfg["members"][0] = {"name": "a", "factory": "no_such_pkg.models:Unet", "preprocess": {"input_size": [3, 56, 56]}}
    err = _fails(capsys, write(cfg))
    assert "members.a.factory: " in err and "'no_such_pkg.models'" in err and "install it or fix the name" in err


def test_labels_with_unknown_class(pipeline, capsys, tmp_path, demo_images):
    write, cfg = pipeline
    (tmp_path / "labels.csv").write_text(
        "id,label\n" + "".join(f"{p.stem},hexagon\n" for p in sorted(demo_images.glob("*.png")))
    )
    cfg["data"]["labels"]["path"] = str(tmp_path / "labels.csv")
    err = _fails(capsys, write(cfg))
    assert "label 'hexagon' is not in data.classes" in err


# ---- the command line's surface ------------------------------------------------------------


def test_version():
    import os
    import subprocess
    import sys
    from pathlib import Path

    import tomllib

    import kaggle_tta

    root = Path(__file__).parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "kaggle_tta", "--version"],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"kaggle-tta {kaggle_tta.__version__}"
    assert kaggle_tta.__version__ == tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize(
    "argv",
    [["blend", "P", "--quiet"], ["blend", "P", "-q"], ["cache", "ls", "P", "-q"], ["cache", "prune", "P", "--quiet"]],
)
def test_quiet_is_only_for_commands_with_a_progress_bar(capsys, argv):
    """blend and cache show no bar, so --quiet there is a usage error (argparse: exit 2)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "unrecognized arguments: -" in capsys.readouterr().err


def test_run_and_infer_take_quiet(pipeline, capsys, tmp_path):
    write, cfg = pipeline
    cfg["members"], cfg["blends"] = cfg["members"][:1], []
    path = write(cfg)
    assert main(["infer", str(path), "--quiet"]) == 0, capsys.readouterr().err
    assert main(["run", str(path), "-q"]) == 0, capsys.readouterr().err
    assert (tmp_path / "submission.csv").is_file()


def test_demo_data_help_describes_each_option(capsys):
    import re

    from kaggle_tta.cli import build_parser
    from kaggle_tta.demo import DEMO_SIZE

    with pytest.raises(SystemExit) as exc:
        main(["demo-data", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words
    # every argument the command takes (as parsed), each with its words after it
    args = vars(build_parser().parse_args(["demo-data", "OUT"])).keys() - {"func", "command"}
    assert args == {"out", "n", "seed", "size"}
    assert re.search(r"positional arguments: out [a-z]+ [a-z]+", text), text
    for name in args - {"out"}:
        assert re.search(rf"--{name} {name.upper()} [a-z(][a-z]+ ", text), name
    assert "(default: 240)" in text and "(default: 1)" in text and f"(default: {DEMO_SIZE}," in text and DEMO_SIZE == 72
    assert "labels.csv" in text and "masks" in text  # what it writes


def test_class_names_written_as_numbers(pipeline, capsys, tmp_path):
    """APTOS' grades as YAML integers are the names as written; a float is refused with the fix."""
    write, cfg = pipeline
    cfg["data"]["classes"] = [0, 1, 2, 3]
    cfg["data"].pop("labels")
    cfg["blends"], cfg["members"] = [], cfg["members"][:1]
    cfg["submission"].pop("source", None)
    assert main(["run", str(write(cfg)), "-q"]) == 0
    labels = pl.read_csv(cfg["submission"]["path"], infer_schema=False)["label"].to_list()
    assert labels and set(labels) <= {"0", "1", "2", "3"}
    path = write(cfg)  # in the file, each name is its own text: not YAML 1.1's octal 8 for 010
    path.write_text(path.read_text().replace("- 0\n", "- 000\n").replace("- 2\n", "- 010\n"))
    from kaggle_tta import load_pipeline

    assert load_pipeline(path).data.classes == ["000", "1", "010", "3"]
    assert main(["run", str(path), "-q", "--set", f"submission.path={tmp_path / 'text.csv'}"]) == 0
    assert set(pl.read_csv(tmp_path / "text.csv", infer_schema=False)["label"]) <= {"000", "1", "010", "3"}
    cfg["data"]["classes"] = [0, 1.5, 2, 3]
    err = _fails(capsys, write(cfg), "--set", "data.classes=[0, 1.5, 2, 3]")
    assert "data.classes" in err and "class name 1.5 is not text; quote the names" in err, err


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "the file is empty"),
        ("# nothing yet\n", "the file is empty"),
        ("- a\n", "expected a mapping at the top level"),
    ],
)
def test_an_empty_pipeline_file_says_so(tmp_path, capsys, text, says):
    (tmp_path / "p.yaml").write_text(text)
    assert says in _fails(capsys, tmp_path / "p.yaml")
