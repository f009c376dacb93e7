"""The whole of pipeline.yaml: its sections, the task's defaults and the blend graph's checks."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator

from kaggle_tta.config.data import DataConfig
from kaggle_tta.config.errors import CheckpointError, did_you_mean
from kaggle_tta.config.section_base import Section
from kaggle_tta.config.sections import BlendConfig, CacheConfig, MemberConfig, RuntimeConfig, SubmissionConfig
from kaggle_tta.config.task_sections import DetectionConfig, RegressionConfig, SegmentationConfig


class PipelineConfig(Section):
    """The whole of pipeline.yaml."""

    task: str = "classification"
    """A registered task (kaggle_tta.tasks): classification, segmentation, detection. The plan
    checks the name and fills the settings whose default is the task's (a member's ``merge``, a
    blend's ``method``, ``submission.format``): the schema knows no task."""
    multilabel: bool = False
    """Classification with independent labels (sigmoid); views must leave every label unchanged."""
    metric: str | None = None
    """What the report scores and ``tune`` optimizes, by name (kaggle_tta.ops.metrics):
    accuracy, logloss, macro_f1, f1 (micro), f2, auc, qwk, map@3, map@5; regression rmse, mae.
    Default: accuracy (F1 for multi-label; RMSE for regression)."""
    data: DataConfig
    runtime: RuntimeConfig = RuntimeConfig()
    cache: CacheConfig = CacheConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    detection: DetectionConfig = DetectionConfig()
    regression: RegressionConfig = RegressionConfig()
    members: list[MemberConfig]
    blends: list[BlendConfig] = []
    submission: SubmissionConfig = SubmissionConfig()

    # Set by load_pipeline: the folder relative paths resolve against; not a YAML key.
    base_dir: Path = Field(default=Path("."), exclude=True)
    # Set by load_pipeline: the YAML file read (None for a dict); the cache records which
    # pipeline files use an entry, so that `cache prune` of another keeps it.
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _graph(self) -> PipelineConfig:
        if not self.members:
            raise ValueError("'members' must list at least one model")
        names: dict[str, str] = {}
        for i, m in enumerate(self.members):
            if m.name in names:
                raise ValueError(f"members[{i}].name: '{m.name}' is used twice; names must be unique")
            names[m.name] = "member"
        for i, b in enumerate(self.blends):
            if b.name in names:
                raise ValueError(f"blends[{i}].name: '{b.name}' is already a {names[b.name]}")
            names[b.name] = "blend"
        blend_inputs = {b.name: b.inputs for b in self.blends}
        for i, b in enumerate(self.blends):
            for j, inp in enumerate(b.inputs):
                if inp not in names:
                    raise ValueError(
                        f"blends[{i}].inputs[{j}]: unknown input '{inp}'{did_you_mean(inp, names)}; "
                        "inputs must be member or blend names"
                    )
        # Depth-first search for a cycle; report it as a path.
        state: dict[str, int] = {}

        def visit(node: str, path: list[str]) -> None:
            if state.get(node) == 1:
                cycle = path[path.index(node) :] + [node]
                raise ValueError(f"blends form a cycle: {' -> '.join(cycle)}")
            if state.get(node) == 2 or node not in blend_inputs:
                return
            state[node] = 1
            for inp in blend_inputs[node]:
                visit(inp, path + [node])
            state[node] = 2

        for b in self.blends:
            visit(b.name, [])
        src = self.submission.source
        if src is not None and src not in names:
            raise ValueError(f"submission.source: unknown '{src}'{did_you_mean(src, names)}")
        if src is None and not self.blends and len(self.members) > 1:
            raise ValueError("submission.source: several members and no blend; name the member or blend to write")
        return self

    # ---- derived values -------------------------------------------------------------------

    def resolve(self, path: Path | str) -> Path:
        """A path from the YAML, made absolute against pipeline.yaml's folder."""
        p = Path(os.path.expanduser(str(path)))
        return p if p.is_absolute() else (self.base_dir / p)

    def checkpoint_of(self, m: MemberConfig) -> Path | None:
        """A member's checkpoint file: its path, or inside its Kaggle Model version, found
        where Kaggle mounts it (/kaggle/input, or KAGGLE_INPUT_ROOT) or under
        runtime.kaggle_models (see kaggle_model_dirs); None without a checkpoint."""
        if m.checkpoint is None:
            return None
        if m.kaggle_model is None:
            return self.resolve(m.checkpoint)
        tried = kaggle_model_dirs(m.kaggle_model, self)
        for folder in tried:
            if folder.is_dir():
                return folder / m.checkpoint
        raise CheckpointError(
            f"members.{m.name}.kaggle_model: {m.kaggle_model} is not mounted here (looked in "
            f"{', '.join(str(t) for t in tried[:3])}, ...); on Kaggle add it to the notebook's models, elsewhere set "
            "runtime.kaggle_models to the folder holding it (kagglehub.model_download gives one)"
        )

    @property
    def submission_source(self) -> str:
        if self.submission.source:
            return self.submission.source
        return self.blends[-1].name if self.blends else self.members[0].name

    def member(self, name: str) -> MemberConfig:
        return next(m for m in self.members if m.name == name)


def kaggle_model_dirs(handle: str, cfg: PipelineConfig) -> list[Path]:
    """Where a Kaggle Model version may be, in order: under /kaggle/input (KAGGLE_INPUT_ROOT)
    as Kaggle mounts models — ``<model>/<framework>/<variation>/<version>``, or with the owner
    and a ``models/`` level in front — then the same under runtime.kaggle_models."""
    owner, model, framework, variation, version = handle.split("/")
    tail = Path(model, framework, variation, version)
    roots = [Path(os.environ.get("KAGGLE_INPUT_ROOT", "/kaggle/input"))]
    if cfg.runtime.kaggle_models is not None:
        roots.append(cfg.resolve(cfg.runtime.kaggle_models))
    return [r / lay for r in roots for lay in (tail, Path("models", owner) / tail, Path(owner) / tail)]
