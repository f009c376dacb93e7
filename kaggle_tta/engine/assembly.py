"""The entries assembled from shards: rank 0 after a ranked run, ``cache merge``, and a single
process that finds shards a torchrun left. Imports no torch."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kaggle_tta.cache import CacheEntry, locked
from kaggle_tta.cache.lock import take_lock
from kaggle_tta.cache.shards import assemble, list_shards, merge_from, release_copies
from kaggle_tta.cache.trust import checked_entry
from kaggle_tta.engine.plan import Plan

if TYPE_CHECKING:
    from kaggle_tta.exec.precision import PrecisionCheck


PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class Assembly:
    """What :func:`assemble_from` did."""

    copied: int = 0  # shards copied from other caches (cache merge)
    made: int = 0  # views (and image sizes) completed in the entries
    damaged: list[tuple[str, int, int, str, str]] = field(
        default_factory=list
    )  # (member, lo, hi, view, why): shard views not used
    entries: list[tuple[Any, CacheEntry]] = field(default_factory=list)  # (member plan, entry) of every entry looked at


def assemble_from(
    plan: Plan, precisions: dict[str, PrecisionCheck] | None = None, sources: Sequence[Path] = (), lock: bool = False
) -> Assembly:
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
            ids = plan.testset.ids  # the caller holds the locks (not lock): a damaged entry is cleared
            entry = checked_entry(plan.cache_root, m.name, m.fingerprint(p), m.inputs, ids, heal=not lock)
            if precisions is None and not any(
                (Path(d) / m.name / entry.fingerprint / "shards").is_dir() for d in [plan.cache_root, *sources]
            ):
                continue
            with locked([entry.dir]) if lock else contextlib.nullcontext():
                if lock:
                    entry.reload()
                out.copied += sum(merge_from(entry, Path(src), m.name) for src in sources)
                out.entries.append((m, entry))
                if not (entry.dir / "shards").is_dir():
                    if entry.mark_used(source) and entry.manifest_path.is_file():
                        entry.save()
                    continue
                done = assemble(
                    entry,
                    [v.name for v in m.views],
                    len(plan.testset),
                    plan.testset.ids,
                    plan.task.stores_image_sizes,
                    source,
                )
                out.made += len(done.views)
                out.damaged += [(m.name, *d) for d in done.damaged]
    return out


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
    for m in plan.members:
        if m.name not in computed:
            continue
        entry = CacheEntry(plan.cache_root, m.name, m.fingerprint(computed[m.name]), m.inputs)
        if not (entry.dir / "shards").is_dir():
            continue
        fd = take_lock(entry.dir, wait=False, create=False)
        if fd is None:
            continue
        try:
            entry.reload()
            release_copies(entry, list_shards(entry), None)
        finally:
            os.close(fd)


def assemble_entries(plan: Plan, precisions: dict[str, PrecisionCheck], label: str = "") -> Assembly:
    """Every member's entry assembled from its shards, holding the entries' locks."""
    dirs = [plan.cache_root / m.name / m.fingerprint(precisions[m.name].ran_in) for m in plan.members]

    def waiting(folder) -> None:
        print(
            f"kaggle-tta: {label or 'assembly'}: waiting for another run writing {folder}", file=sys.stderr, flush=True
        )

    with locked(dirs, waiting):
        return assemble_from(plan, precisions)


def missing_rows(entry: CacheEntry, view: str, n: int) -> int:
    """Rows of ``view`` that neither the entry nor its complete shards hold (for messages)."""
    if entry.is_complete(view):
        return 0
    have = np.zeros(n, bool)
    for a, b, s in list_shards(entry):
        if s.is_complete(view):
            have[a:b] = True
    return int((~have).sum())
