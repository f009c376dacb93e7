"""Readers: how an item's files become one array, in the loader workers (``data.reader``).

A registry, as tasks and views are: each reader owns its file types and its errors, and hands
the loader an ``[H, W, C]`` array of the item's own dtype and channel count. Then the
intensity window (:func:`apply_window`) maps it to float32 in [0, 1]; without one, 8-bit
images stay uint8 exactly as they always have, other integer types are divided by their
type's maximum and floats pass as they are (nothing is squeezed to 8 bits).

Built in: ``image`` (OpenCV, every bit depth), ``dicom`` (pydicom with the pylibjpeg plugins
for JPEG 2000 / JPEG-LS: the rescale slope and intercept applied, MONOCHROME1 inverted, the
file's VOI LUT or window under ``window: {mode: dicom}``), ``array`` (.npy, .npz by key) and
``module:callable``. Where the libraries do the work (decoding, the modality and VOI LUTs)
they are called, not re-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kaggle_tta.config.data import READER_SUFFIXES
from kaggle_tta.config.errors import ConfigError, DataError, shown_path
from kaggle_tta.io.intensity import apply_window, gray_to_rgb
from kaggle_tta.io.zips import ZIP_SEP, is_zip_item, member_bytes, source

if TYPE_CHECKING:
    from kaggle_tta.config import PipelineConfig
    from kaggle_tta.config.data import ReaderConfig

Reader = Callable[[str, "ReaderConfig"], np.ndarray]
READERS: dict[str, Reader] = {}
RECORD = "#row="  # an item that is a row of a record file: <file>#row=<k>
SUFFIXES = READER_SUFFIXES


def register_reader(name: str) -> Callable[[Reader], Reader]:
    """Registers ``fn(path, spec) -> [H, W(, C)] array`` under ``name`` (``data.reader.name``)."""

    def add(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn

    return add


def reader_for(spec: ReaderConfig, path: str) -> Reader:
    """The reader of ``path`` under ``spec`` (auto: by its suffix; a row of a record file)."""
    name = spec.name
    if name == "auto":
        name = "records" if RECORD in path else SUFFIXES.get(Path(path).suffix.lower(), "image")
    if name in READERS:
        return READERS[name]
    if ":" in name:
        from kaggle_tta.io.models import import_callable

        fn = import_callable(name, "data.reader.name")
        return lambda p, s: np.asarray(fn(p))
    raise ConfigError(f"data.reader.name: unknown reader '{name}'; use auto, {', '.join(READERS)} or module:callable")


def reader_of(cfg: PipelineConfig) -> ReaderConfig | None:
    """The loader's reader: None where every item is a plain 8-bit image (decoded as always)."""
    return None if cfg.data.plain_images else cfg.data.reader


def read_item(path: str, spec: ReaderConfig, item_id: str | None = None) -> np.ndarray:
    """The item at ``path`` (and its other channel files) as ``[H, W, C]``, windowed.

    Raises:
        DataError: a file that cannot be read, naming it and what is wrong.
    """
    reader = reader_for(spec, path)
    if spec.window is not None and spec.window.mode == "dicom" and reader is not read_dicom:
        raise ConfigError(
            f"data.reader.window: mode dicom is the file's own VOI window; {shown_path(path)} is no DICOM"
        )
    if spec.channels is None and spec.slices is None:
        arr = _hwc(_frame(reader(path, spec), spec, path), path)
    else:
        files = channel_files(path, spec, item_id) if spec.channels else slice_files(path, spec)
        planes: list[np.ndarray] = []
        for f in files:
            a = _hwc(_frame(reader_for(spec, f)(f, spec), spec, f), f)
            if a.shape[2] != 1:
                raise DataError(f"{shown_path(f)}: {a.shape[2]} channels; data.reader.channels takes one per file")
            if planes and a.shape[:2] != planes[0].shape[:2]:
                raise DataError(
                    f"{shown_path(f)}: {a.shape[0]}x{a.shape[1]} where {shown_path(files[0])} is "
                    f"{planes[0].shape[0]}x{planes[0].shape[1]}; the files of one item must have one size"
                )
            planes.append(a)
        arr = np.concatenate(planes, axis=2)
    arr = apply_window(arr, spec.window, path)  # on the channels read: a repeated gray is windowed once
    if arr.shape[2] == 1 and spec.gray == "rgb":  # one channel repeated to 3, as an 8-bit gray image is
        arr = gray_to_rgb(arr)
    return arr


def _frame(arr: Any, spec: ReaderConfig, path: str) -> Any:
    """One frame of a file with a time (or band) axis last, ``data.reader.frame`` (Contrails'
    band_XX.npy, [H, W, T]); other files as they are. A channels-first array
    (``data.reader.layout: chw``) has its first axis moved last first."""
    a = np.asarray(arr)
    if spec.layout == "chw" and a.ndim == 3:
        a = np.moveaxis(a, 0, -1)
    if spec.frame is None or a.ndim != 3:
        return a
    if not -a.shape[2] <= spec.frame < a.shape[2]:
        raise DataError(f"{shown_path(path)}: {a.shape[2]} frames; data.reader.frame {spec.frame} is not one of them")
    return a[:, :, spec.frame]


def slice_files(path: str, spec: ReaderConfig) -> list[str]:
    """2.5-D: the item's slice and its neighbours at ``data.reader.slices.offsets`` in its
    folder, by the slice number ``data.reader.slices.number`` reads off each file name; a
    neighbour past the series' end repeats the last slice there."""
    assert spec.slices is not None
    folder = Path(path).parent
    mine = _number(Path(path).name, spec.slices.number)
    if mine is None:
        raise DataError(f"{shown_path(path)}: no slice number in its name (data.reader.slices.number)")
    numbered = dict(_numbered(str(folder), spec.slices.number, Path(path).suffix.lower()))
    numbered[mine] = path  # the item itself, whatever else shares its number
    order = sorted(numbered)
    at = order.index(mine)
    return [numbered[order[min(max(at + d, 0), len(order) - 1)]] for d in spec.slices.offsets]


def _number(name: str, pattern: str) -> int | None:
    m = re.search(pattern, name)
    return int(m.group(1)) if m else None


_FOLDERS: dict[tuple[str, str, str, int], dict[int, str]] = {}  # per process: each series, listed once


def _numbered(folder: str, pattern: str, suffix: str) -> dict[int, str]:
    """The folder's files of ``suffix`` by slice number (listed again once the folder changes)."""
    try:
        key = (folder, pattern, suffix, os.stat(folder).st_mtime_ns)
        if key not in _FOLDERS:
            found: dict[int, str] = {}
            for name in sorted(os.listdir(folder)):
                n = _number(name, pattern)
                if n is not None and Path(name).suffix.lower() == suffix:
                    found.setdefault(n, str(Path(folder) / name))
            _FOLDERS.clear()
            _FOLDERS[key] = found
    except OSError as exc:
        raise DataError(f"{shown_path(folder)}: cannot list its slices ({exc.strerror})") from None
    return _FOLDERS[key]


def channel_files(path: str, spec: ReaderConfig, item_id: str | None = None) -> list[str]:
    """The files of one item, in channel order: each template of ``data.reader.channels``
    with the item's id (read off the listed file by the first template), in its folder."""
    assert spec.channels is not None
    folder = Path(path).parent
    key = item_id if item_id is not None else template_id(Path(path).name, spec.channels[0])
    if "{id}" not in spec.channels[0]:  # the item is its folder (Contrails: <record>/band_11.npy)
        key = folder.name
    if key is None:
        raise DataError(f"{shown_path(path)}: its name does not match data.reader.channels[0] '{spec.channels[0]}'")
    return [str(folder / t.format(id=Path(key).name)) for t in spec.channels]


def template_id(name: str, template: str) -> str | None:
    """The ``{id}`` a file name was made with by ``template`` (None: another name)."""
    head, _, tail = template.partition("{id}")
    m = re.fullmatch(re.escape(head) + "(?P<id>.+?)" + re.escape(tail), name)
    return m.group("id") if m else None


def opencv() -> Any:
    """cv2, its own log lines off (we report our own, in one line)."""
    import cv2

    if hasattr(cv2, "setLogLevel"):
        cv2.setLogLevel(2)  # errors only
    return cv2


def _hwc(arr: Any, path: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[0] == 0 or a.shape[1] == 0:
        raise DataError(f"{shown_path(path)}: read as shape {a.shape}; a reader returns [H, W] or [H, W, C]")
    if a.dtype.kind not in "uif" and a.dtype != np.bool_:
        raise DataError(f"{shown_path(path)}: pixel type {a.dtype} is not a number")
    return a


@register_reader("image")
def read_image(path: str, spec: ReaderConfig) -> np.ndarray:
    """Any bit depth OpenCV decodes, channels in RGB(A) order; a single-channel image [H, W]."""
    img = _decoded(path)
    if img.ndim == 3 and img.shape[2] == 3:
        return img[:, :, ::-1].copy()
    if img.ndim == 3 and img.shape[2] == 4:
        return img[:, :, [2, 1, 0, 3]].copy()
    return img


@register_reader("array")
def read_array(path: str, spec: ReaderConfig) -> np.ndarray:
    """An .npy array, or an .npz archive's ``data.reader.key`` (its only array by default)."""
    try:
        data = np.load(source(path), allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{shown_path(path)}: cannot read as a NumPy array ({exc}); re-save it with numpy.save"
        ) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        return data
    with data:
        keys = list(data.keys())
        key = spec.key if spec.key is not None else (keys[0] if len(keys) == 1 else None)
        if key is None or key not in keys:
            want = f"no array '{spec.key}'" if spec.key else f"{len(keys)} arrays"
            raise DataError(f"{shown_path(path)}: {want} (it holds {keys}); set data.reader.key")
        return data[key]


@register_reader("dicom")
def read_dicom(path: str, spec: ReaderConfig) -> np.ndarray:
    """A DICOM file's pixels through pydicom: the modality LUT (rescale slope and intercept)
    applied, then, under ``window: {mode: dicom}``, the VOI LUT or window; MONOCHROME1
    inverted so that bright is dense, as for MONOCHROME2. The first frame of a multi-frame file."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise ConfigError("data.reader: DICOM needs pydicom; pip install 'kaggle-tta[dicom]'") from None
    try:
        ds = pydicom.dcmread(source(path))
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise DataError(f"{shown_path(path)}: not a readable DICOM file ({exc})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(f"{shown_path(path)}: a DICOM file without pixel data; remove it from the test set")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # an unsupported transfer syntax names the package that decodes it
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise DataError(
            f"{shown_path(path)}: cannot decode its pixels (transfer syntax {getattr(syntax, 'name', syntax)}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); JPEG 2000 and "
            "JPEG-LS need pylibjpeg with pylibjpeg-openjpeg / pylibjpeg-libjpeg (pip install 'kaggle-tta[dicom]')"
        ) from None
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("MONOCHROME"):
        arr = apply_modality_lut(arr, ds)
        if spec.window is not None and spec.window.mode == "dicom":
            arr = apply_voi_lut(arr, ds)
        arr = np.asarray(arr, dtype=np.float32)
        if photometric == "MONOCHROME1":  # low values are bright: inverted within the range the file can hold
            lo, hi = _value_range(ds, spec, apply_modality_lut, apply_voi_lut)
            arr = np.float32(lo + hi) - arr
    elif spec.window is not None and spec.window.mode == "dicom":
        raise ConfigError(f"data.reader.window: dicom windows monochrome images; {shown_path(path)} is {photometric}")
    return arr


def _value_range(ds: Any, spec: ReaderConfig, modality: Any, voi: Any) -> tuple[float, float]:
    """The lowest and highest value a monochrome file can hold after the reader's LUTs: the
    stored range (BitsStored, signed or not) through the modality LUT and, under
    ``window: dicom``, the VOI LUT. Inverting within it (not within the image's own range)
    keeps MONOCHROME1 values on the scale of MONOCHROME2 files, so a fixed window treats both
    alike."""
    bits = int(getattr(ds, "BitsStored", 0) or getattr(ds, "BitsAllocated", 16) or 16)
    signed = int(getattr(ds, "PixelRepresentation", 0) or 0) == 1
    ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1], dtype=np.int64)
    out = modality(ends, ds)
    if spec.window is not None and spec.window.mode == "dicom":
        out = voi(out, ds)
    out = np.asarray(out, dtype=np.float64)
    return float(out.min()), float(out.max())


def _decoded(path: Path | str, data: bytes | None = None) -> np.ndarray:
    """The file (or ``data``, an encoded image named ``path``) as OpenCV decodes it, unchanged
    (BGR(A) order, its own depth); a file that cannot be read, is empty, or does not decode
    is one DataError naming it."""
    try:
        if data is None and is_zip_item(path):
            data = member_bytes(str(path))
        buf = np.frombuffer(data, np.uint8) if data is not None else np.fromfile(str(path), np.uint8)
    except OSError as exc:
        raise DataError(f"{shown_path(path)}: cannot read ({exc.strerror})") from None
    if buf.size == 0:
        raise DataError(f"{shown_path(path)}: zero-byte image file; replace or remove it")
    img = opencv().imdecode(buf, opencv().IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise DataError(f"{shown_path(path)}: unreadable or truncated image; re-export or remove it")
    return img


def decode_image(path: Path | str, data: bytes | None = None) -> np.ndarray:
    """Reads an image (or decodes ``data``, named ``path``) as uint8 RGB ``[H, W, 3]``,
    converting the formats listed above.

    Raises:
        DataError: zero bytes, unreadable or truncated, naming the path.
    """
    cv2 = opencv()
    img = _decoded(path, data)
    if img.dtype == np.uint16:
        img = (img.astype(np.uint32) // 257).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        img = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise DataError(f"{shown_path(path)}: unsupported pixel type {img.dtype}; convert to 8 or 16 bits")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def items_of(ids: list[str], paths: list[str], templates: list[str]) -> tuple[list[str], list[str]]:
    """The listed files that ``templates[0]`` (data.reader.channels) names, each an item whose
    id is the template's ``{id}`` (in its folder, for a folder listing); a file another
    template names (``a_nir.tif`` beside ``a.tif`` under ``{id}.tif``) is no item."""
    template = templates[0]
    found: list[tuple[str, str, str]] = []  # (id, path, key)
    for i, p in zip(ids, paths):
        folder = i.rpartition("/")[0]
        if "{id}" not in template:  # each folder is an item: its id is the folder's own
            if Path(p).name == template:
                found.append((folder or Path(p).parent.name, p, ""))
            continue
        key = template_id(Path(p).name, template)
        if key is not None:
            found.append((f"{folder}/{key}" if folder else key, p, key))
    others = {(str(Path(p).parent), t.format(id=key)) for _, p, key in found for t in templates[1:]}
    kept = [(i, p) for i, p, _ in found if (str(Path(p).parent), Path(p).name) not in others]
    return [i for i, _ in kept], [p for _, p in kept]


def item_files(ids: Sequence[str], paths: Sequence[str], cfg: PipelineConfig) -> tuple[list[str], list[str]]:
    """Every file the test set's items read, with an id per file: one per item, or, for items
    of several files (data.reader.channels, or 2.5-D slices), each one's file (the fingerprint
    hashes them)."""
    reader = cfg.data.reader
    if cfg.data.records is not None:  # rows of one file: the file
        return ["records"], [str(cfg.resolve(cfg.data.records.path))]
    if paths and is_zip_item(paths[0]):  # members of an archive: the archive, and which member each row is
        rows = hashlib.sha256("\n".join(f"{i}\0{p}" for i, p in zip(ids, paths)).encode()).hexdigest()
        return [f"archive {rows}"], [str(paths[0]).partition(ZIP_SEP)[0]]
    if not reader.channels and reader.slices is None:
        return list(ids), list(paths)
    out_ids, out_paths = [], []
    for i, p in zip(ids, paths):  # 2.5-D: the neighbours read, in their order, whatever lists the items
        files = channel_files(p, reader) if reader.channels else slice_files(p, reader)
        for k, f in enumerate(files):
            out_ids.append(f"{i}#{k}")
            out_paths.append(f)
    return out_ids, out_paths


# ---- record files: rows are items (Statoil's test.json) -------------------------------------

_TABLES: dict[tuple[str, int, int], list[dict[str, Any]]] = {}  # per process: one table read once


def record_item(path: Path | str, k: int) -> str:
    """The loader's name for row ``k`` of a record file."""
    return f"{path}{RECORD}{k}"


def _table(path: str) -> list[dict[str, Any]]:
    """A record file's rows (a JSON list of objects, or a parquet table), read once per process."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataError(f"{shown_path(path)}: cannot read ({exc.strerror}); check data.records.path") from None
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _TABLES:
        _TABLES.clear()
        try:
            if path.lower().endswith(".parquet"):
                import polars as pl

                rows = pl.read_parquet(path).to_dicts()
            else:
                with open(path, encoding="utf-8") as f:
                    rows = json.load(f)
        except (OSError, ValueError) as exc:
            raise DataError(f"{shown_path(path)}: not a readable record file ({exc}); give JSON or parquet") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{shown_path(path)}: a record file is a list of objects (one per item)")
        _TABLES[key] = rows
    return _TABLES[key]


def list_records(path: Path, id_column: str) -> list[str]:
    """The ids of a record file's rows, in file order."""
    rows = _table(str(path))
    missing = next((k for k, r in enumerate(rows) if id_column not in r), None)
    if missing is not None:
        raise DataError(f"{shown_path(path)}: row {missing + 1} has no field '{id_column}'; set data.records.id_column")
    return [str(r[id_column]) for r in rows]


@register_reader("records")
def read_record(item: str, spec: ReaderConfig) -> np.ndarray:
    """Row k's ``data.reader.columns`` as channels ``[H, W, C]`` (a flat list reshaped to
    ``data.reader.shape``); values as they are (float32)."""
    path, _, k = item.rpartition(RECORD)
    row = _table(path)[int(k)]
    planes = []
    for col in spec.columns or []:
        if col not in row:
            raise DataError(f"{shown_path(path)}: row {int(k) + 1} has no field '{col}' (data.reader.columns)")
        planes.append(_field(row[col], spec, f"{shown_path(path)}: row {int(k) + 1}, field '{col}'"))
    if any(p.shape[:2] != planes[0].shape[:2] or p.dtype != planes[0].dtype for p in planes):
        raise DataError(f"{shown_path(path)}: row {int(k) + 1}: the columns' shapes or kinds differ")
    return np.concatenate(planes, axis=2)


def _field(value: Any, spec: ReaderConfig, where: str) -> np.ndarray:
    """One field of a record as ``[H, W, C]``: an encoded image (bytes, or a dict with
    ``bytes``: a Hugging Face image column) decoded as a file is, RGB uint8; else numbers,
    reshaped to ``data.reader.shape``, float32, one channel."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if isinstance(data, (bytes, bytearray)):
        return decode_image(where, bytes(data))
    try:
        a = np.asarray(value, dtype=np.float32)
        if spec.shape is not None:
            a = a.reshape(spec.shape)
    except (TypeError, ValueError) as exc:
        shown = str(exc) if len(str(exc)) <= 120 else str(exc)[:117] + "..."
        raise DataError(f"{where}: not an array of that shape ({shown})") from None
    if a.ndim != 2:
        raise DataError(f"{where} has shape {a.shape}; set data.reader.shape")
    return a[:, :, None]
