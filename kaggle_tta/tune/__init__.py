"""``kaggle-tta tune``: learn views, weights, temperatures and thresholds from a labelled
fold's cache, with an honest out-of-sample estimate (README, "Tuning from the cache").

``kaggle_tta.tune`` is both this package and the function: calling the package calls
:func:`kaggle_tta.tune.run.tune` (``import kaggle_tta; kaggle_tta.tune("val.yaml")``), so
that the public name and the package name cannot shadow each other.

- ``options``: the switches (TuneOptions) and the CLI's arguments;
- ``cache``: reading the entries (missing ones named with the command that fills them);
- ``member``, ``losses``, ``temperature``, ``views``: a member's merge, NLL, calibration, GPS
  and AugTTA / ClassTTA weights;
- ``ensemble``: member weights (hill climbing with replacement, Nelder-Mead);
- ``thresholds``, ``masks``, ``boxes``: multi-label thresholds; segmentation threshold and
  min_area; detection fusion thresholds;
- ``classes`` (+ ``classes_report``): the classification problem and its tables;
- ``gates``: adaptive views' gates (``--adaptive``), one threshold per member, the fewest
  extra forwards that keep ``--keep-gain`` of the full TTA's gain and ``--keep-changes`` of
  the decisions it changes (``classes.ClassProblem.calibrate_keep``: the in-sample keep that
  holds ``--keep-gain`` on the held-out folds);
- ``honest``: k-fold in- and out-of-sample scores, warnings; ``report``, ``picture``.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__all__ = ["tune", "TuneOptions", "TuneResult"]


def __getattr__(name: str) -> Any:  # light until used: the CLI imports options only
    if name == "tune":
        from kaggle_tta.tune.run import tune

        return tune
    if name == "TuneOptions":
        from kaggle_tta.tune.options import TuneOptions

        return TuneOptions
    if name == "TuneResult":
        from kaggle_tta.tune.report import TuneResult

        return TuneResult
    raise AttributeError(f"module 'kaggle_tta.tune' has no attribute '{name}'")


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from kaggle_tta.tune.run import tune

        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
