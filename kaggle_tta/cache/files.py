"""File primitives of the cache: atomic writes, preallocation, disk errors as one line,
the ragged (detection) writer and the sweep of what a killed run leaves behind.

Every write that can meet a full or read-only disk goes through :func:`disk_error`, so the
user sees one line naming the folder and the bytes needed, never an OSError traceback or a
SIGBUS from a memory-mapped write into a hole: dense files are preallocated with
``posix_fallocate`` before the first row goes in.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np

from kaggle_tta.config.errors import CacheError

RAGGED_WIDTH = 6  # x1, y1, x2, y2 (normalized), score, label


def size_text(n: float) -> str:
    """A byte count as a person reads it, never rounded to zero: 512 bytes, 12.3 KB, 4.1 MB, 2.0 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def disk_error(exc: OSError, where: Path | str, needed: int | None = None) -> CacheError:
    """One line for an OSError met while writing under ``where``."""
    need = f" ({size_text(needed)} needed)" if needed else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheError(
            f"{where}: no space left on the device{need}; free space there or point cache.dir at a larger disk"
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return CacheError(
            f"{where}: cannot write here ({os.strerror(exc.errno)}); point cache.dir at a writable folder"
        )
    return CacheError(f"{where}: {os.strerror(exc.errno) if exc.errno else exc}; check the folder and cache.dir")


@contextlib.contextmanager
def writing(where: Path | str, needed: int | None = None) -> Iterator[None]:
    """Turns an OSError inside into :func:`disk_error`."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, CacheError):
            raise
        raise disk_error(exc, where, needed) from None


def discard(path: Path) -> None:
    """Removes a file this process left, if it can: a cleanup after a failed write never hides
    that failure (on a read-only disk unlinking fails too, even a file that is not there)."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def tmp_name(path: Path) -> Path:
    """The temporary beside ``path`` that this process writes before renaming it into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``path`` whole or not at all (a reader sees the old or the new file)."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        discard(tmp)
        raise disk_error(exc, path.parent, len(data)) from None


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        discard(tmp)
        raise disk_error(exc, path.parent, arr.nbytes) from None


def preallocate(path: Path) -> None:
    """Reserves the blocks of a (sparse) file, so that a memory-mapped write cannot fault."""
    size = path.stat().st_size
    if size == 0 or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without it: best effort
            raise
    finally:
        os.close(fd)


def open_dense(path: Path, shape: tuple[int, ...], dtype: str) -> np.memmap:
    """A new ``.npy`` memmap at ``path``, its blocks reserved; a full disk is one line."""
    needed = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
        preallocate(path)
    except OSError as exc:
        discard(path)
        raise disk_error(exc, path.parent, needed) from None
    return mm


def data_crc(arr: np.ndarray, crc: int = 0) -> int:
    """CRC-32 of an array's bytes in C order, continuing from ``crc``."""
    import zlib

    buf = memoryview(np.ascontiguousarray(arr))  # type: ignore[arg-type]  # an ndarray is a buffer
    return zlib.crc32(buf.cast("B"), crc)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_tmp(folder: Path, older_than: float = 0.0) -> int:
    """Removes ``.<name>.<pid>.tmp`` files of processes no longer running (or older than
    ``older_than`` seconds when given); returns how many."""
    removed = 0
    if not folder.is_dir():
        return 0
    now = time.time()
    for f in folder.glob(".*.tmp"):
        try:
            pid = int(f.name.rsplit(".", 2)[-2])
        except (ValueError, IndexError):
            continue
        try:
            stale = not pid_alive(pid) or (older_than and now - f.stat().st_mtime > older_than)
            if stale:
                f.unlink()
                removed += 1
        except OSError:
            pass
    return removed


class RaggedWriter:
    """Appends per-image rows of a detection view; see :meth:`CacheEntry.open_ragged`."""

    def __init__(self, raw_path: Path, offsets: np.memmap, start: int):
        self.raw_path = raw_path
        self.offsets = offsets
        size = int(offsets[start]) * RAGGED_WIDTH * 4
        with writing(raw_path.parent):
            with open(raw_path, "r+b") as f:
                f.truncate(size)  # rows of images after the last commit are dropped, then redone
            self._f = open(raw_path, "ab")  # noqa: SIM115 - held open while the view fills

    def write(self, first: int, rows: list[np.ndarray]) -> None:
        """Stores images ``first, first + 1, ...``: one ``[n_i, 6]`` array each."""
        at = int(self.offsets[first])
        with writing(self.raw_path.parent):
            for k, r in enumerate(rows):
                r = np.ascontiguousarray(r, dtype=np.float32).reshape(-1, RAGGED_WIDTH)
                self._f.write(r.tobytes())
                at += len(r)
                self.offsets[first + k + 1] = at

    def flush(self) -> None:
        with writing(self.raw_path.parent):
            self._f.flush()
            os.fsync(self._f.fileno())
            self.offsets.flush()

    def close(self) -> None:
        self._f.close()

    def reopen(self, start: int) -> RaggedWriter:
        """This view's writer from image ``start`` on (later rows dropped)."""
        self.flush()
        self._f.close()
        return RaggedWriter(self.raw_path, self.offsets, start)

    def _rows(self) -> np.ndarray:
        return np.fromfile(self.raw_path, dtype=np.float32).reshape(-1, RAGGED_WIDTH)

    def crc(self) -> int:
        """CRC-32 of the finished view's data: its rows, then its offsets."""
        return data_crc(np.asarray(self.offsets), data_crc(self._rows()))

    def finish(self, boxes_path: Path, offsets_path: Path) -> None:
        """Writes the complete view as two .npy files (offsets first: the boxes file marks
        the view complete) and removes the partial files."""
        self._f.close()
        rows = self._rows()
        offsets = np.asarray(self.offsets)
        atomic_save_npy(offsets_path, offsets)
        atomic_save_npy(boxes_path, rows)
        offsets_partial = Path(cast(str, self.offsets.filename))  # a file-backed memmap
        del self.offsets
        # the raw rows first: with them gone the finished files are taken as the view on load
        self.raw_path.unlink(missing_ok=True)
        offsets_partial.unlink(missing_ok=True)
