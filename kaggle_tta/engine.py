"""The streaming loop: batches of decoded canvases x members x views -> the cache.

Each image is decoded once (in the DataLoader workers) and turned into every canvas the
pending members need. On the device, per member, the canvas is normalized once, each pending
view is applied, and the view inputs are packed into forward chunks of ``forward_batch``
under autocast, channels_last and inference_mode. A chunk that comes out non-finite under
reduced precision is recomputed in fp32 and counted; on out-of-memory the chunk size halves.
Rows are written to the cache as each batch finishes and committed with the manifest, so a
run killed at any moment resumes from the last committed batch.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kaggle_tta.cache import IMAGE_SIZE, CacheEntry
from kaggle_tta.data import SIZE_KEY, make_loader
from kaggle_tta.errors import CheckpointError, DataError
from kaggle_tta.models import build_model
from kaggle_tta.plan import MemberPlan, Plan, resolve_workers
from kaggle_tta.steps import STEPS, open_views
from kaggle_tta.tasks.detection import detection_post

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MemberStats:
    name: str
    views_computed: list[str] = field(default_factory=list)
    views_cached: list[str] = field(default_factory=list)
    nonfinite_recomputed: int = 0
    forward_batch: int | None = None  # the chunk size it ended with (auto: the one picked)
    channels_last: bool | None = None  # the memory layout it ended with (auto: measured on a CPU in fp32)


@dataclass
class RunStats:
    device: str
    precision: str
    images: int
    rows_computed: int = 0
    seconds: float = 0.0
    members: dict[str, MemberStats] = field(default_factory=dict)

    @property
    def forward_batch(self) -> str:
        """The computed members' chunk sizes: one number, or one per member joined by '/'."""
        return _sizes_text([m.forward_batch for m in self.members.values() if m.forward_batch is not None])

    @property
    def all_cached(self) -> bool:
        return all(not m.views_computed for m in self.members.values())


def _sizes_text(sizes: list[int]) -> str:
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
            self.settle_layout(min(self.layout_timing, key=lambda c: self.layout_timing[c][1] / self.layout_timing[c][0]))

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
            worse = self.timing[self.current][1] / self.timing[self.current][0] > 1.05 * self.timing[best][1] / self.timing[best][0]
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

    def shrink(self, failed: int | None = None) -> None:
        """After out-of-memory on a chunk of ``failed`` inputs: half of it (or of the current size)."""
        self.current = max(1, min(self.current, failed or self.current) // 2)
        self.ceiling = self.current
        self.trials = []
        self.settle_layout(self.channels_last)  # out of memory mid-trial: keep the layout in use


def _first_tensor(out: object) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        for k in ("logits", "out", "output"):
            if k in out:
                return out[k]
        return next(v for v in out.values() if isinstance(v, Tensor))
    if isinstance(out, (list, tuple)):
        return _first_tensor(out[0])
    raise TypeError(f"model returned {type(out).__name__}")


class _Runner:
    """Forward passes for one member, with its own tuning (ChunkSizer: chunk size and memory
    layout, timed on the forward alone), precision fallback and OOM back-off.

    ``post`` turns the model's raw output into the result (default: its logits tensor, as
    float32; detection: the adapter's per-image boxes); results of split chunks are joined.
    ``nonfinite`` counts chunks recomputed in fp32; ``last_recomputed`` is how many of them the
    last call had (more than one where an out-of-memory split it).
    """

    def __init__(self, model: nn.Module, device: torch.device, precision: str, sizer: ChunkSizer, post: Callable[[Any, Tensor], Any] | None = None, name: str = "model"):
        self.model, self.device, self.precision, self.sizer, self.name = model, device, precision, sizer, name
        self.post = post or (lambda out, x: _first_tensor(out).float())
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


@dataclass
class _Pending:
    member: MemberPlan
    entry: CacheEntry
    views: list  # bound views still to compute
    start: dict[str, int]  # view -> first row still missing
    arrays: dict[str, Any]  # view -> memmap (dense) or RaggedWriter (detection boxes)
    runner: _Runner | None = None
    canvas_size: tuple[int, int] = (0, 0)  # segmentation: the (H, W) every canvas must have


def run_inference(plan: Plan, device: torch.device, precision: str, progress: bool = True) -> RunStats:
    """Fills the cache for every (member, view) of the plan that is not complete."""
    cfg = plan.cfg
    rt = cfg.runtime
    n = len(plan.testset)
    stats = RunStats(device=str(device), precision=precision, images=n)
    workers, threads = resolve_workers(rt.workers, device, rt.threads)
    if threads:
        torch.set_num_threads(threads)
    pending: list[_Pending] = []
    for m in plan.members:
        entry = CacheEntry(plan.cache_root, m.name, m.fingerprint(precision), m.inputs)
        ms = stats.members[m.name] = MemberStats(m.name)
        todo = [v for v in m.views if not entry.is_complete(v.name)]
        ms.views_cached = [v.name for v in m.views if entry.is_complete(v.name)]
        sizes_missing = cfg.task != "classification" and not entry.is_complete(IMAGE_SIZE)
        if todo or sizes_missing:
            pending.append(_Pending(m, entry, todo, {}, {}))
    if not pending:
        return stats

    layouts = layout_candidates(rt.channels_last, device, precision)
    extra = [IMAGE_SIZE] if cfg.task != "classification" else []  # image sizes, stored like a view
    start = min(p.entry.rows_done(name) for p in pending for name in [*(v.name for v in p.views), *extra])
    specs = {p.member.canvas.key: p.member.canvas for p in pending}
    # Start the workers now: they decode the first batches while the models are built.
    batches = iter(make_loader(plan.testset.paths, specs, rt.batch_size, workers, start, pin_memory=device.type == "cuda"))
    opened: list[_Pending] = []
    bar = None
    try:
        for p in pending:  # every model first: a bad checkpoint fails before the cache is touched
            model = build_model(cfg, p.member.cfg, len(plan.classes)).to(device)
            post = detection_post(p.member.cfg.adapter, f"members.{p.member.name}.adapter", len(plan.classes)) if cfg.task == "detection" else None
            # per member: chunk size and layout are the model's own (a resnet and a convnext disagree)
            sizer = ChunkSizer(rt.forward_batch, rt.batch_size * max(1, len(p.views)), layouts)
            p.runner = _Runner(model, device, precision, sizer, post, p.member.name)
        for p in pending:
            p.entry.write_ids(plan.testset.ids)
            opened.append(p)  # first: files opened before a failure are still closed
            open_views(p, plan)
            # commit, not save: a view whose rows were all recorded before an interrupt hit
            # the last commit is completed here, instead of waiting for rows that never come
            p.entry.commit()
        if min(min(p.start.values()) for p in pending) < start:  # a partial file was unusable
            start = min(min(p.start.values()) for p in pending)
            batches = iter(make_loader(plan.testset.paths, specs, rt.batch_size, workers, start, pin_memory=device.type == "cuda"))
        n_views = sum(len(p.views) for p in pending)
        bar = tqdm(total=n - start, unit="img", desc=f"{len(pending)} member(s), {n_views} view(s)", disable=not progress, dynamic_ncols=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for rows, canvases in batches:
                if isinstance(canvases, str):
                    raise DataError(canvases)
                lo, hi = rows[0], rows[-1] + 1
                for p in pending:
                    STEPS[cfg.task](p, canvases[p.member.canvas.key], canvases[SIZE_KEY], lo, hi, device, plan)
                for p in pending:
                    p.entry.commit()
                stats.rows_computed += hi - lo
                bar.update(hi - lo)
                bar.set_postfix_str(f"forward batch {_sizes_text([p.runner.sizer.current for p in pending if p.runner])}")
    finally:
        del batches  # stops the workers
        if bar is not None:
            bar.close()
        for p in opened:
            p.entry.close()
            p.entry.save()
    for p in pending:
        ms = stats.members[p.member.name]
        ms.views_computed = [v.name for v in p.views]
        if p.runner:
            ms.nonfinite_recomputed = p.runner.nonfinite
            sz = p.runner.sizer
            # a trial still running at the end (a small test set) picked nothing: reported as undecided
            ms.forward_batch = sz.current
            ms.channels_last = sz.channels_last if sz.layout_settled else None
    stats.seconds = time.perf_counter() - t0
    return stats


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
