"""One member's cached predictions under one fingerprint: views, image sizes, ids, manifest.

A view's file is preallocated under ``.partial`` (blocks reserved), filled as batches finish,
flushed, and only then counted in the manifest (``rows_done``); when all rows are in (and
counted) its CRC-32 is recorded and it is renamed into place, and a kill between that rename
and the next manifest save is recovered on load. The manifest is replaced atomically, so a
run killed at any moment leaves either the old or the new manifest and resumes from
``rows_done``.

Readers take only views the manifest marks complete whose file is intact (its header,
shape and dtype as recorded). Blocks read in order are checked as they stream: non-finite
values, and at the last row the CRC-32, are damage (:class:`DamagedView`); a damaged view is
marked in the manifest, so the next run recomputes it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from kaggle_tta.cache.files import (
    RAGGED_WIDTH,
    RaggedWriter,
    atomic_write_bytes,
    data_crc,
    open_dense,
    writing,
)
from kaggle_tta.cache.lock import locked, remove_held, take_lock
from kaggle_tta.cache.reading import HELD, SIZES, DamagedView, EntryReading, held_name

__all__ = [
    "FORMAT_VERSION",
    "HELD",
    "SIZES",
    "CacheEntry",
    "DamagedView",
    "held_name",
    "list_entries",
    "remove_entry",
    "view_states",
]
from kaggle_tta.config.errors import CacheError

FORMAT_VERSION = 2  # 2: content fingerprints, ids.json, a CRC-32 per view


class DamagedEntry(CacheError):
    """An entry whose manifest or ids.json cannot be trusted: a run holding its lock computes
    it again (:meth:`CacheEntry.checked`); a blend names it."""


class CacheEntry(EntryReading):
    """The cached predictions of one member under one fingerprint."""

    def __init__(
        self,
        root: Path,
        member: str,
        fingerprint: str,
        inputs: dict[str, Any] | None = None,
        folder: Path | None = None,
        blank: bool = False,
    ):
        self.dir = Path(folder) if folder is not None else Path(root) / member / fingerprint
        self.member = member
        self.fingerprint = fingerprint
        self.inputs = inputs or {}
        self.manifest_path = self.dir / "manifest.json"
        self.manifest = self._fresh() if blank else self._load()
        self._open: dict[str, Any] = {}  # view -> memmap or RaggedWriter, while writing
        self._committed: dict[str, int] = {}  # view -> rows_done at the last commit
        self._streams: dict[str, list[int]] = {}  # view -> [next row, CRC so far], while reading

    # ---- manifest ------------------------------------------------------------------------

    def _fresh(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "member": self.member,
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "views": {},
        }

    def _load(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return self._fresh()
        try:
            m = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            if not isinstance(m, dict) or not isinstance(m.get("views"), dict):
                raise ValueError("not a manifest")
        except (OSError, ValueError) as exc:
            raise DamagedEntry(
                f"{self.manifest_path}: damaged manifest ({exc}); 'kaggle-tta run' computes it again"
            ) from None
        if m.get("format_version") != FORMAT_VERSION:
            raise DamagedEntry(
                f"{self.manifest_path}: cache format {m.get('format_version')} is not {FORMAT_VERSION}; delete "
                f"{self.dir}"
            )
        for view, st in m["views"].items():
            if (
                st.get("status") == "partial"
                and int(st.get("rows_done", 0)) >= int(st.get("rows", -1)) >= 0
                and self._renamed(view, st)
            ):
                st["status"] = "complete"  # killed after the rename, before the manifest said so
        return m

    def _renamed(self, view: str, st: dict[str, Any]) -> bool:
        """Whether a view whose rows were all counted was already moved into place: `commit`
        saves the manifest (all rows and the CRC in) before it renames, so a kill between the
        rename and the next save leaves exactly this."""
        partial = self.dir / (f"{view}.boxes.partial" if st.get("kind") == "ragged" else f"{view}.npy.partial")
        return "crc32" in st and not partial.exists() and self._intact(view, st) is None

    def save(self) -> None:
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        with writing(self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.manifest_path, json.dumps(self.manifest, indent=1, sort_keys=True).encode("utf-8"))

    def view_state(self, view: str) -> dict[str, Any]:
        return self.manifest["views"].get(view, {})

    def view_states(self) -> dict[str, dict[str, Any]]:
        """Every view's state (the image sizes are not a view)."""
        return view_states(self.manifest)

    def path(self, view: str) -> Path:
        """The file whose presence (with the manifest) marks the view complete."""
        ragged = self.view_state(view).get("kind") == "ragged"
        return self.dir / (f"{view}.boxes.npy" if ragged else f"{view}.npy")

    def _intact(self, view: str, st: dict[str, Any]) -> str | None:
        """Why the view's file is not what the manifest recorded (None: it is): missing,
        truncated, a bad header, another shape or dtype."""
        try:
            if st.get("kind") == "ragged":
                offsets = np.load(self.dir / f"{view}.offsets.npy", mmap_mode="r")
                rows = np.load(self.dir / f"{view}.boxes.npy", mmap_mode="r")
                if (
                    offsets.shape != (int(st["rows"]) + 1,)
                    or rows.ndim != 2
                    or rows.shape[1] != RAGGED_WIDTH
                    or int(offsets[-1]) != rows.shape[0]
                ):
                    return "its rows and offsets disagree"
                return None
            arr = np.load(self.dir / f"{view}.npy", mmap_mode="r")
        except FileNotFoundError:
            return "missing"
        except (OSError, ValueError, EOFError) as exc:
            return f"unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        if list(arr.shape) != list(st.get("shape", [])) or arr.dtype != np.dtype(st.get("dtype", "float32")):
            return f"shape {list(arr.shape)} {arr.dtype}, recorded {st.get('shape')} {st.get('dtype')}"
        return None

    def is_complete(self, view: str) -> bool:
        return self.lacks(view) is None

    def lacks(self, view: str) -> str | None:
        """Why the view cannot be read (not computed, partial, damaged: why), or None."""
        st = self.view_state(view)
        status = st.get("status")
        if status == "damaged":
            return f"damaged: {st.get('damage', 'unknown')}"
        if status == "partial":
            return f"partial: {self._partial_rows(view, st)} of {st['rows']} rows"
        if status != "complete":
            return "not computed"
        why = self._intact(view, st)
        return None if why is None else f"damaged: {why}"

    def rows_done(self, view: str) -> int:
        if self.is_complete(view):
            return int(self.view_state(view)["rows"])
        return self._partial_rows(view, self.view_state(view))

    def _partial_rows(self, view: str, st: dict[str, Any]) -> int:
        """Rows a partial view's file holds (0 where the file is gone)."""
        partial = self.dir / (f"{view}.offsets.npy.partial" if st.get("kind") == "ragged" else f"{view}.npy.partial")
        return int(st.get("rows_done", 0)) if st.get("status") == "partial" and partial.is_file() else 0

    def first_missing(self, views: list[str], sizes: bool = False) -> int:
        """The first row any of ``views`` (and, with ``sizes``, the image sizes) lacks."""
        return min(self.rows_done(v) for v in [*views, *([SIZES] if sizes else [])])

    def lock(self, on_wait: Any = None) -> Any:
        """A context holding this entry's lock (see kaggle_tta.cache.lock)."""
        return locked([self.dir], on_wait)

    def reload(self) -> None:
        """Reads the manifest again (after taking the lock: another run may have written)."""
        self.manifest = self._load()

    def shard(self, lo: int, hi: int) -> CacheEntry:
        """The entry of rows ``lo:hi`` (a rank's share; kaggle_tta.cache.shards), in
        ``shards/<lo>-<hi>/`` under this one, with this one's fingerprint and inputs."""
        e = CacheEntry(
            self.dir, self.member, self.fingerprint, self.inputs, folder=self.dir / "shards" / f"{lo:09d}-{hi:09d}"
        )
        e.manifest.setdefault("shard", [int(lo), int(hi)])
        return e

    # ---- ids -----------------------------------------------------------------------------

    def write_ids(self, ids: list[str]) -> None:
        """Records the row order once, as JSON (any string round-trips, line breaks too); a
        different order under the same fingerprint is a bug."""
        f = self.dir / "ids.json"
        text = json.dumps(list(ids), ensure_ascii=False)
        if f.is_file():
            if self.read_ids() != list(ids):
                raise DamagedEntry(f"{f}: ids differ from the test set under the same fingerprint; delete {self.dir}")
            return
        with writing(self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(f, text.encode("utf-8"))

    def read_ids(self) -> list[str]:
        f = self.dir / "ids.json"
        try:
            ids = json.loads(f.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CacheError(f"{f}: missing; the entry is incomplete, run 'kaggle-tta infer' to fill it") from None
        except (OSError, ValueError) as exc:
            raise DamagedEntry(f"{f}: damaged ({exc}); 'kaggle-tta run' computes the entry again") from None
        if not isinstance(ids, list):
            raise DamagedEntry(f"{f}: damaged (not a list of ids); 'kaggle-tta run' computes the entry again")
        return [str(i) for i in ids]

    # ---- writing -------------------------------------------------------------------------

    def open_for_write(self, view: str, shape: tuple[int, ...], dtype: str) -> tuple[np.memmap, int]:
        """The view's partial file (created or reopened) and the rows already in it."""
        with writing(self.dir):
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
            mm = open_dense(partial, shape, dtype)
            start = 0
            self.manifest["views"][view] = {
                "status": "partial",
                "rows_done": 0,
                "rows": int(shape[0]),
                "shape": list(shape),
                "dtype": dtype,
                "seconds": 0.0,
                "nonfinite_recomputed": 0,
            }
        self._open[view] = mm
        self._committed[view] = start  # on disk and counted already
        return mm, start

    def open_ragged(self, view: str, n: int) -> tuple[RaggedWriter, int]:
        """A detection view's writer (created or reopened) and the images already in it.

        Rows of ``[x1, y1, x2, y2, score, label]`` (normalized corners) are appended to a raw
        ``.boxes.partial`` file; ``.offsets.npy.partial`` (preallocated, ``[N + 1]``) says where
        each image's rows start. On resume the raw file is cut back to the last committed image.
        """
        with writing(self.dir):
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
            offsets = open_dense(offsets_path, (n + 1,), "int64")
            with writing(self.dir):
                raw_path.write_bytes(b"")
            self.manifest["views"][view] = {
                "status": "partial",
                "kind": "ragged",
                "rows_done": 0,
                "rows": int(n),
                "seconds": 0.0,
                "nonfinite_recomputed": 0,
            }
        writer = RaggedWriter(raw_path, offsets, start)
        self._open[view] = writer
        self._committed[view] = start
        return writer, start

    def record(self, view: str, rows_done: int, seconds: float, nonfinite: int = 0) -> None:
        """Notes progress in memory; `commit` makes it durable."""
        st = self.manifest["views"][view]
        st["rows_done"] = int(rows_done)
        st["seconds"] = float(st.get("seconds", 0.0)) + float(seconds)
        st["nonfinite_recomputed"] = int(st.get("nonfinite_recomputed", 0)) + int(nonfinite)

    def rewind(self, view: str, rows_done: int) -> Any:
        """Counts only rows before ``rows_done`` (in memory; the rest are written again) and
        returns the view's open file (a ragged writer is reopened there)."""
        st = self.manifest["views"][view]
        st["rows_done"] = min(int(st["rows_done"]), int(rows_done))
        store = self._open[view]
        if isinstance(store, RaggedWriter):
            store = self._open[view] = store.reopen(st["rows_done"])
        return store

    def commit(self) -> None:
        """Flushes every open view's rows to disk, then the manifest that counts them, then
        completes the views whose rows are all in (their CRC recorded before they move)."""
        with writing(self.dir):
            for mm in self._open.values():
                mm.flush()
        self._committed = {v: int(self.manifest["views"][v]["rows_done"]) for v in self._open}
        done = [v for v in self._open if self.manifest["views"][v]["rows_done"] >= self.manifest["views"][v]["rows"]]
        for view in done:
            mm = self._open[view]
            self.manifest["views"][view]["crc32"] = mm.crc() if isinstance(mm, RaggedWriter) else data_crc(mm)
        if done:  # all rows counted before any file moves: a kill after a move is recovered on load
            self.save()
        for view in done:
            st = self.manifest["views"][view]
            mm = self._open.pop(view)
            with writing(self.dir):
                if isinstance(mm, RaggedWriter):
                    mm.finish(self.dir / f"{view}.boxes.npy", self.dir / f"{view}.offsets.npy")
                else:
                    del mm
                    (self.dir / f"{view}.npy.partial").replace(self.dir / f"{view}.npy")
            st["status"] = "complete"
        self.save()

    def close(self) -> None:
        """Closes the open views after a run or a failure. Rows recorded since the last commit
        (not flushed, or computed on a trial and never committed) are not counted, so the
        `save` that follows keeps the manifest at what is on disk."""
        committed = self._committed
        for view, mm in self._open.items():
            st = self.manifest["views"][view]
            st["rows_done"] = min(int(st["rows_done"]), committed.get(view, 0))
            try:
                mm.flush()
                if isinstance(mm, RaggedWriter):
                    mm.close()
            except (OSError, CacheError):
                pass  # a full disk: what did not reach it is not counted (above)
        self._open.clear()

    def sweep(self) -> None:
        """Removes what killed runs left (temporaries, partial files of complete views).
        Call it holding the entry's lock: then no other process writes here."""
        if not self.dir.is_dir():
            return
        for f in self.dir.glob(".*.tmp"):
            f.unlink(missing_ok=True)
        for view in self.manifest["views"]:  # the image sizes too
            if self.is_complete(view):
                for name in (f"{view}.npy.partial", f"{view}.boxes.partial", f"{view}.offsets.npy.partial"):
                    (self.dir / name).unlink(missing_ok=True)

    # ---- image sizes ---------------------------------------------------------------------

    def sizes_complete(self) -> bool:
        return self.is_complete(SIZES)

    def open_sizes(self, n: int) -> int:
        """Opens the image sizes for writing; returns the first image still missing."""
        return self.open_for_write(SIZES, (n, 2), "int32")[1]

    def write_sizes(self, first: int, hi: int, values: np.ndarray) -> None:
        """Stores the (H, W) of images ``first:hi`` and counts them (made durable by commit)."""
        self._open[SIZES][first:hi] = values
        self.record(SIZES, hi, 0.0)

    def read_sizes(self) -> np.ndarray:
        """Every image's decoded (H, W), ``[N, 2]``, verified."""
        return np.asarray(self.rows(SIZES, 0, int(self.view_state(SIZES)["rows"])))

    # ---- reading -------------------------------------------------------------------------

    def mark_used(self, pipeline: str | None) -> bool:
        """Records that the pipeline file ``pipeline`` uses this entry (`cache prune` of another
        pipeline keeps it while that file exists), with the next manifest write; whether it
        was new."""
        users = self.manifest.setdefault("used_by", {})
        if not pipeline or pipeline in users:
            return False
        users[pipeline] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return True


def view_states(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The views of a manifest, without the image sizes and the held-row companions."""
    return {v: st for v, st in manifest.get("views", {}).items() if v != SIZES and not v.startswith(HELD)}


def list_entries(root: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (member, fingerprint, manifest) under a cache root."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    if not Path(root).is_dir():
        return out
    for mdir in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for fdir in sorted(p for p in mdir.iterdir() if p.is_dir()):
            f = fdir / "manifest.json"
            if f.is_file():
                try:
                    m = json.loads(f.read_text(encoding="utf-8"))
                    if not isinstance(m, dict) or not isinstance(m.get("views"), dict):
                        raise ValueError("not a manifest")
                    out.append((mdir.name, fdir.name, m))
                except (OSError, ValueError):
                    out.append((mdir.name, fdir.name, {"views": {}, "damaged": True}))
    return out


def remove_entry(root: Path, member: str, fingerprint: str) -> bool:
    """Removes an entry under its lock, taken without waiting; False (nothing removed) where a
    run holds it: that run is writing it, and would lose every row."""
    folder = Path(root) / member / fingerprint
    fd = take_lock(folder, wait=False, create=False)
    if fd is None:
        return not folder.exists()
    try:
        remove_held(folder)
    finally:
        os.close(fd)
    return True
