"""The data section of pipeline.yaml: where the test images are, the classes, and the
optional ground truth (labels, masks, boxes)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import field_validator, model_validator

from kaggle_tta.config.errors import template_fields
from kaggle_tta.config.marks import Bundle
from kaggle_tta.config.section_base import Section, check_template, class_names


class CsvSource(Section):
    """A CSV (or a JSON list of objects) listing the test set."""

    path: Annotated[Path, Bundle("data")]
    """The CSV or JSON file (relative paths are relative to pipeline.yaml)."""
    id_column: str = "id"
    """Column holding the image id written to the submission."""
    path_column: str | None = None
    """Column holding the image path (relative to `root`); or give `path_template`."""
    path_template: str | None = None
    """Builds the path from the id and the row's other columns, e.g. ``images/{id}.jpg`` or
    ``test_images/{patient_id}/{image_id}.dcm`` (relative to `root`)."""
    root: Annotated[Path | None, Bundle("data", "csv-root")] = None
    """Folder the paths are relative to, or an archive (zip, tar) whose members they name;
    default: the CSV's folder."""
    key: str | None = None
    """A JSON listing (``path`` ending in .json: a list of objects, their fields the columns):
    the key of the object holding that list (COCO's ``images``)."""

    @field_validator("path_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:  # {id} and any column of the CSV (checked against its header when it is read)
            names = template_fields(v)
        except ValueError as exc:
            raise ValueError(f"'{v}' is not a valid template ({exc}); e.g. 'images/{{id}}.jpg'") from None
        odd = [n for n in names if not n.isidentifier()]
        if odd:  # attribute or index access: {id.stem}, {id[0]}
            raise ValueError(f"'{v}': unknown field '{{{odd[0]}}}'; use {{id}} and the CSV's column names")
        return check_template(v, dict.fromkeys(names or ["id"], "x"), "images/{id}.jpg")

    @model_validator(mode="after")
    def _one_path_rule(self) -> CsvSource:
        if (self.path_column is None) == (self.path_template is None):
            raise ValueError("give exactly one of 'path_column' or 'path_template'")
        return self


class RecordsSource(Section):
    """A record file listing the test set: a JSON list of objects, or a parquet table, whose
    rows are the items and whose array columns (``data.reader.columns``) hold their pixels."""

    path: Annotated[Path, Bundle("data")]
    """The .json or .parquet file (relative paths are relative to pipeline.yaml)."""
    id_column: str = "id"
    """The field holding each item's id."""


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


class WindowSpec(Section):
    """The intensity window: the reader's values mapped to [0, 1] before normalization, per
    image. Without one, 8-bit images go through as they always have (uint8, divided by 255 on
    the device), other integer types by their type's maximum, floats as they are: nothing is
    squeezed to 8 bits."""

    mode: Literal["minmax", "percentile", "fixed", "dicom"]
    """minmax: the image's own range; percentile: its ``range`` percentiles (e.g. [1, 99]);
    fixed: the values ``range`` (e.g. Hounsfield units [-1000, 400]); dicom: the file's own
    VOI LUT or window (DICOM only), then its output range."""
    range: tuple[float, float] | None = None
    """percentile: [low, high] percentiles; fixed: [low, high] values."""

    @model_validator(mode="after")
    def _range(self) -> WindowSpec:
        if self.mode in ("percentile", "fixed"):
            if self.range is None:
                raise ValueError(f"mode {self.mode} needs 'range': [low, high]")
            lo, hi = self.range
            if not lo < hi or (self.mode == "percentile" and not 0 <= lo < hi <= 100):
                raise ValueError(
                    f"range must be [low, high] with low < high{' within 0..100' if self.mode == 'percentile' else ''}"
                )
        elif self.range is not None:
            raise ValueError(f"mode {self.mode} takes no 'range'")
        return self


class SliceSpec(Section):
    """Neighbouring slices of a series as channels (2.5-D): each listed slice is an item."""

    number: str = r"slice_(\d+)"
    """A regular expression whose first group is the slice number in a file name."""
    offsets: list[int] = [-2, -1, 0, 1, 2]
    """The neighbours taken, in channel order (0: the slice itself); past an end, the last."""

    @field_validator("number")
    @classmethod
    def _pattern(cls, v: str) -> str:
        import re

        try:
            if re.compile(v).groups < 1:
                raise ValueError("it needs a group, e.g. slice_(\\d+)")
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc})") from None
        return v


# Suffixes that name a reader under ``data.reader.name: auto`` (kaggle_tta.io.readers); any other
# file is an image.
READER_SUFFIXES = {".dcm": "dicom", ".dicom": "dicom", ".npy": "array", ".npz": "array"}


class IdRule(Section):
    """Ids made from the listed paths (UW-Madison's ``case123_day20_slice_0001`` from
    ``case123/case123_day20/scans/slice_0001_266_266_1.50_1.50.png``)."""

    pattern: str
    """A regular expression searched in each listed id (the path relative to data.folder
    without its suffix, or a glob's file stem), with named groups."""
    template: str
    """The id, from the pattern's named groups: ``{case}_{day}_slice_{slice}``."""

    @model_validator(mode="after")
    def _groups(self) -> IdRule:
        import re
        import string

        try:
            names = set(re.compile(self.pattern).groupindex)
        except re.error as exc:
            raise ValueError(f"pattern: not a regular expression ({exc})") from None
        fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f}
        if not fields <= names:
            raise ValueError(f"template: fields {sorted(fields - names)} are no named group of the pattern")
        return self


class ReaderConfig(Section):
    """How an item's files become one array (kaggle_tta.io.readers): which reader, the
    intensity window, and the files of one item when it has several."""

    name: str = "auto"
    """auto (by suffix: .dcm DICOM, .npy/.npz arrays, else images), image, dicom, array, or
    ``module:callable`` (called with the file's path, returning an [H, W] or [H, W, C] array)."""
    key: str | None = None
    """array: the key of an .npz archive (default: its only array)."""
    window: WindowSpec | None = None
    """The intensity window (see WindowSpec); none: as read."""
    channels: list[str] | None = None
    """Several files per item, one channel each, in this order: templates relative to the
    listed file's folder, e.g. ['{id}_red.png', '{id}_green.png', '{id}_blue.png',
    '{id}_yellow.png']; the listing keeps the files of the first template as the items."""
    gray: Literal["rgb", "keep"] = "rgb"
    """A single-channel image: repeated to 3 channels (rgb, as for 8-bit images) or kept."""
    columns: list[str] | None = None
    """records (data.records): the fields holding each item's channels, in this order."""
    frame: int | None = None
    """A file with a time axis last ([H, W, T], Contrails' bands): the frame taken (e.g. 4)."""
    slices: SliceSpec | None = None
    """2.5-D: each item's slice and its neighbours in its folder, as channels."""
    layout: Literal["hwc", "chw"] = "hwc"
    """The axes of a 3-D array as read: hwc (channels last), or chw (channels first: SETI's
    ``(6, 273, 256)`` cadences), moved last before anything else."""
    shape: tuple[int, int] | None = None
    """records: the [H, W] of a field given as a flat list (Statoil's 75 x 75 bands)."""

    @field_validator("channels")
    @classmethod
    def _templates(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            v = [name for t in v for name in _expanded(t)]
            if len(v) < 1:
                raise ValueError("give at least one file template")
            for t in v:
                check_template(t, {"id": "x"}, "{id}_red.png")
        return v

    @property
    def plain(self) -> bool:
        """Today's path: 8-bit images decoded to RGB (the default)."""
        default = self.window is None and self.channels is None and self.columns is None and self.gray == "rgb"
        default = default and self.slices is None and self.frame is None and self.layout == "hwc"
        return self.name == "auto" and default  # a reader named, even image, keeps every bit


def _expanded(template: str) -> list[str]:
    """A range as the shell writes it, ``{00..64}.tif`` (zero-padded to its first bound's
    width), as one template per number: Vesuvius' 65 layers of a fragment."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", template)
    if m is None:
        return [template]
    lo, hi = int(m[1]), int(m[2])
    if hi < lo:
        raise ValueError(f"'{template}': the range {m[0]} runs backwards")
    width = len(m[1]) if m[1].startswith("0") else 0
    head, tail = template[: m.start()], template[m.end() :]
    return [n for k in range(lo, hi + 1) for n in _expanded(f"{head}{k:0{width}d}{tail}")]


class DataConfig(Section):
    """Where the test images are and what the classes are."""

    folder: Annotated[Path | None, Bundle("data", "dir")] = None
    """Every image file in this folder (recursively); id = path relative to it, no suffix."""
    glob: Annotated[str | None, Bundle("data", "glob")] = None
    """A glob pattern (relative to pipeline.yaml); id = file name without suffix."""
    csv: CsvSource | None = None
    """A CSV with an id column and a path column or template."""
    records: RecordsSource | None = None
    """A JSON or parquet file whose rows are the items (with data.reader.columns)."""
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
    id: IdRule | None = None
    """Ids made from the listed paths by a pattern and a template (folder and glob listings)."""
    reader: ReaderConfig = ReaderConfig()
    """How each item is read: DICOM, 16-bit and float images, arrays, several files per item."""

    @property
    def plain_images(self) -> bool:
        """Whether every item is an 8-bit RGB image decoded as always (no reader at work: its
        settings are the defaults, the listing is of files, and no listed suffix names one)."""
        return self.reader.plain and self._images_only

    @property
    def unit_range(self) -> bool:
        """Whether every pixel reaches the views in [0, 1]: 8-bit and other integer images (by
        their type's maximum), or a window; not DICOM, arrays or records read as they are."""
        return self.reader.window is not None or (self.reader.name in ("auto", "image") and self._images_only)

    @property
    def _images_only(self) -> bool:
        """Files are listed (no record file) and no listed suffix names a reader other than images."""
        suffixes = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in self.extensions}
        return self.records is None and not suffixes & set(READER_SUFFIXES)

    @field_validator("classes", mode="before")
    @classmethod
    def _names(cls, v: object) -> object:
        return class_names(v)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        given = [k for k in ("folder", "glob", "csv", "records") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'folder', 'glob', 'csv' or 'records' (got {given or 'none'})")
        if self.records is not None and not self.reader.columns:
            raise ValueError("records: give data.reader.columns, the fields holding each item's channels")
        if self.classes is None and self.classes_file is None:
            raise ValueError("give 'classes' (a list of names) or 'classes_file'")
        return self
