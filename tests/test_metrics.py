"""Every registered metric equal to its public reference on random inputs (scikit-learn;
MAP@k as Kaggle's competitions compute it), to 1e-9 unless stated."""

from __future__ import annotations

import numpy as np
import pytest

from kaggle_tta.ops.metrics import METRICS, metric_named, names_for

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(params=range(5))
def single(request):
    rng = np.random.default_rng(request.param)
    n, c = int(rng.integers(20, 300)), int(rng.integers(2, 7))
    y = rng.integers(0, c, n)
    y[:c] = np.arange(c)  # every class present
    p = _softmax(rng.normal(size=(n, c)) * 2 + np.eye(c)[y] * rng.random())
    p[: n // 10] = p[n // 10 : 2 * (n // 10)]  # ties
    return y, p


def test_single_label_metrics_equal_scikit_learn(single):
    y, p = single
    c = p.shape[1]
    pred = p.argmax(axis=1)
    ref = {
        "accuracy": sklearn_metrics.accuracy_score(y, pred),
        "logloss": sklearn_metrics.log_loss(y, p, labels=list(range(c))),
        "macro_f1": sklearn_metrics.f1_score(y, pred, average="macro", labels=list(range(c)), zero_division=0),
        "qwk": sklearn_metrics.cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(c))),
        "auc": sklearn_metrics.roc_auc_score(y, p[:, 1])
        if c == 2
        else sklearn_metrics.roc_auc_score(y, p, multi_class="ovr", average="macro"),
    }
    for name, want in ref.items():
        got = metric_named(name).fn(y, p, 0.5)
        assert abs(got - want) < 1e-9, (name, got, want)


def test_map_at_k_equals_the_competitions_formula(single):
    y, p = single
    for k in (3, 5):
        want = 0.0
        for yi, row in zip(y, p):
            top = list(np.argsort(-row, kind="stable")[:k])
            want += 1.0 / (top.index(yi) + 1) if yi in top else 0.0
        assert abs(metric_named(f"map@{k}").fn(y, p, 0.5) - want / len(y)) < 1e-12


def test_multilabel_metrics_equal_scikit_learn():
    rng = np.random.default_rng(7)
    for _ in range(5):
        n, c = int(rng.integers(30, 200)), int(rng.integers(2, 9))
        y = (rng.random((n, c)) < 0.3).astype(int)
        y[0], y[1] = 1, 0  # every class has both kinds of label
        p = np.clip(y * 0.3 + rng.random((n, c)) * 0.7, 0, 1)
        t = rng.random(c) * 0.5 + 0.25
        hit = (p >= t).astype(int)
        ref = {
            "f1": sklearn_metrics.f1_score(y, hit, average="micro", zero_division=0),
            "macro_f1": sklearn_metrics.f1_score(y, hit, average="macro", zero_division=0),
            "f2": sklearn_metrics.fbeta_score(y, hit, beta=2, average="samples", zero_division=0),
            "auc": sklearn_metrics.roc_auc_score(y, p, average="macro"),
            "logloss": np.mean([sklearn_metrics.log_loss(y[:, k], p[:, k], labels=[0, 1]) for k in range(c)]),
        }
        for name, want in ref.items():
            got = metric_named(name).fn(y, p, t)
            assert abs(got - want) < 1e-9, (name, got, want)


def test_regression_metrics_equal_scikit_learn():
    rng = np.random.default_rng(3)
    y, p = rng.normal(size=(80, 2)) * 20 + 50, rng.normal(size=(80, 2)) * 20 + 50
    assert abs(metric_named("rmse").fn(y, p, 0.5) - np.sqrt(sklearn_metrics.mean_squared_error(y, p))) < 1e-9
    assert abs(metric_named("mae").fn(y, p, 0.5) - sklearn_metrics.mean_absolute_error(y, p)) < 1e-9


def test_every_metric_has_a_direction_and_a_kind():
    assert names_for("regression") == ["mae", "rmse"]
    for name, m in METRICS.items():
        assert m.kinds and set(m.kinds) <= {"single", "multilabel", "regression"}, name
        assert m.higher_is_better == (name not in {"logloss", "log_loss", "nll", "rmse", "mae"}), name


def test_macro_thresholds_raise_macro_f1_out_of_sample():
    """Classes whose probabilities live on different scales: one threshold per class chosen
    for macro F1 on half the rows beats 0.5 and the micro-F1 thresholds on the other half."""
    from kaggle_tta.tuning.thresholds import tune_thresholds

    rng = np.random.default_rng(11)
    n, c = 2000, 4
    y = (rng.random((n, c)) < [0.05, 0.2, 0.4, 0.6]).astype(int)
    scale = np.array([0.3, 0.5, 0.9, 1.0])
    p = np.clip((0.35 * y + 0.65 * rng.random((n, c))) * scale, 0, 1)
    train, test = np.arange(n) < n // 2, np.arange(n) >= n // 2
    macro = metric_named("macro_f1")
    t_macro = tune_thresholds(p[train], y[train], macro=True)
    t_micro = tune_thresholds(p[train], y[train])
    held = {name: macro.fn(y[test], p[test], t) for name, t in (("0.5", 0.5), ("micro", t_micro), ("macro", t_macro))}
    assert held["macro"] > held["0.5"] + 0.05 and held["macro"] >= held["micro"] - 1e-9, held


def test_the_report_scores_the_pipelines_metric(tmp_path, monkeypatch, capsys):
    """metric: qwk in pipeline.yaml: the table's column is QWK, each node's value equal to
    scikit-learn's on the probabilities the run wrote."""
    import csv
    from pathlib import Path

    import cv2
    import yaml

    from kaggle_tta.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    rng = np.random.default_rng(4)
    (tmp_path / "test").mkdir()
    labels = {}
    for k in range(24):
        img = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
        cv2.imwrite(str(tmp_path / "test" / f"i{k:02d}.png"), img)
        labels[f"i{k:02d}"] = "abc"[int(rng.integers(0, 3))]
    (tmp_path / "labels.csv").write_text("id,label\n" + "".join(f"{i},{v}\n" for i, v in labels.items()))
    cfg = {
        "data": {
            "folder": str(tmp_path / "test"),
            "classes": ["a", "b", "c"],
            "labels": {"path": str(tmp_path / "labels.csv")},
        },
        "metric": "qwk",
        "runtime": {"device": "cpu", "precision": "fp32", "workers": 0},
        "cache": {"dir": str(tmp_path / "cache")},
        "members": [
            {
                "name": "m",
                "factory": "helpers:channel_means",
                "kwargs": {"num_classes": 3},
                "preprocess": {"input_size": [3, 16, 16]},
                "tta": "flips",
            }
        ],
        "submission": {"path": str(tmp_path / "sub.csv"), "format": "probs"},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| node"))
    assert "QWK (TTA)" in header
    with open(tmp_path / "sub.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array(["abc".index(labels[r["id"]]) for r in rows])
    pred = np.array([[float(r[c]) for c in "abc"] for r in rows]).argmax(axis=1)
    want = sklearn_metrics.cohen_kappa_score(y, pred, weights="quadratic", labels=[0, 1, 2])
    row = next(line for line in out.splitlines() if line.startswith("| m "))
    cells = [c.strip() for c in row.split("|")]
    assert abs(float(cells[header.split("|").index(" QWK (TTA) ")].rstrip("%")) / 100 - want) < 1e-4, (row, want)
    cfg["metric"] = "rmse"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "p.yaml"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metric: 'rmse' does not score single-label" in err[0]
