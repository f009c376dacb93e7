"""What a run did: per member (views computed and reused, the chunk size, layout and
precision it ended with, adaptive forwards) and in all (:class:`RunStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kaggle_tta.exec.chunks import sizes_text
from kaggle_tta.ops.gate import Forwards


@dataclass
class MemberStats:
    name: str
    views_computed: list[str] = field(default_factory=list)
    views_cached: list[str] = field(default_factory=list)
    nonfinite_recomputed: int = 0
    forward_batch: int | None = None  # the chunk size it ended with (auto: the one picked)
    channels_last: bool | None = None  # the memory layout it ended with (auto: measured on a CPU in fp32)
    precision: str | None = None  # what its rows are computed in (precision auto: after the check against fp32)
    precision_note: str | None = (
        None  # precision auto, reduced: what the check found ("fp32: bf16 top-1 agreed on ...")
    )
    compiled: bool = False  # runtime.compile: its forward ran compiled
    compile_note: str | None = None  # ... compiled or eager, and why
    forwards: Forwards = field(
        default_factory=Forwards
    )  # rows x views forwarded this run, against plain TTA's (adaptive views)


@dataclass
class RunStats:
    device: str
    precision: str | None  # what every member ran in; None where they differ (see MemberStats.precision)
    images: int
    rows_computed: int = 0
    seconds: float = 0.0
    recomputed_damaged: bool = False  # a view found damaged while blending was recomputed
    members: dict[str, MemberStats] = field(default_factory=dict)
    rank: str | None = None  # under several ranks: "rank 1/2", this process's place
    rows: tuple[int, int] | None = None  # ... and its rows (lo, hi)
    ranks: list = field(default_factory=list)  # on rank 0: one line per rank
    assembled: int = 0  # on rank 0: views (and image sizes) assembled from the ranks' shards

    @property
    def forward_batch(self) -> str:
        """The computed members' chunk sizes: one number, or one per member joined by '/'."""
        return sizes_text([m.forward_batch for m in self.members.values() if m.forward_batch is not None])

    @property
    def ranks_line(self) -> str:
        """On rank 0 of several: each rank's rows, what it computed, where, and the views assembled."""
        parts = [
            f"{r.rank} rows {r.lo}-{r.hi} ({r.rows_computed} computed, {r.seconds:.1f}s, {r.device} on {r.host})"
            for r in self.ranks
        ]
        return f"ranks: {'; '.join(parts)}; {self.assembled} view(s) assembled from their shards"

    @property
    def precision_text(self) -> str:
        """The precision for a log line: one, each member's (where they differ), or none computed."""
        if self.precision is not None:
            return self.precision
        computed = [m.precision for m in self.members.values() if m.views_computed and m.precision]
        each = computed or sorted({m.precision for m in self.members.values() if m.precision is not None})
        return "/".join(each) if each else "nothing computed"  # several: each computed member's, in member order

    @property
    def computed(self) -> dict[str, str]:
        """Each member's precision: the entry a blend of this run must read (plan.find_entry)."""
        return {name: m.precision for name, m in self.members.items() if m.precision is not None}

    @property
    def forwards(self) -> Forwards:
        """Forwards this run ran, against what plain TTA would have run (adaptive views)."""
        total = Forwards()
        for m in self.members.values():
            total.add(m.forwards)
        return total

    @property
    def all_cached(self) -> bool:
        return all(not m.views_computed for m in self.members.values())
