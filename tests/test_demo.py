"""The embedded demo pipeline (what `make infer` runs), on a fresh folder."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import kaggle_tta
from kaggle_tta.cli import main

ROOT = Path(__file__).parents[1]


def test_repo_pipeline_runs_and_tta_helps(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "test")]) == 0  # the default size: what the members were tuned on
    sets = [
        f"data.folder={tmp_path / 'test'}",
        f"data.labels.path={tmp_path / 'test' / 'labels.csv'}",
        f"cache.dir={tmp_path / 'cache'}",
        f"submission.path={tmp_path / 'submission.csv'}",
    ]
    result = kaggle_tta.run(ROOT / "pipeline.yaml", overrides=sets, progress=False)
    res = result.blend
    sub = pl.read_csv(tmp_path / "submission.csv")
    assert sub.height == 240 and sub.columns == ["id", "label"]
    assert res.n_rows == 240 and sub.equals(res.table)
    labels = pl.read_csv(tmp_path / "test" / "labels.csv")
    assert sub["id"].to_list() == labels["id"].to_list()
    acc = (sub["label"] == labels["label"]).mean()
    assert acc >= 0.9, res.report()
    assert res.source == "final" and res.metrics == ["accuracy"]
    assert res.row("final").scores_tta["accuracy"] == pytest.approx(acc)  # the reported score is the submission's
    for node in ("resnet", "effnet", "final"):
        r = res.row(node)
        assert r.scores_tta["accuracy"] >= r.scores_plain["accuracy"], (
            res.report()
        )  # D4 is the data's symmetry: TTA must not hurt here
    again = kaggle_tta.run(ROOT / "pipeline.yaml", overrides=sets, progress=False)
    assert again.stats.all_cached and again.stats.rows_computed == 0
    assert again.blend.table.equals(res.table)


NO_NETWORK = r"""
import sys

def guard(event, args):  # every socket a run would open, refused (and said) before it connects
    if event in ("socket.connect", "socket.getaddrinfo", "urllib.Request"):
        print("NETWORK", event, args[1:2] if event == "socket.connect" else args[:1], flush=True)
        raise OSError("no network in this test")

sys.addaudithook(guard)
from kaggle_tta.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_with_an_albumentations_member_reaches_no_network(pipeline, tmp_path):
    """A run makes no network call: albumentations asks PyPI for updates on import unless
    NO_ALBUMENTATIONS_UPDATE is set (kaggle_tta sets it); a Kaggle kernel is offline."""
    import os
    import subprocess
    import sys

    write, cfg = pipeline
    cfg["members"][0]["preprocess"]["backend"] = "albumentations"  # the reference document's OpenCV path
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    done = subprocess.run(
        [sys.executable, "-c", NO_NETWORK, "run", str(write(cfg)), "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NETWORK" not in done.stdout, done.stdout
    assert pl.read_csv(tmp_path / "submission.csv").height == 24
