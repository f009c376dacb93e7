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
