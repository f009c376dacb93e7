"""Writing submission.csv with polars, atomically (a killed run leaves no partial file).

What goes in the table is the task's: each task registers its formats' writers
(``Task.writers``); this module only puts a finished table on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl


def write_submission(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.write_csv(tmp, float_precision=6)
    os.replace(tmp, path)
