"""Which views of each member a run still computes: "is this view done?" over the cache's
coverage record (kaggle_tta.cache.coverage), for a whole run and for a share of its rows,
and whether the disk under cache.dir holds what the run writes."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from kaggle_tta.cache import CacheEntry
from kaggle_tta.cache.coverage import Coverage
from kaggle_tta.cache.entry import SIZES
from kaggle_tta.cache.files import size_text
from kaggle_tta.cache.shards import covered, list_shards, read_rows
from kaggle_tta.cache.trust import checked_entry
from kaggle_tta.config.errors import CacheError
from kaggle_tta.engine.device import resolve_device, resolve_precision
from kaggle_tta.engine.plan import Plan
from kaggle_tta.engine.precision import REDUCED, check_repays, ragged, recorded_check
from kaggle_tta.engine.stats import MemberStats, RunStats
from kaggle_tta.exec.forward import MemberWork
from kaggle_tta.exec.precision import PrecisionCheck
from kaggle_tta.ops.gate import skipping


def pending_work(
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
        ids = plan.testset.ids if plan.rows is None else None
        main = checked_entry(plan.cache_root, m.name, m.fingerprint(chosen.ran_in), m.inputs, ids, heal=locked_)
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
        done = done_check(plan, main, entry, Coverage(gate, m.activation))
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


def done_check(plan: Plan, main: CacheEntry, entry: CacheEntry, cov: Coverage) -> Callable[[str], bool]:
    """Whether a view (or SIZES) needs no computing for this run: complete in the entry it
    writes (for a share, also in the main entry, or in shards of any split whose copies hold
    exactly this run's rows), and holding every row the member's gate needs there."""
    shards = list_shards(main) if entry is not main else []

    def complete(view: str) -> bool:
        if entry is main:
            return main.is_complete(view)
        lo, hi = plan.rows  # type: ignore[misc]
        exact = lambda e, v: cov.serves(e, v, exact=True)  # noqa: E731
        return entry.is_complete(view) or main.is_complete(view) or covered(main, view, lo, hi, shards, exact)

    def done(view: str) -> bool:
        if not complete(view):
            return False
        if view == SIZES:
            return True
        for e in (entry, main):
            if e.is_complete(view):
                return cov.serves(e, view, exact=e is not main)  # a share's own shard: its rows exactly
        return True  # complete through shards that hold this run's rows

    return done


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


def all_cached(plan: Plan) -> bool:
    """Whether every member's entry, in the precision this run would compute it in, holds
    all its views (and image sizes): then ``runtime.devices`` starts no ranks. Under
    ``precision: auto`` resolved to a reduced precision that is the verdict an earlier check
    recorded (engine._recorded_check); a member with none would be checked first, so it is
    not cached (an entry complete in another precision is not this run's). Detection members
    are never checked: their reduced entry is theirs."""
    rt = plan.cfg.runtime
    precision = resolve_precision(rt.precision, resolve_device(rt.device))
    for m in plan.members:
        ran_in = precision
        if rt.precision == "auto" and precision in REDUCED:
            known = recorded_check(plan, m, precision)
            if known is not None:
                ran_in = known.ran_in
            elif not ragged(plan, m):  # detection members are not checked: their reduced entry is theirs
                if check_repays(plan, m)[0]:
                    return False  # it would be checked first
                ran_in = "fp32"  # too small to be checked: it runs in fp32 (engine.precision.CHECK_REPAY)
        entry = checked_entry(plan.cache_root, m.name, m.fingerprint(ran_in), m.inputs, plan.testset.ids, heal=False)
        cov = Coverage(skipping(m.gate), m.activation)  # adaptive: the rows this run's gate needs
        if not all(entry.is_complete(v.name) and cov.serves(entry, v.name) for v in m.views) or (
            plan.task.stores_image_sizes and not entry.sizes_complete()
        ):
            return False
    return True


def check_space(plan: Plan, pending: list[MemberWork]) -> None:
    """Stops before any forward when the new files this run preallocates do not fit: on the
    disk, and under /kaggle/working within Kaggle's quota on what a notebook writes there."""
    needed, parts = 0, []
    for w in pending:
        row = plan.task.row_bytes(w, plan)
        views = [v for v in w.views if w.entry.rows_done(v.name) == 0]
        needed += row * len(plan.testset) * len(views)
        if views and row:
            parts.append(f"{w.member.name}: {len(views)} view(s) x {len(plan.testset)} rows x {size_text(row)}")
    free, where = free_bytes(plan), "free"
    room = quota_left(plan.cache_root)
    if room is not None and (free is None or room < free):
        free, where = room, f"left of the {size_text(KAGGLE_QUOTA)} quota of {working_dir()}"
    if free is not None and needed > free:
        raise CacheError(
            f"cache.dir ({plan.cache_root}): this run writes {size_text(needed)} ({'; '.join(parts)}) and "
            f"{size_text(max(free, 0))} are {where}; {SPACE_FIX if 'quota' not in where else QUOTA_FIX}"
        )


KAGGLE_QUOTA = 20 * 10**9  # bytes a Kaggle notebook may write under /kaggle/working


def working_dir() -> Path:
    return Path(os.environ.get("KAGGLE_WORKING_DIR", "/kaggle/working"))


def quota_left(root: Path) -> int | None:
    """Bytes left of Kaggle's quota when ``root`` is under /kaggle/working (None elsewhere):
    the quota (KAGGLE_TTA_WORKING_QUOTA bytes where set) less what the folder holds now."""
    working = working_dir()
    try:
        root.resolve().relative_to(working.resolve())
    except ValueError:
        return None
    if not working.is_dir():
        return None
    quota = int(os.environ.get("KAGGLE_TTA_WORKING_QUOTA", KAGGLE_QUOTA))
    used = 0
    for dirpath, _, files in os.walk(working):
        for name in files:
            with contextlib.suppress(OSError):
                used += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return quota - used


QUOTA_FIX = (
    "put cache.dir outside the working folder (the notebook's default is /tmp/kaggle_tta/cache), or store less "
    "(cache.dtype: float16 or uint8, cache.scale, fewer views)"
)


SPACE_FIX = (
    "free space there, point cache.dir at a larger disk, or store less (cache.dtype: float16 or uint8, cache.scale)"
)


def free_bytes(plan: Plan) -> int | None:
    """Bytes free on the disk under cache.dir (None: no such disk yet; the first write says
    what is wrong)."""
    try:
        return shutil.disk_usage(plan.cache_root if plan.cache_root.exists() else plan.cache_root.parent).free
    except OSError:
        return None
