"""The serving mode (kaggle_tta.kernel.serving) under a stand-in of kaggle_evaluation's gateway
(tests/evaluation_standin.py, written from the documented protocol): the predictions it
answers equal ``kaggle-tta run``'s on the same images, and the server starts within the
start-up window."""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest
from evaluation_standin import Failure, Gateway, GatewayError

import kaggle_tta
from kaggle_tta.kernel import serving
from kaggle_tta.kernel.serving import predictor


def _cfg(pipeline, tmp_path) -> dict:
    write, cfg = pipeline
    cfg["data"].pop("labels")
    cfg["submission"] = {"path": str(tmp_path / "run.csv"), "format": "probs"}
    return cfg


def test_a_gateway_gets_what_kaggle_tta_run_writes(pipeline, demo_images, tmp_path, monkeypatch):
    """24 images in batches of 1, 5 and 18 (shuffled, as gateways do), handed as a path, a
    list of paths and a polars frame of paths: the gateway's submission.parquet holds, per row id, what
    ``kaggle-tta run`` wrote for that image (every class's probability, to 1e-6: the chunks
    are cut differently), and the server started within the window after the predictor had
    built both members and taken its decisions on the pipeline's own first images."""
    monkeypatch.setenv("KAGGLE_TTA_SCRATCH", str(tmp_path / "scratch"))
    write, _ = pipeline
    path = write(_cfg(pipeline, tmp_path))
    expected = kaggle_tta.run(path, progress=False).blend.table
    images = sorted(demo_images.glob("*.png"))
    rng = np.random.default_rng(0)
    order = [images[i] for i in rng.permutation(len(images))]
    cuts = [order[:1], order[1:6], order[6:]]

    def args(k, batch):
        paths = [str(p) for p in batch]
        return [(paths[0],), (paths,), (pl.DataFrame({"image_path": paths}),)][k]

    started = time.monotonic()
    predict = predictor(path)
    gateway = Gateway(
        [(args(k, b), [p.stem for p in b]) for k, b in enumerate(cuts)], "id", tmp_path, started, startup_limit_s=120.0
    )
    got = pl.read_parquet(gateway.run(predict))
    assert got.columns == expected.columns and got.height == 24
    joined = got.join(expected, on="id", suffix="_run")
    for c in expected.columns[1:]:
        np.testing.assert_allclose(joined[c].to_numpy(), joined[f"{c}_run"].to_numpy(), atol=1e-6, err_msg=c)
    assert not list((tmp_path / "scratch").glob("batch-*")), "each batch's scratch cache is removed"


def test_the_server_must_start_within_the_window(pipeline, tmp_path, monkeypatch):
    """A notebook that is not serving within the start-up window fails as Kaggle's does."""
    monkeypatch.setenv("KAGGLE_TTA_SCRATCH", str(tmp_path / "scratch"))
    write, _ = pipeline
    predict = predictor(write(_cfg(pipeline, tmp_path)), warmup=False)
    late = Gateway([], "id", tmp_path, time.monotonic() - 10.0, startup_limit_s=5.0)
    with pytest.raises(GatewayError) as err:
        late.run(predict)
    assert err.value.kind is Failure.SERVER_NEVER_STARTED


def test_a_path_that_is_no_file_is_one_line(pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_TTA_SCRATCH", str(tmp_path / "scratch"))
    write, _ = pipeline
    predict = predictor(write(_cfg(pipeline, tmp_path)), warmup=False)
    with pytest.raises(kaggle_tta.config.errors.DataError, match=r"serving: .*nope.png: no such file"):
        predict([str(tmp_path / "nope.png")])
    assert serving.WARMUP_ITEMS > 0


def test_what_predict_takes_as_a_batch():
    """A path, a list of paths, a polars or a pandas frame (its first text column; pandas read
    as it is, without pyarrow): the item paths, in order."""
    import pandas as pd

    from kaggle_tta.kernel.serving import _paths

    assert _paths(("a.png",)) == ["a.png"] and _paths((["a.png", "b.png"],)) == ["a.png", "b.png"]
    assert _paths((pl.DataFrame({"n": [1, 2], "p": ["b.png", "a.png"]}),)) == ["b.png", "a.png"]
    assert _paths((pd.DataFrame({"n": [1, 2], "p": ["b.png", "a.png"]}),)) == ["b.png", "a.png"]
    with pytest.raises(kaggle_tta.config.errors.DataError, match="no text column of paths"):
        _paths((pl.DataFrame({"n": [1]}),))
