"""The streaming loop: batches of decoded canvases x members x views -> the cache.

Each image is decoded once (in the DataLoader workers) and turned into every canvas the
pending members need. Per batch and member the task's step (``Task.step``) applies the views
on the device and forwards them through the one chunk loop (kaggle_tta.forward: autocast,
channels_last, inference_mode, the fp32 recompute of non-finite chunks, out-of-memory
pieces). Rows are written to the cache as each batch finishes and committed with the
manifest, so a run killed at any moment resumes from the last committed batch.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from kaggle_tta.cache import CacheEntry, locked
from kaggle_tta.data import make_loader
from kaggle_tta.errors import CacheError, DataError
from kaggle_tta.forward import ChunkSizer, MemberWork, Runner, layout_candidates, sizes_text
from kaggle_tta import tuning
from kaggle_tta.models import build_model
from kaggle_tta.plan import Plan, resolve_workers


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
    recomputed_damaged: bool = False  # a view found damaged while blending was recomputed
    members: dict[str, MemberStats] = field(default_factory=dict)

    @property
    def forward_batch(self) -> str:
        """The computed members' chunk sizes: one number, or one per member joined by '/'."""
        return sizes_text([m.forward_batch for m in self.members.values() if m.forward_batch is not None])

    @property
    def all_cached(self) -> bool:
        return all(not m.views_computed for m in self.members.values())


def _pending(plan: Plan, precision: str, stats: RunStats, locked_: bool = True) -> list[MemberWork]:
    """Each member with views (or image sizes) still missing from its entry. Holding the
    locks (``locked_``), it also sweeps what killed runs left and records the pipeline's use."""
    out = []
    for m in plan.members:
        entry = CacheEntry(plan.cache_root, m.name, m.fingerprint(precision), m.inputs)
        if locked_:
            entry.sweep()  # no one else writes here while the lock is held
            if entry.mark_used(str(plan.cfg.source) if plan.cfg.source else None) and entry.manifest_path.is_file():
                entry.save()
        ms = stats.members[m.name] = MemberStats(m.name)
        todo = [v for v in m.views if not entry.is_complete(v.name)]
        ms.views_cached = [v.name for v in m.views if entry.is_complete(v.name)]
        if todo or (plan.task.stores_image_sizes and not entry.sizes_complete()):
            out.append(MemberWork(m, entry, todo))
    return out


def run_inference(plan: Plan, device: torch.device, precision: str, progress: bool = True) -> RunStats:
    """Fills the cache for every (member, view) of the plan that is not complete, holding
    each member's entry lock meanwhile: a second run on the same cache waits, then computes
    only what the first left missing."""
    if not _pending(plan, precision, RunStats(str(device), precision, len(plan.testset)), locked_=False):
        # all complete: nothing to write, so no lock (a cache on a read-only mount re-runs)
        return _run_locked(plan, device, precision, progress, holding=False)
    dirs = [plan.cache_root / m.name / m.fingerprint(precision) for m in plan.members]

    def waiting(folder) -> None:
        print(f"kaggle-tta: waiting for another run writing {folder}", file=sys.stderr, flush=True)

    with locked(dirs, waiting):
        return _run_locked(plan, device, precision, progress)


def _run_locked(plan: Plan, device: torch.device, precision: str, progress: bool, holding: bool = True) -> RunStats:
    cfg, task = plan.cfg, plan.task
    rt = cfg.runtime
    n = len(plan.testset)
    stats = RunStats(device=str(device), precision=precision, images=n)
    workers, threads = resolve_workers(rt.workers, device, rt.threads)
    if threads:
        torch.set_num_threads(threads)
    pending = _pending(plan, precision, stats, holding)
    if not pending:
        return stats
    specs = {w.member.canvas.key: w.member.canvas for w in pending}

    def loader(start: int):
        return iter(make_loader(plan.testset.paths, specs, rt.batch_size, workers, start, pin_memory=device.type == "cuda"))

    # Start the workers now, from the first row any entry's manifest lacks: they decode the
    # first batches while the models are built.
    start = min(w.entry.first_missing([v.name for v in w.views], task.stores_image_sizes) for w in pending)
    batches = loader(start)
    opened: list[MemberWork] = []
    t0 = time.perf_counter()
    try:
        _check_space(plan, pending)
        _build_runners(plan, pending, device, precision)
        for w in pending:
            w.entry.write_ids(plan.testset.ids)
            opened.append(w)  # first: files opened before a failure are still closed
            if task.stores_image_sizes:
                w.open_sizes(n)
            task.open_views(w, plan)
            # commit, not save: a view whose rows were all recorded before an interrupt hit
            # the last commit is completed here, instead of waiting for rows that never come
            w.entry.commit()
        first = min(w.first_row for w in pending)
        if first < start:  # a partial file was unusable: start again from there
            start, batches = first, loader(first)
        t0 = time.perf_counter()
        with torch.inference_mode():
            _stream(plan, pending, batches, loader, start, stats, progress, device, precision)
    finally:
        del batches  # stops the workers
        for w in opened:
            w.entry.close()
            w.entry.save()
    for w in pending:
        ms = stats.members[w.member.name]
        ms.views_computed = [v.name for v in w.views]
        if w.runner:
            ms.nonfinite_recomputed = w.runner.nonfinite
            sz = w.runner.sizer
            # a trial still running at the end (a small test set) picked nothing: reported as undecided
            ms.forward_batch = sz.current
            ms.channels_last = sz.channels_last if sz.layout_settled else None
    stats.seconds = time.perf_counter() - t0
    return stats


def _check_space(plan: Plan, pending: list[MemberWork]) -> None:
    """Stops before any forward when the new files this run preallocates do not fit."""
    import shutil

    needed = 0
    for w in pending:
        row = plan.task.row_bytes(w, plan)
        needed += sum(row * len(plan.testset) for v in w.views if w.entry.rows_done(v.name) == 0)
    try:
        free = shutil.disk_usage(plan.cache_root if plan.cache_root.exists() else plan.cache_root.parent).free
    except OSError:
        return  # no such disk yet: the first write says what is wrong
    if needed > free:
        raise CacheError(
            f"cache.dir ({plan.cache_root}): this run writes {needed / 1e6:.1f} MB and {free / 1e6:.1f} MB are free; "
            "free space there, point cache.dir at a larger disk, or store less (cache.dtype: float16 or uint8, cache.scale)"
        )


def _build_runners(plan: Plan, pending: list[MemberWork], device: torch.device, precision: str) -> None:
    """Every model first: a bad checkpoint fails before the cache is touched. Chunk size and
    layout are each member's own (a resnet and a convnext disagree); a decision recorded for
    this member on this machine is reused instead of timing again."""
    rt = plan.cfg.runtime
    layouts = layout_candidates(rt.channels_last, device, precision)
    for w in pending:
        model = build_model(plan.cfg, w.member.cfg, len(plan.classes)).to(device)
        sizer = ChunkSizer(rt.forward_batch, rt.batch_size * max(1, len(w.views)), layouts)
        if sizer.measuring:
            known = tuning.recall(plan.cache_root, tuning.key(w.member.key, precision, device, rt))
            if known is not None:
                sizer = ChunkSizer(known[0], known[0], (known[1],))
        w.runner = Runner(model, device, precision, sizer, plan.task.post(plan, w.member.cfg), w.member.name)


def _stream(plan: Plan, pending: list[MemberWork], batches, loader, start: int, stats: RunStats, progress: bool, device: torch.device, precision: str) -> None:
    """Batches through every pending member's step, committed as each finishes.

    Rows computed while a member's chunk size or layout is still on trial are not committed:
    once every trial has decided (or the test set ends), those members rewind to the first
    such row and compute it again in the decided configuration, so every row of the cache
    comes from one configuration and two runs give the same numbers.
    """
    task, n = plan.task, len(plan.testset)
    trying = [w for w in pending if w.runner.sizer.measuring]  # type: ignore[union-attr]
    trial_from: int | None = None
    n_views = sum(len(w.views) for w in pending)
    bar = tqdm(total=n - start, unit="img", desc=f"{len(pending)} member(s), {n_views} view(s)", disable=not progress, dynamic_ncols=True)
    try:
        while (batch := next(batches, None)) is not None:
            if batch.error is not None:
                raise DataError(batch.error)
            for w in pending:
                task.step(w, batch, plan)
            if trying:
                trial_from = batch.lo if trial_from is None else trial_from
                if batch.hi < n and any(w.runner.sizer.measuring for w in trying):  # type: ignore[union-attr]
                    bar.set_postfix_str("timing chunk sizes and layouts")
                    continue
                for w in trying:
                    size, channels_last = w.runner.sizer.decide()  # type: ignore[union-attr]
                    tuning.remember(plan.cache_root, tuning.key(w.member.key, precision, device, plan.cfg.runtime), size, channels_last)
                    w.rewind(trial_from)
                trying, batches = [], loader(trial_from)
                continue
            for w in pending:
                w.entry.commit()
            stats.rows_computed += batch.hi - batch.lo
            bar.update(batch.hi - batch.lo)
            bar.set_postfix_str(f"forward batch {sizes_text([w.runner.sizer.current for w in pending if w.runner])}")
    finally:
        bar.close()
