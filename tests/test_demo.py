"""The embedded demo pipeline (what `make infer` runs), on a fresh folder."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from kaggle_tta.cli import main

ROOT = Path(__file__).parents[1]


def test_repo_pipeline_runs_and_tta_helps(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "test")]) == 0
    sets = [
        f"data.folder={tmp_path / 'test'}",
        f"data.labels.path={tmp_path / 'test' / 'labels.csv'}",
        f"cache.dir={tmp_path / 'cache'}",
        f"submission.path={tmp_path / 'submission.csv'}",
    ]
    argv = ["run", str(ROOT / "pipeline.yaml"), "-q"] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    sub = pl.read_csv(tmp_path / "submission.csv")
    assert sub.height == 240 and sub.columns == ["id", "label"]
    labels = pl.read_csv(tmp_path / "test" / "labels.csv")
    acc = (sub["label"] == labels["label"]).mean()
    assert acc >= 0.9, out
    rows = {line.split("|")[1].strip().rstrip(" ◀"): line for line in out.splitlines() if line.startswith("| ") and "%" in line}
    for node in ("resnet", "effnet", "final"):
        cells = [c.strip() for c in rows[node].split("|")]
        plain, tta = float(cells[4].rstrip("%")), float(cells[5].rstrip("%"))
        assert tta >= plain, rows[node]  # D4 is the data's symmetry: TTA must not hurt here
    assert main(argv) == 0
    assert "no model was run" in capsys.readouterr().out
