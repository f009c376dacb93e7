"""Run-length encoding of segmentation masks, and the post-processing before it.

A Kaggle RLE string is space-separated ``start length`` pairs over the flattened mask.
Competitions differ in three ways, each an argument here rather than a fork of the code:

- ``order``: the flattening order. ``'F'`` (column-major: down the first column, then the
  next) is the classic Kaggle convention; ``'C'`` (row-major) is used by e.g. Vesuvius.
- ``one_indexed``: whether the first pixel is 1 (the classic convention) or 0.
- ``empty``: what an empty mask is written as (``''``, ``'-1'``, ``'-'``).

Everything is vectorized numpy: encoding and decoding a 1024x1024 mask cost a few
milliseconds plus the string conversion, whose cost grows with the number of runs.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from kaggle_tta.config.errors import DataError, check_hw

Order = Literal["F", "C"]


class RLEError(DataError):
    """A malformed RLE string, or a mask that cannot be encoded."""


def mask_to_rle(mask: np.ndarray, order: Order = "F", one_indexed: bool = True, empty: str = "") -> str:
    """Encodes a binary mask as an RLE string.

    Args:
        mask: ``[H, W]`` bool or integer array; any non-zero pixel is foreground (so 0/1
            and 0/255 masks both work). Float masks are refused: threshold them first.
        order: ``'F'`` (column-major, the classic Kaggle layout) or ``'C'`` (row-major).
        one_indexed: whether the first pixel is numbered 1 (classic) or 0.
        empty: the string written for a mask with no foreground pixel.

    Returns:
        ``"start length start length ..."`` with runs in increasing order, or ``empty``.

    Raises:
        RLEError: the mask is not 2-D, is a float array, or ``order`` is unknown.
    """
    _check_order(order)
    m = np.asarray(mask)
    if m.ndim != 2:
        raise RLEError(f"mask must be 2-D [H, W], got shape {m.shape}")
    if not (m.dtype == np.bool_ or np.issubdtype(m.dtype, np.integer)):
        raise RLEError(
            f"mask must be bool or integer, got {m.dtype}; threshold probabilities first with threshold_mask"
        )
    # Pad with background on both ends so every run has a rising and a falling edge; the
    # edge positions then alternate start, end, start, end ...
    flat = np.zeros(m.size + 2, dtype=np.bool_)
    flat[1:-1] = m.ravel(order=order) != 0
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    if edges.size == 0:
        return empty
    runs = edges.reshape(-1, 2)
    runs[:, 1] -= runs[:, 0]  # end -> length
    runs[:, 0] += int(one_indexed)
    return " ".join(map(str, runs.ravel().tolist()))


def rle_to_mask(
    rle: str, shape: tuple[int, int], order: Order = "F", one_indexed: bool = True, empty: str = ""
) -> np.ndarray:
    """Decodes an RLE string into a ``[H, W]`` bool mask (C-contiguous).

    Args:
        rle: the encoded string. ``empty`` and a blank string both decode to an empty mask
            (a blank string has no runs under any convention).
        shape: ``(H, W)`` of the mask.
        order: the flattening order the string was written in (see :func:`mask_to_rle`).
        one_indexed: whether its starts count from 1.
        empty: the token that stands for an empty mask.

    Raises:
        RLEError: the string is malformed; the message names the problem and the pair:
            a non-integer token, an odd number of values, a start before the first pixel,
            a zero length, a run past the last pixel, or runs unsorted or overlapping.
    """
    _check_order(order)
    h, w = _check_shape(shape)
    if not isinstance(rle, str):
        raise RLEError(f"RLE must be a string, got {type(rle).__name__}")
    if rle.strip() in ("", empty.strip()):
        return np.zeros((h, w), dtype=np.bool_)
    values = _parse_values(rle)
    if values.size % 2:
        raise RLEError(f"RLE has an odd number of values ({values.size}); it must be 'start length' pairs")
    starts = values[0::2] - int(one_indexed)
    lengths = values[1::2]
    n = h * w
    _check_runs(starts, lengths, n, one_indexed)
    # Interleave the gaps before each run with the runs themselves, then one np.repeat
    # writes the whole flat mask: background, run, background, run, ..., background.
    ends = starts + lengths
    gaps = starts - np.concatenate([[0], ends[:-1]])
    counts = np.empty(2 * starts.size + 1, dtype=np.int64)
    counts[0:-1:2] = gaps
    counts[1::2] = lengths
    counts[-1] = n - ends[-1]
    values01 = np.zeros(counts.size, dtype=np.bool_)
    values01[1::2] = True
    flat = np.repeat(values01, counts)
    return np.ascontiguousarray(flat.reshape((h, w), order=order))


def _parse_values(rle: str) -> np.ndarray:
    """The integers of an RLE string, or RLEError naming the first token that is not one."""
    # Fast path: ASCII digits and single spaces, which np.fromstring parses in C (a string
    # of 10^6 numbers in ~20 ms; np.array(rle.split()) takes ~8x longer). Values too large
    # for int64 saturate there and are then rejected as out of bounds.
    if rle.isascii() and rle.replace(" ", "").isdigit():
        return np.fromstring(rle, dtype=np.int64, sep=" ")
    tokens = rle.split()  # other whitespace (tabs, newlines) or a bad token
    bad = next((t for t in tokens if not (t.isascii() and t.isdigit())), None)
    if bad is not None:
        raise RLEError(f"RLE token '{_clip(bad)}' is not a non-negative integer (RLE: '{_clip(rle)}')")
    try:
        return np.array(tokens, dtype=np.int64)
    except OverflowError:
        raise RLEError(f"RLE has a value too large for any mask (RLE: '{_clip(rle)}')") from None


def _check_runs(starts: np.ndarray, lengths: np.ndarray, n: int, one_indexed: bool) -> None:
    """Raises RLEError naming the first pair (1-based) that breaks the format."""
    base = int(one_indexed)
    if (bad := np.flatnonzero(starts < 0)).size:
        i = bad[0]
        hint = "; starts count from 1 here (pass one_indexed=False for 0-indexed strings)" if one_indexed else ""
        raise RLEError(f"RLE pair {i + 1}: start {starts[i] + base} is before the first pixel{hint}")
    if (bad := np.flatnonzero(lengths <= 0)).size:
        i = bad[0]
        raise RLEError(f"RLE pair {i + 1}: length {lengths[i]} must be positive")
    # lengths > n - starts is ends > n without the int64 overflow a huge value would cause
    if (bad := np.flatnonzero(lengths > n - starts)).size:
        i = bad[0]
        raise RLEError(
            f"RLE pair {i + 1}: run of {lengths[i]} pixels from {starts[i] + base} is out of bounds for a mask of "
            f"{n} pixels; "
            "check the shape, order and indexing"
        )
    ends = starts + lengths
    # Touching runs (a start equal to the previous end) decode unambiguously, so they pass.
    if (bad := np.flatnonzero(starts[1:] < ends[:-1])).size:
        i = bad[0] + 1
        what = "comes before" if starts[i] < starts[i - 1] else "overlaps"
        raise RLEError(
            f"RLE pair {i + 1}: run starting at {starts[i] + base} {what} the previous run "
            f"({starts[i - 1] + base}..{ends[i - 1] - 1 + base}); runs must be sorted and must not overlap"
        )


def threshold_mask(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Foreground where ``probs >= threshold`` (at or above, as the multi-label writer).

    Raises:
        RLEError: the probabilities contain NaN (a broken prediction would otherwise
            silently become background).
    """
    p = np.asarray(probs)
    if not np.isfinite(threshold):
        raise RLEError(f"threshold must be finite, got {threshold}")
    if np.issubdtype(p.dtype, np.floating) and np.isnan(p).any():
        raise RLEError("probabilities contain NaN; check the model's output before thresholding")
    return p >= threshold


def remove_small_components(mask: np.ndarray, min_area: int, connectivity: Literal[4, 8] = 8) -> np.ndarray:
    """Drops connected components of fewer than ``min_area`` pixels.

    Args:
        mask: ``[H, W]`` bool or integer mask (non-zero is foreground); not modified.
        min_area: components with an area below this are removed; ``<= 1`` keeps all.
        connectivity: 8 (diagonal neighbours connect, cv2's default) or 4.

    Returns:
        A new ``[H, W]`` bool mask.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise RLEError(f"mask must be 2-D [H, W], got shape {m.shape}")
    if connectivity not in (4, 8):
        raise RLEError(f"connectivity must be 4 or 8, got {connectivity}")
    fg = m != 0
    if min_area <= 1 or not fg.any():
        return fg
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=connectivity)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False  # label 0 is the background
    return keep[labels]


def _check_order(order: str) -> None:
    if order not in ("F", "C"):
        raise RLEError(f"order must be 'F' (column-major) or 'C' (row-major), got {order!r}")


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    return check_hw(shape, "shape", RLEError)


def _clip(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


class RunWriter:
    """An RLE string built from a mask's pixels in flattened order, given a chunk at a time
    (a band of an image too large to flatten whole); runs that cross chunks are joined. The
    text equals :func:`mask_to_rle` of the whole mask."""

    def __init__(self, one_indexed: bool = True):
        self.one_indexed = one_indexed
        self._edges: list[np.ndarray] = []
        self._at = 0
        self._last = False

    def add(self, flat: np.ndarray) -> None:
        """The next pixels (bool or integer; non-zero is foreground)."""
        f = np.asarray(flat).ravel() != 0
        if f.size == 0:
            return
        padded = np.empty(f.size + 1, dtype=np.bool_)
        padded[0], padded[1:] = self._last, f
        self._edges.append(np.flatnonzero(padded[1:] != padded[:-1]) + self._at)
        self._at += f.size
        self._last = bool(f[-1])

    def text(self, empty: str = "") -> str:
        edges = np.concatenate(self._edges) if self._edges else np.zeros(0, np.int64)
        if self._last:
            edges = np.append(edges, self._at)
        if edges.size == 0:
            return empty
        runs = edges.reshape(-1, 2).astype(np.int64)
        runs[:, 1] -= runs[:, 0]
        runs[:, 0] += int(self.one_indexed)
        return " ".join(map(str, runs.ravel().tolist()))
