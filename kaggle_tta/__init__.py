"""kaggle-tta: test-time-augmentation ensemble inference with a prediction cache.

The Python API (the same operations as the CLI)::

    from kaggle_tta import load_pipeline, build_plan, infer, blend, run, tune

Each of ``infer``, ``blend``, ``run`` and ``tune`` takes a pipeline as a path, a dict, a config from
``load_pipeline`` or a plan from ``build_plan``, plus ``--set``-style overrides. They import
lazily: ``import kaggle_tta`` loads neither torch nor polars.
"""

from __future__ import annotations

import os
from typing import Any

# albumentations asks PyPI for a newer version on import (a 2 s timeout, per process, rank and
# loader worker) unless this is set: no run of ours reaches the network, and a Kaggle kernel
# is offline. A user's own setting wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
__all__ = ["load_pipeline", "build_plan", "infer", "blend", "run", "tune", "__version__"]

_WHERE = {
    "load_pipeline": "kaggle_tta.config.loading",
    "build_plan": "kaggle_tta.engine.plan",
    "infer": "kaggle_tta.api",
    "blend": "kaggle_tta.api",
    "run": "kaggle_tta.api",
    "tune": "kaggle_tta.tuning.run",
}


def __getattr__(name: str) -> Any:  # PEP 562: the API on first use, so the CLI starts fast
    import importlib

    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'kaggle_tta' has no attribute '{name}'")
