"""The task sections of pipeline.yaml: tiling (a member's sliding-window inference), and the
segmentation, detection and run-length-encoding settings. Every model forbids unknown keys."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from kaggle_tta.config.section_base import Section, check_fraction, check_fractions, check_positive, check_template


class TilingConfig(Section):
    """Sliding-window inference (segmentation): the canvas is cut into overlapping tiles, each
    tile goes through every view, and the inverted tile maps are stitched with weights."""

    tile: int | list[int]
    """Tile size: one side, or [H, W]. A canvas side smaller than the tile is one tile."""
    overlap: float = 0.25
    """Fraction of the tile shared with its neighbour, in [0, 1)."""
    weight: Literal["gaussian", "uniform"] = "gaussian"
    """gaussian down-weights tile borders, where context is missing (as nnU-Net does)."""
    sigma: float = 0.125
    """The gaussian's standard deviation, as a fraction of the tile side."""

    @field_validator("tile")
    @classmethod
    def _tile(cls, v: int | list[int]) -> int | list[int]:
        sides = [v] if isinstance(v, int) else v
        if len(sides) not in (1, 2) or any(s < 1 for s in sides):
            raise ValueError("give one positive side or [H, W]")
        return v

    @field_validator("overlap")
    @classmethod
    def _overlap(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1)")
        return v

    @field_validator("sigma")
    @classmethod
    def _sigma(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @property
    def size(self) -> tuple[int, int]:
        t = self.tile
        return (t, t) if isinstance(t, int) else (int(t[0]), int(t[-1]))


class SegmentationConfig(Section):
    """Segmentation settings shared by every member."""

    size: list[int] | Literal["native"] | None = None
    """Working canvas [H, W]: every image is resized to it, maps are predicted there and
    resized back to each image's own size for the submission. null: images are used at their
    size, which they must all share. native: each image at its own size, any size, read window
    by window (tiles of a TIFF from disk) and tiled by each member's ``tiling``; maps are cached
    at ``cache.scale`` of each image and written back band by band, so memory is bounded by
    the tiles in flight, not by the image."""
    threshold: float | list[float] = 0.5
    """Sigmoid members: a pixel belongs to a class when its probability reaches this; one
    value, or a list with one per class (``kaggle-tta tune`` writes one)."""
    min_area: int | list[int] = 0
    """Connected components smaller than this many pixels (of the image) are removed before
    encoding; one value, or a list with one per class."""

    @field_validator("size")
    @classmethod
    def _size(cls, v: list[int] | str | None) -> list[int] | str | None:
        if isinstance(v, list) and (len(v) != 2 or any(s < 1 for s in v)):
            raise ValueError("give [H, W] with positive sizes, null (the images' one size) or native (each its own)")
        return v

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float | list[float]) -> float | list[float]:
        return check_fractions(v)

    @field_validator("min_area")
    @classmethod
    def _min_area(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, list) and not v:
            raise ValueError("give one value, or a non-empty list with one per class")
        bad = [a for a in (v if isinstance(v, list) else [v]) if a < 0]
        if bad:
            raise ValueError(f"must be 0 (keep every component) or more, got {bad[0]}")
        return v


class DetectionConfig(Section):
    """Box fusion settings (ensemble-boxes), used over a member's views and in blends."""

    iou_thr: float = 0.55
    """IoU above which two boxes of a class match."""
    skip_box_thr: float = 0.0
    """Boxes scoring below this are dropped before fusion."""
    conf_type: Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"] = "avg"
    """wbf: how a fused box's confidence is computed."""
    sigma: float = 0.5
    """soft_nms: the gaussian's width."""
    thresh: float = 0.001
    """soft_nms: boxes whose decayed score falls to this are dropped."""
    map_rule: Literal["voc", "coco"] = "voc"
    """How the report's mAP@0.5 reads AP off the precision/recall curve: voc (all-point, VOC
    2010+) or coco (101 recall points and at most 100 boxes per image and class, as
    pycocotools); the table's header names the one printed."""
    max_boxes: int | None = None
    """Keep at most this many boxes per image (highest scores), after fusion; null: all."""

    @field_validator("iou_thr", "skip_box_thr", "thresh")
    @classmethod
    def _fraction(cls, v: float) -> float:
        return check_fraction(v)

    @field_validator("sigma")
    @classmethod
    def _sigma(cls, v: float) -> float:
        return check_positive(v)

    @field_validator("max_boxes")
    @classmethod
    def _max_boxes(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1, or null to keep every box (got {v})")
        return v


class RLEConfig(Section):
    """Run-length encoding of segmentation masks, with the options competitions differ on."""

    order: Literal["column", "row"] = "column"
    """column: pixels numbered top to bottom, then left to right (most competitions);
    row: left to right, then top to bottom (e.g. Vesuvius)."""
    one_indexed: bool = True
    """Starts count from 1 (most competitions) or from 0."""
    empty: str = ""
    """What an empty mask is written as: '', '-1' or '-'."""
    rows: Literal["image", "image_class"] = "image_class"
    """One row per image (the union of foreground classes) or one per (image, class)."""
    id_template: str = "{id}_{class}"
    """The id of an image_class row; fields {id}, {class} (name) and {index} (0-based). With
    ``class_column`` it defaults to ``{id}``."""
    column: str = "EncodedPixels"
    """The column holding the RLE."""
    class_column: str | None = None
    """image_class rows with the class name in a column of its own (UW-Madison's
    ``id,class,predicted``); a sample is then matched on (id, class)."""

    @model_validator(mode="after")
    def _class_column(self) -> RLEConfig:
        if self.class_column is not None:
            if self.rows != "image_class":
                raise ValueError("class_column: one row per (image, class); set rows: image_class")
            if "id_template" not in self.model_fields_set:
                self.id_template = "{id}"
        return self

    @field_validator("id_template")
    @classmethod
    def _template(cls, v: str) -> str:
        return check_template(v, {"id": "x", "class": "c", "index": 0}, "{id}_{class}")


class RegressionConfig(Section):
    """Regression (``task: regression``): each member's outputs, one float per target (the
    names in ``data.classes``), merged over views and blended as values, then mapped to the
    competition's range."""

    scale: float = 1.0
    """Each written value is ``offset + scale * v`` (a model trained on target / 100 with a
    sigmoid writes 1..100 with scale 100)."""
    offset: float = 0.0
    """See ``scale``."""
    clip: tuple[float, float] | None = None
    """[low, high]: written values kept in the range the grader accepts (PetFinder: [1, 100])."""
    cutoffs: list[float] | None = None
    """Ascending: each value (after scale, offset and clip) written as the number of cutoffs
    at or below it, an integer grade (APTOS' regression heads: ``[0.5, 1.5, 2.5, 3.5]`` gives
    0-4 for quadratic weighted kappa)."""

    @model_validator(mode="after")
    def _range(self) -> RegressionConfig:
        if self.clip is not None and not self.clip[0] <= self.clip[1]:
            raise ValueError("clip must be [low, high] with low <= high")
        if self.cutoffs is not None and (
            not self.cutoffs or any(a >= b for a, b in zip(self.cutoffs, self.cutoffs[1:]))
        ):
            raise ValueError(f"cutoffs must be one or more ascending numbers, got {self.cutoffs}")
        return self
