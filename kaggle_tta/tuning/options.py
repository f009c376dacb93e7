"""What ``kaggle-tta tune`` is asked to learn, and its command-line arguments (light: the
CLI defines them without importing numpy)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

MEMBER_WEIGHTS = ("hill", "optimise", "off")
OBJECTIVES = ("nll", "metric")
ADAPTIVE = ("off", "confidence", "margin")  # as kaggle_tta.ops.gate.RULES, plus off (kept light: no numpy)


@dataclass
class TuneOptions:
    """The switches of each tuner (the CLI's flags; defaults as the CLI's)."""

    views: bool = True
    """Greedy Policy Search over each member's views (with replacement)."""
    view_weights: bool = True
    """AugTTA: per-view weights refined on the simplex."""
    class_weights: bool = False
    """ClassTTA: per-(view, class) weights (many parameters: needs many labelled rows)."""
    temperature: bool = True
    """A temperature per member."""
    member_weights: str = "hill"
    """hill (Caruana's hill climbing with replacement), optimise (then Nelder-Mead on the
    simplex) or off."""
    thresholds: bool = True
    """Multi-label per-class thresholds; segmentation threshold and min_area per class;
    detection skip_box_thr and iou_thr."""
    objective: str = "nll"
    """What the member weights minimize: nll, or metric (the negated metric)."""
    metric: str | None = None
    """The metric: the task's (None), a name (accuracy, f1, nll) or ``module:callable``
    called as ``fn(y_true, probs) -> float``, higher is better."""
    folds: int = 5
    """k of the out-of-sample estimate (0: in-sample only)."""
    seed: int = 0
    max_steps: int = 20
    """Hill climbing: at most this many copies of the blend's inputs."""
    adaptive: str | None = None
    """Adaptive views: learn a gate per member with this rule (confidence or margin), or off
    (no gate: members whose pipeline sets one get ``adaptive: null``). None: off, except for
    members whose pipeline sets ``adaptive``, which learn their own rule."""
    keep_gain: float = 0.9
    """The gates keep at least this share of the full TTA's metric gain over no TTA."""
    calibrate_keep: bool = True
    """With folds: learn the gates at the lowest in-sample keep whose held-out gain kept, over
    the folds, reaches keep_gain (by keep_margin standard errors; ClassProblem.calibrate_keep);
    else at keep_gain itself."""
    keep_margin: float = 0.0
    """--calibrate-keep asks the held-out gain kept to reach keep_gain by this many standard
    errors (the bootstrap of gates.pooled_spread; the report shows each figure with its SE):
    a few rows decide that share, so a figure that only just reaches keep_gain says little.
    0: the figure alone. Higher asks for more certainty, paid in forwards (on the demo's
    splits, 0.5 ran up to 1.6x the forwards, 2.8x the extra ones, for no gain kept that new
    images showed)."""
    keep_changes: float = 0.9
    """... and make, of the decisions the full TTA changes (the submission's class of a row,
    or a class's yes/no under multi-label), at least this share as the full TTA does. Labels
    are not read: it counts helped and hurt rows alike, so a gate is not learned from the
    few rows whose gain happens to cancel on the training rows (0: off)."""

    def check(self) -> None:
        from kaggle_tta.config.errors import ConfigError

        if self.member_weights not in MEMBER_WEIGHTS:
            raise ConfigError(f"--member-weights: '{self.member_weights}'; choose one of {', '.join(MEMBER_WEIGHTS)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective: '{self.objective}'; choose one of {', '.join(OBJECTIVES)}")
        if self.folds < 0 or self.folds == 1:
            raise ConfigError(
                f"--folds: {self.folds}; give 0 (in-sample only) "
                "or k >= 2 (tune on k - 1 folds, score the held-out one)"
            )
        if self.max_steps < 1:
            raise ConfigError(f"--max-steps: {self.max_steps}; give at least 1")
        if self.adaptive is not None and self.adaptive not in ADAPTIVE:
            raise ConfigError(f"--adaptive: '{self.adaptive}'; choose one of {', '.join(ADAPTIVE)}")
        if not 0.0 <= self.keep_gain <= 1.0:
            raise ConfigError(
                f"--keep-gain: {self.keep_gain}; give a share of the full TTA's gain between 0 and 1 (e.g. 0.9)"
            )
        if not 0.0 <= self.keep_margin <= 10.0:
            raise ConfigError(
                f"--keep-margin: {self.keep_margin}; give standard errors between 0 and 10 "
                "(e.g. 1; 0: the held-out figure alone)"
            )
        if not 0.0 <= self.keep_changes <= 1.0:
            raise ConfigError(
                f"--keep-changes: {self.keep_changes}; give a share of the full TTA's changed decisions "
                "between 0 and 1 (e.g. 0.9; 0: off)"
            )


SWITCHES = {
    "views": "Greedy Policy Search: which views each member keeps (with replacement)",
    "view-weights": "AugTTA: per-view weights on the simplex, regularized",
    "class-weights": "ClassTTA: per-(view, class) weights (off by default: V x C parameters)",
    "temperature": "a temperature per member (NLL and ECE before and after)",
    "thresholds": (
        "multilabel per-class thresholds; segmentation threshold + min_area per class; detection skip_box_thr / iou_thr"
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The tune subcommand's own arguments (the pipeline, --set and --overrides are shared)."""
    p.add_argument(
        "--out",
        default="tuned.yaml",
        help="the partial pipeline to write (default: tuned.yaml); apply it with --overrides",
    )
    p.add_argument(
        "--folds",
        type=int,
        default=5,
        help=(
            "k of the out-of-sample estimate: tune on k - 1 folds, score the held-out one "
            "(0: in-sample only; default 5)"
        ),
    )
    p.add_argument(
        "--metric",
        default=None,
        help=(
            "the task's metric (default), accuracy, f1, nll, or module:callable as fn(y_true, probs) -> float, "
            "higher is better"
        ),
    )
    _add_tuner_arguments(p)
    _add_gate_arguments(p)
    p.add_argument("--report", default=None, help="also write the report (markdown) here")
    p.add_argument("--picture", default=None, help="the gain-against-cost PNG (default: beside --out, .png)")


def _add_tuner_arguments(p: argparse.ArgumentParser) -> None:
    """Which tuners run (SWITCHES), and how the member weights are learned."""
    defaults = TuneOptions()
    for name, text in SWITCHES.items():
        p.add_argument(
            f"--{name}",
            action=argparse.BooleanOptionalAction,
            default=getattr(defaults, name.replace("-", "_")),
            help=text,
        )
    p.add_argument(
        "--member-weights",
        choices=MEMBER_WEIGHTS,
        default="hill",
        help="blend weights: hill climbing with replacement (default), optimise (then Nelder-Mead), off",
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="nll",
        help="what member weights minimize: nll (default) or the negated metric",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=20,
        help="hill climbing: at most this many copies of a blend's inputs (default 20)",
    )
    p.add_argument("--seed", type=int, default=0, help="folds and minibatches (default 0)")


def _add_gate_arguments(p: argparse.ArgumentParser) -> None:
    """Learning the adaptive gates (--adaptive) and what they keep."""
    p.add_argument(
        "--adaptive",
        choices=ADAPTIVE,
        default=None,
        help=(
            "learn each member's adaptive gate with this rule "
            "(off: none; default: off, except members whose pipeline sets adaptive learn its rule)"
        ),
    )
    p.add_argument(
        "--keep-gain",
        type=float,
        default=0.9,
        help="the gates keep at least this share of the full TTA's metric gain over no TTA (default 0.9)",
    )
    p.add_argument(
        "--calibrate-keep",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "with --folds: learn the gates at the lowest in-sample keep whose held-out gain kept reaches --keep-gain "
            "(by --keep-margin SEs; default on)"
        ),
    )
    p.add_argument(
        "--keep-margin",
        type=float,
        default=0.0,
        help=(
            "--calibrate-keep: the held-out gain kept must reach --keep-gain by this many (bootstrap) standard errors "
            "(default 0: the figure alone)"
        ),
    )
    p.add_argument(
        "--keep-changes",
        type=float,
        default=0.9,
        help=(
            "and make at least this share of the decisions the full TTA changes as it does "
            "(labels not read; 0: off; default 0.9)"
        ),
    )


def options_from(args: argparse.Namespace) -> TuneOptions:
    return TuneOptions(
        views=args.views,
        view_weights=args.view_weights,
        class_weights=args.class_weights,
        temperature=args.temperature,
        member_weights=args.member_weights,
        thresholds=args.thresholds,
        objective=args.objective,
        metric=args.metric,
        folds=args.folds,
        seed=args.seed,
        max_steps=args.max_steps,
        adaptive=args.adaptive,
        keep_gain=args.keep_gain,
        keep_changes=args.keep_changes,
        calibrate_keep=args.calibrate_keep,
        keep_margin=args.keep_margin,
    )
