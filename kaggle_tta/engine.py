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
from kaggle_tta.errors import DataError
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


@dataclass
class RunStats:
    device: str
    precision: str
    images: int
    rows_computed: int = 0
    seconds: float = 0.0
    forward_batch: int | None = None
    members: dict[str, MemberStats] = field(default_factory=dict)

    @property
    def all_cached(self) -> bool:
        return all(not m.views_computed for m in self.members.values())


class ChunkSizer:
    """The forward chunk size: fixed, or 'auto' — time a few sizes on the first chunks (their
    outputs are kept; nothing is computed twice) and keep the fastest per input."""

    CANDIDATES = (8, 16, 32, 64, 128)

    def __init__(self, setting: int | str, ceiling: int):
        self.auto = setting == "auto"
        self.ceiling = max(1, ceiling)
        if self.auto:
            self.trials = [c for c in self.CANDIDATES if c <= self.ceiling] or [self.ceiling]
            self.timing: dict[int, list[float]] = defaultdict(list)  # size -> [inputs, seconds]
            self.current = self.trials[0]
            self.warm = False
        else:
            self.current = int(setting)

    def report(self, n: int, seconds: float) -> None:
        if not self.auto or not self.trials:
            return
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

    def shrink(self) -> None:
        self.current = max(1, self.current // 2)
        self.ceiling = self.current
        if self.auto:
            self.trials = []


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
    """Forward passes for one member, with precision fallback and OOM back-off.

    ``post`` turns the model's raw output into the result (default: its logits tensor, as
    float32; detection: the adapter's per-image boxes); results of split chunks are joined.
    """

    def __init__(self, model: nn.Module, device: torch.device, precision: str, channels_last: bool, sizer: ChunkSizer, post: Callable[[Any, Tensor], Any] | None = None):
        self.model, self.device, self.precision = model, device, precision
        self.channels_last, self.sizer = channels_last, sizer
        self.post = post or (lambda out, x: _first_tensor(out).float())
        self.nonfinite = 0

    def _forward(self, x: Tensor, reduced: bool) -> Any:
        ctx = torch.autocast(self.device.type, dtype=_DTYPES[self.precision]) if reduced else contextlib.nullcontext()
        with ctx:
            out = self.model(x)
        return self.post(out, x)

    def __call__(self, x: Tensor) -> Any:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            out = self._forward(x, self.precision != "fp32")
        except torch.OutOfMemoryError:
            if x.shape[0] == 1:
                raise
            torch.cuda.empty_cache() if self.device.type == "cuda" else None
            self.sizer.shrink()
            half = x.shape[0] // 2
            a, b = self(x[:half]), self(x[half:])
            return torch.cat([a, b]) if isinstance(a, Tensor) else a + b
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

    channels_last = rt.channels_last if rt.channels_last != "auto" else (device.type == "cuda" or precision != "fp32")
    max_views = max(len(p.views) for p in pending)
    sizer = ChunkSizer(rt.forward_batch, rt.batch_size * max_views)
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
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            post = detection_post(p.member.cfg.adapter, f"members.{p.member.name}.adapter", len(plan.classes)) if cfg.task == "detection" else None
            p.runner = _Runner(model, device, precision, channels_last, sizer, post)
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
                    STEPS[cfg.task](p, canvases[p.member.canvas.key], canvases[SIZE_KEY], lo, hi, device, sizer, plan)
                for p in pending:
                    p.entry.commit()
                stats.rows_computed += hi - lo
                bar.update(hi - lo)
                bar.set_postfix_str(f"forward batch {sizer.current}")
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
        ms.nonfinite_recomputed = p.runner.nonfinite if p.runner else 0
    stats.seconds = time.perf_counter() - t0
    stats.forward_batch = sizer.current
    return stats
