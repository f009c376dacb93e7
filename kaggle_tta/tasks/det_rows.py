"""Detection's rows: each image's PredictionString (kaggle_tta.ops.boxes), a pseudo-box row
from another model's verdict (``submission.pseudo_box``), and what an image with neither
writes (``submission.empty_prediction``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from kaggle_tta.config import PipelineConfig
from kaggle_tta.config.errors import ConfigError, DataError
from kaggle_tta.io.tables import read_csv_table
from kaggle_tta.ops.boxes import prediction_string

Boxes = tuple[np.ndarray, np.ndarray, np.ndarray]  # pixel xyxy [n, 4], scores [n], labels [n]


def submission_table(
    cfg: PipelineConfig, ids: Sequence[str], boxes: list[Boxes], sizes: np.ndarray, classes: Sequence[str]
) -> pl.DataFrame:
    spec = cfg.submission
    strings = [
        prediction_string(b, s, lab, tuple(sz), spec.template, classes)
        for (b, s, lab), sz in zip(boxes, sizes.tolist())
    ]
    if spec.pseudo_box is not None:
        strings = with_pseudo_boxes(cfg, ids, strings)
    strings = [x if x else spec.empty_prediction for x in strings]
    return pl.DataFrame(
        {spec.id_column: list(ids), spec.prediction_column: strings},
        schema={spec.id_column: pl.String, spec.prediction_column: pl.String},
    )


def pseudo_probabilities(cfg: PipelineConfig, ids: Sequence[str]) -> list[float]:
    """``submission.pseudo_box``: each test image's probability from the other model's CSV
    (checked before the first forward: the file, its columns, every image there, values in [0, 1])."""
    spec = cfg.submission.pseudo_box
    assert spec is not None
    path = cfg.resolve(spec.csv)
    df = read_csv_table(path, "submission.pseudo_box.csv", infer_schema=False)
    for col, key in ((spec.id_column, "id_column"), (spec.column, "column")):
        if col not in df.columns:
            raise ConfigError(f"submission.pseudo_box.{key}: {path} has no column '{col}' (columns: {df.columns})")
    try:
        table = {str(i): float(p) for i, p in zip(df[spec.id_column].to_list(), df[spec.column].to_list())}
    except (TypeError, ValueError):
        raise DataError(f"{path}: column '{spec.column}' holds a value that is no number; fix the file") from None
    missing = [i for i in ids if i not in table]
    if missing:
        raise DataError(
            f"submission.pseudo_box: {len(missing)} of {len(ids)} test images have no row in {path} "
            f"({', '.join(repr(m) for m in missing[:3])}); check submission.pseudo_box.id_column"
        )
    bad = [i for i in ids if not 0.0 <= table[i] <= 1.0]
    if bad:
        raise DataError(f"{path}: '{spec.column}' of image {bad[0]!r} is {table[bad[0]]}, not a probability")
    return [table[i] for i in ids]


def with_pseudo_boxes(cfg: PipelineConfig, ids: Sequence[str], strings: list[str]) -> list[str]:
    spec = cfg.submission.pseudo_box
    assert spec is not None
    out = []
    for s, p in zip(strings, pseudo_probabilities(cfg, ids)):
        row = spec.template.format(p=p)
        out.append(s if spec.when == "empty" and s else f"{s} {row}" if s else row)
    return out
