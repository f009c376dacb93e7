"""What a pipeline's readers need installed besides our own dependencies."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kaggle_tta.config import PipelineConfig

# What a reader needs installed besides our own dependencies (the Kaggle bundle ships these
# wheels only for a pipeline that reads such files): the first of each is required, the
# others (the pixel-data plugins) shipped where installed here.
READER_NEEDS = {
    "dicom": ("pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg"),
    "tiff": ("tifffile",),
}


def reader_needs(cfg: PipelineConfig) -> dict[str, str]:
    """The distributions the pipeline's readers need (name -> the YAML key that needs it):
    DICOM where a DICOM reader is named or a listed suffix is DICOM's, TIFF where TIFFs are
    read window by window (``segmentation.size: native``)."""
    suffixes = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in cfg.data.extensions}
    if cfg.data.csv is not None and cfg.data.csv.path_template:
        suffixes.add(Path(cfg.data.csv.path_template).suffix.lower())
    kinds = []
    if cfg.data.reader.name == "dicom" or (cfg.data.reader.name == "auto" and suffixes & {".dcm", ".dicom"}):
        kinds.append(("dicom", "data.reader"))
    segmentation = getattr(cfg, "segmentation", None)
    if getattr(segmentation, "size", None) == "native" and suffixes & {".tif", ".tiff"}:
        kinds.append(("tiff", "segmentation.size"))
    import importlib.metadata as md

    needs: dict[str, str] = {}
    for kind, key in kinds:
        for k, name in enumerate(READER_NEEDS[kind]):
            try:
                md.distribution(name)
            except md.PackageNotFoundError:
                if k == 0:  # required: the bundle says what to install
                    needs[name] = key
                continue
            needs[name] = key
    return needs
