"""Reading a cache entry's views, verified as they stream (CRC-32, finite values), and the
mark a damaged view gets (:class:`DamagedView`): :class:`EntryReading`, a base of
kaggle_tta.cache.entry.CacheEntry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kaggle_tta.cache.files import data_crc
from kaggle_tta.config.errors import CacheError

# Each image's decoded (H, W): data of the entry, read and written through its own methods
# (sizes_complete, open_sizes, write_sizes, read_sizes). It rides on the views' machinery
# (a preallocated .partial, rows counted in the manifest, renamed when complete) under this
# reserved name, which no view can have; nothing outside kaggle_tta.cache sees it as a view.
SIZES = "_image_size"
HELD = "_held_"  # + a gated view's name: the rows it holds (adaptive views; see held_name)


def held_name(view: str) -> str:
    """The companion of a gated view (adaptive views): which of its rows it holds, uint8 ``[N]``,
    written and committed with its rows, checksummed like any view."""
    return HELD + view


class DamagedView(CacheError):
    """A complete view whose file no longer holds what was written."""

    def __init__(self, entry: Any, view: str, reason: str, hint: str = "kaggle-tta run PIPELINE"):
        self.entry, self.view, self.reason = entry, view, reason
        super().__init__(
            f"{entry.path(view)}: damaged ({reason}); marked for recomputing — run '{hint}' to recompute it"
        )


class EntryReading:
    """The reading half of a cache entry (kaggle_tta.cache.entry.CacheEntry)."""

    if TYPE_CHECKING:  # what the entry itself provides
        dir: Path
        manifest: dict[str, Any]
        _streams: dict[str, list[Any]]

        def view_state(self, view: str) -> dict[str, Any]: ...
        def path(self, view: str) -> Path: ...
        def _intact(self, view: str, st: dict[str, Any]) -> str | None: ...
        def reload(self) -> None: ...
        def save(self) -> None: ...

    def read(self, view: str) -> np.ndarray:
        """A complete view's predictions, memory-mapped read-only, unverified (see `rows`).
        Mapped afresh on each call, on purpose: blends slice one block at a time, and a map
        kept open would keep every page read so far in the process's resident memory
        (measured: 163 -> 366 MB peak on the quick re-blend, growing with the cache)."""
        st = self.view_state(view)
        if st.get("status") != "complete":
            raise CacheError(f"{self.dir}: view '{view}' is not complete")
        why = self._intact(view, st)
        if why is not None:
            raise self.damaged(view, why)
        return np.load(self.path(view), mmap_mode="r")

    def rows(self, view: str, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of a complete view. Blocks read in order from row 0 feed the view's
        CRC-32, checked once the last row is read; the CRC runs in a background thread
        (zlib releases the GIL), beside the blend's arithmetic. Non-finite values are found
        where the views are merged (:meth:`nonfinite`)."""
        block = self.read(view)[lo:hi]
        if lo == 0:
            self._streams[view] = [0, None]
        stream = self._streams.get(view)
        if stream is None or stream[0] != lo:
            return block  # a block read again (the identity view without TTA): verified once
        prev = stream[1]
        stream[0], stream[1] = (
            hi,
            _crc_worker().submit(lambda: data_crc(block, prev.result() if prev is not None else 0)),
        )
        st = self.view_state(view)
        if hi >= int(st["rows"]):
            del self._streams[view]
            if "crc32" in st and stream[1].result() != int(st["crc32"]):
                raise self.damaged(view, "checksum mismatch")
        return block

    def nonfinite(self, views: list[str], lo: int, hi: int) -> None:
        """Raises DamagedView for the first of ``views`` holding a non-finite value in rows
        ``lo:hi`` (called when their merge came out non-finite: cheaper than checking every
        view of every block)."""
        for view in views:
            block = self.read(view)[lo:hi]
            if block.dtype.kind == "f" and not np.isfinite(block).all():
                raise self.damaged(view, "non-finite values")

    def read_ragged(self, view: str) -> tuple[np.ndarray, np.ndarray]:
        """A complete detection view, verified: ``(rows [M, 6], offsets [N + 1])``."""
        rows = self.read(view)
        offsets = np.load(self.dir / f"{view}.offsets.npy")
        if not np.isfinite(rows).all():
            raise self.damaged(view, "non-finite values")
        st = self.view_state(view)
        if "crc32" in st and data_crc(offsets, data_crc(rows)) != int(st["crc32"]):
            raise self.damaged(view, "checksum mismatch")
        return rows, offsets

    def verify(self, view: str) -> str | None:
        """Reads a complete view whole; why it is damaged, or None."""
        try:
            if self.view_state(view).get("kind") == "ragged":
                self.read_ragged(view)
            else:
                n = int(self.view_state(view)["rows"])
                for lo in range(0, n, 4096):
                    self.rows(view, lo, min(n, lo + 4096))
                    self.nonfinite([view], lo, min(n, lo + 4096))
        except DamagedView as exc:
            return exc.reason
        return None

    def verify_all(self, views: list[str], sizes: bool = False) -> dict[str, str | None]:
        """Each complete view (and, with ``sizes``, the image sizes) read whole: name -> why
        it is damaged, or None; damaged ones are marked. Views not complete are left out. A
        gated view's held-row companion is read too (a damaged mask would choose wrong rows)."""
        held = {
            f"{v} (its held rows)": held_name(v) for v in views if "held" in self.view_state(v)
        }  # adaptive: the gated view's row mask
        names = {**{v: v for v in views}, **held, **({"image sizes": SIZES} if sizes else {})}
        out: dict[str, str | None] = {}
        for label, view in names.items():
            st = self.view_state(view)
            if st.get("status") == "damaged":
                out[label] = st.get("damage", "damaged")
            elif st.get("status") == "complete":
                why = self._intact(view, st)
                out[label] = self.damaged(view, why).reason if why else self.verify(view)
        return out

    def damaged(self, view: str, reason: str) -> DamagedView:
        """Marks a complete view damaged in the manifest (so that the next run recomputes it)
        and returns the error to raise. Best effort: on a read-only cache, or while another
        run holds the entry, the mark is skipped (that run, or the next, checks again); so is a
        view that a run replaced while this process read it (its checksum is another now)."""
        import fcntl
        import os

        try:
            fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return DamagedView(self, view, reason)
        read = self.view_state(view).get("crc32")  # the view this process read
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.reload()
            st = self.view_state(view)
            if st.get("status") == "complete" and st.get("crc32") == read:  # not one a run completed meanwhile
                st["status"] = "damaged"
                st["damage"] = reason
                self.save()
        except (OSError, CacheError):
            pass
        finally:
            os.close(fd)  # releases the lock
        return DamagedView(self, view, reason)


_CRC_POOL: list[Any] = []


def _crc_worker() -> Any:
    """One background thread for every view's CRC: blocks of a view are summed in order."""
    if not _CRC_POOL:
        from concurrent.futures import ThreadPoolExecutor

        _CRC_POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="kaggle-tta-crc"))
    return _CRC_POOL[0]
