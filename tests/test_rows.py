"""Rows a competition asks for (issue #25), laid out as openai/mle-bench's prepare.py lays the
competition out: UW-Madison's ``id,class,predicted`` (the class in its own column, three rows
per slice, ids made from the scans' paths, 16-bit PNGs at their own sizes, RLE along rows:
graded by mle-bench's grade.py, row order scores 1.0 where column order scores 0.47), RSNA
breast cancer's rows per patient and side, VinBigData's boxes with a pseudo-box, and
SIIM-COVID19's two kinds of rows."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from kaggle_tta.cli import main
from kaggle_tta.ops.rle import rle_to_mask

TESTS = Path(__file__).resolve().parent
UW = ["large_bowel", "small_bowel", "stomach"]


def _uw(root: Path) -> dict[str, np.ndarray]:
    """public/test/<case>/<case>_<day>/scans/slice_<n>_<W>_<H>_1.50_1.50.png (16-bit), the
    sample (id, class, predicted; three rows per slice, classes in the competition's order,
    slices not in listing order) and each slice's expected large_bowel mask."""
    rng = np.random.default_rng(0)
    truth, rows = {}, []
    for case, day, (h, w) in [("case7", "day0", (40, 52)), ("case7", "day3", (36, 36)), ("case19", "day1", (44, 30))]:
        scans = root / "test" / case / f"{case}_{day}" / "scans"
        scans.mkdir(parents=True)
        for n in (1, 2):
            img = rng.integers(0, 300, (h, w)).astype(np.uint16)
            img[h // 4 : h // 2 + n, w // 3 : w // 3 + 9 + n] = 3000 + 100 * n  # bright organ
            img[0, 0] = 0
            cv2.imwrite(str(scans / f"slice_{n:04d}_{w}_{h}_1.50_1.50.png"), img)
            sid = f"{case}_{day}_slice_{n:04d}"
            truth[sid] = img.astype(np.float32) / img.max() > 0.5
            rows += [(sid, c) for c in UW]
    rows.sort(key=lambda r: (r[0][::-1], UW.index(r[1])))  # the sample's own order
    with open(root / "sample_submission.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "class", "predicted"])
        out.writerows([(i, c, "1 1 5 2") for i, c in rows])
    return truth


def test_uw_madison_rows_with_a_class_column(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    truth = _uw(tmp_path)
    cfg = {
        "task": "segmentation",
        "data": {
            "folder": str(tmp_path / "test"),
            "classes": UW,
            "id": {
                "pattern": r"(?P<case>case\d+)_(?P<day>day\d+)/scans/slice_(?P<n>\d+)",
                "template": "{case}_{day}_slice_{n}",
            },
            "reader": {"name": "image", "window": {"mode": "minmax"}},
        },
        "runtime": {"device": "cpu", "precision": "fp32", "workers": 0, "batch_size": 4},
        "cache": {"dir": str(tmp_path / "cache")},
        "segmentation": {"size": "native"},
        "members": [
            {
                "name": "m",
                "factory": "helpers:bright_pixels",
                "kwargs": {"num_classes": 3},
                "preprocess": {"mean": [0.0] * 3, "std": [0.5] * 3},
                "tta": "flips",
            }
        ],
        "submission": {
            "path": str(tmp_path / "submission.csv"),
            "format": "rle",
            "sample": str(tmp_path / "sample_submission.csv"),
            "rle": {"class_column": "class", "column": "predicted", "order": "row"},
        },
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "p.yaml"), "-q"]) == 0
    with open(tmp_path / "sample_submission.csv", newline="") as f:
        sample = [(r["id"], r["class"]) for r in csv.DictReader(f)]
    with open(tmp_path / "submission.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == ["id", "class", "predicted"]
    assert [(r["id"], r["class"]) for r in written] == sample  # the sample's rows, in its order
    for r in written:
        mask = truth[r["id"]]
        want = mask if r["class"] == "large_bowel" else np.zeros_like(mask)  # a gray scan: the first class wins
        got = rle_to_mask(r["predicted"], mask.shape, "C", True, "")  # UW's masks run along rows
        np.testing.assert_array_equal(got, want)


def test_a_sample_without_the_class_column_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS))
    _uw(tmp_path)
    (tmp_path / "sample_submission.csv").write_text("id,predicted\ncase7_day0_slice_0001,1 1\n")
    cfg = {
        "task": "segmentation",
        "data": {"folder": str(tmp_path / "test"), "classes": UW},
        "members": [{"name": "m", "factory": "helpers:bright_pixels", "kwargs": {"num_classes": 3}}],
        "segmentation": {"size": "native"},
        "cache": {"dir": str(tmp_path / "cache")},
        "submission": {
            "path": str(tmp_path / "s.csv"),
            "format": "rle",
            "sample": str(tmp_path / "sample_submission.csv"),
            "rle": {"class_column": "class"},
        },
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "p.yaml"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'class'" in err[0] and "submission.sample" in err[0]


@pytest.mark.parametrize("bad", [{"pattern": "(?P<a>x", "template": "{a}"}, {"pattern": "(?P<a>x)", "template": "{b}"}])
def test_a_bad_id_rule_is_one_line_at_load(tmp_path, capsys, bad):
    (tmp_path / "test").mkdir()
    cfg = {
        "data": {"folder": str(tmp_path / "test"), "classes": ["a"], "id": bad},
        "members": [{"name": "m", "arch": "resnet18"}],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "p.yaml"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.id" in err[0]


def _rsna(root: Path) -> list[dict[str, str]]:
    """test_images/<patient>/<image>.dcm, test.csv (prepare.py's columns, prediction_id =
    patient_laterality), the sample (prediction_id, cancer): two patients, both sides, one to
    three views a side."""
    from test_readers import _dicom

    rng = np.random.default_rng(5)
    rows = []
    for patient in ("10006", "10011"):
        (root / "test_images" / patient).mkdir(parents=True)
        for side in ("L", "R"):
            for view in ("CC", "MLO", "ML")[: rng.integers(1, 4)]:
                image = str(rng.integers(10**8, 10**9))
                scan = rng.integers(0, 4000, (24, 20)).astype(np.uint16)
                _dicom(root / "test_images" / patient / f"{image}.dcm", scan)
                rows.append(
                    {
                        "site_id": "1",
                        "patient_id": patient,
                        "image_id": image,
                        "laterality": side,
                        "view": view,
                        "age": "61",
                        "implant": "0",
                        "machine_id": "49",
                        "prediction_id": f"{patient}_{side}",
                    }
                )
    with open(root / "test.csv", "w", newline="") as f:
        out = csv.DictWriter(f, list(rows[0]))
        out.writeheader()
        out.writerows(rows)
    groups = sorted({r["prediction_id"] for r in rows}, reverse=True)
    (root / "sample_submission.csv").write_text("prediction_id,cancer\n" + "".join(f"{g},0.021\n" for g in groups))
    return rows


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_rsna_rows_per_patient_side_aggregate_their_images(tmp_path, monkeypatch, aggregate):
    monkeypatch.syspath_prepend(str(TESTS))
    rows = _rsna(tmp_path)
    cfg = {
        "task": "regression",
        "data": {
            "csv": {
                "path": str(tmp_path / "test.csv"),
                "id_column": "image_id",
                "path_template": "test_images/{patient_id}/{image_id}.dcm",
            },
            "classes": ["cancer"],
            "reader": {"window": {"mode": "minmax"}},
        },
        "runtime": {"device": "cpu", "precision": "fp32", "workers": 0, "batch_size": 4},
        "cache": {"dir": str(tmp_path / "cache")},
        "members": [
            {
                "name": "m",
                "factory": "helpers:mean_brightness",
                "activation": "none",
                "preprocess": {"input_size": [3, 16, 16], "mean": [0.0] * 3, "std": [1.0] * 3},
                "tta": "hflip",
            }
        ],
        "submission": {"path": str(tmp_path / "images.csv"), "format": "values", "id_column": "image_id"},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "p.yaml"), "-q"]) == 0  # per image first: the oracle
    with open(tmp_path / "images.csv", newline="") as f:
        per_image = {r["image_id"]: float(r["cancer"]) for r in csv.DictReader(f)}
    cfg["submission"] = {
        "path": str(tmp_path / "submission.csv"),
        "format": "values",
        "id_column": "prediction_id",
        "group": {"column": "prediction_id", "aggregate": aggregate},
        "sample": str(tmp_path / "sample_submission.csv"),
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "p.yaml"), "-q"]) == 0
    with open(tmp_path / "submission.csv", newline="") as f:
        written = list(csv.DictReader(f))
    with open(tmp_path / "sample_submission.csv", newline="") as f:
        assert [r["prediction_id"] for r in written] == [r["prediction_id"] for r in csv.DictReader(f)]
    assert list(written[0]) == ["prediction_id", "cancer"]
    fn = np.mean if aggregate == "mean" else np.max
    for r in written:
        images = [per_image[x["image_id"]] for x in rows if x["prediction_id"] == r["prediction_id"]]
        assert abs(float(r["cancer"]) - fn(images)) < 2e-6, r  # both written with 6 decimals


def test_a_group_column_missing_from_the_csv_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS))
    _rsna(tmp_path)
    cfg = {
        "task": "regression",
        "data": {
            "csv": {
                "path": str(tmp_path / "test.csv"),
                "id_column": "image_id",
                "path_template": "test_images/{patient_id}/{image_id}.dcm",
            },
            "classes": ["cancer"],
        },
        "cache": {"dir": str(tmp_path / "cache")},
        "members": [
            {
                "name": "m",
                "factory": "helpers:mean_brightness",
                "activation": "none",
                "preprocess": {"input_size": [3, 8, 8]},
            }
        ],
        "submission": {"format": "values", "path": str(tmp_path / "s.csv"), "group": {"column": "study"}},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "p.yaml"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "submission.group.column" in err[0] and "'study'" in err[0]
    assert not list((tmp_path / "cache").rglob("*.npy*"))


def test_vinbigdata_rows_boxes_a_pseudo_box_and_never_empty(tmp_path, monkeypatch):
    """test/<image_id>.dicom and the sample (image_id, PredictionString "14 1 0 0 1 1"): boxes
    as ``class_id conf x_min y_min x_max y_max`` in the DICOM's pixels, "no finding" appended
    as ``14 p 0 0 1 1`` with p from a classifier's submission, and an image without a box gets
    that row alone (the grader splits every string into floats: an empty one crashes it)."""
    from test_readers import _dicom

    monkeypatch.syspath_prepend(str(TESTS))
    (tmp_path / "test").mkdir()
    boxes = {"a1": (5, 7, 17, 15), "b2": (0, 3, 9, 20), "c3": None}  # x1, y1, x2, y2 of the bright patch
    for image, box in boxes.items():
        scan = np.full((24, 30), 100, np.uint16)
        scan[0, 0] = 0
        if box is not None:
            x1, y1, x2, y2 = box
            scan[y1:y2, x1:x2] = 4000
        _dicom(tmp_path / "test" / f"{image}.dicom", scan)
    (tmp_path / "sample_submission.csv").write_text(
        "image_id,PredictionString\n" + "".join(f"{i},14 1 0 0 1 1\n" for i in ("c3", "a1", "b2"))
    )
    (tmp_path / "classifier.csv").write_text("image_id,no_finding\na1,0.1\nb2,0.25\nc3,0.9\n")
    cfg = {
        "task": "detection",
        "data": {
            "folder": str(tmp_path / "test"),
            "extensions": [".dicom"],
            "classes": [f"finding{k}" for k in range(14)],
            "reader": {"window": {"mode": "fixed", "range": [0, 4000]}},
        },
        "runtime": {"device": "cpu", "precision": "fp32", "workers": 0, "batch_size": 4},
        "cache": {"dir": str(tmp_path / "cache")},
        "members": [
            {
                "name": "det",
                "factory": "helpers:bright_boxes",
                "adapter": "boxes",
                "preprocess": {"input_size": [24, 30], "mean": [0.0] * 3, "std": [0.5] * 3},
                "tta": "hflip",
            }
        ],
        "submission": {
            "path": str(tmp_path / "submission.csv"),
            "id_column": "image_id",
            "template": "vinbigdata",
            "sample": str(tmp_path / "sample_submission.csv"),
            "pseudo_box": {
                "csv": str(tmp_path / "classifier.csv"),
                "id_column": "image_id",
                "column": "no_finding",
                "template": "14 {p:.4f} 0 0 1 1",
            },
        },
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "p.yaml"), "-q"]) == 0
    with open(tmp_path / "submission.csv", newline="") as f:
        written = {r["image_id"]: r["PredictionString"] for r in csv.DictReader(f)}
    assert list(written) == ["c3", "a1", "b2"]
    p = {"a1": 0.1, "b2": 0.25, "c3": 0.9}
    for image, box in boxes.items():
        values = np.array(written[image].split(" "), dtype=float).reshape(-1, 6)  # as the grader parses it
        np.testing.assert_array_equal(values[-1], [14, p[image], 0, 0, 1, 1])
        if box is None:
            assert len(values) == 1
            continue
        assert set(values[:-1, 0]) == {0, 1, 2}  # the gray scan's three channels, one box each
        for row in values[:-1]:
            np.testing.assert_allclose(row[2:], box, atol=0.05)
    cfg["submission"]["pseudo_box"]["when"] = "empty"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "p.yaml"), "-q"]) == 0
    with open(tmp_path / "submission.csv", newline="") as f:
        written = {r["image_id"]: r["PredictionString"] for r in csv.DictReader(f)}
    assert written["c3"] == "14 0.9000 0 0 1 1" and "14" not in written["a1"].split(" ")[::6]  # no class 14 row


def _siim(root: Path) -> dict[str, tuple[int, int, int, int] | None]:
    """test/<study>/<series>/<image>.dcm and the sample: the studies' rows, then the images'."""
    from test_readers import _dicom

    layout = {"st1": {"se1": ["im1"], "se2": ["im2"]}, "st2": {"se3": ["im3"]}}
    boxes = {"im1": (4, 6, 15, 14), "im2": None, "im3": (10, 2, 22, 9)}
    rng = np.random.default_rng(9)
    for study, series in layout.items():
        for se, images in series.items():
            (root / "test" / study / se).mkdir(parents=True)
            for im in images:
                scan = rng.integers(0, 1500, (20, 26)).astype(np.uint16)
                if boxes[im] is not None:
                    x1, y1, x2, y2 = boxes[im]
                    scan[y1:y2, x1:x2] = 4000
                _dicom(root / "test" / study / se / f"{im}.dcm", scan)
    rows = [f"{s}_study,negative 1 0 0 1 1" for s in layout] + [f"{i}_image,none 1 0 0 1 1" for i in boxes]
    (root / "sample_submission.csv").write_text("id,PredictionString\n" + "\n".join(rows) + "\n")
    (root / "none.csv").write_text("id,none\nim1,0.2\nim2,0.7\nim3,0.05\n")
    return boxes


def test_siim_covid19_two_kinds_of_rows_in_one_file(tmp_path, monkeypatch):
    """Study rows (a classifier's four classes, averaged over the study's images, as
    ``negative p 0 0 1 1 typical p 0 0 1 1 ...``) from one pipeline, appended to the image rows
    (a detector's ``opacity conf x1 y1 x2 y2`` boxes and ``none p 0 0 1 1``) of another; ids
    ``<study>_study`` and ``<image>_image``; the sample's rows and order."""
    monkeypatch.syspath_prepend(str(TESTS))
    boxes = _siim(tmp_path)
    study_classes = ["negative", "typical", "indeterminate", "atypical"]
    classifier = {
        "data": {
            "folder": str(tmp_path / "test"),
            "extensions": [".dcm"],
            "classes": study_classes,
            "reader": {"window": {"mode": "fixed", "range": [0, 4000]}},
        },
        "runtime": {"device": "cpu", "precision": "fp32", "workers": 0},
        "cache": {"dir": str(tmp_path / "cache")},
        "members": [
            {
                "name": "cls",
                "factory": "helpers:channel_means",
                "kwargs": {"num_classes": 4},
                "preprocess": {"input_size": [3, 16, 16]},
                "tta": "hflip",
            }
        ],
        "submission": {"path": str(tmp_path / "images.csv"), "format": "probs"},
    }
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(classifier))
    assert main(["run", str(tmp_path / "a.yaml"), "-q"]) == 0  # per image: the oracle of the study rows
    with open(tmp_path / "images.csv", newline="") as f:
        per_image = {r["id"]: [float(r[c]) for c in study_classes] for r in csv.DictReader(f)}
    classifier["submission"] = {
        "path": str(tmp_path / "study.csv"),
        "format": "string",
        "template": "{label} {conf:.6f} 0 0 1 1",
        "group": {"pattern": "^(?P<study>[^/]+)/", "template": "{study}"},
        "id_format": "{id}_study",
    }
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(classifier))
    assert main(["run", str(tmp_path / "a.yaml"), "-q"]) == 0
    detector = {
        "task": "detection",
        "data": {
            "folder": str(tmp_path / "test"),
            "extensions": [".dcm"],
            "classes": ["opacity"],
            "id": {"pattern": "(?P<image>[^/]+)$", "template": "{image}"},
            "reader": {"window": {"mode": "fixed", "range": [0, 4000]}, "gray": "keep"},
        },
        "runtime": {"device": "cpu", "precision": "fp32", "workers": 0},
        "cache": {"dir": str(tmp_path / "cache")},
        "members": [
            {
                "name": "det",
                "factory": "helpers:bright_boxes",
                "adapter": "boxes",
                "preprocess": {"input_size": [20, 26], "mean": [0.0], "std": [0.5]},
                "tta": "hflip",
            }
        ],
        "submission": {
            "path": str(tmp_path / "submission.csv"),
            "template": "{label} {conf:.4f} {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}",
            "pseudo_box": {"csv": str(tmp_path / "none.csv"), "column": "none", "template": "none {p:.4f} 0 0 1 1"},
            "id_format": "{id}_image",
            "append": [str(tmp_path / "study.csv")],
            "sample": str(tmp_path / "sample_submission.csv"),
        },
    }
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(detector))
    assert main(["run", str(tmp_path / "b.yaml"), "-q"]) == 0
    with open(tmp_path / "submission.csv", newline="") as f:
        written = list(csv.DictReader(f))
    with open(tmp_path / "sample_submission.csv", newline="") as f:
        assert [r["id"] for r in written] == [r["id"] for r in csv.DictReader(f)]
    got = {r["id"]: r["PredictionString"] for r in written}
    for study, images in (("st1", ["st1/se1/im1", "st1/se2/im2"]), ("st2", ["st2/se3/im3"])):
        mean = np.mean([per_image[i] for i in images], axis=0)
        toks = got[f"{study}_study"].split(" ")
        assert toks[0::6] == study_classes and toks[2::6] == ["0"] * 4 and toks[5::6] == ["1"] * 4
        np.testing.assert_allclose([float(t) for t in toks[1::6]], mean, atol=2e-6)
    none = {"im1": 0.2, "im2": 0.7, "im3": 0.05}
    for image, box in boxes.items():
        toks = got[f"{image}_image"].split(" ")
        assert len(toks) % 6 == 0 and toks[-6:] == ["none", f"{none[image]:.4f}", "0", "0", "1", "1"]
        if box is None:
            assert len(toks) == 6
        else:
            assert toks[0] == "opacity" and np.allclose([float(t) for t in toks[2:6]], box, atol=0.05)


def test_box_centres_for_point_answers_and_a_template_through_set():
    """Kuzushiji scores ``label cx cy``: the centre of each box, in pixels; and a template given
    with --set is text, not a YAML mapping."""
    from kaggle_tta.config.loading import apply_override
    from kaggle_tta.ops.boxes import prediction_string

    boxes = np.array([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 7.0]])
    s = prediction_string(
        boxes, np.array([0.9, 0.4]), np.array([1, 0]), (100, 80), "{label} {cx:.1f} {cy:.1f}", ["U+3042", "U+304A"]
    )
    assert s == "U+304A 20.0 40.0 U+3042 2.5 3.5"
    raw: dict = {}
    apply_override(raw, "submission.template={label} {cx:.1f} {cy:.1f}")
    assert raw == {"submission": {"template": "{label} {cx:.1f} {cy:.1f}"}}


def test_denoising_rows_one_per_pixel(tmp_path, monkeypatch):
    """denoising-dirty-documents: ``<image>_<row>_<col>,value`` for every pixel (1-based), in the
    sample's order; each value the model's map at that pixel (here the pixel itself / 255)."""
    monkeypatch.syspath_prepend(str(TESTS))
    (tmp_path / "test").mkdir()
    rng = np.random.default_rng(8)
    images = {}
    for name, (h, w) in {"2": (7, 9), "8": (5, 4)}.items():
        img = rng.integers(20, 236, (h, w)).astype(np.uint8)
        cv2.imwrite(str(tmp_path / "test" / f"{name}.png"), img)
        images[name] = img
    ids = [
        f"{n}_{r}_{c}" for n, im in images.items() for r in range(1, im.shape[0] + 1) for c in range(1, im.shape[1] + 1)
    ]
    (tmp_path / "sampleSubmission.csv").write_text("id,value\n" + "".join(f"{i},1\n" for i in reversed(ids)))
    cfg = {
        "task": "segmentation",
        "data": {"folder": str(tmp_path / "test"), "classes": ["ink"]},
        "runtime": {"device": "cpu", "precision": "fp32", "workers": 0},
        "cache": {"dir": str(tmp_path / "cache")},
        "segmentation": {"size": "native"},
        "members": [
            {
                "name": "m",
                "factory": "helpers:pixel_value",
                "activation": "sigmoid",
                "preprocess": {"mean": [0.0] * 3, "std": [1.0] * 3},
                "tta": "flips",
            }
        ],
        "submission": {
            "path": str(tmp_path / "submission.csv"),
            "format": "pixels",
            "sample": str(tmp_path / "sampleSubmission.csv"),
        },
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "p.yaml"), "-q"]) == 0
    with open(tmp_path / "submission.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["id"] for r in written] == list(reversed(ids)) and list(written[0]) == ["id", "value"]
    for r in written:
        name, row, col = r["id"].split("_")
        assert abs(float(r["value"]) - images[name][int(row) - 1, int(col) - 1] / 255) < 2e-6, r


def test_a_parquet_submission(tmp_path):
    """submission.path ending in .parquet: the same table, as parquet (what kaggle_evaluation
    competitions take)."""
    import polars as pl

    from kaggle_tta.io.submission import write_submission

    table = pl.DataFrame({"id": ["a", "b"], "cancer": [0.25, 0.5]})
    write_submission(table, tmp_path / "submission.parquet")
    assert pl.read_parquet(tmp_path / "submission.parquet").equals(table)
    assert [p.name for p in tmp_path.iterdir()] == ["submission.parquet"]  # no temporary file left
