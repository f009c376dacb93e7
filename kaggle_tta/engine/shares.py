"""A share of the rows into shard entries (``infer --share``, and each rank of a ranked run),
the disk a ranked run needs, and rank 0's assembly with its recompute of damaged shards.
Several ranks themselves are kaggle_tta.dist's; nothing here starts or joins a rank."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import TYPE_CHECKING

from kaggle_tta.cache.files import size_text
from kaggle_tta.cache.shards import (
    SHARD_FILES,
    list_shards,
    shard_lock,
)
from kaggle_tta.config.errors import CacheError
from kaggle_tta.engine.assembly import assemble_entries
from kaggle_tta.engine.plan import Plan

if TYPE_CHECKING:
    import torch

    from kaggle_tta.engine.stats import RunStats
    from kaggle_tta.exec.precision import PrecisionCheck


def share_rows(n: int, k: int, world: int, unit: int = 1) -> tuple[int, int]:
    """Rows ``lo:hi`` of an ``n``-row test set that share ``k`` of ``world`` computes:
    contiguous, every row in exactly one share (none repeated), made of whole ``unit``-row
    blocks (the loader's batches) whose counts differ by at most one. Whole batches: each
    share then decodes and forwards the very batches (and chunks of them) one process would,
    so the cache is bit-identical to one process's; a share cut mid-batch packs other chunks,
    and convolutions of other batch shapes differ in the last bits."""
    blocks = -(-n // max(1, unit))
    lo, hi = k * blocks // world, (k + 1) * blocks // world
    return min(n, lo * unit), min(n, hi * unit)


def space_short(plan: Plan, precisions: dict[str, PrecisionCheck], world: int) -> str | None:
    """Why the disk under cache.dir cannot hold this ranked run (None: it can). The ranks
    share one disk (dist.check_shared), and each checks only its own share as it starts
    (engine._check_space); so rank 0 checks the whole: every row of every view the entries
    lack, less what the shards hold of them already (a resumed run), plus one view more, the
    largest, for the assembly (which frees each view's shard copies once it is committed)."""
    from kaggle_tta.engine.pending import SPACE_FIX, free_bytes, pending_work
    from kaggle_tta.engine.stats import RunStats

    n = len(plan.testset)
    needed = largest = 0
    pending = False
    for w in pending_work(plan, precisions, RunStats("", None, n), locked_=False):
        row = plan.task.row_bytes(w, plan)
        shards = list_shards(w.entry)
        for v in w.views:  # each computed into shards whatever the entry holds of it (a partial, a gated view)
            pending = True
            size = row * n
            held = 0
            for _, _, sh in shards:
                for name in SHARD_FILES:
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
        f"cache.dir ({plan.cache_root}): the {world} ranks' shards and their assembly need {size_text(needed)} "
        f"(the rows the entries lack, and {size_text(largest)} more while the largest view is assembled) and "
        f"{size_text(free)} are free; {SPACE_FIX}"
    )


def assemble_or_recompute(
    plan: Plan, device: torch.device, precisions: dict[str, PrecisionCheck], per_host: int, label: str
) -> int:
    """Rank 0's assembly. A shard view found damaged is not used: its rows are computed again
    here, into its shard, and assembled (a second damage is one line)."""
    made = 0
    for attempt in range(2):
        done = assemble_entries(plan, precisions, label)
        made += done.made
        if not done.damaged:
            return made
        if attempt:
            break
        for lo, hi in sorted({(lo, hi) for _, lo, hi, _, _ in done.damaged}):
            print(
                f"kaggle-tta: {label}: computing rows {lo}-{hi} again (their shard was damaged)",
                file=sys.stderr,
                flush=True,
            )
            run_share(plan, device, precisions, lo, hi, False, None, per_host, label)
    member, lo, hi, view, why = done.damaged[0]
    raise CacheError(
        f"{plan.cache_root / member}: shard {lo}-{hi} of view '{view}' was damaged again after it was computed anew "
        f"({why}); check the disk under cache.dir"
    )


def run_share(
    plan: Plan,
    device: torch.device,
    precisions: dict[str, PrecisionCheck],
    lo: int,
    hi: int,
    progress: bool = False,
    models: dict | None = None,
    per_host: int = 1,
    label: str = "",
) -> RunStats:
    """Rows ``lo:hi`` of every member still missing (from the entries and from complete
    shards of any split) into shard entries, holding the shards' locks."""
    from kaggle_tta.engine.pending import pending_work
    from kaggle_tta.engine.stats import RunStats
    from kaggle_tta.engine.stream import run_locked

    part = dataclasses.replace(plan, testset=plan.testset.rows(lo, hi), rows=(lo, hi))
    pending = pending_work(part, precisions, RunStats(str(device), None, hi - lo), locked_=False)

    def waiting(folder) -> None:
        print(f"kaggle-tta: {label or 'share'}: waiting for another run writing {folder}", file=sys.stderr, flush=True)

    with shard_lock([w.entry.dir for w in pending], waiting):
        stats = run_locked(
            part, device, precisions, progress, holding=bool(pending), models=models, per_host=per_host, label=label
        )
    stats.rows, stats.images = (lo, hi), len(plan.testset)
    return stats
