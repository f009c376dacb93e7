"""One member's forward machinery, shared by every task's step.

- :class:`ChunkSizer` tunes the chunk size and the memory layout on the first chunks;
- :class:`Runner` runs one chunk: autocast, channels_last, the fp32 recompute of a chunk that
  comes out non-finite under reduced precision, and out-of-memory pieces;
- :func:`run_chunks` is the one forward-chunk loop: it packs pieces of rows (a view's inputs)
  into chunks of the current size, runs them, hands each output to the task, and counts
  seconds and fp32 recomputes per view;
- :class:`MemberWork` is one member's pending work in a run: its cache entry, the views still
  to compute, their open files and where each resumes;
- :class:`ProbeWork` and :func:`compare_precision`: the check of ``precision: auto`` (a
  member's first rows computed in reduced precision and in fp32, compared against stated
  bounds; see engine.choose_precisions).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from kaggle_tta.cache.entry import held_name
from kaggle_tta.config.errors import CheckpointError
from kaggle_tta.ops.gate import Forwards, Gate, needs

if TYPE_CHECKING:
    from kaggle_tta.cache import CacheEntry
    from kaggle_tta.engine.plan import MemberPlan

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def sizes_text(sizes: list[int]) -> str:
    """Chunk sizes of several members: '32' when they agree, else '32/64' in member order."""
    return str(sizes[0]) if len(set(sizes)) == 1 else "/".join(map(str, sizes))


class ChunkSizer:
    """One member's forward tuning, decided on its first chunks (their outputs are kept;
    nothing is computed twice):

    - the chunk size, when ``forward_batch: auto``: sizes 8..128 are timed in turn (in the
      first layout) and the fastest per input is kept;
    - then the memory layout, when more than one is given (``channels_last: auto`` on a CPU
      in fp32, where it depends on the model: measured 0.7x the time for resnet18 and
      efficientnet_b0 but 1.1x for convnext_nano on this project's CPUs), at the chunk size
      in use: each layout runs a warm-up chunk and then at least 32 timed inputs, and the
      faster per input is kept.
    """

    CANDIDATES = (8, 16, 32, 64, 128)
    LAYOUT_INPUTS = 32

    def __init__(self, setting: int | str, ceiling: int, layouts: tuple[bool, ...] = (False,)):
        self.auto = setting == "auto"
        self.ceiling = max(1, ceiling)
        self.layouts = list(layouts)  # channels_last values still to try
        self.channels_last = self.layouts[0]
        self.layout_timing: dict[bool, list[float]] = {}  # layout -> [inputs, seconds]
        self.layout_warm = False
        if self.auto:
            self.trials = [c for c in self.CANDIDATES if c <= self.ceiling] or [self.ceiling]
            self.timing: dict[int, list[float]] = defaultdict(list)  # size -> [inputs, seconds]
            self.current = self.trials[0]
            self.warm = False
        else:
            self.trials = []
            self.current = int(setting)

    @property
    def measuring(self) -> bool:
        """True while reports decide something (then CUDA work is synchronized before timing)."""
        return not self.layout_settled or bool(self.trials)

    def report(self, n: int, seconds: float) -> None:
        if self.trials:
            self._report_size(n, seconds)
        elif not self.layout_settled:
            self._report_layout(n, seconds)

    def _report_layout(self, n: int, seconds: float) -> None:
        if not self.layout_warm:  # a layout's first chunk pays its one-off costs (kernel choice)
            self.layout_warm = True
            return
        rec = self.layout_timing.setdefault(self.channels_last, [0.0, 0.0])
        rec[0] += n
        rec[1] += seconds
        if rec[0] < max(self.LAYOUT_INPUTS, 2 * self.current):
            return
        untried = [c for c in self.layouts if c not in self.layout_timing]
        if untried:
            self.channels_last, self.layout_warm = untried[0], False
        else:
            self.settle_layout(
                min(self.layout_timing, key=lambda c: self.layout_timing[c][1] / self.layout_timing[c][0])
            )

    def _report_size(self, n: int, seconds: float) -> None:
        if not self.warm:  # the first chunk pays one-off costs (allocations, kernel choice)
            self.warm = True
            return
        rec = self.timing[self.current]
        if not rec:
            rec.extend([0.0, 0.0])
        rec[0] += n
        rec[1] += seconds
        if rec[0] >= 2 * self.current and rec[0] >= 16:
            best = min(self.timing, key=lambda s: self.timing[s][1] / self.timing[s][0])
            i = self.trials.index(self.current)
            # Per-input cost is U-shaped in the chunk size: once a size is clearly slower than
            # the best so far, larger ones will not win, so the trials stop there.
            worse = (
                self.timing[self.current][1] / self.timing[self.current][0]
                > 1.05 * self.timing[best][1] / self.timing[best][0]
            )
            if i + 1 < len(self.trials) and not worse:
                self.current = self.trials[i + 1]
            else:
                self.current = best
                self.trials = []

    @property
    def layout_settled(self) -> bool:
        return len(self.layouts) == 1

    def settle_layout(self, channels_last: bool) -> None:
        """Ends the layout trial on ``channels_last`` (the model cannot take the other)."""
        self.channels_last, self.layouts = channels_last, [channels_last]

    def decide(self) -> tuple[int, bool]:
        """Ends every trial now (a test set smaller than the trials): the fastest size and
        layout measured so far, else the ones in use; returns (chunk size, channels_last)."""
        if self.trials:
            timed = {s: t for s, t in getattr(self, "timing", {}).items() if t and t[0]}
            if timed:
                self.current = min(timed, key=lambda s: timed[s][1] / timed[s][0])
            self.trials = []
        if not self.layout_settled:
            timed_l = {c: t for c, t in self.layout_timing.items() if t[0]}
            self.settle_layout(
                min(timed_l, key=lambda c: timed_l[c][1] / timed_l[c][0])
                if len(timed_l) == len(self.layouts)
                else self.layouts[0]
            )
        return self.current, self.channels_last

    def shrink(self, failed: int | None = None) -> None:
        """After out-of-memory on a chunk of ``failed`` inputs: half of it (or of the current size)."""
        self.current = max(1, min(self.current, failed or self.current) // 2)
        self.ceiling = self.current
        self.trials = []
        self.settle_layout(self.channels_last)  # out of memory mid-trial: keep the layout in use


def first_tensor(out: object) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        for k in ("logits", "out", "output"):
            if k in out:
                return out[k]
        return next(v for v in out.values() if isinstance(v, Tensor))
    if isinstance(out, (list, tuple)):
        return first_tensor(out[0])
    raise TypeError(f"model returned {type(out).__name__}")


class Runner:
    """Forward passes for one member, with its own tuning (ChunkSizer: chunk size and memory
    layout, timed on the forward alone), precision fallback and OOM back-off.

    ``post`` turns the model's raw output into the result (default: its logits tensor, as
    float32; detection: the adapter's per-image boxes); results of split chunks are joined.
    ``nonfinite`` counts chunks recomputed in fp32; ``last_recomputed`` is how many of them the
    last call had (more than one where an out-of-memory split it).
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        precision: str,
        sizer: ChunkSizer,
        post: Callable[[Any, Tensor], Any] | None = None,
        name: str = "model",
    ):
        self.model, self.device, self.precision, self.sizer, self.name = model, device, precision, sizer, name
        self.post = post or (lambda out, x: first_tensor(out).float())
        self.nonfinite = 0
        self.last_recomputed = 0
        self._layout = False  # the model's current memory format: channels_last or not
        self._set_layout(sizer.channels_last)

    def _set_layout(self, channels_last: bool) -> None:
        if channels_last == self._layout:
            return
        if channels_last and any(t.dim() == 5 for t in (*self.model.parameters(), *self.model.buffers())):
            self.sizer.settle_layout(False)  # a 5-D weight (3-D convolution) has no channels_last
            return
        self.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self._layout = channels_last

    def _forward(self, x: Tensor, reduced: bool) -> Any:
        ctx = torch.autocast(self.device.type, dtype=_DTYPES[self.precision]) if reduced else contextlib.nullcontext()
        with ctx:
            out = self.model(x)
        return self.post(out, x)

    def __call__(self, x: Tensor) -> Any:
        self._set_layout(self.sizer.channels_last)
        before = self.nonfinite
        measuring = self.sizer.measuring
        t0 = time.perf_counter()
        out = self._call(x)
        if measuring:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.sizer.report(x.shape[0], time.perf_counter() - t0)
        self.last_recomputed = self.nonfinite - before
        return out

    def _call(self, x: Tensor) -> Any:
        if self._layout and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            out = self._forward(x, self.precision != "fp32")
        except torch.OutOfMemoryError as exc:
            if x.shape[0] == 1:
                raise CheckpointError(
                    f"members.{self.name}: one input of {tuple(x.shape[1:])} does not fit in {self.device} memory "
                    f"({self.precision}): lower its input size (preprocess.input_size, segmentation.size or tiling.size), "
                    "use precision: auto or fp16, or run on a larger device"
                ) from exc
            torch.cuda.empty_cache() if self.device.type == "cuda" else None
            self.sizer.shrink(x.shape[0])
            # pieces of the new size (each may shrink it again): a size that fits is kept for
            # the rest of the chunk, not halved again on the way back
            parts, off = [], 0
            while off < x.shape[0]:
                take = self.sizer.current
                parts.append(self._call(x[off : off + take]))
                off += take
            return torch.cat(parts) if isinstance(parts[0], Tensor) else [r for part in parts for r in part]
        if self.precision != "fp32" and not _finite(out):
            self.nonfinite += 1
            out = self._forward(x, False)
        return out


def _finite(out: Any) -> bool:
    if isinstance(out, Tensor):
        return bool(torch.isfinite(out).all())
    return all(np.isfinite(b).all() and np.isfinite(s).all() for b, s, _ in out)  # detection results


def layout_candidates(setting: bool | str, device: torch.device, precision: str) -> tuple[bool, ...]:
    """The channels_last values to use (one) or to time on the first chunks (two).

    ``auto``: on with CUDA or reduced precision, where it is the fast path of cuDNN and oneDNN;
    timed on a CPU in fp32, where the answer depends on the model.
    """
    if setting != "auto":
        return (bool(setting),)
    if device.type == "cuda" or precision != "fp32":
        return (True,)
    return (False, True)


def normalize(canvas: Tensor, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> Tensor:
    """uint8 [B, H, W, C] -> normalized float [B, C, H, W] on the device."""
    x = canvas.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
    return ((x - m) / s).contiguous()


# ---- the forward-chunk loop ----------------------------------------------------------------


@dataclass
class Piece:
    """Rows of one view to forward: ``make(a, b)`` gives the model inputs of rows ``a:b``
    (made chunk by chunk, so a view's inputs are never all in memory at once)."""

    view: str
    rows: int
    make: Callable[[int, int], Tensor]


@dataclass
class ViewLog:
    """Per view, this batch's forward seconds and chunks recomputed in fp32."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    recomputed: dict[str, int] = field(default_factory=lambda: defaultdict(int))


Slot = tuple[str, int, int, int]  # (view, first row of the piece's slice, rows, offset in the chunk)


def run_chunks(
    runner: Runner, pieces: Iterable[Piece], consume: Callable[[Any, list[Slot]], None], log: ViewLog
) -> None:
    """Packs ``pieces`` (of equal input shape) into chunks of ``runner.sizer.current`` inputs,
    forwards each and passes its output with the slots it holds to ``consume``.

    A chunk's seconds (making its inputs, the forward and ``consume``) are shared among its
    views by rows; each view in a chunk recomputed in fp32 counts that recompute.
    """
    buf: list[Tensor] = []
    slots: list[Slot] = []
    filled = 0
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal buf, slots, filled, t0
        x = torch.cat(buf) if len(buf) > 1 else buf[0]
        out = runner(x)
        consume(out, slots)
        dt = time.perf_counter() - t0
        for view, _, count, _ in slots:
            log.seconds[view] += dt * count / x.shape[0]
            log.recomputed[view] += runner.last_recomputed
        buf, slots, filled, t0 = [], [], 0, time.perf_counter()

    for piece in pieces:
        off = 0
        while off < piece.rows:
            take = min(runner.sizer.current - filled, piece.rows - off)
            buf.append(piece.make(off, off + take))
            slots.append((piece.view, off, take, filled))
            filled += take
            off += take
            if filled >= runner.sizer.current:
                flush()
    if buf:
        flush()


# ---- one member's pending work -------------------------------------------------------------


@dataclass
class MemberWork:
    """One member's work in a run: what is left to compute and where its rows go."""

    member: MemberPlan
    entry: CacheEntry
    views: list  # bound views still to compute
    runner: Runner | None = None
    store: dict[str, Any] = field(default_factory=dict)  # view -> memmap (dense) or RaggedWriter
    start: dict[str, int] = field(default_factory=dict)  # view -> first row still missing
    sizes_from: int | None = None  # first image whose (H, W) is still missing (None: complete)
    canvas_size: tuple[int, int] = (0, 0)  # what every canvas must be, where the task fixes it
    gate: Gate | None = None  # adaptive views: the member's gate, where it skips rows
    first_values: Callable[[int, int], np.ndarray] | None = None  # the gate's first view, rows lo:hi as cached
    forwards: Forwards = field(default_factory=Forwards)  # rows forwarded, against plain TTA's
    _sent: tuple | None = None  # ((lo, hi), the gate's rows of that batch): scored once per batch

    def gated(self, view: str) -> bool:
        """Whether ``view`` is computed only on the rows the gate sends on (kaggle_tta.ops.gate)."""
        return self.gate is not None and view != self.gate.first

    def open_dense(self, view: str, shape: tuple[int, ...], dtype: str) -> None:
        self._held_state(view)
        self.store[view], self.start[view] = self.entry.open_for_write(view, shape, dtype)
        if self.gated(view):  # which rows it holds, written and committed with them
            mask = held_name(view)
            self.store[mask], at = self.entry.open_for_write(mask, (shape[0],), "uint8")
            if at != self.start[view]:  # the two files resume together, from the earlier
                self.start[view] = row = min(at, self.start[view])
                self.store[view], self.store[mask] = self.entry.rewind(view, row), self.entry.rewind(mask, row)
        self._held_state(view, record=True)

    def _held_state(self, view: str, record: bool = False) -> None:
        """Before opening: drops a view state computed under another gate, or gated where
        this run computes every row (its rows are not this run's: it is computed again from
        row 0); after: records the gate it holds."""
        held = self.gate.record(self.member.activation) if self.gated(view) else None  # type: ignore[union-attr]
        states = self.entry.manifest["views"]
        if record:
            if held is None:
                states[view].pop("held", None)
            else:
                states[view]["held"] = held
        elif view in states and states[view].get("held") != held:
            del states[view]
            states.pop(held_name(view), None)

    def align_to_first(self) -> None:
        """After opening: a gated view resumes no later than the first view it is gated on,
        so that a first view computed again from an earlier row chooses those rows again."""
        if self.gate is None or self.gate.first not in self.start:
            return
        row = self.start[self.gate.first]
        for v in self.views:
            if self.gated(v.name) and self.start[v.name] > row:
                self.start[v.name] = row
                self.store[v.name] = self.entry.rewind(v.name, row)
                self.store[held_name(v.name)] = self.entry.rewind(held_name(v.name), row)

    def gate_rows(self, first: int, hi: int, lo: int | None = None) -> np.ndarray:
        """Which rows ``first:hi`` the gated views compute (bool), from the first view's
        cached values; scored once per batch ``lo:hi`` for all of them."""
        assert self.gate is not None and self.first_values is not None
        lo = first if lo is None else min(lo, first)
        key = (lo, hi)
        if self._sent is None or self._sent[0] != key:
            self._sent = (key, needs(self.first_values(lo, hi), self.member.activation, self.gate))
        return self._sent[1][first - lo :]

    def hold(self, view: str, first: int, hi: int, send: np.ndarray) -> None:
        """Records which rows ``first:hi`` the gated ``view`` holds; the others read as zeros,
        whatever a trial left in them."""
        self.store[view][first:hi][~send] = 0
        self.store[held_name(view)][first:hi] = send

    def open_ragged(self, view: str, n: int) -> None:
        self.store[view], self.start[view] = self.entry.open_ragged(view, n)

    def open_sizes(self, n: int) -> None:
        """Opens the image sizes for writing, unless the entry has them all already."""
        if not self.entry.sizes_complete():
            self.sizes_from = self.entry.open_sizes(n)

    @property
    def first_row(self) -> int:
        """The first row any pending view (or the image sizes) still lacks."""
        starts = list(self.start.values()) + ([self.sizes_from] if self.sizes_from is not None else [])
        return min(starts)

    def rewind(self, row: int) -> None:
        """Makes every view compute rows from ``row`` on again (rows computed while the chunk
        size or layout was still on trial: recomputed in the decided one, so that every row
        of a run comes from one configuration)."""
        for v in self.views:
            if self.start[v.name] > row:
                self.start[v.name] = row
                self.store[v.name] = self.entry.rewind(v.name, row)
                if self.gated(v.name):
                    self.store[held_name(v.name)] = self.entry.rewind(held_name(v.name), row)
        self._sent = None

    def todo(self, lo: int, hi: int) -> list[tuple[Any, int]]:
        """(view, first missing row) for each pending view lacking rows of ``lo:hi``."""
        return [(v, max(lo, self.start[v.name])) for v in self.views if max(lo, self.start[v.name]) < hi]

    def record(self, lo: int, hi: int, sizes: Tensor, log: ViewLog) -> None:
        """Marks rows up to ``hi`` done for every view (and the image sizes) that needed them,
        with the view's forward seconds and chunks recomputed in fp32 for this batch."""
        if self.sizes_from is not None and self.sizes_from < hi:
            self.entry.write_sizes(self.sizes_from, hi, sizes[self.sizes_from - lo :].numpy())
            self.sizes_from = hi
        for v in self.views:
            if self.start[v.name] < hi:
                self.start[v.name] = hi
                self.entry.record(v.name, hi, log.seconds[v.name], log.recomputed[v.name])
                if self.gated(v.name):
                    self.entry.record(held_name(v.name), hi, 0.0)


# ---- the check of precision: auto ----------------------------------------------------------

AGREEMENT_BOUND = 0.995
"""Reduced precision is kept only where, in every view, the top-1 class of ``[N, C]`` outputs
(the argmax over channels of each pixel of ``[N, K, h, w]`` maps) agrees with fp32's on at
least this fraction of the probed inputs (pixels). Not applied where there is one channel
(a regressor, a binary map): there only the L2 bound decides."""
REL_L2_BOUND = 1e-2
"""... and where, in every view, ||reduced - fp32|| / ||fp32|| over all probed values is at most this."""


@dataclass
class ProbeWork(MemberWork):
    """A member's work on the first ``rows`` rows of the test set into memory instead of the
    cache: the task's own step fills it (views applied and inverted, tiles stitched, the
    cache dtype), so the precision check compares exactly what the cache would hold.

    ``ragged`` is set where the task opens ragged views (detection boxes): those are not
    compared (a box list has no element-wise error), and the step is not run.
    """

    rows: int = 0
    ragged: bool = False

    def open_dense(self, view: str, shape: tuple[int, ...], dtype: str) -> None:
        self.store[view], self.start[view] = np.zeros((self.rows, *shape[1:]), dtype=dtype), 0

    def open_ragged(self, view: str, n: int) -> None:
        self.ragged, self.start[view] = True, 0

    def open_sizes(self, n: int) -> None:
        pass

    def record(self, lo: int, hi: int, sizes: Tensor, log: ViewLog) -> None:
        for v in self.views:
            self.start[v.name] = max(self.start[v.name], hi)


@dataclass
class PrecisionCheck:
    """What the check decided for one member: ``ran_in`` (the reduced precision, or fp32
    where it failed), a one-line ``note`` saying why, and the measures behind it."""

    ran_in: str
    note: str
    details: dict[str, Any] = field(default_factory=dict)


def compare_precision(
    reduced: dict[str, np.ndarray], fp32: dict[str, np.ndarray], precision: str, nonfinite_chunks: int = 0
) -> PrecisionCheck:
    """Judges ``precision`` on the same inputs computed both ways (view -> rows as stored).

    Fails (``ran_in`` fp32) where a reduced chunk came out non-finite (``nonfinite_chunks``:
    chunks the runner had to recompute in fp32) or a reduced value is non-finite, or where
    some view is outside :data:`AGREEMENT_BOUND` or :data:`REL_L2_BOUND`; the note names the
    first bound missed and, where views disagree, the worst view. An fp32 reference that is
    itself non-finite cannot judge anything: reduced precision is kept, and the note says so.
    """
    pct = f"{100 * AGREEMENT_BOUND:.1f}%"
    inputs = sum(a.shape[0] for a in fp32.values())
    if nonfinite_chunks or not all(np.isfinite(np.asarray(a, dtype=np.float64)).all() for a in reduced.values()):
        return PrecisionCheck(
            "fp32",
            f"fp32: {precision} output was non-finite on the first {inputs} inputs",
            {"inputs": inputs, "nonfinite_chunks": nonfinite_chunks},
        )
    if not all(np.isfinite(np.asarray(a, dtype=np.float64)).all() for a in fp32.values()):
        return PrecisionCheck(
            precision, f"{precision}: not checked (the fp32 output itself is non-finite)", {"inputs": inputs}
        )
    per_view: dict[str, dict[str, Any]] = {}
    for view, ref in fp32.items():
        r, f = np.asarray(reduced[view], dtype=np.float64), np.asarray(ref, dtype=np.float64)
        diff, norm = float(np.linalg.norm(r - f)), float(np.linalg.norm(f))
        rel = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
        rec: dict[str, Any] = {"inputs": int(f.shape[0]), "rel_l2": rel}
        if f.ndim >= 2 and f.shape[1] > 1:  # [N, C] top-1, or [N, K, h, w] per-pixel argmax
            same = r.argmax(axis=1) == f.argmax(axis=1)
            rec["agreement"], rec["decisions"] = float(same.mean()), int(same.size)
        per_view[view] = rec
    what = (
        "top-1"
        if all(v.get("decisions") == v["inputs"] for v in per_view.values() if "decisions" in v)
        else "per-pixel argmax"
    )
    unit = "inputs" if what == "top-1" else "pixels"
    agreeing = [v for v in per_view.values() if "agreement" in v]
    details: dict[str, Any] = {
        "inputs": inputs,
        "rel_l2": max((v["rel_l2"] for v in per_view.values()), default=0.0),
        "bounds": {"agreement": AGREEMENT_BOUND, "rel_l2": REL_L2_BOUND},
        "views": per_view,
    }
    if agreeing:
        details["agreement"] = min(v["agreement"] for v in agreeing)
    in_view = lambda v: f" in view '{v}'" if len(per_view) > 1 else ""  # noqa: E731
    worst = min(
        (v for v in per_view if "agreement" in per_view[v]), key=lambda v: per_view[v]["agreement"], default=None
    )
    if worst is not None and per_view[worst]["agreement"] < AGREEMENT_BOUND:
        w = per_view[worst]
        return PrecisionCheck(
            "fp32",
            f"fp32: {precision} {what} agreed on {100 * w['agreement']:.1f}% of {w['decisions']} {unit}{in_view(worst)} (< {pct})",
            details,
        )
    worst = max(per_view, key=lambda v: per_view[v]["rel_l2"])
    if per_view[worst]["rel_l2"] > REL_L2_BOUND:
        return PrecisionCheck(
            "fp32",
            f"fp32: {precision} relative L2 error {per_view[worst]['rel_l2']:.1e}{in_view(worst)} (> {REL_L2_BOUND:.0e})",
            details,
        )
    agreed = f"{what} agreed on {100 * details['agreement']:.1f}%, " if agreeing else ""
    return PrecisionCheck(
        precision,
        f"{precision}: checked against fp32 on {inputs} inputs ({agreed}relative L2 error {details['rel_l2']:.1e})",
        details,
    )
