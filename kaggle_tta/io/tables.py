"""Tables the pipeline names (the test set's CSV, labels, samples, groups): read with polars,
each problem one line naming the file and its YAML path."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import polars as pl

from kaggle_tta.config.errors import DataError


def read_csv_table(path: Path, key: str, **read_options: Any) -> pl.DataFrame:
    """A CSV file as a DataFrame; anything that makes it unreadable is one DataError line
    naming the file (and, for text that is not UTF-8, the line of the first bad byte).

    ``key`` is the YAML path that names the file (``data.labels.path``).
    """
    if not path.is_file():
        raise DataError(f"{key}: {path} does not exist" if not path.exists() else f"{key}: {path} is not a file")
    try:
        return pl.read_csv(csv_source(path, key), **read_options)
    except DataError:
        raise
    except Exception as exc:  # polars raises several types for a malformed file
        reason = _csv_problem(path, exc, key)
    raise DataError(f"{path}: {reason} ({key})")


def csv_source(path: Path, key: str) -> Path | io.BytesIO:
    """The CSV itself, or the one CSV of a zip archive (mle-bench ships some samples as
    ``sample_submission.csv.zip``), read in memory."""
    if not zipfile.is_zipfile(path):
        return path
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.lower().endswith(".csv") and not n.startswith("__MACOSX/")]
            if len(names) != 1:
                raise DataError(
                    f"{key}: {path} is a zip archive holding {len(names)} CSV files {names[:3]}; give the CSV itself"
                )
            return io.BytesIO(z.read(names[0]))
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{key}: {path} is not a readable zip archive ({exc}); re-download it") from None


def _csv_problem(path: Path, exc: Exception, key: str) -> str:
    try:
        source = csv_source(path, key)
        data = source.getvalue() if isinstance(source, io.BytesIO) else path.read_bytes()
    except OSError as err:
        return f"cannot read ({err.strerror or err})"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return f"not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save it as UTF-8"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"cannot read as CSV ({lines[0] if lines else type(exc).__name__})"
