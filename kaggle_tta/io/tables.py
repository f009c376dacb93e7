"""Tables the pipeline names (the test set's CSV, labels, samples, groups): read with polars,
each problem one line naming the file and its YAML path."""

from __future__ import annotations

import io
import json
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


def csv_bytes(path: Path, key: str) -> bytes:
    """The CSV's bytes (a zip's one CSV: :func:`csv_source`)."""
    source = csv_source(path, key)
    return source.getvalue() if isinstance(source, io.BytesIO) else path.read_bytes()


def _csv_problem(path: Path, exc: Exception, key: str) -> str:
    try:
        data = csv_bytes(path, key)
    except OSError as err:
        return f"cannot read ({err.strerror or err})"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return f"not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save it as UTF-8"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"cannot read as CSV ({lines[0] if lines else type(exc).__name__})"


def read_listing(path: Path, key: str, json_key: str | None) -> pl.DataFrame:
    """``data.csv.path``: a CSV, or a JSON list of objects (or the list under ``json_key`` of a
    JSON object: COCO's ``images`` of ``id`` and ``file_name``, iNaturalist's test2019.json),
    every value as text."""
    if path.suffix.lower() != ".json":
        return read_csv_table(path, key, infer_schema=False)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{key}: {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc}) ({key})") from None
    if isinstance(data, dict):
        if json_key is None or json_key not in data:
            got = f"no key '{json_key}'" if json_key else "an object"
            raise DataError(
                f"{path}: {got} (keys: {sorted(data)[:8]}); set data.csv.key to the one holding the items, e.g. images"
            )
        data = data[json_key]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: the items are not a list of objects ({key}); give the list of the test items")
    columns = list(dict.fromkeys(k for r in data for k in r))
    return pl.DataFrame(
        {c: [None if r.get(c) is None else str(r[c]) for r in data] for c in columns},
        schema=dict.fromkeys(columns, pl.String),
    )
