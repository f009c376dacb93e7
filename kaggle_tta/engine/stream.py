"""The streaming loop: batches of decoded canvases x members x views -> the cache.

Each image is decoded once (in the DataLoader workers) and turned into every canvas the
pending members need. Per batch and member the task's step (``Task.step``) applies the views
on the device and forwards them through the one chunk loop (kaggle_tta.exec.forward: autocast,
channels_last, inference_mode, the fp32 recompute of non-finite chunks, out-of-memory
pieces). Rows are written to the cache as each batch finishes and committed with the
manifest, so a run killed at any moment resumes from the last committed batch.

With ``precision: auto`` resolved to bf16 or fp16, each member is first checked against fp32
(:func:`choose_precisions`); one outside the bounds runs, and is cached, in fp32.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator

import torch

from kaggle_tta.cache import locked
from kaggle_tta.config.errors import DataError
from kaggle_tta.engine.assembly import assemble_members
from kaggle_tta.engine.compiling import choose_compile, compile_on_trial, may_compile
from kaggle_tta.engine.device import resolve_workers
from kaggle_tta.engine.pending import check_space, pending_work
from kaggle_tta.engine.phases import phase, say
from kaggle_tta.engine.plan import Plan
from kaggle_tta.engine.precision import PROBE_INPUTS, choose_precisions
from kaggle_tta.engine.stats import RunStats
from kaggle_tta.exec import decisions as tuning
from kaggle_tta.exec.chunks import ChunkSizer, layout_candidates, sizes_text
from kaggle_tta.exec.forward import MemberWork, Runner
from kaggle_tta.exec.precision import PrecisionCheck
from kaggle_tta.io import models as model_io
from kaggle_tta.io.data import Batch, make_loader
from kaggle_tta.io.readers import reader_of
from kaggle_tta.ops.gate import Forwards


def _bar() -> type:
    """tqdm's notebook bar where Jupyter widgets are installed, else its text bar (tqdm.auto in
    a kernel without ipywidgets warns 'IProgress not found' on every run)."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        from tqdm import tqdm as text

        return text
    from tqdm.auto import tqdm as auto

    return auto


def run_inference(
    plan: Plan, device: torch.device, precision: str, progress: bool = True, models: dict | None = None
) -> RunStats:
    """Fills the cache for every (member, view) of the plan that is not complete, holding
    each member's entry lock meanwhile: a second run on the same cache waits, then computes
    only what the first left missing.

    ``precision`` is the resolved runtime.precision; where that came from ``auto`` and is
    reduced, each member is checked against fp32 first (:func:`choose_precisions`) and runs
    in what the check chose, locking and writing that precision's entry only. ``models``:
    members built already (name -> model on the device), taken from the dict as they are used.
    """
    if "timm" not in sys.modules and any(m.cfg.arch for m in plan.members):  # a re-blend never gets here
        phase("importing torch and timm")
        import timm  # noqa: F401  # seconds on a fresh process: said, not hidden in the next phase
    phase("reading the cache")
    workers, threads = resolve_workers(plan.cfg.runtime.workers, device, plan.cfg.runtime.threads)
    if threads:
        torch.set_num_threads(threads)
    models = {} if models is None else models  # built before (serving) or by the check, used by the run
    precisions = choose_precisions(plan, device, precision, workers, models)
    if not pending_work(plan, precisions, RunStats(str(device), precision, len(plan.testset)), locked_=False):
        # all complete: nothing to write, so no lock (a cache on a read-only mount re-runs)
        return run_locked(plan, device, precisions, progress, holding=False)
    dirs = [plan.cache_root / m.name / m.fingerprint(precisions[m.name].ran_in) for m in plan.members]

    def waiting(folder) -> None:
        print(f"kaggle-tta: waiting for another run writing {folder}", file=sys.stderr, flush=True)

    with locked(dirs, waiting):
        return run_locked(plan, device, precisions, progress, models=models)


def run_locked(
    plan: Plan,
    device: torch.device,
    precisions: dict[str, PrecisionCheck],
    progress: bool,
    holding: bool = True,
    models: dict | None = None,
    per_host: int = 1,
    label: str = "",
) -> RunStats:
    rt, task = plan.cfg.runtime, plan.task
    stats = RunStats(device=str(device), precision=None, images=len(plan.testset))
    workers, threads = resolve_workers(rt.workers, device, rt.threads, per_host)
    if threads:
        torch.set_num_threads(threads)
    if holding and plan.rows is None:  # shards a torchrun left: rows computed already
        stats.assembled = assemble_members(plan, precisions)
    pending = pending_work(plan, precisions, stats, holding)
    if not pending:
        return stats
    specs = {w.member.canvas.key: w.member.canvas for w in pending}

    def loader(start: int) -> Iterator[Batch]:
        return iter(
            make_loader(
                plan.testset.paths,
                specs,
                rt.batch_size,
                workers,
                start,
                pin_memory=device.type == "cuda",
                reader=reader_of(plan.cfg),
            )
        )

    # The workers start now, from the first row any entry lacks: they decode while models build.
    start = min(w.entry.first_missing([v.name for v in w.views], task.stores_image_sizes) for w in pending)
    phase(f"starting the loader ({workers} worker(s))")
    batches = loader(start)
    opened: list[MemberWork] = []
    t0 = time.perf_counter()
    try:
        check_space(plan, pending)
        _build_runners(plan, pending, device, precisions, models or {}, workers)
        _open_files(plan, pending, opened)
        first = min(w.first_row for w in pending)
        if first < start:  # a partial file was unusable: start again from there
            start, batches = first, loader(first)
        batches = _trial_first(batches, start + _trial_rows(plan, pending))
        t0 = time.perf_counter()
        with torch.inference_mode():
            _stream(plan, pending, batches, loader, start, stats, progress, device, label)
    finally:
        del batches  # stops the workers
        for w in opened:
            w.entry.close()
            w.entry.save()
    _summarize(stats, pending)
    stats.seconds = time.perf_counter() - t0
    return stats


def _open_files(plan: Plan, pending: list[MemberWork], opened: list[MemberWork]) -> None:
    """Opens each member's files for writing (each appended to ``opened`` first, so that files
    opened before a failure are still closed)."""
    for w in pending:
        w.entry.write_ids(plan.testset.ids)
        opened.append(w)
        if plan.task.stores_image_sizes:
            w.open_sizes(len(plan.testset))
        plan.task.open_views(w, plan)
        w.align_to_first()
        # commit, not save: a view whose rows were all recorded before an interrupt hit
        # the last commit is completed here, instead of waiting for rows that never come
        w.entry.commit()


def _summarize(stats: RunStats, pending: list[MemberWork]) -> None:
    """Each computed member's line: its views, forwards, recomputed chunks, chunk size, layout."""
    for w in pending:
        ms = stats.members[w.member.name]
        ms.views_computed = [v.name for v in w.views]
        ms.forwards = w.forwards
        if w.runner:
            ms.nonfinite_recomputed = w.runner.nonfinite
            ms.compiled = w.runner.compiled is not None
            ms.compile_note = w.runner.compile_failure or w.compile_note or None
            sz = w.runner.sizer
            # a trial still running at the end (a small test set) picked nothing: reported as undecided
            ms.forward_batch = sz.current
            ms.channels_last = sz.channels_last if sz.layout_settled else None


def _build_runners(
    plan: Plan,
    pending: list[MemberWork],
    device: torch.device,
    precisions: dict[str, PrecisionCheck],
    models: dict,
    workers: int = 0,
) -> None:
    """Every model first: a bad checkpoint fails before the cache is touched. Chunk size and
    layout are each member's own (a resnet and a convnext disagree), tuned in the precision it
    runs in; a decision recorded for this member on this machine is reused instead of timing
    again, and a run too small to repay the trial is not timed. ``runtime.compile`` is decided
    then (engine.compiling), at one chunk shape. ``models``: those the precision check built."""
    rt = plan.cfg.runtime
    for w in pending:
        phase(f"building {w.member.name}")
        precision = precisions[w.member.name].ran_in
        model = models.pop(w.member.name, None)
        if model is None:
            model = model_io.build_model(plan.cfg, w.member.cfg, len(plan.classes)).to(device)
        sizer = ChunkSizer(
            rt.forward_batch,
            rt.batch_size * max(1, len(w.views)),
            layout_candidates(rt.channels_last, device, precision),
        )
        known = tuning.recall(plan.cache_root, decision_key(w, precision, device, plan)) if sizer.measuring else None
        if known is not None:
            sizer = ChunkSizer(known[0], known[0], (known[1],))
        inputs = _inputs_to_forward(plan, w)
        w.runner, w.compile_pending = None, 0
        if may_compile(rt.compile, device, inputs):
            fixed = sizer
            if sizer.measuring:  # compiled: one chunk shape, untimed
                fixed = ChunkSizer(rt.forward_batch, sizer.ceiling, tuple(sizer.layouts))
                fixed.untimed()
            runner = _runner(plan, w, model, precision, fixed, device)
            choice = choose_compile(plan, w, runner, device, workers, inputs)
            if choice.note:
                say(f"{w.member.name}: {choice.note}")
                w.compile_note = choice.note
            if choice.compiled is not None:
                w.runner, sizer = runner, fixed
            else:
                model.to(memory_format=torch.contiguous_format)  # the eager runner starts from this layout
            w.compile_pending = inputs if choice.pending else 0
        w.runner = w.runner or _runner(plan, w, model, precision, sizer, device)
        if sizer.measuring and not sizer.repays(inputs):
            size, cl = sizer.untimed()
            say(
                f"{w.member.name}: {inputs} inputs to forward, too few to repay a chunk-size and layout trial: "
                f"chunk {size}, {_layout(cl)}"
            )
        if w.compile_pending:  # the eager forward timed on the first chunks decides (their rows kept if eager)
            sizer.time_too(max(PROBE_INPUTS, 2 * sizer.current))


def _runner(
    plan: Plan, w: MemberWork, model: torch.nn.Module, precision: str, sizer: ChunkSizer, device: torch.device
) -> Runner:
    return Runner(model, device, precision, sizer, plan.task.post(plan, w.member.cfg), w.member.name)


def _trial_rows(plan: Plan, pending: list[MemberWork]) -> int:
    """Rows enough for every member's chunk-size and layout trial (0: none on trial); at a fixed
    chunk size, whole chunks of each view (rows a multiple of it), so that the views that ran
    in the decided configuration can be kept (:meth:`_Trials.kept`)."""
    rows = [0]
    for w in pending:
        if w.runner is not None and w.runner.sizer.measuring:
            sizer = w.runner.sizer
            r = math.ceil(sizer.inputs_on_trial() / max(1, len(w.views)))
            rows.append(r if sizer.trials else -(-r // sizer.current) * sizer.current)
    return max(rows)


def _trial_first(batches: Iterator[Batch], at: int) -> Iterator[Batch]:
    """The loader's batches, the first cut at row ``at`` where a trial runs: the stream decides
    at a batch's end and computes the rows on trial again, so they are the trial's, not a whole
    loader batch (512 inputs at d4 and batch_size 64, where the layout trial needs 192)."""
    first = next(batches, None)
    if first is None:
        return
    whole = all(isinstance(c, torch.Tensor) and c.shape[0] == first.hi - first.lo for c in first.canvases.values())
    if first.error is None and whole and first.lo < at < first.hi:
        yield first.rows(first.lo, at)
        yield first.rows(at, first.hi)
    else:
        yield first
    yield from batches


def _layout(channels_last: bool) -> str:
    return "channels_last" if channels_last else "contiguous"


def _inputs_to_forward(plan: Plan, w: MemberWork) -> int:
    """Rows still missing times the views missing them (images x views, as the forward counts)."""
    return sum(len(plan.testset) - w.entry.rows_done(v.name) for v in w.views)


def decision_key(w: MemberWork, precision: str, device: torch.device, plan: Plan) -> str:
    """Where a member's forward tuning is recorded: its fingerprint, precision, machine and
    the trial's bounds (the chunk-size ceiling grows with the views still to compute)."""
    return tuning.key(w.member.model_key, precision, device, plan.cfg.runtime, len(w.views))


class _Trials:
    """Members whose chunk size or layout is on trial, or whose eager forward is being timed
    for ``compile: auto``: the first row each computed on trial, and its forwards before that
    row. At the end each view's rows on trial are kept where all of them ran in the decided
    configuration, and computed again otherwise (counted once)."""

    def __init__(self) -> None:
        self.first: dict[int, int] = {}  # id(member work) -> its first row computed on trial
        self.counted: dict[int, Forwards] = {}
        self.starts: dict[int, dict[str, int]] = {}  # ... each view's first row on trial
        self.tried: dict[int, bool] = {}  # ... whether a chunk size or layout was on trial (else only timed)

    def note(self, w: MemberWork, lo: int, hi: int) -> None:
        todo = w.todo(lo, hi)
        if todo and w.runner is not None and w.runner.sizer.measuring and id(w) not in self.first:
            self.first[id(w)] = min(first for _, first in todo)  # a member with no rows yet does not hold others
            self.counted[id(w)] = dataclasses.replace(w.forwards)
            self.starts[id(w)] = {v.name: max(lo, w.start[v.name]) for v in w.views}
            sizer = w.runner.sizer
            self.tried[id(w)] = bool(sizer.trials) or not sizer.layout_settled
            w.configs, w.inputs = {}, {}

    def deciding(self, pending: list[MemberWork]) -> list[MemberWork]:
        return [w for w in pending if id(w) in self.first]

    def what(self, deciding: list[MemberWork]) -> str:
        if any(self.tried[id(w)] for w in deciding):
            return "timing chunk sizes and layouts"
        return "timing the eager forward (compile: auto)"

    def settle(self, deciding: list[MemberWork], plan: Plan, device: torch.device, start: int) -> tuple[int, int]:
        """Each deciding member takes its decisions (remembered for this machine), then keeps
        its views' rows on trial where :meth:`kept` allows and rewinds the others to its first
        row on trial; returns (the first row on trial, the row the stream starts again from:
        on the loader's grid from ``start``; rows before it are complete, to be committed)."""
        for w in deciding:
            assert w.runner is not None
            size, channels_last = w.runner.sizer.decide()
            if self.tried[id(w)]:
                tuning.remember(plan.cache_root, decision_key(w, w.runner.precision, device, plan), size, channels_last)
            keep = self.kept(w, plan, start)
            if w.compile_pending:  # its check decodes a few rows in-process; rows eager would keep count against it
                choice = compile_on_trial(plan, w, w.runner, device, 0, sum(self._rows(w, v) for v in keep))
                w.compile_pending, w.compile_note = 0, choice.note
                if choice.note:
                    say(f"{w.member.name}: {choice.note}")
                if w.runner.compiled is not None:  # its rows on trial ran eager: only untouched views stay
                    keep = self.kept(w, plan, start)
            w.rewind(self.first[id(w)], keep)
            w.forwards = self.counted[id(w)]
            for v in keep:  # rows kept are counted here, as the stream would have counted them
                rows = self._rows(w, v)
                w.forwards.run, w.forwards.full = w.forwards.run + rows, w.forwards.full + rows
        first, row = min(self.first.values()), min(w.first_row for w in deciding)
        self.first.clear()
        return first, _on_grid(row, start, plan.cfg.runtime.batch_size)

    def _rows(self, w: MemberWork, view: str) -> int:
        """Rows ``view`` of ``w`` computed on trial."""
        return max(0, w.start[view] - self.starts[id(w)][view])

    def kept(self, w: MemberWork, plan: Plan, start: int) -> frozenset[str]:
        """The views of ``w`` whose rows on trial stay: those that computed none, and (unless
        the member is gated: its gated views follow its first view's values) each whose inputs
        on trial, one per row, all ran in full chunks of the decided configuration and are a
        whole number of chunks, where the loader batch they lie in is whole chunks too. Every
        input of the run is then forwarded in a chunk of the shape a run that decided nothing
        gives it (convolutions of other batch shapes differ in the last bits: engine.shares);
        a model's output for an input does not depend on the other inputs of its chunk."""
        assert w.runner is not None
        if w.gate is not None:
            return frozenset()
        sizer, b = w.runner.sizer, plan.cfg.runtime.batch_size
        untouched = {v.name for v in w.views if self._rows(w, v.name) == 0}
        grid = _on_grid(self.first[id(w)], start, b)
        if len(w.views) * min(b, len(plan.testset) - grid) % sizer.current:
            return frozenset(untouched)
        decided = {(sizer.current, sizer.channels_last, w.runner.compiled is not None)}
        whole = {
            v.name
            for v in w.views
            if w.configs.get(v.name) == decided
            and w.inputs.get(v.name) == self._rows(w, v.name)
            and self._rows(w, v.name) % sizer.current == 0
        }
        return frozenset(untouched | whole)


def _on_grid(row: int, start: int, batch_size: int) -> int:
    """The first row of the loader batch (from ``start``) that holds ``row``."""
    return start + (row - start) // batch_size * batch_size


def _stream(
    plan: Plan,
    pending: list[MemberWork],
    batches: Iterator[Batch],
    loader: Callable[[int], Iterator[Batch]],
    start: int,
    stats: RunStats,
    progress: bool,
    device: torch.device,
    label: str = "",
) -> None:
    """Batches through every pending member's step, committed as each finishes.

    Rows computed while a member's chunk size or layout is still on trial (or its eager time
    timed for ``compile: auto``) are not committed: once every trial has decided (or the test
    set ends), each view whose rows on trial all ran in the decided configuration keeps them,
    the others rewind to the first such row and compute it again in the decided one, so every
    row of the cache comes from one configuration and two runs give the same numbers.
    """
    task, n = plan.task, len(plan.testset)
    phase(f"streaming {n - start} item(s) through {len(pending)} member(s)")
    trials = _Trials()
    n_views = sum(len(w.views) for w in pending)
    bar = _bar()(
        total=n - start,
        unit="img",
        desc=f"{label + ': ' if label else ''}{len(pending)} member(s), {n_views} view(s)",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        while (batch := next(batches, None)) is not None:
            if batch.error is not None:
                raise DataError(batch.error)
            for w in pending:
                trials.note(w, batch.lo, batch.hi)
                task.step(w, batch, plan)
            deciding = trials.deciding(pending)
            if deciding:
                if batch.hi < n and any(w.runner is not None and w.runner.sizer.measuring for w in deciding):
                    what = trials.what(deciding)
                    bar.set_postfix_str(what)
                    phase(what)
                    continue
                first, row = trials.settle(deciding, plan, device, start)
                for w in pending:  # rows kept: every view's rows before ``row`` are complete
                    w.entry.commit()
                stats.rows_computed += max(0, row - first)
                bar.update(max(0, row - first))
                batches = loader(row)
                phase("streaming (the decided chunk size and layout)")
                continue
            for w in pending:
                w.entry.commit()
            stats.rows_computed += batch.hi - batch.lo
            bar.update(batch.hi - batch.lo)
            bar.set_postfix_str(f"forward batch {sizes_text([w.runner.sizer.current for w in pending if w.runner])}")
    finally:
        bar.close()
