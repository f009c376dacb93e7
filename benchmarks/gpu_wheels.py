"""Fills .whl/ with the wheels the GPU machine lacks, for CPython 3.12 manylinux x86_64, small
enough for the 64 MiB the working tree may weigh when it travels there.

    python3 benchmarks/gpu_wheels.py            # .whl/ at the repo root (listed in .git/info/exclude)

Versions are the ones installed here (``importlib.metadata``). The GPU machine already has torch,
torchvision, timm, numpy, pandas, numba, opencv, pyyaml, safetensors, tqdm; it lacks
albumentations (+ albucore, stringzilla, simsimd, scipy), pydantic (+ pydantic-core,
annotated-types, typing-inspection; typing-extensions comes along for pydantic's floor),
ensemble-boxes, polars (+ polars-runtime-32) and ttach.

Two wheels are made smaller, both still installed by a plain ``pip install``:

- polars-runtime-32 (51 MiB, one 170 MiB shared library) is re-zipped with LZMA (zip method 14,
  which Python's zipfile, hence pip, reads): ~31 MiB. Contents and RECORD unchanged.
- scipy (34 MiB) is cut down to what ``import albumentations`` loads, ``scipy.special`` (with
  ``scipy._lib``, the top-level modules and the bundled ``scipy.libs``: special's ufuncs link
  OpenBLAS/gfortran); RECORD lists what is kept. Any other ``import scipy.X`` raises
  ImportError there. Nothing the benchmark or the smoke check runs needs more.
"""

from __future__ import annotations

import csv
import io
import lzma
import struct
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEST = REPO / ".whl"
PACKAGES = [
    "albumentations",
    "albucore",
    "stringzilla",
    "simsimd",
    "scipy",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "ensemble-boxes",
    "polars",
    "polars-runtime-32",
    "ttach",
]
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
SCIPY_KEEP = ("scipy/_lib/", "scipy/special/", "scipy.libs/")
SLIM_MARK = "kaggle-tta-slim"  # zip comment of a wheel already made smaller


def download(spec: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *[a for p in PLATFORMS for a in ("--platform", p)],
        "-d",
        str(DEST),
        spec,
    ]
    subprocess.run(cmd, check=True)


class _LZMA9(zipfile.LZMACompressor):
    """zipfile's LZMA compressor at preset 9 (64 MiB dictionary): the reader takes the
    properties from the stream, so any preset reads back."""

    def _init(self):
        props = lzma._encode_filter_properties({"id": lzma.FILTER_LZMA1, "preset": 9})
        self._comp = lzma.LZMACompressor(
            lzma.FORMAT_RAW, filters=[lzma._decode_filter_properties(lzma.FILTER_LZMA1, props)]
        )
        return struct.pack("<BBH", 9, 4, len(props)) + props


def rezip(path: Path, keep=lambda name: True, lzma_: bool = False) -> None:
    zipfile.LZMACompressor = _LZMA9  # type: ignore[misc]
    tmp = path.with_suffix(".tmp")
    method = zipfile.ZIP_LZMA if lzma_ else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path) as zi, zipfile.ZipFile(tmp, "w") as zo:
        names = [i.filename for i in zi.infolist()]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        for info in zi.infolist():
            if (
                not keep(info.filename)
                and not info.filename.endswith(".dist-info/")
                and ".dist-info/" not in info.filename
            ):
                continue
            data = zi.read(info)
            if info.filename == record:  # list only what is kept
                rows = [
                    r for r in csv.reader(io.StringIO(data.decode())) if r and (keep(r[0]) or ".dist-info/" in r[0])
                ]
                buf = io.StringIO()
                csv.writer(buf, lineterminator="\n").writerows(rows)
                data = buf.getvalue().encode()
            out = zipfile.ZipInfo(info.filename, info.date_time)
            out.external_attr = info.external_attr
            out.compress_type = method
            zo.writestr(out, data, compresslevel=9 if not lzma_ else None)
        zo.comment = SLIM_MARK.encode()
    tmp.replace(path)


def slim(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        if z.comment == SLIM_MARK.encode():
            return
    before = path.stat().st_size
    if path.name.startswith("polars_runtime"):
        rezip(path, lzma_=True)
    elif path.name.startswith("scipy-"):
        rezip(
            path, keep=lambda n: n.startswith(SCIPY_KEEP) or (n.startswith("scipy/") and n.count("/") == 1), lzma_=True
        )
    else:
        return
    print(f"{path.name}: {before / 2**20:.1f} -> {path.stat().st_size / 2**20:.1f} MiB", flush=True)


def main() -> int:
    DEST.mkdir(exist_ok=True)
    for name in PACKAGES:
        spec = f"{name}=={version(name)}"
        norm = name.replace("-", "_").lower()
        if not any(p.name.lower().startswith(f"{norm}-{version(name)}-") for p in DEST.glob("*.whl")):
            print(f"download {spec}", flush=True)
            download(spec)
    for w in sorted(DEST.glob("*.whl")):
        slim(w)
    total = sum(p.stat().st_size for p in DEST.glob("*.whl"))
    print(f"{DEST}: {len(list(DEST.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
