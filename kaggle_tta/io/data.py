"""The test set: listing, decoding once, canvas groups, and the streaming loader.

Decoding uses OpenCV. Images are converted, not refused:
  - grayscale (1 channel) is repeated to 3 channels;
  - RGBA / BGRA drops the alpha channel (no compositing);
  - 16-bit integers are scaled to 8 bits (value / 257, so 65535 -> 255);
  - float images are taken as [0, 1] and scaled to 8 bits.
Zero-byte, unreadable and truncated files raise a DataError naming the path.

Each member's *canvas* is made in the loader workers from the image decoded once
(kaggle_tta.io.canvas: the crops a classification member's views start from, or a segmentation
or detection canvas). Members whose canvases coincide share one; views then run on the
device.
"""

from __future__ import annotations

import glob as globlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import polars as pl

from kaggle_tta.config import PipelineConfig
from kaggle_tta.config.data import ReaderConfig
from kaggle_tta.config.errors import DataError, KaggleTTAError, UserPath, shown_path
from kaggle_tta.io.canvas import CanvasSpec
from kaggle_tta.io.ids import ids_by_rule, templated_paths
from kaggle_tta.io.readers import decode_image, items_of, list_records, opencv, read_item, record_item
from kaggle_tta.io.tables import read_csv_table, read_listing
from kaggle_tta.io.windows import item_size
from kaggle_tta.io.zips import archive_items, is_archive, list_archive

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext

# OpenCV and torch are imported where images are decoded and batched, not at import: listing
# the test set (which re-blending does) needs neither.


_cv2 = opencv  # cv2 with its own log lines off


# ---- listing -------------------------------------------------------------------------------


shown = shown_path  # a path as a message shows it: one line, whatever its characters


@dataclass(frozen=True)
class TestSet:
    """The ids and files of the test set, in a deterministic order."""

    ids: list[str]
    paths: list[str]  # plain strings: a 100 000-image listing is not 100 000 Path objects
    identities: list[tuple[int, int]]  # (size, mtime_ns) per file, from one stat at listing (the
    # cache fingerprints the files' content: kaggle_tta.cache.digest.files_digest)

    first_path: str | None = None  # a slice's: the whole set's first file (rules that take it as the reference)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def reference(self) -> str:
        """The first file of the whole test set (a rank's slice keeps its set's)."""
        return self.first_path if self.first_path is not None else self.paths[0]

    def rows(self, lo: int, hi: int) -> TestSet:
        """Rows ``lo:hi``: a rank's contiguous share (kaggle_tta.dist.launch)."""
        return TestSet(
            self.ids[lo:hi], self.paths[lo:hi], self.identities[lo:hi], self.reference if self.paths else None
        )


def list_test_set(cfg: PipelineConfig) -> TestSet:
    """Lists the test set as pipeline.yaml declares it.

    A broken symbolic link with an image suffix is refused, not skipped: the test set would
    silently lose an image. Ids are any text, line breaks included; messages quote them.

    Raises:
        DataError: the folder/CSV is missing, nothing matched, an id is duplicated, a file is
            missing, not a regular file, a broken link or zero bytes.
    """
    d = cfg.data
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in d.extensions}
    known: list[tuple[int, int]] | None = None  # identities the listing gives (an archive's members)
    if d.folder is not None and is_archive(cfg.resolve(d.folder)):  # images in a zip, read in place
        return TestSet(*list_archive(cfg.resolve(d.folder), exts, d.id))
    if d.folder is not None:
        root = cfg.resolve(d.folder)
        if not root.is_dir():
            raise DataError(f"data.folder: {root} is not a folder; point it at the test images")
        where = f"data.folder ({root})"
        found = sorted(_image_files(root.rglob("*"), exts, where), key=lambda p: p.relative_to(root).as_posix())
        ids = [p.relative_to(root).with_suffix("").as_posix() for p in found]
        paths = [str(p) for p in found]
    elif d.glob is not None:
        pattern = str(cfg.resolve(d.glob))
        where = f"data.glob ({pattern})"
        found = sorted(_image_files(map(Path, globlib.glob(pattern, recursive=True)), exts, where))
        ids = [p.stem for p in found]
        paths = [str(p) for p in found]
    elif d.records is not None:  # rows of one file: no file per item to stat
        path = cfg.resolve(d.records.path)
        ids = list_records(path, d.records.id_column)
        size_mtime = _record_file_stat(path)
        if not ids:
            raise DataError(f"data.records ({path}): the test set is empty; check the file")
        _check_unique(ids, [str(path)] * len(ids), f"data.records ({path})")
        return TestSet(ids, [record_item(path, k) for k in range(len(ids))], [size_mtime] * len(ids))
    else:
        ids, paths, known = _list_csv(cfg)
        where = f"data.csv ({cfg.resolve(d.csv.path)})"  # type: ignore[union-attr]
    if d.reader.channels and d.csv is None:  # items of several files: the first template's files
        ids, paths = items_of(ids, paths, d.reader.channels)
    if d.id is not None and d.csv is None:
        ids = ids_by_rule(ids, d.id.pattern, d.id.template, where)
    if not ids:
        held = _seen(cfg.resolve(d.folder) if d.folder else None)
        raise DataError(f"{where}: the test set is empty; check the path and data.extensions {sorted(exts)}{held}")
    _check_unique(ids, paths, where)
    identities = known if known is not None else _identities(paths, where)
    return TestSet(ids, paths, identities)


def _seen(folder: Path | None) -> str:
    """What an empty folder listing holds instead (its commonest suffixes), for the refusal."""
    if folder is None or not folder.is_dir():
        return ""
    counts: dict[str, int] = {}
    for p in folder.rglob("*"):
        if p.suffix and p.is_file():
            counts[p.suffix.lower()] = counts.get(p.suffix.lower(), 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
    return f" (the folder holds {', '.join(f'{n} {s}' for s, n in top)} files: add their suffix)" if top else ""


def _identities(paths: list[str], where: str) -> list[tuple[int, int]]:
    """(size, mtime_ns) of each listed file, from one stat each: missing, unreadable, not a
    regular file or zero bytes is one line naming the file(s)."""
    identities: list[tuple[int, int]] = []
    missing: list[str] = []
    for p in paths:  # one stat per file: existence, zero bytes and the fingerprint
        try:
            st = os.stat(p)
        except FileNotFoundError:
            missing.append(p)
            continue
        except OSError as exc:  # a link loop, a name too long, no permission on the folder
            raise DataError(f"{where}: cannot read {shown(p)} ({exc.strerror or exc}); fix or remove it") from None
        except ValueError:  # a NUL byte in a listed path
            raise DataError(f"{where}: {shown_path(p)} holds a NUL byte; fix the listing") from None
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{where}: {shown(p)} is not a regular file (a folder?); list image files only")
        identities.append((st.st_size, st.st_mtime_ns))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"{where}: image file not found: {', '.join(map(shown, missing[:3]))}{more}")
    empty = [p for p, (size, _) in zip(paths, identities) if size == 0]
    if empty:
        raise DataError(
            f"{shown(empty[0])}: zero-byte image file; replace or remove it"
            + (f" ({len(empty)} such files)" if len(empty) > 1 else "")
        )
    return identities


def _image_files(candidates: Any, exts: set[str], where: str) -> list[Path]:
    """The image files among ``candidates`` (suffix in ``exts``); a broken link is an error."""
    out = []
    for p in candidates:
        if p.suffix.lower() not in exts:
            continue
        if p.is_file():
            out.append(p)
        elif p.is_symlink() and not p.exists():
            try:
                target = f" to {os.readlink(p)!r}"
            except OSError:
                target = ""
            raise DataError(f"{where}: {shown(p)} is a broken symbolic link{target}; fix its target or remove it")
    return out


def _strings(df: pl.DataFrame, col: str, path: Path, key: str) -> list[str]:
    """A column as strings; an empty cell is an error (it would become the id 'None')."""
    values = df[col].to_list()
    if (k := next((k for k, v in enumerate(values) if v is None), None)) is not None:
        raise DataError(f"{path}: data row {k + 1} has an empty '{col}' ({key}); fill it or remove the row")
    return [str(v) for v in values]


def _list_csv(cfg: PipelineConfig) -> tuple[list[str], list[str], list[tuple[int, int]] | None]:
    """(ids, paths, and the identities where the paths are an archive's members: data.csv.root
    an archive, read in place)."""
    c = cfg.data.csv
    assert c is not None
    path = cfg.resolve(c.path)
    df = read_listing(path, "data.csv.path", c.key)
    for col in filter(None, [c.id_column, c.path_column]):
        if col not in df.columns:
            raise DataError(f"{path}: no column '{col}' (columns: {df.columns}); set data.csv.id_column / path_column")
    root = cfg.resolve(c.root) if c.root else path.parent
    ids = _strings(df, c.id_column, path, "data.csv.id_column")
    if c.path_column:
        rel = _strings(df, c.path_column, path, "data.csv.path_column")
    else:
        rel = templated_paths(df, ids, c.path_template or "", path)
    bad = next((k for k, r in enumerate(rel) if "\0" in r), None)
    if bad is not None:  # the OS refuses such a path; say which row, before any file is touched
        raise DataError(
            f"{path}: row {bad + 1} of column '{c.path_column or 'path_template'}' holds a NUL byte "
            f"({shown_path(rel[bad])}); fix the CSV"
        )
    if is_archive(root):
        return ids, *archive_items(root, rel, f"data.csv.root ({root})")
    base = str(root)
    return ids, [os.path.normpath(r if os.path.isabs(r) else os.path.join(base, r)) for r in rel], None


def _record_file_stat(path: Path) -> tuple[int, int]:
    with UserPath(path, "check data.records.path"):
        st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _check_unique(ids: Sequence[str], paths: Sequence[str | Path], where: str) -> None:
    seen: dict[str, int] = {}
    for k, i in enumerate(ids):
        if i in seen:
            raise DataError(
                f"{where}: duplicate id {i!r} ({shown(paths[seen[i]])} and {shown(paths[k])}); ids must be unique"
            )
        seen[i] = k


def label_table(cfg: PipelineConfig, ids: Sequence[str]) -> tuple[Path, dict[str, Any]] | None:
    """``data.labels`` as id -> the label as written (None without labels): one row per id,
    every test id labelled."""
    spec = cfg.data.labels
    if spec is None:
        return None
    path = cfg.resolve(spec.path)
    df = read_csv_table(path, "data.labels.path", infer_schema=False)
    for col in (spec.id_column, spec.label_column):
        if col not in df.columns:
            raise DataError(f"{path}: no column '{col}' (columns: {df.columns})")
    table: dict[str, Any] = {}
    for k, (i, label) in enumerate(
        zip(_strings(df, spec.id_column, path, "data.labels.id_column"), df[spec.label_column].to_list())
    ):
        if i in table:  # the last row would win silently
            raise DataError(
                f"{path}: id {i!r} has two rows (data rows {list(table).index(i) + 1} and {k + 1}); keep one "
                "label per id"
            )
        table[i] = label
    missing = [i for i in ids if i not in table]
    if missing:
        raise DataError(f"{path}: no label for id {missing[0]!r} ({len(missing)} ids missing)")
    return path, table


def load_labels(cfg: PipelineConfig, ids: Sequence[str], classes: Sequence[str]) -> np.ndarray | None:
    """Ground truth as class indices ``[N]`` (or ``[N, C]`` 0/1 for multi-label), if given."""
    found = label_table(cfg, ids)
    if found is None:
        return None
    path, table = found
    index = {c: k for k, c in enumerate(classes)}
    try:
        if cfg.multilabel:
            y = np.zeros((len(ids), len(classes)), dtype=np.uint8)
            for r, i in enumerate(ids):
                for name in str(table[i] or "").split():
                    y[r, index[name]] = 1
            return y
        return np.array([index[str(table[i])] for i in ids], dtype=np.int64)
    except KeyError as exc:
        raise DataError(f"{path}: label {exc} is not in data.classes") from None


# ---- preprocessing groups ------------------------------------------------------------------


@dataclass
class Batch:
    """Rows ``lo:hi`` of the test set as the loader yields them: each canvas group's uint8
    ``[B, H, W, C]`` tensor and every image's decoded ``[B, 2]`` (H, W); or, instead, the one
    line of the first image that failed (``error``)."""

    lo: int
    hi: int
    canvases: dict[str, Any] = field(default_factory=dict)
    sizes: Any = None
    error: str | None = None

    def rows(self, lo: int, hi: int) -> Batch:
        """Rows ``lo:hi`` of this batch (test-set rows, within ``self.lo:self.hi``)."""
        a, b = lo - self.lo, hi - self.lo
        return Batch(lo, hi, {g: c[a:b] for g, c in self.canvases.items()}, self.sizes[a:b])

    def pin_memory(self) -> Batch:
        """What the DataLoader calls with ``pin_memory=True`` (CUDA): the canvases pinned."""
        self.canvases = {k: v.pin_memory() for k, v in self.canvases.items()}
        return self


class CanvasDataset:
    """Decodes image i once and makes every group's canvas from it.

    Errors are returned, not raised, so the main process reports them as one clean line
    (an exception raised in a worker would arrive wrapped in a traceback).
    """

    def __init__(
        self,
        paths: Sequence[str] | Sequence[Path],
        specs: dict[str, CanvasSpec],
        start: int = 0,
        reader: ReaderConfig | None = None,
    ):
        self.paths: list[str | Path] = list(paths)
        self.specs = specs
        self.start = start
        self.reader = reader  # None: 8-bit RGB images, decoded as always (readers.reader_of)
        self._transforms: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.paths) - self.start

    def __getitem__(self, k: int) -> tuple[int, dict[str, np.ndarray] | str, np.ndarray | None]:
        i = self.start + k
        if self._transforms is None:
            self._transforms = {key: spec.build() for key, spec in self.specs.items()}
        try:
            if all(spec.mode == "window" for spec in self.specs.values()):  # read later, window by window
                return i, {}, np.array(item_size(str(self.paths[i]), self.reader), dtype=np.int32)
            img = decode_image(self.paths[i]) if self.reader is None else read_item(str(self.paths[i]), self.reader)
            out = {}
            for key, t in self._transforms.items():
                canvas = t(img)
                if (
                    not isinstance(canvas, np.ndarray)
                    or canvas.dtype != img.dtype  # uint8 as decoded, or float32 from a window
                    or canvas.ndim != (4 if self.specs[key].stacked else 3)
                ):
                    return (
                        i,
                        f"{shown(self.paths[i])}: the albumentations preprocessing must return uint8 HWC images; "
                        "drop Normalize/ToTensorV2 (normalization runs on the device)",
                        None,
                    )
                out[key] = canvas
            return i, out, np.array(img.shape[:2], dtype=np.int32)  # maps and boxes go back to it
        except KaggleTTAError as exc:  # a reader's or a user's callable's: one line, as any bad image
            return i, str(exc), None


def _collate(items: list[tuple[int, dict[str, np.ndarray] | str, np.ndarray | None]]) -> Batch:
    import torch

    lo, hi = items[0][0], items[-1][0] + 1
    for _, v, _ in items:
        if isinstance(v, str):
            return Batch(lo, hi, error=v)
    rows = [cast(dict[str, np.ndarray], v) for _, v, _ in items]  # no error: returned above
    out = {}
    for key in rows[0]:
        arrays = [v[key] for v in rows]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            return Batch(
                lo,
                hi,
                error=(
                    f"images of different sizes {sorted(s[:2] for s in shapes)} in one batch (around {lo}); "
                    "segmentation: set segmentation.size: [H, W]; a user preprocessing: end it with a fixed-size "
                    "resize or crop"
                ),
            )
        out[key] = torch.from_numpy(np.stack(arrays))  # [B, H, W, C] uint8
    return Batch(lo, hi, out, torch.from_numpy(np.stack([cast(np.ndarray, s) for _, _, s in items])))


def _worker_init(_: int) -> None:
    import torch

    _cv2().setNumThreads(1)  # workers already run in parallel; avoid oversubscribing cores
    torch.set_num_threads(1)


def make_loader(
    paths: Sequence[str] | Sequence[Path],
    specs: dict[str, CanvasSpec],
    batch_size: int,
    workers: int,
    start: int = 0,
    pin_memory: bool = False,
    reader: ReaderConfig | None = None,
) -> Any:
    """A torch DataLoader streaming a :class:`Batch` at a time from row ``start`` on; each
    item read by ``reader`` (data.reader; None or the default: 8-bit RGB images)."""
    from torch.utils.data import DataLoader

    ds = CanvasDataset(paths, specs, start, reader)
    # Workers are not forked from this process: a parent that has already used OpenCV's or
    # OpenMP's thread pools (a notebook, a test) can deadlock a forked child inside cv2.
    # forkserver starts them from a clean process once per loader.
    ctx: BaseContext | None = None
    if workers:
        import multiprocessing as mp

        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            # Workers fork from a server that has imported these once, so each starts without
            # re-importing torch and OpenCV (no effect once the server runs).
            ctx.set_forkserver_preload(["torch", "cv2", __name__])
        else:
            ctx = mp.get_context("spawn")
    return DataLoader(
        ds,  # type: ignore[arg-type]  # a map-style dataset without torch's base class
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
        multiprocessing_context=ctx,
    )
