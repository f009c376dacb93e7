"""The package's own exceptions.

Every error a user can cause by their input (a YAML field, an image, a checkpoint, the
cache) is one of these. The message names the file or YAML path and says how to fix it;
the CLI prints it as one line and exits with status 2, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


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


def shown_path(path: object) -> str:
    """A path as a message shows it: as is, or quoted with escapes where it holds a line break
    or a NUL (a file name may), so that the message stays one line."""
    s = str(path)
    return s if s.splitlines() == [s] and "\0" not in s else repr(s)


def os_problem(exc: OSError, path: object = None) -> str:
    """An OS error on a user's path as ``path: reason`` (the path the OS names first)."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or type(exc).__name__
    return f"{shown_path(where)}: {reason}" if where is not None else reason


class UserPath:
    """The boundary around I/O on a path the user named (an image, a CSV, an output folder):
    an OS error there is one line naming the path and the fix, of the given error class.

    Used as ``with UserPath(path, "check that it exists and is readable", DataError): ...``.
    A ``ValueError`` from the OS layer (an embedded NUL byte in a path) is one too.
    """

    def __init__(self, path: object, fix: str, error: type[KaggleTTAError] = DataError) -> None:
        self.path, self.fix, self.error = path, fix, error

    def __enter__(self) -> UserPath:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, OSError):
            raise self.error(f"{os_problem(exc, self.path)}; {self.fix}") from None
        if isinstance(exc, ValueError) and "null byte" in str(exc):
            raise self.error(f"{shown_path(self.path)}: the path holds a NUL byte; {self.fix}") from None


def call_user(fn: Callable[..., T], where: str, *args: object, **kwargs: object) -> T:
    """Calls code the user supplied (``module:callable`` in the YAML or on the command line):
    whatever it raises, other than our own errors and Ctrl-C, is one line naming ``where``
    (the callable and its YAML path or flag) and the error."""
    try:
        return fn(*args, **kwargs)
    except KaggleTTAError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        said = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        raise ConfigError(f"{where} raised {said}; fix it or remove it") from None
