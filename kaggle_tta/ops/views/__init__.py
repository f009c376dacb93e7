"""TTA views: pure functional ops, View objects with inverses, presets and the YAML parser."""

from kaggle_tta.ops.views.presets import D4_ELEMENTS, PRESETS, compose, parse_tta, view_from_name
from kaggle_tta.ops.views.views import Parametric, View, register_op

__all__ = ["D4_ELEMENTS", "PRESETS", "Parametric", "View", "compose", "parse_tta", "register_op", "view_from_name"]
