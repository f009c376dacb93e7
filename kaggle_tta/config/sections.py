"""The sections of pipeline.yaml: runtime, cache, members (preprocess), blends and the
submission (the data section is config.data; tiling and the task settings are
config.task_sections; the base model and shared checks are config.section_base). Every model
forbids unknown keys."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from kaggle_tta.config.errors import did_you_mean, template_fields
from kaggle_tta.config.marks import FACTORY_PATH_KWARGS, Bundle
from kaggle_tta.config.rows import GroupSpec, PseudoBox
from kaggle_tta.config.section_base import (
    Section,
    check_fractions,
    check_positive,
    check_template,
    check_weights,
    class_names,
)
from kaggle_tta.config.task_sections import RLEConfig, TilingConfig

Precision = Literal["auto", "fp32", "bf16", "fp16"]
ViewItem = str | dict[str, Any]


class RuntimeConfig(Section):
    """Where and how the forward passes run."""

    kaggle_models: Path | None = None
    """Where Kaggle Model versions (``members[].kaggle_model``) are found off Kaggle: a folder
    holding ``<model>/<framework>/<variation>/<version>/`` (as Kaggle mounts them, or as
    ``kagglehub.model_download`` leaves them under ``models/<owner>/...``)."""

    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps (Apple GPUs: refused at load where torch has no MPS)."""
    precision: Precision = "auto"
    """auto: bf16 where the device computes it natively, fp16 on CUDA cards without bf16,
    else fp32. Chunks that come out non-finite are recomputed in fp32."""
    forward_batch: int | Literal["auto"] = 32
    """Inputs (images x views) per forward call; 'auto' times a few sizes on the first batches."""
    batch_size: int = 64
    """Images decoded per loader batch; bounds host memory whatever the test-set size."""
    workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes for decoding and preprocessing (0: in the main process).
    auto: on CUDA, min(8, cores - 1); on the CPU, 0 up to 4 cores (a decode worker would take
    a core from the forward, measured 1.34x against 1.10x the forward-only limit on 2 cores),
    else cores // 8, with the torch threads left to the rest."""
    channels_last: bool | Literal["auto"] = "auto"
    """auto: on with CUDA or reduced precision, where it pays."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each member (CPU and CUDA; inductor, one chunk shape, the last chunk padded;
    the compiled program cached on disk, see docs/reference.md). Its output is checked against
    the eager forward in fp32 on the first rows, as ``precision: auto`` is; a member that fails
    to compile or disagrees runs eager, with one line saying why. auto: where the run's forward
    time, estimated from the eager time of the stream's first chunks (kept where it stays
    eager), repays the compile time (and what a compile of this model on this machine measured
    before)."""
    threads: int | None = None
    """torch intra-op threads on the CPU (at least 1); null: torch's own choice."""
    devices: int | Literal["all"] = 1
    """Ranks a plain ``kaggle-tta run`` / ``infer`` starts itself, through torch.distributed's
    elastic launcher (as ``torchrun --nproc_per_node`` would), each on its own device with a
    contiguous share of the test set. all: every CUDA device (1 on a machine without CUDA,
    where ranks would share the same cores); N: N ranks (on the CPU too, with gloo). Ignored
    under torchrun, which has started the ranks already."""

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1, or null for torch's own choice (got {v})")
        return v

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be at least 1, or 'all' (got {v})")
        return v

    @field_validator("forward_batch", "batch_size")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("workers")
    @classmethod
    def _non_negative(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be 0 or more")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v == "mps":
            import torch  # only for this setting: loading a pipeline otherwise needs no torch

            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                raise ValueError("'mps' but torch has no Apple MPS device on this machine; use auto, cpu or cuda")
            return v
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(
            f"unknown device '{v}': use auto, cpu, cuda or cuda:N{did_you_mean(v, ('auto', 'cpu', 'cuda'))}"
        )


class CacheConfig(Section):
    """The prediction cache."""

    dir: Annotated[Path, Bundle("output", "dir", kaggle="/tmp/kaggle_tta/cache")] = Path("cache")
    """Root folder; relative paths are relative to pipeline.yaml."""
    dtype: Literal["float32", "float16", "uint8"] = "float32"
    """Storage type of cached predictions. float16 halves the disk and the re-blend I/O;
    uint8 (segmentation) stores probabilities quantized to 1/255, a quarter of float32."""
    scale: float = 1.0
    """Segmentation: the cached maps' resolution relative to the working canvas (0.5 stores a
    quarter of the pixels); maps are resized back with bilinear interpolation when blended."""

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("must be in (0, 1]")
        return v


class PreprocessConfig(Section):
    """How a member's input is made from a decoded image. Unset fields come from timm's
    pretrained_cfg for the architecture (input size, crop pct, interpolation, mean, std)."""

    input_size: list[int] | None = None
    """[C, H, W] or [H, W] of the model input."""
    crop_pct: float | None = None
    """The image is resized so its shortest side is floor(size / crop_pct), then the
    centre (or, for crop views, a corner) at the input size is taken."""
    interpolation: Literal["nearest", "bilinear", "bicubic", "area", "lanczos"] | None = None
    mean: float | list[float] | None = None
    """One value per input channel, or one for every channel (SETI's 6, Vesuvius' 65)."""
    std: float | list[float] | None = None
    """As ``mean``."""
    albumentations: Annotated[dict[str, Any] | Path | None, Bundle("member")] = None
    """An albumentations pipeline in its own serialized form (``A.to_dict``), inline or as a
    JSON/YAML file. It replaces resize and crop; it must end with uint8 HWC images of one
    size (normalization stays on the device, with `mean` and `std`)."""
    backend: Literal["auto", "timm", "albumentations"] = "auto"
    """Classification: how the crops views start from are made. timm: timm's eval transform
    (PIL resize with antialias, its crop rounding); albumentations: the reference
    document's OpenCV path. auto: timm for an arch member, albumentations for a factory."""

    @field_validator("input_size")
    @classmethod
    def _size(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if len(v) not in (2, 3) or any(s < 1 for s in v):
            raise ValueError("give [C, H, W] or [H, W] with positive sizes")
        return v

    @field_validator("crop_pct")
    @classmethod
    def _crop(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError("must be in (0, 1]")
        return v


class AdaptiveConfig(Section):
    """Adaptive views (classification, segmentation): the ``first`` view runs for every image, the member's
    other views only for images whose first prediction is not confident. Give one rule:
    an image is confident, and skips the other views, when its first view's score is above
    the threshold (see kaggle_tta.ops.gate)."""

    first: str | None = None
    """The view every image gets (a view name of this member's ``tta``); default: identity,
    else the first view."""
    confidence: float | None = None
    """Skip the other views where the top class probability is above this (multi-label: the
    least certain class's max(p, 1 - p)). 1.0: every image gets every view (plain TTA)."""
    margin: float | None = None
    """Instead of confidence: skip where the top-1 minus the top-2 probability is above this
    (multi-label: the least certain class's |2p - 1|)."""

    @field_validator("confidence", "margin")
    @classmethod
    def _unit(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"must be between 0 and 1 (a probability), got {v}")
        return v

    @model_validator(mode="after")
    def _one_rule(self) -> AdaptiveConfig:
        if (self.confidence is None) == (self.margin is None):
            raise ValueError("give exactly one of confidence or margin, e.g. {first: identity, confidence: 0.9}")
        return self


class MemberConfig(Section):
    """One model of the ensemble."""

    name: str
    """Unique name; also the cache sub-folder."""
    arch: str | None = None
    """A timm architecture, built with ``timm.create_model(arch, pretrained=False, num_classes=...)``."""
    factory: str | None = None
    """Instead of `arch`: any importable ``package.module:callable`` returning an nn.Module."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments for timm.create_model or the factory; for a factory, string values
    of the keys ``f``, ``path`` and ``file`` are paths relative to pipeline.yaml."""
    checkpoint: Annotated[Path | None, Bundle("member")] = None
    """Weights: .safetensors, or a torch file loaded with weights_only=True. Nestings
    (state_dict, model, ema, ...) and a 'module.' prefix are unwrapped. With ``kaggle_model``,
    the file's path inside that model version."""
    kaggle_model: str | None = None
    """A Kaggle Model version holding the checkpoint: ``owner/model/framework/variation/version``.
    On Kaggle it is found where the notebook mounts it under /kaggle/input; elsewhere under
    ``runtime.kaggle_models``. `kaggle-tta kernel` lists it in ``model_sources`` and bundles no copy."""

    @field_validator("kaggle_model")
    @classmethod
    def _kaggle_model(cls, v: str | None) -> str | None:
        if v is not None:
            parts = v.strip("/").split("/")
            if len(parts) != 5 or not all(parts) or not parts[4].isdigit():
                raise ValueError(
                    f"'{v}': give owner/model/framework/variation/version, e.g. 'me/effnet/pytorch/b0-fold0/3'"
                )
            v = "/".join(parts)
        return v

    preprocess: PreprocessConfig = PreprocessConfig()
    tta: str | list[ViewItem] = "none"
    """A preset name (none, hflip, flips, d4, five_crop, ten_crop) or a list of views."""
    merge: str | None = None
    """How this member's views merge. Classification and segmentation: mean (of logits, the
    default), mean_prob, geomean, max, tsharpen. Detection: wbf (default), nms, soft_nms, nmw."""
    activation: Literal["auto", "softmax", "sigmoid", "none"] = "auto"
    """How logits become probabilities. auto: softmax, or sigmoid for multi-label; for
    segmentation, sigmoid with one class (or multilabel) and softmax over background + classes
    otherwise."""
    tiling: TilingConfig | None = None
    """Segmentation only: sliding-window inference over tiles of this member's input size."""
    view_weights: list[float] | None = None
    """One non-negative weight per view, in the order of ``tta`` (normalized to sum 1): how
    much each view counts when this member's views merge (AugTTA); null: equal. Applied from
    the cache (not part of the cache fingerprint: changing it recomputes nothing); merge max
    takes none. Detection: each view's weight in the fusion (positive). ``kaggle-tta tune``
    writes it."""
    view_class_weights: list[list[float]] | None = None
    """Instead of `view_weights`: per view, one non-negative weight per output channel (per
    class; segmentation with softmax: background first), normalized over the views for each
    class (ClassTTA). Not for merge max or mean_prob with softmax (the merge would no longer
    sum to one), nor detection."""
    temperature: float = 1.0
    """Each view's logits are divided by this before the views merge (calibration; > 0).
    Not for activation none nor detection. Applied from the cache, outside the fingerprint."""
    adaptive: AdaptiveConfig | None = None
    """Adaptive views: ``{first: identity, confidence: 0.9}`` (or ``margin``): the first view
    for every image, the other views only where it is not confident. Not part of the cache
    fingerprint: each view records the rows it holds; a lower threshold re-blends from the
    cache, a higher one computes the missing rows again. ``kaggle-tta tune`` learns it."""
    adapter: str = "torchvision"
    """Detection only: how the model's output becomes boxes. 'torchvision' (a list of dicts
    with boxes, scores, labels, as torchvision's detection models return), 'boxes' (a tuple
    or dict of boxes [B, n, 4], scores [B, n], labels [B, n]), or 'module:callable' called as
    ``fn(output, (H, W))`` returning per image (boxes xyxy in input pixels, scores, labels)."""

    @field_validator("view_weights")
    @classmethod
    def _view_weights(cls, v: list[float] | None) -> list[float] | None:
        return v if v is None else check_weights(v, "view_weights")

    @field_validator("view_class_weights")
    @classmethod
    def _view_class_weights(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        if v is None:
            return v
        if not v or len({len(row) for row in v}) != 1:
            raise ValueError("give one list per view, each with one weight per class (all of one length)")
        if any(w < 0 or not math.isfinite(w) for row in v for w in row):
            raise ValueError(f"weights must be finite and non-negative, got {v}")
        for c in range(len(v[0])):
            if sum(row[c] for row in v) <= 0:
                raise ValueError(f"class {c}: every view weighs zero; give at least one positive weight per class")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        return check_positive(v)

    def path_kwargs(self) -> dict[str, str]:
        """The factory keyword arguments that name files (see FACTORY_PATH_KWARGS)."""
        if self.factory is None:
            return {}
        return {k: v for k, v in self.kwargs.items() if k in FACTORY_PATH_KWARGS and isinstance(v, str)}

    @model_validator(mode="after")
    def _arch_or_factory(self) -> MemberConfig:
        if (self.arch is None) == (self.factory is None):
            raise ValueError("give exactly one of 'arch' (a timm name) or 'factory' ('module:callable')")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"factory '{self.factory}' must look like 'package.module:callable'")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"member name '{self.name}' must be non-empty and contain no '/'")
        if self.view_weights is not None and self.view_class_weights is not None:
            raise ValueError("give view_weights or view_class_weights, not both (set the other to null)")
        return self


class BlendConfig(Section):
    """A node of the blend DAG: merges members and/or other blends."""

    name: str
    inputs: list[str]
    """Names of members or blends."""
    method: str | None = None
    """Classification: mean (weighted, default), rank_mean, power_mean. Segmentation: mean,
    power_mean. Detection: wbf (default), nms, soft_nms, nmw."""
    weights: list[float] | None = None
    """One non-negative weight per input (normalized to sum 1); default equal."""
    power: float = 2.0
    """Exponent of power_mean."""
    space: Literal["probs", "logits"] = "probs"
    """What the blend combines: each input's probabilities through its own member's
    activation (default), or logits (mean and rank_mean; every input must give logits of one
    activation, checked at load)."""

    @model_validator(mode="after")
    def _weights(self) -> BlendConfig:
        if not self.inputs:
            raise ValueError("'inputs' must name at least one member or blend")
        if len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"'inputs' repeats a name: {self.inputs}")
        if self.weights is not None:
            if len(self.weights) != len(self.inputs):
                raise ValueError(
                    f"{len(self.weights)} weights for {len(self.inputs)} inputs {self.inputs}: give one weight "
                    "per input"
                )
            check_weights(self.weights)
        return self


class SubmissionConfig(Section):
    """What is written and how."""

    source: str | None = None
    """The blend or member whose prediction is written; default: the last blend, else the
    only member."""
    path: Annotated[Path, Bundle("output", kaggle="/kaggle/working/submission.csv")] = Path("submission.csv")
    format: str | None = None
    """label (classification default): the top class; probs: one column per class; string:
    every class through ``template`` (fields label, index, conf) in one PredictionString; topk:
    the k best, space-separated; multilabel: every class whose probability reaches
    `threshold`, space-separated; rle (segmentation): run-length encoded masks; boxes
    (detection): one PredictionString per image."""
    id_column: str = "id"
    label_column: str = "label"
    k: int = 5
    """topk: how many classes per row (at least 1)."""
    threshold: float | list[float] = 0.5
    """multilabel: a class is written when its probability reaches this, in [0, 1]; one
    value, or a list with one per class (``kaggle-tta tune`` writes one)."""
    uncertainty: bool = False
    """probs: also write two per-image columns, ``tta_std`` (the standard deviation, over
    every (member, view) prediction the source node blends, of the probability of the
    source's top class) and ``tta_entropy`` (the entropy in nats of the written
    probabilities; multi-label: the mean over classes of each class's binary entropy)."""
    class_columns: list[str] | None = None
    """Column names for `probs` (default: the class names)."""
    decimals: Annotated[int, Field(ge=1, le=15)] = 6
    """Digits after the point of every number in a column of its own (1-15): probabilities that sum to 1 sum
    to exactly 1 at this many; a sigmoid past about 0.9999995 is written 1.000000 at 6, so
    AUC graders with many confident positives may want more."""
    rle: RLEConfig = RLEConfig()
    """Segmentation: how masks are encoded."""
    template: str = "global_wheat"
    """Detection: each box through this str.format template, or a preset: global_wheat
    ('{conf} {x} {y} {w} {h}', pixels) or open_images ('{label} {conf} {nx1} {ny1} {nx2}
    {ny2}', normalized)."""
    prediction_column: str = "PredictionString"
    empty_prediction: str = ""
    """Detection: what an image with no box (and no pseudo-box) writes (VinBigData's grader
    fails on an empty string: ``14 1 0 0 1 1``)."""
    pseudo_box: PseudoBox | None = None
    """Detection: a row from another model's verdict added to each image's boxes."""
    id_format: str = "{id}"
    """Each written id through this template (SIIM-COVID19's ``{id}_study`` and ``{id}_image``);
    with ``rows: class``, ``{class}`` names the row's class (RSNA 2022's ``{id}_{class}``)."""
    rows: Literal["image", "class"] = "image"
    """probs and values: ``class`` writes one row per (image or group, class), its id
    ``id_format`` with ``{class}`` (the class's column name) and its value in ``label_column``:
    a long table (RSNA 2022 cervical spine's ``row_id,fractured``)."""
    append: list[Annotated[Path, Bundle("data")]] = []
    """Rows of other submissions (CSVs with this one's header) written after this one's: one
    file holding two kinds of rows (SIIM-COVID19's study and image rows, from two pipelines)."""
    group: GroupSpec | None = None
    """One row per group of images, aggregated (formats probs and values; see GroupSpec)."""
    sample: Annotated[Path | None, Bundle("data")] = None
    """The competition's sample_submission.csv: the CSV written then has its header, exactly
    its ids (a sample id matches a row id, or a test image's file name with its suffix) and
    its order; missing or extra ids are an error before the first forward."""

    @field_validator("class_columns", mode="before")
    @classmethod
    def _names(cls, v: object) -> object:
        return class_names(v)

    @field_validator("id_format")
    @classmethod
    def _id_format(cls, v: str) -> str:
        return check_template(v, {"id": "x", "class": "c"}, "{id}_study")

    @model_validator(mode="after")
    def _rows(self) -> SubmissionConfig:
        per_class = "class" in template_fields(self.id_format)
        if self.rows == "class" and not per_class:
            raise ValueError(
                f"id_format: '{self.id_format}' gives every class of a row one id; with rows: class write "
                "{class} in it, e.g. '{id}_{class}'"
            )
        if per_class and self.rows != "class":
            raise ValueError(f"id_format: '{self.id_format}': {{class}} is for rows: class (one row per class)")
        return self

    @field_validator("k")
    @classmethod
    def _k(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float | list[float]) -> float | list[float]:
        return check_fractions(v)
