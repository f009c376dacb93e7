"""From a validated config to a plan: each member's views, canvas and cache fingerprint.

Everything a run or a blend needs to know before it touches a model or an image is resolved
here, so that a bad view, merge rule or checkpoint path fails at load time, naming the member.
Building the plan lists the test set and stats its files but never decodes them, and it never
builds a model: re-blending uses it too.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaggle_tta import cache as cache_mod
from kaggle_tta.config import MemberConfig, PipelineConfig, load_classes
from kaggle_tta.config.errors import CheckpointError, ConfigError, did_you_mean
from kaggle_tta.engine.device import resolve_device, resolve_precision
from kaggle_tta.engine.phases import phase, say
from kaggle_tta.io.canvas import CanvasSpec
from kaggle_tta.io.data import TestSet, list_test_set
from kaggle_tta.io.groups import group_of, group_row_ids
from kaggle_tta.io.models import Preprocess, check_checkpoint, needs_timm, resolve_preprocess
from kaggle_tta.io.readers import item_files, reader_for
from kaggle_tta.io.submission import LONG_FORMATS, SampleOrder, appended_rows, match_sample
from kaggle_tta.ops.gate import Gate, gate_of
from kaggle_tta.ops.merge import MERGE_KINDS
from kaggle_tta.ops.views import View, parse_tta
from kaggle_tta.ops.views.views import Colour
from kaggle_tta.tasks import TASKS, Task, choose, find_task

if TYPE_CHECKING:  # torch loads only where a device is resolved: re-blending never needs it
    pass


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
    gate: Gate | None = None  # adaptive views (kaggle_tta.ops.gate): the first view, rule and threshold

    @property
    def name(self) -> str:
        return self.cfg.name

    def fingerprint(self, precision: str) -> str:
        return f"{self.key}-{precision}"

    @property
    def model_key(self) -> str:
        """The member without its test set: what a decision about the model (chunk size,
        layout, a precision verdict) is remembered under, for new images too."""
        rest = {k: v for k, v in self.inputs.items() if k not in ("testset", "n_images")}
        return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Plan:
    cfg: PipelineConfig
    task: Task
    classes: list[str]
    testset: TestSet
    members: list[MemberPlan]
    cache_root: Path
    sample: SampleOrder | None = None  # submission.sample, matched with the rows to write
    rows: tuple[int, int] | None = None  # a rank's share (lo, hi): testset is those rows, written to shard entries
    groups: list[str] | None = None  # submission.group: each image's group
    computed: dict[str, str] | None = None  # what an infer on this plan ran each member in (api.blend reads it)
    native_sizes: Any = None  # segmentation.size native: every image's (H, W), read from headers once

    def member(self, name: str) -> MemberPlan:
        return next(m for m in self.members if m.name == name)


def resolve_task(cfg: PipelineConfig) -> Task:
    """The pipeline's registered task, with the settings whose default is the task's filled in
    (a member's merge, a blend's method, submission.format)."""
    try:
        task = find_task(cfg.task)
    except ValueError as exc:  # unknown: the registered ones, with a did-you-mean
        raise ConfigError(f"{f'{cfg.source}: ' if cfg.source else ''}task: {exc}") from None
    for m in cfg.members:
        if m.merge is None:
            m.merge = task.default_merge
    for b in cfg.blends:
        if b.method is None:
            b.method = task.default_blend
    if cfg.submission.format is None:
        cfg.submission.format = task.default_format
    return task


def validate_static(cfg: PipelineConfig) -> dict[str, list[View]]:
    """Checks what needs no file: views per task, merge rules, blend methods, output format,
    and the settings the task does not take; then the task's own checks."""
    task = resolve_task(cfg)
    name, target = task.name, task.target
    views: dict[str, list[View]] = {}
    for m in cfg.members:
        where = f"members.{m.name}"
        vs = parse_tta(m.tta, f"{where}.tta")
        for v in vs:
            if target not in v.targets:
                raise ConfigError(
                    f"{where}.tta: view '{v.name}' cannot be inverted on {target}s (task: {name}); {v.hint(target)}"
                )
        views[m.name] = vs
        colour = next((v for v in vs if not cfg.data.unit_range and any(isinstance(op, Colour) for op in v.ops)), None)
        if colour is not None:
            raise ConfigError(
                f"{where}.tta: view '{colour.name}' adjusts colours of pixels in [0, 1], but data.reader gives values "
                "as read (DICOM, arrays, records); give data.reader.window, or drop the colour views"
            )
        choose(f"{name} view merge", str(m.merge), dict.fromkeys(task.merges), f"{where}.merge")
        if m.tiling is not None and not task.tiling:
            raise ConfigError(f"{where}.tiling: tiling is for {_tasks_with('tiling')}; remove it (task: {name})")
        if m.adaptive is not None and not task.adaptive:
            raise ConfigError(
                f"{where}.adaptive: adaptive views are for {_tasks_with('adaptive')}; remove it (task: {name})"
            )
        if m.adaptive is not None and m.activation == "none":
            raise ConfigError(
                f"{where}.adaptive: the gate reads probabilities, and activation none gives none; use softmax or "
                "sigmoid, or remove adaptive"
            )
        if m.preprocess.albumentations is not None and not task.user_preprocessing:
            raise ConfigError(
                f"{where}.preprocess.albumentations: for {name} the canvas is a plain resize, so that maps and boxes "
                f"map back to the image exactly; remove it ({_tasks_with('user_preprocessing')} only)"
            )
    for i, b in enumerate(cfg.blends):
        choose(f"{name} blend", str(b.method), dict.fromkeys(task.blends), f"blends[{i}].method")
    choose(f"{name} format", str(cfg.submission.format), task.writers, "submission.format")
    _check_rows(cfg)
    if not task.dense_maps:
        if cfg.cache.dtype == "uint8":
            raise ConfigError(
                f"cache.dtype: uint8 stores segmentation probabilities; use float32 or float16 for {name}"
            )
        if cfg.cache.scale != 1.0:
            raise ConfigError(f"cache.scale: a reduced resolution is for segmentation maps; remove it for {name}")
    for key in ("labels", "masks", "boxes"):  # each kind of ground truth scores the task that owns it
        if getattr(cfg.data, key) is not None and key != task.truth:
            owner = " or ".join(t.name for t in TASKS.values() if t.truth == key) or "no registered task"
            fix = f"for {name} give data.{task.truth}" if task.truth else f"{name} takes no ground truth"
            raise ConfigError(f"data.{key}: {key} score {owner}; {fix}")
    task.validate(cfg)
    return views


def _check_rows(cfg: PipelineConfig) -> None:
    """``submission.rows: class`` takes a format of one value per class, and no per-image column."""
    if cfg.submission.rows == "class" and cfg.submission.format not in LONG_FORMATS:
        raise ConfigError(
            f"submission.rows: one row per class is for format {' or '.join(LONG_FORMATS)}, not "
            f"{cfg.submission.format}; set format: probs (classification), or remove rows"
        )
    if cfg.submission.rows == "class" and cfg.submission.uncertainty:
        raise ConfigError("submission.uncertainty: its columns are per image; remove it with rows: class")


def _tasks_with(capability: str) -> str:
    """The registered tasks that have a capability, for an error's text."""
    return " or ".join(t.name for t in TASKS.values() if getattr(t, capability)) or "no registered task"


def build_plan(cfg: PipelineConfig) -> Plan:
    """Resolves every member (preprocessing, views, fingerprint) and lists the test set."""
    views = validate_static(cfg)
    task = resolve_task(cfg)
    classes = load_classes(cfg)
    phase("listing the test set")
    testset = list_test_set(cfg)
    if not cfg.data.plain_images and len(testset):  # an unknown reader, or one that cannot import: now
        reader_for(cfg.data.reader, testset.reference)
    cache_root = cfg.resolve(cfg.cache.dir)
    memo = cache_root / ".digests"
    phase(f"hashing the test set's {len(testset)} item(s)")
    tfp = cache_mod.files_digest(*item_files(testset.ids, testset.paths, cfg), memo)  # every file an item reads
    if "timm" not in sys.modules and any(needs_timm(cfg, m) for m in cfg.members):  # their preprocessing reads timm
        phase("importing torch and timm")
        import timm  # noqa: F401  # seconds on a fresh process: said, not hidden in the next phase
    phase("planning the members (their checkpoints hashed)")
    members = [_member_plan(cfg, task, m, views[m.name], len(classes), tfp, len(testset), memo) for m in cfg.members]
    plan = Plan(cfg, task, classes, testset, members, cache_root)
    check_spaces(plan)
    task.check_plan(plan)
    if cfg.submission.group is not None:  # every image's group, before the first forward
        plan.groups = group_of(cfg, testset.ids)
    if cfg.submission.sample is not None:  # ids that do not match fail before the first forward
        plan.sample = match_sample(
            cfg.resolve(cfg.submission.sample),
            cfg.submission.id_column,
            written_row_ids(plan),
            testset.paths,
            written_columns(plan),
            getattr(getattr(cfg.submission, "rle", None), "class_column", None) if cfg.task == "segmentation" else None,
        )
        dropped = plan.sample.dropped
        if dropped:
            asked = len(plan.sample.header) - 1 - len(plan.sample.copied)
            more = ", ..." if len(dropped) > 3 else ""
            say(
                f"submission.sample asks for {asked} of the {asked + len(dropped)} columns: {len(dropped)} not "
                f"written ({', '.join(dropped[:3])}{more})"
            )
    return plan


def written_columns(plan: Plan) -> list[str] | None:
    """The submission's header: the task's, or with ``rows: class`` the id and the value."""
    spec = plan.cfg.submission
    return [spec.id_column, spec.label_column] if spec.rows == "class" else plan.task.columns(plan)


def written_row_ids(plan: Plan) -> list[tuple[str, int]]:
    """The ids of the rows written, in order, with their first image (-1: an appended row):
    the task's (or the groups'), through submission.id_format (with ``rows: class`` one per
    class, class by class), then submission.append's."""
    spec = plan.cfg.submission
    rows = plan.task.row_ids(plan) if plan.groups is None else group_row_ids(plan.groups)
    if spec.rows == "class":
        names = (plan.task.columns(plan) or [""])[1:]  # the class columns, as the wide table names them
        rows = [(spec.id_format.format(id=i, **{"class": c}), k) for i, k in rows for c in names]
    else:
        rows = [(spec.id_format.format(id=i), k) for i, k in rows]
    columns = written_columns(plan)
    paths = [plan.cfg.resolve(p) for p in spec.append]
    extra = appended_rows(paths, columns) if columns is not None else None
    return rows + ([(str(i), -1) for i in extra[extra.columns[0]].to_list()] if extra is not None else [])


def _member_plan(
    cfg: PipelineConfig, task: Task, m: MemberConfig, views: list[View], n_classes: int, tfp: str, n: int, memo: Path
) -> MemberPlan:
    """One member resolved: preprocessing, canvas, views bound to it, activation, gate, and the
    fingerprint over everything that determines its numbers."""
    pre = resolve_preprocess(cfg, m, default_size=task.input_size(cfg, m))
    canvas = task.crops(task.canvas(cfg, pre), views)
    ckpt = _checkpoint_digest(cfg, m, memo)
    act = task.activation(cfg, m, n_classes)
    inputs = {
        "format_version": cache_mod.FORMAT_VERSION,
        "task": cfg.task,
        "arch": m.arch,
        "factory": m.factory,
        "kwargs": _jsonable(m.kwargs),
        "checkpoint_sha256": ckpt,
        "factory_source_sha256": factory_digest(m, memo),
        "num_classes": n_classes,
        "preprocess": _jsonable(pre.__dict__),
        "testset": tfp,
        "n_images": n,
        "dtype": cfg.cache.dtype,
        **_jsonable(task.fingerprint(cfg, m, canvas, act)),
        # how each item is read, where it is not the 8-bit RGB default (whose keys stay as they were)
        **({} if cfg.data.plain_images else reader_inputs(cfg, memo)),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    bound = [v.bind(task.view_size(pre), pre.mean, pre.std) for v in views]
    return MemberPlan(
        m, pre, canvas, bound, act, task.out_channels(act, n_classes), inputs, key, resolve_gate(m, bound)
    )


def _checkpoint_digest(cfg: PipelineConfig, m: MemberConfig, memo: Path) -> str | None:
    """The member's checkpoint's content hash (checked readable first: a damaged file fails
    before any forward); None for a factory member without one."""
    if m.checkpoint is None:
        if m.arch:
            raise ConfigError(
                f"members.{m.name}.checkpoint: a timm member needs its trained weights "
                "(a .safetensors or torch state dict)"
            )
        return None
    path = cfg.checkpoint_of(m)
    assert path is not None  # m.checkpoint is set
    if not path.is_file():
        raise CheckpointError(f"members.{m.name}.checkpoint: {path} not found; run 'make demo-weights' or fix the path")
    check_checkpoint(path, f"members.{m.name}.checkpoint")
    return cache_mod.content_digest(path, memo)


def resolve_gate(m: MemberConfig, views: list[View]) -> Gate | None:
    """The member's adaptive gate with its first view resolved (identity where the member
    has it, else its first view); checked against the views (task and activation: see
    tasks.base.check_view_settings)."""
    gate = gate_of(m)
    if gate is None:
        return None
    names = [v.name for v in views]
    where = f"members.{m.name}.adaptive"
    if len(names) < 2:
        raise ConfigError(
            f"{where}: the member has one view ({names[0]}), so there are no other views to skip; give it a tta with "
            "more views or remove adaptive"
        )
    if m.adaptive.first is None:  # type: ignore[union-attr]
        return Gate("identity" if "identity" in names else names[0], gate.rule, gate.threshold)
    if gate.first not in names:
        raise ConfigError(
            f"{where}.first: '{gate.first}' is not one of the member's views {names}{did_you_mean(gate.first, names)}"
        )
    return gate


def check_spaces(plan: Plan) -> None:
    """Each blend's stated space must hold: ``space: logits`` only over inputs that give
    logits (members merged with ``mean``, blends in logits) of one activation."""
    out: dict[str, tuple[str, str]] = {
        m.name: (MERGE_KINDS.get(str(m.cfg.merge), "boxes"), m.activation) for m in plan.members
    }
    for i, b in enumerate(plan.cfg.blends):
        ins = [out[n] for n in b.inputs]
        if b.space == "logits":
            if b.method == "power_mean":
                raise ConfigError(f"blends[{i}].space: power_mean combines probabilities; use space: probs")
            wrong = [(n, k) for n, (k, _) in zip(b.inputs, ins) if k != "logits"]
            if wrong:
                raise ConfigError(
                    f"blends[{i}].space: logits needs every input to give logits, but '{wrong[0][0]}' gives "
                    f"{wrong[0][1]}; "
                    "use space: probs, or merge: mean on that member"
                )
            acts = {a for _, a in ins}
            if len(acts) > 1:
                raise ConfigError(
                    f"blends[{i}].space: logits of different activations ({', '.join(sorted(acts))}) do not average; "
                    "use space: probs"
                )
        kind = "scores" if b.method == "rank_mean" else "logits" if b.space == "logits" else "probs"
        out[b.name] = (kind, ins[0][1])


def factory_digest(m: MemberConfig, memo: Path) -> str | None:
    """SHA-256 of the source file of a factory member's module (found, not imported): a
    factory edited to compute something else is a new entry. Only that file is hashed, not
    what it imports (docs/cache.md)."""
    if m.factory is None:
        return None
    return module_digest(m.factory, f"members.{m.name}.factory", memo)


def reader_inputs(cfg: PipelineConfig, memo: Path) -> dict[str, Any]:
    """What a reader adds to every member's fingerprint: its settings, and a user reader's
    source file (edited to read otherwise: a new entry)."""
    name = cfg.data.reader.name
    out = {"reader": _jsonable(cfg.data.reader.model_dump(mode="json"))}
    if ":" in name:
        out["reader_source_sha256"] = module_digest(name, "data.reader.name", memo)
    return out


def module_digest(callable_spec: str, where: str, memo: Path) -> str | None:
    """SHA-256 of the source file of ``module:callable``'s module (a factory, a reader)."""
    import importlib.util

    module = callable_spec.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot find module '{module}' ({exc}); install it or fix the name") from None
    if spec is None:
        raise ConfigError(f"{where}: no module '{module}'; install it or fix the name (is its folder on PYTHONPATH?)")
    origin = spec.origin
    if not origin or not Path(origin).is_file():
        return None  # a built-in or namespace module: no source file to hash
    return cache_mod.content_digest(origin, memo)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def find_entry(
    plan: Plan, m: MemberPlan, precision_setting: str, computed: str | None = None
) -> cache_mod.CacheEntry | None:
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
    # a reduced precision that failed its check against fp32 (engine.choose_precisions) ran in fp32
    fp32 = cache_mod.CacheEntry(plan.cache_root, m.name, m.fingerprint("fp32"), m.inputs)
    rejected = {
        p
        for p, r in fp32.manifest.get("precision_checks", {}).items()
        if isinstance(r, dict) and r.get("ran_in") == "fp32"
    }
    for p in ("fp32", "bf16", "fp16"):
        if p in rejected:
            continue
        e = cache_mod.CacheEntry(plan.cache_root, m.name, m.fingerprint(p), m.inputs)
        if all(e.is_complete(v.name) for v in m.views):
            complete.append((p, e))
    if len(complete) > 1:  # only here is torch needed, to ask what this machine computes
        preferred = resolve_precision("auto", resolve_device(plan.cfg.runtime.device))
        complete.sort(key=lambda pe: (pe[0] != preferred, pe[0] != "fp32"))
    return complete[0][1] if complete else None
