"""What a task is, and the registry of tasks by name (as timm registers its models).

A :class:`Task` owns everything that differs between classification, segmentation,
detection or a task of your own: what a view must invert, the legal merges, blend methods
and submission formats (the first of each is the default), the canvas rule, what else the
cache fingerprint hashes, the per-batch step on the device and the from-cache side (merge,
blend, score, write). ``plan``, ``engine``, ``api``, ``cli`` and ``config`` ask the task;
none of them compares a task's name.

The per-batch step is the only part that needs torch; a task imports it inside
:meth:`Task.step`, so that re-blending from the cache still imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from kaggle_tta.config.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

    from kaggle_tta.config import MemberConfig, PipelineConfig
    from kaggle_tta.engine.plan import Plan
    from kaggle_tta.exec.dag import MemberSource
    from kaggle_tta.exec.forward import MemberWork
    from kaggle_tta.io.canvas import CanvasSpec
    from kaggle_tta.io.data import Batch
    from kaggle_tta.io.models import Preprocess
    from kaggle_tta.ops.views import View

Scores = dict[str, dict[str, float]]  # node -> metric -> value


@dataclass
class TaskOutput:
    """What a task's blend returns: the submission table and, with ground truth, every node's
    scores with TTA and with each member's identity view alone."""

    table: pl.DataFrame
    metrics: list[str]
    tta: Scores = field(default_factory=dict)
    plain: Scores = field(default_factory=dict)


class Task:
    """A task. Subclass it, set the class attributes, implement the methods that raise
    NotImplementedError and register it with :func:`register_task`."""

    name: ClassVar[str]
    target: ClassVar[str]
    """What every view must invert: label, mask or boxes (see View.targets)."""
    merges: ClassVar[Sequence[str]]
    """How a member's views may merge; the first is the default."""
    blends: ClassVar[Sequence[str]]
    """How blends may combine their inputs; the first is the default."""
    writers: ClassVar[Mapping[str, Callable[..., Any]]]
    """Submission formats by name, each its writer; the first is the default."""
    truth: ClassVar[str | None] = None
    """The data.* key of this task's ground truth (labels, masks, boxes), if it has one."""
    stores_image_sizes: ClassVar[bool] = False
    """Whether cache entries keep each image's decoded (H, W) (maps and boxes go back to it)."""
    tiling: ClassVar[bool] = False
    """Whether members may set ``tiling`` (sliding-window inference)."""
    user_preprocessing: ClassVar[bool] = False
    """Whether members may give an albumentations preprocessing (their canvas need not map back)."""
    dense_maps: ClassVar[bool] = False
    """Whether the cache holds maps, so that cache.dtype uint8 and cache.scale apply."""
    logit_views: ClassVar[bool] = True
    """Whether a member's cached views are values that kaggle_tta.ops.merge reduces (logits per
    channel), so that a member's ``temperature`` and ``view_class_weights`` apply."""
    uncertainty: ClassVar[bool] = False
    """Whether ``submission.uncertainty`` (per-image columns over the views) is written."""
    adaptive: ClassVar[bool] = False
    """Whether members may set ``adaptive`` (kaggle_tta.ops.gate): the task's step computes
    gated views on the rows their gate needs, and its blend merges what each row holds."""
    tuner: ClassVar[str | None] = None
    """What ``kaggle-tta tune`` learns for this task: a key of kaggle_tta.tuning's registry of
    problems (None: nothing; tune says so)."""

    @property
    def default_merge(self) -> str:
        return next(iter(self.merges))

    @property
    def default_blend(self) -> str:
        return next(iter(self.blends))

    @property
    def default_format(self) -> str:
        return next(iter(self.writers))

    # ---- plan side (no file read, no model built) ------------------------------------------

    def validate(self, cfg: PipelineConfig) -> None:
        """Checks of this task's own beyond the shared ones in plan.validate_static."""

    def input_size(self, cfg: PipelineConfig, m: MemberConfig) -> tuple[int, int] | None:
        """The member's input size when the task decides it (None: preprocess / timm)."""
        return None

    def canvas(self, cfg: PipelineConfig, pre: Preprocess) -> CanvasSpec:
        """How the member's canvas is made from the decoded image."""
        raise NotImplementedError

    def crops(self, canvas: CanvasSpec, views: Sequence[View]) -> CanvasSpec:
        """The canvas with what the member's views need of it (classification: which crops)."""
        return canvas

    def view_size(self, pre: Preprocess) -> tuple[int, int] | None:
        """The size views crop the canvas to (None: the whole canvas)."""
        return pre.size

    def activation(self, cfg: PipelineConfig, m: MemberConfig, n_classes: int) -> str:
        """The member's activation for ``activation: auto``."""
        if m.activation != "auto":
            return m.activation
        return "sigmoid" if cfg.multilabel else "softmax"

    def out_channels(self, activation: str, n_classes: int) -> int:
        """What the model must output per image (or per pixel)."""
        return n_classes

    def fingerprint(self, cfg: PipelineConfig, m: MemberConfig, canvas: CanvasSpec, activation: str) -> dict[str, Any]:
        """What else shapes the stored numbers, hashed into the member's cache fingerprint."""
        return {}

    def check_plan(self, plan: Plan) -> None:
        """Checks across members, once all are resolved (a subclass calls this first)."""
        check_view_settings(self, plan)

    def columns(self, plan: Plan) -> list[str] | None:
        """The submission's header, when known before writing (None: not checked early)."""
        return None

    def finish(self, table: pl.DataFrame, plan: Plan) -> pl.DataFrame:
        """The table as written, after rows are grouped (``submission.group``): by default as it is."""
        return table

    def row_ids(self, plan: Plan) -> list[tuple[str, int]]:
        """The submission's row ids in the order the writer writes them, each with the test
        image it belongs to (one row per image unless the format says otherwise)."""
        return [(i, k) for k, i in enumerate(plan.testset.ids)]

    # ---- engine side (torch) ---------------------------------------------------------------

    def open_views(self, work: MemberWork, plan: Plan) -> None:
        """Opens (or reopens) the cache files of every pending view of ``work``."""
        raise NotImplementedError

    def row_bytes(self, work: MemberWork, plan: Plan) -> int:
        """Bytes one image adds to one view's file (0 where rows are ragged: unknown ahead),
        so that a run that cannot fit on the cache's disk stops before its first forward."""
        return 0

    def as_logits(self, values: np.ndarray, activation: str) -> np.ndarray:
        """Cached values as the logits the merges (and an adaptive gate) read; default: as
        stored (segmentation turns uint8 probabilities back into logits)."""
        return values

    def post(self, plan: Plan, m: MemberConfig) -> Callable[[Any, Any], Any] | None:
        """The runner's post-processing of raw model outputs (None: the logits tensor)."""
        return None

    def step(self, work: MemberWork, batch: Batch, plan: Plan) -> None:
        """Fills rows ``batch.lo:batch.hi`` of every pending view of ``work``."""
        raise NotImplementedError

    # ---- from the cache --------------------------------------------------------------------

    def blend(self, plan: Plan, sources: Sequence[MemberSource], sizes: np.ndarray | None, plain: bool) -> TaskOutput:
        """Merges views, evaluates the blend DAG, builds the submission table and, with ground
        truth, scores every node (``plain``: also with the identity view alone)."""
        raise NotImplementedError


def check_view_settings(task: Task, plan: Plan) -> None:
    """Each member's ``view_weights``, ``view_class_weights`` and ``temperature`` against its
    views, channels, merge rule and activation, naming the member."""
    if plan.cfg.submission.uncertainty and not task.uncertainty:
        raise ConfigError(
            f"submission.uncertainty: per-image uncertainty columns are for {_with('uncertainty')}; remove it "
            f"(task: {task.name})"
        )
    for m in plan.members:
        where, cfg, views = f"members.{m.name}", m.cfg, [v.name for v in m.views]
        given = cfg.view_class_weights if cfg.view_class_weights is not None else cfg.view_weights
        key = "view_class_weights" if cfg.view_class_weights is not None else "view_weights"
        if given is not None and len(given) != len(views):
            raise ConfigError(
                f"{where}.{key}: {len(given)} weights for {len(views)} views {views}: give one per view, in the "
                "order of tta"
            )
        if given is not None and cfg.merge == "max":
            raise ConfigError(
                f"{where}.{key}: merge max takes no view weights; use mean, mean_prob, geomean or tsharpen, or "
                f"remove {key}"
            )
        if cfg.view_class_weights is not None:
            if not task.logit_views:
                raise ConfigError(
                    f"{where}.view_class_weights: per-class view weights are for {_with('logit_views')}; use "
                    f"view_weights (task: {task.name})"
                )
            if len(cfg.view_class_weights[0]) != m.out_channels:
                raise ConfigError(
                    f"{where}.view_class_weights: {len(cfg.view_class_weights[0])} weights per view, the member "
                    f"outputs {m.out_channels} channels: give one per channel"
                )
            if cfg.merge == "mean_prob" and m.activation == "softmax":
                raise ConfigError(
                    f"{where}.view_class_weights: a per-class mean of softmax probabilities no longer sums to "
                    "one; use merge mean, geomean or tsharpen, or view_weights"
                )
        if cfg.temperature != 1.0 and (not task.logit_views or m.activation == "none"):
            why = (
                "activation none gives no logits to scale" if task.logit_views else f"{task.name} views are not logits"
            )
            raise ConfigError(f"{where}.temperature: {why}; remove it (leave 1.0)")


def _with(capability: str) -> str:
    return " or ".join(t.name for t in TASKS.values() if getattr(t, capability)) or "no registered task"


TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: registers one instance of ``cls`` under ``cls.name``."""
    for attr in ("name", "target", "merges", "blends", "writers"):
        if not hasattr(cls, attr):
            raise TypeError(f"task {cls.__name__} must set '{attr}'")
    TASKS[cls.name] = cls()
    return cls


def find_task(name: str) -> Task:
    """The registered task called ``name``.

    Raises:
        ValueError: no such task (the schema turns it into an error at ``task``).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'{did_you_mean(name, TASKS)}; registered tasks: {', '.join(TASKS)}")
    return TASKS[name]


def choose(kind: str, name: str, table: Mapping[str, Any], where: str) -> Any:
    """``table[name]``, or a ConfigError at ``where`` naming the choices: a registry lookup
    is never the last branch of an if/elif."""
    if name not in table:
        raise ConfigError(
            f"{where}: '{name}' is not a {kind}{did_you_mean(name, table)}; choose one of {', '.join(table)}"
        )
    return table[name]
