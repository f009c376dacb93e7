"""The prediction store: one .npy per (member, view) under a content fingerprint.

Layout::

    <cache>/<member>/<fingerprint>/manifest.json     what the numbers depend on; per-view state
    <cache>/<member>/<fingerprint>/ids.txt           row order: one test id per line
    <cache>/<member>/<fingerprint>/<view>.npy        complete predictions, [N, C]
    <cache>/<member>/<fingerprint>/<view>.npy.partial   being filled (an .npy memmap)
    <cache>/<member>/<fingerprint>/<view>.boxes.npy   detection: every image's boxes, [M, 6]
    <cache>/<member>/<fingerprint>/<view>.offsets.npy image i's rows are offsets[i]:offsets[i+1]
    <cache>/<member>/<fingerprint>/_image_size.npy    tasks that map back (segmentation, detection):
                                                       each image's decoded (H, W), [N, 2] int32

A view's file is preallocated under ``.partial``, filled as batches finish, flushed, and only
then counted in the manifest (``rows_done``); when all rows are in (and counted), it is renamed
into place, and a kill between that rename and the next manifest save is recovered on load.
The manifest is replaced atomically, so a run killed at any moment leaves either the old or the
new manifest, never a torn one, and resumes from ``rows_done``. Readers take only files the
manifest marks complete, so a blend never reads a partial file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from kaggle_tta.errors import CacheError

FORMAT_VERSION = 1
# Each image's decoded (H, W): data of the entry, read and written through its own methods
# (sizes_complete, open_sizes, write_sizes, read_sizes). It is kept with the views' machinery
# (a preallocated .partial, rows counted in the manifest, renamed when complete) under this
# reserved name, which is no view name, so caches written before stay readable; nothing
# outside this module sees it as a view.
_SIZES = "_image_size"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CacheEntry:
    """The cached predictions of one member under one fingerprint."""

    def __init__(self, root: Path, member: str, fingerprint: str, inputs: dict[str, Any] | None = None):
        self.dir = Path(root) / member / fingerprint
        self.member = member
        self.fingerprint = fingerprint
        self.inputs = inputs or {}
        self.manifest_path = self.dir / "manifest.json"
        self.manifest = self._load()
        self._open: dict[str, np.memmap] = {}

    # ---- manifest ------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"format_version": FORMAT_VERSION, "member": self.member, "fingerprint": self.fingerprint, "inputs": self.inputs, "views": {}}
        try:
            m = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CacheError(f"{self.manifest_path}: damaged manifest ({exc}); delete {self.dir} to recompute") from None
        if m.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{self.manifest_path}: cache format {m.get('format_version')} is not {FORMAT_VERSION}; delete {self.dir}")
        for view, st in m.get("views", {}).items():
            if st.get("status") == "partial" and int(st.get("rows_done", 0)) >= int(st.get("rows", -1)) >= 0 and self._renamed(view, st):
                st["status"] = "complete"  # killed after the rename, before the manifest said so
        return m

    def _renamed(self, view: str, st: dict[str, Any]) -> bool:
        """Whether a view whose rows were all counted was already moved into place: `commit`
        saves the manifest (all rows in) before it renames, so a kill between the rename and
        the next save leaves exactly this; the file must match the recorded shape and dtype."""
        if st.get("kind") == "ragged":
            boxes, offsets = self.dir / f"{view}.boxes.npy", self.dir / f"{view}.offsets.npy"
            if not (boxes.is_file() and offsets.is_file()) or (self.dir / f"{view}.boxes.partial").exists():
                return False  # finish() had not ended: the partial files complete it again
            try:
                return np.load(offsets, mmap_mode="r").shape == (int(st["rows"]) + 1,)
            except (OSError, ValueError):
                return False
        final = self.dir / f"{view}.npy"
        if not final.is_file() or (self.dir / f"{view}.npy.partial").exists():
            return False
        try:
            arr = np.load(final, mmap_mode="r")
        except (OSError, ValueError):
            return False
        return list(arr.shape) == list(st.get("shape", [])) and arr.dtype == np.dtype(st.get("dtype", "float32"))

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _atomic_write_text(self.manifest_path, json.dumps(self.manifest, indent=1, sort_keys=True))

    def view_state(self, view: str) -> dict[str, Any]:
        return self.manifest["views"].get(view, {})

    def view_states(self) -> dict[str, dict[str, Any]]:
        """Every view's state (the image sizes are not a view)."""
        return view_states(self.manifest)

    def path(self, view: str) -> Path:
        """The file whose presence (with the manifest) marks the view complete."""
        ragged = self.view_state(view).get("kind") == "ragged"
        return self.dir / (f"{view}.boxes.npy" if ragged else f"{view}.npy")

    def is_complete(self, view: str) -> bool:
        return self.view_state(view).get("status") == "complete" and self.path(view).is_file()

    def rows_done(self, view: str) -> int:
        if self.is_complete(view):
            return int(self.view_state(view)["rows"])
        st = self.view_state(view)
        partial = self.dir / (f"{view}.offsets.npy.partial" if st.get("kind") == "ragged" else f"{view}.npy.partial")
        return int(st.get("rows_done", 0)) if st.get("status") == "partial" and partial.is_file() else 0

    def first_missing(self, views: list[str], sizes: bool = False) -> int:
        """The first row any of ``views`` (and, with ``sizes``, the image sizes) lacks."""
        return min(self.rows_done(v) for v in [*views, *([_SIZES] if sizes else [])])

    # ---- ids -----------------------------------------------------------------------------

    def write_ids(self, ids: list[str]) -> None:
        """Records the row order once; a different order under the same fingerprint is a bug."""
        f = self.dir / "ids.txt"
        text = "\n".join(ids) + "\n"
        if f.is_file():
            if f.read_text(encoding="utf-8") != text:
                raise CacheError(f"{f}: ids differ from the test set under the same fingerprint; delete {self.dir}")
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(f, text)

    def read_ids(self) -> list[str]:
        f = self.dir / "ids.txt"
        if not f.is_file():
            raise CacheError(f"{f}: missing; the entry is incomplete, run 'kaggle-tta infer' to fill it")
        return f.read_text(encoding="utf-8").splitlines()

    # ---- writing -------------------------------------------------------------------------

    def open_for_write(self, view: str, shape: tuple[int, ...], dtype: str) -> tuple[np.memmap, int]:
        """The view's partial file (created or reopened) and the rows already in it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        partial = self.dir / f"{view}.npy.partial"
        start = self.rows_done(view)
        mm = None
        if start > 0:
            try:
                mm = np.lib.format.open_memmap(partial, mode="r+")
                if mm.shape != tuple(shape) or mm.dtype != np.dtype(dtype):
                    mm, start = None, 0
            except (OSError, ValueError):
                mm, start = None, 0
        if mm is None:
            mm = np.lib.format.open_memmap(partial, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
            start = 0
            self.manifest["views"][view] = {"status": "partial", "rows_done": 0, "rows": int(shape[0]), "shape": list(shape), "dtype": dtype, "seconds": 0.0, "nonfinite_recomputed": 0}
        self._open[view] = mm
        return mm, start

    def open_ragged(self, view: str, n: int) -> tuple[RaggedWriter, int]:
        """A detection view's writer (created or reopened) and the images already in it.

        Rows of ``[x1, y1, x2, y2, score, label]`` (normalized corners) are appended to a raw
        ``.boxes.partial`` file; ``.offsets.npy.partial`` (preallocated, ``[N + 1]``) says where
        each image's rows start. On resume the raw file is cut back to the last committed image.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        start = self.rows_done(view)
        st = self.view_state(view)
        offsets_path = self.dir / f"{view}.offsets.npy.partial"
        raw_path = self.dir / f"{view}.boxes.partial"
        offsets = None
        if start > 0 and st.get("kind") == "ragged" and raw_path.is_file():
            try:
                offsets = np.lib.format.open_memmap(offsets_path, mode="r+")
                if offsets.shape != (n + 1,) or raw_path.stat().st_size < int(offsets[start]) * RAGGED_WIDTH * 4:
                    offsets, start = None, 0
            except (OSError, ValueError):
                offsets, start = None, 0
        if offsets is None:
            start = 0
            offsets = np.lib.format.open_memmap(offsets_path, mode="w+", dtype=np.int64, shape=(n + 1,))
            raw_path.write_bytes(b"")
            self.manifest["views"][view] = {"status": "partial", "kind": "ragged", "rows_done": 0, "rows": int(n), "seconds": 0.0, "nonfinite_recomputed": 0}
        writer = RaggedWriter(raw_path, offsets, start)
        self._open[view] = writer  # type: ignore[assignment]
        return writer, start

    def record(self, view: str, rows_done: int, seconds: float, nonfinite: int = 0) -> None:
        """Notes progress in memory; `commit` makes it durable."""
        st = self.manifest["views"][view]
        st["rows_done"] = int(rows_done)
        st["seconds"] = float(st.get("seconds", 0.0)) + float(seconds)
        st["nonfinite_recomputed"] = int(st.get("nonfinite_recomputed", 0)) + int(nonfinite)

    def commit(self) -> None:
        """Flushes every open view's rows to disk, then the manifest that counts them, then
        completes the views whose rows are all in."""
        for mm in self._open.values():
            mm.flush()
        done = [v for v in self._open if self.manifest["views"][v]["rows_done"] >= self.manifest["views"][v]["rows"]]
        if done:  # all rows counted before any file moves: a kill after a move is recovered on load
            self.save()
        for view in done:
            st = self.manifest["views"][view]
            mm = self._open.pop(view)
            if isinstance(mm, RaggedWriter):
                mm.finish(self.dir / f"{view}.boxes.npy", self.dir / f"{view}.offsets.npy")
            else:
                del mm
                os.replace(self.dir / f"{view}.npy.partial", self.dir / f"{view}.npy")
            st["status"] = "complete"
        self.save()

    def close(self) -> None:
        for mm in self._open.values():
            mm.flush()
            if isinstance(mm, RaggedWriter):
                mm._f.close()
        self._open.clear()

    # ---- image sizes ---------------------------------------------------------------------

    def sizes_complete(self) -> bool:
        return self.is_complete(_SIZES)

    def open_sizes(self, n: int) -> int:
        """Opens the image sizes for writing; returns the first image still missing."""
        return self.open_for_write(_SIZES, (n, 2), "int32")[1]

    def write_sizes(self, first: int, hi: int, values: np.ndarray) -> None:
        """Stores the (H, W) of images ``first:hi`` and counts them (made durable by commit)."""
        self._open[_SIZES][first:hi] = values
        self.record(_SIZES, hi, 0.0)

    def read_sizes(self) -> np.ndarray:
        """Every image's decoded (H, W), ``[N, 2]``."""
        return np.asarray(self.read(_SIZES))

    # ---- reading -------------------------------------------------------------------------

    def read(self, view: str) -> np.ndarray:
        """A complete view's predictions, memory-mapped read-only. Mapped afresh on each call,
        on purpose: blends slice one block at a time, and a map kept open would keep every
        page read so far in the process's resident memory (measured: 163 -> 366 MB peak on
        the quick re-blend, growing with the cache)."""
        if not self.is_complete(view):
            raise CacheError(f"{self.dir}: view '{view}' is not complete")
        return np.load(self.path(view), mmap_mode="r")

    def read_ragged(self, view: str) -> tuple[np.ndarray, np.ndarray]:
        """A complete detection view: ``(rows [M, 6], offsets [N + 1])``."""
        if not self.is_complete(view):
            raise CacheError(f"{self.dir}: view '{view}' is not complete")
        return np.load(self.path(view), mmap_mode="r"), np.load(self.dir / f"{view}.offsets.npy")


RAGGED_WIDTH = 6  # x1, y1, x2, y2 (normalized), score, label


class RaggedWriter:
    """Appends per-image rows of a detection view; see :meth:`CacheEntry.open_ragged`."""

    def __init__(self, raw_path: Path, offsets: np.memmap, start: int):
        self.raw_path = raw_path
        self.offsets = offsets
        size = int(offsets[start]) * RAGGED_WIDTH * 4
        with open(raw_path, "r+b") as f:
            f.truncate(size)  # rows of images after the last commit are dropped, then redone
        self._f = open(raw_path, "ab")  # noqa: SIM115 - held open while the view fills

    def write(self, first: int, rows: list[np.ndarray]) -> None:
        """Stores images ``first, first + 1, ...``: one ``[n_i, 6]`` array each."""
        at = int(self.offsets[first])
        for k, r in enumerate(rows):
            r = np.ascontiguousarray(r, dtype=np.float32).reshape(-1, RAGGED_WIDTH)
            self._f.write(r.tobytes())
            at += len(r)
            self.offsets[first + k + 1] = at

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self.offsets.flush()

    def finish(self, boxes_path: Path, offsets_path: Path) -> None:
        """Writes the complete view as two .npy files (offsets first: the boxes file marks
        the view complete) and removes the partial files."""
        self._f.close()
        rows = np.fromfile(self.raw_path, dtype=np.float32).reshape(-1, RAGGED_WIDTH)
        for path, arr in ((offsets_path, np.asarray(self.offsets)), (boxes_path, rows)):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        offsets_partial = Path(self.offsets.filename)
        del self.offsets
        # the raw rows first: with them gone the finished files are taken as the view on load
        self.raw_path.unlink(missing_ok=True)
        offsets_partial.unlink(missing_ok=True)


def view_states(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The views of a manifest, without the image sizes."""
    return {v: st for v, st in manifest.get("views", {}).items() if v != _SIZES}


def list_entries(root: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (member, fingerprint, manifest) under a cache root."""
    out = []
    if not Path(root).is_dir():
        return out
    for mdir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        for fdir in sorted(p for p in mdir.iterdir() if p.is_dir()):
            f = fdir / "manifest.json"
            if f.is_file():
                try:
                    out.append((mdir.name, fdir.name, json.loads(f.read_text(encoding="utf-8"))))
                except (OSError, json.JSONDecodeError):
                    out.append((mdir.name, fdir.name, {"views": {}, "damaged": True}))
    return out


def remove_entry(root: Path, member: str, fingerprint: str) -> None:
    shutil.rmtree(Path(root) / member / fingerprint, ignore_errors=True)
