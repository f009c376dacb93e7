"""Row 12: readers. (a) A DICOM decoded and windowed by ``data.reader`` (``name: dicom,
window: {mode: dicom}``: pydicom's decode, modality LUT and VOI LUT, then [0, 1]) against
pydicom alone doing the decode and both LUTs, per image, on 512 x 512 16-bit files written by
pydicom. Goal (#24): at most 1.1x. (b) A 20 000 x 20 000 RGB tiled TIFF segmented at native
size (512-px tiles, hflip, a uint8 cache at scale 0.25): the whole ``kaggle-tta run``'s wall
time and peak RSS. Goal (#24): under 1.5 GB.

    python3 benchmarks/run.py --out X --only readers
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
N_DICOM, SIDE, HUGE = 60, 512, 20000


def _dicoms(folder: Path) -> list[Path]:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for k in range(N_DICOM):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Rows = ds.Columns = SIDE
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = rng.integers(0, 4096, (SIDE, SIDE), dtype=np.uint16).tobytes()
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
        paths.append(folder / f"{k}.dcm")
    return paths


def _dicom_times(paths: list[Path], repeats: int = 3) -> dict[str, float]:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from kaggle_tta.config.data import ReaderConfig
    from kaggle_tta.io.readers import read_item

    spec = ReaderConfig(name="dicom", window={"mode": "dicom"})

    def alone(p: Path) -> np.ndarray:
        ds = pydicom.dcmread(p)
        return apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)

    def ours(p: Path) -> np.ndarray:
        return read_item(str(p), spec)

    best: dict[str, float] = {}
    for _ in range(repeats):  # interleaved; the best of each
        for name, fn in (("pydicom", alone), ("kaggle_tta", ours)):
            t0 = time.perf_counter()
            for p in paths:
                fn(p)
            best[name] = min(best.get(name, 1e9), (time.perf_counter() - t0) / len(paths))
    return best


def _huge(root: Path) -> dict[str, Any]:
    import tifffile
    import yaml

    (root / "test").mkdir(parents=True, exist_ok=True)
    t = 512

    def tiles():
        for ty in range(0, HUGE, t):
            for tx in range(0, HUGE, t):
                yy, xx = np.mgrid[ty : ty + t, tx : tx + t]
                tile = np.full((t, t, 3), 25, np.uint8)
                tile[..., 0][((yy // 700 + xx // 900) % 2) == 1] = 230
                yield tile

    tif = root / "test" / "slide.tif"
    if not tif.is_file():
        tifffile.imwrite(tif, tiles(), shape=(HUGE, HUGE, 3), dtype=np.uint8, tile=(t, t), compression="zlib")
    cfg = {
        "task": "segmentation",
        "data": {"folder": str(root / "test"), "classes": ["r", "g", "b", "never"]},
        "runtime": {"device": "cpu", "precision": "fp32", "workers": 0, "batch_size": 1, "forward_batch": 16},
        "cache": {"dir": str(root / "cache"), "dtype": "uint8", "scale": 0.25},
        "segmentation": {"size": "native"},
        "members": [
            {
                "name": "m",
                "factory": "helpers:bright_pixels",
                "preprocess": {"mean": [0.0] * 3, "std": [0.5] * 3},
                "tiling": {"tile": t, "overlap": 0.0, "weight": "uniform"},
                "tta": "hflip",
            }
        ],
        "submission": {"path": str(root / "sub.csv"), "format": "rle", "rle": {"rows": "image_class"}},
    }
    (root / "p.yaml").write_text(yaml.safe_dump(cfg))
    script = (
        f"import resource, sys; sys.path.insert(0, {str(REPO / 'tests')!r}); from kaggle_tta.cli import main; "
        f"code = main(['run', {str(root / 'p.yaml')!r}, '-q']); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, code)"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    line = next((x for x in out.stdout.splitlines() if x.startswith("PEAK")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"huge TIFF run failed: {out.stderr[-500:]}")
    _, peak, code = line.split()
    return {"wall_s": wall, "peak_mb": int(peak), "code": int(code), "side": HUGE}


def readers_row(b: Any, log: Any, med: Any) -> None:
    """Runs the row; ``log`` and ``med`` are the orchestrator's (benchmarks/run.py)."""
    log("readers: DICOM decode + window against pydicom alone")
    times = _dicom_times(_dicoms(b.runs / "readers-dicom"))
    log(f"readers: a {HUGE} x {HUGE} TIFF at native size")
    b.res["readers"] = {"dicom": times, "huge": _huge(b.runs / "readers-huge")}


def readers_report(res: dict[str, Any], goals: list, med: Any) -> list[str]:
    rr = res.get("readers")
    if not rr:
        return []
    d, h = rr["dicom"], rr["huge"]
    ratio = d["kaggle_tta"] / d["pydicom"]
    L = ["## Row 12: readers (DICOM decode + window; a huge TIFF at native size)", ""]
    L.append(
        f"{N_DICOM} DICOMs of {SIDE} x {SIDE} (16-bit, rescale and window tags), the best of 3 interleaved passes; "
        f"the TIFF is {h['side']} x {h['side']} RGB, 512-px zlib tiles, run with 512-px tiles, hflip, a uint8 cache at "
        "scale 0.25, in a child process."
    )
    L.append("")
    L.append("| what | figure | goal |")
    L.append("|---|---|---|")
    L.append(f"| pydicom alone (decode, modality LUT, VOI LUT) | {1000 * d['pydicom']:.2f} ms/image | — |")
    L.append(f"| `data.reader` dicom + window dicom | {1000 * d['kaggle_tta']:.2f} ms/image ({ratio:.2f}x) | ≤ 1.10x |")
    L.append(f"| huge TIFF, whole `kaggle-tta run` | {h['wall_s']:.0f} s, peak RSS {h['peak_mb']} MB | < 1536 MB |")
    L.append("")
    goals.append(("DICOM reader vs pydicom alone", f"{ratio:.2f}x", "met" if ratio <= 1.1 else "missed"))
    goals.append(("huge TIFF peak RSS", f"{h['peak_mb']} MB", "met" if h["peak_mb"] < 1536 else "missed"))
    return L


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(_dicom_times(_dicoms(Path(tmp) / "dcm"))))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "MB")
