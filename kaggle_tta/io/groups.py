"""Rows per group of images (``submission.group``): RSNA breast cancer writes one
``prediction_id,cancer`` row per patient and side, the mean (or max) of that group's images.

The image-to-group table is a CSV (data.csv's by default); every test image must have a
group, checked before the first forward. Aggregation is polars' ``group_by`` with the order
of first appearance kept, so rows come out in a stable order (a sample, when given, then
fixes the order and the header).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import polars as pl

from kaggle_tta.config.errors import ConfigError, DataError

if TYPE_CHECKING:
    from kaggle_tta.config import PipelineConfig

GROUPED_FORMATS = ("probs", "values", "string", "label", "topk", "multilabel")
"""Formats whose rows aggregate: label, topk, multilabel and string from the group's
aggregated probabilities (classification's ``finish``)."""


def group_of(cfg: PipelineConfig, ids: Sequence[str]) -> list[str]:
    """Each test image's group, in the test set's order.

    Raises:
        ConfigError: no CSV to read groups from, or a column missing.
        DataError: images without a group (with counts and examples).
    """
    from kaggle_tta.io.tables import read_csv_table, read_listing

    spec = cfg.submission.group
    assert spec is not None
    if cfg.submission.format not in GROUPED_FORMATS:
        raise ConfigError(
            f"submission.group: rows of format '{cfg.submission.format}' cannot be aggregated; use format "
            f"{' or '.join(GROUPED_FORMATS)}"
        )
    if spec.pattern is not None:  # from the image ids themselves
        from kaggle_tta.io.ids import ids_by_rule

        return ids_by_rule(list(ids), spec.pattern, spec.template or "", "submission.group.pattern")
    source = spec.csv if spec.csv is not None else (cfg.data.csv.path if cfg.data.csv is not None else None)
    if source is None:
        raise ConfigError("submission.group.csv: give the CSV mapping each image id to its group")
    path = cfg.resolve(source)
    key = spec.key_column or (cfg.data.csv.id_column if cfg.data.csv is not None else "id")
    if spec.csv is None and cfg.data.csv is not None:  # data.csv's own listing, a JSON one included
        df = read_listing(path, "data.csv.path", cfg.data.csv.key)
    else:
        df = read_csv_table(path, "submission.group.csv", infer_schema=False)
    assert spec.column is not None
    for col, yaml_key in ((key, "key_column"), (spec.column, "column")):
        if col not in df.columns:
            raise ConfigError(f"submission.group.{yaml_key}: {path} has no column '{col}' (columns: {df.columns})")
    groups = dict(zip((str(v) for v in df[key].to_list()), (str(v) for v in df[spec.column].to_list())))
    missing = [i for i in ids if i not in groups]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataError(
            f"submission.group: {len(missing)} of {len(ids)} test images have no row in {path} ({shown}); "
            f"check submission.group.key_column ('{key}')"
        )
    return [groups[i] for i in ids]


def group_row_ids(groups: Sequence[str]) -> list[tuple[str, int]]:
    """The grouped rows' ids in the order written (first appearance), each with its first image."""
    first: dict[str, int] = {}
    for k, g in enumerate(groups):
        first.setdefault(g, k)
    return list(first.items())


def group_table(table: pl.DataFrame, groups: Sequence[str], aggregate: str) -> pl.DataFrame:
    """One row per group: the table's first column (the image ids) replaced by each image's
    group, every other column aggregated."""
    id_column = table.columns[0]
    keyed = table.with_columns(pl.Series(id_column, list(groups), dtype=pl.String))
    values = [c for c in table.columns[1:]]
    agg = {"mean": pl.mean, "max": pl.max, "min": pl.min}[aggregate]
    return keyed.group_by(id_column, maintain_order=True).agg([agg(c) for c in values])
