"""Ids made from listed paths (``data.id``: a pattern's named groups into a template), and
paths made from a CSV's rows (``data.csv.path_template``)."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from kaggle_tta.config.errors import ConfigError, DataError, template_fields


def ids_by_rule(listed: list[str], pattern: str, template: str, where: str) -> list[str]:
    """Each listed id through ``data.id``: the pattern's named groups into the template."""

    rx = re.compile(pattern)
    out = []
    for name in listed:
        m = rx.search(name)
        if m is None:
            key = "submission.group.pattern" if where.startswith("submission.group") else "data.id.pattern"
            raise DataError(f"{where}: '{name}' does not match {key} {pattern!r}; fix the pattern")
        out.append(template.format(**m.groupdict()))
    return out


def templated_paths(df: pl.DataFrame, ids: list[str], template: str, path: Path) -> list[str]:
    """data.csv.path_template filled from each row: ``{id}`` and the row's other columns."""
    columns = [f for f in template_fields(template) if f != "id"]
    absent = [f for f in columns if f not in df.columns]
    if absent:
        raise ConfigError(f"data.csv.path_template: {path} has no column {absent[0]!r} (columns: {df.columns})")
    values = {f: ["" if v is None else str(v) for v in df[f].to_list()] for f in columns}
    return [template.format(id=i, **{f: values[f][k] for f in columns}) for k, i in enumerate(ids)]
