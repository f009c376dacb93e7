"""``kaggle-tta tune``: learn views, weights, temperatures and thresholds from a labelled
fold's cache, with an honest out-of-sample estimate (docs/tune.md).

The public function is :func:`kaggle_tta.tuning.run.tune`, exported here and as
``kaggle_tta.tune``. The package is named ``tuning``, not ``tune``: a package and a function
of one name at the top of ``kaggle_tta`` shadow each other (whichever is imported first).

- ``options``: the switches (TuneOptions) and the CLI's arguments;
- ``problem``: what every tuning problem gives ``tune`` (TuningProblem);
- ``cache``: reading the entries (missing ones named with the command that fills them);
- ``member``, ``losses``, ``temperature``, ``views``: a member's merge, NLL, calibration, GPS
  and AugTTA / ClassTTA weights;
- ``ensemble``: member weights (hill climbing with replacement, Nelder-Mead);
- ``thresholds``, ``masks``, ``boxes``: multi-label thresholds; segmentation threshold and
  min_area; detection fusion thresholds;
- ``class_data``: a classification pipeline's labelled rows, cached members, metric and
  predictions under a tuning (as the blend computes them);
- ``classes`` (+ ``classes_report``): the classification problem and its tables;
- ``gates`` (+ ``gate_results``, ``gates_report``): adaptive views' gates (``--adaptive``), one
  threshold per member, the fewest extra forwards that keep ``--keep-gain`` of the full TTA's
  gain and ``--keep-changes`` of the decisions it changes (``classes.ClassProblem.calibrate_keep``:
  the in-sample keep that holds ``--keep-gain`` on the held-out folds); their table and summary;
- ``honest``: k-fold in- and out-of-sample scores, warnings; ``report``, ``picture``.

Imports go one way: ``problem``, ``options``, ``cache``, ``member`` ... ``gate_results`` below
``class_data``, below ``gates`` and ``classes_report``, below ``gates_report``, below
``classes``; ``run`` on top.
"""

from __future__ import annotations

from typing import Any

__all__ = ["tune", "TuneOptions", "TuneResult"]

_WHERE = {
    "tune": "kaggle_tta.tuning.run",
    "TuneOptions": "kaggle_tta.tuning.options",
    "TuneResult": "kaggle_tta.tuning.report",
}


def __getattr__(name: str) -> Any:  # light until used: the CLI imports options only
    import importlib

    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'kaggle_tta.tuning' has no attribute '{name}'")
