"""Several ranks on one cache (torchrun, ``runtime.devices``, ``infer --share``): each rank's
share of the rows into shard entries (kaggle_tta.cache.shards), then rank 0 assembles the
entries and blends. The single-process loop itself is kaggle_tta.engine.stream's.

The assembly (:func:`assemble_from`) is one function for rank 0, for a single process that
finds shards a torchrun left, and for ``cache merge``; it imports no torch."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaggle_tta.ops.gate import Forwards
from kaggle_tta.cache import CacheEntry, locked
from kaggle_tta.cache.shards import assemble, merge_from, shard_lock
from kaggle_tta.engine.plan import Plan

if TYPE_CHECKING:
    import torch

    from kaggle_tta.engine.stream import RunStats
    from kaggle_tta.exec.forward import PrecisionCheck

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class RankLine:
    """What one rank did (RunStats.ranks, on rank 0)."""

    rank: int
    host: str
    device: str
    lo: int
    hi: int
    rows_computed: int
    seconds: float


@dataclass
class Assembly:
    """What :func:`assemble_from` did."""

    copied: int = 0  # shards copied from other caches (cache merge)
    made: int = 0  # views (and image sizes) completed in the entries
    damaged: list[tuple[str, int, int, str, str]] = field(default_factory=list)  # (member, lo, hi, view, why): shard views not used
    entries: list[tuple[Any, CacheEntry]] = field(default_factory=list)  # (member plan, entry) of every entry looked at


def assemble_from(plan: Plan, precisions: dict[str, PrecisionCheck] | None = None, sources: Sequence[Path] = (), lock: bool = False) -> Assembly:
    """Assembles each member's entry from its shards (kaggle_tta.cache.shards), those of this
    cache and, first, those copied here from ``sources`` (other machines' cache.dir).

    ``precisions``: the entry of each member's chosen precision; None (cache merge): every
    precision whose entry has shards here or in a source. ``lock``: take each entry's lock
    here (else the caller holds them). The pipeline file is recorded as a user of each entry.
    """
    out = Assembly()
    source = str(plan.cfg.source) if plan.cfg.source else None
    for m in plan.members:
        for p in (precisions[m.name].ran_in,) if precisions is not None else PRECISIONS:
            entry = CacheEntry(plan.cache_root, m.name, m.fingerprint(p), m.inputs)
            if precisions is None and not any((Path(d) / m.name / entry.fingerprint / "shards").is_dir() for d in [plan.cache_root, *sources]):
                continue
            with locked([entry.dir]) if lock else _nothing():
                if lock:
                    entry.reload()
                out.copied += sum(merge_from(entry, Path(src), m.name) for src in sources)
                out.entries.append((m, entry))
                if not (entry.dir / "shards").is_dir():
                    if entry.mark_used(source) and entry.manifest_path.is_file():
                        entry.save()
                    continue
                done = assemble(entry, [v.name for v in m.views], len(plan.testset), plan.testset.ids, plan.task.stores_image_sizes, source)
                out.made += len(done.views)
                out.damaged += [(m.name, *d) for d in done.damaged]
    return out


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def assemble_members(plan: Plan, precisions: dict[str, PrecisionCheck]) -> int:
    """Assembles each member's entry from its ranks' shards; call it holding the entries'
    locks (engine: a single process that finds shards a torchrun left). Returns the views
    (and image sizes) completed; a damaged shard view is left out, so that the run computes
    the view again."""
    return assemble_from(plan, precisions).made


def release_shards(plan: Plan, computed: dict[str, str]) -> None:
    """After a single-process run: removes what shards of its entries hold that the entries
    now have complete (shards that only partly covered a view are not used by one process,
    which computes the view whole), under each entry's lock, taken without waiting (an entry
    another run holds is left to that run's assembly)."""
    from kaggle_tta.cache.shards import _release, _take, list_shards

    for m in plan.members:
        if m.name not in computed:
            continue
        entry = CacheEntry(plan.cache_root, m.name, m.fingerprint(computed[m.name]), m.inputs)
        if not (entry.dir / "shards").is_dir():
            continue
        fd = _take(entry.dir, wait=False, create=False)
        if fd is None:
            continue
        try:
            import os

            entry.reload()
            _release(entry, list_shards(entry), None)
        finally:
            os.close(fd)


def run_ranked(plan: Plan, progress: bool, r: Any) -> RunStats:
    """This rank's share of the run (kaggle_tta.dist.launch): rows ``r.share(n)`` of every pending
    member into its shard entries, holding their locks; then, after a barrier, rank 0
    assembles the entries from the shards under the entries' locks. Rank 0 decides the
    precision (and checks ``auto`` against fp32) for all ranks, so that every rank writes the
    same entries; each rank tunes its own chunk size. Returns, on rank 0, the whole run's
    summary with a line per rank; elsewhere the rank's own.

    Whatever stops a rank (an error, Ctrl-C) is told to the others, which stop within
    seconds with a line naming it, wherever they are (dist.failed)."""
    from kaggle_tta.dist import launch as dist

    dist.join(r)
    try:
        dist.check_same_job(job_of(plan), r)  # before any model is built or any file written
        return _run_ranked(plan, progress, r)
    except BaseException as exc:
        instead = dist.failed(exc, r)
        if instead is not None:
            raise instead from None
        raise
    finally:
        dist.leave()


def job_of(plan: Plan) -> dict[str, Any]:
    """What every rank must agree on with rank 0 (dist.check_same_job), field by field:
    the test set (its size, its ids in order), the loader's batch (the shares are cut in
    whole batches) and each member (its fingerprint, which covers the weights, the factory,
    the preprocessing and the test set's files, and its views). cache.dir is not one of
    them: dist.check_shared finds whether the ranks see one folder."""
    import hashlib

    job: dict[str, Any] = {
        "the test set's image count": len(plan.testset),
        "the test set's ids (sha256)": hashlib.sha256("\n".join(plan.testset.ids).encode()).hexdigest()[:16],
        "runtime.batch_size": plan.cfg.runtime.batch_size,
        "members": ", ".join(m.name for m in plan.members),
    }
    for m in plan.members:
        job[f"members.{m.name}.tta (its views)"] = " ".join(v.name for v in m.views)
        job[f"members.{m.name}'s fingerprint"] = m.fingerprint("fp32")
        job[f"members.{m.name}.adaptive"] = m.gate.text() if m.gate is not None else "none"  # not in the fingerprint: the rows a gated view holds
    return job


def _run_ranked(plan: Plan, progress: bool, r: Any) -> RunStats:
    import socket

    import torch

    from kaggle_tta.dist import launch as dist
    from kaggle_tta.engine.stream import choose_precisions
    from kaggle_tta.engine.plan import resolve_precision, resolve_workers

    rt, n = plan.cfg.runtime, len(plan.testset)
    t0 = time.perf_counter()
    device = dist.device_for(rt.device, r)
    threads = dist.threads_for(rt.threads, r) if device.type == "cpu" else rt.threads
    if threads:
        torch.set_num_threads(threads)
    dist.check_shared(plan.cache_root, r)
    workers, _ = resolve_workers(rt.workers, device, threads, r.local_world)
    models: dict[str, torch.nn.Module] = {}
    precisions = dist.broadcast(choose_precisions(plan, device, resolve_precision(rt.precision, device), workers, models) if r.main else None)
    short = dist.broadcast(space_short(plan, precisions, r.world) if r.main else None)  # before any share is written
    if short:
        from kaggle_tta.config.errors import CacheError

        raise dist.every_rank(CacheError(short))
    lo, hi = r.share(n, rt.batch_size)
    stats = run_share(plan, device, precisions, lo, hi, progress and r.main, models, r.local_world, str(r))
    stats.rank = str(r)
    line = RankLine(r.rank, socket.gethostname(), str(device), lo, hi, stats.rows_computed, stats.seconds)
    dist.barrier()  # every share is in its shards
    if r.main:
        stats.assembled = _assemble_or_recompute(plan, device, precisions, r.local_world, str(r))
    lines = dist.gather((line, stats.members))
    if lines is not None:
        _join_ranks(stats, lines, plan)
        stats.seconds = time.perf_counter() - t0
    return stats


def space_short(plan: Plan, precisions: dict[str, PrecisionCheck], world: int) -> str | None:
    """Why the disk under cache.dir cannot hold this ranked run (None: it can). The ranks
    share one disk (dist.check_shared), and each checks only its own share as it starts
    (engine._check_space); so rank 0 checks the whole: every row of every view the entries
    lack, less what the shards hold of them already (a resumed run), plus one view more, the
    largest, for the assembly (which frees each view's shard copies once it is committed)."""
    from kaggle_tta.cache.shards import _FILES, list_shards
    from kaggle_tta.engine.stream import SPACE_FIX, RunStats, _pending, free_bytes

    n = len(plan.testset)
    needed = largest = 0
    pending = False
    for w in _pending(plan, precisions, RunStats("", None, n), locked_=False):
        row = plan.task.row_bytes(w, plan)
        shards = list_shards(w.entry)
        for v in w.views:  # each computed into shards whatever the entry holds of it (a partial, a gated view)
            pending = True
            size = row * n
            held = 0
            for _, _, sh in shards:
                for name in _FILES:
                    with contextlib.suppress(OSError):
                        held += (sh.dir / name.format(v=v.name)).stat().st_size
            needed += max(0, size - held)
            largest = max(largest, size)
    if not pending:
        return None
    needed += largest
    free = free_bytes(plan)
    if free is None or needed <= free:
        return None
    return (
        f"cache.dir ({plan.cache_root}): the {world} ranks' shards and their assembly need {needed / 1e6:.1f} MB "
        f"(the rows the entries lack, and {largest / 1e6:.1f} MB more while the largest view is assembled) and {free / 1e6:.1f} MB are free; {SPACE_FIX}"
    )


def _assemble_or_recompute(plan: Plan, device: torch.device, precisions: dict[str, PrecisionCheck], share: int, label: str) -> int:
    """Rank 0's assembly. A shard view found damaged is not used: its rows are computed again
    here, into its shard, and assembled (a second damage is one line)."""
    from kaggle_tta.config.errors import CacheError

    made = 0
    for attempt in range(2):
        done = assemble_entries(plan, precisions, label)
        made += done.made
        if not done.damaged:
            return made
        if attempt:
            break
        for lo, hi in sorted({(lo, hi) for _, lo, hi, _, _ in done.damaged}):
            print(f"kaggle-tta: {label}: computing rows {lo}-{hi} again (their shard was damaged)", file=sys.stderr, flush=True)
            run_share(plan, device, precisions, lo, hi, False, None, share, label)
    member, lo, hi, view, why = done.damaged[0]
    raise CacheError(f"{plan.cache_root / member}: shard {lo}-{hi} of view '{view}' was damaged again after it was computed anew ({why}); check the disk under cache.dir")


def run_share(plan: Plan, device: torch.device, precisions: dict[str, PrecisionCheck], lo: int, hi: int, progress: bool = False, models: dict | None = None, share: int = 1, label: str = "") -> RunStats:
    """Rows ``lo:hi`` of every member still missing (from the entries and from complete
    shards of any split) into shard entries, holding the shards' locks."""
    import dataclasses

    from kaggle_tta.engine.stream import RunStats, _pending, _run_locked

    part = dataclasses.replace(plan, testset=plan.testset.rows(lo, hi), rows=(lo, hi))
    pending = _pending(part, precisions, RunStats(str(device), None, hi - lo), locked_=False)

    def waiting(folder) -> None:
        print(f"kaggle-tta: {label or 'share'}: waiting for another run writing {folder}", file=sys.stderr, flush=True)

    with shard_lock([w.entry.dir for w in pending], waiting):
        stats = _run_locked(part, device, precisions, progress, holding=bool(pending), models=models, share=share, label=label)
    stats.share, stats.images = (lo, hi), len(plan.testset)
    return stats


def assemble_entries(plan: Plan, precisions: dict[str, PrecisionCheck], label: str = "") -> Assembly:
    """Every member's entry assembled from its shards, holding the entries' locks."""
    dirs = [plan.cache_root / m.name / m.fingerprint(precisions[m.name].ran_in) for m in plan.members]

    def waiting(folder) -> None:
        print(f"kaggle-tta: {label or 'assembly'}: waiting for another run writing {folder}", file=sys.stderr, flush=True)

    with locked(dirs, waiting):
        return assemble_from(plan, precisions)


def _join_ranks(stats: RunStats, lines: list, plan: Plan) -> None:
    """Rank 0's summary of every rank: rows and views computed, chunks recomputed."""
    stats.ranks = [line for line, _ in lines]
    stats.rows_computed = sum(line.rows_computed for line in stats.ranks)
    devices = sorted({line.device for line in stats.ranks})
    stats.device = f"{len(stats.ranks)} ranks ({', '.join(devices)})"
    for m in plan.members:
        ms = stats.members[m.name]
        computed = {v for _, members in lines for v in members[m.name].views_computed}
        ms.views_computed = [v.name for v in m.views if v.name in computed]
        ms.views_cached = [v.name for v in m.views if v.name not in computed]
        ms.nonfinite_recomputed = sum(members[m.name].nonfinite_recomputed for _, members in lines)
        ms.forwards = Forwards()
        for _, members in lines:  # adaptive views: every rank's forwards, against plain TTA's
            ms.forwards.add(members[m.name].forwards)
        if ms.forward_batch is None:
            ms.forward_batch = next((members[m.name].forward_batch for _, members in lines if members[m.name].forward_batch), None)
