"""The package's own exceptions.

Every error a user can cause by their input (a YAML field, an image, a checkpoint, the
cache) is one of these. The message names the file or YAML path and says how to fix it;
the CLI prints it as one line and exits with status 2, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KaggleTTAError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""


class ConfigError(KaggleTTAError):
    """pipeline.yaml (or an override) is invalid."""


class DataError(KaggleTTAError):
    """The test set: a missing, duplicate, empty or unreadable entry."""


class CheckpointError(KaggleTTAError):
    """A member's model or checkpoint cannot be built or loaded."""


class CacheError(KaggleTTAError):
    """The prediction cache lacks an entry a blend needs, or an entry is damaged."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Returns `` — did you mean 'x'?`` for the closest choice, or '' when none is close.

    A short word one character off (``d5`` for ``d4``) counts as close too: difflib scores
    such a pair 0.5, under its cutoff of 0.6.
    """
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close and len(word) <= 3:
        close = [c for c in choices if len(c) == len(word) and sum(a != b for a, b in zip(c, word)) == 1]
    return f" — did you mean '{close[0]}'?" if close else ""


def check_hw(value: object, what: str, error: type[KaggleTTAError]) -> tuple[int, int]:
    """``value`` as a positive ``(H, W)`` pair of ints, else ``error`` naming ``what``."""
    try:
        h, w = (int(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise error(f"{what} must be (H, W), got {value!r}") from None
    if h <= 0 or w <= 0:
        raise error(f"{what} must be positive, got {value!r}")
    return h, w


def template_fields(template: str) -> list[str]:
    """The field names of a ``str.format`` template; ValueError when it is malformed."""
    import string

    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
