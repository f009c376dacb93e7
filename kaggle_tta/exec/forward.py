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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from kaggle_tta.cache.coverage import Coverage, forget_other, record_held
from kaggle_tta.cache.entry import held_name
from kaggle_tta.config.errors import CheckpointError, DataError
from kaggle_tta.exec.chunks import ChunkSizer
from kaggle_tta.ops.gate import Forwards, Gate, needs

if TYPE_CHECKING:
    from kaggle_tta.cache import CacheEntry
    from kaggle_tta.engine.plan import MemberPlan

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
        self.compiled: Callable[[Tensor], Any] | None = None  # runtime.compile: the model compiled (fixed shapes)
        self.compile_failure = ""  # ... where it failed at run time: eager since, and why
        self.chunk_times: list[tuple[tuple[int, ...], float]] | None = None  # (input shape, seconds) per chunk
        self._layout = False  # the model's current memory format: channels_last or not
        self.last_config: tuple[int, bool, bool] = (0, False, False)  # the last chunk's (inputs, layout, compiled)
        self._set_layout(sizer.channels_last)

    def _set_layout(self, channels_last: bool) -> None:
        if channels_last == self._layout:
            return
        if channels_last and any(t.dim() == 5 for t in (*self.model.parameters(), *self.model.buffers())):
            self.sizer.settle_layout(False)  # a 5-D weight (3-D convolution) has no channels_last
            return
        self.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self._layout = channels_last

    def _forward(self, x: Tensor, reduced: bool, eager: bool = False) -> Any:
        ctx = torch.autocast(self.device.type, dtype=_DTYPES[self.precision]) if reduced else contextlib.nullcontext()
        n, fixed = x.shape[0], self.sizer.current
        if self.compiled is not None and not eager and n < fixed:
            # compiled for one chunk shape: a short chunk is padded (copies of its last input)
            # so that the member compiles once, and the padding's outputs are dropped
            x = torch.cat([x, x[-1:].expand(fixed - n, *x.shape[1:])]).contiguous(
                memory_format=torch.channels_last if self._layout and x.dim() == 4 else torch.contiguous_format
            )
        with ctx:
            out = self.model(x) if eager or self.compiled is None else self._compiled(x)
        res = self.post(out, x)
        return res[:n] if x.shape[0] != n else res

    def _compiled(self, x: Tensor) -> Any:
        """The compiled forward; where it fails (a compiler missing since it was checked, a
        shape it cannot take), the member goes on eager and says why once."""
        assert self.compiled is not None
        try:
            return self.compiled(x)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the compiler stack means: run eager
            self.compiled = None
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            self.compile_failure = f"eager: torch.compile failed ({type(exc).__name__}: {first})"
            return self.model(x)

    def __call__(self, x: Tensor) -> Any:
        self._set_layout(self.sizer.channels_last)
        before = self.nonfinite
        measuring = self.sizer.measuring
        t0 = time.perf_counter()
        out = self._call(x)
        self.last_config = (x.shape[0], self._layout, self.compiled is not None)
        if measuring or self.chunk_times is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            if measuring:
                self.sizer.report(x.shape[0], dt)
            if self.chunk_times is not None:
                self.chunk_times.append((tuple(x.shape), dt))
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
                    f"({self.precision}): lower its input size (preprocess.input_size, segmentation.size or "
                    "tiling.size), "
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
            out = self._forward(x, False, eager=True)  # a compiled program is for the reduced precision only
        return out


def _finite(out: Any) -> bool:
    if isinstance(out, Tensor):
        return bool(torch.isfinite(out).all())
    return all(np.isfinite(b).all() and np.isfinite(s).all() for b, s, _ in out)  # detection results


def normalize(canvas: Tensor, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> Tensor:
    """uint8 [B, H, W, C] (0..255), or float [B, H, W, C] in [0, 1] (a reader's window) ->
    normalized float [B, C, H, W] on the device."""
    if canvas.shape[-1] != len(mean) != 1 or len(mean) != len(std):  # one value: every channel
        raise DataError(
            f"the input has {canvas.shape[-1]} channels and preprocess.mean/std {len(mean)}/{len(std)} values; "
            "give one mean and std per channel (members[].preprocess.mean, .std), and a model with that many in_chans"
        )
    x = canvas.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    scale = 255.0 if canvas.dtype == torch.uint8 else 1.0
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1) * scale
    s = torch.tensor(std, device=device).view(1, -1, 1, 1) * scale
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
    """Per view, this batch's forward seconds, chunks recomputed in fp32, inputs forwarded and
    the configurations its chunks ran in (``Runner.last_config``: inputs, layout, compiled)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    recomputed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    configs: dict[str, set] = field(default_factory=lambda: defaultdict(set))
    inputs: dict[str, int] = field(default_factory=lambda: defaultdict(int))


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
            log.configs[view].add(runner.last_config)
            log.inputs[view] += count
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
class ViewRows:
    """A pending view's rows of one batch: from ``first`` on, every row (``sent`` None) or, for
    a view under the member's adaptive gate, the rows ``first + sent`` the gate sends on."""

    view: Any
    first: int
    sent: np.ndarray | None
    count: int  # rows to forward

    def destination(self) -> slice | np.ndarray:
        """Where its rows go in the view's file: a run of rows, or the rows' indices."""
        return slice(self.first, self.first + self.count) if self.sent is None else self.first + self.sent


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
    compile_note: str = ""  # runtime.compile: compiled or eager, and why (engine.compiling)
    compile_pending: int = 0  # runtime.compile auto: the run's inputs, deciding from the eager time on trial
    configs: dict[str, set] = field(default_factory=dict)  # view -> configurations its rows ran in (ViewLog) ...
    inputs: dict[str, int] = field(default_factory=dict)  # ... and its inputs forwarded, since engine.stream reset them
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
        held = Coverage(self.gate, self.member.activation).mine(view)
        if record:
            record_held(self.entry, view, held)
        else:
            forget_other(self.entry, view, held)

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

    def rewind(self, row: int, keep: frozenset[str] = frozenset()) -> None:
        """Makes every view but those in ``keep`` compute rows from ``row`` on again (rows
        computed while the chunk size or layout was still on trial: recomputed in the decided
        one, so that every row of a run comes from one configuration)."""
        for v in self.views:
            if self.start[v.name] > row and v.name not in keep:
                self.start[v.name] = row
                self.store[v.name] = self.entry.rewind(v.name, row)
                if self.gated(v.name):
                    self.store[held_name(v.name)] = self.entry.rewind(held_name(v.name), row)
        self._sent = None

    def view_rows(self, lo: int, hi: int) -> Iterator[list[ViewRows]]:
        """The pending views' rows of batch ``lo:hi``, in two parts: the views computed on every
        row, then — resumed once the task has computed those, since the gate reads its first
        view's rows of this batch — the gated views with the rows their gate sends on, recorded
        as held. Gating happens here, once, for every task; forwards are counted here."""
        todo = self.todo(lo, hi)
        parts = [[t for t in todo if not self.gated(t[0].name)], [t for t in todo if self.gated(t[0].name)]]
        for part in parts:
            rows = []
            for v, first in part:
                sent = None
                if self.gated(v.name):  # adaptive: only the rows the first view is not sure of
                    send = self.gate_rows(first, hi, lo)  # scored once per batch, for every gated view
                    self.hold(v.name, first, hi, send)
                    sent = np.flatnonzero(send)
                count = hi - first if sent is None else len(sent)
                self.forwards.run += count
                self.forwards.full += hi - first
                rows.append(ViewRows(v, first, sent, count))
            yield rows

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
                self.configs.setdefault(v.name, set()).update(log.configs.get(v.name, ()))
                self.inputs[v.name] = self.inputs.get(v.name, 0) + log.inputs.get(v.name, 0)
                if self.gated(v.name):
                    self.entry.record(held_name(v.name), hi, 0.0)
