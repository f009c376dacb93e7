"""A local stand-in for a ``kaggle_evaluation`` gateway and inference server, written from the
protocol as Kaggle documents it (not from its code):

- the notebook builds what it needs, then starts the server, which must happen within the
  start-up window measured from the notebook's start (900 s on Kaggle) or the run fails as
  "server never started";
- the gateway hands ``predict`` one batch at a time, each as positional arguments, on one
  worker thread of the server (not the notebook's main thread); the first call has no
  deadline, later ones ``response_timeout_s``;
- arguments and results cross a process boundary, so only what its serialisation allows
  crosses: str, bool, int, float, None, lists, tuples, dicts with str keys, numpy arrays of
  plain dtypes, polars frames (Arrow IPC), pandas frames (parquet, index dropped); a result
  must be one value (int, float, str, bool) or a polars/pandas DataFrame or Series with one
  row per row id and no nulls;
- the gateway concatenates the results, puts its row-id column first and writes
  ``submission.parquet``.
"""

from __future__ import annotations

import concurrent.futures
import enum
import io
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

STARTUP_LIMIT_S = 900.0


class Failure(enum.Enum):
    SERVER_NEVER_STARTED = 1
    SERVER_RAISED_EXCEPTION = 3
    INVALID_SUBMISSION = 6
    DEADLINE_EXCEEDED = 7


class GatewayError(Exception):
    def __init__(self, kind: Failure, details: str = ""):
        super().__init__(f"{kind.name}: {details}")
        self.kind = kind


def cross(value: Any) -> Any:
    """``value`` after the trip between processes (what the serialisation lets through)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        out = [cross(v) for v in value]
        return tuple(out) if isinstance(value, tuple) else out
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("dict keys must be str")
        return {k: cross(v) for k, v in value.items()}
    if isinstance(value, pl.DataFrame):
        buf = io.BytesIO()
        value.write_ipc(buf)
        return pl.read_ipc(io.BytesIO(buf.getvalue()))
    if isinstance(value, pd.DataFrame):
        buf = io.BytesIO()
        value.to_parquet(buf, index=False)
        return pd.read_parquet(io.BytesIO(buf.getvalue()))
    if isinstance(value, pl.Series):
        return cross(value.to_frame()).to_series()
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return np.load(io.BytesIO(buf.getvalue()), allow_pickle=False)
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value
    raise TypeError(f"{type(value).__name__} cannot cross to the gateway")


class Gateway:
    """Runs ``batches`` (each ``(args, row_ids)``) through ``predict`` as a server would."""

    def __init__(
        self,
        batches: Iterable[tuple[tuple[Any, ...], list[str]]],
        row_id_column: str,
        out_dir: Path,
        notebook_started: float,
        startup_limit_s: float = STARTUP_LIMIT_S,
        response_timeout_s: float = 300.0,
    ):
        self.batches, self.row_id_column, self.out_dir = list(batches), row_id_column, out_dir
        self.notebook_started, self.startup_limit_s = notebook_started, startup_limit_s
        self.response_timeout_s = response_timeout_s
        self.calls: list[float] = []  # seconds per call

    def run(self, predict: Callable[..., Any]) -> Path:
        """The server starts now: within the window, or the run fails."""
        waited = time.monotonic() - self.notebook_started
        if waited > self.startup_limit_s:
            raise GatewayError(Failure.SERVER_NEVER_STARTED, f"after {waited:.1f}s (limit {self.startup_limit_s}s)")
        if getattr(predict, "__name__", "") != "predict":
            raise GatewayError(Failure.SERVER_RAISED_EXCEPTION, "no listener for predict was registered")
        parts = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as server:
            for i, (args, row_ids) in enumerate(self.batches):
                t0 = time.monotonic()
                future = server.submit(predict, *cross(tuple(args)))
                try:
                    result = future.result(timeout=None if i == 0 else self.response_timeout_s)
                except concurrent.futures.TimeoutError:
                    raise GatewayError(Failure.DEADLINE_EXCEEDED, f"batch {i}") from None
                except Exception as exc:  # noqa: BLE001 - the server's exception, as the gateway reports it
                    raise GatewayError(Failure.SERVER_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}") from exc
                self.calls.append(time.monotonic() - t0)
                parts.append(self._check(cross(result), row_ids))
        return self._write(parts)

    def _check(self, result: Any, row_ids: list[str]) -> pl.DataFrame:
        if result is None:
            raise GatewayError(Failure.INVALID_SUBMISSION, "no prediction received")
        if isinstance(result, (int, float, str, bool)):
            result = pl.DataFrame({"prediction": [result]})
        elif isinstance(result, pd.DataFrame):
            result = pl.from_pandas(result)
        elif isinstance(result, (pl.Series, pd.Series)):
            result = pl.DataFrame({result.name or "prediction": list(result)})
        elif not isinstance(result, pl.DataFrame):
            raise GatewayError(Failure.INVALID_SUBMISSION, f"invalid prediction type {type(result).__name__}")
        if result.height != len(row_ids):
            raise GatewayError(Failure.INVALID_SUBMISSION, f"expected {len(row_ids)} rows, received {result.height}")
        if result.null_count().sum_horizontal().item() or any(
            result[c].is_nan().any() for c, t in result.schema.items() if t.is_float()
        ):
            raise GatewayError(Failure.INVALID_SUBMISSION, "submission contains null values")
        return result.with_columns(pl.Series(self.row_id_column, row_ids)).select(
            [self.row_id_column, *[c for c in result.columns if c != self.row_id_column]]
        )

    def _write(self, parts: list[pl.DataFrame]) -> Path:
        path = self.out_dir / "submission.parquet"
        pl.concat(parts, how="vertical_relaxed").write_parquet(path)
        return path
