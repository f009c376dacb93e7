"""Writing submission.csv with polars, atomically (a killed run leaves no partial file)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from kaggle_tta.config import SubmissionConfig
from kaggle_tta.errors import ConfigError


def build_table(ids: Sequence[str], probs: np.ndarray, classes: Sequence[str], spec: SubmissionConfig) -> pl.DataFrame:
    """The submission rows for one prediction ``[N, C]`` (probabilities or scores)."""
    names = np.asarray(classes, dtype=object)
    idc = pl.Series(spec.id_column, list(ids), dtype=pl.String)
    if spec.format == "label":
        return pl.DataFrame({spec.id_column: idc, spec.label_column: pl.Series(names[probs.argmax(axis=1)].tolist(), dtype=pl.String)})
    if spec.format == "probs":
        cols = spec.class_columns or list(classes)
        if len(cols) != len(classes):
            raise ConfigError(f"submission.class_columns: {len(cols)} names for {len(classes)} classes")
        return pl.DataFrame([idc, *(pl.Series(c, probs[:, k].astype(np.float64)) for k, c in enumerate(cols))])
    if spec.format == "topk":
        k = min(spec.k, len(classes))
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return pl.DataFrame([idc, pl.Series(spec.label_column, [" ".join(row) for row in names[top].tolist()], dtype=pl.String)])
    # multilabel: every class at or above the threshold, in class order
    hits = probs >= spec.threshold
    labels = [" ".join(names[row].tolist()) for row in hits]
    return pl.DataFrame([idc, pl.Series(spec.label_column, labels, dtype=pl.String)])


def write_submission(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.write_csv(tmp, float_precision=6)
    os.replace(tmp, path)
