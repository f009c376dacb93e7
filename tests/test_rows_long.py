"""Rows a competition asks for, laid out as openai/mle-bench's prepare.py lays it out: RSNA 2022
cervical spine's long table (``row_id,fractured``: a study's eight classes as eight rows,
``<study>_C1``) and HMS' sample that repeats an id (one row per EEG window, the id the
recording's), each against the same pipeline's wide rows as the oracle."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from kaggle_tta.cli import main

TESTS = Path(__file__).resolve().parent
RSNA22 = ["patient_overall", "C1", "C2", "C3", "C4", "C5", "C6", "C7"]


def _studies(root: Path, studies: list[str]) -> None:
    """test_images/<study>/<slice>.png: two to four slices a study, each a flat colour."""
    rng = np.random.default_rng(3)
    for s in studies:
        (root / "test_images" / s).mkdir(parents=True)
        for n in range(int(rng.integers(2, 5))):
            img = np.full((20, 24, 3), rng.integers(0, 256, 3), np.uint8)
            cv2.imwrite(str(root / "test_images" / s / f"{n + 1}.png"), img)


def _pipeline(root: Path, submission: dict) -> Path:
    cfg = {
        "task": "classification",
        "multilabel": True,
        "data": {"folder": str(root / "test_images"), "classes": RSNA22},
        "runtime": {"device": "cpu", "precision": "fp32", "workers": 0, "batch_size": 4},
        "cache": {"dir": str(root / "cache")},
        "members": [
            {
                "name": "m",
                "factory": "helpers:invariant_model",
                "kwargs": {"num_classes": len(RSNA22)},
                "activation": "sigmoid",
                "preprocess": {"input_size": [3, 16, 16]},
                "tta": "hflip",
            }
        ],
        "submission": {
            "format": "probs",
            "group": {"pattern": "^(?P<study>[^/]+)/", "template": "{study}", "aggregate": "max"},
            **submission,
        },
    }
    p = root / "p.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rsna_2022_one_row_per_study_and_class(tmp_path, monkeypatch):
    """rows: class with a group: each study's eight aggregated probabilities as eight rows,
    ``{id}_{class}``, in the sample's (shuffled) order, equal to the wide table's values."""
    monkeypatch.syspath_prepend(str(TESTS))
    studies = ["1.2.826.0.1.3680043.10001", "1.2.826.0.1.3680043.10014", "1.2.826.0.1.3680043.2243"]
    _studies(tmp_path, studies)
    wide = _pipeline(tmp_path, {"path": str(tmp_path / "wide.csv"), "id_column": "StudyInstanceUID"})
    assert main(["run", str(wide), "-q"]) == 0
    oracle = {r["StudyInstanceUID"]: r for r in _read(tmp_path / "wide.csv")}
    ids = [f"{s}_{c}" for s in studies for c in RSNA22]
    np.random.default_rng(0).shuffle(ids)
    (tmp_path / "sample_submission.csv").write_text("row_id,fractured\n" + "".join(f"{i},0.5\n" for i in ids))
    long = _pipeline(
        tmp_path,
        {
            "path": str(tmp_path / "submission.csv"),
            "rows": "class",
            "id_column": "row_id",
            "label_column": "fractured",
            "id_format": "{id}_{class}",
            "sample": str(tmp_path / "sample_submission.csv"),
        },
    )
    assert main(["run", str(long), "-q"]) == 0
    written = _read(tmp_path / "submission.csv")
    assert list(written[0]) == ["row_id", "fractured"]
    assert [r["row_id"] for r in written] == ids
    for r in written:
        study, _, cls = r["row_id"].partition("_")
        assert r["fractured"] == oracle[study][cls], r  # the same number, to the written digit
    assert len({r["fractured"] for r in written}) > len(studies)  # the classes differ


@pytest.mark.parametrize(
    ("submission", "says"),
    [
        ({"rows": "class"}, "id_format: '{id}' gives every class of a row one id; with rows: class write {class}"),
        ({"id_format": "{id}_{class}"}, "id_format: '{id}_{class}': {class} is for rows: class"),
        ({"rows": "class", "id_format": "{id}_{class}", "format": "label"}, "submission.rows: one row per class is"),
    ],
)
def test_rows_per_class_needs_its_template_and_a_format_of_values(tmp_path, monkeypatch, capsys, submission, says):
    monkeypatch.syspath_prepend(str(TESTS))
    _studies(tmp_path, ["a"])
    p = _pipeline(tmp_path, {"path": str(tmp_path / "s.csv"), **submission})
    assert main(["run", str(p), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "cache").exists()  # before any forward


def test_hms_a_sample_repeating_ids_gets_each_ids_row_at_every_place(tmp_path, monkeypatch, capsys):
    """HMS: the sample names a recording once per window (``eeg_id`` repeated, in no order):
    every sample row is written, with its id's prediction; two different sample ids for one
    image stay an error."""
    monkeypatch.syspath_prepend(str(TESTS))
    _studies(tmp_path, ["568657", "582999", "642382"])
    wide = _pipeline(tmp_path, {"path": str(tmp_path / "wide.csv"), "id_column": "eeg_id"})
    assert main(["run", str(wide), "-q"]) == 0
    oracle = {r["eeg_id"]: r for r in _read(tmp_path / "wide.csv")}
    ids = ["582999", "568657", "582999", "642382", "568657", "582999"]
    header = "eeg_id," + ",".join(RSNA22) + "\n"
    (tmp_path / "sample.csv").write_text(header + "".join(f"{i}," + ",".join(["0.1"] * 8) + "\n" for i in ids))
    p = _pipeline(
        tmp_path, {"path": str(tmp_path / "s.csv"), "id_column": "eeg_id", "sample": str(tmp_path / "sample.csv")}
    )
    assert main(["run", str(p), "-q"]) == 0
    written = _read(tmp_path / "s.csv")
    assert [r["eeg_id"] for r in written] == ids
    assert all(r == oracle[r["eeg_id"]] for r in written)
    capsys.readouterr()
    (tmp_path / "sample.csv").write_text(
        header + "".join(f"{i}," + ",".join(["0.1"] * 8) + "\n" for i in ids + ["568657/1"])
    )
    cfg = yaml.safe_load(p.read_text())
    del cfg["submission"]["group"]  # per image: '568657/1' names an image, and so does its file name
    cfg["submission"]["sample"] = str(tmp_path / "sample2.csv")
    (tmp_path / "sample2.csv").write_text("eeg_id," + ",".join(RSNA22) + "\n568657/1,0\n568657/1.png,0\n")
    p.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(p), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "two sample ids ('568657/1', '568657/1.png') name the same test image" in err[0], err


def test_ranzcr_a_sample_asking_for_fewer_classes_gets_those(tmp_path, monkeypatch, capsys):
    """mle-bench's RANZCR scores 9 of the competition's 11 classes: a sample whose class columns
    are some of the writer's, by name, gets those (in its order), one line naming the others;
    a sample naming a class the writer lacks is still refused."""
    monkeypatch.syspath_prepend(str(TESTS))
    _studies(tmp_path, ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"])
    wide = _pipeline(tmp_path, {"path": str(tmp_path / "wide.csv"), "id_column": "StudyInstanceUID"})
    assert main(["run", str(wide), "-q"]) == 0
    oracle = {r["StudyInstanceUID"]: r for r in _read(tmp_path / "wide.csv")}
    asked = ["C3", "patient_overall", "C1"]
    sample = tmp_path / "sample.csv"
    sample.write_text("StudyInstanceUID," + ",".join(asked) + "\n" + "".join(f"{s},0,0,0\n" for s in oracle))
    cfg = yaml.safe_load(wide.read_text())
    cfg["submission"].update(path=str(tmp_path / "s.csv"), sample=str(sample))
    wide.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["run", str(wide)]) == 0
    err = capsys.readouterr().err
    assert "submission.sample asks for 3 of the 8 columns: 5 not written (C2, C4, C5, ...)" in err, err
    written = _read(tmp_path / "s.csv")
    assert list(written[0]) == ["StudyInstanceUID", *asked]
    assert all(r[c] == oracle[r["StudyInstanceUID"]][c] for r in written for c in asked)
    sample.write_text("StudyInstanceUID,C1,C9\n" + "".join(f"{s},0,0\n" for s in oracle))
    assert main(["run", str(wide), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the sample has 3 columns" in err[0], err


@pytest.mark.parametrize("fmt", ["label", "topk", "multilabel"])
def test_cdiscount_a_label_per_product_from_its_pictures(tmp_path, monkeypatch, fmt):
    """One row per product (1-4 pictures): the label, the top k or the classes over the
    threshold of the group's mean probabilities, as the grouped probs rows give them."""
    monkeypatch.syspath_prepend(str(TESTS))
    _studies(tmp_path, ["10", "14", "21", "35"])
    group = {"pattern": "^(?P<p>[^/]+)/", "template": "{p}", "aggregate": "mean"}
    probs = _pipeline(tmp_path, {"path": str(tmp_path / "probs.csv"), "id_column": "_id", "group": group})
    assert main(["run", str(probs), "-q"]) == 0
    oracle = {r["_id"]: np.array([float(r[c]) for c in RSNA22]) for r in _read(tmp_path / "probs.csv")}
    p = _pipeline(
        tmp_path,
        {"path": str(tmp_path / "s.csv"), "id_column": "_id", "label_column": "category_id", "format": fmt, "k": 3}
        | {"group": group, "threshold": 0.5},
    )
    assert main(["run", str(p), "-q"]) == 0
    written = {r["_id"]: r["category_id"] for r in _read(tmp_path / "s.csv")}
    assert written.keys() == oracle.keys()
    for pid, v in oracle.items():
        order = [RSNA22[k] for k in np.argsort(-v, kind="stable")]
        expect = {"label": order[0], "topk": " ".join(order[:3])}.get(fmt)
        if fmt == "multilabel":
            expect = " ".join(c for c, x in zip(RSNA22, v) if x >= 0.5)
        assert written[pid] == expect, (pid, v, written[pid])


def test_a_zipped_sample_is_read_as_its_csv(tmp_path, monkeypatch, capsys):
    """mle-bench ships some samples as ``sample_submission.csv.zip``: its one CSV is the sample
    (header and order kept); an archive of two CSVs is one line naming them."""
    import zipfile

    monkeypatch.syspath_prepend(str(TESTS))
    _studies(tmp_path, ["7", "3", "5"])
    text = "id," + ",".join(RSNA22) + "\n" + "".join(f"{i}," + ",".join(["0"] * 8) + "\n" for i in ["5", "7", "3"])
    with zipfile.ZipFile(tmp_path / "sample_submission.csv.zip", "w") as z:
        z.writestr("sample_submission.csv", text)
    p = _pipeline(tmp_path, {"path": str(tmp_path / "s.csv"), "sample": str(tmp_path / "sample_submission.csv.zip")})
    assert main(["run", str(p), "-q"]) == 0
    assert [r["id"] for r in _read(tmp_path / "s.csv")] == ["5", "7", "3"]
    with zipfile.ZipFile(tmp_path / "sample_submission.csv.zip", "w") as z:
        z.writestr("a.csv", text)
        z.writestr("b.csv", text)
    capsys.readouterr()
    assert main(["run", str(p), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a zip archive holding 2 CSV files ['a.csv', 'b.csv']; give the CSV itself" in err[0]


def test_aptos_a_regression_head_written_as_grades(tmp_path, monkeypatch, capsys):
    """regression.cutoffs: each value (after scale and offset) as the number of cutoffs at or
    below it, written as an integer (APTOS' grader refuses floats); equal to the float run's
    values binned. Cutoffs out of order are refused at load."""
    monkeypatch.syspath_prepend(str(TESTS))
    _studies(tmp_path, ["a", "b", "c", "d", "e"])
    cfg = yaml.safe_load(_pipeline(tmp_path, {}).read_text())
    cfg.pop("multilabel")
    cfg["data"]["classes"] = ["diagnosis"]
    cfg["task"], cfg["regression"] = "regression", {"scale": 5.0}
    cfg["members"][0].update(factory="helpers:mean_brightness", activation="none", kwargs={})
    cfg["submission"] = {"path": str(tmp_path / "values.csv"), "format": "values", "id_column": "id_code"}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(p), "-q"]) == 0
    values = {r["id_code"]: float(r["diagnosis"]) for r in _read(tmp_path / "values.csv")}
    cuts = [0.5, 1.5, 2.5, 3.5]
    cfg["regression"]["cutoffs"] = cuts
    cfg["submission"]["path"] = str(tmp_path / "grades.csv")
    p.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(p), "-q"]) == 0
    text = (tmp_path / "grades.csv").read_text()
    grades = {r["id_code"]: r["diagnosis"] for r in _read(tmp_path / "grades.csv")}
    assert grades == {k: str(int(np.searchsorted(cuts, v, side="right"))) for k, v in values.items()}, (values, text)
    assert len(set(grades.values())) > 1, values
    # grouped: a group's grade is its mean value's, an integer (not the mean of its grades)
    cfg["submission"].update(path=str(tmp_path / "g.csv"), group={"pattern": "^(?P<g>[a-e])/", "template": "{g}"})
    p.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(p), "-q"]) == 0
    for row in _read(tmp_path / "g.csv"):
        mean = np.mean([v for k, v in values.items() if k.startswith(row["id_code"] + "/")])
        assert row["diagnosis"] == str(int(np.searchsorted(cuts, mean, side="right"))), (row, mean)
    del cfg["submission"]["group"]
    cfg["regression"]["cutoffs"] = [1.5, 0.5]
    p.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["run", str(p), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cutoffs must be one or more ascending numbers" in err[0], err


def test_decimals_keep_confident_probabilities_apart(tmp_path):
    """submission.decimals: at 6, two sigmoid probabilities past 0.9999995 are both 1.000000
    (an AUC grader sees a tie); at 9 they differ, and softmax rows still sum to exactly 1."""
    from decimal import Decimal

    from kaggle_tta.config import SubmissionConfig
    from kaggle_tta.io.submission import write_submission
    from kaggle_tta.tasks.classification import write_probs

    confident = np.array([[0.99999991], [0.99999962]])
    rng = np.random.default_rng(0)
    soft = rng.random((500, 3))
    soft /= soft.sum(axis=1, keepdims=True)
    for decimals, distinct in [(6, 1), (9, 2)]:
        spec = SubmissionConfig(format="probs", decimals=decimals)
        write_submission(
            write_probs(["a", "b"], confident, ["has_cactus"], spec), tmp_path / "c.csv", decimals=decimals
        )
        assert len({r[1] for r in (ln.split(",") for ln in (tmp_path / "c.csv").read_text().split()[1:])}) == distinct
        table = write_probs([str(i) for i in range(500)], soft, ["x", "y", "z"], spec)
        write_submission(table, tmp_path / "s.csv", decimals=decimals)
        rows = [ln.split(",")[1:] for ln in (tmp_path / "s.csv").read_text().split()[1:]]
        assert all(sum(Decimal(v) for v in r) == 1 for r in rows)
        assert all(len(v.split(".")[1]) <= decimals for r in rows for v in r)


def test_a_sample_of_ids_only_is_refused(tmp_path, monkeypatch, capsys):
    """A sample with no column but its ids asks for nothing the writer makes: refused, not a
    submission of ids alone."""
    monkeypatch.syspath_prepend(str(TESTS))
    _studies(tmp_path, ["1", "2"])
    (tmp_path / "sample.csv").write_text("id\n2\n1\n")
    p = _pipeline(tmp_path, {"path": str(tmp_path / "s.csv"), "sample": str(tmp_path / "sample.csv")})
    assert main(["run", str(p), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the sample has 1 columns" in err[0], err
    assert not (tmp_path / "s.csv").exists()


def test_appended_rows_keep_the_decimals(tmp_path):
    """submission.append: our floats become text with ``decimals`` digits, as the CSV writer
    writes them, beside the appended rows as they are."""
    import polars as pl

    from kaggle_tta.io.submission import with_appended

    ours = pl.DataFrame({"id": ["a", "b"], "p": [0.78004288673, 1e-7]})
    extra = pl.DataFrame({"id": ["c"], "p": ["0.5 0 0 1 1"]})
    out = with_appended(ours, extra, 3)
    assert out["p"].to_list() == ["0.780", "0.000", "0.5 0 0 1 1"]
