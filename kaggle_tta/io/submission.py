"""Writing submission.csv with polars, atomically (a killed run leaves no partial file), and
aligning it with a competition's sample_submission.csv.

What goes in the table is the task's: each task registers its formats' writers
(``Task.writers``); this module puts a finished table on disk, in the sample's header, ids
and order when ``submission.sample`` is given.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from kaggle_tta.config.errors import ConfigError
from kaggle_tta.io.zips import ZIP_SEP

KEY_SEP = "\x1f"  # a row keyed by two columns (id, class): the key as one string, split when written


@dataclass
class SampleOrder:
    """How the written table maps onto the sample: its header, its ids in its order, and
    for each sample row the index of the written row it takes."""

    path: Path
    header: list[str]
    ids: list[str]
    rows: list[int]
    id_column: str = ""  # the sample's id column (the first where empty), wherever it stands
    key_column: str | None = None  # a second key column (rle.class_column), matched with the id
    copied: dict[str, list[str]] = field(default_factory=dict)  # columns written as the sample has them
    dropped: list[str] = field(default_factory=list)  # the writer's columns the sample does not ask for


def _examples(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(repr(x) for x in items[:n]) + (", ..." if len(items) > n else "")


def _row_index(row_ids: Sequence[tuple[str, int]], files: Sequence[str]) -> dict[str, int]:
    """Each id a sample may name -> the row it names: the row ids, then the file names (and
    ids with the file's suffix) of the rows whose id is their image's."""
    index: dict[str, int] = {}
    for n, (rid, _) in enumerate(row_ids):
        index.setdefault(rid, n)
    for n, (rid, k) in enumerate(row_ids):  # a file name stands for its image's row
        if k < 0:  # an appended row: its id only
            continue
        name = Path(str(files[k]).rpartition(ZIP_SEP)[2]).name  # an archive's member: its own name
        if Path(name).stem == rid or rid.endswith("/" + Path(name).stem):
            index.setdefault(name, n)
            index.setdefault(rid + Path(name).suffix, n)
    return index


def match_sample(
    path: Path,
    id_column: str,
    row_ids: Sequence[tuple[str, int]],
    files: Sequence[str],
    header: Sequence[str] | None,
    key_column: str | None = None,
) -> SampleOrder:
    """Matches the sample's ids with the rows the writer will write.

    A sample id matches a row id, or, for a row whose id is its image's id, that image's
    file name (``img_00000.png`` for the id ``img_00000``) or the id with the file's suffix.
    ``files`` are the test images' paths by index. The sample's id column is ``id_column``
    where the sample has it, else its first column.

    A sample that repeats an id (HMS: one row per EEG window, the id the recording's) gets
    that id's row at each of its places.

    Raises:
        ConfigError: ids missing or extra (with counts and examples), two sample ids for one
            row, or a header of another width than the writer's, naming ``submission.sample``.
    """
    from kaggle_tta.io.tables import read_csv_table

    df = read_csv_table(path, "submission.sample", infer_schema=False)
    df.columns = _raw_header(path, df.columns)  # an empty name stays empty (polars says column_0)
    where = f"submission.sample ({path})"
    if df.width < 1 or df.height < 1:
        raise ConfigError(f"{where}: the sample has no rows; give the competition's sample_submission.csv")
    id_col = id_column if id_column in df.columns else df.columns[0]
    if id_col != id_column:  # the sample's first column stands in: say so in any refusal
        where += f" (no column '{id_column}': its ids taken from '{id_col}'; set submission.id_column)"
    sample_ids = _sample_keys(df, id_col, key_column, where)
    index = _row_index(row_ids, files)
    named: dict[int, str] = {}  # row -> the sample id naming it (an id may repeat: HMS' eeg_id)
    rows, missing = [], []
    for sid in sample_ids:
        if sid not in index:
            missing.append(sid)
            continue
        n = index[sid]
        if named.setdefault(n, sid) != sid:
            raise ConfigError(
                f"{where}: two sample ids ('{named[n]}', '{sid}') name the same test image; each image must "
                "appear under one id"
            )
        rows.append(n)
    extra = sorted(set(range(len(row_ids))) - set(rows))
    if missing or extra:
        raise _mismatch(where, missing, extra, sample_ids, row_ids)
    copied = _copied(df, id_col, header)
    dropped = _dropped(df, id_col, header)
    if header is not None and (copied is None or len(header) - len(dropped) != df.width - len(copied)):
        raise ConfigError(
            f"{where}: the sample has {df.width} columns {df.columns}, the submission {len(header)} "
            f"{list(header)}; set submission.format or its column names to match"
        )
    return SampleOrder(path, list(df.columns), sample_ids, rows, id_col, key_column, copied or {}, dropped)


def _dropped(df: pl.DataFrame, id_col: str, header: Sequence[str] | None) -> list[str]:
    """The writer's columns a sample asking for fewer, all named as the writer's, leaves out
    (mle-bench's RANZCR scores 9 of the 11 classes a model of the competition predicts)."""
    if header is None or df.width >= len(header):
        return []
    theirs = {c for c in df.columns if c != id_col}
    return [c for c in header[1:] if c not in theirs] if theirs and theirs < set(header[1:]) else []


def _mismatch(
    where: str, missing: list[str], extra: list[int], sample_ids: list[str], row_ids: Sequence[tuple[str, int]]
) -> ConfigError:
    """The refusal of a sample whose ids and the rows to write differ, with counts and examples."""
    parts = []
    if missing:
        missing = [m.replace(KEY_SEP, " ") for m in missing]
        parts.append(f"{len(missing)} of {len(sample_ids)} sample ids match no test image ({_examples(missing)})")
    if extra:
        parts.append(
            f"{len(extra)} of {len(row_ids)} rows to write are not in the sample "
            f"({_examples([row_ids[n][0].replace(KEY_SEP, ' ') for n in extra])})"
        )
    return ConfigError(
        f"{where}: {'; '.join(parts)}; the sample's ids must be the test ids or their file names (check "
        "data.* and the sample)"
    )


def _sample_keys(df: pl.DataFrame, id_col: str, key_column: str | None, where: str) -> list[str]:
    """The sample's row keys: its ids, or (id, class) joined by KEY_SEP."""
    ids = [str(v) for v in df[id_col].to_list()]
    if key_column is None:
        return ids
    if key_column not in df.columns:
        raise ConfigError(
            f"{where}: no column '{key_column}' (submission.rle.class_column); the sample has {df.columns}"
        )
    return [f"{i}{KEY_SEP}{c}" for i, c in zip(ids, (str(v) for v in df[key_column].to_list()))]


def _raw_header(path: Path, names: list[str]) -> list[str]:
    """The sample's header as written in the file (polars renames an empty name)."""
    import csv
    import io

    from kaggle_tta.io.tables import csv_bytes

    try:
        raw = next(csv.reader(io.StringIO(csv_bytes(path, "submission.sample").decode("utf-8-sig"), newline="")), [])
    except (OSError, UnicodeDecodeError):
        return names
    return raw if len(raw) == len(names) and len(set(raw)) == len(raw) else names


def _copied(df: pl.DataFrame, id_col: str, header: Sequence[str] | None) -> dict[str, list[str]] | None:
    """The sample's columns the writer does not make, written back as the sample has them: an
    unnamed index column (pandas' ``to_csv`` with its index), or columns the competition fills
    with constants (Contrails' ``height,width``) beside columns named as the writer's. None:
    too many columns to tell which."""
    if header is None or df.width <= len(header):
        return {}
    ours, others = list(header[1:]), [c for c in df.columns if c != id_col]
    unnamed = [c for c in others if c == "" or c.startswith("Unnamed:")]
    constant = [c for c in others if c not in ours and c not in unnamed and df[c].n_unique() == 1]
    extra = unnamed + constant if set(ours) <= set(others) else unnamed  # never a class the writer lacks
    if len(others) - len(extra) != len(ours):
        return None
    return {c: [str(v) if v is not None else "" for v in df[c].to_list()] for c in extra}


def align(table: pl.DataFrame, order: SampleOrder) -> pl.DataFrame:
    """The table in the sample's order, with its ids and header, its columns in the sample's
    order (the id column where the sample has it, not only first): columns of the same names
    are taken by name, others by position."""
    if table.width - len(order.dropped) != len(order.header) - len(order.copied):
        raise ConfigError(
            f"submission.sample ({order.path}): the sample has {len(order.header)} columns, the submission "
            f"{table.width} {table.columns}"
        )
    out = table[order.rows].drop(order.dropped)
    id_column = order.id_column or order.header[0]
    ours = out.columns[1:]  # the writer's id column is its first
    theirs = [h for h in order.header if h != id_column and h not in order.copied]
    source = dict(zip(theirs, theirs if set(ours) == set(theirs) else ours))
    table = pl.DataFrame(
        [
            pl.Series(f"c{k}", [i.split(KEY_SEP, 1)[0] for i in order.ids], dtype=pl.String)
            if h == id_column
            else pl.Series(f"c{k}", order.copied[h], dtype=pl.String)
            if h in order.copied
            else out[source[h]].alias(f"c{k}")
            for k, h in enumerate(order.header)
        ]
    )
    table.columns = list(order.header)  # as the sample has them, an empty name included
    return table


def write_submission(df: pl.DataFrame, path: Path, key: str = "submission.path", decimals: int = 6) -> None:
    """Writes ``df`` to ``path`` (CSV; parquet where the path ends in .parquet) through a
    temporary file beside it, then renames it.

    Raises:
        ConfigError: ``path`` is a folder or cannot be written there; the message names
            ``key`` (the YAML path that set it). No temporary file is left behind.
    """
    with _writing(path, key) as tmp:
        if path.suffix.lower() == ".parquet":  # competitions served through kaggle_evaluation take parquet
            df.write_parquet(tmp)
        else:
            df.write_csv(tmp, float_precision=decimals)
        os.replace(tmp, path)


def check_writable(path: Path, key: str = "submission.path") -> None:
    """Creates and removes the temporary file :func:`write_submission` would write, so that
    a run can refuse an unwritable submission path before its first forward."""
    with _writing(path, key) as tmp:
        tmp.touch()


@contextlib.contextmanager
def _writing(path: Path, key: str):  # noqa: ANN202
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is a folder; give a file path, e.g. {path / 'submission.csv'}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
    except OSError as exc:
        reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0].replace(str(tmp), str(path))
        raise ConfigError(f"{key}: cannot write {path} ({reason}); choose a writable location") from None
    finally:  # after os.replace it is gone; on any failure (or an interrupt) it must not stay
        with contextlib.suppress(OSError):
            tmp.unlink()


def formatted_ids(table: pl.DataFrame, id_format: str) -> pl.DataFrame:
    """The table's first column (its ids) through ``submission.id_format``."""
    if id_format == "{id}":
        return table
    column = table.columns[0]
    return table.with_columns(pl.Series(column, [id_format.format(id=i) for i in table[column].to_list()]))


LONG_FORMATS = ("probs", "values")
"""The formats ``submission.rows: class`` writes one row per class of."""


def long_rows(table: pl.DataFrame, id_format: str, value_column: str) -> pl.DataFrame:
    """``submission.rows: class``: each row of the wide table (its ids first, one column per
    class) as one row per class, in that order: the id ``id_format`` with ``{id}`` and
    ``{class}`` (the column's name), the value in ``value_column``."""
    column, classes = table.columns[0], table.columns[1:]
    ids = [id_format.format(id=i, **{"class": c}) for i in table[column].to_list() for c in classes]
    values = table.select(classes).to_numpy().reshape(-1) if classes else np.zeros(0)
    return pl.DataFrame([pl.Series(column, ids, dtype=pl.String), pl.Series(value_column, values)])


def appended_rows(paths: Sequence[Path], header: Sequence[str]) -> pl.DataFrame | None:
    """``submission.append``: the rows of other submissions, as text, each with ``header``.

    Raises:
        ConfigError: a file that cannot be read, or whose header differs, naming it.
    """
    from kaggle_tta.io.tables import read_csv_table

    parts = []
    for path in paths:
        df = read_csv_table(path, "submission.append", infer_schema=False)
        if list(df.columns) != list(header):
            raise ConfigError(
                f"submission.append ({path}): its header {df.columns} differs from this submission's {list(header)}; "
                "append submissions written with the same columns"
            )
        parts.append(df.with_columns(pl.all().cast(pl.String).fill_null("")))
    return pl.concat(parts) if parts else None


def with_appended(table: pl.DataFrame, extra: pl.DataFrame | None, decimals: int = 6) -> pl.DataFrame:
    """Our rows, as text (floats with ``decimals`` digits, as the CSV writer would), then
    ``extra``'s."""
    if extra is None:
        return table
    ours = table.with_columns(
        pl.Series(c, np.char.mod(f"%.{decimals}f", table[c].to_numpy()).tolist(), dtype=pl.String)
        if table[c].dtype.is_float()
        else table[c].cast(pl.String)
        for c in table.columns
    )
    ours.columns = list(extra.columns)
    return pl.concat([ours, extra])


def class_strings(table: pl.DataFrame, template: str, column: str, classes: Sequence[str]) -> pl.DataFrame:
    """Per-class probability columns -> one PredictionString per row: each class through
    ``template`` (fields ``label``, ``index``, ``conf``), joined by spaces (SIIM-COVID19's
    study rows: ``negative 0.71 0 0 1 1 typical 0.2 0 0 1 1 ...``)."""
    values = table.select(table.columns[1 : 1 + len(classes)]).to_numpy()
    strings = [
        " ".join(template.format(label=c, index=k, conf=float(v)) for k, (c, v) in enumerate(zip(classes, row)))
        for row in values
    ]
    return pl.DataFrame([table[table.columns[0]], pl.Series(column, strings, dtype=pl.String)])
