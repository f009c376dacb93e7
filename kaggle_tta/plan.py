"""From a validated config to a plan: each member's views, canvas and cache fingerprint.

Everything a run or a blend needs to know before it touches a model or an image is resolved
here, so that a bad view, merge rule or checkpoint path fails at load time, naming the member.
Building the plan lists the test set and stats its files but never decodes them, and it never
builds a model: re-blending uses it too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaggle_tta import cache as cache_mod
from kaggle_tta.boxes import FUSION_METHODS
from kaggle_tta.config import MemberConfig, PipelineConfig, load_classes
from kaggle_tta.data import CanvasSpec, TestSet, list_test_set
from kaggle_tta.errors import CheckpointError, ConfigError, did_you_mean
from kaggle_tta.merge import BLEND_METHODS, VIEW_REDUCERS
from kaggle_tta.models import Preprocess, file_digest, resolve_preprocess
from kaggle_tta.views import View, parse_tta

if TYPE_CHECKING:  # torch loads only where a device is resolved: re-blending never needs it
    import torch

# What each task needs a view to invert.
TASK_TARGET = {"classification": "label", "segmentation": "mask", "detection": "boxes"}
# Per task: how a member's views may merge, how blends combine, what is written.
TASK_MERGES = {"classification": tuple(VIEW_REDUCERS), "segmentation": tuple(VIEW_REDUCERS), "detection": FUSION_METHODS}
TASK_BLENDS = {"classification": BLEND_METHODS, "segmentation": ("mean", "power_mean"), "detection": FUSION_METHODS}
TASK_FORMATS = {"classification": ("label", "probs", "topk", "multilabel"), "segmentation": ("rle",), "detection": ("boxes",)}


@dataclass
class MemberPlan:
    cfg: MemberConfig
    preprocess: Preprocess
    canvas: CanvasSpec
    views: list[View]
    activation: str
    out_channels: int  # what the model must output per pixel (segmentation) or per image
    inputs: dict[str, Any]  # what the fingerprint hashes, recorded in the manifest
    key: str  # hash of `inputs`: the fingerprint without the precision

    @property
    def name(self) -> str:
        return self.cfg.name

    def fingerprint(self, precision: str) -> str:
        return f"{self.key}-{precision}"


@dataclass
class Plan:
    cfg: PipelineConfig
    classes: list[str]
    testset: TestSet
    members: list[MemberPlan]
    cache_root: Path

    def member(self, name: str) -> MemberPlan:
        return next(m for m in self.members if m.name == name)


def validate_static(cfg: PipelineConfig) -> dict[str, list[View]]:
    """Checks what needs no file: views per task, merge rules, blend methods, output format."""
    task = cfg.task
    target = TASK_TARGET[task]
    merges, blends, formats = TASK_MERGES[task], TASK_BLENDS[task], TASK_FORMATS[task]
    views: dict[str, list[View]] = {}
    for m in cfg.members:
        where = f"members.{m.name}.tta"
        vs = parse_tta(m.tta, where)
        for v in vs:
            if target not in v.targets:
                hint = "crops are legal for maps only through tiling (members.<name>.tiling)" if v.crop.position != "center" else "drop it from the list"
                raise ConfigError(f"{where}: view '{v.name}' cannot be inverted on {target}s (task: {task}); {hint}")
        views[m.name] = vs
        if m.merge not in merges:
            raise ConfigError(f"members.{m.name}.merge: '{m.merge}' is not a {task} view merge{did_you_mean(str(m.merge), merges)}; choose one of {', '.join(merges)}")
        if m.tiling is not None and task != "segmentation":
            raise ConfigError(f"members.{m.name}.tiling: tiling is for segmentation; remove it (task: {task})")
        if task != "classification" and m.preprocess.albumentations is not None:
            raise ConfigError(
                f"members.{m.name}.preprocess.albumentations: for {task} the canvas is a plain resize, so that maps and boxes "
                "map back to the image exactly; remove it (classification only)"
            )
        if task == "segmentation" and m.preprocess.input_size is not None:
            raise ConfigError(
                f"members.{m.name}.preprocess.input_size: a segmentation member sees the whole canvas (segmentation.size) "
                "or its tiles (tiling.tile); remove input_size"
            )
    for i, b in enumerate(cfg.blends):
        if b.method not in blends:
            raise ConfigError(f"blends[{i}].method: '{b.method}' is not a {task} blend{did_you_mean(str(b.method), blends)}; choose one of {', '.join(blends)}")
    if cfg.submission.format not in formats:
        raise ConfigError(f"submission.format: '{cfg.submission.format}' is not a {task} format; choose one of {', '.join(formats)}")
    if cfg.submission.format == "multilabel" and not cfg.multilabel:
        raise ConfigError("submission.format: 'multilabel' needs 'multilabel: true' at the top level")
    if cfg.cache.dtype == "uint8" and task != "segmentation":
        raise ConfigError(f"cache.dtype: uint8 stores segmentation probabilities; use float32 or float16 for {task}")
    if cfg.cache.scale != 1.0 and task != "segmentation":
        raise ConfigError(f"cache.scale: a reduced resolution is for segmentation maps; remove it for {task}")
    if task == "detection":
        from kaggle_tta.boxes import BoxesError, _resolve_template

        try:
            _resolve_template(cfg.submission.template)
        except BoxesError as exc:
            raise ConfigError(f"submission.template: {exc}") from None
    if task != "classification" and cfg.data.labels is not None:
        raise ConfigError(f"data.labels: class labels score classification; for {task} give data.{'masks' if task == 'segmentation' else 'boxes'}")
    return views


def activation_of(cfg: PipelineConfig, m: MemberConfig, n_classes: int) -> str:
    if m.activation != "auto":
        return m.activation
    if cfg.task == "segmentation":
        return "sigmoid" if cfg.multilabel or n_classes == 1 else "softmax"
    return "sigmoid" if cfg.multilabel else "softmax"


def out_channels(cfg: PipelineConfig, activation: str, n_classes: int) -> int:
    """Segmentation with softmax predicts background as channel 0, then one per class."""
    return n_classes + 1 if cfg.task == "segmentation" and activation == "softmax" else n_classes


def _canvas(cfg: PipelineConfig, pre: Preprocess) -> CanvasSpec:
    if cfg.task == "segmentation":
        size = cfg.segmentation.size
        return CanvasSpec(tuple(size) if size else (0, 0), 1.0, pre.interpolation, pre.albumentations, "resize" if size else "native")
    if cfg.task == "detection":
        return CanvasSpec(pre.size, 1.0, pre.interpolation, pre.albumentations, "resize")
    return CanvasSpec(pre.size, pre.crop_pct if pre.albumentations is None else 1.0, pre.interpolation, pre.albumentations)


def build_plan(cfg: PipelineConfig) -> Plan:
    """Resolves every member (preprocessing, views, fingerprint) and lists the test set."""
    views = validate_static(cfg)
    classes = load_classes(cfg)
    testset = list_test_set(cfg)
    cache_root = cfg.resolve(cfg.cache.dir)
    memo = cache_root / ".digests"
    tfp = testset.fingerprint()
    seg = cfg.task == "segmentation"
    members = []
    for m in cfg.members:
        # A segmentation member's input is the canvas or a tile, not a size of its own.
        pre = resolve_preprocess(cfg, m, default_size=(m.tiling.size if m.tiling else (0, 0)) if seg else None)
        canvas = _canvas(cfg, pre)
        ckpt = None
        if m.checkpoint is not None:
            path = cfg.resolve(m.checkpoint)
            if not path.is_file():
                raise CheckpointError(f"members.{m.name}.checkpoint: {path} not found; run 'make demo-weights' or fix the path")
            ckpt = file_digest(path, memo)
        elif m.arch:
            raise ConfigError(f"members.{m.name}.checkpoint: a timm member needs its trained weights (a .safetensors or torch state dict)")
        act = activation_of(cfg, m, len(classes))
        inputs = {
            "format_version": cache_mod.FORMAT_VERSION,
            "task": cfg.task,
            "arch": m.arch,
            "factory": m.factory,
            "kwargs": _jsonable(m.kwargs),
            "checkpoint_sha256": ckpt,
            "num_classes": len(classes),
            "preprocess": _jsonable(pre.__dict__),
            "testset": tfp,
            "n_images": len(testset),
            "dtype": cfg.cache.dtype,
        }
        if seg:  # what else shapes the stored maps
            inputs.update(canvas=_jsonable(canvas.__dict__), tiling=m.tiling.model_dump() if m.tiling else None, scale=cfg.cache.scale, activation=act)
        elif cfg.task == "detection":
            inputs.update(canvas=_jsonable(canvas.__dict__), adapter=m.adapter)
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
        bound = [v.bind(None if seg else pre.size, pre.mean, pre.std) for v in views[m.name]]
        members.append(MemberPlan(m, pre, canvas, bound, act, out_channels(cfg, act, len(classes)), inputs, key))
    if seg and len({m.activation for m in members}) > 1:  # maps blend element-wise: one meaning per channel
        acts = ", ".join(f"{m.name}: {m.activation}" for m in members)
        raise ConfigError(f"members.*.activation: segmentation members must share one activation ({acts}); set activation on each member")
    return Plan(cfg, classes, testset, members, cache_root)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))


# ---- device and precision ------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device: '{name}' but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True where oneDNN computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower
    than fp32, so 'auto' keeps fp32 there."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(setting: int | str, device: torch.device, threads: int | None) -> tuple[int, int | None]:
    """(decode workers, torch CPU threads to set or None) for ``runtime.workers``.

    On the CPU the forward and the decoding share the cores: a worker that takes a core from
    a 2-thread forward stalls its synchronized kernels, so small machines decode in-process,
    and larger ones leave the workers' cores out of torch's threads.
    """
    cores = cpu_cores()
    if setting != "auto":
        return int(setting), threads
    if device.type == "cuda":
        return min(8, max(0, cores - 1)), threads
    if cores <= 4:
        return 0, threads
    workers = max(1, cores // 8)
    return workers, threads if threads else cores - workers


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 where native, fp16 on CUDA without bf16 (T4, P100), else fp32."""
    import torch

    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise ConfigError("runtime.precision: fp16 autocast is for CUDA; on the CPU use bf16, fp32 or auto")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def find_entry(plan: Plan, m: MemberPlan, precision_setting: str, computed: str | None = None) -> cache_mod.CacheEntry | None:
    """The cache entry a blend should read for member ``m``.

    With an explicit precision, exactly that fingerprint. With 'auto': the precision this run
    computed (``computed``) if given; else the one complete entry (a cache filled in bf16 on a
    GPU re-blends on a CPU-only machine); where several precisions are complete, the one this
    machine would compute, then fp32.
    """
    if precision_setting != "auto":
        return cache_mod.CacheEntry(plan.cache_root, m.name, m.fingerprint(precision_setting), m.inputs)
    if computed is not None:
        return cache_mod.CacheEntry(plan.cache_root, m.name, m.fingerprint(computed), m.inputs)
    complete = []
    for p in ("fp32", "bf16", "fp16"):
        e = cache_mod.CacheEntry(plan.cache_root, m.name, m.fingerprint(p), m.inputs)
        if all(e.is_complete(v.name) for v in m.views):
            complete.append((p, e))
    if len(complete) > 1:  # only here is torch needed, to ask what this machine computes
        preferred = resolve_precision("auto", resolve_device(plan.cfg.runtime.device))
        complete.sort(key=lambda pe: (pe[0] != preferred, pe[0] != "fp32"))
    return complete[0][1] if complete else None
