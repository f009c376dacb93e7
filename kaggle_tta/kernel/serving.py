"""The serving mode, for competitions that ask for predictions through ``kaggle_evaluation``:
an inference server hands ``predict`` one batch at a time and writes the submission itself.

:func:`predictor` does the slow work once, before the notebook starts the server (which must
listen within the gateway's start-up window, 15 minutes): it reads the pipeline, builds every
member and, where the pipeline's own test set is on disk, runs it on its first items so that
the precision verdict, chunk size, layout and compile decision are taken and remembered
(kaggle_tta.exec.decisions) before the first batch. The ``predict`` it returns runs the
pipeline's members, views and blends on the items of the batch it is handed and returns the
pipeline's submission rows for them as a polars DataFrame (float64 values, one row per item
where the format writes one, in the order given), without the id column unless asked: the
gateway puts its own row ids first. Each batch is a test set of its own, cached in a scratch
folder that is removed afterwards; nothing is written where the gateway writes.

The notebook cell (``<comp>`` and ``<Comp>`` are the competition's)::

    import os, kaggle_tta.kernel.serving as serving
    import kaggle_evaluation.<comp>_inference_server as ke
    predict = serving.predictor("pipeline.yaml")
    server = ke.<Comp>InferenceServer(predict)
    if os.getenv("KAGGLE_IS_COMPETITION_RERUN"):
        server.serve()
    else:
        server.run_local_gateway()
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kaggle_tta.api import blend, plan_of
from kaggle_tta.config import load_pipeline
from kaggle_tta.config.errors import DataError

WARMUP_ITEMS = 8
"""Items of the pipeline's own test set run by :func:`predictor` before it returns."""


def predictor(
    pipeline: str | Path,
    overrides: Sequence[str] = (),
    *,
    keep_ids: bool = False,
    warmup: bool = True,
    scratch: str | Path | None = None,
) -> Callable[..., pl.DataFrame]:
    """``predict(batch)`` for a ``kaggle_evaluation`` inference server (see the module).

    ``batch``: a path (a file: one item; a folder: its items), a list of paths, or a polars or
    pandas DataFrame whose first text column holds paths. Returns the submission rows of those
    items; ``keep_ids`` keeps the id column (``submission.id_column``).
    """
    import torch

    from kaggle_tta.engine.device import resolve_device, resolve_precision
    from kaggle_tta.engine.stream import run_inference
    from kaggle_tta.io import models as model_io

    base = [*overrides, "submission.sample=null", "submission.append=[]", "data.labels=null"]
    cfg = load_pipeline(pipeline, list(overrides))
    device = resolve_device(cfg.runtime.device)
    precision = resolve_precision(cfg.runtime.precision, device)
    root = Path(scratch or os.environ.get("KAGGLE_TTA_SCRATCH") or Path(tempfile.gettempdir()) / "kaggle_tta")
    root.mkdir(parents=True, exist_ok=True)
    models: dict[str, torch.nn.Module] = {}
    lock = threading.Lock()  # the server calls from its worker thread, one call at a time

    def run_on(folder: Path, order: list[str] | None) -> pl.DataFrame:
        work = Path(tempfile.mkdtemp(prefix="batch-", dir=root))
        try:
            plan = plan_of(pipeline, [*base, *_folder_overrides(folder, work)])
            if not models:  # built once; the run takes each from here (popped), so a copy is handed
                for m in plan.members:
                    models[m.name] = model_io.build_model(plan.cfg, m.cfg, len(plan.classes)).to(device)
            stats = run_inference(plan, device, precision, progress=False, models=dict(models))
            table = blend(plan, computed=stats.computed).table
            assert table is not None
            return _rows(table, plan, order, keep_ids)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    if warmup and _has_test_set(cfg):
        first = [str(p) for p in plan_of(cfg).testset.paths[:WARMUP_ITEMS] if Path(p).is_file()]
        if first:  # decisions taken now (precision, chunk size, layout, compile), not in the first call
            _with_items(first, root, run_on)

    def predict(*batch: Any) -> pl.DataFrame:
        with lock, torch.inference_mode():
            return _with_items(_paths(batch), root, run_on)

    return predict


def _has_test_set(cfg: Any) -> bool:
    folder = cfg.data.folder
    return folder is not None and Path(cfg.resolve(folder)).exists()


def _folder_overrides(folder: Path, work: Path) -> list[str]:
    return [
        f"data.folder={folder}",
        "data.csv=null",
        "data.glob=null",
        "data.records=null",
        f"cache.dir={work / 'cache'}",
        f"submission.path={work / 'submission.csv'}",
    ]


def _paths(batch: tuple[Any, ...]) -> list[str]:
    """The item paths of a batch as a server hands it."""
    if len(batch) == 1:
        batch = batch[0] if not isinstance(batch[0], (str, os.PathLike)) else batch
    if isinstance(batch, pl.DataFrame):
        texts = [c for c, t in batch.schema.items() if t == pl.Utf8]
        column = batch[texts[0]].to_list() if texts else None
    elif hasattr(batch, "columns") and hasattr(batch, "dtypes"):  # pandas (read as it is: no pyarrow needed)
        texts = [c for c in batch.columns if batch[c].map(lambda v: isinstance(v, str)).all()]
        column = batch[texts[0]].tolist() if texts else None
    else:
        return [str(p) for p in batch]
    if column is None:
        raise DataError("serving: the batch's DataFrame has no text column of paths; hand predict paths")
    return [str(p) for p in column]


def _with_items(paths: list[str], root: Path, run: Callable[[Path, list[str] | None], pl.DataFrame]) -> pl.DataFrame:
    """A folder holding the batch's items (links to the files; a folder handed alone is used
    as it is), and what ``run`` makes of it."""
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return run(Path(paths[0]), None)
    folder = Path(tempfile.mkdtemp(prefix="items-", dir=root))
    try:
        names = []
        for p in paths:
            src = Path(p)
            if not src.is_file():
                raise DataError(f"serving: {p}: no such file (predict takes paths of the test items)")
            if (folder / src.name).exists():
                raise DataError(f"serving: two items named {src.name} in one batch; their ids would clash")
            (folder / src.name).symlink_to(src.resolve())
            names.append(src.name)
        return run(folder, names)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _rows(table: pl.DataFrame, plan: Any, order: list[str] | None, keep_ids: bool) -> pl.DataFrame:
    """The submission rows in the order the items came, floats as float64, the id column
    dropped unless kept."""
    id_col = getattr(plan.cfg.submission, "id_column", None)
    if order is not None and table.height == len(order) == len(plan.testset):  # a row per item, listed sorted
        where = {name: i for i, name in enumerate(order)}
        table = table[[int(i) for i in np.argsort([where[Path(p).name] for p in plan.testset.paths])]]
    table = table.with_columns(pl.col(c).cast(pl.Float64) for c, t in table.schema.items() if t.is_float())
    return table if keep_ids or id_col not in table.columns else table.drop(id_col)
