"""A run's phases, from its first second: each announced on stderr as it starts (reading the
pipeline, listing the test set, hashing its files, checking precision, building each member,
timing chunk sizes and layouts, streaming, blending), and a summary whose times add up to the
wall time since the command started, with each phase's share (on stderr too: stdout stays
the report).

One recorder per command (``begin``); library calls without one record nothing. Phases of the
same name add up (streaming before and after a trial).
"""

from __future__ import annotations

import sys
import time


class Phases:
    def __init__(self, verbose: bool):
        self.t0 = time.perf_counter()
        self.verbose = verbose
        self.spent: dict[str, float] = {}
        self.current: str | None = None
        self.since = self.t0

    def start(self, name: str) -> None:
        now = time.perf_counter()
        self._close(now)
        self.current, self.since = name, now
        if self.verbose:
            print(f"kaggle-tta: [{now - self.t0:6.1f}s] {name}", file=sys.stderr, flush=True)

    def say(self, line: str) -> None:
        """A line within the current phase (a decision and why), not a phase of its own."""
        if self.verbose:
            print(f"kaggle-tta: [{time.perf_counter() - self.t0:6.1f}s]   {line}", file=sys.stderr, flush=True)

    def _close(self, now: float) -> None:
        if self.current is not None:
            self.spent[self.current] = self.spent.get(self.current, 0.0) + now - self.since
            self.current = None

    def report(self) -> None:
        """The summary on stderr, after the command's own output (unless quiet)."""
        if self.verbose:
            print(f"kaggle-tta: {self.summary()}", file=sys.stderr, flush=True)

    def summary(self) -> str:
        """``time: 61.9s = reading the pipeline 0.3s (0%) + ...``: every phase, in the order first
        started, and what no phase covered (imports, printing) as ``other``."""
        now = time.perf_counter()
        self._close(now)
        total = now - self.t0
        parts = dict(self.spent)
        other = total - sum(parts.values())
        if other > 0.05:
            parts["other"] = other
        shown = " + ".join(f"{k} {v:.1f}s ({100 * v / total:.0f}%)" for k, v in parts.items()) if total else ""
        return f"time: {total:.1f}s = {shown}"


_current: Phases | None = None


def begin(verbose: bool) -> Phases:
    """A new recorder for this command (the CLI's; each command's times start here)."""
    global _current
    _current = Phases(verbose)
    return _current


def begin_command(verbose: bool) -> Phases:
    """A CLI command's recorder, its first phase announced at once."""
    phases = begin(verbose)
    phases.start("reading the pipeline")
    return phases


def end() -> None:
    """The command is over: later library calls in this process record nothing."""
    global _current
    _current = None


def phase(name: str) -> None:
    """Marks the start of a phase (nothing without a recorder)."""
    if _current is not None:
        _current.start(name)


def say(line: str) -> None:
    """A line within the current phase (nothing without a recorder)."""
    if _current is not None:
        _current.say(line)


def summary() -> str | None:
    return _current.summary() if _current is not None else None
