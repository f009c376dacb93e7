"""A ranked run (torchrun, ``runtime.devices``): each rank computes its share of the rows into
shard entries (kaggle_tta.engine.shares), then rank 0 assembles the entries and blends; the
ranks meet through kaggle_tta.dist.group."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from kaggle_tta.dist import checks, group
from kaggle_tta.dist.ranks import Ranks, device_for, every_rank, threads_for
from kaggle_tta.engine.plan import Plan
from kaggle_tta.engine.shares import assemble_or_recompute, run_share, space_short
from kaggle_tta.engine.stats import RunStats
from kaggle_tta.ops.gate import Forwards


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


def run_ranked(plan: Plan, progress: bool, r: Ranks) -> RunStats:
    """This rank's share of the run (kaggle_tta.dist.launch): rows ``r.share(n)`` of every pending
    member into its shard entries, holding their locks; then, after a barrier, rank 0
    assembles the entries from the shards under the entries' locks. Rank 0 decides the
    precision (and checks ``auto`` against fp32) for all ranks, so that every rank writes the
    same entries; each rank tunes its own chunk size. Returns, on rank 0, the whole run's
    summary with a line per rank; elsewhere the rank's own.

    Whatever stops a rank (an error, Ctrl-C) is told to the others, which stop within
    seconds with a line naming it, wherever they are (dist.failed)."""
    group.join(r)
    try:
        checks.check_same_job(job_of(plan), r)  # before any model is built or any file written
        return _run_ranked(plan, progress, r)
    except BaseException as exc:
        instead = group.failed(exc, r)
        if instead is not None:
            raise instead from None
        raise
    finally:
        group.leave()


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
        job[f"members.{m.name}.adaptive"] = (
            m.gate.text() if m.gate is not None else "none"
        )  # not in the fingerprint: the rows a gated view holds
    return job


def _run_ranked(plan: Plan, progress: bool, r: Ranks) -> RunStats:
    import socket

    import torch

    from kaggle_tta.engine.device import resolve_precision, resolve_workers
    from kaggle_tta.engine.precision import choose_precisions

    rt, n = plan.cfg.runtime, len(plan.testset)
    t0 = time.perf_counter()
    device = device_for(rt.device, r)
    threads = threads_for(rt.threads, r) if device.type == "cpu" else rt.threads
    if threads:
        torch.set_num_threads(threads)
    checks.check_shared(plan.cache_root, r)
    workers, _ = resolve_workers(rt.workers, device, threads, r.local_world)
    models: dict[str, torch.nn.Module] = {}
    precisions = group.broadcast(
        choose_precisions(plan, device, resolve_precision(rt.precision, device), workers, models) if r.main else None
    )
    short = group.broadcast(space_short(plan, precisions, r.world) if r.main else None)  # before any share is written
    if short:
        from kaggle_tta.config.errors import CacheError

        raise every_rank(CacheError(short))
    lo, hi = r.share(n, rt.batch_size)
    stats = run_share(plan, device, precisions, lo, hi, progress and r.main, models, r.local_world, str(r))
    stats.rank = str(r)
    line = RankLine(r.rank, socket.gethostname(), str(device), lo, hi, stats.rows_computed, stats.seconds)
    group.barrier()  # every share is in its shards
    if r.main:
        stats.assembled = assemble_or_recompute(plan, device, precisions, r.local_world, str(r))
    lines = group.gather((line, stats.members))
    if lines is not None:
        _join_ranks(stats, lines, plan)
        stats.seconds = time.perf_counter() - t0
    return stats


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
            ms.forward_batch = next(
                (members[m.name].forward_batch for _, members in lines if members[m.name].forward_batch), None
            )
