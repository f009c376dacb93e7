"""Adding a task touches one file: a toy regression task, defined and registered here and
nowhere else, runs end to end through the CLI and the Python API."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
import yaml

import kaggle_tta
from kaggle_tta.cli import main
from kaggle_tta.config.errors import ConfigError
from kaggle_tta.exec.dag import blocks, node_predictions
from kaggle_tta.io.canvas import CanvasSpec
from kaggle_tta.tasks import Task, TaskOutput, register_task

# ---- the task: everything below up to the tests is all a new task needs --------------------


def write_values(ids, values: np.ndarray, spec) -> pl.DataFrame:
    return pl.DataFrame({spec.id_column: list(ids), "value": values.astype(np.float64)})


def load_truth(cfg, ids) -> np.ndarray | None:
    """data.labels: a CSV of id,label where the label is the float to regress."""
    if cfg.data.labels is None:
        return None
    spec = cfg.data.labels
    df = pl.read_csv(
        cfg.resolve(spec.path), schema_overrides={spec.id_column: pl.String, spec.label_column: pl.Float64}
    )
    table = dict(zip(df[spec.id_column], df[spec.label_column]))
    return np.array([table[i] for i in ids], dtype=np.float64)


@register_task
class Brightness(Task):
    name = "brightness"
    target = "label"  # views must leave the value unchanged
    merges = ("mean",)
    blends = ("mean",)
    writers = {"csv": write_values}
    truth = "labels"

    def canvas(self, cfg, pre):  # the whole image resized: one [B, H, W, 3] canvas, no crops
        return CanvasSpec(pre.size, 1.0, pre.interpolation)  # a plain resize to the input size

    def activation(self, cfg, m, n_classes):
        return "none"  # a value, not logits

    def open_views(self, work, plan):
        for v in work.views:
            work.open_dense(v.name, (len(plan.testset), 1), plan.cfg.cache.dtype)

    def step(self, work, batch, plan):
        from kaggle_tta.exec.forward import Piece, ViewLog, normalize, run_chunks

        pre = work.member.preprocess
        x = normalize(batch.canvases[work.member.canvas.key], pre.mean, pre.std, work.runner.device)
        todo = work.todo(batch.lo, batch.hi)
        first_of = {v.name: first for v, first in todo}
        pieces = [
            Piece(v.name, batch.hi - first, lambda a, b, v=v, rows=x[first - batch.lo :]: v.apply(rows[a:b]))
            for v, first in todo
        ]

        def consume(out, slots):
            res = out.reshape(-1, 1).cpu().numpy()
            for view, a, count, at in slots:
                work.store[view][first_of[view] + a : first_of[view] + a + count] = res[at : at + count]

        log = ViewLog()
        run_chunks(work.runner, pieces, consume, log)
        work.record(batch.lo, batch.hi, batch.sizes, log)

    def blend(self, plan, sources, sizes, plain):
        cfg, ids = plan.cfg, plan.testset.ids
        truth = load_truth(cfg, ids)
        values, sse, sse_plain = [], {}, {}
        for lo, hi in blocks(len(ids), 1024):
            nodes = node_predictions(cfg, sources, lo, hi)  # each member with its activation
            values.append(nodes[cfg.submission_source].values[:, 0])
            runs = [(sse, nodes)] + (
                [(sse_plain, node_predictions(cfg, sources, lo, hi, views=["identity"]))] if plain else []
            )
            for acc, preds in runs if truth is not None else []:
                for name, p in preds.items():
                    acc[name] = acc.get(name, 0.0) + float(((p.values[:, 0] - truth[lo:hi]) ** 2).sum())

        def rmse(acc: dict) -> dict:
            return {k: {"RMSE": float(np.sqrt(v / len(ids)))} for k, v in acc.items()}

        table = self.writers[cfg.submission.format](ids, np.concatenate(values), cfg.submission)
        return TaskOutput(table, ["RMSE"], rmse(sse), rmse(sse_plain))


# ---- the tests ---------------------------------------------------------------------------


N, H, W = 7, 24, 32  # images of the model's own input size: the canvas is the image


@pytest.fixture
def toy(tmp_path) -> tuple[dict, dict[str, float], dict[str, float]]:
    """(pipeline dict, true brightness by id, label by id): images of varied brightness."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(5)
    brightness, labels = {}, {}
    for k in range(N):
        img = np.clip(rng.normal(30 + 30 * k, 25, (H, W, 3)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"im{k}.png"), img)
        brightness[f"im{k}"] = float(cv2.imread(str(folder / f"im{k}.png")).astype(np.float64).mean() / 255.0)
        labels[f"im{k}"] = brightness[f"im{k}"] + float(rng.normal(0, 0.05))
    pl.DataFrame({"id": list(labels), "label": list(labels.values())}).write_csv(tmp_path / "labels.csv")
    cfg = {
        "task": "brightness",
        "data": {"folder": str(folder), "classes": ["brightness"], "labels": {"path": str(tmp_path / "labels.csv")}},
        "runtime": {"device": "cpu", "precision": "fp32", "forward_batch": 4, "batch_size": 3, "workers": 0},
        "cache": {"dir": str(tmp_path / "cache")},
        "members": [
            {
                "name": "mean_px",
                "factory": "helpers:mean_brightness",
                "preprocess": {"input_size": [3, H, W], "mean": [0, 0, 0], "std": [1, 1, 1]},
                "tta": ["identity", "hflip"],
            }
        ],
        "submission": {"path": str(tmp_path / "values.csv")},
    }
    return cfg, brightness, labels


def _rmse(pred: dict[str, float], labels: dict[str, float]) -> float:
    return float(np.sqrt(np.mean([(pred[i] - labels[i]) ** 2 for i in labels])))


def test_a_task_of_ones_own_runs_through_the_cli_and_the_api(toy, tmp_path, capsys):
    cfg, brightness, labels = toy
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "-q"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'values.csv'} ({N} rows) from 'mean_px'"
    sub = pl.read_csv(tmp_path / "values.csv", schema_overrides={"id": pl.String})
    assert sub.columns == ["id", "value"] and sub["id"].to_list() == [f"im{k}" for k in range(N)]
    got = dict(sub.iter_rows())
    for i, b in brightness.items():  # the model's value, computed from the PNGs with numpy
        assert got[i] == pytest.approx(b, abs=1e-5)  # float32 sums, 6 decimals in the CSV
    # The same pipeline as a dict, in this process: the cache the CLI filled is reused.
    result = kaggle_tta.run(cfg, progress=False)
    assert result.stats.all_cached and result.stats.members["mean_px"].views_cached == ["identity", "hflip"]
    res = result.blend
    assert res.metrics == ["RMSE"] and res.n_rows == N and res.source == "mean_px"
    row = res.row("mean_px")
    assert (row.kind, row.views) == ("member", 2)
    assert row.scores_tta["RMSE"] == pytest.approx(_rmse(brightness, labels), abs=1e-5)
    assert row.scores_plain["RMSE"] == pytest.approx(row.scores_tta["RMSE"], abs=1e-6)  # hflip changes no mean
    np.testing.assert_allclose(res.table["value"].to_numpy(), [brightness[i] for i in res.table["id"]], atol=1e-5)
    # every cached view is the model's value too
    (d,) = (tmp_path / "cache" / "mean_px").glob("[!.]*")
    for v in ("identity", "hflip"):
        np.testing.assert_allclose(np.load(d / f"{v}.npy")[:, 0], [brightness[f"im{k}"] for k in range(N)], atol=1e-5)


def test_a_fresh_cache_is_computed_then_reused(toy, tmp_path):
    cfg, brightness, _ = toy
    first = kaggle_tta.run(cfg, progress=False)
    assert first.stats.members["mean_px"].views_computed == ["identity", "hflip"] and first.stats.rows_computed == N
    second = kaggle_tta.run(cfg, progress=False)
    assert second.stats.all_cached and second.stats.rows_computed == 0
    assert second.blend.table.equals(first.blend.table)
    # a blend with the task's own method; another method is refused when the plan is built
    cfg["members"].append({**cfg["members"][0], "name": "again", "tta": ["identity"]})
    cfg["blends"] = [{"name": "both", "inputs": ["mean_px", "again"]}]
    res = kaggle_tta.run(cfg, progress=False).blend
    assert [r.node for r in res.rows] == ["mean_px", "again", "both"] and res.row("both").views == 3
    np.testing.assert_allclose(res.table["value"].to_numpy(), [brightness[i] for i in res.table["id"]], atol=1e-5)
    with pytest.raises(ConfigError, match=r"blends\[0\]\.method: 'rank_mean' is not a brightness blend"):
        kaggle_tta.build_plan(kaggle_tta.load_pipeline(cfg, ["blends.0.method=rank_mean"]))


def test_an_unknown_task_name_suggests_the_registered_one(toy, tmp_path, capsys):
    cfg, _, _ = toy
    with pytest.raises(ConfigError, match=r"task: unknown task 'brightnes' — did you mean 'brightness'\?"):
        kaggle_tta.build_plan(kaggle_tta.load_pipeline({**cfg, "task": "brightnes"}))
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({**cfg, "task": "brightnes"}))
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "did you mean 'brightness'?" in err
        and "brightness" in err.split("registered tasks:")[-1]
    )


# ---- the package's shape: what keeps a new task to one file -------------------------------

PACKAGE = Path(kaggle_tta.__file__).parent
TASK_NAMES = {"classification", "segmentation", "detection"}
# The modules that orchestrate (the config is a package of several modules).
ASK_THE_TASK = ["plan.py", "engine.py", "api.py", "cli.py", "forward.py", "dag.py", "config.py", "config/*.py"]


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__)."""
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def test_no_orchestrating_module_compares_a_task_name():
    """Nothing outside tasks/ compares a task's name: it asks the task (DESIGN.md, Rooms)."""
    import ast

    files = sorted({f for pattern in ASK_THE_TASK for f in PACKAGE.glob(pattern)})
    assert len(files) >= 7
    hits = []

    def names_a_task(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in TASK_NAMES
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(names_a_task(e) for e in node.elts)

    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and any(names_a_task(x) for x in [node.left, *node.comparators]):
                hits.append(f"{f.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.match_case) and any(
                names_a_task(p.value) for p in ast.walk(node.pattern) if isinstance(p, ast.MatchValue)
            ):
                hits.append(f"{f.relative_to(PACKAGE.parent)}:{node.pattern.lineno}: case {ast.unparse(node.pattern)}")
    assert not hits, "compare a task's name; ask plan.task instead:\n" + "\n".join(hits)
