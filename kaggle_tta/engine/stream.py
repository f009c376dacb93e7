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
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from kaggle_tta.cache import CacheEntry, locked
from kaggle_tta.cache.entry import SIZES, held_name
from kaggle_tta.cache.shards import covered, list_shards, read_rows
from kaggle_tta.config.errors import CacheError, DataError, KaggleTTAError
from kaggle_tta.engine.plan import MemberPlan, Plan, resolve_workers
from kaggle_tta.exec import decisions as tuning
from kaggle_tta.exec.forward import (
    ChunkSizer,
    MemberWork,
    PrecisionCheck,
    ProbeWork,
    Runner,
    compare_precision,
    layout_candidates,
    sizes_text,
)
from kaggle_tta.io.data import make_loader
from kaggle_tta.io.models import build_model
from kaggle_tta.ops.gate import Forwards, Gate, held_gate, skipping

REDUCED = ("bf16", "fp16")
PROBE_INPUTS = 64  # the precision check forwards at least this many inputs (images x views) per member


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
    share: tuple[int, int] | None = None  # ... and its rows (lo, hi)
    ranks: list = field(default_factory=list)  # on rank 0: one line per rank
    assembled: int = 0  # on rank 0: views (and image sizes) assembled from the ranks' shards

    @property
    def forward_batch(self) -> str:
        """The computed members' chunk sizes: one number, or one per member joined by '/'."""
        return sizes_text([m.forward_batch for m in self.members.values() if m.forward_batch is not None])

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


def _pending(
    plan: Plan, precisions: dict[str, PrecisionCheck], stats: RunStats, locked_: bool = True
) -> list[MemberWork]:
    """Each member with views (or image sizes) still missing from its entry (the one of the
    precision it runs in). Holding the locks (``locked_``), it also sweeps what killed runs
    left and records the pipeline's use.

    A rank's share (``plan.rows``) writes to its shard entry; there a view is missing only
    where neither the entry nor complete shards (of any earlier split) hold its rows."""
    out = []
    for m in plan.members:
        chosen = precisions[m.name]
        main = CacheEntry(plan.cache_root, m.name, m.fingerprint(chosen.ran_in), m.inputs)
        entry = main if plan.rows is None else main.shard(*plan.rows)
        if locked_:
            entry.sweep()  # no one else writes here while the lock is held
            if (
                main is entry
                and entry.mark_used(str(plan.cfg.source) if plan.cfg.source else None)
                and entry.manifest_path.is_file()
            ):
                entry.save()
        ms = stats.members[m.name] = MemberStats(m.name, precision=chosen.ran_in, precision_note=chosen.note or None)
        gate = skipping(m.gate)
        have = _have(plan, main, entry, _fits(gate, m, exact=True))
        done = lambda view, have=have, gate=gate: have(view) and _holds(main, entry, gate, m, view)  # noqa: E731
        todo = [v for v in m.views if not done(v.name)]
        ms.views_cached = [v.name for v in m.views if done(v.name)]
        if todo or (plan.task.stores_image_sizes and not done(SIZES)):
            work = MemberWork(m, entry, todo, gate=gate)
            if gate is not None:
                cached = _first_values(work, main, entry, plan.rows)
                work.first_values = lambda lo, hi, cached=cached, act=m.activation: plan.task.as_logits(
                    cached(lo, hi), act
                )
            out.append(work)
    ran = {c.ran_in for c in precisions.values()}
    stats.precision = ran.pop() if len(ran) == 1 else None
    return out


def _fits(gate: Gate | None, m: MemberPlan, exact: bool = False):
    """Whether an entry's complete ``view`` holds every row this run's gate needs
    (kaggle_tta.ops.gate): a plain view holds every row; a gated one those of its own gate
    and of tighter ones, with its row mask complete. ``exact`` (shards): only copies whose
    rows are this run's own, plain for a plain view, this gate's for a gated one, since the
    assembly joins the shards of one gate and never a mix."""

    def fits(e: CacheEntry, view: str) -> bool:
        held = held_gate(e.view_state(view))
        wanted = gate if gate is not None and view != gate.first else None
        if exact:
            mine = wanted.record(m.activation) if wanted is not None else None
            return held == mine and (held is None or e.is_complete(held_name(view)))
        if held is None:
            return True
        return wanted is not None and wanted.covered_by(held, m.activation) and e.is_complete(held_name(view))

    return fits


def _holds(main: CacheEntry, entry: CacheEntry, gate: Gate | None, m: MemberPlan, view: str) -> bool:
    """Whether the complete ``view`` holds every row this run's gate needs (kaggle_tta.ops.gate):
    a plain view holds every row; a gated one those of its own gate and of tighter ones."""
    if view == SIZES:
        return True
    for e in (entry, main):
        if e.is_complete(view):
            return _fits(gate, m, exact=e is not main)(e, view)  # a share's own shard: its rows exactly (see _fits)
    return True  # complete through shards that fit (engine._have)


def _first_values(work: MemberWork, main: CacheEntry, entry: CacheEntry, rows: tuple[int, int] | None):
    """Rows ``lo:hi`` (of this run's test set) of the gate's first view as cached: from the
    file this run writes, else from the complete entry (a share reads the main entry at its
    offset)."""
    first = work.gate.first  # type: ignore[union-attr]
    offset = rows[0] if rows is not None else 0

    def values(lo: int, hi: int):
        if first in work.store:
            return work.store[first][lo:hi]
        if entry.is_complete(first):
            return entry.read(first)[lo:hi]
        return read_rows(main, first, offset + lo, offset + hi)  # the main entry, or shards of another split

    return values


def _have(plan: Plan, main: CacheEntry, entry: CacheEntry, fits=None):
    """Whether a view (or SIZES) of ``entry`` needs no computing: complete there (or, for a
    share, in the main entry, or in shards of any split whose copies ``fits``)."""
    if entry is main:
        return main.is_complete
    shards = list_shards(main)
    lo, hi = plan.rows  # type: ignore[misc]
    return lambda view: entry.is_complete(view) or main.is_complete(view) or covered(main, view, lo, hi, shards, fits)


def run_inference(plan: Plan, device: torch.device, precision: str, progress: bool = True) -> RunStats:
    """Fills the cache for every (member, view) of the plan that is not complete, holding
    each member's entry lock meanwhile: a second run on the same cache waits, then computes
    only what the first left missing.

    ``precision`` is the resolved runtime.precision; where that came from ``auto`` and is
    reduced, each member is checked against fp32 first (:func:`choose_precisions`) and runs
    in what the check chose, locking and writing that precision's entry only.
    """
    workers, threads = resolve_workers(plan.cfg.runtime.workers, device, plan.cfg.runtime.threads)
    if threads:
        torch.set_num_threads(threads)
    models: dict[str, torch.nn.Module] = {}  # built by the check, used again by the run
    precisions = choose_precisions(plan, device, precision, workers, models)
    if not _pending(plan, precisions, RunStats(str(device), precision, len(plan.testset)), locked_=False):
        # all complete: nothing to write, so no lock (a cache on a read-only mount re-runs)
        return _run_locked(plan, device, precisions, progress, holding=False)
    dirs = [plan.cache_root / m.name / m.fingerprint(precisions[m.name].ran_in) for m in plan.members]

    def waiting(folder) -> None:
        print(f"kaggle-tta: waiting for another run writing {folder}", file=sys.stderr, flush=True)

    with locked(dirs, waiting):
        return _run_locked(plan, device, precisions, progress, models=models)


# ---- the check of precision: auto ----------------------------------------------------------


def choose_precisions(
    plan: Plan, device: torch.device, precision: str, workers: int = 0, models: dict | None = None
) -> dict[str, PrecisionCheck]:
    """The precision each member runs in.

    Where runtime.precision is given (bf16, fp16, fp32) or ``auto`` resolved to fp32, that one,
    unchecked: an explicit reduced precision is the user's choice and is never overridden.
    Where ``auto`` resolved to bf16 or fp16, each member is checked against fp32 once:

    - the first rows of the test set (at least one loader batch, and enough rows for
      :data:`PROBE_INPUTS` inputs over the member's views) go through the task's own step
      twice, in the reduced precision and in fp32, into memory (forward.ProbeWork), so the
      check compares exactly what would be cached, in every view (on real digit scans the
      worst view, a 1.1 scale, agreed on 88.8% of top-1 where the identity agreed on 99.2%);
    - bounds (forward.compare_precision): in every view top-1 agreement (per-pixel argmax
      agreement for ``[N, K, h, w]`` maps) >= 99.5% of the probed inputs (pixels) and
      relative L2 error ||reduced - fp32|| / ||fp32|| <= 1e-2; a non-finite reduced output
      fails too. A member outside them runs in fp32, and its rows go to its fp32 entry
      (``m.fingerprint("fp32")``, the same as an explicit fp32 run's, so the cache never
      holds fp32 numbers under a reduced key). Detection members are not checked: their
      outputs are lists of boxes, with no element-wise error; their note says so.
    - the verdict is recorded in the manifest of the entry the rows go to
      (``precision_checks: {bf16: {ran_in, note, ...}}``) and reused by later runs, so a
      resumed or repeated run neither checks again nor changes its mind, and a member whose
      entries are complete builds no model. A fallback recorded in the fp32 entry wins over a
      pass recorded in the reduced one (two machines that disagreed: fp32 is the safe answer).

    Why before the loop, not on the stream's first chunks (as chunk-size trials are): the
    precision is part of each entry's fingerprint and lock, so deciding first means each
    member locks, opens and writes one entry, never switching files, locks or the loader's
    start mid-run; and the check always uses the first rows of the test set, not the first
    rows still missing, so a resumed run would decide alike. The cost: the check's forwards
    (the probed inputs, twice) are not kept, once per member and cache entry.

    ``models`` receives the models the check built, for the run to use again.
    """
    out = {m.name: PrecisionCheck(precision, "") for m in plan.members}
    if plan.cfg.runtime.precision != "auto" or precision not in REDUCED:
        return out
    todo: list[MemberPlan] = []
    for m in plan.members:
        known = _recorded_check(plan, m, precision)
        if known is not None:
            out[m.name] = known
        else:
            todo.append(m)
    if todo:
        checks = _probe(plan, todo, device, precision, workers, models if models is not None else {})
        for m in todo:
            out[m.name] = checks[m.name]
            if checks[m.name].details:  # "not checked" (detection) is not recorded: nothing was measured
                _record_check(plan, m, precision, checks[m.name])
    return out


def _check_entry(plan: Plan, m: MemberPlan, precision: str) -> CacheEntry:
    return CacheEntry(plan.cache_root, m.name, m.fingerprint(precision), m.inputs)


def _recorded_check(plan: Plan, m: MemberPlan, precision: str) -> PrecisionCheck | None:
    """The verdict of an earlier check of ``precision`` for ``m``: a fallback recorded in its
    fp32 entry first, then a pass recorded in its reduced entry."""
    for ran_in in ("fp32", precision):
        rec = _check_entry(plan, m, ran_in).manifest.get("precision_checks", {}).get(precision)
        if isinstance(rec, dict) and rec.get("ran_in") == ran_in:
            return PrecisionCheck(
                ran_in, str(rec.get("note", "")), {k: v for k, v in rec.items() if k not in ("ran_in", "note")}
            )
    return None


def _record_check(plan: Plan, m: MemberPlan, precision: str, check: PrecisionCheck) -> None:
    """Writes the verdict into the manifest of the entry the rows go to, under its lock (best
    effort: a read-only cache only means checking again next time)."""
    entry = _check_entry(plan, m, check.ran_in)
    try:
        with entry.lock():
            entry.reload()
            rec = {
                "ran_in": check.ran_in,
                "note": check.note,
                **check.details,
                "checked": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            entry.manifest.setdefault("precision_checks", {})[precision] = rec
            entry.save()
    except (OSError, KaggleTTAError):
        pass


def _probe(
    plan: Plan, members: list[MemberPlan], device: torch.device, precision: str, workers: int, models: dict
) -> dict[str, PrecisionCheck]:
    """Runs each member's step on the first rows in ``precision`` and in fp32 and compares
    (member name -> verdict). A member whose task stores ragged rows (detection boxes) is not
    checked, and its model is not built here."""
    import math

    rt, task, n = plan.cfg.runtime, plan.task, len(plan.testset)
    out: dict[str, PrecisionCheck] = {}
    dense = []
    for m in members:
        trial = ProbeWork(m, None, list(m.views))  # type: ignore[arg-type]
        task.open_views(trial, plan)
        if trial.ragged:
            out[m.name] = PrecisionCheck(
                precision,
                f"{precision}: not checked against fp32 (its outputs are lists of boxes, with no element-wise error)",
            )
        else:
            dense.append(m)
    if not dense:
        return out
    want = min(n, max(rt.batch_size, max(math.ceil(PROBE_INPUTS / max(1, len(m.views))) for m in dense)))
    batches = []
    it = iter(
        make_loader(
            plan.testset.paths,
            {m.canvas.key: m.canvas for m in dense},
            rt.batch_size,
            workers,
            0,
            pin_memory=device.type == "cuda",
        )
    )
    try:
        for batch in it:
            if batch.error is not None:
                raise DataError(batch.error)
            batches.append(batch)
            if batch.hi >= want:
                break
    finally:
        del it  # stops the workers
    rows = batches[-1].hi
    size = rt.forward_batch if isinstance(rt.forward_batch, int) else ChunkSizer.CANDIDATES[2]
    layout = layout_candidates(rt.channels_last, device, precision)[0]
    for m in dense:
        model = models[m.name] = build_model(plan.cfg, m.cfg, len(plan.classes)).to(device)
        runner = Runner(model, device, precision, ChunkSizer(size, size, (layout,)), task.post(plan, m.cfg), m.name)
        stores: dict[str, dict] = {}
        nonfinite = 0
        with torch.inference_mode():
            for p in (precision, "fp32"):
                runner.precision = p
                work = ProbeWork(m, None, list(m.views), runner, rows=rows)  # type: ignore[arg-type]
                task.open_views(work, plan)
                for batch in batches:
                    task.step(work, batch, plan)
                stores[p] = work.store
                if p == precision:
                    nonfinite = runner.nonfinite
        model.to(memory_format=torch.contiguous_format)  # the run's runner starts from this layout
        out[m.name] = compare_precision(stores[precision], stores["fp32"], precision, nonfinite)
    return out


def _run_locked(
    plan: Plan,
    device: torch.device,
    precisions: dict[str, PrecisionCheck],
    progress: bool,
    holding: bool = True,
    models: dict | None = None,
    share: int = 1,
    label: str = "",
) -> RunStats:
    cfg, task = plan.cfg, plan.task
    rt = cfg.runtime
    n = len(plan.testset)
    stats = RunStats(device=str(device), precision=None, images=n)
    workers, threads = resolve_workers(rt.workers, device, rt.threads, share)
    if threads:
        torch.set_num_threads(threads)
    if holding and plan.rows is None:
        from kaggle_tta.dist.ranked import assemble_members  # shards a torchrun left: rows computed already

        stats.assembled = assemble_members(plan, precisions)
    pending = _pending(plan, precisions, stats, holding)
    if not pending:
        return stats
    specs = {w.member.canvas.key: w.member.canvas for w in pending}

    def loader(start: int):
        return iter(
            make_loader(plan.testset.paths, specs, rt.batch_size, workers, start, pin_memory=device.type == "cuda")
        )

    # Start the workers now, from the first row any entry's manifest lacks: they decode the
    # first batches while the models are built.
    start = min(w.entry.first_missing([v.name for v in w.views], task.stores_image_sizes) for w in pending)
    batches = loader(start)
    opened: list[MemberWork] = []
    t0 = time.perf_counter()
    try:
        _check_space(plan, pending)
        _build_runners(plan, pending, device, precisions, models or {})
        for w in pending:
            w.entry.write_ids(plan.testset.ids)
            opened.append(w)  # first: files opened before a failure are still closed
            if task.stores_image_sizes:
                w.open_sizes(n)
            task.open_views(w, plan)
            w.align_to_first()
            # commit, not save: a view whose rows were all recorded before an interrupt hit
            # the last commit is completed here, instead of waiting for rows that never come
            w.entry.commit()
        first = min(w.first_row for w in pending)
        if first < start:  # a partial file was unusable: start again from there
            start, batches = first, loader(first)
        t0 = time.perf_counter()
        with torch.inference_mode():
            _stream(plan, pending, batches, loader, start, stats, progress, device, label)
    finally:
        del batches  # stops the workers
        for w in opened:
            w.entry.close()
            w.entry.save()
    for w in pending:
        ms = stats.members[w.member.name]
        ms.views_computed = [v.name for v in w.views]
        ms.forwards = w.forwards
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
    needed = 0
    for w in pending:
        row = plan.task.row_bytes(w, plan)
        needed += sum(row * len(plan.testset) for v in w.views if w.entry.rows_done(v.name) == 0)
    free = free_bytes(plan)
    if free is not None and needed > free:
        raise CacheError(
            f"cache.dir ({plan.cache_root}): this run writes {needed / 1e6:.1f} MB and {free / 1e6:.1f} MB are free; {SPACE_FIX}"
        )


SPACE_FIX = (
    "free space there, point cache.dir at a larger disk, or store less (cache.dtype: float16 or uint8, cache.scale)"
)


def free_bytes(plan: Plan) -> int | None:
    """Bytes free on the disk under cache.dir (None: no such disk yet; the first write says
    what is wrong)."""
    import shutil

    try:
        return shutil.disk_usage(plan.cache_root if plan.cache_root.exists() else plan.cache_root.parent).free
    except OSError:
        return None


def _build_runners(
    plan: Plan, pending: list[MemberWork], device: torch.device, precisions: dict[str, PrecisionCheck], models: dict
) -> None:
    """Every model first: a bad checkpoint fails before the cache is touched. Chunk size and
    layout are each member's own (a resnet and a convnext disagree), tuned in the precision it
    runs in; a decision recorded for this member on this machine is reused instead of timing
    again. ``models``: those the precision check built already."""
    rt = plan.cfg.runtime
    for w in pending:
        precision = precisions[w.member.name].ran_in
        layouts = layout_candidates(rt.channels_last, device, precision)
        model = models.pop(w.member.name, None)
        if model is None:
            model = build_model(plan.cfg, w.member.cfg, len(plan.classes)).to(device)
        sizer = ChunkSizer(rt.forward_batch, rt.batch_size * max(1, len(w.views)), layouts)
        if sizer.measuring:
            known = tuning.recall(plan.cache_root, _tuning_key(w, precision, device, plan))
            if known is not None:
                sizer = ChunkSizer(known[0], known[0], (known[1],))
        w.runner = Runner(model, device, precision, sizer, plan.task.post(plan, w.member.cfg), w.member.name)


def _tuning_key(w: MemberWork, precision: str, device: torch.device, plan: Plan) -> str:
    """Where a member's forward tuning is recorded: its fingerprint, precision, machine and
    the trial's bounds (the chunk-size ceiling grows with the views still to compute)."""
    return tuning.key(w.member.key, precision, device, plan.cfg.runtime, len(w.views))


def _stream(
    plan: Plan,
    pending: list[MemberWork],
    batches,
    loader,
    start: int,
    stats: RunStats,
    progress: bool,
    device: torch.device,
    label: str = "",
) -> None:
    """Batches through every pending member's step, committed as each finishes.

    Rows computed while a member's chunk size or layout is still on trial are not committed:
    once every trial has decided (or the test set ends), those members rewind to the first
    such row and compute it again in the decided configuration, so every row of the cache
    comes from one configuration and two runs give the same numbers.
    """
    task, n = plan.task, len(plan.testset)
    trial_from: dict[int, int] = {}  # id(member work) -> its first row computed on trial
    counted: dict[int, Forwards] = {}  # ... and its forwards before that row
    n_views = sum(len(w.views) for w in pending)
    bar = tqdm(
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
                todo = w.todo(batch.lo, batch.hi)
                if todo and w.runner.sizer.measuring and id(w) not in trial_from:  # type: ignore[union-attr]
                    trial_from[id(w)] = min(
                        first for _, first in todo
                    )  # a member with no rows yet does not hold others
                    counted[id(w)] = dataclasses.replace(
                        w.forwards
                    )  # the rows on trial are computed again: counted once
                task.step(w, batch, plan)
            deciding = [w for w in pending if id(w) in trial_from]
            if deciding:
                if batch.hi < n and any(w.runner.sizer.measuring for w in deciding):  # type: ignore[union-attr]
                    bar.set_postfix_str("timing chunk sizes and layouts")
                    continue
                for w in deciding:
                    size, channels_last = w.runner.sizer.decide()  # type: ignore[union-attr]
                    tuning.remember(
                        plan.cache_root, _tuning_key(w, w.runner.precision, device, plan), size, channels_last
                    )  # type: ignore[union-attr]
                    w.rewind(trial_from[id(w)])
                    w.forwards = counted[id(w)]
                batches = loader(min(trial_from.values()))
                trial_from.clear()
                continue
            for w in pending:
                w.entry.commit()
            stats.rows_computed += batch.hi - batch.lo
            bar.update(batch.hi - batch.lo)
            bar.set_postfix_str(f"forward batch {sizes_text([w.runner.sizer.current for w in pending if w.runner])}")
    finally:
        bar.close()
