"""The data section of pipeline.yaml: where the test images are, the classes, and the
optional ground truth (labels, masks, boxes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import field_validator, model_validator

from kaggle_tta.config.marks import Bundle
from kaggle_tta.config.section_base import Section, check_template


class CsvSource(Section):
    """A CSV listing the test set."""

    path: Annotated[Path, Bundle("data")]
    """The CSV file (relative paths are relative to pipeline.yaml)."""
    id_column: str = "id"
    """Column holding the image id written to the submission."""
    path_column: str | None = None
    """Column holding the image path (relative to `root`); or give `path_template`."""
    path_template: str | None = None
    """Builds the path from the id, e.g. ``images/{id}.jpg`` (relative to `root`)."""
    root: Annotated[Path | None, Bundle("data", "csv-root")] = None
    """Folder the paths are relative to; default: the CSV's folder."""

    @field_validator("path_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        return v if v is None else check_template(v, {"id": "x"}, "images/{id}.jpg")

    @model_validator(mode="after")
    def _one_path_rule(self) -> CsvSource:
        if (self.path_column is None) == (self.path_template is None):
            raise ValueError("give exactly one of 'path_column' or 'path_template'")
        return self


class LabelsSpec(Section):
    """Ground-truth labels for the test set, used only to print the with/without-TTA table."""

    path: Annotated[Path, Bundle("data", optional=True)]
    id_column: str = "id"
    label_column: str = "label"
    """Class name (or, multi-label, space-separated class names)."""


class MasksSpec(Section):
    """Ground-truth masks: one single-channel PNG per image, pixel value 0 for background and
    k + 1 for class k (or, with one class, any non-zero value for it)."""

    folder: Annotated[Path, Bundle("data", "dir", optional=True)]
    template: str = "{id}.png"
    """The mask file of an image, relative to `folder`."""

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        return check_template(v, {"id": "x"}, "{id}.png")


class BoxesSpec(Section):
    """Ground-truth boxes: a CSV with one row per box, pixel corners in the original image."""

    path: Annotated[Path, Bundle("data", optional=True)]
    id_column: str = "id"
    columns: list[str] = ["x1", "y1", "x2", "y2"]
    """The corner columns, in x1, y1, x2, y2 order."""
    label_column: str = "label"
    """Class name of each box."""


class DataConfig(Section):
    """Where the test images are and what the classes are."""

    folder: Annotated[Path | None, Bundle("data", "dir")] = None
    """Every image file in this folder (recursively); id = path relative to it, no suffix."""
    glob: Annotated[str | None, Bundle("data", "glob")] = None
    """A glob pattern (relative to pipeline.yaml); id = file name without suffix."""
    csv: CsvSource | None = None
    """A CSV with an id column and a path column or template."""
    extensions: list[str] = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"]
    """File suffixes picked up by `folder` and `glob`."""
    classes: list[str] | None = None
    """Class names, in the order of the model's outputs; or give `classes_file`."""
    classes_file: Annotated[Path | None, Bundle("classes")] = None
    """A text file with one class name a line."""
    labels: LabelsSpec | None = None
    """Optional ground truth: the run then prints accuracy with and without TTA."""
    masks: MasksSpec | None = None
    """Segmentation ground truth, for the with/without-TTA Dice and IoU table."""
    boxes: BoxesSpec | None = None
    """Detection ground truth, for the with/without-TTA mAP@0.5 table."""

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        given = [k for k in ("folder", "glob", "csv") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'folder', 'glob' or 'csv' (got {given or 'none'})")
        if self.classes is None and self.classes_file is None:
            raise ValueError("give 'classes' (a list of names) or 'classes_file'")
        return self
