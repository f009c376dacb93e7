"""The base of every pipeline.yaml section (unknown keys are errors) and the field checks the
sections share."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict

from kaggle_tta.config.errors import template_fields


class Section(BaseModel):
    """A part of pipeline.yaml: unknown keys are errors (a typo is never silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=False)


def check_template(template: str, sample: dict[str, Any], example: str) -> str:
    """A ``str.format`` template that only uses the fields of ``sample`` and formats them.

    Checked at load so that a typo (``images/{id.jpg``) is an error naming its YAML path
    rather than a traceback from the first image it is used on.
    """
    fields = ", ".join(f"{{{k}}}" for k in sample)
    try:
        names = template_fields(template)
    except ValueError as exc:
        raise ValueError(
            f"'{template}' is not a valid template ({exc}); write fields as {fields}, e.g. '{example}'"
        ) from None
    for name in names:
        if name not in sample:
            raise ValueError(f"'{template}': unknown field '{{{name}}}'; only {fields} may be used, e.g. '{example}'")
    try:
        template.format(**sample)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ValueError(
            f"'{template}' cannot be formatted ({exc}); write fields as {fields}, e.g. '{example}'"
        ) from None
    return template


def check_fraction(v: float) -> float:
    """``v`` in [0, 1] (NaN is not)."""
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"must be in [0, 1], got {v}")
    return v


def check_positive(v: float) -> float:
    """``v`` positive and finite (NaN is not)."""
    if not 0.0 < v < math.inf:
        raise ValueError(f"must be positive and finite, got {v}")
    return v


def check_fractions(v: float | list[float]) -> float | list[float]:
    """One fraction, or one per class (a non-empty list), each in [0, 1]."""
    if isinstance(v, list):
        if not v:
            raise ValueError("give one value, or a non-empty list with one per class")
        bad = [x for x in v if not 0.0 <= x <= 1.0]
        if bad:
            raise ValueError(f"each must be in [0, 1], got {bad[0]}")
        return v
    return check_fraction(v)


def check_weights(v: list[float], what: str = "weights") -> list[float]:
    """Finite, non-negative weights that are not all zero."""
    if any(w < 0 or not math.isfinite(w) for w in v):
        raise ValueError(f"{what} must be finite and non-negative, got {v}")
    if not v or sum(v) <= 0:
        raise ValueError(f"{what} must not all be zero")
    return v


def class_names(v: object) -> object:
    """Class names that arrive as integers (a dict given to the API, ``--set``) are their
    decimal text; other numbers and booleans are refused with the fix. In a pipeline file the
    loader keeps each name's own text (config.yaml_files.NAME_LISTS: ``[010, no]`` stays so)."""
    if not isinstance(v, list):
        return v
    odd = next((x for x in v if isinstance(x, (bool, float))), None)
    if odd is not None:
        raise ValueError(f"class name {odd!r} is not text; quote the names as the competition writes them")
    return [str(x) if isinstance(x, int) else x for x in v]
