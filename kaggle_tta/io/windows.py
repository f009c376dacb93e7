"""Images read window by window (``segmentation.size: native``): an item's size from its
header, and the pixels of one window at a time.

A TIFF is read through tifffile, one tile or strip at a time: only the tiles a window
touches are read and decoded, so a 20 000 x 20 000 slide costs the memory of the windows in
flight, not of the image (an uncompressed TIFF is memory-mapped by tifffile instead). tifffile
can do this itself through zarr (``imread(selection=...)``); zarr is not among our
dependencies, so the tile loop is here, over tifffile's own ``TiffPage.decode``. Other files
are read whole by the item's reader (they fit in memory: a PNG, a DICOM) and cut.

Every window is converted as the loader converts a whole item (``readers.apply_window``):
uint8 stays uint8, other integers are divided by their type's maximum, a fixed window maps to
[0, 1]. A window that needs the whole image (minmax, percentile, the DICOM window) is refused
for a TIFF read by windows, with the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kaggle_tta.config.errors import ConfigError, DataError, shown_path
from kaggle_tta.io.intensity import apply_window, gray_to_rgb
from kaggle_tta.io.readers import decode_image, read_item
from kaggle_tta.io.zips import ZIP_SEP

if TYPE_CHECKING:
    from kaggle_tta.config.data import ReaderConfig

TIFF = (".tif", ".tiff")


def is_tiff(path: str | Path) -> bool:
    """A TIFF on disk (read by windows); one in an archive is read whole."""
    return Path(path).suffix.lower() in TIFF and ZIP_SEP not in str(path)


def item_size(path: str, reader: ReaderConfig | None) -> tuple[int, int]:
    """``(H, W)`` of an item, from the TIFF header without its pixels (an item of several
    TIFFs: its first file's); other files are read."""
    tiffs = _channel_tiffs(path, reader)
    if tiffs or (is_tiff(path) and (reader is None or reader.plain or reader.channels is None)):
        first = tiffs[0] if tiffs else path
        with _tiff(first) as tf:
            h, w, _ = _page_layout(tf, first)
            return h, w
    plain = reader is None or (reader.name in ("auto", "image") and reader.channels is None and reader.slices is None)
    if plain and not path.lower().endswith((".dcm", ".dicom", ".npy", ".npz")):
        header = _header_size(path)  # the header alone: the pixels are decoded once, by the step
        if header is not None:
            return header
    img = _whole(path, reader)
    return int(img.shape[0]), int(img.shape[1])


def _header_size(path: str) -> tuple[int, int] | None:
    """(H, W) from an image file's header through PIL (which reads no pixels until asked);
    None where PIL cannot tell (the item is then read whole)."""
    try:
        from PIL import Image

        from kaggle_tta.io.zips import source

        with Image.open(source(path)) as im:
            w, h = im.size
        return int(h), int(w)
    except Exception:  # noqa: BLE001 - any PIL failure: read it whole, where the reader names the problem
        return None


def _whole(path: str, reader: ReaderConfig | None) -> np.ndarray:
    return decode_image(path) if reader is None else read_item(path, reader)


def _tiff(path: str) -> Any:
    try:
        import tifffile
    except ImportError:
        raise ConfigError(
            "segmentation.size: native reads TIFFs with tifffile; pip install 'kaggle-tta[tiff]'"
        ) from None

    try:
        return tifffile.TiffFile(path)
    except OSError as exc:
        raise DataError(f"{shown_path(path)}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # tifffile's own errors for a file that is no TIFF
        raise DataError(f"{shown_path(path)}: not a readable TIFF ({exc}); re-export it") from None


def _page_layout(tf: Any, path: str) -> tuple[int, int, int]:
    """``(H, W, C)`` of the first series' full-resolution image: one page of YX or YXS, a page
    with separate sample planes (SYX), or one 2-D page per channel (HuBMAP's [1, 1, 3, H, W])."""
    series = tf.series[0]
    page = series.pages[0]
    if page is None:
        raise DataError(f"{shown_path(path)}: a TIFF without an image; re-export it")
    h, w = int(page.imagelength), int(page.imagewidth)
    planes = len(series.pages) if page.samplesperpixel == 1 and len(series.pages) > 1 else 1
    return h, w, int(page.samplesperpixel) * planes


def _channel_tiffs(path: str, reader: ReaderConfig | None) -> list[str]:
    """An item of several files (``data.reader.channels``) that are all TIFFs on disk: its
    files, read by windows as one TIFF is (Vesuvius' 65 layers of a fragment); else none."""
    if reader is None or reader.channels is None or reader.slices is not None or _tiff_whole(reader):
        return []
    from kaggle_tta.io.readers import channel_files

    files = channel_files(path, reader)
    return files if all(is_tiff(f) for f in files) else []


class _Tiff:
    """One TIFF file open for windows: its size, and the raw pixels of a window ``[h, w, S]``."""

    def __init__(self, path: str):
        self.path = path
        self.tf = _tiff(path)
        try:
            h, w, self.channels = _page_layout(self.tf, path)
            self.size = (h, w)
            self.pages = self.tf.series[0].pages
            self.map = _memmap(self.tf, path)
        except BaseException:
            self.tf.close()
            raise

    def raw(self, top: int, left: int, h: int, w: int) -> np.ndarray:
        if self.map is not None:
            a = np.asarray(self.map[top : top + h, left : left + w])
            return a[:, :, None] if a.ndim == 2 else a
        return np.concatenate([_tiff_window(p, top, left, h, w) for p in self.pages], axis=2)


class WindowSource:
    """One item, read a window at a time: ``read(top, left, h, w)`` -> ``[h, w, C]``."""

    def __init__(self, path: str, reader: ReaderConfig | None):
        self.path = path
        self.reader = reader
        self._tiffs: list[_Tiff] = []
        self._img: np.ndarray | None = None
        files = _channel_tiffs(path, reader)
        if not files and is_tiff(path) and (reader is None or reader.channels is None) and not _tiff_whole(reader):
            files = [path]
        if files:
            try:
                for f in files:
                    self._tiffs.append(_Tiff(f))
                    (h, w), (h0, w0) = self._tiffs[-1].size, self._tiffs[0].size
                    if (h, w) != (h0, w0):
                        raise DataError(
                            f"{shown_path(f)}: {h}x{w} where {shown_path(files[0])} is {h0}x{w0}; the files of one "
                            "item must have one size"
                        )
                    if len(files) > 1 and self._tiffs[-1].channels != 1:
                        raise DataError(f"{shown_path(f)}: several channels; data.reader.channels takes one per file")
            except BaseException:  # the layers opened so far are closed
                self.close()
                raise
            self.size = self._tiffs[0].size
        else:
            self._img = _whole(path, reader)
            self.size = (int(self._img.shape[0]), int(self._img.shape[1]))

    def read(self, top: int, left: int, h: int, w: int) -> np.ndarray:
        if self._img is not None:
            return self._img[top : top + h, left : left + w]
        planes = [t.raw(top, left, h, w) for t in self._tiffs]
        return self._converted(planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2))

    def _converted(self, raw: np.ndarray) -> np.ndarray:
        a = raw[:, :, None] if raw.ndim == 2 else raw
        gray = self.reader is None or self.reader.gray == "rgb"
        if a.shape[2] == 1 and gray:
            a = gray_to_rgb(a)
        if self.reader is None and a.shape[2] == 4:  # an 8-bit RGBA image decodes to RGB
            a = a[:, :, :3]
        window = None if self.reader is None else self.reader.window
        if self.reader is None and a.dtype != np.uint8:
            return decode_like(a)
        return apply_window(np.ascontiguousarray(a), window, self.path)

    def close(self) -> None:
        for t in self._tiffs:
            t.tf.close()
        self._tiffs = []

    def __enter__(self) -> WindowSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tiff_whole(reader: ReaderConfig | None) -> bool:
    """A window whose bounds come from the whole image: the TIFF is read whole."""
    return reader is not None and reader.window is not None and reader.window.mode != "fixed"


def decode_like(a: np.ndarray) -> np.ndarray:
    """Plain images' conversion (``readers.decode_image``) of a window: 16 bits by 257, floats
    from [0, 1]."""
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) // 257).astype(np.uint8)
    if a.dtype.kind == "f":
        return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise DataError(f"unsupported pixel type {a.dtype}; convert to 8 or 16 bits, or name a reader (data.reader)")


def _memmap(tf: Any, path: str) -> np.ndarray | None:
    """An uncompressed, contiguous TIFF as a read-only memory map ``[H, W(, S)]``; else None."""
    page = tf.series[0].pages[0]
    if len(tf.series[0].pages) > 1 or not page.is_memmappable or page.planarconfig != 1:
        return None
    import tifffile

    try:
        return np.asarray(tifffile.memmap(path, page=page.index, mode="r"))
    except (ValueError, OSError):
        return None


def _tiff_window(page: Any, top: int, left: int, h: int, w: int) -> np.ndarray:
    """Rows ``top:top+h``, columns ``left:left+w`` of one TIFF page as ``[h, w, S]``, decoding
    only the tiles (or strips) the window touches."""
    fh = page.parent.filehandle
    H, W, S = int(page.imagelength), int(page.imagewidth), int(page.samplesperpixel)
    planes = S if page.planarconfig == 2 else 1
    th, tw = (int(page.tilelength), int(page.tilewidth)) if page.is_tiled else (int(page.rowsperstrip or H), W)
    th, tw = min(th, H) or H, min(tw, W) or W
    down, across = -(-H // th), -(-W // tw)
    out = np.empty((h, w, S), page.dtype)
    for s in range(planes):
        for ty in range(top // th, (top + h - 1) // th + 1):
            for tx in range(left // tw, (left + w - 1) // tw + 1):
                index = s * down * across + ty * across + tx
                fh.seek(page.dataoffsets[index])
                data = fh.read(page.databytecounts[index])
                seg, where, _ = page.decode(data, index, jpegtables=page.jpegtables)
                if seg is None:
                    raise DataError(f"{shown_path(fh.path)}: tile {index} is missing; re-export the TIFF")
                seg = seg.reshape(seg.shape[-3], seg.shape[-2], seg.shape[-1])  # [th, tw, S or 1]
                y0, x0 = int(where[-3]), int(where[-2])
                ya, yb = max(top, y0), min(top + h, y0 + seg.shape[0], H)
                xa, xb = max(left, x0), min(left + w, x0 + seg.shape[1], W)
                if ya >= yb or xa >= xb:
                    continue
                block = seg[ya - y0 : yb - y0, xa - x0 : xb - x0]
                if planes > 1:
                    out[ya - top : yb - top, xa - left : xb - left, s] = block[:, :, 0]
                else:
                    out[ya - top : yb - top, xa - left : xb - left] = block
    return out
