"""Hostile inputs, round 3: every OS error on a path the user named and every exception from
code the user supplied is one line naming the path or the callable (exit 2, no traceback);
nothing the user types starts unbounded work; what is written has the sample's shape."""

from __future__ import annotations

import builtins
import csv
import errno
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from kaggle_tta.cli import main


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def _refuse_opening(monkeypatch, target: Path, error: int = errno.EACCES) -> None:
    """``open`` of ``target`` fails as the OS fails it for a file without read permission
    (chmod 000 does not stop root, which runs these tests)."""
    real = builtins.open

    def fake(file, *args, **kwargs):
        if str(file) == str(target):
            raise PermissionError(error, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake)


def test_an_unreadable_image_is_one_line_naming_it(pipeline, tmp_path, monkeypatch, capsys):
    write, cfg = pipeline
    images = tmp_path / "images"
    shutil.copytree(cfg["data"]["folder"], images)
    cfg["data"]["folder"] = str(images)
    cfg["data"]["labels"]["path"] = str(images / "labels.csv")
    target = sorted(images.glob("*.png"))[3]
    target.chmod(0)
    _refuse_opening(monkeypatch, target)
    assert main(["run", str(write(cfg)), "-q"]) == 2
    line = _one_line(capsys)
    assert str(target) in line and "Permission denied" in line and "readable" in line, line


def test_a_csv_path_with_a_nul_byte_is_one_line_naming_the_row(pipeline, tmp_path, capsys):
    write, cfg = pipeline
    images = Path(cfg["data"]["folder"])
    rows = [(p.stem, p.name) for p in sorted(images.glob("*.png"))]
    rows[2] = (rows[2][0], "img\0bad.png")
    listing = tmp_path / "test.csv"
    with listing.open("w", newline="") as f:
        csv.writer(f).writerows([("id", "path"), *rows])
    cfg["data"] = {
        "csv": {"path": str(listing), "id_column": "id", "path_column": "path", "root": str(images)},
        "classes": cfg["data"]["classes"],
    }
    assert main(["run", str(write(cfg)), "-q"]) == 2
    line = _one_line(capsys)
    assert str(listing) in line and "row 3" in line and "NUL" in line, line


def test_a_sample_whose_id_column_is_not_first_is_written_in_its_shape(pipeline, tmp_path, capsys):
    """The sample's header order, its id column where it stands, its ids in its order, and each
    value under the sample's column of its name."""
    write, cfg = pipeline
    images = Path(cfg["data"]["folder"])
    ids = [p.stem for p in sorted(images.glob("*.png"))][::-1]
    classes = cfg["data"]["classes"]
    header = [classes[1], "id", *[c for c in classes if c != classes[1]]]
    sample = tmp_path / "sample.csv"
    with sample.open("w", newline="") as f:
        csv.writer(f).writerows([header, *[[0.25, i, 0.25, 0.25, 0.25] for i in ids]])
    cfg["submission"].update({"format": "probs", "sample": str(sample)})
    assert main(["run", str(write(cfg)), "-q"]) == 0
    with open(cfg["submission"]["path"], newline="") as f:
        written = list(csv.reader(f))
    assert written[0] == header
    assert [r[1] for r in written[1:]] == ids
    cfg["submission"].pop("sample")  # the same run without the sample: each value under its own name
    cfg["submission"]["path"] = str(tmp_path / "plain.csv")
    assert main(["blend", str(write(cfg))]) == 0
    with open(cfg["submission"]["path"], newline="") as f:
        plain = {r["id"]: r for r in csv.DictReader(f)}
    for row in written[1:]:
        for name, value in zip(header, row):
            assert value == plain[row[1]][name], (name, row)


def test_a_sample_whose_ids_match_nothing_is_refused_with_counts(pipeline, tmp_path, capsys):
    write, cfg = pipeline
    sample = tmp_path / "sample.csv"
    sample.write_text("label,image\ncircle,nope_1\ncircle,nope_2\n")
    cfg["submission"]["sample"] = str(sample)
    assert main(["run", str(write(cfg)), "-q"]) == 2
    line = _one_line(capsys)
    assert "submission.sample" in line and "set submission.id_column" in line and "'label'" in line, line


def test_a_metric_that_raises_is_one_line_naming_it(pipeline, tmp_path, monkeypatch, capsys):
    write, cfg = pipeline
    (tmp_path / "bad_metric.py").write_text("def score(y, p):\n    raise RuntimeError('boom: no labels here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(cfg)
    assert main(["run", str(path), "-q"]) == 0
    capsys.readouterr()
    assert main(["tune", str(path), "--out", str(tmp_path / "t.yaml"), "--metric", "bad_metric:score"]) == 2
    line = _one_line(capsys)
    assert "--metric" in line and "bad_metric:score" in line and "RuntimeError: boom" in line, line


def test_tune_out_where_the_folder_is_a_file_or_read_only_is_one_line(pipeline, tmp_path, monkeypatch, capsys):
    write, cfg = pipeline
    path = write(cfg)
    assert main(["run", str(path), "-q"]) == 0
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file")
    capsys.readouterr()
    assert main(["tune", str(path), "--out", str(blocker / "tuned.yaml"), "--folds", "0"]) == 2
    line = _one_line(capsys)
    assert "--out" in line and str(blocker) in line, line
    # a read-only folder (EROFS: root writes anywhere else): the write and the cleanup both fail
    real_write, real_unlink = Path.write_bytes, Path.unlink

    def erofs(self, *a, **k):
        if self.parent == tmp_path / "ro":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write(self, *a, **k) if a else real_unlink(self, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: erofs(self, data))
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: erofs(self, missing_ok=missing_ok))
    assert main(["tune", str(path), "--out", str(tmp_path / "ro" / "tuned.yaml"), "--folds", "0"]) == 2
    line = _one_line(capsys)
    assert "Read-only file system" in line and str(tmp_path / "ro") in line, line


def test_kernel_out_that_is_a_file_is_one_line_before_any_wheel(pipeline, tmp_path, capsys):
    write, cfg = pipeline
    out = tmp_path / "bundle"
    out.write_text("a file")
    t = time.monotonic()
    assert main(["kernel", str(write(cfg)), "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert "--out" in line and str(out) in line and "not a folder" in line, line
    assert time.monotonic() - t < 30  # refused before fetching or building any wheel


def test_runtime_devices_above_the_machine_is_refused_before_any_rank(pipeline, tmp_path, capsys):
    write, cfg = pipeline
    cfg["runtime"]["devices"] = 100_000
    path = write(cfg)
    t = time.monotonic()
    assert main(["infer", str(path), "-q"]) == 2
    took = time.monotonic() - t
    line = _one_line(capsys)
    assert "runtime.devices: 100000" in line and "CPU cores" in line, line
    assert took < 1.0, took  # listing and checking the 24-image test set, nothing started
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.startswith(".")]  # no entry


@pytest.mark.parametrize("where", ["import", "call"])
def test_a_detection_adapter_that_raises_is_one_line_naming_it(where, tmp_path, monkeypatch):
    from kaggle_tta.config.errors import ConfigError
    from kaggle_tta.io.models import import_callable

    body = "raise ValueError('at import')\n" if where == "import" else "def adapt(out, size):\n    return 1 / 0\n"
    (tmp_path / "user_adapter.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        fn = import_callable("user_adapter:adapt", "members.det.adapter")
        fn(None, (8, 8))
    text = str(info.value)
    assert "members.det.adapter" in text and "\n" not in text
    assert ("ValueError: at import" in text) if where == "import" else ("ZeroDivisionError" in text), text


# ---- the cache: damage named, healed by a run, and never removed under a run ---------------


def _run_once(pipeline, tmp_path) -> tuple[Path, dict]:
    write, cfg = pipeline
    path = write(cfg)
    assert main(["run", str(path), "-q"]) == 0
    return path, cfg


def _entry_dir(cfg: dict, member: str) -> Path:
    (folder,) = [p for p in (Path(cfg["cache"]["dir"]) / member).iterdir() if p.is_dir()]
    return folder


@pytest.mark.parametrize("damage", ["missing", "garbage", "reordered"])
def test_a_damaged_ids_json_is_named_by_verify_and_ls_and_healed_by_run(pipeline, tmp_path, capsys, damage):
    import json

    path, cfg = _run_once(pipeline, tmp_path)
    before = Path(cfg["submission"]["path"]).read_bytes()
    ids_file = _entry_dir(cfg, "a") / "ids.json"
    if damage == "missing":
        ids_file.unlink()
    elif damage == "garbage":
        ids_file.write_text("[not json")
    else:
        ids_file.write_text(json.dumps(json.loads(ids_file.read_text())[::-1]))
    capsys.readouterr()
    assert main(["cache", "verify", str(path)]) == 2
    out = capsys.readouterr()
    assert "| ids.json | damaged" in out.out and "ids.json" in out.err.strip().splitlines()[-1], out
    assert main(["cache", "ls", str(path)]) == 0
    assert "damaged: ids.json" in capsys.readouterr().out
    assert main(["run", str(path), "-q"]) == 0  # computes that entry again, saying so in one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ids.json" in err[0] and "computing" in err[0], err
    assert Path(cfg["submission"]["path"]).read_bytes() == before
    assert main(["cache", "verify", str(path)]) == 0


def test_a_damaged_manifest_is_one_line_for_blend_and_healed_by_run(pipeline, tmp_path, capsys):
    path, cfg = _run_once(pipeline, tmp_path)
    before = Path(cfg["submission"]["path"]).read_bytes()
    (_entry_dir(cfg, "b") / "manifest.json").write_text('{"views": 3')
    capsys.readouterr()
    assert main(["blend", str(path)]) == 2
    assert "manifest.json" in _one_line(capsys)
    assert main(["cache", "verify", str(path)]) == 2
    assert "| manifest.json | damaged" in capsys.readouterr().out
    assert main(["run", str(path), "-q"]) == 0
    assert Path(cfg["submission"]["path"]).read_bytes() == before


def test_cache_ls_names_a_view_marked_damaged(pipeline, tmp_path, capsys):
    import json

    path, cfg = _run_once(pipeline, tmp_path)
    manifest = _entry_dir(cfg, "a") / "manifest.json"
    m = json.loads(manifest.read_text())
    m["views"]["hflip"]["status"] = "damaged"
    manifest.write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["cache", "ls", str(path)]) == 0
    (row,) = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| a |")]
    assert "damaged: hflip" in row and "1/2" in row, row


def test_prune_during_a_run_skips_the_entry_being_written(pipeline, tmp_path, capsys):
    """A run of the pipeline with other weights (so its entry is stale to the prune) is still
    writing when the prune comes: the prune skips that entry and says so; the run completes
    with every row."""
    import os
    import subprocess
    import sys

    write, cfg = pipeline
    marks = tmp_path / "marks"
    repo = Path(__file__).resolve().parents[1]
    cfg["members"] = [
        {
            "name": "slow",
            "factory": "rank_models:slow_marked",
            "kwargs": {"marks": str(marks), "delay": 0.4},
            "preprocess": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
            "tta": "hflip",
        }
    ]
    cfg["blends"] = []
    cfg["runtime"]["forward_batch"] = 4
    cfg["runtime"]["batch_size"] = 4
    path = write(cfg)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "tests"), str(repo)])}
    other = ["--set", "members.0.kwargs.num_classes=4", "--set", "members.0.preprocess.input_size=[3,40,40]"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kaggle_tta", "run", str(path), "-q", *other],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (marks.exists() and any(marks.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        monkeyed = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = env["PYTHONPATH"]
        sys.path.insert(0, str(repo / "tests"))
        try:
            assert main(["cache", "prune", str(path)]) == 0
        finally:
            sys.path.remove(str(repo / "tests"))
            if monkeyed is None:
                os.environ.pop("PYTHONPATH")
            else:
                os.environ["PYTHONPATH"] = monkeyed
        out = capsys.readouterr().out
        assert "skipped slow/" in out and "a run is writing it" in out and "being written skipped" in out, out
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    rows = Path(cfg["submission"]["path"]).read_text().strip().splitlines()
    assert len(rows) == 1 + len(list(Path(cfg["data"]["folder"]).glob("*.png")))


@pytest.mark.parametrize(
    ("n", "text"), [(0, None), (512, "512 bytes"), (1234, "1.2 KB"), (5_600_000, "5.6 MB"), (7.25e9, "7.2 GB")]
)
def test_disk_messages_never_round_a_size_to_zero(n, text):
    import errno as errno_mod

    from kaggle_tta.cache.files import disk_error, size_text

    if text is not None:
        assert size_text(n) == text
    msg = str(disk_error(OSError(errno_mod.ENOSPC, "No space left on device"), "/some/cache", n or None))
    assert "0.0 MB" not in msg and (text is None or f"({text} needed)" in msg), msg


def test_probabilities_are_written_to_sum_to_one_as_a_grader_reads_them(tmp_path):
    """Dog Breed's grader: 120 probabilities per row summing to 1 within 1e-6. Written with 6
    decimals one by one they miss that about one row in a thousand; written exactly, none."""
    import polars as pl

    from kaggle_tta.config.sections import SubmissionConfig
    from kaggle_tta.io.submission import write_submission
    from kaggle_tta.tasks.classification import write_probs

    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2.5, (3000, 120))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    naive = np.abs(np.round(probs, 6).sum(axis=1) - 1)
    assert (naive > 1e-6).any()  # the problem is real on this data
    classes = [f"breed_{k}" for k in range(120)]
    out = tmp_path / "sub.csv"
    write_submission(write_probs([str(i) for i in range(3000)], probs, classes, SubmissionConfig(format="probs")), out)
    back = pl.read_csv(out).drop("id").to_numpy()
    assert np.abs(back.sum(axis=1) - 1).max() < 1e-9
    assert np.abs(back - probs).max() <= 1e-6 * 120  # each value moved by at most the rows' remainder
    assert (back >= 0).all()


@pytest.mark.parametrize("kind", ["index", "constants"])
def test_samples_as_they_come_index_column_and_constant_columns(pipeline, tmp_path, kind):
    """A sample saved with pandas' index (an unnamed first column), or with columns the
    competition fills with constants (Contrails' height,width): written in the sample's shape,
    those columns as the sample has them, ours by name."""
    import pandas as pd

    write, cfg = pipeline
    images = Path(cfg["data"]["folder"])
    ids = [p.stem for p in sorted(images.glob("*.png"))][::-1]
    sample = tmp_path / "sample.csv"
    if kind == "index":
        pd.DataFrame({"id": ids, "label": "circle"}).to_csv(sample)  # index=True: the unnamed column
    else:
        pd.DataFrame({"id": ids, "label": "circle", "height": 64, "width": 72}).to_csv(sample, index=False)
    cfg["submission"]["sample"] = str(sample)
    assert main(["run", str(write(cfg)), "-q"]) == 0
    want, got = pd.read_csv(sample), pd.read_csv(cfg["submission"]["path"])
    assert list(got.columns) == list(want.columns)
    assert got["id"].tolist() == ids
    for col in [c for c in want.columns if c not in ("id", "label")]:
        assert got[col].tolist() == want[col].tolist(), col
    assert set(got["label"]) <= set(cfg["data"]["classes"])


def test_a_sample_column_that_varies_and_the_writer_lacks_is_refused(pipeline, tmp_path, capsys):
    """An extra sample column with values that vary (a class missing from data.classes, say)
    is no constant to copy: one line, as any header of another width."""
    write, cfg = pipeline
    images = Path(cfg["data"]["folder"])
    ids = [p.stem for p in sorted(images.glob("*.png"))]
    sample = tmp_path / "sample.csv"
    sample.write_text("id,label,extra\n" + "".join(f"{i},circle,{k}\n" for k, i in enumerate(ids)))
    cfg["submission"]["sample"] = str(sample)
    assert main(["run", str(write(cfg)), "-q"]) == 2
    assert "columns" in _one_line(capsys)
