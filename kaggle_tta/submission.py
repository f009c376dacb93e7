"""Writing submission.csv with polars, atomically (a killed run leaves no partial file).

What goes in the table is the task's: each task registers its formats' writers
(``Task.writers``); this module only puts a finished table on disk.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import polars as pl

from kaggle_tta.errors import ConfigError


def write_submission(df: pl.DataFrame, path: Path, key: str = "submission.path") -> None:
    """Writes ``df`` to ``path`` through a temporary file beside it, then renames it.

    Raises:
        ConfigError: ``path`` is a folder or cannot be written there; the message names
            ``key`` (the YAML path that set it). No temporary file is left behind.
    """
    with _writing(path, key) as tmp:
        df.write_csv(tmp, float_precision=6)
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
