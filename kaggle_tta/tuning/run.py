"""``tune``: from a labelled pipeline's cache to tuned.yaml, its report and its picture.

The task says what can be tuned (``Task.tuner``, a key of :data:`PROBLEMS`); the problem
fits, predicts and scores from the cache alone; :mod:`kaggle_tta.tuning.honest` estimates the
gain out of sample. Nothing here builds a model, reads an image or imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaggle_tta.config.errors import ConfigError
from kaggle_tta.tuning.cache import fill_command, open_sources
from kaggle_tta.tuning.honest import Estimate, estimate
from kaggle_tta.tuning.options import TuneOptions
from kaggle_tta.tuning.problem import Point, TuningProblem
from kaggle_tta.tuning.report import TuneResult, summary_table

if TYPE_CHECKING:
    from kaggle_tta.engine.plan import Plan
    from kaggle_tta.exec.dag import MemberSource

MakeProblem = Callable[["Plan", "list[MemberSource]", TuneOptions], TuningProblem[Any]]


def _classes(plan: Plan, sources: list[MemberSource], opts: TuneOptions) -> TuningProblem[Any]:
    from kaggle_tta.tuning.classes import ClassProblem

    return ClassProblem(plan, sources, opts)


def _masks(plan: Plan, sources: list[MemberSource], opts: TuneOptions) -> TuningProblem[Any]:
    from kaggle_tta.tuning.masks import MaskProblem

    return MaskProblem(plan, sources, opts)


def _boxes(plan: Plan, sources: list[MemberSource], opts: TuneOptions) -> TuningProblem[Any]:
    from kaggle_tta.tuning.boxes import BoxProblem

    return BoxProblem(plan, sources, opts)


# Task.tuner -> the problem that tunes it (each imported only when used).
PROBLEMS: dict[str, MakeProblem] = {"classes": _classes, "masks": _masks, "boxes": _boxes}
LEARNS_GATES = {"classes"}  # the problems that learn adaptive gates (--adaptive; kaggle_tta.tuning.gates)


def tune(
    pipeline: Any,
    overrides: list[str] | None = None,
    *,
    override_files: Sequence[str | Path] | None = None,
    out: str | Path | None = None,
    picture: str | Path | None = None,
    options: TuneOptions | None = None,
    fill_hint: str | None = None,
    **switches: Any,
) -> TuneResult:
    """Learns views, weights, temperatures and thresholds from a labelled pipeline's cache.

    Args:
        pipeline: a path, a dict, a config (load_pipeline) or a plan (build_plan).
        overrides: ``--set`` strings (for a path or a dict), applied after ``override_files``.
        override_files: partial pipeline YAMLs merged over it first (``--overrides``).
        out: where to write tuned.yaml (None: not written; ``result.yaml()`` has it).
        picture: the gain-against-cost PNG (default: ``out`` with .png; None without out).
        options: a TuneOptions; or give its fields as keywords (``folds=5, views=False``).
        fill_hint: how the error naming missing cache entries names the pipeline.

    Returns:
        TuneResult: ``overrides`` (tuned.yaml's content), ``tables``, ``estimate``, ``report()``.

    Raises:
        ConfigError: no ground truth, a task with nothing to tune, a bad option.
        CacheError: an entry is missing (named, with the command that fills it) or damaged.
    """
    opts = options or TuneOptions(**switches)
    opts.check()
    plan = _plan_of(pipeline, overrides, override_files)
    make = _problem_maker(plan, opts)
    name = fill_hint or _name(plan)
    sources = open_sources(plan, fill_command(name, [str(f) for f in override_files or []], overrides or []))
    problem = make(plan, sources, opts)
    problem.calibrate_keep(opts.folds, opts.seed)  # before the estimate: its folds learn their gates at the keep chosen
    est = estimate(problem, opts.folds, opts.seed)
    result = _result(problem, est, name, plan.cfg.submission_source)
    if out is not None:
        result.write(out)
        picture = picture if picture is not None else Path(out).with_suffix(".png")
    points = problem.points(est.tuned, result.tables)
    if picture is not None:
        _add_picture(result, picture, points, problem.gain_label, plan.task.name)
    return result


def _plan_of(pipeline: Any, overrides: list[str] | None, override_files: Sequence[str | Path] | None) -> Plan:
    """The plan of a path, a dict, a config or a plan (overrides apply to a path or a dict)."""
    from kaggle_tta.api import plan_of
    from kaggle_tta.config import load_pipeline
    from kaggle_tta.engine.plan import Plan

    if isinstance(pipeline, (str, Path, dict)):
        pipeline = load_pipeline(pipeline, overrides, override_files=override_files)
    return pipeline if isinstance(pipeline, Plan) else plan_of(pipeline)


def _problem_maker(plan: Plan, opts: TuneOptions) -> MakeProblem:
    """What makes the task's tuning problem (ConfigError where the task tunes nothing, or
    --adaptive asks gates of a problem that learns none)."""
    from kaggle_tta.tasks import choose

    task = plan.task
    if task.tuner is None:
        raise ConfigError(f"task: kaggle-tta tune has nothing to learn for {task.name} (its Task sets no tuner)")
    make: MakeProblem = choose("tuning problem", task.tuner, PROBLEMS, f"task {task.name}: Task.tuner")
    if opts.adaptive not in (None, "off") and task.tuner not in LEARNS_GATES:
        raise ConfigError(
            f"--adaptive {opts.adaptive}: tune learns gates for the tuners {', '.join(sorted(LEARNS_GATES))}; "
            f"{task.name} tunes '{task.tuner}' "
            "(a gate there is set by hand, members[].adaptive, and tune scores it as the blend does); "
            "use --adaptive off"
        )
    return make


def _result(problem: TuningProblem[Any], est: Estimate, name: str, source: str) -> TuneResult:
    """The result: tuned.yaml's content, the summary and the problem's tables, the notes."""
    result = TuneResult(name, source, est, problem.overrides(est.tuned), warnings=est.warnings)
    result.tables = {"summary": summary_table(est, source), **problem.tables(est.untuned, est.tuned)}
    result.notes = list(getattr(est.tuned, "notes", []))
    result.notes += problem.report_notes(est.tuned)
    return result


def _add_picture(result: TuneResult, picture: str | Path, points: list[Point], gain_label: str, task: str) -> None:
    """Writes the gain-against-cost picture of ``points`` (or notes why there is none)."""
    if points:
        from kaggle_tta.tuning.picture import write_picture

        write_picture(Path(picture), points, f"gain ({gain_label}) against seconds: {Path(result.pipeline).name}")
        result.picture = str(picture)
    else:
        result.notes.append(f"no picture: {task} tunes no views or members, only its thresholds")


def _name(plan: Plan) -> str:
    src = plan.cfg.source
    return str(src) if src is not None else "PIPELINE"
