"""Intensity: a reader's values mapped to what the views take (``data.reader.window``), and a
single channel repeated to three."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kaggle_tta.config.errors import DataError, shown_path

if TYPE_CHECKING:
    from kaggle_tta.config.data import WindowSpec


def apply_window(arr: np.ndarray, window: WindowSpec | None, path: str) -> np.ndarray:
    """``arr`` mapped to float32 [0, 1] by ``window``; without one, uint8 as it is, other
    integers by their type's maximum, floats as they are."""
    if window is None:
        if arr.dtype == np.uint8:
            return arr
        if arr.dtype.kind in "ui":
            return (arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)).astype(np.float32)
        return arr.astype(np.float32, copy=False)
    x = arr.astype(np.float32, copy=False)  # not written to: the result is a new array
    if window.mode == "dicom":  # the DICOM reader applied the file's window: scale its output range
        lo, hi = float(x.min()), float(x.max())
    elif window.mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif window.mode == "percentile":
        assert window.range is not None
        lo, hi = (float(v) for v in np.percentile(x, window.range))
    else:
        assert window.range is not None
        lo, hi = window.range
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise DataError(f"{shown_path(path)}: non-finite values; the window cannot scale them")
    if hi <= lo:
        return np.zeros_like(x)
    y = np.subtract(x, np.float32(lo), dtype=np.float32)  # in place from here: one array, not four
    np.divide(y, np.float32(hi - lo), out=y)
    return np.clip(y, 0.0, 1.0, out=y)


def gray_to_rgb(arr: np.ndarray) -> np.ndarray:
    """``[H, W, 1]`` -> ``[H, W, 3]``, the channel repeated (OpenCV: 10x numpy's repeat)."""
    if arr.dtype in (np.uint8, np.uint16, np.float32):
        import cv2

        return cv2.cvtColor(np.ascontiguousarray(arr[:, :, 0]), cv2.COLOR_GRAY2RGB)
    return np.repeat(arr, 3, axis=2)
