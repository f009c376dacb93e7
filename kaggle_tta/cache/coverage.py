"""Which rows a cached view holds, and whether that serves a run, a blend or a shard: written
once, for the engine (is this view done?), the blend (can it read this view?) and the shards
(can this copy stand for that one?).

A view is *plain* (every row) or *gated* (adaptive views: only the rows its gate sent on,
kaggle_tta.ops.gate). A gated view's manifest state records the gate as ``held`` (first view,
rule, threshold, activation, scores version), and a companion array
(:func:`kaggle_tta.cache.entry.held_name`) marks the rows it holds; the view is readable only
with that companion complete. :class:`Held` is that record, typed; :class:`Coverage` is what a
member needs of its views (every row, or the rows of its gate) and answers the questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kaggle_tta.cache.entry import CacheEntry, held_name
from kaggle_tta.ops.gate import SCORES_VERSION, Gate


@dataclass(frozen=True)
class Held:
    """The gate a gated view's rows were chosen by, as its manifest state records it."""

    first: Any
    rule: Any
    threshold: float
    activation: Any
    version: Any

    @classmethod
    def of(cls, entry: CacheEntry, view: str) -> Held | None:
        """What ``view``'s state in ``entry`` says it holds (None: a plain view, every row)."""
        return cls.parse(entry.view_state(view).get("held"))

    @classmethod
    def parse(cls, record: object) -> Held | None:
        if not isinstance(record, dict):
            return None
        try:
            threshold = float(record.get("threshold", -1.0))
        except (TypeError, ValueError):  # a damaged record serves no gate
            threshold = -1.0
        return cls(record.get("first"), record.get("rule"), threshold, record.get("activation"), record.get("version"))

    @classmethod
    def of_gate(cls, gate: Gate, activation: str) -> Held:
        """The record of views computed under ``gate`` with scores through ``activation``."""
        held = cls.parse(gate.record(activation))
        assert held is not None
        return held

    def record(self) -> dict[str, Any]:
        """The manifest's ``held`` value (keys in the order the manifests have always had)."""
        return {
            "first": self.first,
            "rule": self.rule,
            "threshold": self.threshold,
            "activation": self.activation,
            "version": self.version,
        }

    def serves(self, gate: Gate, activation: str) -> bool:
        """Whether these rows include every row ``gate`` needs: the same first view, rule,
        activation and scores, at a threshold at least as high (a tighter gate re-blends)."""
        if gate.skips_nothing:
            return False
        same = (self.first, self.rule, self.activation, self.version) == (
            gate.first,
            gate.rule,
            activation,
            SCORES_VERSION,
        )
        return same and self.threshold >= gate.threshold

    def holds_more_than(self, other: Held | None) -> bool:
        """Whether these rows include rows ``other``'s lack (None: a plain view lacks none)."""
        if other is None:
            return False
        return self != other and self.serves(Gate(other.first, other.rule, other.threshold), other.activation)

    def text(self) -> str:
        return f"{self.rule} > {self.threshold}"


def held_by(entry: CacheEntry, view: str) -> Held | None:
    """The gate ``view`` of ``entry`` was computed under (None: a plain view)."""
    return Held.of(entry, view)


def whole(entry: CacheEntry, view: str) -> bool:
    """Whether the entry's ``view`` is complete, with its row mask where it is gated."""
    return entry.is_complete(view) and (held_by(entry, view) is None or entry.is_complete(held_name(view)))


def more_rows(have: Held | None, pieces: Held | None) -> bool:
    """Whether rows chosen by ``pieces`` (None: every row) include rows a view chosen by
    ``have`` lacks: a plain view holds them all; of two gates, the looser holds the other's."""
    if have is None:
        return False
    if pieces is None:
        return True
    return pieces.holds_more_than(have)


@dataclass(frozen=True)
class Coverage:
    """What a member needs of its views: every row (``gate`` None: no gate, or one that skips
    nothing), or, for each view but the gate's first, the rows its gate sends on."""

    gate: Gate | None
    activation: str

    def wanted(self, view: str) -> Gate | None:
        """The gate whose rows ``view`` must hold (None: every row)."""
        return self.gate if self.gate is not None and view != self.gate.first else None

    def mine(self, view: str) -> Held | None:
        """The record a view computed for this member now would carry."""
        wanted = self.wanted(view)
        return Held.of_gate(wanted, self.activation) if wanted is not None else None

    def serves(self, entry: CacheEntry, view: str, exact: bool = False) -> bool:
        """Whether ``entry``'s complete ``view`` holds every row this member needs: a plain
        view holds every row; a gated one those of its own gate and of tighter ones, with its
        row mask complete. ``exact`` (a shard): only a copy whose rows are this run's own —
        plain for a plain view, this gate's for a gated one — since an assembly joins the
        shards of one gate and never a mix."""
        held = held_by(entry, view)
        wanted = self.wanted(view)
        if exact:
            return held == self.mine(view) and (held is None or entry.is_complete(held_name(view)))
        if held is None:
            return True
        return wanted is not None and held.serves(wanted, self.activation) and entry.is_complete(held_name(view))

    def lacks(self, entry: CacheEntry, view: str) -> str | None:
        """Why a blend cannot read ``view`` from ``entry`` (None: it can): missing or damaged
        (CacheEntry.lacks), or computed for fewer rows than this member needs."""
        why = entry.lacks(view)
        if why is not None:
            return why
        held = held_by(entry, view)
        wanted = self.wanted(view)
        if wanted is None and held is not None:
            return f"computed for the rows of the gate {held.text()} only"
        if wanted is not None and held is not None and not held.serves(wanted, self.activation):
            return (
                f"computed for the rows of the gate {held.text()} on {held.first} ({held.activation}), "
                f"not {wanted.text()} ({self.activation})"
            )
        if held is not None:
            why = entry.lacks(held_name(view))
            return None if why is None else f"its record of the rows it holds: {why}"
        return None


def record_held(entry: CacheEntry, view: str, held: Held | None) -> None:
    """Writes into ``view``'s state the gate its rows are chosen by (None: a plain view)."""
    state = entry.manifest["views"][view]
    if held is None:
        state.pop("held", None)
    else:
        state["held"] = held.record()


def forget_other(entry: CacheEntry, view: str, held: Held | None) -> None:
    """Drops ``view``'s state (and its row mask's) where it was computed under another gate
    than ``held``, or gated where every row is now computed: its rows are not this run's."""
    states = entry.manifest["views"]
    if view in states and Held.parse(states[view].get("held")) != held:
        del states[view]
        states.pop(held_name(view), None)
